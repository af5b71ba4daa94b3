"""Find a base model: a local folder under the model roots, or a hub id whose small files are fetched into the cache.

A name is a local folder when it looks like a path or exists under a model root (confined to the roots); otherwise it
is a hub id whose small files are fetched with huggingface_hub into its cache (`settings.hf_cache_dir`), from
HF_ENDPOINT or `settings.hf_endpoint`. Offline, only the cache is read. Before any download one HEAD request without
retries checks the hub, so an unreachable hub fails in seconds instead of huggingface_hub's ~25 s of backoff.

`resolve_model` runs on the ValidateConfig path: stdlib and huggingface_hub only (no torch, transformers or
safetensors), and never fetches weights. `resolve_model_dir` is the workers' lookup, which downloads the weights too.
Describing a found model from its files is `model_info`'s job.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import structlog

from finetune_server.errors import ErrorKind, FinetuneError, Violation, field_error
from finetune_server.settings import ServerSettings
from finetune_server.storage.layout import CHAT_TEMPLATE_FILE
from finetune_server.training.model_info import CONFIG_FILE, INDEX_FILE, ResolvedModel
from finetune_server.util.paths import check_name, confine, looks_like_path

log = structlog.get_logger(__name__)

HUB_TIMEOUT_S = 5.0
# What validation and the dataset check need; weights are never fetched here.
HUB_FILES = (
    CONFIG_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    CHAT_TEMPLATE_FILE,
    "generation_config.json",
    INDEX_FILE,
)
# What a model folder needs for training; everything else in a hub repo (other formats, images, ONNX) is skipped.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def resolve_model(name: str, settings: ServerSettings, field: str = "model_name") -> ResolvedModel:
    """Find `name` locally or on the hub and read its config. Raises FinetuneError (see module docstring)."""
    name = name.strip()
    if not name:
        raise field_error(ErrorKind.INVALID_ARGUMENT, "REQUIRED", field, "a model name or folder is required")
    check_name(name, field)
    local = _local_candidate(name, settings, field)
    if local is not None:
        return _resolve_local(name, local, field)
    return _resolve_hub(name, settings, field)


def _local_candidate(name: str, settings: ServerSettings, field: str) -> Path | None:
    if looks_like_path(name):
        return confine(name, settings.model_roots, field)  # PERMISSION_DENIED outside the roots
    if not settings.model_roots:
        return None
    try:
        candidate = confine(name, settings.model_roots, field)
    except FinetuneError:
        return None  # e.g. `org/..`-like names: not a local folder, so try the hub
    return candidate if candidate.exists() else None


def _resolve_local(name: str, folder: Path, field: str) -> ResolvedModel:
    if not folder.exists():
        raise field_error(
            ErrorKind.NOT_FOUND,
            "MODEL_NOT_FOUND",
            field,
            f"no model folder {name!r} under the server's model folders",
            hint="Check the path; relative names are looked up under each model root (see GetServerInfo).",
        )
    if not (folder / CONFIG_FILE).is_file():
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            "NOT_A_MODEL_FOLDER",
            field,
            f"{name!r} has no config.json: not a Hugging Face model folder",
            hint="Point at the folder that holds config.json, the tokenizer files and the *.safetensors weights.",
        )
    return ResolvedModel(name=name, source="local", path=folder, config=_read_config(folder / CONFIG_FILE, name, field))


def _resolve_hub(name: str, settings: ServerSettings, field: str) -> ResolvedModel:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_MODEL_NAME",
            field,
            f"{name!r} is neither a hub id (`org/name`) nor a folder under the model roots: {exc}",
        ) from exc

    endpoint = settings.hf_endpoint or None
    offline = settings.offline
    if not offline:
        offline = not _hub_reachable(name, endpoint, settings, field)  # False: use the cached copy
    config_path = _download(name, CONFIG_FILE, settings, endpoint, local_only=offline)
    if config_path is None:
        if settings.offline:
            raise field_error(
                ErrorKind.NOT_FOUND,
                "MODEL_NOT_CACHED_OFFLINE",
                field,
                f"{name!r} is not in the hub cache and the server is offline (HF_HUB_OFFLINE)",
                hint=(
                    f"Run `huggingface-cli download {name}` on a machine with hub access (with the same HF_HOME / "
                    "cache folder), or unset HF_HUB_OFFLINE, or name a local folder."
                ),
            )
        raise field_error(
            ErrorKind.NOT_FOUND, "MODEL_NOT_FOUND", field, f"{name!r} has no config.json in the hub cache"
        )
    for filename in HUB_FILES[1:]:
        _download(name, filename, settings, endpoint, local_only=offline)  # optional: absent files are skipped
    path = Path(config_path).parent
    log.info("model resolved from hub", model=name, path=str(path), offline=offline)
    return ResolvedModel(name=name, source="hub", path=path, config=_read_config(Path(config_path), name, field))


def _hub_reachable(name: str, endpoint: str | None, settings: ServerSettings, field: str) -> bool:
    """One HEAD of config.json, no retries. True: reachable; False: unreachable but cached. Raises otherwise."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    url = hf_hub_url(name, CONFIG_FILE, endpoint=endpoint)
    unreachable: tuple[type[Exception], ...] = (*transport_errors(), HfHubHTTPError, OSError)
    try:
        get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
        return True
    except GatedRepoError as exc:
        raise field_error(
            ErrorKind.PERMISSION_DENIED,
            "MODEL_GATED",
            field,
            f"{name!r} is a gated repository: the server's hub token has no access to it",
            hint="Accept the model's terms on the hub and give the server a token (HF_TOKEN) that has access.",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise field_error(
            ErrorKind.NOT_FOUND,
            "MODEL_NOT_FOUND",
            field,
            f"no model {name!r} on the hub ({endpoint or default_endpoint()})",
            hint="Check the spelling (`org/name`, case-sensitive); private repositories need HF_TOKEN.",
        ) from exc
    except EntryNotFoundError as exc:
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            "NOT_A_MODEL_FOLDER",
            field,
            f"hub repository {name!r} has no config.json: not a transformers model",
        ) from exc
    except unreachable as exc:
        if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code == 404:
            raise field_error(
                ErrorKind.NOT_FOUND,
                "MODEL_NOT_FOUND",
                field,
                f"no model {name!r} at {endpoint or default_endpoint()} (HTTP 404)",
                hint="Check the spelling (`org/name`, case-sensitive) and HF_ENDPOINT.",
            ) from exc
        cached = try_to_load_from_cache(name, CONFIG_FILE, cache_dir=settings.hf_cache_dir)
        if isinstance(cached, str):
            log.warning("hub unreachable, using the cached copy", model=name, error=str(exc))
            return False
        where = endpoint or default_endpoint()
        raise field_error(
            ErrorKind.UNAVAILABLE,
            "HUB_UNREACHABLE",
            field,
            f"the model hub at {where} could not be reached for {name!r} and it is not cached: {exc}",
            hint="Check the network or HF_ENDPOINT; or download the model where the hub is reachable.",
        ) from exc


def transport_errors() -> tuple[type[Exception], ...]:
    """Connection and timeout errors of huggingface_hub's HTTP client (httpx2 in 2.x, httpx before)."""
    for module in ("httpx2", "httpx"):
        try:
            return (importlib.import_module(module).HTTPError,)
        except (ImportError, AttributeError):
            continue
    return ()


def _download(
    name: str, filename: str, settings: ServerSettings, endpoint: str | None, *, local_only: bool
) -> str | None:
    """Path of `filename` in the cache (fetched when online), or None when the repo or cache has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(
            name,
            filename,
            cache_dir=settings.hf_cache_dir,
            endpoint=endpoint,
            local_files_only=local_only,
            etag_timeout=HUB_TIMEOUT_S,
        )
    except EntryNotFoundError:  # also LocalEntryNotFoundError: not cached
        return None
    return str(path)


def default_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _read_config(path: Path, name: str, field: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise field_error(
            ErrorKind.INVALID_ARGUMENT, "NOT_A_MODEL_FOLDER", field, f"{name!r}: unreadable config.json: {exc}"
        ) from exc
    if not isinstance(config, dict):
        raise field_error(
            ErrorKind.INVALID_ARGUMENT, "NOT_A_MODEL_FOLDER", field, f"{name!r}: config.json is not an object"
        )
    return config


# --- the workers' lookup, weights included ---------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model_dir(model_ref: str | Path, *, cache_dir: Path | None = None, offline: bool | None = None) -> Path:
    """A local folder with config.json, or a hub snapshot downloaded into (or found in) the hub cache.

    HF_HUB_OFFLINE, HF_ENDPOINT and HF_HUB_CACHE are read now, not at import time, so a worker's environment counts.
    """
    local = Path(model_ref).expanduser()
    if local.is_dir():
        if not (local / CONFIG_FILE).is_file():
            raise FinetuneError(
                ErrorKind.FAILED_PRECONDITION,
                "MODEL_INVALID",
                f"{local} has no config.json",
                violations=[Violation("model_name", "MODEL_INVALID", "the folder has no config.json")],
            )
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = _env_flag("HF_HUB_OFFLINE") if offline is None else offline
    cache = cache_dir or (Path(os.environ["HF_HUB_CACHE"]) if os.environ.get("HF_HUB_CACHE") else None)
    try:
        path = snapshot_download(
            str(model_ref),
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=_HUB_PATTERNS,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except RepositoryNotFoundError as exc:
        raise FinetuneError(
            ErrorKind.NOT_FOUND,
            "MODEL_NOT_FOUND",
            f"model {model_ref!r} was not found on the hub",
            violations=[Violation("model_name", "MODEL_NOT_FOUND", "no such model")],
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise FinetuneError(
            ErrorKind.FAILED_PRECONDITION if offline else ErrorKind.UNAVAILABLE,
            "MODEL_NOT_CACHED" if offline else "HUB_UNREACHABLE",
            f"model {model_ref!r} is not in the local cache and the hub "
            + ("is disabled (offline mode)" if offline else "cannot be reached"),
            hint="Download it once with network access, or name a local model folder.",
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise FinetuneError(
            ErrorKind.UNAVAILABLE, "MODEL_DOWNLOAD_FAILED", f"cannot download {model_ref!r}: {exc}"
        ) from exc
    return Path(path)
