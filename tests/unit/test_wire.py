"""Events go to every watcher as the same bytes, built once: they parse to exactly what converting the event gives."""

from __future__ import annotations

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.api.convert import event_to_proto
from finetune_server.api.wire import EventWire
from finetune_server.storage.records import EventKind, JobEventRecord


def progress(sequence: int, job_id: str = "job-1") -> JobEventRecord:
    payload = {"step": sequence, "total_steps": 10, "loss": 1.5 / sequence, "learning_rate": 1e-3}
    return JobEventRecord(job_id, sequence, 1_700_000_000.25 + sequence, EventKind.PROGRESS, payload)


def test_the_bytes_are_the_responses_the_generated_serializer_would_send() -> None:
    wire, event = EventWire(), progress(3)
    expected = event_to_proto(event)
    assert pb.WatchJobResponse.FromString(wire.watch_response(event)) == pb.WatchJobResponse(event=expected)
    assert pb.TrainResponse.FromString(wire.train_response(event)) == pb.TrainResponse(event=expected)
    assert pb.TrainResponse.FromString(wire.train_response(event)).event.progress.step == 3


def test_every_watcher_of_an_event_gets_the_one_serialised_copy() -> None:
    wire = EventWire()
    first = wire.watch_response(progress(1))
    assert all(wire.watch_response(progress(1)) is first for _ in range(100))
    assert wire.watch_response(progress(1, job_id="job-2")) is not first  # another job's event of that number


def test_the_oldest_events_make_room() -> None:
    wire = EventWire(capacity=2)
    one = wire.watch_response(progress(1))
    wire.watch_response(progress(2))
    wire.watch_response(progress(1))  # used again: now the newest
    wire.watch_response(progress(3))  # event 2 goes
    assert wire.watch_response(progress(1)) is one
    assert len(wire._bytes) == 2
