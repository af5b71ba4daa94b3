"""What the service knows about each model family, keyed by config.json's `model_type`: adding a family is one entry.

A family's decoder layer is described by its linear layers (module path suffix, in and out features as sums of the
model's sizes); from that follow the LoRA-targetable module names (peft's "all-linear" set, lm_head excluded), the
shapes the memory estimate and parameter count use, and the names vLLM's LoRA layers replace. The flags say what the
parameter count needs beyond the linear layers. Pure data, stdlib only: it is read on the ValidateConfig path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Size:
    """A feature count as a sum of the model's sizes: q = heads x head_dim, kv = kv_heads x head_dim."""

    hidden: int = 0
    intermediate: int = 0
    q: int = 0
    kv: int = 0


H, FF, Q, KV = Size(hidden=1), Size(intermediate=1), Size(q=1), Size(kv=1)  # FF: the feed-forward's intermediate

# Where the bias parameters of the decoder's linear layers are:
# "config": only where config.json's `attention_bias` / `mlp_bias` say (llama's convention);
# "qkv": always on the q, k and v projections (qwen2); "all": on every linear layer (LayerNorm-era families).
LinearBias = Literal["config", "qkv", "all"]
ATTENTION_PREFIX, MLP_PREFIX = "self_attn.", "mlp."  # "config" biases: which layers `attention_bias`/`mlp_bias` cover
QKV_MODULES = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class ModelFamily:
    layers: tuple[tuple[str, Size, Size], ...]  # (module path suffix in a decoder layer, in_features, out_features)
    linear_bias: LinearBias = "config"
    layer_norm: bool = False  # LayerNorm (weight and bias) rather than RMSNorm (weight only)
    qk_norm: bool = False  # q_norm and k_norm of head_dim in each layer
    feed_forward_norms: bool = False  # pre/post feed-forward norms besides the two usual ones
    tied_by_default: bool = False  # config.json may omit tie_word_embeddings because the config class defaults it on
    learned_positions: bool = False  # a position embedding table of max_position_embeddings x hidden
    lm_head_bias: bool = False
    vllm_lora: bool = True  # vLLM's LoRA layers replace this family's linear modules

    @property
    def linear_modules(self) -> list[str]:
        """The short names LoRA can target, in layer order (`c_proj` once though gpt2 has two)."""
        return list(dict.fromkeys(path.rsplit(".", 1)[-1] for path, _, _ in self.layers))


LLAMA = ModelFamily(
    layers=(
        ("self_attn.q_proj", H, Q),
        ("self_attn.k_proj", H, KV),
        ("self_attn.v_proj", H, KV),
        ("self_attn.o_proj", Q, H),
        ("mlp.gate_proj", H, FF),
        ("mlp.up_proj", H, FF),
        ("mlp.down_proj", FF, H),
    )
)
GEMMA2 = ModelFamily(LLAMA.layers, feed_forward_norms=True, tied_by_default=True)
GEMMA3 = ModelFamily(LLAMA.layers, qk_norm=True, feed_forward_norms=True, tied_by_default=True)

FAMILIES: dict[str, ModelFamily] = {
    **dict.fromkeys(("llama", "mistral", "granite", "olmo", "olmo2"), LLAMA),
    "qwen2": ModelFamily(LLAMA.layers, linear_bias="qkv"),
    "qwen3": ModelFamily(LLAMA.layers, qk_norm=True),
    "gemma": ModelFamily(LLAMA.layers, tied_by_default=True),
    "gemma2": GEMMA2,
    "gemma3": GEMMA3,
    "gemma3_text": GEMMA3,
    "phi3": ModelFamily(
        (
            ("self_attn.qkv_proj", H, Size(q=1, kv=2)),
            ("self_attn.o_proj", Q, H),
            ("mlp.gate_up_proj", H, Size(intermediate=2)),
            ("mlp.down_proj", FF, H),
        )
    ),
    "phi": ModelFamily(
        (
            ("self_attn.q_proj", H, Q),
            ("self_attn.k_proj", H, KV),
            ("self_attn.v_proj", H, KV),
            ("self_attn.dense", Q, H),
            ("mlp.fc1", H, FF),
            ("mlp.fc2", FF, H),
        ),
        linear_bias="all",
        layer_norm=True,
        lm_head_bias=True,
    ),
    "gpt2": ModelFamily(
        (
            ("attn.c_attn", H, Size(hidden=3)),
            ("attn.c_proj", H, H),
            ("mlp.c_fc", H, FF),
            ("mlp.c_proj", FF, H),
        ),
        linear_bias="all",
        layer_norm=True,
        tied_by_default=True,
        learned_positions=True,
    ),
    "gpt_neox": ModelFamily(
        (
            ("attention.query_key_value", H, Size(hidden=3)),
            ("attention.dense", H, H),
            ("mlp.dense_h_to_4h", H, FF),
            ("mlp.dense_4h_to_h", FF, H),
        ),
        linear_bias="all",
        layer_norm=True,
    ),
    "starcoder2": ModelFamily(
        (
            ("self_attn.q_proj", H, Q),
            ("self_attn.k_proj", H, KV),
            ("self_attn.v_proj", H, KV),
            ("self_attn.o_proj", Q, H),
            ("mlp.c_fc", H, FF),
            ("mlp.c_proj", FF, H),
        ),
        linear_bias="all",
        layer_norm=True,
    ),
}

# The memory estimate's guess for a family not in the table: the llama layout, the most common one.
DEFAULT_FAMILY = LLAMA

# Module names vLLM's LoRA layers replace in architectures the table does not describe (InternLM2: wqkv, wo, w1-w3;
# Baichuan: W_pack). Falcon's names are gpt_neox's.
_VLLM_ONLY_MODULES = ("wqkv", "wo", "w1", "w2", "w3", "W_pack")
VLLM_LORA_MODULES = frozenset(
    [name for family in FAMILIES.values() if family.vllm_lora for name in family.linear_modules] + [*_VLLM_ONLY_MODULES]
)

# modules_to_save names whose full copy is a vocab x hidden matrix (the memory estimate counts it as trainable).
VOCAB_MODULES = frozenset({"lm_head", "embed_tokens", "wte"})
