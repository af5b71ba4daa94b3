"""The LoRA training recipe, written to be read top to bottom (in the manner of a torchtune recipe).

`run_training` builds a `LoRARecipe` and runs it. `LoRARecipe.setup()` does, in order: seeds; tokenizer and chat
template; open the dataset's token cache entry (tokenizing it once, on a miss) and split off the eval set; model +
LoRA; batch plan; optimizer and schedule; resume from the newest complete checkpoint (or, without one, a continued
job's source adapter). `LoRARecipe.train()` is the step loop (gradient accumulation, clipping, progress, eval, early
stopping, checkpoints, cancellation), then the final adapter and report.

Choices worth knowing:
- The loss of an optimizer step is the sum of token losses over the whole accumulation window divided by the number
  of trainable tokens in that window (the count is known before the forward passes, from the batch plan). So 2x2
  accumulation gives the same update as a batch of 4, whatever the lengths; a mean of per-micro-batch means does not.
- No host-device sync per micro-step: losses stay on the device and are read (one `.tolist()`) only at logging,
  eval and save points. A NaN is still pinned to its exact step.
- The data stream is a pure function of (seed, epoch): a checkpoint stores (epoch, batch index) and resume rebuilds
  the same plan and skips to it. With RNG, optimizer and scheduler restored too, a resumed run continues exactly
  like an uninterrupted one.
- The examples are memory-mapped from the token cache, shared by every job, retry, resume and rank with the same
  data, model and settings; under torchrun rank 0 builds a missing entry while the others wait, then they open it.
  Without a cache folder (`token_cache=None`) a temporary one lasts for the call.
- Several processes (torchrun): every optimizer step consumes one window of `grad_accum * world_size` planned
  micro-batches and rank r trains its r-th share, so N processes follow the same trajectory as one process with N
  times the accumulation. Only rank 0 reports and writes.
- With eval_probes or eval_generate_examples, an evaluation before the first step is the baseline the answers are
  compared with (never best, never counted by early stopping). Rank 0 generates, in eval mode and drawing no random
  numbers, so a job trains exactly as it would without them (`behaviour.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
from torch.nn import functional

from finetune_server import faults
from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.host.cpu_policy import available_cpus, cpu_set_note
from finetune_server.storage import layout
from finetune_server.training.config import TrainingConfig
from finetune_server.training.data import IGNORE_INDEX
from finetune_server.training.data.template import SOURCE_FALLBACK, save_tokenizer_files
from finetune_server.training.data.token_cache import CacheStopped, TokenCache
from finetune_server.training.data.token_table import TokenRow, empty_table
from finetune_server.training.engine import checkpoint as ckpt
from finetune_server.training.engine.batching import (
    Batch,
    collate,
    pass_overhead_tokens,
    plan_batches,
    split_for_padding,
)
from finetune_server.training.engine.behaviour import (
    BehaviourCheck,
    ProbeAnswer,
    ProbeComparison,
    StopTokens,
    compare_probes,
    held_out_examples,
    stop_tokens,
)
from finetune_server.training.engine.data_setup import (
    BatchPlan,
    CacheAccess,
    EncodedSet,
    TokenizerSetup,
    TrainingData,
    encode_file,
    load_tokenizer_and_template,
    split_eval,
)
from finetune_server.training.engine.distributed import (
    any_rank,
    barrier,
    dist_info,
    gather_objects,
    on_main_rank,
    pick_device,
    process_group_from_env,
    sum_across,
    sum_tensors_across,
    wrap_ddp,
)
from finetune_server.training.engine.errors import (
    TrainingCancelled,
    disk_full_as_error,
    out_of_memory_as_error,
    raise_if_not_finite,
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
from finetune_server.training.engine.optim import build_optimizer, build_scheduler
from finetune_server.training.engine.report import write_report

TOKENIZING_REPORT_S = 10.0  # how often tokenizing a dataset reports its progress


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
    probes: list[ProbeComparison] = field(default_factory=list)  # each probe's first and final answer


@dataclass
class TrainState:
    """Everything of the loop that a checkpoint must carry besides model, optimizer, scheduler and RNG."""

    step: int = 0
    position: ckpt.DataPosition = field(default_factory=lambda: ckpt.DataPosition(0, 0))
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", ...} and {"step", "eval_loss"}
    tokens_seen: int = 0
    elapsed_before_s: float = 0.0  # wall time of earlier attempts
    best_eval_loss: float | None = None
    best_eval_step: int | None = None  # its checkpoint outlives save_total_limit's rotation
    evals_without_improvement: int = 0
    last_logged_step: int = 0
    last_eval_step: int = -1
    last_saved_step: int = -1
    probes_before: list[dict[str, Any]] = field(default_factory=list)  # ProbeAnswer dicts of the step-0 evaluation
    probes_latest: list[dict[str, Any]] = field(default_factory=list)  # and of the newest one

    def to_extra(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "tokens_seen": self.tokens_seen,
            "elapsed_before_s": self.elapsed_before_s,
            "best_eval_loss": self.best_eval_loss,
            "best_eval_step": self.best_eval_step,
            "evals_without_improvement": self.evals_without_improvement,
            "last_logged_step": self.last_logged_step,
            "last_eval_step": self.last_eval_step,
            "probes_before": self.probes_before,
            "probes_latest": self.probes_latest,
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
            best_eval_step=extra.get("best_eval_step"),
            evals_without_improvement=int(extra.get("evals_without_improvement", 0)),
            last_logged_step=int(extra.get("last_logged_step", state.step)),
            last_eval_step=int(extra.get("last_eval_step", -1)),
            last_saved_step=state.step,
            probes_before=list(extra.get("probes_before", [])),
            probes_latest=list(extra.get("probes_latest", [])),
        )


@dataclass(frozen=True)
class PendingStep:
    """An optimizer step whose loss and grad norm are still on the device (read back together, see `_flush`)."""

    step: int
    loss: torch.Tensor  # this rank's share of the window's token-weighted mean loss
    learning_rate: float
    grad_norm: torch.Tensor
    epoch: float  # fractional epoch reached


@dataclass
class Attempt:
    """What this attempt measures and no checkpoint carries (earlier attempts' time and tokens are in TrainState)."""

    start_step: int
    started: float = field(default_factory=time.perf_counter)
    last_progress_time: float = 0.0
    progress_tokens: int = 0  # tokens since the last progress event (this rank)
    tokens: int = 0  # tokens of this attempt (this rank)
    stopped_early: bool = False
    pending: list[PendingStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.last_progress_time = self.started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass(frozen=True)
class LoopSettings:
    """The resolved config's numbers the loop uses, with their defaults applied once."""

    seed: int
    batch_size: int
    grad_accum: int
    max_length: int
    packing: bool
    eval_every: int
    save_every: int
    log_every: int
    patience: int
    max_grad_norm: float

    @classmethod
    def from_config(cls, config: TrainingConfig) -> LoopSettings:
        return cls(
            seed=int(config.seed or 0),
            batch_size=int(config.per_device_train_batch_size or 1),
            grad_accum=int(config.gradient_accumulation_steps or 1),
            max_length=int(config.max_length or 2048),
            packing=bool(config.packing),
            eval_every=int(config.eval_steps or 0),
            save_every=int(config.save_steps or 0),
            log_every=max(1, int(config.logging_steps or 1)),
            patience=int(config.early_stopping_patience or 0),
            max_grad_norm=float(config.max_grad_norm or 0.0),
        )


@dataclass
class ModelSetup:
    peft_model: Any  # what checkpoints and the final adapter save
    train_module: torch.nn.Module  # what the loop calls: the DDP wrapper with several processes, else `peft_model`
    ddp: Any | None
    trainable: list[torch.nn.Parameter]
    autocast: contextlib.AbstractContextManager[Any]
    scaler: torch.amp.GradScaler | None  # fp16 only

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable)


@dataclass(frozen=True)
class StepPlan:
    batches: BatchPlan
    batches_per_epoch: int
    window: int  # micro-batches per optimizer step, all ranks together
    total_steps: int
    eval_batches: list[list[int]]  # one pass over the eval set; rank r evaluates every world_size-th batch


@dataclass(frozen=True)
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: Any


@dataclass(frozen=True)
class Initialisation:
    """Where a fresh start takes its weights from: another job's adapter (and checkpoint, for its optimizer state),
    or, with neither, LoRA's own initialisation."""

    adapter_dir: Path | None = None
    optimizer_dir: Path | None = None


@dataclass(frozen=True)
class Resume:
    state: TrainState
    rng_states: dict[str, Any] | None  # restored just before the first step; None for a fresh start


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
    token_cache: TokenCache | None = None,
    init_adapter_dir: Path | None = None,
    init_optimizer_dir: Path | None = None,
) -> TrainingOutcome:
    """Train a LoRA adapter on a RESOLVED config; resume from `output_dir`'s newest complete checkpoint if any.

    Without a checkpoint of its own, a continued job (init_from_job) starts from the adapter in `init_adapter_dir`
    and, when given, the optimizer state of the checkpoint folder `init_optimizer_dir`.

    Raises TrainingCancelled when `should_stop()` turns True, TrainingError subclasses (NAN_LOSS, OUT_OF_MEMORY,
    NO_USABLE_EXAMPLES) and FinetuneError for bad inputs. Checkpoints already written are kept in every case.
    `model_ref` is a local folder or a hub id (downloaded into `hub_cache_dir`; `hub_offline` None: HF_HUB_OFFLINE).
    `token_cache` is where the tokenized dataset is kept (the data dir's); None: a temporary one for this call.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with process_group_from_env(), _cache_or_temporary(token_cache) as cache:
        recipe = LoRARecipe(
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
            token_cache=cache,
            init=Initialisation(init_adapter_dir, init_optimizer_dir),
        )
        try:
            recipe.setup()
            return recipe.train()
        finally:
            recipe.close()


@contextlib.contextmanager
def _cache_or_temporary(cache: TokenCache | None) -> Iterator[TokenCache]:
    if cache is not None:
        yield cache
        return
    folder = Path(tempfile.mkdtemp(prefix="finetune-token-cache-"))
    try:
        yield TokenCache(folder, max_bytes=None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class LoRARecipe:
    """One attempt at a training job: `setup()` builds everything, `train()` runs the steps and writes the adapter.

    Each `setup_*` step returns the one thing it builds; the loop's methods share state through `self.state`
    (what checkpoints carry) and `self.attempt` (what only this attempt measures).
    """

    model_dir: Path
    tokens: TokenizerSetup
    data: TrainingData
    model: ModelSetup
    plan: StepPlan
    behaviour: BehaviourCheck
    optim: Optimization
    state: TrainState
    attempt: Attempt

    def __init__(
        self,
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
        token_cache: TokenCache,
        init: Initialisation | None = None,
    ) -> None:
        self.config = config
        self.init = init or Initialisation()
        self.settings = LoopSettings.from_config(config)
        self.model_ref = model_ref
        self.dataset_path = dataset_path
        self.eval_dataset_path = eval_dataset_path
        self.output_dir = output_dir
        self.on_event = on_event
        self.should_stop = should_stop
        self.hub_cache_dir = hub_cache_dir
        self.hub_offline = hub_offline
        self.token_cache = token_cache
        self.dist = dist_info()
        self.log = structlog.get_logger(__name__).bind(job_id=job_id, rank=self.dist.rank)
        self.device = pick_device(device, self.dist)
        self._pass_overhead = pass_overhead_tokens(self.device.type)
        self._rng_to_restore: dict[str, Any] | None = None
        self._opened: list[EncodedSet] = []  # token cache entries to close at the end

    def close(self) -> None:
        """Give the token cache entries back (their leases keep eviction away while training reads them)."""
        for encoded in self._opened:
            encoded.table.close()
        self._opened.clear()

    # --- setup -------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        seed_everything(self.settings.seed)  # the eval split, LoRA init and dropout all follow config.seed
        self.model_dir = resolve_model_dir(self.model_ref, cache_dir=self.hub_cache_dir, offline=self.hub_offline)
        self.tokens = self.setup_tokenizer()
        self.data = self.setup_data()
        self.behaviour = self.setup_behaviour()
        # Model load, DDP wrap and checkpoint load allocate on the device too: an OOM there is as final as one in a
        # step (a retry would fail the same way), so it is the same typed error.
        with out_of_memory_as_error(
            lambda: 0, str(self.device), self.config, during="while loading the model, optimizer or checkpoint"
        ):
            self.model = self.setup_model()  # after the data, so data errors come before minutes of loading
            self.plan = self.setup_batch_plan()
            self.optim = self.setup_optimizer()
            resume = self.setup_resume()
        self.state, self._rng_to_restore = resume.state, resume.rng_states
        threads = torch.get_num_threads()
        self._say(
            LogLevel.INFO,
            f"training {len(self.data.train)} examples ({self.plan.batches_per_epoch} micro-batches per epoch) for "
            f"{self.plan.total_steps} steps; eval on {len(self.data.eval)} examples; on {self.device} with {threads} "
            f"CPU thread{'' if threads == 1 else 's'}{cpu_set_note()}",
        )

    def setup_tokenizer(self) -> TokenizerSetup:
        """The tokenizer and chat template (the model's own, the config's, or the ChatML fallback when allowed)."""
        tokens = load_tokenizer_and_template(self.model_dir, self.config)
        if tokens.template_source == SOURCE_FALLBACK:
            self._say(
                LogLevel.WARNING,
                "no chat template in the model: training with the ChatML fallback (saved with the adapter)",
            )
        return tokens

    def setup_data(self) -> TrainingData:
        """The dataset from the token cache; the eval set is the eval dataset, else a seeded fraction of it."""
        config = self.config
        train_set = self._encoded(self.dataset_path, "dataset")
        if train_set.truncated:
            self._say(
                LogLevel.WARNING,
                f"{train_set.truncated} examples were longer than max_length={self.settings.max_length} and truncated",
            )
        if train_set.unusable:
            self._say(
                LogLevel.WARNING,
                f"{train_set.unusable} examples lost every answer token to truncation and are skipped",
            )
        train, evals = train_set.table, empty_table()
        if self.eval_dataset_path is not None:
            evals = self._encoded(self.eval_dataset_path, "eval_dataset").table
        elif (config.eval_split or 0.0) > 0.0:
            if len(train) < 2:
                self._say(LogLevel.WARNING, "too few examples to split off an eval set: training without evaluation")
            else:
                train, evals = split_eval(train, float(config.eval_split or 0.0), self.settings.seed)
        return TrainingData(train, evals, truncated=train_set.truncated, unusable=train_set.unusable)

    def _encoded(self, path: Path, field_path: str) -> EncodedSet:
        """`path`'s token cache entry; under torchrun rank 0 builds it first while the others wait, then they open
        it. A stop request while tokenizing is a cancel."""
        access = CacheAccess(
            self.token_cache,
            processes=min(len(available_cpus()), torch.get_num_threads()),
            on_progress=self._tokenizing_progress(field_path),
            should_stop=self.should_stop,
            hub_cache_dir=self.hub_cache_dir,
        )
        opened: list[EncodedSet] = []
        try:
            on_main_rank(
                self.dist,
                self.device,
                0,
                f"the token cache of {field_path}",
                lambda: opened.append(encode_file(path, field_path, self.config, self.tokens, self.model_dir, access)),
            )
            if not self.dist.is_main:
                opened.append(encode_file(path, field_path, self.config, self.tokens, self.model_dir, access))
        except CacheStopped:
            checkpoints = ckpt.list_checkpoints(self.output_dir)
            raise TrainingCancelled(checkpoints[-1][0] if checkpoints else 0) from None
        encoded = opened[0]
        self._opened.append(encoded)
        cache, meta, suffix = (
            encoded.opened,
            encoded.opened.meta,
            "" if field_path == "dataset" else f" of {field_path}",
        )
        if cache.built:
            tokens = int(meta.get("trained_tokens", 0))
            self._say(
                LogLevel.INFO,
                f"tokenized {meta.get('rows_read', 0)} examples{suffix} into the token cache in {cache.seconds:.1f} s "
                f"({tokens / max(cache.seconds, 1e-9):.0f} tokens/s; key {cache.key})",
            )
        else:
            self._say(LogLevel.INFO, f"token cache hit: {cache.key} ({len(encoded.table)} examples{suffix})")
        return encoded

    def _tokenizing_progress(self, field_path: str) -> Callable[[float | None, int], None]:
        """A LogEvent every TOKENIZING_REPORT_S while a dataset is tokenized."""
        last = [time.perf_counter()]

        def report(fraction: float | None, rows: int) -> None:
            now = time.perf_counter()
            if now - last[0] < TOKENIZING_REPORT_S:
                return
            last[0] = now
            share = f" ({fraction:.0%})" if fraction is not None else ""
            self._say(LogLevel.INFO, f"tokenizing {field_path}: {rows} rows{share}")

        return report

    def setup_behaviour(self) -> BehaviourCheck:
        """The probes and held-out examples each evaluation answers greedily (none: no generation)."""
        config = self.config
        held_out = held_out_examples(self.data.eval, int(config.eval_generate_examples or 0))
        if config.eval_generate_examples and len(held_out) < config.eval_generate_examples:
            self._say(
                LogLevel.WARNING,
                f"eval_generate_examples is {config.eval_generate_examples} but the eval set has {len(held_out)} "
                "examples with a prompt to answer: generating on those",
            )
        generates = bool(config.eval_probes or held_out)  # reading the stop ids reads the tokenizer again
        return BehaviourCheck(
            probes=list(config.eval_probes),
            held_out=held_out,
            tokenizer=self.tokens.tokenizer,
            template=self.tokens.template,
            stop=stop_tokens(self.model_dir, self.tokens.template) if generates else StopTokens([], None),
            max_new_tokens=int(config.eval_max_new_tokens or 64),
        )

    def setup_model(self) -> ModelSetup:
        """The base model with LoRA on the device, wrapped for DDP with several processes, and its precision."""
        peft_model, _ = load_for_training(self.config, self.model_dir, device=self.device)
        faults.after_model_load()  # FINETUNE_FAULTS=oom_at_model_load=N (tests, chaos drills)
        # The adapter names its base as the caller did (a hub id, not this machine's cache path), for serving elsewhere.
        peft_model.peft_config["default"].base_model_name_or_path = str(self.model_ref)
        ddp = wrap_ddp(peft_model, self.dist, self.device)
        amp_dtype = compute_dtype(self.config, self.device)
        return ModelSetup(
            peft_model=peft_model,
            train_module=ddp or peft_model,
            ddp=ddp,
            trainable=[p for p in peft_model.parameters() if p.requires_grad],
            autocast=torch.autocast(device_type="cuda", dtype=amp_dtype)
            if amp_dtype != torch.float32
            else contextlib.nullcontext(),
            scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        )

    def setup_batch_plan(self) -> StepPlan:
        """Which micro-batches each step trains on (a pure function of (seed, epoch)), and how many steps."""
        s, config = self.settings, self.config
        batches = BatchPlan(
            self.data.lengths, batch_size=s.batch_size, packing=s.packing, max_length=s.max_length, seed=s.seed
        )
        window = s.grad_accum * self.dist.world_size
        batches_per_epoch = len(batches.epoch(0))
        if config.max_steps and config.max_steps > 0:
            total_steps = int(config.max_steps)
        else:
            total_steps = max(1, math.ceil(float(config.num_train_epochs or 1.0) * batches_per_epoch / window))
        eval_batches = (
            plan_batches(
                self.data.eval.lengths,
                batch_size=s.batch_size,
                packing=s.packing,
                max_length=s.max_length,
                seed=s.seed,
                epoch=0,
            )
            if len(self.data.eval)
            else []
        )
        return StepPlan(batches, batches_per_epoch, window, total_steps, eval_batches)

    def setup_optimizer(self) -> Optimization:
        """The optimizer and learning-rate schedule (linear warmup, then cosine / linear decay or constant)."""
        optimizer, warning = build_optimizer(self.config, self.model.trainable, self.device)
        if warning:
            self._say(LogLevel.WARNING, warning)
        return Optimization(optimizer, build_scheduler(self.config, optimizer, self.plan.total_steps))

    def setup_resume(self) -> Resume:
        """The newest complete checkpoint loaded into model, optimizer and scheduler, or a fresh state."""
        if self.dist.is_main:
            ckpt.remove_stale_temp(self.output_dir)
        barrier(self.dist)
        latest = ckpt.latest_checkpoint(self.output_dir)
        if latest is None:  # its own checkpoint always wins: a resumed continued job goes on from where it was
            self.setup_initial_weights()
            return Resume(TrainState(), None)
        loaded = ckpt.load_checkpoint(
            latest,
            model=self.model.peft_model,
            optimizer=self.optim.optimizer,
            scheduler=self.optim.scheduler,
            scaler=self.model.scaler,
        )
        state = TrainState.from_checkpoint(loaded)
        self._say(
            LogLevel.INFO,
            f"resumed from {latest.relative_to(self.output_dir)} (step {state.step} of {self.plan.total_steps})",
        )
        return Resume(state, ckpt.rng_states_for_rank(loaded.rng_states, self.dist.rank))

    def setup_initial_weights(self) -> None:
        """A continued job's start: the source adapter's weights in place of LoRA's initialisation, and its
        optimizer state when resume_optimizer found one (every rank loads the same files)."""
        init = self.init
        if init.adapter_dir is None:
            return
        try:
            ckpt.load_adapter_weights(self.model.peft_model, init.adapter_dir)
            if init.optimizer_dir is not None:
                ckpt.load_optimizer_moments(self.optim.optimizer, init.optimizer_dir)
        except (OSError, ValueError) as exc:
            raise FinetuneError(
                ErrorKind.FAILED_PRECONDITION,
                "INIT_ADAPTER_MISMATCH",
                f"the adapter of init_from_job cannot be loaded into this job's model: {exc}",
                hint="Continue a job with the same base model and LoRA shape (leave the lora fields unset).",
            ) from exc
        with_optimizer = " and its optimizer state" if init.optimizer_dir is not None else ""
        self._say(LogLevel.INFO, f"starting from the adapter {init.adapter_dir}{with_optimizer}")

    # --- the loop ----------------------------------------------------------------------------------------------------

    def train(self) -> TrainingOutcome:
        """The step loop, then the final adapter and report. Call `setup()` first."""
        self.attempt = Attempt(start_step=self.state.step)
        # RNG is restored last, after everything in setup that drew random numbers (LoRA init).
        if self._rng_to_restore is not None:
            ckpt.restore_rng_states(self._rng_to_restore, self.device)
        self.model.train_module.train()
        stream = self.plan.batches.stream(self.state.position)
        try:
            with out_of_memory_as_error(lambda: self.state.step + 1, str(self.device), self.config):
                if self.state.step == 0 and self.behaviour.enabled:
                    self._run_eval()  # the baseline the probes' and held-out answers are compared with
                while self.state.step < self.plan.total_steps and not self.attempt.stopped_early:
                    if self.dist.world_size > 1 and any_rank(self.should_stop(), self.device):
                        raise TrainingCancelled(self.state.step)
                    self._train_step([next(stream) for _ in range(self.plan.window)])
                    self._after_step()
                self._after_last_step()
        except TrainingCancelled:
            self._say(LogLevel.INFO, f"cancelled at step {self.state.step}")
            raise
        return self._finish()

    def _train_step(self, window: Sequence[tuple[ckpt.DataPosition, list[int]]]) -> None:
        """One optimizer step on this rank's share of `window`; its loss stays on the device until `_flush`."""
        window_loss = self._accumulate(window)
        learning_rate, grad_norm = self._optimizer_step()
        last = window[-1][0]
        state = self.state
        state.step += 1
        state.position = ckpt.DataPosition(last.epoch, last.batch_index + 1)
        state.tokens_seen += self.data.tokens_in([i for _, indices in window for i in indices])
        epoch_at = last.epoch + (last.batch_index + 1) / max(1, len(self.plan.batches.epoch(last.epoch)))
        self.attempt.pending.append(PendingStep(state.step, window_loss, learning_rate, grad_norm.detach(), epoch_at))

    def _accumulate(self, window: Sequence[tuple[ckpt.DataPosition, list[int]]]) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; returns its share of the window's mean token loss."""
        rank, grad_accum = self.dist.rank, self.settings.grad_accum
        mine = window[rank * grad_accum : (rank + 1) * grad_accum]
        # Trainable tokens of the whole window (all ranks): known from the plan, no communication needed.
        window_tokens = max(1, self.data.trainable_in([i for _, indices in window for i in indices]))
        window_loss = torch.zeros((), device=self.device)
        passes = [part for _, indices in mine for part in self._passes(indices)]
        for k, rows in enumerate(passes):
            if self.dist.world_size == 1 and self.should_stop():
                raise TrainingCancelled(self.state.step)
            batch = collate(
                rows,
                packing=self.settings.packing,
                pad_token_id=self.tokens.pad_token_id,
                max_length=self.settings.max_length,
            )
            loss_sum = self._forward_backward(batch, window_tokens, sync_grads=k == len(passes) - 1)
            window_loss += loss_sum.detach() / window_tokens
            self.attempt.progress_tokens += batch.num_tokens
            self.attempt.tokens += batch.num_tokens
        return window_loss

    def _passes(self, indices: Sequence[int]) -> list[list[TokenRow]]:
        """One micro-batch's rows as forward passes: packed rows as they are, padded ones regrouped where padding
        would waste more than another pass costs (`split_for_padding`)."""
        rows = self.data.train.rows(indices)
        if self.settings.packing or len(rows) == 1:
            return [rows]
        groups = split_for_padding([len(r.input_ids) for r in rows], overhead_tokens=self._pass_overhead)
        return [[rows[i] for i in group] for group in groups]

    def _forward_backward(self, batch: Batch, window_tokens: int, *, sync_grads: bool) -> torch.Tensor:
        """Backpropagate one micro-batch's share of the window loss; returns its token loss sum."""
        model = self.model
        gpu_batch = batch.to(self.device, non_blocking=True)
        # DDP syncs gradients on the window's last micro-batch only.
        sync = model.ddp.no_sync() if model.ddp is not None and not sync_grads else contextlib.nullcontext()
        with sync:
            with model.autocast:
                faults.before_forward(self.state.step + 1)  # FINETUNE_FAULTS=oom_at_step=N (tests, chaos drills)
                logits = model.train_module(**gpu_batch.model_inputs(include_labels=False)).logits
            loss_sum = token_loss_sum(logits, gpu_batch.labels)
            # DDP averages gradients over ranks; scaling by world_size turns that into the window's token sum.
            loss = loss_sum * (self.dist.world_size / window_tokens)
            if model.scaler is not None:
                model.scaler.scale(loss).backward()
            else:
                loss.backward()
        return loss_sum

    def _optimizer_step(self) -> tuple[float, torch.Tensor]:
        """Clip, step and advance the schedule; returns the step's learning rate and its norm before clipping."""
        scaler, optimizer, scheduler = self.model.scaler, self.optim.optimizer, self.optim.scheduler
        if scaler is not None:
            scaler.unscale_(optimizer)
        max_norm = self.settings.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.trainable, max_norm if max_norm > 0 else float("inf"))
        learning_rate = float(scheduler.get_last_lr()[0])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return learning_rate, grad_norm

    def _after_step(self) -> None:
        """Progress, eval and checkpoint at their cadence (the last step's are done by `_after_last_step`)."""
        step, total, s = self.state.step, self.plan.total_steps, self.settings
        if step % s.log_every == 0 or step == total:
            self._report_progress()
        if self._evaluates and s.eval_every and step % s.eval_every == 0 and step < total:
            self._flush()
            self._run_eval()
        if s.save_every and step % s.save_every == 0 and step < total and not self.attempt.stopped_early:
            self._save_checkpoint()

    def _after_last_step(self) -> None:
        """Whatever the last step (or early stopping) left unreported, unevaluated or unsaved."""
        state = self.state
        self._flush()
        if state.last_logged_step < state.step and any(r["step"] > state.last_logged_step for r in state.history):
            self._report_progress()
        if self._evaluates and state.last_eval_step != state.step:
            self._run_eval()
        if state.last_saved_step != state.step:
            self._save_checkpoint()

    # --- reading losses, evaluation, early stopping, checkpoints, progress -------------------------------------------

    def _flush(self) -> None:
        """Read pending step losses to the host (one sync), fail on NaN/inf, append them to the history."""
        pending = self.attempt.pending
        if not pending:
            return
        losses = torch.stack([p.loss for p in pending])
        norms = torch.stack([p.grad_norm for p in pending])
        sum_tensors_across(self.dist, losses)  # each rank holds its share of the window's token-weighted mean
        for p, loss, norm in zip(pending, losses.tolist(), norms.tolist(), strict=True):
            raise_if_not_finite(loss, step=p.step, learning_rate=p.learning_rate)
            self.state.history.append(
                {"step": p.step, "loss": loss, "learning_rate": p.learning_rate, "grad_norm": norm, "epoch": p.epoch}
            )
        pending.clear()

    def _eval_loss(self) -> float:
        """The token-weighted mean loss over the eval set (each rank its share, summed).

        Through the bare model, not the DDP wrapper: DDP's forward broadcasts buffers (a collective), and a rank
        with fewer eval batches than the others (or none) would leave them waiting in it forever.
        """
        module, dev = self.model.peft_model, self.device
        module.eval()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        count = torch.zeros((), device=dev, dtype=torch.float64)
        with torch.no_grad(), self.model.autocast:
            for indices in self.plan.eval_batches[self.dist.rank :: self.dist.world_size]:
                batch = collate(
                    self.data.eval.rows(indices),
                    packing=self.settings.packing,
                    pad_token_id=self.tokens.pad_token_id,
                    max_length=self.settings.max_length,
                )
                batch = batch.to(dev, non_blocking=True)
                logits = module(**batch.model_inputs(include_labels=False)).logits
                loss_sum += token_loss_sum(logits, batch.labels).double()
                count += batch.num_trainable
        sum_tensors_across(self.dist, loss_sum, count)
        self.model.train_module.train()
        return float(loss_sum.item() / max(1.0, count.item()))

    @property
    def _evaluates(self) -> bool:
        """Whether the job evaluates at all: an eval set to score, or probes to answer."""
        return bool(self.plan.eval_batches) or bool(self.behaviour.probes)

    def _run_eval(self) -> None:
        """Evaluate (the loss on the eval set, then greedy answers), report, and stop early after `patience`
        evaluations without improvement. The evaluation at step 0 is a baseline: never best, never counted."""
        state, patience = self.state, self.settings.patience
        eval_loss = self._eval_loss() if self.plan.eval_batches else math.nan
        metrics, probes = self._behaviour()
        is_best = state.step > 0 and math.isfinite(eval_loss)
        if is_best and state.best_eval_loss is not None and eval_loss >= state.best_eval_loss:
            is_best = False
            state.evals_without_improvement += 1
        elif is_best:
            state.best_eval_loss = eval_loss
            state.best_eval_step = state.step
            state.evals_without_improvement = 0
        state.last_eval_step = state.step
        if math.isfinite(eval_loss):
            state.history.append({"step": state.step, "eval_loss": eval_loss})
        if metrics:
            state.history.append({"step": state.step, **metrics})
        answers = [dataclasses.asdict(answer) for answer in probes]
        if answers:
            state.probes_latest = answers
            if state.step == 0:
                state.probes_before = answers
        self._emit(EvalEvent(state.step, eval_loss, _perplexity(eval_loss), is_best, metrics, probes))
        self.log.info("eval", step=state.step, eval_loss=eval_loss, is_best=is_best, **metrics)
        if patience and state.evals_without_improvement >= patience:
            self.attempt.stopped_early = True
            self._say(
                LogLevel.INFO, f"early stopping at step {state.step}: no eval improvement in {patience} evaluations"
            )

    def _behaviour(self) -> tuple[dict[str, float], list[ProbeAnswer]]:
        """Greedy answers of the model being trained (rank 0 only: the others wait; the bare model, never the DDP
        wrapper, whose forward is a collective), in eval mode and without gradients, then back to training."""
        found: list[tuple[dict[str, float], list[ProbeAnswer]]] = []
        if not self.behaviour.enabled:
            return {}, []
        module = self.model.peft_model

        def answer() -> None:
            module.eval()
            try:
                with torch.no_grad(), self.model.autocast:
                    found.append(self.behaviour.run(module))
            finally:
                self.model.train_module.train()

        on_main_rank(self.dist, self.device, self.state.step, "the behaviour evaluation", answer)
        return found[0] if found else ({}, [])

    def _save_checkpoint(self) -> None:
        self._flush()  # never save weights that a NaN already spoiled
        # Each rank's own generators (dropout draws differ by rank): rank 0 writes them all, each resumes its own.
        rng_states = gather_objects(self.dist, ckpt.capture_rng_states(self.device))
        on_main_rank(
            self.dist, self.device, self.state.step, "the checkpoint", lambda: self._write_checkpoint(rng_states)
        )
        self.state.last_saved_step = self.state.step

    def _write_checkpoint(self, rng_states: list[dict[str, Any]]) -> None:
        state, output_dir = self.state, self.output_dir
        with disk_full_as_error(
            state.step,
            "the checkpoint",
            output_dir,
            self.config,
            trainable_parameters=self.model.trainable_parameters,
        ):
            path = ckpt.save_checkpoint(
                output_dir,
                state.step,
                model=self.model.peft_model,
                optimizer=self.optim.optimizer,
                scheduler=self.optim.scheduler,
                rng_states=rng_states,
                data_position=state.position,
                extra={**state.to_extra(), "elapsed_before_s": state.elapsed_before_s + self.attempt.elapsed()},
                scaler=self.model.scaler,
            )
        ckpt.prune(output_dir, int(self.config.save_total_limit or 0), best_step=state.best_eval_step)
        self._emit(CheckpointEvent(state.step, str(path.relative_to(output_dir)), ckpt.folder_size(path)))

    def _report_progress(self) -> None:
        """One progress event for the steps since the previous one (a collective: every rank calls it)."""
        self._flush()
        state, attempt, total_steps = self.state, self.attempt, self.plan.total_steps
        tokens = sum_across(attempt.progress_tokens, self.dist, self.device)
        now = time.perf_counter()
        window_rows = _rows_since(state.history, state.last_logged_step)
        last = window_rows[-1]
        done_this_attempt = state.step - attempt.start_step
        elapsed_here = now - attempt.started
        eta = elapsed_here / done_this_attempt * (total_steps - state.step) if done_this_attempt else None
        self._emit(
            ProgressEvent(
                step=state.step,
                total_steps=total_steps,
                epoch=last["epoch"],
                loss=sum(r["loss"] for r in window_rows) / len(window_rows),
                learning_rate=last["learning_rate"],
                grad_norm=last["grad_norm"],
                tokens_per_second=tokens / max(now - attempt.last_progress_time, 1e-9),
                elapsed_s=state.elapsed_before_s + elapsed_here,
                eta_s=eta,
                memory=read_device_memory(self.device),
                tokens_seen=state.tokens_seen,
            )
        )
        state.last_logged_step = state.step
        attempt.progress_tokens = 0
        attempt.last_progress_time = now

    # --- the final adapter and report --------------------------------------------------------------------------------

    def _finish(self) -> TrainingOutcome:
        """The final adapter, with the tokenizer files and the exact chat template trained with; then the report."""
        runtime = self.attempt.elapsed()
        state = self.state
        final_train_loss = _final_window_loss([r for r in state.history if "loss" in r], self.settings.log_every)
        eval_rows = [r for r in state.history if "eval_loss" in r]
        final_eval_loss = eval_rows[-1]["eval_loss"] if eval_rows else None
        metrics = self._final_metrics(runtime, final_train_loss, final_eval_loss)
        probes = compare_probes(state.probes_before, state.probes_latest)
        adapter_dir = layout.JobDir(self.output_dir).adapter
        on_main_rank(
            self.dist,
            self.device,
            state.step,
            "the final adapter",
            lambda: self._write_adapter(adapter_dir, metrics, probes),
        )
        self.log.info("training finished", steps=state.step, final_train_loss=final_train_loss, runtime_s=runtime)
        return TrainingOutcome(
            final_train_loss=final_train_loss,
            final_eval_loss=final_eval_loss,
            steps=state.step,
            trained_tokens=state.tokens_seen,
            train_runtime_s=state.elapsed_before_s + runtime,
            metrics=metrics,
            adapter_dir=adapter_dir,
            stopped_early=self.attempt.stopped_early,
            probes=probes,
        )

    def _final_metrics(
        self, runtime: float, final_train_loss: float, final_eval_loss: float | None
    ) -> dict[str, float]:
        """metrics.json (a collective: the token count is summed over ranks)."""
        state, data = self.state, self.data
        train_rows = [r for r in state.history if "loss" in r]
        metrics: dict[str, float] = {
            "train_runtime_s": state.elapsed_before_s + runtime,
            "train_tokens_per_second": sum_across(self.attempt.tokens, self.dist, self.device) / max(runtime, 1e-9),
            "train_examples": float(len(data.train)),
            "eval_examples": float(len(data.eval)),
            "truncated_examples": float(data.truncated),
            "skipped_examples": float(data.unusable),
            "total_steps": float(self.plan.total_steps),
            "steps": float(state.step),
            "epochs": train_rows[-1]["epoch"] if train_rows else 0.0,
            "tokens_seen": float(state.tokens_seen),
            "final_train_loss": final_train_loss,
            "trainable_parameters": float(self.model.trainable_parameters),
        }
        if final_eval_loss is not None:
            metrics["final_eval_loss"] = final_eval_loss
            metrics["eval_perplexity"] = _perplexity(final_eval_loss)
        if state.best_eval_loss is not None:
            metrics["best_eval_loss"] = state.best_eval_loss
        generated = [r for r in state.history if "exact_match" in r]
        if generated:  # the last evaluation's held-out generation
            metrics["final_exact_match"] = generated[-1]["exact_match"]
            metrics["final_token_accuracy"] = generated[-1]["token_accuracy"]
        if any(p.expected.strip() for p in self.behaviour.probes):
            for when, answers in (("before", state.probes_before), ("after", state.probes_latest)):
                metrics[f"probes_exact_{when}"] = float(sum(bool(a["exact_match"]) for a in answers))
        return metrics

    def _write_adapter(self, adapter_dir: Path, metrics: dict[str, float], probes: list[ProbeComparison]) -> None:
        with disk_full_as_error(
            self.state.step,
            "the final adapter",
            self.output_dir,
            self.config,
            trainable_parameters=self.model.trainable_parameters,
        ):
            save_adapter(self.model.peft_model, adapter_dir, self.model_dir, self.tokens.template)
            report = {**metrics, "probes": [dataclasses.asdict(p) for p in probes]} if probes else metrics
            write_report(self.output_dir, metrics=report, history=self.state.history)

    # --- reporting ---------------------------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if self.dist.is_main:
            self.on_event(event)

    def _say(self, level: LogLevel, message: str) -> None:
        getattr(self.log, level.value)(message)
        self._emit(LogEvent(level, message))


# --- helpers ---------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions, in fp32."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def save_adapter(peft_model: Any, adapter_dir: Path, model_dir: Path, template: str) -> None:
    """Write the adapter folder atomically: weights, tokenizer files and the chat template trained with."""
    staging = Path(tempfile.mkdtemp(dir=adapter_dir.parent, prefix=f".tmp-{adapter_dir.name}-"))
    try:
        peft_model.save_pretrained(staging, safe_serialization=True)
        save_tokenizer_files(model_dir, staging, template)
        ckpt.publish_dir(staging, adapter_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _rows_since(history: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """The training rows (with a loss) after `step`, oldest first, read from the end: the history grows with the run
    and a progress event must not cost more at step 10,000 than at step 10."""
    rows: list[dict[str, Any]] = []
    for row in reversed(history):
        if row["step"] <= step:
            break
        if "loss" in row:
            rows.append(row)
    return rows[::-1]


def _final_window_loss(rows: list[dict[str, Any]], log_every: int) -> float:
    if not rows:
        return float("nan")
    window = rows[-log_every:]
    return float(sum(r["loss"] for r in window) / len(window))


def _perplexity(loss: float) -> float:
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else float("inf")
