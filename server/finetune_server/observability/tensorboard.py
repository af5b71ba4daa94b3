"""Optional TensorBoard event files of a job, written by its worker beside the checkpoints.

TensorBoard is an optional extra (`pip install sage-finetune[tensorboard]`): without it `tensorboard_sink` returns
None and the job trains exactly the same. A failing write (a full disk) disables the sink with one warning; it never
fails the job, whose real record is the job store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)

# The worker protocol's event kinds and field names (the contract's), so the sink reads what the server records.
_SCALARS = {
    "progress": {
        "train/loss": "loss",
        "train/learning_rate": "learning_rate",
        "train/grad_norm": "grad_norm",
        "train/tokens_per_second": "tokens_per_second",
    },
    "eval": {"eval/loss": "eval_loss"},
}


class EventMessage(Protocol):
    """A worker's event message (workers.protocol.Event): its kind and the contract's fields."""

    @property
    def kind(self) -> str: ...

    @property
    def data(self) -> Mapping[str, Any]: ...


class _ScalarWriter(Protocol):
    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> Any: ...
    def flush(self) -> Any: ...
    def close(self) -> Any: ...


def _open_writer(log_dir: Path, purge_step: int | None) -> _ScalarWriter | None:
    """torch's SummaryWriter (it needs the `tensorboard` package too); None when that is not importable."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class TensorBoardSink:
    """Writes train/* scalars of progress events and eval/loss of eval events, by step."""

    def __init__(self, writer: _ScalarWriter, log_dir: Path) -> None:
        self._writer: _ScalarWriter | None = writer
        self.log_dir = log_dir

    def __call__(self, event: EventMessage) -> None:
        tags = _SCALARS.get(event.kind)
        if self._writer is None or tags is None:
            return
        try:
            scalars = {tag: float(event.data[key]) for tag, key in tags.items()}
            if event.kind == "eval":  # held-out generation's exact_match and token_accuracy
                scalars.update({f"eval/{name}": float(v) for name, v in (event.data.get("metrics") or {}).items()})
            for tag, value in scalars.items():
                if math.isfinite(value):  # an evaluation of probes only has no loss (NaN)
                    self._writer.add_scalar(tag, value, int(event.data["step"]))
            self._writer.flush()  # progress events are seconds apart: a live TensorBoard sees each one
        except Exception as exc:  # never fail training over a side channel
            log.warning("tensorboard.disabled", log_dir=str(self.log_dir), error=str(exc))
            self.close()

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:
                log.warning("tensorboard.close_failed", log_dir=str(self.log_dir), error=str(exc))


def tensorboard_sink(log_dir: Path, *, resumed_from_step: int | None = None) -> TensorBoardSink | None:
    """A sink writing event files under `log_dir`, or None when TensorBoard is not installed.

    `resumed_from_step`: the checkpoint step this attempt resumes from. TensorBoard then hides the points an earlier
    attempt wrote after that step, so a curve never shows the steps between the checkpoint and a crash twice.
    """
    purge_step = None if resumed_from_step is None else resumed_from_step + 1
    try:
        writer = _open_writer(Path(log_dir), purge_step)
    except Exception as exc:  # e.g. the folder cannot be created: train without it
        log.warning("tensorboard.unavailable", log_dir=str(log_dir), error=str(exc))
        return None
    if writer is None:
        return None
    return TensorBoardSink(writer, Path(log_dir))
