"""Find a base model and describe it from its config and tokenizer files, never its weights.

A name is a local folder when it looks like a path or exists under a model root (confined to the roots); otherwise it
is a hub id whose small files are fetched with huggingface_hub into its cache (`settings.hf_cache_dir`), from
HF_ENDPOINT or `settings.hf_endpoint`. Offline, only the cache is read. Before any download one HEAD request without
retries checks the hub, so an unreachable hub fails in seconds instead of huggingface_hub's ~25 s of backoff.

Runs on the ValidateConfig path: stdlib and huggingface_hub only (no torch, transformers or safetensors).
"""

from __future__ import annotations

import importlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from finetune_server.errors import ErrorKind, FinetuneError, Violation
from finetune_server.settings import ServerSettings
from finetune_server.util.paths import confine, looks_like_path

log = structlog.get_logger(__name__)

HUB_TIMEOUT_S = 5.0
CONFIG_FILE = "config.json"
# What validation and the dataset check need; weights are never fetched here.
HUB_FILES = (
    CONFIG_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "model.safetensors.index.json",
)
INDEX_FILE = "model.safetensors.index.json"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # a larger header means the file is not safetensors

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

_LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Linear projections LoRA can target, by config model_type (the "all-linear" set, lm_head excluded as peft does).
LINEAR_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "granite", "olmo", "olmo2"),
        _LLAMA_LINEAR,
    ),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
}
# Families whose config.json may omit tie_word_embeddings because their config class defaults it to True.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2"}


@dataclass
class ResolvedModel:
    name: str
    source: str  # "local" or "hub"
    path: Path  # folder holding config.json and the tokenizer files (a hub cache snapshot for hub models)
    config: dict[str, Any]

    @property
    def load_ref(self) -> str:
        """What a worker passes to from_pretrained: the folder of a local model, the hub id of a hub model (whose
        weights the worker fetches; `path` holds only its config and tokenizer files)."""
        return str(self.path) if self.source == "local" else self.name


@dataclass
class ModelSummary:
    """The contract's ModelSummary; field names are the proto's."""

    name: str = ""
    source: str = ""
    model_type: str = ""
    architectures: list[str] = field(default_factory=list)
    num_parameters: int = 0
    max_position_embeddings: int = 0
    vocab_size: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    linear_modules: list[str] = field(default_factory=list)
    has_chat_template: bool = False
    torch_dtype: str = ""


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int
    count: int  # instances in the whole model (one per decoder layer)


# --------------------------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------------------------


def resolve_model(name: str, settings: ServerSettings, field: str = "model_name") -> ResolvedModel:
    """Find `name` locally or on the hub and read its config. Raises FinetuneError (see module docstring)."""
    name = name.strip()
    if not name:
        raise _error(ErrorKind.INVALID_ARGUMENT, "REQUIRED", field, "a model name or folder is required")
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
        raise _error(
            ErrorKind.NOT_FOUND,
            "MODEL_NOT_FOUND",
            field,
            f"no model folder {name!r} under the server's model folders",
            hint="Check the path; relative names are looked up under each model root (see GetServerInfo).",
        )
    if not (folder / CONFIG_FILE).is_file():
        raise _error(
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
        raise _error(
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
            raise _error(
                ErrorKind.NOT_FOUND,
                "MODEL_NOT_CACHED_OFFLINE",
                field,
                f"{name!r} is not in the hub cache and the server is offline (HF_HUB_OFFLINE)",
                hint=(
                    f"Run `huggingface-cli download {name}` on a machine with hub access (with the same HF_HOME / "
                    "cache folder), or unset HF_HUB_OFFLINE, or name a local folder."
                ),
            )
        raise _error(ErrorKind.NOT_FOUND, "MODEL_NOT_FOUND", field, f"{name!r} has no config.json in the hub cache")
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
    unreachable: tuple[type[Exception], ...] = (*_transport_errors(), HfHubHTTPError, OSError)
    try:
        get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
        return True
    except GatedRepoError as exc:
        raise _error(
            ErrorKind.PERMISSION_DENIED,
            "MODEL_GATED",
            field,
            f"{name!r} is a gated repository: the server's hub token has no access to it",
            hint="Accept the model's terms on the hub and give the server a token (HF_TOKEN) that has access.",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise _error(
            ErrorKind.NOT_FOUND,
            "MODEL_NOT_FOUND",
            field,
            f"no model {name!r} on the hub ({endpoint or _default_endpoint()})",
            hint="Check the spelling (`org/name`, case-sensitive); private repositories need HF_TOKEN.",
        ) from exc
    except EntryNotFoundError as exc:
        raise _error(
            ErrorKind.INVALID_ARGUMENT,
            "NOT_A_MODEL_FOLDER",
            field,
            f"hub repository {name!r} has no config.json: not a transformers model",
        ) from exc
    except unreachable as exc:
        if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code == 404:
            raise _error(
                ErrorKind.NOT_FOUND,
                "MODEL_NOT_FOUND",
                field,
                f"no model {name!r} at {endpoint or _default_endpoint()} (HTTP 404)",
                hint="Check the spelling (`org/name`, case-sensitive) and HF_ENDPOINT.",
            ) from exc
        cached = try_to_load_from_cache(name, CONFIG_FILE, cache_dir=settings.hf_cache_dir)
        if isinstance(cached, str):
            log.warning("hub unreachable, using the cached copy", model=name, error=str(exc))
            return False
        where = endpoint or _default_endpoint()
        raise _error(
            ErrorKind.UNAVAILABLE,
            "HUB_UNREACHABLE",
            field,
            f"the model hub at {where} could not be reached for {name!r} and it is not cached: {exc}",
            hint="Check the network or HF_ENDPOINT; or download the model where the hub is reachable.",
        ) from exc


def _transport_errors() -> tuple[type[Exception], ...]:
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


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _read_config(path: Path, name: str, field: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _error(
            ErrorKind.INVALID_ARGUMENT, "NOT_A_MODEL_FOLDER", field, f"{name!r}: unreadable config.json: {exc}"
        ) from exc
    if not isinstance(config, dict):
        raise _error(ErrorKind.INVALID_ARGUMENT, "NOT_A_MODEL_FOLDER", field, f"{name!r}: config.json is not an object")
    return config


def _error(kind: ErrorKind, reason: str, field: str, message: str, hint: str = "") -> FinetuneError:
    return FinetuneError(kind, reason, f"{field}: {message}", violations=[Violation(field, reason, message)], hint=hint)


# --------------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------------


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: multimodal configs (gemma3, ...) nest it under `text_config`."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and "hidden_size" not in config:
        return nested
    return config


def _int(config: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def summarize_model(resolved: ResolvedModel) -> ModelSummary:
    config = resolved.config
    tc = text_config(config)
    return ModelSummary(
        name=resolved.name,
        source=resolved.source,
        model_type=str(config.get("model_type", "")),
        architectures=[str(a) for a in config.get("architectures") or []],
        num_parameters=count_parameters(resolved.path, config),
        max_position_embeddings=_int(tc, "max_position_embeddings", "n_positions"),
        vocab_size=_int(tc, "vocab_size"),
        hidden_size=_int(tc, "hidden_size", "n_embd"),
        num_layers=_int(tc, "num_hidden_layers", "n_layer"),
        linear_modules=list(linear_modules(config)),
        has_chat_template=has_chat_template(resolved.path),
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or tc.get("torch_dtype") or ""),
    )


def linear_modules(config: dict[str, Any]) -> list[str]:
    """LoRA-targetable linear projections; empty when the architecture is unknown (cannot check without loading)."""
    for model_type in (config.get("model_type"), text_config(config).get("model_type")):
        if isinstance(model_type, str) and model_type in LINEAR_MODULES:
            return list(LINEAR_MODULES[model_type])
    return []


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(tokenizer_config, dict) and bool(tokenizer_config.get("chat_template"))


def count_parameters(folder: Path, config: dict[str, Any]) -> int:
    """Exact from the safetensors headers when all weight files are here, else from the index, else from config."""
    exact = _count_from_safetensors(folder)
    if exact:
        return exact
    from_index = _count_from_index(folder, config)
    if from_index:
        return from_index
    return parameters_from_config(config)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: 8-byte little-endian length, then that much JSON. Tensors unread."""
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path.name}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_SAFETENSORS_HEADER:
            raise ValueError(f"{path.name}: header length {length} is implausible")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: header is not an object")
    return header


def _count_from_safetensors(folder: Path) -> int:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return 0
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        expected = set(index.get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
        expected = set()
    if expected - {f.name for f in files}:
        return 0  # some shards are missing (a partial download): the count would be wrong
    total = 0
    try:
        for path in files:
            for key, info in read_safetensors_header(path).items():
                if key != "__metadata__":
                    total += math.prod(int(d) for d in info["shape"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable safetensors header; counting from the config", folder=str(folder), error=str(exc))
        return 0
    return total


def _count_from_index(folder: Path, config: dict[str, Any]) -> int:
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        total_size = int(index["metadata"]["total_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    size = _DTYPE_BYTES.get(dtype)
    return total_size // size if size else 0


# --------------------------------------------------------------------------------------------------------------------
# Shapes, computed from the config
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """The sizes the shape and memory formulas need, with each family's key names normalised."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def dims(config: dict[str, Any]) -> Dims:
    tc = text_config(config)
    model_type = str(tc.get("model_type") or config.get("model_type") or "")
    hidden = _int(tc, "hidden_size", "n_embd", "d_model")
    heads = _int(tc, "num_attention_heads", "n_head") or 1
    kv_heads = _int(tc, "num_key_value_heads") or heads
    head_dim = _int(tc, "head_dim") or (hidden // heads if heads else 0)
    intermediate = _int(tc, "intermediate_size", "n_inner") or 4 * hidden
    tied_default = model_type in _TIED_BY_DEFAULT
    tied = config.get("tie_word_embeddings", tc.get("tie_word_embeddings", tied_default))
    return Dims(
        model_type=model_type,
        hidden=hidden,
        intermediate=intermediate,
        layers=_int(tc, "num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=_int(tc, "vocab_size"),
        tied=bool(tied),
    )


def linear_layer_shapes(config: dict[str, Any]) -> dict[str, LinearShape]:
    """Linear layers of the decoder blocks by module path suffix (`self_attn.q_proj`), empty for unknown families.

    Keys are suffixes of the real module names, so a LoRA target matches as in peft: `key == t or
    key.endswith("." + t)` (`c_proj` matches both `attn.c_proj` and `mlp.c_proj` in gpt2).
    """
    d = dims(config)
    if not d.hidden or not d.layers:
        return {}
    h, i, n = d.hidden, d.intermediate, d.layers
    names = linear_modules(config)
    if names == _LLAMA_LINEAR:
        return {
            "self_attn.q_proj": LinearShape(h, d.q_dim, n),
            "self_attn.k_proj": LinearShape(h, d.kv_dim, n),
            "self_attn.v_proj": LinearShape(h, d.kv_dim, n),
            "self_attn.o_proj": LinearShape(d.q_dim, h, n),
            "mlp.gate_proj": LinearShape(h, i, n),
            "mlp.up_proj": LinearShape(h, i, n),
            "mlp.down_proj": LinearShape(i, h, n),
        }
    if d.model_type == "phi3":
        return {
            "self_attn.qkv_proj": LinearShape(h, d.q_dim + 2 * d.kv_dim, n),
            "self_attn.o_proj": LinearShape(d.q_dim, h, n),
            "mlp.gate_up_proj": LinearShape(h, 2 * i, n),
            "mlp.down_proj": LinearShape(i, h, n),
        }
    if d.model_type == "phi":
        return {
            "self_attn.q_proj": LinearShape(h, d.q_dim, n),
            "self_attn.k_proj": LinearShape(h, d.kv_dim, n),
            "self_attn.v_proj": LinearShape(h, d.kv_dim, n),
            "self_attn.dense": LinearShape(d.q_dim, h, n),
            "mlp.fc1": LinearShape(h, i, n),
            "mlp.fc2": LinearShape(i, h, n),
        }
    if d.model_type == "gpt2":
        return {
            "attn.c_attn": LinearShape(h, 3 * h, n),
            "attn.c_proj": LinearShape(h, h, n),
            "mlp.c_fc": LinearShape(h, i, n),
            "mlp.c_proj": LinearShape(i, h, n),
        }
    if d.model_type == "gpt_neox":
        return {
            "attention.query_key_value": LinearShape(h, 3 * h, n),
            "attention.dense": LinearShape(h, h, n),
            "mlp.dense_h_to_4h": LinearShape(h, i, n),
            "mlp.dense_4h_to_h": LinearShape(i, h, n),
        }
    if d.model_type == "starcoder2":
        return {
            "self_attn.q_proj": LinearShape(h, d.q_dim, n),
            "self_attn.k_proj": LinearShape(h, d.kv_dim, n),
            "self_attn.v_proj": LinearShape(h, d.kv_dim, n),
            "self_attn.o_proj": LinearShape(d.q_dim, h, n),
            "mlp.c_fc": LinearShape(h, i, n),
            "mlp.c_proj": LinearShape(i, h, n),
        }
    return {}


def matches_target(module_key: str, target: str) -> bool:
    """peft's rule for a list of target names: the full name equals the target or ends with `.target`."""
    return module_key == target or module_key.endswith("." + target)


def targeted_shapes(shapes: dict[str, LinearShape], targets: list[str]) -> dict[str, LinearShape]:
    """The shapes LoRA adapts: every linear layer when `targets` is empty or `all-linear`."""
    if not targets or targets == ["all-linear"]:
        return dict(shapes)
    return {key: s for key, s in shapes.items() if any(matches_target(key, t) for t in targets)}


def _biases(d: Dims, config: dict[str, Any]) -> int:
    """Bias parameters of the decoder blocks' linear layers."""
    tc = text_config(config)
    n = d.layers
    if d.model_type == "qwen2":
        return n * (d.q_dim + 2 * d.kv_dim)
    if d.model_type in {"gpt2", "gpt_neox", "phi", "starcoder2"}:
        return sum(s.out_features * s.count for s in linear_layer_shapes(config).values())
    total = 0
    if tc.get("attention_bias"):
        total += n * (d.q_dim + 2 * d.kv_dim + d.hidden)
    if tc.get("mlp_bias"):
        total += n * (2 * d.intermediate + d.hidden)
    return total


def _norms(d: Dims) -> int:
    """Norm weights: two per block plus the final one (LayerNorm families also have biases)."""
    per_layer = 2 * d.hidden
    if d.model_type in {"qwen3", "gemma3", "gemma3_text"}:
        per_layer += 2 * d.head_dim  # q_norm and k_norm
    if d.model_type in {"gemma2", "gemma3", "gemma3_text"}:
        per_layer += 2 * d.hidden  # pre/post feed-forward norms
    total = d.layers * per_layer + d.hidden
    if d.model_type in {"gpt2", "gpt_neox", "phi", "starcoder2"}:
        total *= 2  # LayerNorm weight + bias
    return total


def parameters_from_config(config: dict[str, Any]) -> int:
    """Parameter count of a decoder-only model from its config; 0 when the family's layout is unknown."""
    d = dims(config)
    shapes = linear_layer_shapes(config)
    if not shapes or not d.vocab:
        return 0
    total = d.vocab * d.hidden  # token embeddings
    if d.model_type == "gpt2":
        total += _int(text_config(config), "n_positions", "max_position_embeddings") * d.hidden  # learned positions
    total += sum(s.in_features * s.out_features * s.count for s in shapes.values())
    total += _biases(d, config) + _norms(d)
    if not d.tied:
        total += d.vocab * d.hidden + (d.vocab if d.model_type in {"phi"} else 0)  # lm_head (phi's has a bias)
    return total
