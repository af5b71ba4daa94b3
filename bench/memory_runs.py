"""Child process of the memory benchmark: one config, a fresh process, peak RSS of training vs the estimate.

    python -m bench.memory_runs --model-dir M --batch 8 --seq 256 [--checkpointing] --steps 2 --out R.json
    python -m bench.memory_runs --model-dir M --preset rtx_3060 --accumulation 2 --steps 1 --out R.json

After the imports, the resident set is the baseline; the peak is sampled while `run_training` runs on examples that
all fill `seq` tokens, so every micro-batch is batch x seq. The estimate is `estimate_memory` for the same resolved
config, judged against the CPU (its 0.4 GiB import allowance is left out of the comparison with the delta). With
`--preset`, the preset's settings fill the config as the service fills them (its batch and max_length among them;
bf16 and the paged 8-bit optimizer are CUDA-only, so fp32 and AdamW on the CPU), with `--accumulation` micro-batches
per step instead of its own.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--seq", type=int, default=0)
    parser.add_argument("--preset", default="")
    parser.add_argument("--accumulation", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import peft  # noqa: F401  (imported before the baseline, as the worker has it before training)
    import structlog
    import torch  # noqa: F401

    from bench.common import RssSampler, dataset_rows, peak_rss_bytes, release_memory, rss_bytes
    from finetune_server.host.allocator import settle_for_training
    from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
    from finetune_server.training.engine.recipe import run_training
    from finetune_server.training.memory import CPU_RUNTIME_BYTES, estimate_memory
    from finetune_server.training.model_info import ModelSummary, count_parameters
    from finetune_server.training.presets import get_preset

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    model_config = json.loads((args.model_dir / "config.json").read_text())
    preset_values = get_preset(args.preset).config if args.preset else {}
    batch = args.batch or int(preset_values["per_device_train_batch_size"])
    seq = args.seq or int(preset_values["max_length"])
    micro_batches = args.steps * (args.accumulation or int(preset_values.get("gradient_accumulation_steps", 1)))
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        # Rows long enough that every one is truncated to exactly `seq` tokens.
        rows = [
            {
                "instruction": r["instruction"],
                "output": (r["output"] + " ") * (4 * seq // max(1, len(r["output"])) + 2),
            }
            for r in dataset_rows(batch * micro_batches, seq, seed=1)
        ]
        dataset = Path(tmp) / "long.jsonl"
        dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        explicit = TrainingConfig(
            model_name=str(args.model_dir),
            dataset=str(dataset),
            max_steps=args.steps,
            save_steps=0,
            preset=args.preset,
            lora=LoraSettings(dropout=args.dropout),
        )
        if args.accumulation:
            explicit.gradient_accumulation_steps = args.accumulation
        if not args.preset:
            explicit.max_length, explicit.per_device_train_batch_size = seq, batch
            explicit.gradient_checkpointing = args.checkpointing
            explicit.lora = LoraSettings(r=8, alpha=16, dropout=args.dropout)
        config, _ = resolve(explicit, preset_values)  # a preset's bf16 is ignored on the CPU (engine and estimate)
        summary = ModelSummary(num_parameters=count_parameters(args.model_dir, model_config))
        estimate = estimate_memory(config, summary, model_config, sequence_length=seq, devices=[("cpu", 0)])
        heap_threshold_fixed = settle_for_training(bool(config.gradient_checkpointing))  # as the worker does
        release_memory()
        baseline = rss_bytes()
        with RssSampler(0.002) as sampler:
            outcome = run_training(
                config,
                model_ref=args.model_dir,
                dataset_path=dataset,
                output_dir=Path(tmp) / "out",
                on_event=lambda _event: None,
            )
    measured_delta = sampler.peak_bytes - baseline
    estimated_delta = estimate.total_bytes - CPU_RUNTIME_BYTES
    args.out.write_text(
        json.dumps(
            {
                "batch": batch,
                "seq": seq,
                "checkpointing": bool(config.gradient_checkpointing),
                "quantization": "int8" if config.load_in_8bit else "nf4" if config.load_in_4bit else "",
                "micro_batches": micro_batches,
                "heap_threshold_fixed": heap_threshold_fixed,
                "steps": outcome.steps,
                "tokens": outcome.trained_tokens,
                "baseline_rss_bytes": baseline,
                "peak_rss_bytes": sampler.peak_bytes,
                "ru_maxrss_bytes": peak_rss_bytes(),
                "measured_delta_bytes": measured_delta,
                "estimated_delta_bytes": estimated_delta,
                "estimated_total_bytes": estimate.total_bytes,
                "estimate": {
                    k: getattr(estimate, k)
                    for k in (
                        "weights_bytes",
                        "adapter_bytes",
                        "gradients_bytes",
                        "optimizer_bytes",
                        "activations_bytes",
                        "overhead_bytes",
                        "total_bytes",
                        "trainable_parameters",
                        "base_parameters",
                    )
                },
                "measured_over_estimated": measured_delta / estimated_delta if estimated_delta else None,
                "peak_over_total_estimate": sampler.peak_bytes / estimate.total_bytes if estimate.total_bytes else None,
            }
        )
    )


if __name__ == "__main__":
    main()
