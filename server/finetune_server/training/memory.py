"""Estimated peak memory of a LoRA run, by component, from the model's config alone (no torch).

Notation: P base parameters, P_lin those in the decoder blocks' linear layers (the ones bitsandbytes quantises),
T = batch x sequence tokens, h hidden, i intermediate, q = heads x head_dim, kv = kv_heads x head_dim, L layers,
V vocab, a the activation dtype size (4 on the CPU, 2 with bf16/fp16 on a GPU, else 4; 4 for a quantised base: its
fp32 embeddings make the residual stream fp32, and bitsandbytes' layers return their input's dtype), r the LoRA rank.

- weights: 16-bit or fp32 as above: P x a. int8 (LLM.int8): P_lin x 1 + one fp32 scale per output row, the rest
  (embeddings, norms, lm_head) fp32: peft's prepare_model_for_kbit_training, which every quantised run calls, upcasts
  every non-quantised parameter to fp32 (~2 GB more than 16-bit for an 8B model's embeddings and lm_head). NF4 with
  double quantisation: P_lin x (0.5 + 1/64 + 4/(64*256)), the rest fp32 likewise.
- adapter: r x (in + out) per targeted linear per layer (+ out per layer for DoRA's magnitude; + full copies of
  `modules_to_save`), fp32: 4 bytes each. gradients: the same count x 4. optimizer: AdamW keeps 2 fp32 states (8
  bytes per trainable parameter); paged 8-bit AdamW 2 bytes (on a GPU: elsewhere the engine falls back to AdamW).
- activations, values per token kept for backward in one decoder layer: A = 4h + 3q + 3kv + 4i (norm inputs/outputs,
  q/k/v before and after RoPE, attention output, gate/up/act/product of the MLP), plus per targeted linear r (LoRA A
  output) and, with dropout > 0, its dropped input (in_features values + a 1-byte mask). SDPA attention keeps no
  T x T matrix (checked: the measured peak depends on T only, not on seq^2). Without gradient checkpointing:
  T x (L x A + 3h) x a, plus one layer of gradients in flight during backward (T x A x a). With it: T x L x h x a
  (each layer's input) + 1.5 layers' worth (one recomputed, and the gradients in flight while its saved tensors
  are used and freed: measured on the CPU with the heap bounded, where 2 over-counted the 4 M model by 25%), and for
  int8 the inputs of every quantised linear (bitsandbytes' 8-bit matmul stores its input on the autograd context,
  where checkpointing's saved-tensor hooks do not reach: measured 0.74 GiB over 24 layers of Qwen2.5-0.5B at 1024
  tokens, as predicted; its 4-bit matmul keeps only the weight). The logits add T x V x 4 bytes x 4
  (fp32 logits, log-softmax kept by the loss, and both gradients during backward); on small models they dominate.
- attention mask, the T^2 term: a batch with padding or packed rows gets a dense boolean mask, rows x seq^2 bytes,
  and SDPA converts it to a float bias (rows x seq^2 x s, s = 2 under 16-bit autocast on a GPU, else 4) in every
  layer, which autograd keeps for the backward pass: L copies, 2 with checkpointing. Measured on this CPU (tiny
  model, 4 x 2048 tokens, 2 layers): a padded batch kept 131 MiB more than an unpadded one, where this predicts 144.
  An unpadded, unpacked batch needs no mask (an upper bound, then). Packing keeps rows at max_length (batching.py),
  so seq is max_length there too.
- overhead: on a GPU 0.5 GiB CUDA context + 10% of the rest for allocator fragmentation; on the CPU the resident set
  of importing torch + transformers + peft, ~0.4 GiB (measured 405 MB here), + a job's own fixed part, 72 MiB
  (a job of 1 x 32 tokens on a 0.1 M-parameter model grew the worker's resident set by 74.5 MiB: the model family's
  modules, the tokenizer, the data pipeline's buffers), + 30% of the rest for glibc's arenas, which keep freed
  blocks (measured: the same step peaks 22% lower with MALLOC_ARENA_MAX=1). A checkpointed job's
  worker fixes glibc's mmap threshold (host/allocator.py), so freed blocks go back at once and that allowance is
  not added: without the fix the heap kept every layer's freed activations through the forward pass, and the CPU
  peak of the rtx_3060 preset on Qwen2.5-0.5B's shapes was 1.56x this estimate.

Checked on this CPU: the memory benchmark (bench/memory.py, run_training in a fresh process per config) measured
0.83-1.15x this estimate on seven configurations, checkpointed, 8-bit and Qwen2.5's published shapes among them;
tests/unit/test_memory.py repeats a bare tiny-model step, where the estimate errs high (0.6-0.75x).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from finetune_server.host.allocator import bounds_heap
from finetune_server.training.config import TrainingConfig
from finetune_server.training.model_families import DEFAULT_FAMILY, QKV_MODULES, VOCAB_MODULES
from finetune_server.training.model_info import (
    Dims,
    LinearShape,
    ModelSummary,
    dims,
    linear_layer_shapes,
    parameters_from_config,
    targeted_shapes,
)

GIB = 1 << 30
CUDA_CONTEXT_BYTES = GIB // 2
CPU_RUNTIME_BYTES = int(0.4 * GIB)
CPU_JOB_BYTES = 72 << 20  # a job's own fixed part on the CPU (see the module docstring)
FRAGMENTATION = 0.10
CPU_ALLOCATOR = 0.30  # glibc's per-thread arenas keep freed blocks: measured +22% (default arenas) vs 1 arena
FIT_MARGIN = 0.10
LOGITS_COPIES = 4
CHECKPOINTED_LAYERS_IN_FLIGHT = 1.5  # the layer being recomputed for backward, and its gradients
SHARED_INPUT_GROUPS = (QKV_MODULES, ("gate_proj", "up_proj"))
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 scale per 256 blocks
METHOD = (
    "Computed from the model config: weights at their load dtype or quantisation, fp32 LoRA parameters, gradients and "
    "optimizer states, activations per token and layer for batch x sequence (checkpointed or not) plus the logits, "
    "and runtime overhead; no weights are loaded, so expect about ±30%."
)


@dataclass
class DeviceFit:
    """The contract's DeviceFit."""

    device: str = ""
    capacity_bytes: int = 0
    fits: bool = False
    utilization: float = 0.0
    suggestions: list[str] = field(default_factory=list)


@dataclass
class MemoryEstimate:
    """The contract's MemoryEstimate."""

    weights_bytes: int = 0
    adapter_bytes: int = 0
    gradients_bytes: int = 0
    optimizer_bytes: int = 0
    activations_bytes: int = 0
    overhead_bytes: int = 0
    total_bytes: int = 0
    trainable_parameters: int = 0
    base_parameters: int = 0
    sequence_length: int = 0
    method: str = ""
    fits: list[DeviceFit] = field(default_factory=list)


@dataclass(frozen=True)
class _Run:
    """The settings the estimate depends on; suggestions are variations of it."""

    on_gpu: bool
    half: bool  # bf16 or fp16 asked (only honoured on a GPU)
    quant: str  # "", "int8" or "nf4"
    checkpointing: bool
    batch: int
    seq: int
    r: int
    targets: tuple[str, ...]
    dropout: bool
    use_dora: bool
    modules_to_save: tuple[str, ...]
    paged_8bit_optim: bool

    @property
    def act_bytes(self) -> int:
        return 4 if self.quant else self.attention_bytes

    @property
    def attention_bytes(self) -> int:
        """What SDPA computes in (autocast casts its inputs to 16-bit even where the residual stream is fp32)."""
        return 2 if self.on_gpu and self.half else 4


def is_gpu_device(name: str) -> bool:
    """`cpu` is the host; `cuda:0` and named cards (`rtx_3060`, `a100_80gb`) are GPUs."""
    return name.strip().lower() != "cpu"


def estimate_memory(
    config: TrainingConfig,
    model: ModelSummary,
    model_config: dict[str, Any],
    *,
    sequence_length: int,
    devices: list[tuple[str, int]],
) -> MemoryEstimate:
    """Estimate for a resolved config. Components are for the first device's kind (GPU or CPU; CPU when none is
    given); each DeviceFit judges its device with the total for that device's kind."""
    primary_gpu = bool(devices) and is_gpu_device(devices[0][0])
    run = _run_from_config(config, sequence_length, on_gpu=primary_gpu)
    estimate = _estimate(run, model, model_config)
    estimate.fits = [
        _fit(name, capacity, dataclasses.replace(run, on_gpu=is_gpu_device(name)), model, model_config)
        for name, capacity in devices
    ]
    return estimate


def _run_from_config(config: TrainingConfig, sequence_length: int, *, on_gpu: bool) -> _Run:
    quant = "nf4" if config.load_in_4bit else "int8" if config.load_in_8bit else ""
    return _Run(
        on_gpu=on_gpu,
        half=bool(config.bf16 or config.fp16),
        quant=quant,
        checkpointing=bool(config.gradient_checkpointing),
        batch=max(1, int(config.per_device_train_batch_size or 1)),
        seq=max(1, sequence_length),
        r=max(1, int(config.lora.r or 16)),
        targets=tuple(config.lora.target_modules),
        dropout=bool(config.lora.dropout),
        use_dora=bool(config.lora.use_dora),
        modules_to_save=tuple(config.lora.modules_to_save),
        paged_8bit_optim=config.optim == "paged_adamw_8bit",
    )


def _shapes(model_config: dict[str, Any], d: Dims) -> dict[str, LinearShape]:
    """The architecture's linear layers; unknown families get the default family's layout (the common one)."""
    shapes = linear_layer_shapes(model_config)
    if shapes or not d.hidden or not d.layers:
        return shapes
    return linear_layer_shapes(model_config, DEFAULT_FAMILY)


def _estimate(run: _Run, model: ModelSummary, model_config: dict[str, Any]) -> MemoryEstimate:
    d = dims(model_config)
    shapes = _shapes(model_config, d)
    targeted = targeted_shapes(shapes, list(run.targets))
    base = model.num_parameters or parameters_from_config(model_config)
    vocab, hidden = d.vocab or model.vocab_size, d.hidden or model.hidden_size

    # Trainable parameters.
    trainable = sum(run.r * (s.in_features + s.out_features) * s.count for s in targeted.values())
    if run.use_dora:
        trainable += sum(s.out_features * s.count for s in targeted.values())
    for name in run.modules_to_save:
        if name in VOCAB_MODULES:
            trainable += vocab * hidden

    # Weights.
    a = run.act_bytes
    linear_params = min(base, sum(s.in_features * s.out_features * s.count for s in shapes.values()))
    if run.quant:
        rest_bytes = 4  # prepare_model_for_kbit_training upcasts every non-quantised parameter to fp32
        per_param = 1.0 if run.quant == "int8" else NF4_BYTES_PER_PARAM
        scales = sum(s.out_features * s.count for s in shapes.values()) * 4 if run.quant == "int8" else 0
        weights = int(linear_params * per_param) + scales + (base - linear_params) * rest_bytes
    else:
        weights = base * a

    adapter = trainable * 4
    gradients = trainable * 4
    optimizer = trainable * (2 if run.paged_8bit_optim and run.on_gpu else 8)  # elsewhere the engine uses AdamW

    # Activations (see the module docstring).
    tokens = run.batch * run.seq
    per_layer = 4 * hidden + 3 * d.q_dim + 3 * d.kv_dim + 4 * d.intermediate
    lora_values = sum(run.r for _ in targeted)
    lora_bytes = lora_values * a + (sum(s.in_features for s in targeted.values()) * (a + 1) if run.dropout else 0)
    layer_bytes = per_layer * a + lora_bytes
    if run.checkpointing:
        kept = d.layers * hidden * a + int(CHECKPOINTED_LAYERS_IN_FLIGHT * layer_bytes)
        if run.quant == "int8":  # bitsandbytes' 8-bit matmul keeps its input past checkpointing's hooks
            kept += distinct_input_features(shapes) * a
    else:
        kept = (d.layers + 1) * layer_bytes
    activations = tokens * (kept + 3 * hidden * a + LOGITS_COPIES * vocab * 4) + attention_mask_bytes(run, d.layers)

    subtotal = weights + adapter + gradients + optimizer + activations
    if run.on_gpu:
        overhead = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * subtotal)
    else:
        retained = 0.0 if bounds_heap(run.checkpointing) else CPU_ALLOCATOR
        overhead = CPU_RUNTIME_BYTES + CPU_JOB_BYTES + int(retained * subtotal)
    return MemoryEstimate(
        weights_bytes=int(weights),
        adapter_bytes=adapter,
        gradients_bytes=gradients,
        optimizer_bytes=optimizer,
        activations_bytes=int(activations),
        overhead_bytes=overhead,
        total_bytes=int(subtotal + overhead),
        trainable_parameters=trainable,
        base_parameters=base,
        sequence_length=run.seq,
        method=METHOD,
    )


def distinct_input_features(shapes: dict[str, LinearShape]) -> int:
    """Values per token that the model's linear layers take as input, counting once an input several layers share
    (q/k/v read the same normed hidden state, gate/up the same)."""
    seen: set[tuple[str, str]] = set()
    total = 0
    for key, shape in shapes.items():
        prefix, _, name = key.rpartition(".")
        group = next((g for g in SHARED_INPUT_GROUPS if name in g), (name,))
        if (prefix, group[0]) not in seen:
            seen.add((prefix, group[0]))
            total += shape.in_features * shape.count
    return total


def attention_mask_bytes(run: _Run, layers: int) -> int:
    """The dense mask of a padded or packed batch, and the float bias SDPA keeps per layer for backward."""
    copies = 2 if run.checkpointing else layers
    return run.batch * run.seq * run.seq * (1 + copies * run.attention_bytes)


def _fits(total: int, capacity: int) -> bool:
    return capacity > 0 and total <= capacity * (1 - FIT_MARGIN)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _fit(name: str, capacity: int, run: _Run, model: ModelSummary, model_config: dict[str, Any]) -> DeviceFit:
    total = _estimate(run, model, model_config).total_bytes
    fit = DeviceFit(
        device=name,
        capacity_bytes=capacity,
        fits=_fits(total, capacity),
        utilization=round(total / capacity, 4) if capacity > 0 else 0.0,
    )
    if not fit.fits:
        fit.suggestions = _suggestions(run, model, model_config, capacity)
    return fit


def _suggestions(run: _Run, model: ModelSummary, model_config: dict[str, Any], capacity: int) -> list[str]:
    """Single changes that lower the estimate, most effective first, each with its estimated total."""
    changes: list[tuple[str, _Run]] = []
    if not run.checkpointing:
        changes.append(("enable gradient_checkpointing", dataclasses.replace(run, checkpointing=True)))
    if run.on_gpu and not run.quant:
        changes.append(("set load_in_8bit", dataclasses.replace(run, quant="int8")))
    if run.on_gpu and run.quant != "nf4":
        changes.append(("set load_in_4bit (QLoRA)", dataclasses.replace(run, quant="nf4")))
    if run.batch > 1:
        changes.append(
            (
                f"lower per_device_train_batch_size to 1 and multiply gradient_accumulation_steps by {run.batch} "
                "to keep the effective batch",
                dataclasses.replace(run, batch=1),
            )
        )
    if run.seq > 256:
        half = max(256, run.seq // 2)
        changes.append((f"lower max_length to {half}", dataclasses.replace(run, seq=half)))

    scored = sorted(
        ((_estimate(changed, model, model_config).total_bytes, text, changed) for text, changed in changes),
        key=lambda item: item[0],
    )
    out = [f"{text}: estimated {_gib(total)}{' (fits)' if _fits(total, capacity) else ''}" for total, text, _ in scored]
    combined = run
    for _, _, changed in scored:
        combined = dataclasses.replace(
            combined,
            checkpointing=combined.checkpointing or changed.checkpointing,
            quant="nf4" if "nf4" in (combined.quant, changed.quant) else combined.quant or changed.quant,
            batch=min(combined.batch, changed.batch),
            seq=min(combined.seq, changed.seq),
        )
    combined_total = _estimate(combined, model, model_config).total_bytes
    if not any(_fits(total, capacity) for total, _, _ in scored):
        if len(scored) > 1 and _fits(combined_total, capacity):
            out.append(f"combine the changes above: estimated {_gib(combined_total)} (fits)")
        else:
            out.append(
                f"use a smaller model: even with all the changes above the estimate is {_gib(combined_total)} "
                f"for {_gib(capacity)}"
            )
    return out
