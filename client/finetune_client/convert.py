"""Conversions between plain dicts and the contract's messages, driven by the protobuf descriptors.

No field lists are written by hand: a field added to the contract is accepted, checked and reported without a change
here. Dicts use the contract's field names; `None` means "not set", which for proto3 `optional` fields is distinct
from an explicit zero or false.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import descriptor
from google.protobuf.message import Message

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client.interface import (
    ExportResult,
    FieldViolation,
    ProbeComparison,
    ProgressUpdate,
    TrainResult,
    ValidationResult,
)

__all__ = [
    "ConfigConversionError",
    "config_from_dict",
    "config_to_dict",
    "dict_to_message",
    "enum_name",
    "export_result_from_artifact",
    "message_to_dict",
    "progress_from_proto",
    "state_name",
    "train_result_from_job",
    "validation_result_from_report",
]

FD = descriptor.FieldDescriptor
_M = TypeVar("_M", bound=Message)
# The stubs type descriptors as two unrelated classes (pure Python and upb); both behave the same here.
_Field = Any
_Enum = Any

_INT_RANGES = {
    FD.CPPTYPE_INT32: (-(2**31), 2**31 - 1, "int32"),
    FD.CPPTYPE_INT64: (-(2**63), 2**63 - 1, "int64"),
    FD.CPPTYPE_UINT32: (0, 2**32 - 1, "uint32"),
    FD.CPPTYPE_UINT64: (0, 2**64 - 1, "uint64"),
}
_WRONG_TYPE = "INVALID_TYPE"
_UNKNOWN = "UNKNOWN_FIELD"
_RANGE = "OUT_OF_RANGE"


class ConfigConversionError(ValueError):
    """A dict that cannot become a message; lists every problem at once, each as a FieldViolation."""

    def __init__(self, violations: list[FieldViolation], what: str = "training config") -> None:
        self.violations = list(violations)
        self.problems = [str(v) for v in self.violations]
        count = len(self.problems)
        plural = "s" if count != 1 else ""
        super().__init__(f"invalid {what} ({count} problem{plural}): " + "; ".join(self.problems))


# --------------------------------------------------------------------------------------------------------------
# dict -> message
# --------------------------------------------------------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any]) -> pb.TrainingConfig:
    """Build a TrainingConfig from a config dict (nested `lora`); ConfigConversionError lists all problems."""
    return dict_to_message(data, pb.TrainingConfig)


def dict_to_message(data: Mapping[str, Any], message_type: type[_M]) -> _M:
    """Build any message from a dict of its field names; raises ConfigConversionError listing all problems."""
    message = message_type()
    problems: list[FieldViolation] = []
    if not isinstance(data, Mapping):
        problems.append(FieldViolation("", _WRONG_TYPE, f"expected a mapping, got {_describe(data)}"))
    else:
        _fill(message, data, "", problems)
    if problems:
        what = "training config" if message_type is pb.TrainingConfig else message_type.DESCRIPTOR.name
        raise ConfigConversionError(problems, what)
    return message


def _fill(message: Message, data: Mapping[Any, Any], prefix: str, problems: list[FieldViolation]) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in data.items():
        path = f"{prefix}{key}"
        fd = fields.get(key) if isinstance(key, str) else None
        if fd is None:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            problems.append(FieldViolation(path, _UNKNOWN, f"unknown key{suggestion}"))
            continue
        if value is None:
            continue  # unset
        if _is_map(fd):
            _fill_map(message, fd, value, path, problems)
        elif fd.is_repeated:
            _fill_repeated(message, fd, value, path, problems)
        elif fd.cpp_type == FD.CPPTYPE_MESSAGE:
            if not isinstance(value, Mapping):
                problems.append(FieldViolation(path, _WRONG_TYPE, f"expected a mapping, got {_describe(value)}"))
                continue
            child = getattr(message, fd.name)
            child.SetInParent()  # an empty dict still marks the message as present
            _fill(child, value, path + ".", problems)
        else:
            checked = _check_scalar(fd, value, path, problems)
            if checked is not _INVALID:
                setattr(message, fd.name, checked)


def _fill_repeated(message: Message, fd: _Field, value: Any, path: str, problems: list[FieldViolation]) -> None:
    if not isinstance(value, list | tuple):
        problems.append(FieldViolation(path, _WRONG_TYPE, f"expected a list of {_kind(fd)}s, got {_describe(value)}"))
        return
    container = getattr(message, fd.name)
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        if fd.cpp_type == FD.CPPTYPE_MESSAGE:
            if not isinstance(item, Mapping):
                problems.append(FieldViolation(item_path, _WRONG_TYPE, f"expected a mapping, got {_describe(item)}"))
                continue
            _fill(container.add(), item, item_path + ".", problems)
        else:
            checked = _check_scalar(fd, item, item_path, problems)
            if checked is not _INVALID:
                container.append(checked)


def _fill_map(message: Message, fd: _Field, value: Any, path: str, problems: list[FieldViolation]) -> None:
    if not isinstance(value, Mapping):
        problems.append(FieldViolation(path, _WRONG_TYPE, f"expected a mapping, got {_describe(value)}"))
        return
    key_fd = fd.message_type.fields_by_name["key"]
    value_fd = fd.message_type.fields_by_name["value"]
    container = getattr(message, fd.name)
    for key, item in value.items():
        item_path = f"{path}[{key!r}]"
        checked_key = _check_scalar(key_fd, key, item_path, problems)
        if checked_key is _INVALID:
            continue
        if value_fd.cpp_type == FD.CPPTYPE_MESSAGE:
            if isinstance(item, Mapping):
                _fill(container[checked_key], item, item_path + ".", problems)
            else:
                problems.append(FieldViolation(item_path, _WRONG_TYPE, f"expected a mapping, got {_describe(item)}"))
            continue
        checked = _check_scalar(value_fd, item, item_path, problems)
        if checked is not _INVALID:
            container[checked_key] = checked


_INVALID = object()


def _check_scalar(fd: _Field, value: Any, path: str, problems: list[FieldViolation]) -> Any:
    """The value to assign, or _INVALID after recording why not. bool is never a number; ints are valid floats."""
    cpp = fd.cpp_type
    if cpp in _INT_RANGES:
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(FieldViolation(path, _WRONG_TYPE, f"expected an integer, got {_describe(value)}"))
            return _INVALID
        low, high, name = _INT_RANGES[cpp]
        if not low <= value <= high:
            problems.append(FieldViolation(path, _RANGE, f"{value} is out of range for {name} [{low}, {high}]"))
            return _INVALID
        return value
    if cpp in (FD.CPPTYPE_DOUBLE, FD.CPPTYPE_FLOAT):
        if not isinstance(value, int | float) or isinstance(value, bool):
            problems.append(FieldViolation(path, _WRONG_TYPE, f"expected a number, got {_describe(value)}"))
            return _INVALID
        try:
            return float(value)
        except OverflowError:
            problems.append(FieldViolation(path, _RANGE, f"{value} is too large for a float"))
            return _INVALID
    if cpp == FD.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            problems.append(FieldViolation(path, _WRONG_TYPE, f"expected a boolean, got {_describe(value)}"))
            return _INVALID
        return value
    if cpp == FD.CPPTYPE_STRING:
        expected: type = bytes if fd.type == FD.TYPE_BYTES else str
        if not isinstance(value, expected):
            noun = "bytes" if expected is bytes else "a string"
            problems.append(FieldViolation(path, _WRONG_TYPE, f"expected {noun}, got {_describe(value)}"))
            return _INVALID
        return value
    if cpp == FD.CPPTYPE_ENUM:
        number = _enum_number(fd.enum_type, value)
        if number is None:
            choices = ", ".join(enum_name(v) for v in fd.enum_type.values if v.number != 0)
            problems.append(FieldViolation(path, _WRONG_TYPE, f"expected one of {choices}, got {_describe(value)}"))
            return _INVALID
        return number
    problems.append(FieldViolation(path, _WRONG_TYPE, "unsupported field type"))
    return _INVALID


def _enum_number(enum_type: _Enum, value: Any) -> int | None:
    """Accepts the full name (`JOB_STATE_RUNNING`), the short one in any case (`running`), or a defined number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value in enum_type.values_by_number else None
    if isinstance(value, str):
        wanted = value.strip().upper()
        prefix = _enum_prefix(enum_type)
        for candidate in (wanted, prefix + wanted):
            if candidate in enum_type.values_by_name:
                return enum_type.values_by_name[candidate].number
    return None


def _kind(fd: _Field) -> str:
    if fd.cpp_type in _INT_RANGES:
        return "integer"
    if fd.cpp_type in (FD.CPPTYPE_DOUBLE, FD.CPPTYPE_FLOAT):
        return "number"
    if fd.cpp_type == FD.CPPTYPE_BOOL:
        return "boolean"
    if fd.cpp_type == FD.CPPTYPE_MESSAGE:
        return "mapping"
    return "string"


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _is_map(fd: _Field) -> bool:
    return bool(fd.is_repeated and fd.message_type is not None and fd.message_type.GetOptions().map_entry)


# --------------------------------------------------------------------------------------------------------------
# message -> dict
# --------------------------------------------------------------------------------------------------------------


def config_to_dict(message: Message) -> dict[str, Any]:
    """Only the fields that are set (optional fields by presence, others when not default); inverse of
    config_from_dict, so `config_from_dict(config_to_dict(m)) == m`."""
    result: dict[str, Any] = {}
    for fd, value in message.ListFields():
        result[fd.name] = _value_to_python(fd, value, _set_only=True)
    return result


def message_to_dict(message: Message) -> dict[str, Any]:
    """Every field a reader may want: fields without presence always (with their defaults), fields with presence
    (optional scalars, sub-messages, oneof members) only when set. Enums become short lower-case names (`running`),
    int64 stays int, Duration becomes seconds (float), Timestamp an RFC 3339 string."""
    result: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        if fd.has_presence and not message.HasField(fd.name):
            continue
        result[fd.name] = _value_to_python(fd, getattr(message, fd.name), _set_only=False)
    return result


def _value_to_python(fd: _Field, value: Any, *, _set_only: bool) -> Any:
    if _is_map(fd):
        value_fd = fd.message_type.fields_by_name["value"]
        return {k: _scalar_or_message(value_fd, v, _set_only) for k, v in value.items()}
    if fd.is_repeated:
        return [_scalar_or_message(fd, v, _set_only) for v in value]
    return _scalar_or_message(fd, value, _set_only)


def _scalar_or_message(fd: _Field, value: Any, set_only: bool) -> Any:
    if fd.cpp_type == FD.CPPTYPE_MESSAGE:
        full_name = fd.message_type.full_name
        if full_name == "google.protobuf.Duration":
            return value.ToTimedelta().total_seconds()
        if full_name == "google.protobuf.Timestamp":
            return value.ToJsonString()
        return config_to_dict(value) if set_only else message_to_dict(value)
    if fd.cpp_type == FD.CPPTYPE_ENUM:
        return enum_name(fd.enum_type.values_by_number[value]) if value in fd.enum_type.values_by_number else value
    return value


def _enum_prefix(enum_type: _Enum) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_type.name).upper() + "_"


def enum_name(value: Any) -> str:
    """`JOB_STATE_SUCCEEDED` -> `succeeded`, `EXPORT_FORMAT_ADAPTER` -> `adapter`."""
    name = value.name
    prefix = _enum_prefix(value.type)
    return (name[len(prefix) :] if name.startswith(prefix) else name).lower()


def state_name(state: int) -> str:
    """A JobState number as its short name (`succeeded`)."""
    return enum_name(pb.JobState.DESCRIPTOR.values_by_number[state])


# --------------------------------------------------------------------------------------------------------------
# messages -> the interface's result types
# --------------------------------------------------------------------------------------------------------------


def validation_result_from_report(report: pb.ValidateConfigResponse) -> ValidationResult:
    violations = [FieldViolation(v.field, v.reason, v.message, int(v.line)) for v in report.violations]
    return ValidationResult(
        valid=report.valid,
        errors=[str(v) for v in violations],
        warnings=[f"{w.field}: {w.message}" if w.field else w.message for w in report.warnings],
        violations=violations,
        resolved_config=config_to_dict(report.resolved_config),
        preset_filled_fields=list(report.preset_filled_fields),
        memory_estimate=message_to_dict(report.memory_estimate) if report.HasField("memory_estimate") else None,
        dataset=message_to_dict(report.dataset) if report.HasField("dataset") else None,
        model=message_to_dict(report.model) if report.HasField("model") else None,
        eval_dataset=message_to_dict(report.eval_dataset) if report.HasField("eval_dataset") else None,
    )


def progress_from_proto(progress: pb.TrainingProgress, job_id: str | None = None) -> ProgressUpdate:
    return ProgressUpdate(
        step=progress.step,
        total_steps=progress.total_steps,
        epoch=progress.epoch,
        loss=progress.loss,
        learning_rate=progress.learning_rate,
        grad_norm=progress.grad_norm,
        tokens_per_second=progress.tokens_per_second,
        elapsed_s=progress.elapsed.ToTimedelta().total_seconds(),
        eta_s=progress.eta.ToTimedelta().total_seconds() if progress.HasField("eta") else None,
        memory_bytes=progress.memory.allocated_bytes,
        job_id=job_id,
    )


def job_error_text(error: pb.JobError) -> str:
    """`OUT_OF_MEMORY: CUDA out of memory at step 12 (hint: lower per_device_train_batch_size)`."""
    text = f"{error.reason}: {error.message}" if error.reason else error.message
    if error.hint:
        text += f" (hint: {error.hint})"
    return text


def train_result_from_job(job: pb.Job) -> TrainResult:
    """The TrainResult of a job in a final state (a non-final one reports success=False and its state)."""
    succeeded = job.state == pb.JOB_STATE_SUCCEEDED
    result = job.result
    metrics = dict(result.metrics)
    if succeeded:
        metrics.setdefault("trained_tokens", float(result.trained_tokens))
        metrics.setdefault("train_runtime_s", result.train_runtime.ToTimedelta().total_seconds())
    error: str | None = None
    if job.state == pb.JOB_STATE_FAILED:
        error = job_error_text(job.error) if job.HasField("error") else "the job failed"
    elif job.state == pb.JOB_STATE_CANCELLED:
        error = "the job was cancelled"
    elif not succeeded:
        error = f"the job is {state_name(job.state)}"
    return TrainResult(
        success=succeeded,
        job_id=job.id,
        state=state_name(job.state),
        final_loss=result.final_train_loss if succeeded else None,
        eval_loss=result.final_eval_loss if result.HasField("final_eval_loss") else None,
        steps=result.steps if succeeded else job.progress.step,
        metrics=metrics,
        adapter_location=result.adapter_location,
        error=error,
        probes=[probe_comparison_from_proto(p) for p in result.probes],
    )


def probe_comparison_from_proto(probe: pb.ProbeComparison) -> ProbeComparison:
    return ProbeComparison(
        index=probe.index,
        prompt=probe.prompt,
        before=probe.before,
        after=probe.after,
        expected=probe.expected,
        before_exact_match=probe.before_exact_match,
        after_exact_match=probe.after_exact_match,
    )


def export_result_from_artifact(artifact: pb.Artifact, output_path: str) -> ExportResult:
    return ExportResult(
        success=True,
        output_path=output_path,
        format=enum_name(pb.ExportFormat.DESCRIPTOR.values_by_number[artifact.format]),
        files=[message_to_dict(f) for f in artifact.files],
        total_size_bytes=artifact.total_size_bytes,
        artifact_id=artifact.id,
        vllm=message_to_dict(artifact.vllm),
    )
