"""GPU benchmark (run by bench/gpu.sh): LoRA on random models with Qwen2.5-0.5B's (and 1.5B's) shapes, built locally.

Our engine in 16-bit (bf16), 8-bit and 4-bit (NF4), packing off and on, against (a) HF Trainer padded to max_length
and (c) TRL SFTTrainer with packing and with padding-free, all bf16, on the same examples; alternating repetitions.
Reports non-padding tokens/s, MFU against the card's dense bf16 peak, peak device memory and final loss, into
bench/results/gpu.json and gpu.md. Nothing is downloaded: the tokenizer is the tiny embedded one (ids < 1k are valid
in the 151,936-token vocabulary) and the weights are random, which changes nothing about speed or memory.

MFU counts the FLOPs a LoRA step needs: the frozen base does a forward (2N per token) and the input-gradient half of a
backward (2N), no weight gradients: 4N per token, plus attention (causal: 2 x 2 x layers x seq x hidden forward, twice
that backward, over the real (unpadded) length); the adapter's own FLOPs are under 1% and left out. N counts every
matmul weight, the lm_head included. `mfu_6n` uses the common full-fine-tuning convention (6N) for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, dataset_rows, median, versions, write_json

# Dense bf16 tensor-core peaks from the datasheets, TFLOP/s (GeForce cards: with fp32 accumulation, as PyTorch uses).
# Matched in order against torch.cuda.get_device_name(); override with --peak-tflops.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX A6000", 155.0),
    ("RTX 4090", 165.0),
    ("RTX 4080", 97.0),
    ("RTX 3090", 71.0),
    ("RTX 3080", 59.0),
    ("RTX 3060", 25.0),
)

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    # Only for checking this script without a GPU (--dry-run-cpu).
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
}
OURS = ("ours", "ours_packing", "ours_int8", "ours_int8_packing", "ours_nf4", "ours_nf4_packing")
BASELINES = ("hf_padded", "trl_packing", "trl_padding_free")


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def build_shaped_model(name: str, work_dir: Path) -> Path:
    """A random bf16 model with `name`'s shapes and the tiny tokenizer, written once under work_dir/models."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from finetune_server.demo.tiny_model import build_tiny_model

    target = work_dir / "models" / f"random-{name}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    tokenizer_dir = build_tiny_model(work_dir / "models" / "tiny-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        **SHAPES[name],
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising 0.5-1.5B parameters on the CPU would take minutes
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype=torch.bfloat16)  # type: ignore[call-arg]  # transformers types .to() narrowly
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if target.exists():  # a half-written folder from an interrupted run
        shutil.rmtree(target)
    staging.rename(target)
    return target


def matmul_parameters(shape: dict[str, Any]) -> int:
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i  # q, o; k, v; gate, up, down
    return layers * per_layer + shape["vocab_size"] * h  # + lm_head


def flops_per_token(shape: dict[str, Any], mean_len: float, weight_factor: int) -> float:
    attention = 2 * 2 * shape["num_hidden_layers"] * mean_len * shape["hidden_size"] / 2  # causal: half the pairs
    return weight_factor * matmul_parameters(shape) + 3 * attention  # forward + backward (2x) for attention


def run_model(name: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    import torch

    from bench.engine_runs import Workload, prepare, run_method

    model_dir = build_shaped_model(name, args.work_dir)
    dataset = args.work_dir / "datasets" / f"gpu-{args.samples}-{args.max_length}.jsonl"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    dataset.write_text("".join(json.dumps(r) + "\n" for r in dataset_rows(args.samples, args.max_length, seed=0)))
    w = Workload(model_dir, dataset, args.batch_size, args.max_length, 2e-4, args.work_dir / "runs", bf16=True)
    w.work_dir.mkdir(parents=True, exist_ok=True)
    lengths = [len(ids) for ids in prepare(w).input_ids]
    mean_len = sum(lengths) / len(lengths)
    methods = [m for m in (*OURS, *BASELINES) if m not in args.skip.split(",")]
    if not args.warmed_up:  # one untimed step of each method: CUDA context, kernels, lazy imports
        warm = args.work_dir / "datasets" / "gpu-warmup.jsonl"
        warm.write_text("".join(dataset.read_text().splitlines(keepends=True)[: args.batch_size]))
        for method in methods:
            try:
                run_method(method, dataclasses.replace(w, dataset=warm))
            except Exception as exc:
                print(f"[gpu] warm-up of {method} failed: {exc}", flush=True)
        args.warmed_up = True
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        shift = rep % len(methods)
        for method in methods[shift:] + methods[:shift]:
            if time.perf_counter() > deadline:
                print(f"[gpu] {name}: time budget spent, skipping the rest", flush=True)
                break
            try:
                result = run_method(method, w)
            except Exception as exc:  # one failing variant (e.g. a bitsandbytes build) must not lose the others
                result = {"method": method, "error": f"{type(exc).__name__}: {exc}"[:500]}
                torch.cuda.empty_cache()
            result["rep"] = rep
            runs.append(result)
            print(f"[gpu] {name} rep {rep} {method}: {result.get('tokens_per_s', 'failed')}", flush=True)
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None)
    shape = SHAPES[name]
    summary: dict[str, Any] = {}
    for method in methods:
        ok = [r for r in runs if r["method"] == method and "error" not in r]
        if not ok:
            errors = [r["error"] for r in runs if r["method"] == method and "error" in r]
            summary[method] = {"error": errors[0] if errors else "not run (time budget)"}
            continue
        rate = median([r["tokens_per_s"] for r in ok])
        row = {
            "tokens_per_s": rate,
            "train_s": median([r["train_s"] for r in ok]),
            "peak_device_bytes": median([r.get("peak_device_bytes", r["peak_rss_bytes"]) for r in ok]),
            "final_loss": median([r["final_loss"] for r in ok]),
            "steps": ok[0]["steps"],
            "runs": len(ok),
        }
        if peak:
            row["mfu"] = rate * flops_per_token(shape, mean_len, 4) / (peak * 1e12)
            row["mfu_6n"] = rate * flops_per_token(shape, mean_len, 6) / (peak * 1e12)
        summary[method] = row
    ratios = {}
    for base in BASELINES:
        values = []
        for rep in range(args.reps):
            ours = next((r for r in runs if r["method"] == "ours" and r["rep"] == rep and "error" not in r), None)
            other = next((r for r in runs if r["method"] == base and r["rep"] == rep and "error" not in r), None)
            if ours and other:
                values.append(ours["tokens_per_s"] / other["tokens_per_s"])
        ratios[f"ours / {base}"] = median(values)
    return {
        "shape": shape,
        "matmul_parameters": matmul_parameters(shape),
        "examples": len(lengths),
        "mean_length": mean_len,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "peak_bf16_tflops": peak,
        "methods": summary,
        "ratios": ratios,
        "runs": runs,
    }


def render(results: dict[str, Any]) -> str:
    lines = [
        "# GPU benchmark",
        "",
        f"{results['device']} ({results['device_memory_bytes'] / 2**30:.0f} GiB), dense bf16 peak "
        f"{results['peak_bf16_tflops'] or 'unknown'} TFLOP/s; "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + ".",
        "MFU: 4N (frozen base: forward + input gradients) + attention per non-padding token; "
        "mfu_6n: the 6N convention.",
    ]
    for name, m in results["models"].items():
        lines += [
            "",
            f"## {name}-shaped random model: {m['examples']} examples, mean length {m['mean_length']:.0f}, "
            f"max_length {m['max_length']}, batch {m['batch_size']}",
            "",
            "| method | tokens/s | MFU | MFU (6N) | peak memory GiB | final loss | steps |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, r in m["methods"].items():
            if "error" in r:
                lines.append(f"| {method} | failed: {r['error'][:80]} | | | | | |")
                continue
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
            mfu6 = f"{r['mfu_6n']:.1%}" if "mfu_6n" in r else "n/a"
            lines.append(
                f"| {method} | {r['tokens_per_s']:,.0f} | {mfu} | {mfu6} | {r['peak_device_bytes'] / 2**30:.2f} "
                f"| {r['final_loss']:.3f} | {r['steps']} |"
            )
        lines += ["", *(f"- {k}: {v:.2f}x" for k, v in m["ratios"].items() if math.isfinite(v))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU benchmark (see bench/gpu.sh)")
    parser.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting runs after this many seconds")
    parser.add_argument("--skip", default="", help="comma-separated methods to leave out")
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak, if not in the table"
    )
    parser.add_argument("--work-dir", type=Path, default=RESULTS_DIR / "tmp" / "gpu")
    parser.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.warmed_up = False

    import torch

    if args.dry_run_cpu:  # exercise every code path on a tiny shape, without CUDA (timings meaningless)
        args.models, args.samples, args.max_length, args.reps = "tiny", 16, 64, 1
        args.out_dir = args.work_dir / "dry-run"
    elif not torch.cuda.is_available():
        print(
            "bench/gpu.sh needs a CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). "
            "Install a CUDA build of torch into .venv and run it on a machine with an NVIDIA GPU.",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    deadline = started + args.budget_s
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    results: dict[str, Any] = {
        "device": device_name,
        "device_memory_bytes": int(torch.cuda.get_device_properties(0).total_memory) if cuda else 0,
        "peak_bf16_tflops": args.peak_tflops or peak_tflops(device_name),
        "versions": versions(),
        "models": {},
    }
    for name in [m for m in args.models.split(",") if m]:
        if time.perf_counter() > deadline:
            print(f"[gpu] skipping {name}: time budget spent", flush=True)
            continue
        results["models"][name] = run_model(name, args, deadline)
        results["wall_s"] = time.perf_counter() - started
        write_json(args.out_dir / "gpu.json", results)
        (args.out_dir / "gpu.md").write_text(render(results))
    print(render(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
