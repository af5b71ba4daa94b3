"""Hypothesis-generated requests for every RPC, sent to a real server: never UNKNOWN or INTERNAL, server healthy.

The default run sends a few hundred cases (FUZZ_EXAMPLES=40 per RPC); `make test-soak` sends 1,000 per RPC (11,000 in
all) with FUZZ_REPORT=1, which writes the cases and the status codes they got to bench/results/reliability.md.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
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

CALLER_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a stream that legitimately follows a live job past the test's deadline
}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
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


def field_strategy(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
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
        return message_strategy(field.message_type, depth + 1)
    return STRINGS


@st.composite
def message_strategy(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    cls = getattr(pb, descriptor.name, None) if descriptor.file is pb.DESCRIPTOR else None
    message: Message = cls() if cls is not None else _well_known(descriptor)
    if depth > 3:
        return message
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue  # no request carries a map
        if not draw(st.booleans()):
            continue
        strategy = field_strategy(field, depth)
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
distinct cases); random and boundary values, strings up to 5,000 characters, nested messages, lists, invalid UTF-8 in
bytes fields, path tricks; uploads as random chunk sequences.

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


def _unary_and_server_streaming() -> list[tuple[str, type[Message]]]:
    service = pb.DESCRIPTOR.services_by_name["FineTuneService"]
    return [(m.name, getattr(pb, m.input_type.name)) for m in service.methods if not m.client_streaming]


@pytest.mark.parametrize(("method", "request_type"), _unary_and_server_streaming())
def test_random_requests_get_caller_errors_only(
    channel: grpc.Channel, tally: Tally, method: str, request_type: type[Message]
) -> None:
    stub = pb_grpc.FineTuneServiceStub(channel)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(request=message_strategy(request_type.DESCRIPTOR))
    def check(request: Message) -> None:
        if method == "Train":  # a random config that happens to be valid must not occupy the slot for long
            request.config.max_steps = 1  # type: ignore[attr-defined]
        code, details = _code(lambda: getattr(stub, method)(request, timeout=20))
        tally[method][code.name] += 1
        assert code in CALLER_ERRORS, (method, code, details, request)
        if code != grpc.StatusCode.OK and code != grpc.StatusCode.DEADLINE_EXCEEDED:
            assert details, "every rejection says why"

    check()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_random_uploads_get_caller_errors_only(channel: grpc.Channel, tally: Tally) -> None:
    stub = pb_grpc.FineTuneServiceStub(channel)
    uploads = st.lists(message_strategy(pb.UploadDatasetRequest.DESCRIPTOR), max_size=6)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(messages=uploads)
    def check(messages: list[pb.UploadDatasetRequest]) -> None:
        code, details = _code(lambda: stub.UploadDataset(iter(messages), timeout=20))
        tally["UploadDataset"][code.name] += 1
        assert code in CALLER_ERRORS, (code, details, messages)

    check()
