"""Find the dataset a config names: an uploaded dataset, a local file or folder, or a hub dataset.

In this order: an uploaded dataset's id (`ds-...`); a file or save_to_disk folder under the dataset roots (confined to
them: PERMISSION_DENIED outside); else, when the name looks like a hub id (`org/name`, no data-file extension) and the
server allows hub datasets, a hub dataset, fetched into the hub cache and pinned to a commit (training/data/hub.py).
`eval_dataset` is found the same way, with its own subset, split and revision.
"""

from __future__ import annotations

import re
from pathlib import Path

from finetune_server.errors import ErrorKind, FinetuneError, field_error
from finetune_server.settings import ServerSettings
from finetune_server.storage import layout
from finetune_server.training.config import TrainingConfig
from finetune_server.training.data.hub import HubOptions, fetch_dataset
from finetune_server.training.data.sources import DatasetSource, is_saved_dataset
from finetune_server.training.model_source import resolve_model
from finetune_server.util.paths import check_name, confine, looks_like_path

UPLOADED_DATASET_PREFIX = "ds-"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")
_DATA_SUFFIXES = {".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".csv", ".tsv", ".arrow", ".feather", ".txt"}


def _not_found(field: str, message: str, reason: str = "DATASET_NOT_FOUND", hint: str = "") -> FinetuneError:
    return field_error(ErrorKind.NOT_FOUND, reason, field, message, hint)


def looks_like_hub_id(name: str) -> bool:
    """`org/name`, and not a relative path to a data file (`folder/train.jsonl`)."""
    if looks_like_path(name) or not _HUB_ID.match(name) or ".." in name or "--" in name:
        return False
    return Path(name).suffix.lower() not in _DATA_SUFFIXES


def hub_options(settings: ServerSettings) -> HubOptions:
    return HubOptions(cache_dir=settings.hf_cache_dir, endpoint=settings.hf_endpoint or None, offline=settings.offline)


def _uploaded(name: str, settings: ServerSettings, field: str) -> DatasetSource:
    for suffix in layout.UPLOAD_SUFFIXES:
        candidate = settings.layout.uploaded_dataset(name, suffix)
        if candidate.is_file():
            return DatasetSource.local(candidate)
    raise _not_found(field, f"no uploaded dataset has the id {name!r}")


def _local(found: Path, name: str, split: str, field: str) -> DatasetSource:
    if found.is_dir() and not is_saved_dataset(found):
        message = f"{name!r} is a folder but not one written by datasets' save_to_disk"
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            "NOT_A_DATASET_FOLDER",
            field,
            message,
            hint="Name a data file (JSONL, JSON, Parquet, CSV, Arrow) or a folder written by Dataset.save_to_disk.",
        )
    try:
        return DatasetSource.local(found, split=split, field=field)
    except OSError as exc:  # e.g. a file the server may not read
        message = f"{name!r} cannot be read: {exc.strerror or exc}"
        raise field_error(ErrorKind.PERMISSION_DENIED, "DATASET_UNREADABLE", field, message) from exc


def resolve_dataset(config: TrainingConfig, settings: ServerSettings, field: str = "dataset") -> DatasetSource:
    """The source `config.<field>` names (see the module docstring). Raises FinetuneError: NOT_FOUND,
    PERMISSION_DENIED (outside the roots, hub not allowed, gated), UNAVAILABLE (hub unreachable), INVALID_ARGUMENT."""
    name: str = getattr(config, field).strip()
    check_name(name, field)
    options = config.source_options(field)
    if name.startswith(UPLOADED_DATASET_PREFIX) and "/" not in name and "\\" not in name:
        return _uploaded(name, settings, field)
    hub_id = looks_like_hub_id(name)
    if not hub_id or settings.dataset_roots:
        try:
            found = confine(name, settings.dataset_roots, field)
        except FinetuneError:
            if not hub_id:
                raise
        else:
            if found.exists():
                return _local(found, name, options["split"], field)
            if not hub_id:
                raise _not_found(field, f"{name!r} is not a file under the dataset folders")
    if not settings.allow_hub_datasets:
        message = f"{name!r} is not under the dataset folders, and this server does not load hub datasets"
        raise field_error(
            ErrorKind.PERMISSION_DENIED,
            "HUB_DATASETS_NOT_ALLOWED",
            field,
            message,
            hint="Upload the data (UploadDataset) or name a file under the server's dataset folders.",
        )
    return fetch_dataset(name, **options, options=hub_options(settings), field=field)


def training_refs(config: TrainingConfig, settings: ServerSettings) -> tuple[str, str, str | None]:
    """What a training run loads, found the way validation found it: the model's load ref (a local folder or a hub
    id) and the refs of the dataset and of the eval dataset (None without one); a hub dataset is fetched if needed."""
    model = resolve_model(config.model_name, settings)
    dataset = resolve_dataset(config, settings, "dataset")
    eval_dataset = resolve_dataset(config, settings, "eval_dataset") if config.eval_dataset else None
    return model.load_ref, dataset.ref, eval_dataset.ref if eval_dataset else None
