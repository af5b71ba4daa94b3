"""Describe a base model from its config, tokenizer and safetensors headers, never its weights; no network.

What the formulas need to know about each architecture comes from `model_families`. Finding the model (a local
folder or the hub) is `model_source`'s job. Runs on the ValidateConfig path: stdlib only (no torch, transformers or
safetensors).
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from finetune_server.storage.layout import CHAT_TEMPLATE_FILE
from finetune_server.training.model_families import (
    ATTENTION_PREFIX,
    FAMILIES,
    MLP_PREFIX,
    QKV_MODULES,
    ModelFamily,
    Size,
)

log = structlog.get_logger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"


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


_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # a larger header means the file is not safetensors

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


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
    """The model's summary; remembered while its folder's files keep their sizes and modification times, since every
    validation asks again (reading safetensors headers and the tokenizer config each time is most of its model step).
    A fresh copy each call: callers may change theirs."""
    key = (resolved.name, resolved.source, str(resolved.path), folder_stamp(resolved.path))
    with _SUMMARIES_LOCK:
        cached = _SUMMARIES.get(key)
        if cached is not None:
            _SUMMARIES.move_to_end(key)
            return copy.deepcopy(cached)
    summary = _summarize(resolved)
    with _SUMMARIES_LOCK:
        _SUMMARIES[key] = summary
        while len(_SUMMARIES) > _SUMMARIES_MAX:
            _SUMMARIES.popitem(last=False)
    return copy.deepcopy(summary)


def folder_stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of each file directly in `folder`: what changes when a model is replaced in place."""
    try:
        with os.scandir(folder) as entries:
            stamps = [(e.name, s.st_size, s.st_mtime_ns) for e in entries if e.is_file() for s in (e.stat(),)]
    except OSError:
        return ()
    return tuple(sorted(stamps))


_SUMMARIES: OrderedDict[tuple[Any, ...], ModelSummary] = OrderedDict()
_SUMMARIES_LOCK = threading.Lock()
_SUMMARIES_MAX = 32


def _summarize(resolved: ResolvedModel) -> ModelSummary:
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


def family_of(config: dict[str, Any]) -> ModelFamily | None:
    """The config's family: by its own model_type, else its language model's (multimodal configs nest it)."""
    for model_type in (config.get("model_type"), text_config(config).get("model_type")):
        if isinstance(model_type, str) and model_type in FAMILIES:
            return FAMILIES[model_type]
    return None


def linear_modules(config: dict[str, Any]) -> list[str]:
    """LoRA-targetable linear projections; empty when the architecture is unknown (cannot check without loading)."""
    family = family_of(config)
    return family.linear_modules if family else []


def has_chat_template(folder: Path) -> bool:
    if (folder / CHAT_TEMPLATE_FILE).is_file():
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

    def features(self, size: Size) -> int:
        return (
            size.hidden * self.hidden
            + size.intermediate * self.intermediate
            + size.q * self.q_dim
            + size.kv * self.kv_dim
        )


def dims(config: dict[str, Any]) -> Dims:
    tc = text_config(config)
    family = family_of(config)
    hidden = _int(tc, "hidden_size", "n_embd", "d_model")
    heads = _int(tc, "num_attention_heads", "n_head") or 1
    kv_heads = _int(tc, "num_key_value_heads") or heads
    head_dim = _int(tc, "head_dim") or (hidden // heads if heads else 0)
    intermediate = _int(tc, "intermediate_size", "n_inner") or 4 * hidden
    tied_default = family.tied_by_default if family else False
    tied = config.get("tie_word_embeddings", tc.get("tie_word_embeddings", tied_default))
    return Dims(
        hidden=hidden,
        intermediate=intermediate,
        layers=_int(tc, "num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=_int(tc, "vocab_size"),
        tied=bool(tied),
    )


def linear_layer_shapes(config: dict[str, Any], family: ModelFamily | None = None) -> dict[str, LinearShape]:
    """Linear layers of the decoder blocks by module path suffix (`self_attn.q_proj`), empty for unknown families.

    `family` is the layout to assume (default: the config's own). Keys are suffixes of the real module names, so a
    LoRA target matches as in peft: `key == t or key.endswith("." + t)` (`c_proj` matches both `attn.c_proj` and
    `mlp.c_proj` in gpt2).
    """
    family = family or family_of(config)
    d = dims(config)
    if family is None or not d.hidden or not d.layers:
        return {}
    return {path: LinearShape(d.features(i), d.features(o), d.layers) for path, i, o in family.layers}


def matches_target(module_key: str, target: str) -> bool:
    """peft's rule for a list of target names: the full name equals the target or ends with `.target`."""
    return module_key == target or module_key.endswith("." + target)


def targeted_shapes(shapes: dict[str, LinearShape], targets: list[str]) -> dict[str, LinearShape]:
    """The shapes LoRA adapts: every linear layer when `targets` is empty or `all-linear`."""
    if not targets or targets == ["all-linear"]:
        return dict(shapes)
    return {key: s for key, s in shapes.items() if any(matches_target(key, t) for t in targets)}


def _biases(family: ModelFamily, shapes: dict[str, LinearShape], config: dict[str, Any]) -> int:
    """Bias parameters of the decoder blocks' linear layers (one per output feature of each biased layer)."""
    if family.linear_bias == "all":
        biased = list(shapes)
    elif family.linear_bias == "qkv":
        biased = [key for key in shapes if key.rsplit(".", 1)[-1] in QKV_MODULES]
    else:
        tc = text_config(config)
        prefixes = tuple(
            p for flag, p in (("attention_bias", ATTENTION_PREFIX), ("mlp_bias", MLP_PREFIX)) if tc.get(flag)
        )
        biased = [key for key in shapes if key.startswith(prefixes)]
    return sum(shapes[key].out_features * shapes[key].count for key in biased)


def _norms(family: ModelFamily, d: Dims) -> int:
    """Norm weights: two per block plus the final one (LayerNorm families also have biases)."""
    per_layer = 2 * d.hidden
    if family.qk_norm:
        per_layer += 2 * d.head_dim
    if family.feed_forward_norms:
        per_layer += 2 * d.hidden
    total = d.layers * per_layer + d.hidden
    return 2 * total if family.layer_norm else total


def parameters_from_config(config: dict[str, Any]) -> int:
    """Parameter count of a decoder-only model from its config; 0 when the family's layout is unknown."""
    family = family_of(config)
    d = dims(config)
    shapes = linear_layer_shapes(config, family)
    if family is None or not shapes or not d.vocab:
        return 0
    total = d.vocab * d.hidden  # token embeddings
    if family.learned_positions:
        total += _int(text_config(config), "n_positions", "max_position_embeddings") * d.hidden
    total += sum(s.in_features * s.out_features * s.count for s in shapes.values())
    total += _biases(family, shapes, config) + _norms(family, d)
    if not d.tied:
        total += d.vocab * d.hidden + (d.vocab if family.lm_head_bias else 0)  # lm_head
    return total
