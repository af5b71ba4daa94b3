"""Random configs sent to a real server: every answer is OK or a caller-error status, never UNKNOWN or INTERNAL."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc

from .conftest import RunningServer

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]))
NAMES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["tiny-qwen2", "facts.jsonl", "../x", "/etc/passwd", "ds-0", "org/model", "", ".", "..", "\x00"]),
)


def _value(field: FieldDescriptor) -> st.SearchStrategy[object]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_INT64:
        return st.integers(-(2**63), 2**63 - 1)
    if kind == FieldDescriptor.TYPE_INT32:
        return INT32
    return NAMES


@st.composite
def messages(draw: st.DrawFn, cls: type) -> object:
    message = cls()
    for field in cls.DESCRIPTOR.fields:
        if field.message_type is not None and field.is_repeated:  # eval_probes
            item = getattr(pb, field.message_type.name)
            getattr(message, field.name).extend(draw(st.lists(messages(item), max_size=3)))
        elif field.message_type is not None:
            if draw(st.booleans()):
                getattr(message, field.name).CopyFrom(draw(messages(pb.LoraConfig)))
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(NAMES, max_size=4)))
        elif draw(st.booleans()):
            setattr(message, field.name, draw(_value(field)))
    return message


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.FineTuneServiceStub]:
    channel, stub = server.stub()
    yield stub
    channel.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=messages(pb.TrainingConfig), device=st.sampled_from(["", "rtx_3060", "nope", "a100_80gb"]))
def test_random_configs_never_get_unknown_or_internal(
    stub: pb_grpc.FineTuneServiceStub, config: pb.TrainingConfig, device: str
) -> None:
    try:
        stub.ValidateConfig(pb.ValidateConfigRequest(config=config, target_device=device), timeout=30)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        assert code in ALLOWED, (code, error.details(), config)
        assert error.details(), "every rejection says why"
    assert code in ALLOWED


# Names the operating system refuses or barely accepts: lengths up to and past NAME_MAX (255 bytes a component) and
# PATH_MAX (4096), multi-byte characters that cross those limits in bytes, control characters, deep paths.
_CHARACTERS = st.sampled_from(["a", "é", "漢", "😀", "\x00", "\x01", "\x1f", "\x7f", "\n", " ", ".", "/", "\\", "-"])
_LENGTHS = st.sampled_from([1, 64, 254, 255, 256, 300, 1000, 4095, 4096, 4097, 6000])
LONG_NAMES = st.one_of(
    st.builds(lambda c, n: c * n, _CHARACTERS, _LENGTHS),
    st.builds(lambda c, n, d: "/".join([c * n] * d), _CHARACTERS, _LENGTHS, st.sampled_from([2, 20, 100])),
    st.builds(lambda n, suffix: "x" * n + suffix, _LENGTHS, st.sampled_from(["", ".jsonl", "/facts.jsonl"])),
)
NAME_FIELDS = ["model_name", "dataset", "eval_dataset", "dataset_subset", "dataset_split"]


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(field=st.sampled_from(NAME_FIELDS), name=LONG_NAMES)
@example(field="model_name", name="/" * 4096)  # echoed in message and details: past the client's 8 KiB metadata cap
@example(field="dataset", name="\u00e9" * 3000)  # each character percent-encoded in grpc-message
def test_names_past_the_os_limits_are_caller_errors_naming_the_field(
    stub: pb_grpc.FineTuneServiceStub, field: str, name: str
) -> None:
    config = pb.TrainingConfig(model_name="tiny-qwen2", dataset="facts.jsonl", max_length=64)
    setattr(config, field, name)
    try:
        stub.ValidateConfig(pb.ValidateConfigRequest(config=config), timeout=30)
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, (error.code(), error.details(), field, len(name))
        assert error.details()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=LONG_NAMES)
def test_upload_filenames_past_the_os_limits_are_caller_errors(stub: pb_grpc.FineTuneServiceStub, name: str) -> None:
    def messages() -> Iterator[pb.UploadDatasetRequest]:
        yield pb.UploadDatasetRequest(metadata=pb.UploadDatasetMetadata(filename=name + ".jsonl"))
        yield pb.UploadDatasetRequest(chunk=b'{"text": "x"}\n')

    try:
        stub.UploadDataset(messages(), timeout=30)
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, (error.code(), error.details(), len(name))
