"""Parsing the server's rich google.rpc.Status into FinetuneServiceError."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from finetune_client import (
    FieldViolation,
    FinetuneServiceError,
    MissingResource,
    QuotaViolation,
    ServerUnavailableError,
    from_rpc_error,
)
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb


class _CallError(grpc.RpcError):
    """Stands in for grpc's own error object (an RpcError that is also a Call): code, details, trailers."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, Any]] = ()) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _error_from(status: status_pb2.Status) -> _CallError:
    grpc_status = rpc_status.to_status(status)
    return _CallError(grpc_status.code, grpc_status.details, grpc_status.trailing_metadata)


def _rejected_config_status() -> tuple[status_pb2.Status, pb.ValidateConfigResponse]:
    report = pb.ValidateConfigResponse(valid=False)
    report.violations.add(field="lora.r", reason="OUT_OF_RANGE", message="must be >= 1")
    report.violations.add(field="dataset", reason="BAD_LINE", message="missing 'output'", line=3)
    report.resolved_config.max_length = 2048
    info = error_details_pb2.ErrorInfo(
        reason="INVALID_CONFIG", domain="finetune.sage", metadata={"hint": "see the violations", "fields": "2"}
    )
    bad = error_details_pb2.BadRequest()
    bad.field_violations.add(field="lora.r", description="must be >= 1", reason="OUT_OF_RANGE")
    bad.field_violations.add(field="dataset", description="line 3: missing 'output'", reason="BAD_LINE")
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="the config has 2 problems",
        details=[_packed(info), _packed(bad), _packed(report)],
    )
    return status, report


def test_rich_status_with_report() -> None:
    status, report = _rejected_config_status()
    error = from_rpc_error(_error_from(status))
    assert type(error) is FinetuneServiceError
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "the config has 2 problems"
    assert (error.reason, error.domain, error.hint) == ("INVALID_CONFIG", "finetune.sage", "see the violations")
    assert error.metadata == {"hint": "see the violations", "fields": "2"}
    assert error.violations == [
        FieldViolation("lora.r", "OUT_OF_RANGE", "must be >= 1", 0),
        FieldViolation("dataset", "BAD_LINE", "missing 'output'", 3),
    ]
    assert error.report == report
    text = str(error)
    assert text.startswith("INVALID_ARGUMENT (INVALID_CONFIG): the config has 2 problems")
    assert "  - dataset: line 3: missing 'output'" in text and "hint: see the violations" in text


def test_bad_request_without_report_reads_line_numbers_from_descriptions() -> None:
    bad = error_details_pb2.BadRequest()
    bad.field_violations.add(field="dataset", description="line 12: not valid JSON", reason="BAD_LINE")
    bad.field_violations.add(field="max_length", description="must be <= 32768", reason="OUT_OF_RANGE")
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad", details=[_packed(bad)])
    error = from_rpc_error(_error_from(status))
    assert error.report is None
    assert error.reason == ""
    assert error.violations == [
        FieldViolation("dataset", "BAD_LINE", "not valid JSON", 12),
        FieldViolation("max_length", "OUT_OF_RANGE", "must be <= 32768", 0),
    ]
    assert [str(v) for v in error.violations] == ["dataset: line 12: not valid JSON", "max_length: must be <= 32768"]


def test_row_and_element_numbers_are_read_and_keep_their_unit() -> None:
    bad = error_details_pb2.BadRequest()
    bad.field_violations.add(field="dataset", description="row 4: missing key 'output'", reason="MISSING_FIELD")
    bad.field_violations.add(field="eval_dataset", description="element 2: expected an object", reason="NOT_AN_OBJECT")
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad", details=[_packed(bad)])
    error = from_rpc_error(_error_from(status))
    assert [v.line for v in error.violations] == [4, 2]
    assert [str(v) for v in error.violations] == [
        "dataset: row 4: missing key 'output'",
        "eval_dataset: element 2: expected an object",
    ]
    from_report = FieldViolation("dataset", "MISSING_FIELD", "row 4: missing key 'output'", 4)
    assert str(from_report) == "dataset: row 4: missing key 'output'", "the number is said once"


def test_hint_is_not_repeated_when_the_message_already_has_it() -> None:
    info = error_details_pb2.ErrorInfo(reason="NO_GPU", domain="finetune.sage", metadata={"hint": "use fp32"})
    status = status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION, message="bf16 needs a GPU (hint: use fp32)", details=[_packed(info)]
    )
    error = from_rpc_error(_error_from(status))
    assert error.hint == "use fp32"
    assert str(error) == "FAILED_PRECONDITION (NO_GPU): bf16 needs a GPU (hint: use fp32)"


def test_plain_status_without_details() -> None:
    error = from_rpc_error(_CallError(grpc.StatusCode.NOT_FOUND, "job job-1 not found"))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.message == "job job-1 not found"
    assert (error.reason, error.hint, error.violations, error.report) == ("", "", [], None)


def test_unavailable_names_the_address() -> None:
    error = from_rpc_error(_CallError(grpc.StatusCode.UNAVAILABLE, "connection refused"), address="10.0.0.5:50051")
    assert isinstance(error, ServerUnavailableError)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.address == "10.0.0.5:50051"
    assert "10.0.0.5:50051" in str(error) and "connection refused" in str(error)


def test_details_still_count_when_a_proxy_changed_the_message() -> None:
    status, _ = _rejected_config_status()
    grpc_status = rpc_status.to_status(status)
    error = from_rpc_error(_CallError(grpc_status.code, "rewritten by a proxy", grpc_status.trailing_metadata))
    assert error.reason == "INVALID_CONFIG"
    assert len(error.violations) == 2


def test_unknown_detail_types_are_ignored() -> None:
    info = error_details_pb2.ErrorInfo(reason="QUOTA", domain="finetune.sage")
    unknown = error_details_pb2.Help(links=[error_details_pb2.Help.Link(description="docs", url="https://x")])
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message="too many jobs", details=[_packed(unknown), _packed(info)]
    )
    error = from_rpc_error(_error_from(status))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "QUOTA"


def test_retry_resource_and_quota_details_are_exposed() -> None:
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(30_500)
    job = error_details_pb2.ResourceInfo(
        resource_type="finetune.sage/Job", resource_name="job-1", description="no job has the id 'job-1'"
    )
    quota = error_details_pb2.QuotaFailure()
    quota.violations.add(subject="server", description="2 jobs queued", quota_id="max_queued_jobs", quota_metric="q")
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message="full", details=[_packed(retry), _packed(job), _packed(quota)]
    )
    error = from_rpc_error(_error_from(status))
    assert error.retry_delay == 30.5
    assert error.resources == [MissingResource("finetune.sage/Job", "job-1", "no job has the id 'job-1'")]
    assert error.quota_violations == [QuotaViolation("server", "2 jobs queued", "max_queued_jobs", "q")]


def test_no_retry_delay_unless_the_server_gives_one() -> None:
    error = from_rpc_error(_CallError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert (error.retry_delay, error.resources, error.quota_violations) == (None, [], [])
