"""One definition of the export formats: the contract's enum, the CLI's choices and the stored ids agree with it."""

from __future__ import annotations

import hashlib

import pytest

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.api.convert import export_format_from_proto
from finetune_server.cli.main import ExportFormatName
from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.export.formats import ExportFormat
from finetune_server.jobs.exports import artifact_id


def test_every_contract_format_is_one_member_and_back() -> None:
    numbers = [n for n in pb.ExportFormat.values() if n != pb.EXPORT_FORMAT_UNSPECIFIED]
    converted = [export_format_from_proto(n) for n in numbers]
    assert sorted(converted) == sorted(ExportFormat)
    for number, fmt in zip(numbers, converted, strict=True):
        assert pb.ExportFormat.Name(number) == f"EXPORT_FORMAT_{fmt.name}"


@pytest.mark.parametrize("number", [pb.EXPORT_FORMAT_UNSPECIFIED, 99])
def test_unspecified_or_unknown_contract_format_is_invalid(number: int) -> None:
    with pytest.raises(FinetuneError) as info:
        export_format_from_proto(number)  # type: ignore[arg-type]
    assert (info.value.kind, info.value.reason) == (ErrorKind.INVALID_ARGUMENT, "INVALID_FORMAT")
    assert "ADAPTER or MERGED" in info.value.message


def test_the_cli_offers_exactly_the_formats() -> None:
    assert [f.value for f in ExportFormatName] == [f.value for f in ExportFormat]


def test_parse_names_the_choices() -> None:
    assert ExportFormat.parse("merged") is ExportFormat.MERGED
    with pytest.raises(FinetuneError) as info:
        ExportFormat.parse("gguf")
    assert info.value.reason == "EXPORT_FORMAT" and "adapter, merged" in info.value.message


def test_artifact_ids_stay_keyed_by_the_contract_name() -> None:
    """Stored artifacts are found again by id: the key must not change spelling (ADAPTER, not adapter)."""
    assert (
        artifact_id("job-1", ExportFormat.ADAPTER, None)
        == "art-" + hashlib.sha256(b"job-1:ADAPTER:final").hexdigest()[:16]
    )
    assert artifact_id("job-1", ExportFormat.MERGED, 7) == "art-" + hashlib.sha256(b"job-1:MERGED:7").hexdigest()[:16]
