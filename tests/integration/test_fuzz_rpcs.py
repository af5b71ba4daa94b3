"""Hypothesis-generated requests for every RPC, sent to a real server: never UNKNOWN or INTERNAL, server healthy.

Two kinds of case per RPC: a request made of random field values, and one that is *nearly right*, so it gets past
the first checks and into the code behind them: a valid config with random fields overridden (ValidateConfig,
Train), the ids of a real job, artifact and dataset with random other fields (GetJob, WatchJob, CancelJob, Export,
DownloadArtifact), an upload with proper metadata whose content mixes good dataset lines with malformed ones
(broken JSON, invalid UTF-8, 5,000-deep nesting, huge and empty lines, wrong shapes).

The default run sends a few hundred cases (FUZZ_EXAMPLES=40 per RPC); `make test-soak` sends 1,200 per RPC with
FUZZ_REPORT=1, which writes the cases and the status codes they got to bench/results/reliability.md and requires
at least 10,000 cases in all.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc

from ..reliability_report import machine, write_report_section
from .conftest import RunningServer
from .test_jobs import job_config, train_to_end, upload
from .test_validate_fuzz import LONG_NAMES

CALLER_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,  # a request_id reused for a different request (AIP-155)
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a stream that legitimately follows a live job past the test's deadline
}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
REPORT_MIN_CASES = 10_000  # what a full run (FUZZ_REPORT=1) must have sent
STRINGS = st.one_of(
    st.text(max_size=64),
    st.text(max_size=5000),
    st.sampled_from(
        [
            "",
            "tiny-qwen2",
            "facts.jsonl",
            "../../etc/passwd",
            "/etc",
            "~",
            "~0",
            "~root/x",
            "ds-0",
            "job-",
            "art-",
            ".",
            "\x00",
        ]
    ),
)


def field_strategy(field: FieldDescriptor, depth: int, strings: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.integers(-(2**63), 2**63 - 1)
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_ENUM):
        return st.integers(-(2**31), 2**31 - 1)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=2048)  # invalid UTF-8 included
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(field.message_type, strings, depth + 1)
    return strings


@st.composite
def message_strategy(
    draw: st.DrawFn, descriptor: Descriptor, strings: st.SearchStrategy[str] = STRINGS, depth: int = 0
) -> Message:
    cls = getattr(pb, descriptor.name, None) if descriptor.file is pb.DESCRIPTOR else None
    message: Message = cls() if cls is not None else _well_known(descriptor)
    if depth > 3:
        return message
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue  # no request carries a map
        if not draw(st.booleans()):
            continue
        strategy = field_strategy(field, depth, strings)
        if field.is_repeated:
            values = draw(st.lists(strategy, max_size=5))
            container = getattr(message, field.name)
            for value in values:
                if field.message_type is not None:
                    container.add().CopyFrom(value)
                else:
                    container.append(value)
        elif field.message_type is not None:
            getattr(message, field.name).CopyFrom(draw(strategy))
        else:
            setattr(message, field.name, draw(strategy))
    return message


def _well_known(descriptor: Descriptor) -> Message:
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(descriptor.full_name)()


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@dataclass(frozen=True)
class Targets:
    """Real objects on the server, so that random requests can name them."""

    config: pb.TrainingConfig  # valid
    job_id: str  # SUCCEEDED, with checkpoints
    artifact_id: str
    artifact_path: str
    dataset_id: str

    def strings(self) -> st.SearchStrategy[str]:
        real = [self.job_id, self.artifact_id, self.artifact_path, self.dataset_id, self.config.model_name]
        return st.one_of(STRINGS, st.sampled_from(real))


@pytest.fixture(scope="module")
def targets(channel: grpc.Channel, tiny_model_dir: Path) -> Targets:
    stub = pb_grpc.FineTuneServiceStub(channel)
    config = job_config(tiny_model_dir.name, max_steps=2, save_steps=1)
    job, events = train_to_end(stub, config)
    assert events[-1].state_change.current == pb.JOB_STATE_SUCCEEDED
    export = list(stub.Export(pb.ExportRequest(job_id=job.id, format=pb.EXPORT_FORMAT_ADAPTER), timeout=120))
    artifact = export[-1].artifact
    data = b"".join(b'{"instruction": "Q%d?", "output": "A%d."}\n' % (i, i) for i in range(8))
    dataset = upload(stub, data, filename="fuzz-base.jsonl").dataset
    return Targets(config, job.id, artifact.id, artifact.files[0].path, dataset.id)


def near_valid(descriptor: Descriptor, base: Message, strings: st.SearchStrategy[str]) -> st.SearchStrategy[Message]:
    """`base` (a valid request) with the fields of a random one merged over it: one or a few fields go wrong."""

    def merge(random: Message) -> Message:
        merged = type(base)()
        merged.CopyFrom(base)
        merged.MergeFrom(random)
        return merged

    return message_strategy(descriptor, strings).map(merge)


JSON_TEXT = st.text(max_size=200)
GOOD_LINES = st.one_of(
    st.builds(lambda q, a: json.dumps({"instruction": q, "output": a}), JSON_TEXT, JSON_TEXT),
    st.builds(
        lambda turns: json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}),
        st.lists(st.tuples(st.sampled_from(["system", "user", "assistant", "tool", "nobody"]), JSON_TEXT), max_size=4),
    ),
    st.builds(lambda t: json.dumps({"text": t}), JSON_TEXT),
)
BAD_LINES = st.one_of(
    st.builds(lambda t: '{"instruction": ' + t, JSON_TEXT),  # broken JSON
    st.builds(json.dumps, st.one_of(st.integers(), st.lists(st.integers()), st.text(), st.none())),  # not an object
    st.builds(lambda k, v: json.dumps({k: v}), st.text(max_size=20), st.text(max_size=20)),  # unknown shape
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.integers(1, 300_000).map(lambda n: json.dumps({"instruction": "q", "output": "x" * n})),  # huge line
    st.sampled_from(["", "   ", "\t", "null", "{}", '{"messages": []}', '{"messages": "hi"}', "\ufeff{}"]),
)
LINE_BYTES = st.one_of(
    st.one_of(GOOD_LINES, BAD_LINES).map(lambda line: line.encode("utf-8", errors="surrogatepass")),
    st.binary(max_size=200),  # invalid UTF-8 included
)


@st.composite
def dataset_upload(draw: st.DrawFn, strings: st.SearchStrategy[str]) -> list[pb.UploadDatasetRequest]:
    """Proper metadata, then a dataset of good and malformed lines cut into chunks of random sizes."""
    filename = draw(st.one_of(st.sampled_from(["d.jsonl", "d.json", "d.txt", "d.csv", "../d.jsonl"]), strings))
    metadata = pb.UploadDatasetMetadata(filename=filename, data_format=draw(st.sampled_from(["", "alpaca", "bogus"])))
    data = b"\n".join(draw(st.lists(LINE_BYTES, min_size=1, max_size=12)))
    messages = [pb.UploadDatasetRequest(metadata=metadata)]
    start = 0
    while start < len(data):
        size = draw(st.integers(1, 64 << 10))
        messages.append(pb.UploadDatasetRequest(chunk=data[start : start + size]))
        start += size
    return messages


# Never given the targets' real ids: deleting the job or its artifact would leave the methods fuzzed after them only
# NOT_FOUND to answer.
DELETES_TARGETS = frozenset({"DeleteJob", "DeleteArtifact"})


def request_strategy(method: str, request_type: type[Message], targets: Targets) -> st.SearchStrategy[Message]:
    strings = STRINGS if method in DELETES_TARGETS else targets.strings()
    descriptor = request_type.DESCRIPTOR
    bases: dict[str, Message] = {
        "ValidateConfig": pb.ValidateConfigRequest(config=targets.config),
        "StreamValidateConfig": pb.StreamValidateConfigRequest(config=targets.config),
        "Train": pb.TrainRequest(config=targets.config),
        "GetJob": pb.GetJobRequest(job_id=targets.job_id),
        "WatchJob": pb.WatchJobRequest(job_id=targets.job_id),
        "CancelJob": pb.CancelJobRequest(job_id=targets.job_id),
        "Export": pb.ExportRequest(job_id=targets.job_id, format=pb.EXPORT_FORMAT_ADAPTER),
        "DownloadArtifact": pb.DownloadArtifactRequest(artifact_id=targets.artifact_id, path=targets.artifact_path),
        "ListCheckpoints": pb.ListCheckpointsRequest(job_id=targets.job_id),
        "GetDataset": pb.GetDatasetRequest(dataset_id=targets.dataset_id),
        "GetArtifact": pb.GetArtifactRequest(artifact_id=targets.artifact_id),
        "ListArtifacts": pb.ListArtifactsRequest(job_id=targets.job_id),
    }
    random = message_strategy(descriptor, strings)
    return st.one_of(random, near_valid(descriptor, bases[method], strings)) if method in bases else random


Tally = defaultdict[str, Counter[str]]


@pytest.fixture(scope="module")
def tally(channel: grpc.Channel) -> Iterator[Tally]:
    """Status codes per RPC over the module; written to the reliability report when FUZZ_REPORT=1."""
    counts: Tally = defaultdict(Counter)
    load_at_start, started = os.getloadavg()[0], time.perf_counter()
    yield counts
    if os.environ.get("FUZZ_REPORT") == "1":
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        write_fuzz_report(counts, time.perf_counter() - started, load_at_start, health.status)
        total = sum(sum(c.values()) for c in counts.values())
        assert total >= REPORT_MIN_CASES, f"a full fuzz run sends at least {REPORT_MIN_CASES} cases, this one {total}"


def write_fuzz_report(counts: Tally, wall_s: float, load_at_start: float, health: int) -> None:
    codes = sorted({code for per_method in counts.values() for code in per_method})
    total = sum(sum(c.values()) for c in counts.values())
    forbidden = sum(c[name] for c in counts.values() for name in ("UNKNOWN", "INTERNAL"))
    rows = "\n".join(
        f"| {method} | {sum(c.values())} | " + " | ".join(str(c.get(code, 0)) for code in codes) + " |"
        for method, c in sorted(counts.items())
    )
    write_report_section(
        "fuzz",
        f"""## Fuzz: hypothesis requests to every RPC of a running server (tests/integration/test_fuzz_rpcs.py)

{machine(load_at_start)}. {EXAMPLES} examples asked per RPC (hypothesis stops early when a strategy has fewer
distinct cases: GetServerInfo and ListPresets take empty requests). Random and boundary values, strings up to 5,000
characters, nested messages, lists, invalid UTF-8 in bytes fields, path tricks; nearly valid requests (a valid
config with random fields overridden; the ids of a real job, artifact and dataset with random other fields); uploads
as random message sequences or as proper metadata followed by good and malformed dataset lines; and every field that
names a job, artifact, dataset, metric or a path inside an artifact given names past the OS limits (NAME_MAX,
PATH_MAX), of every byte class and up to 100 levels deep.

| figure | value |
|---|---|
| cases sent | {total} in {wall_s:.0f} s |
| UNKNOWN or INTERNAL statuses | {forbidden} |
| server health afterwards | {health_pb2.HealthCheckResponse.ServingStatus.Name(health)} |

| RPC | cases | {" | ".join(codes)} |
|---|---|{"---|" * len(codes)}
{rows}
""",
    )


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, Message):
            for _ in result:
                pass
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _train(stub: pb_grpc.FineTuneServiceStub, request: pb.TrainRequest) -> tuple[grpc.StatusCode, str]:
    """Train answers with the job first: a job that was accepted is cancelled at once, so none holds the slot."""
    call = stub.Train(request, timeout=20)
    try:
        first = next(call)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    call.cancel()
    try:
        stub.CancelJob(pb.CancelJobRequest(job_id=first.job.id), timeout=20)
    except grpc.RpcError as error:  # a reused request_id answers with its job, which may have ended long ago
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    return grpc.StatusCode.OK, ""


def _unary_and_server_streaming() -> list[tuple[str, type[Message]]]:
    service = pb.DESCRIPTOR.services_by_name["FineTuneService"]
    return [(m.name, getattr(pb, m.input_type.name)) for m in service.methods if not m.client_streaming]


def _assert_caller_error(code: grpc.StatusCode, details: str, case: object) -> None:
    assert code in CALLER_ERRORS, (code, details, case)
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert details, "every rejection says why"


@pytest.mark.parametrize(("method", "request_type"), _unary_and_server_streaming())
def test_random_requests_get_caller_errors_only(
    channel: grpc.Channel, tally: Tally, targets: Targets, method: str, request_type: type[Message]
) -> None:
    stub = pb_grpc.FineTuneServiceStub(channel)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(request=request_strategy(method, request_type, targets))
    def check(request: Message) -> None:
        if method == "Train":
            code, details = _train(stub, request)  # type: ignore[arg-type]
        else:
            code, details = _code(lambda: getattr(stub, method)(request, timeout=20))
        tally[method][code.name] += 1
        _assert_caller_error(code, details, (method, request))

    check()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_random_uploads_get_caller_errors_only(channel: grpc.Channel, tally: Tally, targets: Targets) -> None:
    stub = pb_grpc.FineTuneServiceStub(channel)
    strings = targets.strings()
    uploads = st.one_of(
        st.lists(message_strategy(pb.UploadDatasetRequest.DESCRIPTOR, strings), max_size=6), dataset_upload(strings)
    )

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(messages=uploads)
    def check(messages: list[pb.UploadDatasetRequest]) -> None:
        code, details = _code(lambda: stub.UploadDataset(iter(messages), timeout=20))
        tally["UploadDataset"][code.name] += 1
        _assert_caller_error(code, details, [m for m in messages if m.WhichOneof("kind") == "metadata"])

    check()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# Every request field that names a job, an artifact or a file inside one, with names the operating system refuses or
# barely accepts (LONG_NAMES: lengths past NAME_MAX and PATH_MAX, every byte class, deep paths).
NAMED_REQUESTS: dict[str, Callable[[Targets, str], tuple[str, Message]]] = {
    "GetJob.job_id": lambda t, name: ("GetJob", pb.GetJobRequest(job_id=name)),
    "WatchJob.job_id": lambda t, name: ("WatchJob", pb.WatchJobRequest(job_id=name)),
    "CancelJob.job_id": lambda t, name: ("CancelJob", pb.CancelJobRequest(job_id=name)),
    "Export.job_id": lambda t, name: ("Export", pb.ExportRequest(job_id=name, format=pb.EXPORT_FORMAT_ADAPTER)),
    "DownloadArtifact.artifact_id": lambda t, name: ("DownloadArtifact", pb.DownloadArtifactRequest(artifact_id=name)),
    "ListCheckpoints.job_id": lambda t, name: ("ListCheckpoints", pb.ListCheckpointsRequest(job_id=name)),
    "Export.best_checkpoint_by": lambda t, name: (
        "Export",
        pb.ExportRequest(job_id=t.job_id, format=pb.EXPORT_FORMAT_ADAPTER, best_checkpoint_by=name),
    ),
    "GetDataset.dataset_id": lambda t, name: ("GetDataset", pb.GetDatasetRequest(dataset_id=name)),
    "DeleteDataset.dataset_id": lambda t, name: ("DeleteDataset", pb.DeleteDatasetRequest(dataset_id=name)),
    "DeleteJob.job_id": lambda t, name: ("DeleteJob", pb.DeleteJobRequest(job_id=name)),
    "GetArtifact.artifact_id": lambda t, name: ("GetArtifact", pb.GetArtifactRequest(artifact_id=name)),
    "DeleteArtifact.artifact_id": lambda t, name: ("DeleteArtifact", pb.DeleteArtifactRequest(artifact_id=name)),
    "DownloadArtifact.path": lambda t, name: (
        "DownloadArtifact",
        pb.DownloadArtifactRequest(artifact_id=t.artifact_id, path=name),
    ),
}
NAME_REJECTIONS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,  # a well-formed metric name that no evaluation of the job reported
}


@pytest.mark.parametrize("field", sorted(NAMED_REQUESTS))
def test_ids_and_paths_past_the_os_limits_are_caller_errors(
    channel: grpc.Channel, tally: Tally, targets: Targets, field: str
) -> None:
    stub = pb_grpc.FineTuneServiceStub(channel)

    @settings(max_examples=max(EXAMPLES // 2, 10), deadline=None, suppress_health_check=list(HealthCheck))
    @given(name=LONG_NAMES)
    def check(name: str) -> None:
        method, request = NAMED_REQUESTS[field](targets, name)
        code, details = _code(lambda: getattr(stub, method)(request, timeout=20))
        tally[method][code.name] += 1
        assert code in NAME_REJECTIONS, (code, details, field, len(name))
        assert details, "every rejection says why"

    check()
