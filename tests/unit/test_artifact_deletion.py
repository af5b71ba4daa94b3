"""Deleting an artifact while it is in use, on the real ExportService over a real SQLite store and real files: a
download in progress holds its artifact, and a deletion in progress keeps exports and downloads from starting."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.export.formats import ExportFormat
from finetune_server.jobs.exports import ExportService
from finetune_server.settings import ServerSettings
from finetune_server.storage.job_store import SqliteJobStore
from finetune_server.storage.records import ArtifactRecord, JobState

ART_ID = "art-0123456789abcdef"
CONTENT = b"weights " * 1000


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(data_dir=tmp_path / "data")


@pytest.fixture
def store(settings: ServerSettings) -> Iterator[SqliteJobStore]:
    settings.data_dir.mkdir(parents=True)
    with SqliteJobStore(settings.layout.store) as opened:
        opened.create_job(job_id="job-a", config={}, owner="alice", now=1.0)
        opened.transition("job-a", JobState.RUNNING, now=2.0)
        opened.transition("job-a", JobState.SUCCEEDED, now=3.0, result={"steps": 1})
        yield opened


@pytest.fixture
def record(settings: ServerSettings, store: SqliteJobStore) -> ArtifactRecord:
    """An artifact of job-a with one file and its export log, on disk and in the store."""
    folder = settings.layout.artifact(ART_ID)
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(CONTENT)
    settings.layout.artifact_log(ART_ID).write_text("exported\n")
    files = [
        {"path": "adapter_model.safetensors", "size_bytes": len(CONTENT), "sha256": hashlib.sha256(CONTENT).hexdigest()}
    ]
    artifact = ArtifactRecord(
        id=ART_ID, job_id="job-a", format="ADAPTER", step=1, base_model="m", path=f"artifacts/{ART_ID}",
        files=files, total_size_bytes=len(CONTENT), create_time=4.0, owner="alice",
    )  # fmt: skip
    return store.put_artifact(artifact)


async def test_an_artifact_being_downloaded_is_deleted_only_once_the_download_ends(
    settings: ServerSettings, store: SqliteJobStore, record: ArtifactRecord
) -> None:
    exports = ExportService(settings, store)
    download = exports.download(ART_ID, "", 0)
    first = await anext(download)  # the stream is open, suspended at its first chunk
    assert first["data"] == CONTENT
    with pytest.raises(FinetuneError) as in_use:
        await exports.delete(record)
    assert (in_use.value.kind, in_use.value.reason) == (ErrorKind.FAILED_PRECONDITION, "ARTIFACT_IN_USE")
    assert "downloaded" in in_use.value.message and settings.layout.artifact(ART_ID).is_dir()
    assert store.get_artifact(ART_ID) == record

    await download.aclose()  # the caller went
    freed = await exports.delete(record)
    assert freed == len(CONTENT) + len("exported\n")
    assert not settings.layout.artifact(ART_ID).exists() and not settings.layout.artifact_log(ART_ID).exists()
    with pytest.raises(KeyError):
        store.get_artifact(ART_ID)


async def test_while_a_deletion_runs_no_export_or_download_of_it_starts(
    settings: ServerSettings, store: SqliteJobStore, record: ArtifactRecord
) -> None:
    exports = ExportService(settings, store)
    with exports.deleting("job-a", [ART_ID]):
        with pytest.raises(FinetuneError) as download:
            await anext(exports.download(ART_ID, "", 0))
        assert download.value.kind is ErrorKind.NOT_FOUND
        with pytest.raises(FinetuneError) as export:
            await anext(exports.export("job-a", ExportFormat.ADAPTER, None, owner="alice"))
        assert (export.value.kind, export.value.reason) == (ErrorKind.FAILED_PRECONDITION, "BEING_DELETED")
        with pytest.raises(FinetuneError) as twice:
            await exports.delete(record)
        assert twice.value.reason == "BEING_DELETED"
    assert [chunk["data"] async for chunk in exports.download(ART_ID, "", 0)] == [CONTENT], "released"


async def test_a_record_naming_a_folder_outside_the_artifacts_removes_nothing(
    settings: ServerSettings, store: SqliteJobStore, record: ArtifactRecord
) -> None:
    exports = ExportService(settings, store)
    stray = ArtifactRecord(**{**record.__dict__, "id": "art-stray", "path": "jobs"})
    settings.jobs_dir.mkdir()
    with pytest.raises(FinetuneError) as refused:
        await exports.delete(stray)
    assert refused.value.reason == "ARTIFACT_PATH_UNEXPECTED" and settings.jobs_dir.is_dir()
