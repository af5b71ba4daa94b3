"""The LoRA training loop, written to be read top to bottom (in the manner of a torchtune recipe).

`run_training` does, in order: seeds; tokenizer and chat template; encode the dataset once; eval split; model + LoRA;
batch plan; optimizer and schedule; resume from the newest complete checkpoint; the loop (gradient accumulation,
clipping, progress, eval, early stopping, checkpoints, cancellation); final adapter; report.

Choices worth knowing:
- The loss of an optimizer step is the sum of token losses over the whole accumulation window divided by the number
  of trainable tokens in that window (the count is known before the forward passes, from the batch plan). So 2x2
  accumulation gives the same update as a batch of 4, whatever the lengths; a mean of per-micro-batch means does not.
- No host-device sync per micro-step: losses stay on the device and are read (one `.tolist()`) only at logging,
  eval and save points. A NaN is still pinned to its exact step.
- The data stream is a pure function of (seed, epoch): a checkpoint stores (epoch, batch index) and resume rebuilds
  the same plan and skips to it. With RNG, optimizer and scheduler restored too, a resumed run continues exactly
  like an uninterrupted one.
- Several processes (torchrun): every optimizer step consumes one window of `grad_accum * world_size` planned
  micro-batches and rank r trains its r-th share, so N processes follow the same trajectory as one process with N
  times the accumulation. Only rank 0 reports and writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.distributed as torch_dist
from torch.nn import functional

from finetune_server import faults
from finetune_server.errors import ErrorKind, FinetuneError, Violation
from finetune_server.host.cpu_policy import cpu_set_note
from finetune_server.storage import layout
from finetune_server.training.config import TrainingConfig
from finetune_server.training.data import (
    IGNORE_INDEX,
    EncodedExample,
    TemplateError,
    TextTokenizer,
    choose_chat_template,
    encode_example,
    encode_many,
    iter_examples,
    load_tokenizer,
)
from finetune_server.training.data.template import SOURCE_FALLBACK, save_tokenizer_files
from finetune_server.training.engine import checkpoint as ckpt
from finetune_server.training.engine.batching import Batch, collate, plan_batches
from finetune_server.training.engine.errors import (
    DiskFullError,
    NanLossError,
    NoUsableExamplesError,
    OutOfMemoryError,
    TrainingCancelled,
    TrainingError,
    disk_full_detail,
)
from finetune_server.training.engine.events import (
    CheckpointEvent,
    EvalEvent,
    Event,
    EventSink,
    LogEvent,
    LogLevel,
    ProgressEvent,
    read_device_memory,
)
from finetune_server.training.engine.model_loading import compute_dtype, load_for_training, resolve_model_dir
from finetune_server.training.engine.report import write_report


@dataclass(frozen=True)
class TrainingOutcome:
    final_train_loss: float  # averaged over the last logging window
    final_eval_loss: float | None
    steps: int
    trained_tokens: int  # non-padding tokens, this attempt and earlier ones
    train_runtime_s: float
    metrics: dict[str, float]
    adapter_dir: Path
    stopped_early: bool = False


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainState:
    """Everything of the loop that a checkpoint must carry besides model, optimizer, scheduler and RNG."""

    step: int = 0
    position: ckpt.DataPosition = field(default_factory=lambda: ckpt.DataPosition(0, 0))
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", ...} and {"step", "eval_loss"}
    tokens_seen: int = 0
    elapsed_before_s: float = 0.0  # wall time of earlier attempts
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    last_logged_step: int = 0
    last_eval_step: int = -1
    last_saved_step: int = -1

    def to_extra(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "tokens_seen": self.tokens_seen,
            "elapsed_before_s": self.elapsed_before_s,
            "best_eval_loss": self.best_eval_loss,
            "evals_without_improvement": self.evals_without_improvement,
            "last_logged_step": self.last_logged_step,
            "last_eval_step": self.last_eval_step,
        }

    @classmethod
    def from_checkpoint(cls, state: ckpt.CheckpointState) -> TrainState:
        extra = state.extra
        return cls(
            step=state.step,
            position=state.data_position,
            history=list(extra.get("history", [])),
            tokens_seen=int(extra.get("tokens_seen", 0)),
            elapsed_before_s=float(extra.get("elapsed_before_s", 0.0)),
            best_eval_loss=extra.get("best_eval_loss"),
            evals_without_improvement=int(extra.get("evals_without_improvement", 0)),
            last_logged_step=int(extra.get("last_logged_step", state.step)),
            last_eval_step=int(extra.get("last_eval_step", -1)),
            last_saved_step=state.step,
        )


def run_training(
    config: TrainingConfig,
    *,
    model_ref: str | Path,
    dataset_path: str | Path,
    eval_dataset_path: str | Path | None = None,
    output_dir: str | Path,
    on_event: EventSink,
    should_stop: Callable[[], bool] = lambda: False,
    device: torch.device | str | None = None,
    job_id: str = "",
    hub_cache_dir: Path | None = None,
    hub_offline: bool | None = None,
) -> TrainingOutcome:
    """Train a LoRA adapter on a RESOLVED config; resume from `output_dir`'s newest complete checkpoint if any.

    Raises TrainingCancelled when `should_stop()` turns True, TrainingError subclasses (NAN_LOSS, OUT_OF_MEMORY,
    NO_USABLE_EXAMPLES) and FinetuneError for bad inputs. Checkpoints already written are kept in every case.
    `model_ref` is a local folder or a hub id (downloaded into `hub_cache_dir`; `hub_offline` None: HF_HUB_OFFLINE).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    created_group = _init_distributed_from_env()
    try:
        return _run(
            config,
            model_ref=model_ref,
            dataset_path=Path(dataset_path),
            eval_dataset_path=Path(eval_dataset_path) if eval_dataset_path else None,
            output_dir=output_dir,
            on_event=on_event,
            should_stop=should_stop,
            device=device,
            job_id=job_id or output_dir.name,
            hub_cache_dir=hub_cache_dir,
            hub_offline=hub_offline,
        )
    finally:
        if created_group:
            torch_dist.destroy_process_group()


def _run(
    config: TrainingConfig,
    *,
    model_ref: str | Path,
    dataset_path: Path,
    eval_dataset_path: Path | None,
    output_dir: Path,
    on_event: EventSink,
    should_stop: Callable[[], bool],
    device: torch.device | str | None,
    job_id: str,
    hub_cache_dir: Path | None,
    hub_offline: bool | None,
) -> TrainingOutcome:
    dist = _dist_info()
    log = structlog.get_logger(__name__).bind(job_id=job_id, rank=dist.rank)
    dev = _pick_device(device, dist)
    seed = int(config.seed or 0)
    batch_size = int(config.per_device_train_batch_size or 1)
    grad_accum = int(config.gradient_accumulation_steps or 1)
    max_length = int(config.max_length or 2048)
    packing = bool(config.packing)

    def emit(event: Event) -> None:
        if dist.is_main:
            on_event(event)

    def say(level: LogLevel, message: str) -> None:
        getattr(log, level.value)(message)
        emit(LogEvent(level, message))

    # 1. Seeds: the eval split, LoRA init and dropout all follow config.seed.
    _seed_everything(seed)

    # 2. Tokenizer and chat template (the model's own, the config's, or the ChatML fallback when allowed).
    model_dir = resolve_model_dir(model_ref, cache_dir=hub_cache_dir, offline=hub_offline)
    tokenizer = load_tokenizer(model_dir)
    try:
        template, template_source = choose_chat_template(
            model_dir, config.chat_template, bool(config.allow_fallback_chat_template)
        )
    except TemplateError as exc:
        raise FinetuneError(  # as validation reports it
            ErrorKind.INVALID_ARGUMENT,
            "NO_CHAT_TEMPLATE",
            f"{model_dir.name} has no chat template and allow_fallback_chat_template is false",
            violations=[Violation("allow_fallback_chat_template", "NO_CHAT_TEMPLATE", str(exc))],
            hint="Set chat_template, or allow_fallback_chat_template to train with ChatML.",
        ) from exc
    if template_source == SOURCE_FALLBACK:
        say(
            LogLevel.WARNING,
            "no chat template in the model: training with the ChatML fallback (saved with the adapter)",
        )
    pad_token_id = _pad_token_id(tokenizer)

    # 3. Encode the dataset once; examples without a trainable token after truncation are dropped.
    train_set = _encode_file(dataset_path, "dataset", config, tokenizer, template)
    if train_set.truncated:
        say(LogLevel.WARNING, f"{train_set.truncated} examples were longer than max_length={max_length} and truncated")
    if train_set.unusable:
        say(LogLevel.WARNING, f"{train_set.unusable} examples lost every answer token to truncation and are skipped")

    # 4. Eval split: the eval dataset, else a seeded fraction of the training set.
    train_examples = train_set.examples
    eval_examples: list[EncodedExample] = []
    if eval_dataset_path is not None:
        eval_examples = _encode_file(eval_dataset_path, "eval_dataset", config, tokenizer, template).examples
    elif (config.eval_split or 0.0) > 0.0:
        if len(train_examples) < 2:
            say(LogLevel.WARNING, "too few examples to split off an eval set: training without evaluation")
        else:
            order = list(range(len(train_examples)))
            random.Random(seed).shuffle(order)
            n_eval = min(len(order) - 1, max(1, round(len(order) * float(config.eval_split or 0.0))))
            eval_examples = [train_examples[i] for i in order[:n_eval]]
            train_examples = [train_examples[i] for i in sorted(order[n_eval:])]
    train_trainable = [_shifted_trainable(e) for e in train_examples]
    train_lengths = [len(e.input_ids) for e in train_examples]

    # 5. Model with LoRA (after the data, so data errors come before minutes of loading).
    peft_model, _ = load_for_training(config, model_dir, device=dev)
    # The adapter names its base as the caller did (a hub id, not this machine's cache path), for serving elsewhere.
    peft_model.peft_config["default"].base_model_name_or_path = str(model_ref)
    ddp = None
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(peft_model, device_ids=[dev.index] if dev.type == "cuda" else None)
    model: torch.nn.Module = ddp or peft_model
    trainable_params = [p for p in peft_model.parameters() if p.requires_grad]
    amp_dtype = compute_dtype(config, dev)
    autocast = (
        torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_dtype != torch.float32 else contextlib.nullcontext()
    )
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    # 6. Batch plan: a pure function of (seed, epoch); each optimizer step takes one window of micro-batches.
    plans: dict[int, list[list[int]]] = {}

    def plan_for(epoch: int) -> list[list[int]]:
        if epoch not in plans:
            plans.clear()  # only the current epoch is ever needed again
            plans[epoch] = plan_batches(
                train_lengths, batch_size=batch_size, packing=packing, max_length=max_length, seed=seed, epoch=epoch
            )
        return plans[epoch]

    window = grad_accum * dist.world_size
    batches_per_epoch = len(plan_for(0))
    if config.max_steps and config.max_steps > 0:
        total_steps = int(config.max_steps)
    else:
        total_steps = max(1, math.ceil(float(config.num_train_epochs or 1.0) * batches_per_epoch / window))

    # 7. Optimizer and learning-rate schedule (linear warmup, then cosine / linear decay or constant).
    optimizer, warning = _build_optimizer(config, trainable_params, dev)
    if warning:
        say(LogLevel.WARNING, warning)
    scheduler = _build_scheduler(config, optimizer, total_steps)

    # 8. Resume from the newest complete checkpoint, if there is one.
    state = TrainState()
    rng_to_restore: dict[str, Any] | None = None
    if dist.is_main:
        ckpt.remove_stale_temp(output_dir)
    _barrier(dist)
    latest = ckpt.latest_checkpoint(output_dir)
    if latest is not None:
        loaded = ckpt.load_checkpoint(latest, model=peft_model, optimizer=optimizer, scheduler=scheduler)
        state = TrainState.from_checkpoint(loaded)
        rng_to_restore = loaded.rng_states
        say(LogLevel.INFO, f"resumed from {latest.relative_to(output_dir)} (step {state.step} of {total_steps})")

    eval_plan = (
        plan_batches(
            [len(e.input_ids) for e in eval_examples],
            batch_size=batch_size,
            packing=packing,
            max_length=max_length,
            seed=seed,
            epoch=0,
        )
        if eval_examples
        else []
    )
    eval_every = int(config.eval_steps or 0)
    save_every = int(config.save_steps or 0)
    log_every = max(1, int(config.logging_steps or 1))
    patience = int(config.early_stopping_patience or 0)
    max_grad_norm = float(config.max_grad_norm or 0.0)
    threads = torch.get_num_threads()
    say(
        LogLevel.INFO,
        f"training {len(train_examples)} examples ({batches_per_epoch} micro-batches per epoch) for {total_steps} "
        f"steps; eval on {len(eval_examples)} examples; on {dev} with {threads} CPU thread{'' if threads == 1 else 's'}"
        f"{cpu_set_note()}",
    )

    # Losses and grad norms of steps not yet read back to the host: (step, loss, lr, grad norm, epoch).
    pending: list[tuple[int, torch.Tensor, float, torch.Tensor, float]] = []
    progress_tokens = 0  # tokens since the last progress event (this rank)
    started = time.perf_counter()
    last_progress_time = started
    start_step = state.step
    attempt_tokens = 0
    stopped_early = False

    def flush() -> None:
        """Read pending step losses to the host (one sync), fail on NaN/inf, append them to the history."""
        if not pending:
            return
        losses = torch.stack([p[1] for p in pending])
        norms = torch.stack([p[3] for p in pending])
        if dist.world_size > 1:
            torch_dist.all_reduce(losses)  # each rank holds its share of the window's token-weighted mean
        for (step_no, _, lr, _, epoch_at), loss, norm in zip(pending, losses.tolist(), norms.tolist(), strict=True):
            if not math.isfinite(loss):
                raise NanLossError(step_no, lr)
            state.history.append(
                {"step": step_no, "loss": loss, "learning_rate": lr, "grad_norm": norm, "epoch": epoch_at}
            )
        pending.clear()

    def evaluate() -> float:
        model.eval()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        count = torch.zeros((), device=dev, dtype=torch.float64)
        with torch.no_grad(), autocast:
            for indices in eval_plan[dist.rank :: dist.world_size]:
                batch = collate([eval_examples[i] for i in indices], packing=packing, pad_token_id=pad_token_id)
                batch = batch.to(dev, non_blocking=True)
                logits = model(**batch.model_inputs(include_labels=False)).logits
                loss_sum += _token_loss_sum(logits, batch.labels).double()
                count += batch.num_trainable
        if dist.world_size > 1:
            torch_dist.all_reduce(loss_sum)
            torch_dist.all_reduce(count)
        model.train()
        return float(loss_sum.item() / max(1.0, count.item()))

    def run_eval() -> None:
        nonlocal stopped_early
        eval_loss = evaluate()
        is_best = state.best_eval_loss is None or eval_loss < state.best_eval_loss
        if is_best:
            state.best_eval_loss = eval_loss
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        state.last_eval_step = state.step
        state.history.append({"step": state.step, "eval_loss": eval_loss})
        emit(EvalEvent(state.step, eval_loss, _perplexity(eval_loss), is_best))
        log.info("eval", step=state.step, eval_loss=eval_loss, is_best=is_best)
        if patience and state.evals_without_improvement >= patience:
            stopped_early = True
            say(LogLevel.INFO, f"early stopping at step {state.step}: no eval improvement in {patience} evaluations")

    def save() -> None:
        flush()  # never save weights that a NaN already spoiled

        def write() -> None:
            with _disk_full_as_error(state.step, "the checkpoint", output_dir, config, trainable_params):
                path = ckpt.save_checkpoint(
                    output_dir,
                    state.step,
                    model=peft_model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    rng_states=ckpt.capture_rng_states(),
                    data_position=state.position,
                    extra={**state.to_extra(), "elapsed_before_s": state.elapsed_before_s + _since(started)},
                )
            ckpt.prune(output_dir, int(config.save_total_limit or 0))
            emit(CheckpointEvent(state.step, str(path.relative_to(output_dir)), ckpt.folder_size(path)))

        _on_main_rank(dist, dev, state.step, "the checkpoint", write)
        state.last_saved_step = state.step

    def report_progress() -> None:
        nonlocal progress_tokens, last_progress_time
        flush()
        tokens = _sum_across(progress_tokens, dist, dev)
        now = time.perf_counter()
        window_rows = [r for r in state.history if "loss" in r and r["step"] > state.last_logged_step]
        last = window_rows[-1]
        done_this_attempt = state.step - start_step
        elapsed_here = now - started
        eta = elapsed_here / done_this_attempt * (total_steps - state.step) if done_this_attempt else None
        emit(
            ProgressEvent(
                step=state.step,
                total_steps=total_steps,
                epoch=last["epoch"],
                loss=sum(r["loss"] for r in window_rows) / len(window_rows),
                learning_rate=last["learning_rate"],
                grad_norm=last["grad_norm"],
                tokens_per_second=tokens / max(now - last_progress_time, 1e-9),
                elapsed_s=state.elapsed_before_s + elapsed_here,
                eta_s=eta,
                memory=read_device_memory(dev),
                tokens_seen=state.tokens_seen,
            )
        )
        state.last_logged_step = state.step
        progress_tokens = 0
        last_progress_time = now

    # 9. The loop. RNG is restored last, after everything in setup that drew random numbers (LoRA init).
    if rng_to_restore is not None:
        ckpt.restore_rng_states(rng_to_restore)
    model.train()
    stream = _micro_batches(plan_for, state.position)
    try:
        while state.step < total_steps and not stopped_early:
            if dist.world_size > 1 and _any_rank(should_stop(), dev):
                raise TrainingCancelled(state.step)
            window_items = [next(stream) for _ in range(window)]
            mine = window_items[dist.rank * grad_accum : (dist.rank + 1) * grad_accum]
            # Trainable tokens of the whole window (all ranks): known from the plan, no communication needed.
            window_tokens = max(1, sum(train_trainable[i] for _, indices in window_items for i in indices))
            window_loss = torch.zeros((), device=dev)
            for k, (_, indices) in enumerate(mine):
                if dist.world_size == 1 and should_stop():
                    raise TrainingCancelled(state.step)
                batch = collate([train_examples[i] for i in indices], packing=packing, pad_token_id=pad_token_id)
                gpu_batch: Batch = batch.to(dev, non_blocking=True)
                # DDP averages gradients over ranks; scaling by world_size turns that into the window's token sum.
                sync = ddp.no_sync() if ddp is not None and k < len(mine) - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        faults.before_forward(state.step + 1)  # FINETUNE_FAULTS=oom_at_step=N (tests, chaos drills)
                        logits = model(**gpu_batch.model_inputs(include_labels=False)).logits
                    loss_sum = _token_loss_sum(logits, gpu_batch.labels)
                    loss = loss_sum * (dist.world_size / window_tokens)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                window_loss += loss_sum.detach() / window_tokens
                progress_tokens += batch.num_tokens
                attempt_tokens += batch.num_tokens
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable_params, max_grad_norm if max_grad_norm > 0 else float("inf")
            )
            learning_rate = float(scheduler.get_last_lr()[0])
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            last_epoch, last_index = window_items[-1][0].epoch, window_items[-1][0].batch_index
            state.step += 1
            state.position = ckpt.DataPosition(last_epoch, last_index + 1)
            state.tokens_seen += _window_tokens_all_ranks(window_items, train_lengths)
            epoch_at = last_epoch + (last_index + 1) / max(1, len(plan_for(last_epoch)))
            pending.append((state.step, window_loss, learning_rate, grad_norm.detach(), epoch_at))

            if state.step % log_every == 0 or state.step == total_steps:
                report_progress()
            if eval_plan and eval_every and state.step % eval_every == 0 and state.step < total_steps:
                flush()
                run_eval()
            if save_every and state.step % save_every == 0 and state.step < total_steps and not stopped_early:
                save()
        flush()
        if state.last_logged_step < state.step and any(r["step"] > state.last_logged_step for r in state.history):
            report_progress()
        if eval_plan and state.last_eval_step != state.step:
            run_eval()
        if state.last_saved_step != state.step:
            save()
    except TrainingCancelled:
        say(LogLevel.INFO, f"cancelled at step {state.step}")
        raise
    except torch.OutOfMemoryError as exc:
        raise OutOfMemoryError(state.step + 1, str(dev), str(exc).splitlines()[0], config) from exc
    except MemoryError as exc:
        raise OutOfMemoryError(state.step + 1, str(dev), "the process could not allocate host memory", config) from exc
    except RuntimeError as exc:
        if "out of memory" in str(exc) or "can't allocate memory" in str(exc):
            raise OutOfMemoryError(state.step + 1, str(dev), str(exc).splitlines()[0], config) from exc
        raise

    # 10. Final adapter, with the tokenizer files and the exact chat template trained with; then the report.
    runtime = _since(started)
    adapter_dir = layout.JobDir(output_dir).adapter
    train_rows = [r for r in state.history if "loss" in r]
    final_train_loss = _final_window_loss(train_rows, log_every)
    eval_rows = [r for r in state.history if "eval_loss" in r]
    final_eval_loss = eval_rows[-1]["eval_loss"] if eval_rows else None
    metrics: dict[str, float] = {
        "train_runtime_s": state.elapsed_before_s + runtime,
        "train_tokens_per_second": _sum_across(attempt_tokens, dist, dev) / max(runtime, 1e-9),
        "train_examples": float(len(train_examples)),
        "eval_examples": float(len(eval_examples)),
        "truncated_examples": float(train_set.truncated),
        "skipped_examples": float(train_set.unusable),
        "total_steps": float(total_steps),
        "steps": float(state.step),
        "epochs": train_rows[-1]["epoch"] if train_rows else 0.0,
        "tokens_seen": float(state.tokens_seen),
        "final_train_loss": final_train_loss,
        "trainable_parameters": float(sum(p.numel() for p in trainable_params)),
    }
    if final_eval_loss is not None:
        metrics["final_eval_loss"] = final_eval_loss
        metrics["eval_perplexity"] = _perplexity(final_eval_loss)
    if state.best_eval_loss is not None:
        metrics["best_eval_loss"] = state.best_eval_loss

    def write_adapter() -> None:
        with _disk_full_as_error(state.step, "the final adapter", output_dir, config, trainable_params):
            _save_adapter(peft_model, adapter_dir, model_dir, template)
            write_report(output_dir, metrics=metrics, history=state.history)

    _on_main_rank(dist, dev, state.step, "the final adapter", write_adapter)
    log.info("training finished", steps=state.step, final_train_loss=final_train_loss, runtime_s=runtime)
    return TrainingOutcome(
        final_train_loss=final_train_loss,
        final_eval_loss=final_eval_loss,
        steps=state.step,
        trained_tokens=state.tokens_seen,
        train_runtime_s=state.elapsed_before_s + runtime,
        metrics=metrics,
        adapter_dir=adapter_dir,
        stopped_early=stopped_early,
    )


# --- helpers ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _disk_full_as_error(
    step: int, what: str, output_dir: Path, config: TrainingConfig, trainable: Sequence[torch.nn.Parameter]
) -> Iterator[None]:
    """A full disk (or quota) while writing becomes DISK_FULL, saying what to free; other errors pass through.

    The writers undo their staging folders first, so the newest complete checkpoint is still the one to resume from.
    """
    try:
        yield
    except Exception as exc:
        detail = disk_full_detail(exc)
        if detail is None:
            raise
        newest = ckpt.list_checkpoints(output_dir)
        # One checkpoint's size: the last one written, else adapter + AdamW's two moments in fp32.
        needed = ckpt.folder_size(newest[-1][1]) if newest else 12 * sum(p.numel() for p in trainable)
        try:
            free = shutil.disk_usage(output_dir).free
        except OSError:
            free = 0
        raise DiskFullError(
            step,
            what,
            str(output_dir),
            detail,
            needed_bytes=needed,
            free_bytes=free,
            newest_checkpoint_step=newest[-1][0] if newest else None,
            save_total_limit=int(config.save_total_limit or 0),
        ) from exc


@dataclass
class _EncodedSet:
    examples: list[EncodedExample]
    truncated: int
    unusable: int


def _encode_file(
    path: Path, field_path: str, config: TrainingConfig, tokenizer: TextTokenizer, template: str
) -> _EncodedSet:
    examples = [
        e for _, e in iter_examples(str(path), config.data_format or "auto", **config.source_options(field_path))
    ]
    kwargs = {"max_length": int(config.max_length or 2048), "train_on_prompt": bool(config.train_on_prompt)}
    try:
        encoded = encode_many(examples, tokenizer, template, **kwargs)  # type: ignore[arg-type]
    except TemplateError:
        # One example the template cannot render: encode one by one and drop only those (validation reported them).
        encoded = []
        for example in examples:
            with contextlib.suppress(TemplateError):
                encoded.append(encode_example(example, tokenizer, template, **kwargs))  # type: ignore[arg-type]
    usable = [e for e in encoded if _shifted_trainable(e) > 0]
    if not usable:
        raise NoUsableExamplesError(
            field_path,
            f"none of the {len(examples)} valid records of {path.name} has a token to train on"
            if examples
            else f"{path.name} has no valid record",
        )
    return _EncodedSet(usable, truncated=sum(e.truncated for e in usable), unusable=len(encoded) - len(usable))


def _shifted_trainable(example: EncodedExample) -> int:
    # Position 0 is never a target of a causal LM (the same count as Batch.num_trainable).
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions, in fp32."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _micro_batches(
    plan_for: Callable[[int], list[list[int]]], start: ckpt.DataPosition
) -> Iterator[tuple[ckpt.DataPosition, list[int]]]:
    """Planned micro-batches from `start` on, across epoch boundaries, without end."""
    epoch, index = start.epoch, start.batch_index
    while True:
        plan = plan_for(epoch)
        while index < len(plan):
            yield ckpt.DataPosition(epoch, index), plan[index]
            index += 1
        epoch, index = epoch + 1, 0


def _window_tokens_all_ranks(items: Sequence[tuple[ckpt.DataPosition, list[int]]], lengths: Sequence[int]) -> int:
    return sum(lengths[i] for _, indices in items for i in indices)


def _final_window_loss(rows: list[dict[str, Any]], log_every: int) -> float:
    if not rows:
        return float("nan")
    window = rows[-log_every:]
    return float(sum(r["loss"] for r in window) / len(window))


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _since(t0: float) -> float:
    return time.perf_counter() - t0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def _pad_token_id(tokenizer: TextTokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padded positions are masked out of attention and loss, so any id works


def _build_optimizer(
    config: TrainingConfig, params: list[torch.nn.Parameter], device: torch.device
) -> tuple[torch.optim.Optimizer, str | None]:
    """AdamW (decay on matrices only); bitsandbytes' PagedAdamW8bit when asked for and on CUDA."""
    lr = float(config.learning_rate if config.learning_rate is not None else 2e-4)
    decay = float(config.weight_decay or 0.0)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optim == "paged_adamw_8bit":
        if device.type == "cuda":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(groups, lr=lr), None
        return torch.optim.AdamW(groups, lr=lr), "paged_adamw_8bit needs a CUDA device: using torch AdamW instead"
    return torch.optim.AdamW(groups, lr=lr), None


def _build_scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = math.ceil(float(config.warmup_ratio or 0.0) * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        config.lr_scheduler_type or "cosine"
    ]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _save_adapter(peft_model: Any, adapter_dir: Path, model_dir: Path, template: str) -> None:
    """Write the adapter folder atomically: weights, tokenizer files and the chat template trained with."""
    staging = Path(tempfile.mkdtemp(dir=adapter_dir.parent, prefix=f".tmp-{adapter_dir.name}-"))
    try:
        peft_model.save_pretrained(staging, safe_serialization=True)
        save_tokenizer_files(model_dir, staging, template)
        ckpt.publish_dir(staging, adapter_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --- devices and processes -------------------------------------------------------------------------------------------


def _init_distributed_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns whether this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch_dist.is_available() or torch_dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch_dist.init_process_group(backend=backend)
    return True


def _dist_info() -> DistInfo:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return DistInfo(
            rank=torch_dist.get_rank(),
            world_size=torch_dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    return DistInfo()


def _pick_device(device: torch.device | str | None, dist: DistInfo) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def _on_main_rank(dist: DistInfo, device: torch.device, step: int, what: str, write: Callable[[], None]) -> None:
    """Run `write` on rank 0 only, then let every rank know whether it failed.

    A plain barrier after a failed save would leave the other ranks waiting for a rank that is gone (until the
    process group's timeout, 30 minutes by default); this way they all stop at once, rank 0 with its own error.
    """
    error: Exception | None = None
    if dist.is_main:
        try:
            write()
        except Exception as exc:  # re-raised below, once the others know
            error = exc
    if dist.world_size > 1 and _any_rank(error is not None, device) and error is None:
        raise TrainingError(
            ErrorKind.UNAVAILABLE,
            "PEER_FAILED",
            f"rank 0 failed while writing {what} at step {step}; its error says why",
            step=step,
        )
    if error is not None:
        raise error


def _barrier(dist: DistInfo) -> None:
    if dist.world_size > 1:
        torch_dist.barrier()


def _sum_across(value: int, dist: DistInfo, device: torch.device) -> int:
    if dist.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch_dist.all_reduce(tensor)
    return int(tensor.item())


def _any_rank(flag: bool, device: torch.device) -> bool:
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return bool(tensor.item())
