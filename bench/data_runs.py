"""Child processes of the data benchmark, so imports, threads and peak memory are their own.

    python -m bench.data_runs encode --model-dir M --dataset D --threads P --reps R --out R.json
    python -m bench.data_runs train --model-dir M --dataset D --cache-dir C --threads T --out R.json

`encode`: tokens/s of each way to turn the rows into token ids with P cores, the ways alternating `--reps` times in
this one process. `ours` builds a token cache entry (template rendering, tokenizing, labelling, writing Arrow) from
the rows parsed beforehand, in P encoding processes (in-process when P is 1 or the data is small); `ours_from_file`
times reading and parsing the JSONL file too; `bare` is `tokenizer(batch_of_rendered_texts)` over the same rows
rendered beforehand (not timed) with P tokenizer threads, the floor the rendering sits on; `datasets_map` is
`Dataset.from_generator(...).map(batched=True, num_proc=P)` with our encoder, what the `datasets` library offers.
Every way counts the same tokens: each rendered example's tokens before truncation.

`train`: a worker's view of one job: imports first (as the worker has them), then run_training for 3 steps with the
data dir's token cache `C` (cold or warm: whatever C holds). Reports the time from the call to the first step, the
process's peak RSS and its encoding processes' (RUSAGE_CHILDREN), and what the engine logged about the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH = 1024


def _settings(model_dir: Path, max_length: int) -> Any:
    from finetune_server.training.data import load_chat_template, load_tokenizer
    from finetune_server.training.data.batch_encode import EncoderSettings

    return EncoderSettings(load_tokenizer(model_dir), load_chat_template(model_dir) or "", max_length, False)


def encode_ours(model_dir: Path, dataset: Path, threads: int, max_length: int, *, parse: bool) -> dict[str, Any]:
    """A token cache entry built from the rows: parsed beforehand (untimed, as the bare loop's texts are rendered
    beforehand) unless `parse`, which times reading the file too."""
    from finetune_server.training.data import iter_examples
    from finetune_server.training.data.token_build import open_or_build
    from finetune_server.training.data.token_cache import CacheKey, TokenCache

    settings = _settings(model_dir, max_length)
    key = CacheKey.of(
        dataset="bench", tokenizer="bench", template=settings.template, max_length=max_length,
        data_format="auto", train_on_prompt=False,
    )  # fmt: skip
    parsed = None if parse else list(iter_examples(dataset))
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as folder:
        started = time.perf_counter()
        opened = open_or_build(
            TokenCache(Path(folder)), key, lambda: parsed if parsed is not None else iter_examples(dataset), settings,
            processes=threads,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        opened.table.close()
    return {"seconds": seconds, "tokens": int(opened.meta["token_stats"]["total"]), "rows": opened.meta["rows_read"]}


def _rendered_texts(model_dir: Path, dataset: Path) -> list[str]:
    from finetune_server.training.data import iter_examples, load_tokenizer, render_example

    tokenizer = load_tokenizer(model_dir)
    settings = _settings(model_dir, 1)
    return [render_example(example, tokenizer, settings.template).text for _, example in iter_examples(dataset)]


def encode_bare(model_dir: Path, dataset: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    texts = _rendered_texts(model_dir, dataset)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = 0
    started = time.perf_counter()
    for start in range(0, len(texts), BATCH):
        encoded = tokenizer(texts[start : start + BATCH], add_special_tokens=False)
        tokens += sum(len(ids) for ids in encoded["input_ids"])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "rows": len(texts)}


def encode_datasets_map(model_dir: Path, dataset: Path, threads: int, max_length: int) -> dict[str, Any]:
    import datasets

    from finetune_server.training.data import iter_examples
    from finetune_server.training.data.batch_encode import encode_batch
    from finetune_server.training.data.formats import Example, Message

    datasets.disable_progress_bars()
    settings = _settings(model_dir, max_length)

    def rows() -> Any:
        for row, example in iter_examples(dataset):
            yield {
                "row": row,
                "roles": [m.role for m in example.messages],
                "texts": [m.content for m in example.messages],
            }

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        items = [
            (row, Example("messages", tuple(Message(r, t) for r, t in zip(roles, texts, strict=True))))
            for row, roles, texts in zip(batch["row"], batch["roles"], batch["texts"], strict=True)
        ]
        result = encode_batch(items, settings)
        flat, offsets = result.batch, result.batch.offsets
        return {
            "input_ids": [flat.ids[offsets[k] : offsets[k + 1]] for k in range(len(flat))],
            "labels": [flat.labels[offsets[k] : offsets[k + 1]] for k in range(len(flat))],
            "num_tokens": flat.num_tokens,
        }

    with tempfile.TemporaryDirectory(prefix="bench-datasets-") as folder:
        started = time.perf_counter()
        source = datasets.Dataset.from_generator(rows, cache_dir=folder)
        mapped = source.map(
            encode, batched=True, batch_size=BATCH, num_proc=threads if threads > 1 else None,
            remove_columns=source.column_names, cache_file_name=str(Path(folder) / "mapped.arrow"),
        )  # fmt: skip
        seconds = time.perf_counter() - started
        tokens = int(sum(mapped["num_tokens"]))
    return {"seconds": seconds, "tokens": tokens, "rows": len(mapped)}


def train(model_dir: Path, dataset: Path, cache_dir: Path, max_length: int) -> dict[str, Any]:
    import peft  # noqa: F401  (imported before timing, as the worker has it before training)
    import structlog
    import torch  # noqa: F401

    from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
    from finetune_server.training.data.token_cache import TokenCache
    from finetune_server.training.engine.events import Event, LogEvent, ProgressEvent
    from finetune_server.training.engine.recipe import run_training

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    config, _ = resolve(
        TrainingConfig(
            model_name=str(model_dir), dataset=str(dataset), max_length=max_length, max_steps=3,
            per_device_train_batch_size=8, save_steps=0, lora=LoraSettings(r=8, alpha=16, dropout=0.05),
        )
    )  # fmt: skip
    first_step: list[float] = []
    logs: list[str] = []

    def on_event(event: Event) -> None:
        if isinstance(event, ProgressEvent) and not first_step:
            first_step.append(time.perf_counter())
        elif isinstance(event, LogEvent):
            logs.append(event.message)

    with tempfile.TemporaryDirectory(prefix="bench-data-job-") as out:
        started = time.perf_counter()
        run_training(
            config, model_ref=model_dir, dataset_path=dataset, output_dir=out, on_event=on_event,
            token_cache=TokenCache(cache_dir),
        )  # fmt: skip
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    cache_lines = [line for line in logs if "token cache" in line]
    return {
        "to_first_step_s": first_step[0] - started,
        "peak_rss_bytes": own,
        "encoding_processes_peak_rss_bytes": children,
        "cache": cache_lines,
        "hit": any(line.startswith("token cache hit") for line in cache_lines),
    }


ENCODERS = ("ours", "ours_from_file", "bare", "datasets_map")


def encode_all(model_dir: Path, dataset: Path, threads: int, max_length: int, reps: int) -> dict[str, Any]:
    """Every way `reps` times, alternating (the order rotates each repetition), in this one process."""
    ways = {
        "ours": lambda: encode_ours(model_dir, dataset, threads, max_length, parse=False),
        "ours_from_file": lambda: encode_ours(model_dir, dataset, threads, max_length, parse=True),
        "bare": lambda: encode_bare(model_dir, dataset),
        "datasets_map": lambda: encode_datasets_map(model_dir, dataset, threads, max_length),
    }
    with tempfile.TemporaryDirectory(prefix="bench-warm-up-") as folder:  # imports, template compilation, ...
        head = Path(folder) / "head.jsonl"
        with dataset.open() as source:
            head.write_text("".join(line for _, line in zip(range(BATCH), source, strict=False)))
        encode_ours(model_dir, head, 1, max_length, parse=True)
        encode_bare(model_dir, head)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ENCODERS}
    for rep in range(reps):
        for name in ENCODERS[rep % len(ENCODERS) :] + ENCODERS[: rep % len(ENCODERS)]:
            result = ways[name]()
            runs[name].append({**result, "tokens_per_s": result["tokens"] / result["seconds"]})
    return {"runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("encode", "train"))
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    # P tokenizer threads for the bare loop and for ours in-process; encoding processes use one each.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    if args.what == "train":
        import torch

        torch.set_num_threads(args.threads)
        result = train(args.model_dir, args.dataset, args.cache_dir, args.max_length)
    else:
        result = encode_all(args.model_dir, args.dataset, args.threads, args.max_length, args.reps)
    args.out.write_text(json.dumps({**result, "threads": args.threads}))


if __name__ == "__main__":
    main()
