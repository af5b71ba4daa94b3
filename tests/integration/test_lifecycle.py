"""Deleting what a caller made, and finding jobs by label, against the session's real server with real workers:
DeleteJob (its folder, events and record, with its artifacts when asked), ListArtifacts and GetArtifact, freeing
exactly the bytes that were on disk, and the refusals (a job that has not ended, bad labels). Owners, and artifacts
that outlive their job, are in test_security.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from finetune_client import FinetuneServiceError, GrpcFineTuneService
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.storage.layout import DataDir
from finetune_server.util.paths import folder_bytes

from .conftest import RunningServer
from .test_jobs import job_fields, states_of


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[GrpcFineTuneService]:
    with GrpcFineTuneService(server.address, timeout=120) as service:
        yield service


def refused(call: object, *args: object, **kwargs: object) -> FinetuneServiceError:
    with pytest.raises(FinetuneServiceError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


def test_an_ended_job_is_deleted_with_its_artifacts_freeing_all_it_held_and_labels_find_it(
    client: GrpcFineTuneService, server: RunningServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = DataDir(server.data_dir)
    run = uuid.uuid4().hex[:12]
    labels = {"suite": "lifecycle", "run": run}
    stream = client.iter_train(job_fields(tiny_model_dir.name, max_steps=2, save_steps=2), labels=labels)
    job = next(stream).job
    assert dict(job.labels) == labels
    # At once, before its worker has even imported torch: the job is queued or running, never ended.
    early = refused(client.delete_job, job.id)
    assert early.code == grpc.StatusCode.FAILED_PRECONDITION and early.reason == "JOB_NOT_FINISHED"
    assert early.metadata["state"] in {"QUEUED", "RUNNING"} and early.metadata["state"] in early.message
    assert states_of([r.event for r in stream])[-1] == pb.JOB_STATE_SUCCEEDED, "the refused delete changed nothing"

    assert [j.id for j in client.list_jobs(labels={"run": run})] == [job.id]
    assert [j.id for j in client.list_jobs(["succeeded"], labels={"run": run, "suite": "lifecycle"})] == [job.id]
    assert list(client.list_jobs(labels={"run": run, "suite": "other"})) == []
    assert list(client.list_jobs(["running"], labels={"run": run})) == []
    assert dict(client.get_job(job.id).labels) == labels

    exported = client.export_model(tmp_path / "adapter", job_id=job.id)
    artifact = client.get_artifact(exported.artifact_id)
    assert artifact.job_id == job.id and artifact.owner == "" and artifact.files
    assert [a.id for a in client.list_artifacts(job_id=job.id)] == [artifact.id]
    assert artifact.id in {a.id for a in client.list_artifacts()}
    job_dir = data.job(job.id)
    assert job_dir.complete_checkpoints() and job_dir.adapter.is_dir()
    held = folder_bytes(job_dir.root) + folder_bytes(data.artifact(artifact.id))
    held += data.artifact_log(artifact.id).stat().st_size

    deleted = client.delete_job(job.id, delete_artifacts=True)
    assert deleted.job.id == job.id and list(deleted.deleted_artifact_ids) == [artifact.id]
    assert deleted.freed_bytes == held > artifact.total_size_bytes
    assert not job_dir.root.exists() and not data.artifact(artifact.id).exists()
    assert not data.artifact_log(artifact.id).exists()
    for call in (client.get_job, client.list_checkpoints, lambda job_id: list(client.watch(job_id))):
        assert refused(call, job.id).code == grpc.StatusCode.NOT_FOUND
    for call, target in (
        (client.delete_job, job.id),
        (client.get_artifact, artifact.id),
        (client.delete_artifact, artifact.id),
    ):
        gone = refused(call, target)
        assert gone.code == grpc.StatusCode.NOT_FOUND and [r.resource_name for r in gone.resources] == [target]
    assert list(client.list_jobs(labels={"run": run})) == [] and list(client.list_artifacts(job_id=job.id)) == []


@pytest.mark.parametrize(
    ("labels", "reasons"),
    [
        ({"Team": "nlp"}, ["INVALID_LABEL_KEY"]),
        ({"team": "n l p", "": "x"}, ["INVALID_LABEL_KEY", "INVALID_LABEL_VALUE"]),
        ({"k" * 64: "v", "ok": "v" * 64}, ["INVALID_LABEL_KEY", "INVALID_LABEL_VALUE"]),
        ({f"k{i}": "v" for i in range(33)}, ["TOO_MANY_LABELS"]),
    ],
)
def test_bad_labels_are_invalid_argument_naming_the_field(
    client: GrpcFineTuneService, tiny_model_dir: Path, labels: dict[str, str], reasons: list[str]
) -> None:
    config = job_fields(tiny_model_dir.name)
    for call in (lambda: next(client.iter_train(config, labels=labels)), lambda: list(client.list_jobs(labels=labels))):
        error = refused(call)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(v.reason for v in error.violations) == sorted(reasons)
        assert {v.field for v in error.violations} == {"labels"}
