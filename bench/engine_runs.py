"""Child process of the engine benchmark: our engine and what a user would run instead, on one model, alternating.

    python -m bench.engine_runs --model-dir M --dataset D --methods ours,hf_padded,... --reps 3 --out R.json

Every method trains the same examples (one epoch, encoded once by our chat-template pipeline so each runner sees the
same token ids), the same LoRA (r8, alpha 16, dropout 0.05, every linear projection), torch AdamW at the same
learning rate with a constant schedule, gradient clipping at 1.0, batch size B, fp32, sdpa attention, the same torch
threads. Repetitions alternate the methods (the order rotates each repetition) so drift on a shared machine hits all.

Per run: `train_s` (the training call alone), `wall_s` (data preparation + model load + training), `loop_s` for ours
and the bare loop (their step loops alone, first step to last: ours also writes a final checkpoint, which the bare
loop does not), non-padding tokens and their rate over `train_s` (and over `loop_s`), the same per CPU-second of
the process over the training (`tokens_per_cpu_s`: on a shared machine far steadier than wall time, since waiting
for a core costs no CPU time), the peak RSS sampled during the run, and the final logged loss.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import RssSampler, release_memory, write_json

METHODS = ("ours", "ours_packing", "hf_padded", "hf_dynamic", "hf_grouped", "trl_packing", "trl_padding_free", "raw")
DESCRIPTIONS = {
    "ours": "our engine (run_training): length-grouped dynamic padding, loss on answers",
    "ours_packing": "our engine with packing=true (rows of max_length, no cross-example attention)",
    "ours_int8": "our engine, base loaded in 8-bit (bitsandbytes LLM.int8)",
    "ours_nf4": "our engine, base loaded in 4-bit NF4 (QLoRA)",
    "ours_int8_packing": "our engine, 8-bit base, packing",
    "ours_nf4_packing": "our engine, 4-bit NF4 base, packing",
    "hf_padded": "(a) HF Trainer, padded to max_length, labels on every token (the seed's setup)",
    "hf_dynamic": "(b) HF Trainer, DataCollatorForSeq2Seq dynamic padding (random order)",
    "hf_grouped": "(b') HF Trainer, dynamic padding + train_sampling_strategy=group_by_length",
    "trl_packing": "(c) TRL SFTTrainer, packing (BFD) to max_length rows",
    "trl_padding_free": "(c) TRL SFTTrainer, padding_free (batch flattened to one row)",
    "raw": "(d) bare forward+backward+AdamW loop over our engine's batches and forward passes (the floor)",
}
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
SEED = 42


@dataclass(frozen=True)
class Workload:
    model_dir: Path
    dataset: Path
    batch_size: int
    max_length: int
    learning_rate: float
    work_dir: Path
    bf16: bool = False  # GPU: bf16 weights and autocast for every method (the CPU runs fp32)


@dataclass
class Prepared:
    """The encoded examples every baseline trains on (ours encodes the file itself, the same way)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_token_id: int
    tokenizer: Any  # transformers tokenizer (collators need one)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def prepare(w: Workload) -> Prepared:
    from transformers import AutoTokenizer

    from finetune_server.training.data import choose_chat_template, encode_many, iter_examples, load_tokenizer

    tokenizer = load_tokenizer(w.model_dir)
    template, _ = choose_chat_template(w.model_dir, "", True)
    examples = [example for _line, example in iter_examples(w.dataset, "auto")]
    encoded = encode_many(examples, tokenizer, template, max_length=w.max_length, train_on_prompt=False)
    usable = [e for e in encoded if any(label != -100 for label in e.labels[1:])]
    hf_tokenizer = AutoTokenizer.from_pretrained(w.model_dir)
    pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else hf_tokenizer.eos_token_id
    return Prepared([e.input_ids for e in usable], [e.labels for e in usable], int(pad), hf_tokenizer)


def lora_model(model_dir: Path, bf16: bool = False) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune_server.training.engine.model_loading import linear_module_names

    torch.manual_seed(SEED)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=linear_module_names(model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# --- runners: each returns its measurements; `wall_s` is added by the caller ----------------------------------------


def run_ours(w: Workload, out_dir: Path, *, packing: bool = False, quant: str = "") -> dict[str, Any]:
    from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
    from finetune_server.training.engine.recipe import run_training

    config, _ = resolve(
        TrainingConfig(
            model_name=str(w.model_dir),
            dataset=str(w.dataset),
            max_length=w.max_length,
            num_train_epochs=1.0,
            learning_rate=w.learning_rate,
            lr_scheduler_type="constant",
            warmup_ratio=0.0,
            per_device_train_batch_size=w.batch_size,
            save_steps=0,
            logging_steps=1,
            seed=SEED,
            packing=packing,
            bf16=w.bf16,
            load_in_4bit=quant == "nf4",
            load_in_8bit=quant == "int8",
            lora=LoraSettings(r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT),
        )
    )
    from finetune_server.training.engine.events import LogEvent, ProgressEvent

    events: list[Any] = []
    nan = float("nan")
    clock = {"start": (nan, nan), "end": (nan, nan)}  # (wall, CPU) seconds

    def on_event(event: Any) -> None:
        # The loop: from the "training N examples" line (said right before it) to the last step's progress event.
        if isinstance(event, LogEvent) and event.message.startswith("training "):
            clock["start"] = (time.perf_counter(), time.process_time())
        elif isinstance(event, ProgressEvent):
            clock["end"] = (time.perf_counter(), time.process_time())
        events.append(event)

    outcome = run_training(config, model_ref=w.model_dir, dataset_path=w.dataset, output_dir=out_dir, on_event=on_event)
    return {
        "train_s": outcome.train_runtime_s,
        "loop_s": clock["end"][0] - clock["start"][0],
        "train_cpu_s": clock["end"][1] - clock["start"][1],
        "tokens": outcome.trained_tokens,
        "steps": outcome.steps,
        "final_loss": outcome.final_train_loss,
        "events": len(events),
    }


def _hf_args(w: Workload, out_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "output_dir": str(out_dir),
        "per_device_train_batch_size": w.batch_size,
        "num_train_epochs": 1,
        "learning_rate": w.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not _cuda(),
        "bf16": w.bf16,
        "seed": SEED,
        "dataloader_num_workers": 0,
        **extra,
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _train_hf(trainer: Any, tokens: int) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "tokens": tokens,
        "steps": int(trainer.state.global_step),
        "final_loss": float(losses[-1]) if losses else float("nan"),
    }


def run_hf(w: Workload, out_dir: Path, data: Prepared, *, mode: str) -> dict[str, Any]:
    """HF Trainer: mode "padded" (the seed), "dynamic" or "grouped"."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    if mode == "padded":
        rows = {
            "input_ids": [ids + [data.pad_token_id] * (w.max_length - len(ids)) for ids in data.input_ids],
            "attention_mask": [[1] * len(ids) + [0] * (w.max_length - len(ids)) for ids in data.input_ids],
        }
        collator: Any = DataCollatorForLanguageModeling(data.tokenizer, mlm=False)
    else:
        rows = {
            "input_ids": data.input_ids,
            "attention_mask": [[1] * len(ids) for ids in data.input_ids],
            "labels": data.labels,
        }
        collator = DataCollatorForSeq2Seq(data.tokenizer, padding="longest", label_pad_token_id=-100)
    extra = {"train_sampling_strategy": "group_by_length"} if mode == "grouped" else {}
    model = lora_model(w.model_dir, w.bf16)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_hf_args(w, out_dir, **extra)),
        train_dataset=Dataset.from_dict(rows),
        data_collator=collator,
    )
    return _train_hf(trainer, data.tokens)


def run_trl(w: Workload, out_dir: Path, data: Prepared, *, packing: bool) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **_hf_args(w, out_dir),
        # Padding-free without packing refuses a max_length it would not enforce; the inputs are already truncated.
        max_length=w.max_length if packing else None,
        packing=packing,
        packing_strategy="bfd",
        padding_free=not packing,
        shuffle_dataset=False,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=lora_model(w.model_dir, w.bf16),
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": data.input_ids, "labels": data.labels}),
        processing_class=data.tokenizer,
    )
    return _train_hf(trainer, data.tokens)


def run_raw(w: Workload, data: Prepared) -> dict[str, Any]:
    """The floor: our batch plan and collate, then nothing but forward, backward, clip, step."""
    import torch

    from finetune_server.training.engine.batching import collate, pass_overhead_tokens, plan_batches, split_for_padding

    @dataclass
    class _Example:
        input_ids: list[int]
        labels: list[int]

    examples = [_Example(i, lab) for i, lab in zip(data.input_ids, data.labels, strict=True)]
    device = torch.device("cuda" if _cuda() else "cpu")
    model = lora_model(w.model_dir, w.bf16).to(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if w.bf16 else contextlib.nullcontext()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=w.learning_rate, weight_decay=0.0)
    plan = plan_batches(
        [len(e.input_ids) for e in examples], batch_size=w.batch_size, packing=False, max_length=w.max_length,
        seed=SEED, epoch=0,
    )  # fmt: skip
    overhead = pass_overhead_tokens(device.type)
    t0, c0 = time.perf_counter(), time.process_time()
    step_loss = torch.zeros(())
    for indices in plan:
        # The engine's forward passes: the micro-batch regrouped where padding would waste more than a pass costs,
        # each pass's mean loss weighted by its share of the micro-batch's trainable tokens.
        batch_examples = [examples[i] for i in indices]
        groups = split_for_padding([len(e.input_ids) for e in batch_examples], overhead_tokens=overhead)
        passes = [
            collate([batch_examples[k] for k in g], packing=False, pad_token_id=data.pad_token_id) for g in groups
        ]
        trainable = sum(p.num_trainable for p in passes)
        step_loss = torch.zeros(())
        for part in passes:
            with autocast:
                loss = model(**part.to(device).model_inputs(include_labels=True)).loss * (
                    part.num_trainable / trainable
                )
            loss.backward()
            step_loss += loss.detach().float().cpu()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    final = float(step_loss.item())
    train_s = time.perf_counter() - t0
    return {
        "train_s": train_s,
        "loop_s": train_s,  # nothing but the loop
        "train_cpu_s": time.process_time() - c0,
        "tokens": data.tokens,
        "steps": len(plan),
        "final_loss": final,
    }


def parse_ours(method: str) -> tuple[bool, str] | None:
    """`ours[_int8|_nf4][_packing]` -> (packing, quantisation); None for a baseline."""
    parts = method.split("_")
    if parts[0] != "ours" or not set(parts[1:]) <= {"int8", "nf4", "packing"}:
        return None
    return "packing" in parts, next((p for p in parts[1:] if p in ("int8", "nf4")), "")


def run_method(method: str, w: Workload) -> dict[str, Any]:
    """One run of `method`, with its wall time, sampled peak RSS and (on CUDA) peak device memory."""
    import torch

    release_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ours = parse_ours(method)
    with tempfile.TemporaryDirectory(dir=w.work_dir, prefix=f"{method}-") as tmp:
        out_dir = Path(tmp)
        with RssSampler() as rss:
            t0 = time.perf_counter()
            runners: dict[str, Callable[[], dict[str, Any]]] = {
                "ours": lambda: run_ours(w, out_dir, packing=bool(ours and ours[0]), quant=ours[1] if ours else ""),
                "hf_padded": lambda: run_hf(w, out_dir, prepare(w), mode="padded"),
                "hf_dynamic": lambda: run_hf(w, out_dir, prepare(w), mode="dynamic"),
                "hf_grouped": lambda: run_hf(w, out_dir, prepare(w), mode="grouped"),
                "trl_packing": lambda: run_trl(w, out_dir, prepare(w), packing=True),
                "trl_padding_free": lambda: run_trl(w, out_dir, prepare(w), packing=False),
                "raw": lambda: run_raw(w, prepare(w)),
            }
            result = runners["ours" if ours is not None else method]()
            wall_s = time.perf_counter() - t0
        if torch.cuda.is_available():
            result["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
    result.update(
        method=method,
        wall_s=wall_s,
        tokens_per_s=result["tokens"] / result["train_s"] if result["train_s"] > 0 else float("nan"),
        tokens_per_cpu_s=result["tokens"] / result["train_cpu_s"] if result["train_cpu_s"] > 0 else float("nan"),
        peak_rss_bytes=rss.peak_bytes,
        rss_delta_bytes=rss.peak_bytes - rss.start_bytes,
    )
    if result.get("loop_s", 0) > 0:  # ours and the bare loop
        result["tokens_per_loop_s"] = result["tokens"] / result["loop_s"]
    release_memory()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    _quiet()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(m for m in methods if m not in METHODS and parse_ours(m) is None)
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    w = Workload(args.model_dir, args.dataset, args.batch_size, args.max_length, args.learning_rate, args.work_dir)
    lengths = [len(ids) for ids in prepare(w).input_ids]
    # One untimed step of each method first: lazy imports and first-call costs would otherwise land on whichever
    # method happens to run first.
    rows = args.dataset.read_text(encoding="utf-8").splitlines(keepends=True)
    warm_data = args.work_dir / f"warmup-{os.getpid()}.jsonl"
    warm_data.write_text("".join(rows[: args.batch_size]), encoding="utf-8")
    for method in methods:
        run_method(method, dataclasses.replace(w, dataset=warm_data))
    warm_data.unlink()
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        shift = rep % len(methods)
        for method in methods[shift:] + methods[:shift]:
            result = run_method(method, w)
            result["rep"] = rep
            runs.append(result)
            print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)  # progress
    write_json(
        args.out,
        {
            "torch_threads": torch.get_num_threads(),
            "examples": len(lengths),
            "lengths": {
                "min": min(lengths),
                "median": sorted(lengths)[len(lengths) // 2],
                "max": max(lengths),
                "mean": sum(lengths) / len(lengths),
                "tokens": sum(lengths),
                "padding_fraction_at_max_length": 1 - sum(lengths) / (len(lengths) * args.max_length),
            },
            "runs": runs,
        },
    )


def _quiet() -> None:
    """Keep the children's logs to what matters: library progress bars and info chatter off."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with contextlib.suppress(Exception):
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()


if __name__ == "__main__":
    main()
