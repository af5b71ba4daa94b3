"""The fine-tuning service as consumers see it: `IFineTuneService` and its typed results.

Pure Python on purpose (no grpc, no protobuf): an in-process trainer can implement the same interface as the remote
client, and Studio-like consumers depend only on this module. The results are frozen dataclasses that also behave as
the read-only dicts the service's results first were (`result["valid"]`, `result.get("errors")`, `dict(result)`), so
code written against those dicts keeps working while new code gets attributes and type checking.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

__all__ = [
    "ExportResult",
    "FieldViolation",
    "IFineTuneService",
    "ProbeComparison",
    "ProgressCallback",
    "ProgressUpdate",
    "TrainResult",
    "ValidationResult",
]


class _DictLike(Mapping[str, Any]):
    """Read-only Mapping over a dataclass's fields (mixed into the frozen result dataclasses)."""

    __slots__ = ()

    def _field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        if isinstance(key, str) and key in self._field_names():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._field_names())

    def __len__(self) -> int:
        return len(self._field_names())

    def to_dict(self) -> dict[str, Any]:
        """A plain, deep copy as dicts and lists (nested results become dicts too), e.g. for JSON."""
        return {name: _plain(getattr(self, name)) for name in self._field_names()}


def _plain(value: Any) -> Any:
    if isinstance(value, _DictLike):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, eq=True)
class FieldViolation(_DictLike):
    """One problem with one field (`lora.r`), or with one line of a dataset (`line` > 0)."""

    field: str
    reason: str
    message: str
    line: int = 0

    def __str__(self) -> str:
        """The human line, e.g. `lora.r: must be >= 1` or `dataset: line 3: missing "output"`."""
        message = self.message
        if self.line and not message.startswith(("line ", "element ", "row ")):
            message = f"line {self.line}: {message}"
        return f"{self.field}: {message}" if self.field else message


@dataclass(frozen=True, eq=True)
class ValidationResult(_DictLike):
    """The report on a config; `valid` is True when training would accept it."""

    valid: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    violations: list[FieldViolation] = field(default_factory=list)
    resolved_config: dict[str, Any] = field(default_factory=dict)
    preset_filled_fields: list[str] = field(default_factory=list)
    memory_estimate: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    eval_dataset: dict[str, Any] | None = None


@dataclass(frozen=True, eq=True)
class ProgressUpdate(_DictLike):
    """Training progress measured by the training loop itself; `job_id` lets a consumer cancel the job."""

    step: int
    total_steps: int
    epoch: float = 0.0
    loss: float = 0.0
    learning_rate: float = 0.0
    grad_norm: float = 0.0
    tokens_per_second: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    memory_bytes: int = 0
    job_id: str | None = None

    @property
    def fraction(self) -> float:
        """Completion in [0, 1] (0 while the total is unknown)."""
        return min(1.0, self.step / self.total_steps) if self.total_steps > 0 else 0.0


@dataclass(frozen=True, eq=True)
class ProbeComparison(_DictLike):
    """One of the config's eval_probes: its answer before training and the final adapter's."""

    index: int
    prompt: str
    before: str
    after: str
    expected: str = ""  # empty: the probe has no expected answer
    before_exact_match: bool = False
    after_exact_match: bool = False


@dataclass(frozen=True, eq=True)
class TrainResult(_DictLike):
    """How a training job ended. A job that failed or was cancelled is `success=False` with `error` set."""

    success: bool
    job_id: str
    state: str  # "succeeded", "failed", "cancelled"
    final_loss: float | None = None
    eval_loss: float | None = None
    steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    adapter_location: str = ""
    error: str | None = None
    # eval_probes answered before and after training; with eval_generate_examples, `metrics` has final_exact_match
    # and final_token_accuracy.
    probes: list[ProbeComparison] = field(default_factory=list)


@dataclass(frozen=True, eq=True)
class ExportResult(_DictLike):
    """An exported model on the caller's disk."""

    success: bool
    output_path: str
    format: str  # "adapter" or "merged"
    files: list[dict[str, Any]] = field(default_factory=list)  # {"path", "size_bytes", "sha256"}
    total_size_bytes: int = 0
    artifact_id: str = ""
    vllm: dict[str, Any] = field(default_factory=dict)  # {"compatible", "problems", "serve_command"}


ProgressCallback = Callable[[ProgressUpdate], None]


class IFineTuneService(abc.ABC):
    """What a consumer (Studio, a CLI, a notebook) needs from a fine-tuning backend, local or remote.

    Configs are plain dicts with the contract's field names (`TrainingConfig`), `lora` as a nested dict, `None`
    meaning "not set" (the preset or the server default fills it).
    """

    @abc.abstractmethod
    def train(self, config: Mapping[str, Any], progress_callback: ProgressCallback | None = None) -> TrainResult:
        """Train until the job ends; `progress_callback` is called from the training loop's progress reports.

        A job that fails returns `success=False` with the error text; a config that cannot be trained raises.
        """

    @abc.abstractmethod
    def export_model(
        self,
        output_path: str | PathLike[str],
        *,
        format: str = "adapter",  # noqa: A002 - the keyword callers already pass
        job_id: str | None = None,
        overwrite: bool = False,
    ) -> ExportResult:
        """Write the trained adapter (`format="adapter"`) or merged weights (`"merged"`) to `output_path`.

        `job_id` defaults to the last job this service trained.
        """

    @abc.abstractmethod
    def validate_config(self, config: Mapping[str, Any]) -> ValidationResult:
        """Check a config without training: every problem at once, the resolved config, a memory estimate."""
