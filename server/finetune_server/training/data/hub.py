"""Hub datasets: find `org/name` at a revision, fetch the files of its subset into the hub cache, pin the commit.

Finding goes through huggingface_hub, as for models (training/model_source): one `dataset_info` call with a short
timeout tells a missing, gated or unreachable dataset apart in seconds and names the commit to pin; `snapshot_download`
then fetches README.md and the data files of the subset into the hub cache (the server's `--hf-cache-dir`), from
HF_ENDPOINT. Offline (`--offline`, HF_HUB_OFFLINE), or when the hub cannot be reached, the cached snapshot of the
revision is used. `datasets` reads the snapshot as a local folder (its README `configs`, its split naming), so the
subset and split are checked against what the dataset has.

Why not `datasets.load_dataset(<hub id>)`: datasets 5 reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import; it
downloads hub files into huggingface_hub's default cache whatever `cache_dir` says; and offline it finds only datasets
it has prepared itself before. Going through the hub cache behaves the same online and offline, in the server and in
its workers, and shares the cache the models use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from finetune_server.errors import ErrorKind, FinetuneError, Violation
from finetune_server.training.data.sources import HUB, DatasetSource, choose_split, field_of
from finetune_server.training.model_source import HUB_TIMEOUT_S, default_endpoint, transport_errors

log = structlog.get_logger(__name__)

REPO_TYPE = "dataset"
CARD_FILES = ["README.md", ".huggingface.yaml"]  # where a dataset declares its subsets (`configs`)
# Without `configs` in the card, datasets reads every data file of the repository; these are the kinds it can train on.
DATA_FILE_PATTERNS = ["*.parquet", "*.arrow", "*.jsonl", "*.json", "*.csv", "*.tsv", "*.txt", "*.gz", "*.zst"]


@dataclass(frozen=True)
class HubOptions:
    """How to reach the hub: its cache (None: huggingface_hub's default, from HF_HUB_CACHE / HF_HOME), its address
    (None: HF_ENDPOINT or the public hub), and whether to stay offline."""

    cache_dir: Path | None = None
    endpoint: str | None = None
    offline: bool = False


def _error(kind: ErrorKind, reason: str, path: str, message: str, hint: str = "") -> FinetuneError:
    return FinetuneError(kind, reason, f"{path}: {message}", violations=[Violation(path, reason, message)], hint=hint)


def _hub_errors() -> tuple[type[Exception], ...]:
    """What a hub call raises: its HTTP errors (HfHubHTTPError is one), connection errors and timeouts, OSError."""
    return (*transport_errors(), OSError)


def _definitive(exc: Exception, repo_id: str, revision: str, field: str, where: str) -> FinetuneError | None:
    """The error for an answer of the hub (missing, gated, no such revision); None when it was not reached."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    if isinstance(exc, GatedRepoError) or status in (401, 403):
        return _error(
            ErrorKind.PERMISSION_DENIED,
            "DATASET_GATED",
            field,
            f"{repo_id!r} is a gated or private dataset and the server's hub token has no access to it",
            hint="Accept the dataset's terms on the hub and give the server a token (HF_TOKEN) that has access.",
        )
    if isinstance(exc, RevisionNotFoundError):
        path = field_of(field, "revision")
        return _error(ErrorKind.NOT_FOUND, "REVISION_NOT_FOUND", path, f"{repo_id!r} has no revision {revision!r}")
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return _error(
            ErrorKind.NOT_FOUND,
            "DATASET_NOT_FOUND",
            field,
            f"no dataset {repo_id!r} on the hub ({where})",
            hint="Check the spelling (`org/name`, case-sensitive); private datasets need HF_TOKEN.",
        )
    return None


def _probe(repo_id: str, revision: str, options: HubOptions, field: str) -> str | None:
    """The commit `revision` names, from one quick call; None when the hub cannot be reached."""
    from huggingface_hub import HfApi

    where = options.endpoint or default_endpoint()
    try:
        info = HfApi(endpoint=options.endpoint).dataset_info(repo_id, revision=revision or None, timeout=HUB_TIMEOUT_S)
    except _hub_errors() as exc:
        definitive = _definitive(exc, repo_id, revision, field, where)
        if definitive is not None:
            raise definitive from exc
        log.warning("hub unreachable, looking in the cache", dataset=repo_id, endpoint=where, error=str(exc))
        return None
    return str(info.sha) if info.sha else None


def _snapshot(repo_id: str, revision: str, options: HubOptions, patterns: list[str] | None, **kwargs: Any) -> Path:
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id,
            repo_type=REPO_TYPE,
            revision=revision or None,
            cache_dir=options.cache_dir,
            endpoint=options.endpoint,
            allow_patterns=patterns,
            etag_timeout=HUB_TIMEOUT_S,
            **kwargs,
        )
    )


def cached_snapshot(repo_id: str, revision: str, cache_dir: Path | None) -> Path | None:
    """The cached snapshot folder of `revision` (a commit, a branch or tag the cache knows; empty: main), or None."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return _snapshot(repo_id, revision, HubOptions(cache_dir=cache_dir), None, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _card_configs(snapshot: Path) -> list[dict[str, Any]] | None:
    """The `configs` the dataset card declares, or None."""
    card = snapshot / CARD_FILES[0]
    if not card.is_file():
        return None
    from huggingface_hub import DatasetCard

    try:
        configs = DatasetCard.load(card).data.to_dict().get("configs")
    except Exception:  # a card that does not parse: datasets reports it when it reads the snapshot
        return None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else None


def _paths(data_files: Any, split: str) -> list[str]:
    """The patterns of a card config's `data_files` (a pattern, a list, or a list of {split, path}) for `split`."""
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        data_files = [{"split": k, "path": v} for k, v in data_files.items()]
    patterns: list[str] = []
    for item in data_files if isinstance(data_files, list) else []:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, dict) and (not split or item.get("split") == split):
            path = item.get("path", [])
            patterns.extend([path] if isinstance(path, str) else [p for p in path if isinstance(p, str)])
    return patterns


def data_file_patterns(snapshot: Path, subset: str, split: str) -> list[str]:
    """What to download for a subset (and a split, when named): its card's data files, or every data file when the
    card declares no subsets. A subset the card does not name gets nothing: checking it then names those there are."""
    configs = _card_configs(snapshot)
    if not configs:
        return DATA_FILE_PATTERNS
    if subset:
        chosen = next((c for c in configs if c.get("config_name") == subset), None)
    else:
        chosen = next((c for c in configs if c.get("default")), configs[0] if len(configs) == 1 else None)
    if chosen is None:
        return []
    if "data_files" in chosen:
        return [p.removeprefix("./") for p in _paths(chosen["data_files"], split)]
    if chosen.get("data_dir"):
        return [f"{str(chosen['data_dir']).strip('/')}/*"]
    return DATA_FILE_PATTERNS


def _unreadable(repo_id: str, field: str, exc: Exception) -> FinetuneError:
    if isinstance(exc, FileNotFoundError):  # datasets' EmptyDatasetError and DataFilesNotFoundError among them
        return _error(ErrorKind.INVALID_ARGUMENT, "NO_DATA_FILES", field, f"{repo_id!r} has no data files: {exc}")
    message = f"{repo_id!r} cannot be read as a dataset: {type(exc).__name__}: {exc}"
    return _error(ErrorKind.INVALID_ARGUMENT, "UNREADABLE_DATASET", field, message)


def _pin(repo_id: str, snapshot: Path, subset: str, split: str, field: str) -> DatasetSource:
    """The source for a snapshot, its subset and split checked against those `datasets` finds in it.

    Whatever datasets raises while it reads the repository (its card's YAML, its files) is the repository's problem,
    reported on the dataset's field, never an internal error."""
    import datasets

    folder = str(snapshot)
    try:
        subsets = datasets.get_dataset_config_names(folder)
    except Exception as exc:
        raise _unreadable(repo_id, field, exc) from exc
    path = field_of(field, "subset")
    if subset and subset not in subsets:
        message = f"{repo_id!r} has no subset {subset!r}; it has: {', '.join(subsets)}"
        raise _error(ErrorKind.NOT_FOUND, "SUBSET_NOT_FOUND", path, message)
    try:
        builder = datasets.load_dataset_builder(folder, name=subset or None)
    except Exception as exc:
        if not subset and len(subsets) > 1:
            message = f"{repo_id!r} has several subsets and no default: name one of {', '.join(subsets)}"
            raise _error(ErrorKind.INVALID_ARGUMENT, "SUBSET_REQUIRED", path, message) from exc
        raise _unreadable(repo_id, field, exc) from exc
    chosen = choose_split([str(s) for s in builder.config.data_files or {}], split, field)
    return DatasetSource(HUB, repo_id, HUB, subset=subset, split=chosen, revision=snapshot.name, local_dir=folder)


def _check_name(repo_id: str, field: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        message = f"{repo_id!r} is neither under the dataset folders nor a hub dataset id (`org/name`): {exc}"
        raise _error(ErrorKind.INVALID_ARGUMENT, "INVALID_DATASET_NAME", field, message) from exc


def fetch_dataset(
    repo_id: str, *, subset: str, split: str, revision: str, options: HubOptions, field: str
) -> DatasetSource:
    """Find a hub dataset, fetch what its subset needs into the hub cache, and pin its commit (see the module
    docstring). Raises FinetuneError: NOT_FOUND, PERMISSION_DENIED (gated), UNAVAILABLE (unreachable, not cached)."""
    _check_name(repo_id, field)
    commit = None if options.offline else _probe(repo_id, revision, options, field)
    if commit is None:  # offline or unreachable: the cache has it or nothing does
        snapshot = cached_snapshot(repo_id, revision, options.cache_dir)
        if snapshot is None:
            raise _not_cached(repo_id, revision, options, field)
        return _pin(repo_id, snapshot, subset, split, field)
    where = options.endpoint or default_endpoint()
    try:
        card = _snapshot(repo_id, commit, options, CARD_FILES)
        snapshot = _snapshot(repo_id, commit, options, [*data_file_patterns(card, subset, split), *CARD_FILES])
    except _hub_errors() as exc:
        definitive = _definitive(exc, repo_id, revision, field, where)
        if definitive is not None:
            raise definitive from exc
        raise _error(
            ErrorKind.UNAVAILABLE, "HUB_DOWNLOAD_FAILED", field, f"could not download {repo_id!r} from {where}: {exc}"
        ) from exc
    log.info("hub dataset fetched", dataset=repo_id, commit=commit, path=str(snapshot))
    return _pin(repo_id, snapshot, subset, split, field)


def _not_cached(repo_id: str, revision: str, options: HubOptions, field: str) -> FinetuneError:
    at = f" at {revision!r}" if revision else ""
    if options.offline:
        return _error(
            ErrorKind.NOT_FOUND,
            "DATASET_NOT_CACHED_OFFLINE",
            field,
            f"{repo_id!r}{at} is not in the hub cache and the server is offline (HF_HUB_OFFLINE / --offline)",
            hint=f"Run `hf download {repo_id} --repo-type dataset` where the hub is reachable, with the same cache.",
        )
    where = options.endpoint or default_endpoint()
    return _error(
        ErrorKind.UNAVAILABLE,
        "HUB_UNREACHABLE",
        field,
        f"the hub at {where} could not be reached for {repo_id!r}{at}, and it is not in the hub cache",
        hint="Check the network or HF_ENDPOINT, or name a local file or an uploaded dataset.",
    )


def open_cached(
    repo_id: str, *, revision: str, subset: str, split: str, cache_dir: Path | None, field: str = "dataset"
) -> DatasetSource:
    """A hub dataset the server has fetched, from the hub cache only (a worker never downloads data)."""
    snapshot = cached_snapshot(repo_id, revision, cache_dir)
    if snapshot is None:
        at = f" at {revision!r}" if revision else ""
        raise _error(
            ErrorKind.FAILED_PRECONDITION,
            "DATASET_NOT_CACHED",
            field,
            f"{repo_id!r}{at} is not in the hub cache",
            hint="The server fetches hub datasets before a job starts; was the cache cleaned meanwhile?",
        )
    return _pin(repo_id, snapshot, subset, split, field)
