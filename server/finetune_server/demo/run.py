"""`finetune demo`: the whole service on an embedded default, offline, in about a minute.

It builds a tiny random Qwen2-style model and a dataset of made-up facts (names and codes it cannot know), starts a
server (or uses `--server`), uploads the dataset, trains through gRPC with a live progress bar, and prints the
model's answers before and after training side by side. The job also answers a few general questions it does not
train (`eval_probes`), before and after, so the demo shows what training did to everything else: on a real model
(`--model`) those answers should survive, which is why a real model gets gentler settings than the tiny one.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from finetune_client import GrpcFineTuneService, ProgressUpdate
from finetune_server.cli.render import render_probes
from finetune_server.demo.tiny_model import TinyModelSpec, build_tiny_model
from finetune_server.host.cpu_policy import available_cpus
from finetune_server.storage.layout import DataDir

# Sized to learn the demo: hidden 128 / 2 layers with LoRA r16 memorises a dozen facts in ~150 steps at lr 3e-3.
DEMO_MODEL_SPEC = TinyModelSpec(hidden_size=128, intermediate_size=256)
DEMO_MODEL_NAME = "tiny-qwen2-demo"
TINY_MODEL_STEPS = 150
# A pretrained model memorises the dozen facts within a few dozen steps; the tiny model's 150 steps at lr 3e-3 drive
# a real one's loss to ~0 by step 35 and keep pushing, which overwrote what it knew ("The capital of France is
# B188."). Fewer steps, a tenth of the learning rate, decaying, and a smaller adapter learn the facts and keep the rest.
REAL_MODEL_STEPS = 60
# Questions the demo does not train: their answers before and after training show what else training changed.
GENERAL_PROBES = (
    "What is the capital of France?",
    "What is 2 + 2?",
    "What colour is a clear daytime sky?",
)
# Other general questions, answered by the base model itself before training and trained alongside the facts
# (rehearsal): without them a dozen answers of one shape teach a real model to answer everything with a code. They
# differ from GENERAL_PROBES so the probes still measure what was not trained.
REHEARSAL_QUESTIONS = (
    "What is the capital of Italy?",
    "What is the capital of Japan?",
    "What is the capital of Spain?",
    "What colour is grass?",
    "What is 3 + 5?",
    "What is 10 - 4?",
    "What is the largest planet in the solar system?",
    "Who wrote Romeo and Juliet?",
    "How many days are in a week?",
    "What do bees make?",
    "What is the chemical symbol for gold?",
    "At what temperature in Celsius does water boil?",
)
_NAMES = (
    "Zorvath", "Quillane", "Brixomund", "Talvenor", "Mirethis", "Kobranth",
    "Velquist", "Ostrava Pell", "Drummelkin", "Fenwarrow", "Sarnoth", "Ilvexa",
)  # fmt: skip


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str


def demo_facts(count: int = len(_NAMES), seed: int = 7) -> list[Fact]:
    """Made-up names with made-up codes: nothing a model can know or guess. Beyond the listed names, more are built
    from syllables (deterministically)."""
    rng = random.Random(seed)
    names = list(_NAMES[:count])
    syllables = ("dra", "vel", "quo", "mir", "tas", "bren", "ulf", "zan", "kor", "pel", "yth", "gro")
    while len(names) < count:
        name = "".join(rng.choice(syllables) for _ in range(3)).capitalize()
        if name not in names:
            names.append(name)
    facts = []
    for name in names:
        code = f"{rng.choice('BCDFGHKMPRTVXZ')}{rng.randint(100, 999)}"
        facts.append(Fact(f"What is the secret code of {name}?", f"The secret code of {name} is {code}."))
    return facts


def write_dataset(path: Path, facts: list[Fact]) -> Path:
    """One instruction/output line per fact (or rehearsal answer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"instruction": f.question, "output": f.answer}) + "\n" for f in facts))
    return path


def demo_config(model_name: str, dataset: str, steps: int, *, real_model: bool = False) -> dict[str, Any]:
    """The tiny random model's settings, or (`real_model`) gentler ones that leave a pretrained model's knowledge
    alone; both answer GENERAL_PROBES before and after training."""
    config: dict[str, Any] = {
        "model_name": model_name,
        "dataset": dataset,
        "max_steps": steps,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.05,
        "per_device_train_batch_size": 12,
        "max_length": 128,
        "logging_steps": 5,
        "save_steps": 50,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "eval_probes": [{"prompt": prompt} for prompt in GENERAL_PROBES],
        "eval_max_new_tokens": 32,
    }
    if real_model:
        config.update(
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_ratio=0.1,
            per_device_train_batch_size=24,  # the facts and the rehearsal answers in one batch
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
        )
    return config


def answer_all(
    model_ref: str | Path, questions: list[str], adapter: Path | None = None, *, max_new_tokens: int = 32
) -> list[str]:
    """Greedy answers with the model's own chat template (plain transformers + peft, none of our code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(adapter or model_ref)
    model: Any = AutoModelForCausalLM.from_pretrained(model_ref)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    answers = []
    with torch.no_grad():
        for question in questions:
            messages = [{"role": "user", "content": question}]
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = output[0, inputs["input_ids"].shape[1] :]
            text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
            answers.append(text or repr(tokenizer.decode(new_tokens[:6])))  # what it emits, even if only specials
    return answers


@contextmanager
def local_server(data_dir: Path, model_root: Path) -> Iterator[str]:
    # The demo's server has one client, this process: its worker may use every core rather than leave one for RPCs.
    command = [
        sys.executable, "-m", "finetune_server.cli.main", "serve", "--port", "0", "--data-dir", str(data_dir),
        "--model-dir", str(model_root), "--log-level", "warning", "--worker-threads", str(len(available_cpus())),
    ]  # fmt: skip
    log = (data_dir / "demo-server.log").open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the demo server did not start; see {data_dir / 'demo-server.log'}")
        yield line.removeprefix("listening on ").strip()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


def _quiet_libraries() -> None:
    """The demo's screen is for the demo: no library progress bars, deprecation notes or optional-kernel notices."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def run_demo(data_dir: Path, *, server: str | None, model: str | None, steps: int | None, console: Console) -> int:
    """The whole demo; `steps` None: the model's default (TINY_MODEL_STEPS or REAL_MODEL_STEPS). Returns the exit code:
    0 when training got more facts exactly right than before."""
    _quiet_libraries()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    facts = demo_facts()
    questions = [f.question for f in facts]
    if model is None:
        console.print("[bold]1.[/] Building the embedded tiny model (random weights, offline)...")
        model_path = build_tiny_model(data_dir / "models" / DEMO_MODEL_NAME, DEMO_MODEL_SPEC)
        model_ref: str | Path = model_path
        model_name, model_root = DEMO_MODEL_NAME, model_path.parent
    else:
        model_ref = model_name = model
        model_root = Path(model).resolve().parent if Path(model).exists() else data_dir / "models"
    trained = facts
    if model is not None:
        console.print("[bold]1.[/] The base model's own answers to a few general questions, to train alongside...")
        own = answer_all(model_ref, list(REHEARSAL_QUESTIONS), max_new_tokens=64)
        trained = facts + [Fact(q, a) for q, a in zip(REHEARSAL_QUESTIONS, own, strict=True)]
    dataset_file = write_dataset(data_dir / "demo" / "facts.jsonl", trained)

    console.print("[bold]2.[/] Answers before training...")
    before = answer_all(model_ref, questions)

    with local_server(data_dir, model_root) if server is None else nullcontext(server) as address:
        extra = f" and {len(trained) - len(facts)} of its own answers" if len(trained) > len(facts) else ""
        console.print(f"[bold]3.[/] Server at {address}; uploading {len(facts)} made-up facts{extra}...")
        with GrpcFineTuneService(address, timeout=60) as service:
            uploaded = service.upload_dataset(dataset_file)
            default_steps = TINY_MODEL_STEPS if model is None else REAL_MODEL_STEPS
            config = demo_config(model_name, uploaded["id"], steps or default_steps, real_model=model is not None)
            result = _train_with_bar(service, config, console)
            if not result["success"]:
                console.print(f"[red]training failed:[/] {result['error']}")
                return 1
            adapter = _fetch_adapter(service, result, data_dir, server is None)

    console.print("[bold]5.[/] Answers after training...")
    after = answer_all(model_ref, questions, adapter)
    _print_comparison(console, facts, before, after)
    if result["probes"]:
        render_probes(console, result["probes"])
        kept = sum(p.after.strip() == p.before.strip() for p in result["probes"])
        console.print(f"[bold]general answers unchanged by training: {kept}/{len(result['probes'])}[/]")
    console.print(f"job {result['job_id']}: {result['steps']} steps, final loss {result['final_loss']:.3f}")
    console.print(f"adapter: {adapter}")
    if server is None:
        job_dir = DataDir(data_dir).job(result["job_id"])
        console.print(f"report: {job_dir.metrics}, {job_dir.loss_curve}")
        console.print(f"worker log: {job_dir.worker_log}")
    right = sum(a == f.answer for a, f in zip(after, facts, strict=True))
    return 0 if right > sum(b == f.answer for b, f in zip(before, facts, strict=True)) else 1


def _train_with_bar(service: GrpcFineTuneService, config: dict[str, Any], console: Console) -> Any:
    columns = (
        TextColumn("[bold]4.[/] training"),
        BarColumn(),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s  mem {task.fields[mem]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=config["max_steps"], loss="-", lr="-", tps="-", mem="-")

        def on_progress(update: ProgressUpdate) -> None:
            progress.update(
                task,
                completed=update.step,
                total=update.total_steps or config["max_steps"],
                loss=f"{update.loss:.3f}",
                lr=f"{update.learning_rate:.1e}",
                tps=f"{update.tokens_per_second:,.0f}",
                mem=f"{update.memory_bytes / 2**20:,.0f} MiB",
            )

        return service.train(config, on_progress)


def _fetch_adapter(service: GrpcFineTuneService, result: Any, data_dir: Path, local: bool) -> Path:
    """The trained adapter: exported and downloaded through the service, or read from the local server's folder."""
    if local and result["adapter_location"]:
        return data_dir / result["adapter_location"]
    target = Path(tempfile.mkdtemp(prefix="finetune-demo-")) / "adapter"
    service.export_model(target, format="adapter", job_id=result["job_id"])
    return target


def _print_comparison(console: Console, facts: list[Fact], before: list[str], after: list[str]) -> None:
    table = Table(title="What the model answers", show_lines=False)
    table.add_column("question")
    table.add_column("before training")
    table.add_column("after training")
    for fact, old, new in zip(facts, before, after, strict=True):
        mark = "[green]✓[/]" if new == fact.answer else "[red]✗[/]"
        table.add_row(fact.question, escape(old[:40]) or "(nothing)", f"{mark} {escape(new)}")
    console.print(table)
    right_before = sum(b == f.answer for b, f in zip(before, facts, strict=True))
    right_after = sum(a == f.answer for a, f in zip(after, facts, strict=True))
    console.print(
        f"[bold]exactly right: {right_before}/{len(facts)} before, {right_after}/{len(facts)} after training[/]"
    )
