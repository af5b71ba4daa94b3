"""ValidateConfig's logic, used unchanged by Train: every problem of a config, all at once.

Order: preset + defaults, static field rules, the model (config and tokenizer files only, never weights), the
dataset(s) record by record with the model's tokenizer and chat template, the memory estimate, then warnings that do
not block. Nothing here imports torch: it runs on the server's RPC path (`datasets` only for save_to_disk folders
and hub datasets).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from finetune_server.errors import ConfigWarning, ErrorKind, FinetuneError, Violation, ViolationList
from finetune_server.host.devices import Device, detect_devices
from finetune_server.settings import ServerSettings
from finetune_server.training import continuation
from finetune_server.training.config import (
    DATA_FORMATS,
    LR_SCHEDULERS,
    MAX_EVAL_GENERATE_EXAMPLES,
    MAX_EVAL_NEW_TOKENS,
    MAX_EVAL_PROBES,
    MAX_PROBE_CHARS,
    OPTIMIZERS,
    TrainingConfig,
    resolve,
)
from finetune_server.training.data import (
    DatasetReport,
    Message,
    TemplateError,
    TextTokenizer,
    check_dataset,
    choose_chat_template,
    encode_prompt,
    load_tokenizer,
    render,
)
from finetune_server.training.data.checks import (
    MAX_WARNINGS,
    SAMPLE,
    TOKEN_CACHE,
    CheckStopped,
    TokenStats,
    answer_truncated,
)
from finetune_server.training.data.sources import FILE, HUB, SAVED, DatasetSource, field_of
from finetune_server.training.data.template import SOURCE_FALLBACK
from finetune_server.training.data.token_cache import TokenCache, cache_key, read_meta
from finetune_server.training.dataset_source import resolve_dataset
from finetune_server.training.memory import MemoryEstimate, estimate_memory
from finetune_server.training.model_info import ModelSummary, summarize_model
from finetune_server.training.model_source import ResolvedModel, resolve_model
from finetune_server.training.presets import NAMED_DEVICES, get_preset
from finetune_server.training.vllm_rules import lora_serving_problems

log = structlog.get_logger(__name__)

# When several kinds of problem occur, the status of the rejection is the first kind present in this order.
_KIND_PRECEDENCE = (
    ErrorKind.PERMISSION_DENIED,
    ErrorKind.UNAVAILABLE,
    ErrorKind.FAILED_PRECONDITION,
    ErrorKind.NOT_FOUND,
    ErrorKind.INVALID_ARGUMENT,
)


@dataclass
class ValidationReport:
    valid: bool
    violations: list[Violation]
    warnings: list[ConfigWarning]
    resolved_config: TrainingConfig
    preset_filled_fields: list[str]
    model: ModelSummary | None = None
    dataset: DatasetReport | None = None
    eval_dataset: DatasetReport | None = None
    memory_estimate: MemoryEstimate | None = None
    error_kind: ErrorKind | None = None  # the status a rejection gets; None when valid

    def rejection(self) -> FinetuneError:
        """The error Train raises for this report (ValidateConfig raises it too, with the report attached)."""
        first = self.violations[0]
        more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        line = f" line {first.line}:" if first.line else ""
        where = f" {first.field}:" if first.field else ""  # no field: the config as a whole
        return FinetuneError(
            self.error_kind or ErrorKind.INVALID_ARGUMENT,
            "INVALID_CONFIG",
            f"the training config is not valid:{where}{line} {first.message}{more}",
            violations=self.violations,
        )


@dataclass
class _Collector:
    violations: ViolationList = field(default_factory=ViolationList)
    warnings: list[ConfigWarning] = field(default_factory=list)
    kinds: set[ErrorKind] = field(default_factory=set)

    def violation(self, path: str, reason: str, message: str, kind: ErrorKind = ErrorKind.INVALID_ARGUMENT) -> None:
        self.violations.add(path, reason, message)
        self.kinds.add(kind)

    def from_error(self, error: FinetuneError, path: str) -> None:
        items = error.violations or [Violation(path, error.reason, error.message)]
        self.violations.items.extend(items)
        self.kinds.add(error.kind)

    def warn(self, path: str, reason: str, message: str) -> None:
        self.warnings.append(ConfigWarning(path, reason, message))


def _check_ranges(c: TrainingConfig, out: _Collector) -> None:
    def need(ok: bool, path: str, message: str, reason: str = "OUT_OF_RANGE") -> None:
        if not ok:
            out.violation(path, reason, message)

    need(bool(c.model_name.strip()), "model_name", "is required: a hub id or a local model folder", "REQUIRED")
    need(bool(c.dataset.strip()), "dataset", "is required: a dataset path or an uploaded dataset id", "REQUIRED")
    need(c.data_format in DATA_FORMATS, "data_format", f"must be one of {', '.join(DATA_FORMATS)}", "INVALID_VALUE")
    need(1 <= (c.max_length or 0) <= 1 << 20, "max_length", f"must be between 1 and 1048576, got {c.max_length}")
    need((c.max_steps or 0) >= 0, "max_steps", f"must be >= 0, got {c.max_steps}")
    if not c.max_steps:
        need((c.num_train_epochs or 0) > 0, "num_train_epochs", "must be > 0 when max_steps is 0")
    lr = c.learning_rate or 0
    need(0 < lr <= 1, "learning_rate", f"must be in (0, 1], got {c.learning_rate}")
    need(
        c.lr_scheduler_type in LR_SCHEDULERS,
        "lr_scheduler_type",
        f"must be one of {', '.join(LR_SCHEDULERS)}",
        "INVALID_VALUE",
    )
    need(0 <= (c.warmup_ratio or 0) < 1, "warmup_ratio", f"must be in [0, 1), got {c.warmup_ratio}")
    need((c.weight_decay or 0) >= 0, "weight_decay", f"must be >= 0, got {c.weight_decay}")
    need((c.max_grad_norm or 0) >= 0, "max_grad_norm", f"must be >= 0 (0 disables clipping), got {c.max_grad_norm}")
    need(
        1 <= (c.per_device_train_batch_size or 0) <= 4096,
        "per_device_train_batch_size",
        f"must be between 1 and 4096, got {c.per_device_train_batch_size}",
    )
    need(
        1 <= (c.gradient_accumulation_steps or 0) <= 4096,
        "gradient_accumulation_steps",
        f"must be between 1 and 4096, got {c.gradient_accumulation_steps}",
    )
    need(c.optim in OPTIMIZERS, "optim", f"must be one of {', '.join(OPTIMIZERS)}", "INVALID_VALUE")
    need((c.seed or 0) >= 0, "seed", f"must be >= 0, got {c.seed}")
    need(0 <= (c.eval_split or 0) <= 0.5, "eval_split", f"must be in [0, 0.5], got {c.eval_split}")
    for name in ("eval_steps", "save_steps", "save_total_limit", "logging_steps", "early_stopping_patience"):
        value = getattr(c, name)
        need((value or 0) >= 0, name, f"must be >= 0, got {value}")
    for first, second in (("load_in_8bit", "load_in_4bit"), ("fp16", "bf16")):
        if getattr(c, first) and getattr(c, second):
            message = f"{first} and {second} cannot both be true: choose one"
            out.violation(first, "MUTUALLY_EXCLUSIVE", message)
            out.violation(second, "MUTUALLY_EXCLUSIVE", message)
    has_eval = bool(c.eval_split) or bool(c.eval_dataset)
    if (c.early_stopping_patience or 0) > 0 and not has_eval:
        out.violation(
            "early_stopping_patience",
            "EVAL_DATA_REQUIRED",
            "early stopping needs evaluation data: set eval_split or eval_dataset",
        )
    if (c.eval_steps or 0) > 0 and not has_eval and not c.eval_probes:
        out.warn("eval_steps", "NO_EVAL_DATA", "eval_steps is set but there is no eval_split or eval_dataset")
    _check_behaviour_eval(c, has_eval, out)
    lora = c.lora
    need(1 <= (lora.r or 0) <= 1024, "lora.r", f"must be between 1 and 1024, got {lora.r}")
    need((lora.alpha or 0) > 0, "lora.alpha", f"must be > 0, got {lora.alpha}")
    need(0 <= (lora.dropout or 0) < 1, "lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    for i, name in enumerate(lora.target_modules):
        need(bool(name.strip()), f"lora.target_modules[{i}]", "must not be empty", "INVALID_VALUE")


def _check_behaviour_eval(c: TrainingConfig, has_eval: bool, out: _Collector) -> None:
    """The bounds of held-out generation and probes: what each evaluation generates stays small and fits an event."""
    examples = c.eval_generate_examples or 0
    if not 0 <= examples <= MAX_EVAL_GENERATE_EXAMPLES:
        out.violation(
            "eval_generate_examples",
            "OUT_OF_RANGE",
            f"must be between 0 (off) and {MAX_EVAL_GENERATE_EXAMPLES}, got {examples}",
        )
    elif examples and not has_eval:
        out.violation(
            "eval_generate_examples",
            "EVAL_DATA_REQUIRED",
            "generating on held-out examples needs evaluation data: set eval_split or eval_dataset",
        )
    elif examples and c.train_on_prompt:
        out.violation(
            "eval_generate_examples",
            "NEEDS_ANSWER_ONLY_LOSS",
            "with train_on_prompt the prompt is trained too, so an example's answer cannot be told from its prompt: "
            "set train_on_prompt false to generate on held-out examples",
        )
    new_tokens = c.eval_max_new_tokens or 0
    if not 1 <= new_tokens <= MAX_EVAL_NEW_TOKENS:
        out.violation(
            "eval_max_new_tokens", "OUT_OF_RANGE", f"must be between 1 and {MAX_EVAL_NEW_TOKENS}, got {new_tokens}"
        )
    if len(c.eval_probes) > MAX_EVAL_PROBES:
        out.violation(
            "eval_probes", "TOO_MANY", f"at most {MAX_EVAL_PROBES} probes are answered, got {len(c.eval_probes)}"
        )
        return
    for i, probe in enumerate(c.eval_probes):
        if not probe.prompt.strip():
            out.violation(f"eval_probes[{i}].prompt", "REQUIRED", "a probe needs a prompt (its user message)")
        for name in ("prompt", "expected"):
            length = len(getattr(probe, name))
            if length > MAX_PROBE_CHARS:
                out.violation(
                    f"eval_probes[{i}].{name}",
                    "TOO_LONG",
                    f"must be at most {MAX_PROBE_CHARS} characters, got {length}",
                )


def _check_probe_tokens(
    c: TrainingConfig, tokenizer: TextTokenizer, template: str, context: int, out: _Collector
) -> None:
    """Each probe's rendered prompt with eval_max_new_tokens must fit the model's context."""
    new_tokens = c.eval_max_new_tokens or 0
    for i, probe in enumerate(c.eval_probes[:MAX_EVAL_PROBES]):
        if not probe.prompt.strip() or len(probe.prompt) > MAX_PROBE_CHARS:
            continue  # reported by _check_behaviour_eval
        try:
            tokens = len(encode_prompt([Message("user", probe.prompt)], tokenizer, template))
        except TemplateError as exc:
            out.violation(f"eval_probes[{i}].prompt", "TEMPLATE_FAILED", str(exc))
            continue
        if tokens + new_tokens > context:
            out.violation(
                f"eval_probes[{i}].prompt",
                "PROMPT_TOO_LONG",
                f"the prompt is {tokens} tokens; with eval_max_new_tokens {new_tokens} that is more than the model's "
                f"context of {context} tokens",
            )


def _check_device_support(raw: TrainingConfig, c: TrainingConfig, out: _Collector) -> None:
    devices = detect_devices()
    gpus = [d for d in devices if d.name.startswith("cuda")]
    for flag, supported, what in (
        ("bf16", any(d.bf16_supported for d in gpus), "a GPU with bfloat16 support (compute capability 8.0+)"),
        ("fp16", bool(gpus), "a CUDA GPU"),
    ):
        if getattr(c, flag) and not supported:
            message = f"{flag} needs {what}; this server has none (training runs in fp32 on the CPU)"
            if getattr(raw, flag):  # asked for explicitly: refuse; filled by a preset: advise
                out.violation(flag, "UNSUPPORTED_ON_DEVICE", message)
            else:
                out.warn(flag, "UNSUPPORTED_ON_DEVICE", f"the preset sets it, but {message}; it will be ignored")
    if c.load_in_8bit or c.load_in_4bit:
        path = "load_in_8bit" if c.load_in_8bit else "load_in_4bit"
        if importlib.util.find_spec("bitsandbytes") is None:
            message = "needs bitsandbytes, which is not installed on this server"
            if getattr(raw, path):  # asked for explicitly: refuse; filled by a preset: train unquantized
                out.violation(path, "QUANTIZATION_UNAVAILABLE", message)
            else:
                out.warn(path, "QUANTIZATION_UNAVAILABLE", f"the preset sets it, but it {message}; it is turned off")
                setattr(c, path, False)
    if c.optim == "paged_adamw_8bit" and not gpus:
        out.warn("optim", "OPTIMIZER_FALLBACK", "paged_adamw_8bit needs CUDA; adamw_torch will be used on the CPU")


def _check_vllm(c: TrainingConfig, summary: ModelSummary | None, out: _Collector) -> None:
    """Warn with export's rule (vllm_rules), for the adapter training will write: its targets are the config's, or
    every linear module of the model (unknown for an architecture the service does not describe)."""
    targets = c.lora.target_modules or (summary.linear_modules if summary else []) or None
    problems = lora_serving_problems(
        r=c.lora.r, use_dora=bool(c.lora.use_dora), modules_to_save=c.lora.modules_to_save, target_modules=targets
    )
    for problem in problems:
        out.warn(problem.field, problem.reason, problem.message)


@functools.lru_cache(maxsize=16)
def _tokenizer_for(model_dir: str, stamp: float) -> TextTokenizer:  # stamp: reload when tokenizer.json changes
    return load_tokenizer(Path(model_dir))


def _fit_max_length(raw: TrainingConfig, c: TrainingConfig, positions: int, out: _Collector) -> None:
    """A max_length beyond the model's positions: the caller's own is an error; one a preset or the defaults chose
    is capped (with a warning saying so), because a default the caller never wrote must not make its config invalid."""
    if not positions or (c.max_length or 0) <= positions:
        return
    if raw.max_length is not None:
        out.violation("max_length", "OUT_OF_RANGE", f"{c.max_length} exceeds the model's {positions} positions")
        return
    source = f"the {raw.preset} preset's" if raw.preset else "the default"
    out.warn(
        "max_length",
        "MAX_LENGTH_CAPPED",
        f"{source} max_length {c.max_length} exceeds the model's {positions} positions: capped at {positions}",
    )
    c.max_length = positions


def _model_step(
    raw: TrainingConfig, c: TrainingConfig, settings: ServerSettings, out: _Collector
) -> tuple[ResolvedModel, ModelSummary]:
    resolved = resolve_model(c.model_name, settings, "model_name")
    summary = summarize_model(resolved)
    _fit_max_length(raw, c, summary.max_position_embeddings, out)
    if summary.linear_modules:
        missing = [m for m in c.lora.target_modules if m not in summary.linear_modules]
        if missing:
            out.violation(
                "lora.target_modules",
                "TARGET_MODULES_NOT_FOUND",
                f"{', '.join(missing)} not in the model; it has {', '.join(summary.linear_modules)}",
            )
    elif c.lora.target_modules:
        out.warn("lora.target_modules", "UNCHECKED", f"cannot check target modules of {summary.model_type!r} models")
    return resolved, summary


def _template_step(c: TrainingConfig, model_dir: Path, out: _Collector) -> str | None:
    try:
        template, source = choose_chat_template(model_dir, c.chat_template, bool(c.allow_fallback_chat_template))
    except TemplateError as exc:
        out.violation("allow_fallback_chat_template", "NO_CHAT_TEMPLATE", f"{exc}: set chat_template or allow it")
        return None
    if source == SOURCE_FALLBACK:
        out.warn("chat_template", "FALLBACK_CHAT_TEMPLATE", "the tokenizer has no chat template; ChatML is used")
    try:
        render(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    except TemplateError as exc:
        out.violation("chat_template", "TEMPLATE_ERROR", f"the chat template does not render: {exc}")
        return None
    return template


@dataclass(frozen=True)
class CheckHooks:
    """How a caller follows the dataset checks of a validation: `on_progress(field, records, estimated_total)` every
    few hundred records, and `should_stop()`, polled as often, which ends the validation with CheckStopped."""

    should_stop: Callable[[], bool] = lambda: False
    on_progress: Callable[[str, int, int | None], None] | None = None


@dataclass(frozen=True)
class _Encoding:
    """How this validation tokenizes examples: the model's tokenizer and chat template, and the model folder they
    come from (the token cache's key names its tokenizer files). None when they could not be read."""

    tokenizer: TextTokenizer | None = None
    template: str | None = None
    model_dir: Path | None = None


# key -> (the tokenizer, kept alive so its id in the key cannot be reused, the report)
_DATASET_REPORTS: OrderedDict[tuple[Any, ...], tuple[TextTokenizer | None, DatasetReport]] = OrderedDict()
_DATASET_REPORTS_LOCK = threading.Lock()
_DATASET_REPORTS_MAX = 32


def _token_cache_meta(
    source: DatasetSource, c: TrainingConfig, settings: ServerSettings, encoding: _Encoding
) -> dict[str, Any] | None:
    """The figures of the token cache entry a job built from exactly this data and encoding, when there is one
    whose every record rendered (template errors have no row numbers there: those need the full check)."""
    if encoding.template is None or encoding.model_dir is None or encoding.tokenizer is None:
        return None
    cache = TokenCache(settings.token_cache_dir)
    lease = cache.lease(cache_key(source, c, encoding.model_dir, encoding.template).digest)
    if lease is None:
        return None
    try:
        meta = read_meta(lease.entry)
    finally:
        lease.release()
    return meta if meta.get("template_errors") == 0 and isinstance(meta.get("token_stats"), dict) else None


def _checked_dataset(
    source: DatasetSource,
    c: TrainingConfig,
    settings: ServerSettings,
    *,
    field: str,
    encoding: _Encoding,
    hooks: CheckHooks,
) -> DatasetReport:
    """check_dataset, remembered: tokenising a dataset is most of a ValidateConfig call, and callers validate the
    same data again and again. The key holds the source's fingerprint, so edited data is read again. When a job
    has tokenized the same data already, its token cache entry's exact figures stand in for tokenizing (the records
    are still all parsed). Reports are only read by callers, never changed; a stopped check remembers nothing."""
    name = getattr(c, field)
    data_format = c.data_format or "auto"
    max_length = c.max_length if (c.max_length or 0) >= 1 else None  # an invalid one is reported already
    cached = _token_cache_meta(source, c, settings, encoding) if max_length else None
    tokenizer, template = (None, None) if cached else (encoding.tokenizer, encoding.template)
    sample = settings.validation_sample_examples
    key = (
        source.fingerprint(),
        source,
        name,
        field,
        data_format,
        id(tokenizer),
        template,
        max_length,
        sample,
        bool(cached),
    )
    with _DATASET_REPORTS_LOCK:
        if key in _DATASET_REPORTS:
            _DATASET_REPORTS.move_to_end(key)
            return _DATASET_REPORTS[key][1]
    report_progress = hooks.on_progress
    try:
        report = check_dataset(
            source,
            name=name,
            field=field,
            data_format=data_format,
            tokenizer=tokenizer,
            template=template,
            max_length=max_length,
            sample_examples=sample,
            should_stop=hooks.should_stop,
            on_progress=(lambda done, total: report_progress(field, done, total)) if report_progress else None,
        )
    except CheckStopped as stopped:
        log.info("dataset_check_stopped", dataset=name, field=field, records_checked=stopped.records)
        raise
    if cached and max_length:
        _use_cached_figures(report, cached, field, source.unit, max_length)
    with _DATASET_REPORTS_LOCK:
        _DATASET_REPORTS[key] = (tokenizer, report)
        while len(_DATASET_REPORTS) > _DATASET_REPORTS_MAX:
            _DATASET_REPORTS.popitem(last=False)
    return report


def _use_cached_figures(report: DatasetReport, meta: dict[str, Any], field: str, unit: str, max_length: int) -> None:
    """A token cache entry's exact figures in a report whose records were only parsed."""
    stats = meta["token_stats"]
    report.token_stats = TokenStats(
        **{k: stats[k] for k in ("min", "max", "mean", "p50", "p95", "total")},
        examples_measured=int(meta.get("rows_read", 0)),  # every valid record rendered (no template errors)
        source=TOKEN_CACHE,
    )
    report.num_over_max_length = int(meta.get("over_max_length", 0))
    for line in meta.get("unusable_rows", [])[:MAX_WARNINGS]:
        report.warnings.append(answer_truncated(field, unit, int(line), max_length))


def _ignored_options(source: DatasetSource, c: TrainingConfig, path: str, out: _Collector) -> None:
    """Warn about dataset options the source's kind has no use for (a file has no split, a folder no revision)."""
    used = {HUB: ("subset", "split", "revision"), SAVED: ("split",) if source.split else (), FILE: ()}[source.kind]
    for option, value in c.source_options(path).items():
        if value and option not in used:
            what = "a local file" if source.kind == FILE else "a save_to_disk folder"
            out.warn(field_of(path, option), "IGNORED", f"{path} is {what}, which has no {option}: it is ignored")


def _pin(source: DatasetSource, c: TrainingConfig, path: str) -> None:
    """Record in the resolved config what was read: a hub dataset's commit and the split chosen, so that every
    attempt of the job trains on the data validated here."""
    if source.kind == HUB:
        setattr(c, field_of(path, "revision"), source.revision)
    if source.kind in (HUB, SAVED) and source.split:
        setattr(c, field_of(path, "split"), source.split)


def _row_problems(report: DatasetReport, c: TrainingConfig, path: str, out: _Collector) -> None:
    """The report's violations as the config's; with skip_invalid_rows, bad rows of a dataset that also has good
    ones are a warning with their count instead."""
    rows = [v for v in report.violations if v.line]
    whole = [v for v in report.violations if not v.line]
    if c.skip_invalid_rows and rows and not whole:
        first = rows[0]
        out.warn(
            path,
            "INVALID_ROWS_SKIPPED",
            f"{report.num_invalid} of {report.num_examples} records are invalid and will be skipped "
            f"(the first: {first.message})",
        )
        rows = []
    for violation in [*rows, *whole]:
        out.violations.items.append(violation)
        out.kinds.add(ErrorKind.INVALID_ARGUMENT)


def _dataset_step(
    path: str, c: TrainingConfig, settings: ServerSettings, encoding: _Encoding, out: _Collector, hooks: CheckHooks
) -> DatasetReport | None:
    try:
        source = resolve_dataset(c, settings, path)
    except FinetuneError as exc:
        out.from_error(exc, path)
        return None
    _ignored_options(source, c, path, out)
    _pin(source, c, path)
    report = _checked_dataset(source, c, settings, field=path, encoding=encoding, hooks=hooks)
    _row_problems(report, c, path, out)
    out.warnings.extend(report.warnings)
    stats = report.token_stats
    sampled = stats is not None and stats.source == SAMPLE
    if stats is not None and sampled:
        out.warn(
            path,
            "TOKEN_STATS_SAMPLED",
            f"every record of the {report.num_valid:,} valid ones was parsed; token statistics come from an even "
            f"sample of {stats.examples_measured:,} of them (chat template problems are found in the sample only)",
        )
    if report.num_over_max_length:
        about = "about " if sampled else ""
        out.warn(
            path,
            "TRUNCATION",
            f"{about}{report.num_over_max_length} of {report.num_valid} examples exceed max_length={c.max_length} "
            "and will be truncated",
        )
    return report


def bf16_by_default(raw: TrainingConfig, preset_values: dict[str, Any], devices: list[Device]) -> bool:
    """Whether a run that sets neither fp16 nor bf16 (nor does its preset) trains in bf16: on a server whose GPUs
    all have bf16 in hardware (compute capability 8.0+), yes.

    Why not fp32 there: bf16 keeps fp32's exponent range (no loss scaling, unlike fp16), halves the frozen base's
    memory (the largest part of a LoRA run) and the activations', and runs on the tensor cores (A100: 312 TFLOPS
    bf16 against 19.5 plain fp32). The LoRA parameters, their gradients and AdamW's states stay fp32, so updates do
    not round away. An explicit `bf16: false` keeps fp32; a CPU-only server or an older GPU keeps fp32 too.
    """
    if any(getattr(raw, name) is not None or name in preset_values for name in ("bf16", "fp16")):
        return False
    gpus = [d for d in devices if d.name.startswith("cuda")]
    return bool(gpus) and all(d.bf16_supported for d in gpus)


def _device_capacities(target_device: str) -> list[tuple[str, int]]:
    devices = detect_devices()
    gpus = [d for d in devices if d.name.startswith("cuda")]
    chosen = gpus or devices
    capacities = [(d.name, d.free_memory_bytes or d.total_memory_bytes) for d in chosen]
    if target_device:
        capacities.append((target_device, NAMED_DEVICES[target_device]))
    return capacities


def _source_step(
    config: TrainingConfig, lookup: continuation.SourceLookup | None, out: _Collector
) -> continuation.SourceAdapter | None:
    """The adapter a continued job starts from (None when it starts fresh, or on a problem, which is reported)."""
    problems = continuation.request_problems(config)
    for problem in problems:
        out.violation(problem.field, problem.reason, problem.message)
    if not config.init_from_job or problems:
        return None
    if lookup is None:
        message = "continuing a job needs the server's job store; this trainer has none"
        out.violation("init_from_job", "UNSUPPORTED", message, ErrorKind.FAILED_PRECONDITION)
        return None
    try:
        return lookup(config.init_from_job, config.init_from_checkpoint)
    except FinetuneError as exc:
        out.from_error(exc, "init_from_job")
        return None


def validate(
    config: TrainingConfig,
    settings: ServerSettings,
    *,
    target_device: str = "",
    placement_problem: str = "",
    hooks: CheckHooks | None = None,
    source_lookup: continuation.SourceLookup | None = None,
) -> ValidationReport:
    """Everything Train checks before accepting a job. `placement_problem`: why the executor could place no job now
    (e.g. no Ray node has the GPUs a job asks for), a FAILED_PRECONDITION of the whole config. `hooks` lets a caller
    follow the dataset checks and stop them (CheckStopped). `source_lookup` finds the adapter of the job that
    init_from_job names (without one, a config naming a job is refused)."""
    hooks = hooks or CheckHooks()
    out = _Collector()
    if placement_problem:
        out.violation("", "DOES_NOT_FIT_CLUSTER", placement_problem, ErrorKind.FAILED_PRECONDITION)
    source = _source_step(config, source_lookup, out)
    if source is not None:
        config = continuation.inherit(config, source)
    preset_values: dict[str, Any] = {}
    if config.preset:
        try:
            preset_values = dict(get_preset(config.preset).config)
        except FinetuneError as exc:
            out.from_error(exc, "preset")
    if target_device and target_device not in NAMED_DEVICES:
        out.violation(
            "target_device", "INVALID_VALUE", f"unknown device {target_device!r}; known: {', '.join(NAMED_DEVICES)}"
        )
        target_device = ""
    resolved, filled = resolve(config, preset_values)
    if bf16_by_default(config, preset_values, detect_devices()):
        resolved.bf16 = True
    _check_ranges(resolved, out)
    if source is not None:
        problems, warnings = continuation.mismatches(resolved, source)
        for problem in problems:
            out.violation(problem.field, problem.reason, problem.message)
        out.warnings.extend(warnings)
    fields_in_range = not out.violations  # the memory estimate needs sane numbers
    _check_device_support(config, resolved, out)

    summary: ModelSummary | None = None
    model_config: dict[str, Any] = {}
    tokenizer: TextTokenizer | None = None
    template: str | None = None
    model_dir: Path | None = None
    if resolved.model_name.strip():
        try:
            model, summary = _model_step(config, resolved, settings, out)
            model_config = model.config
            tokenizer_file = model.path / "tokenizer.json"
            if tokenizer_file.is_file():
                tokenizer = _tokenizer_for(str(model.path), tokenizer_file.stat().st_mtime)
            else:
                out.warn("model_name", "NO_FAST_TOKENIZER", "no tokenizer.json: token statistics are not available")
            template = _template_step(resolved, model.path, out)
            model_dir = model.path
            context = summary.max_position_embeddings if summary is not None else 0
            if tokenizer is not None and template is not None and context:
                _check_probe_tokens(resolved, tokenizer, template, context, out)
        except FinetuneError as exc:
            out.from_error(exc, "model_name")
    _check_vllm(resolved, summary, out)

    dataset = eval_dataset = None
    encoding = _Encoding(tokenizer, template, model_dir)
    if resolved.dataset.strip():
        dataset = _dataset_step("dataset", resolved, settings, encoding, out, hooks)
    if resolved.eval_dataset.strip():
        eval_dataset = _dataset_step("eval_dataset", resolved, settings, encoding, out, hooks)

    memory = None
    if summary is not None and fields_in_range:
        stats = dataset.token_stats if dataset else None
        # A sample may have missed the longest example: the estimate then assumes max_length.
        longest = stats.max if stats is not None and stats.source != SAMPLE else 0
        sequence_length = min(resolved.max_length or 1, longest) if longest else resolved.max_length or 1
        memory = estimate_memory(
            resolved,
            summary,
            model_config,
            sequence_length=sequence_length,
            devices=_device_capacities(target_device),
        )
        for fit in memory.fits:
            if not fit.fits:
                advice = f"; try: {fit.suggestions[0]}" if fit.suggestions else ""
                out.warn(
                    "",
                    "MAY_NOT_FIT",
                    f"estimated {memory.total_bytes / 2**30:.1f} GiB exceeds {fit.device} "
                    f"({fit.capacity_bytes / 2**30:.1f} GiB){advice}",
                )

    violations: Sequence[Violation] = out.violations.items
    kind = next((k for k in _KIND_PRECEDENCE if k in out.kinds), None) if violations else None
    return ValidationReport(
        valid=not violations,
        violations=list(violations),
        warnings=out.warnings,
        resolved_config=resolved,
        preset_filled_fields=filled,
        model=summary,
        dataset=dataset,
        eval_dataset=eval_dataset,
        memory_estimate=memory,
        error_kind=kind,
    )
