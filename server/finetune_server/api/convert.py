"""Conversion between domain dataclasses and contract messages.

Domain result types use the contract's field names, so one generic routine fills any message from any dataclass;
the few fields whose domain form differs (seconds as floats for Durations, datetimes for Timestamps) are handled by
type, not by name.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.export.formats import ExportFormat
from finetune_server.storage.records import JobEventRecord, JobRecord
from finetune_server.training.config import EvalProbe, LoraSettings, TrainingConfig
from finetune_server.training.validation import ValidationReport

M = TypeVar("M", bound=Message)


def _items(obj: Any) -> list[tuple[str, Any]]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if isinstance(obj, Mapping):
        return list(obj.items())
    raise TypeError(f"cannot convert {type(obj).__name__} to a message")


def _set_scalar_message(target: Message, value: Any) -> bool:
    if isinstance(target, duration_pb2.Duration) and isinstance(value, (int, float, dt.timedelta)):
        seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
        target.FromNanoseconds(round(seconds * 1e9))
        return True
    if isinstance(target, timestamp_pb2.Timestamp) and isinstance(value, (dt.datetime, int, float)):
        when = value if isinstance(value, dt.datetime) else dt.datetime.fromtimestamp(value, tz=dt.UTC)
        target.FromDatetime(when.astimezone(dt.UTC))
        return True
    return False


def enum_number(enum_type: Any, name: str) -> int:
    """An enum value by its full name (`JOB_STATE_RUNNING`) or its short one (`RUNNING`, `running`)."""
    values = enum_type.values_by_name
    if name in values:
        return values[name].number
    prefix = enum_type.values[0].name.removesuffix("UNSPECIFIED")  # e.g. "JOB_STATE_"
    return values[prefix + name.upper()].number


def export_format_from_proto(value: pb.ExportFormat.ValueType) -> ExportFormat:
    """The contract's ExportFormat as the domain's (`EXPORT_FORMAT_ADAPTER` -> ADAPTER); INVALID_FORMAT for
    UNSPECIFIED or a number this server does not know. The other way, an artifact record holds the member's name,
    which `fill` turns into the contract's number like any enum field."""
    if value == pb.EXPORT_FORMAT_UNSPECIFIED or value not in pb.ExportFormat.values():
        choices = " or ".join(f.name for f in ExportFormat)
        raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "INVALID_FORMAT", f"format: choose {choices}")
    return ExportFormat[pb.ExportFormat.Name(value).removeprefix("EXPORT_FORMAT_")]


def fill(message: M, obj: Any) -> M:
    """Copy the fields of a dataclass (or mapping) into `message` by name; `None` leaves a field unset.

    Names the message lacks are ignored (domain objects may carry more than the contract shows).
    """
    fields = message.DESCRIPTOR.fields_by_name
    for name, value in _items(obj):
        descriptor = fields.get(name)
        if descriptor is None or value is None:
            continue
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            target_map = getattr(message, name)
            value_field = descriptor.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_field.message_type is not None:
                    fill(target_map[key], item)
                else:
                    target_map[key] = item
        elif descriptor.is_repeated:
            container = getattr(message, name)
            for item in value:
                if descriptor.message_type is not None:
                    fill(container.add(), item)
                else:
                    container.append(item)
        elif descriptor.message_type is not None:
            sub = getattr(message, name)
            if isinstance(value, Message):
                sub.CopyFrom(value)
            elif not _set_scalar_message(sub, value):
                fill(sub, value)
                sub.SetInParent()
        elif descriptor.enum_type is not None and isinstance(value, str):
            setattr(message, name, enum_number(descriptor.enum_type, value))
        else:
            setattr(message, name, value)
    return message


def config_from_proto(message: pb.TrainingConfig) -> TrainingConfig:
    """Read a TrainingConfig message: optional fields that are not present stay `None` (unset)."""

    def read(msg: Message, cls: type) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "lora":
                continue
            descriptor = msg.DESCRIPTOR.fields_by_name[f.name]
            if descriptor.has_presence and not msg.HasField(f.name):
                values[f.name] = None
            elif descriptor.is_repeated and descriptor.message_type is not None:  # eval_probes
                values[f.name] = [EvalProbe(prompt=p.prompt, expected=p.expected) for p in getattr(msg, f.name)]
            elif descriptor.is_repeated:
                values[f.name] = list(getattr(msg, f.name))
            else:
                values[f.name] = getattr(msg, f.name)
        return values

    lora = LoraSettings(**read(message.lora, LoraSettings))
    return TrainingConfig(**read(message, TrainingConfig), lora=lora)


def config_to_proto(config: TrainingConfig) -> pb.TrainingConfig:
    return fill(pb.TrainingConfig(), config)


def report_to_proto(report: ValidationReport) -> pb.ValidateConfigResponse:
    """ValidateConfig's answer (also attached to a rejection); the in-process trainer reads its reports through it
    too, so both services report a config the same way."""
    response = pb.ValidateConfigResponse(
        valid=report.valid,
        resolved_config=config_to_proto(report.resolved_config),
        preset_filled_fields=report.preset_filled_fields,
    )
    fill(response, {"violations": report.violations, "warnings": report.warnings})
    for name in ("model", "dataset", "eval_dataset", "memory_estimate"):
        value = getattr(report, name)
        if value is not None:
            fill(getattr(response, name), value)
    return response


def preset_config_to_proto(values: Mapping[str, Any]) -> pb.TrainingConfig:
    """A preset's dotted-path values (`lora.r`) as a TrainingConfig message holding only those fields."""
    nested: dict[str, Any] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    return fill(pb.TrainingConfig(), nested)


def job_to_proto(job: JobRecord) -> pb.Job:
    message = fill(
        pb.Job(),
        {
            "id": job.id,
            "state": job.state.value,
            "request_id": job.request_id,
            "display_name": job.display_name,
            "create_time": job.create_time,
            "start_time": job.start_time,
            "end_time": job.end_time,
            "progress": job.progress,
            "error": job.error,
            "result": job.result,
            "resume_count": job.resume_count,
            "last_sequence": job.last_sequence,
            "cancel_requested": job.cancel_requested,
            "owner": job.owner,
            "labels": job.labels,
        },
    )
    config = TrainingConfig.from_dict(job.config)
    message.config.CopyFrom(config_to_proto(config))
    if config.init_from_job:  # lineage is what the job's config says it started from
        message.lineage.source_job_id = config.init_from_job
        if config.init_from_checkpoint is not None:
            message.lineage.source_checkpoint_step = config.init_from_checkpoint
        message.lineage.optimizer_resumed = bool(config.resume_optimizer)
    return message


def event_to_proto(event: JobEventRecord) -> pb.JobEvent:
    message = pb.JobEvent(job_id=event.job_id, sequence=event.sequence)
    message.time.FromNanoseconds(round(event.time * 1e9))
    fill(message, {event.kind.value: event.payload})
    getattr(message, event.kind.value).SetInParent()  # an empty payload still says which kind it is
    return message
