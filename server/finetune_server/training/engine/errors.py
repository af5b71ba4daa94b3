"""How training fails, in terms a caller can act on: each is a FinetuneError that also says at which step.

The worker reports `reason`, `message`, `hint` and `step` as the contract's JobError. `TrainingCancelled` is not an
error: the job was asked to stop and stopped cleanly.
"""

from __future__ import annotations

from finetune_server.errors import ErrorKind, FinetuneError, Violation


class TrainingError(FinetuneError):
    """A failure during training; `step` is the optimizer step it happened at (0 before the first)."""

    def __init__(
        self,
        kind: ErrorKind,
        reason: str,
        message: str,
        *,
        step: int = 0,
        hint: str = "",
        violations: list[Violation] | None = None,
    ) -> None:
        super().__init__(kind, reason, message, hint=hint, violations=violations, metadata={"step": str(step)})
        self.step = step


class NanLossError(TrainingError):
    def __init__(self, step: int, learning_rate: float) -> None:
        super().__init__(
            ErrorKind.FAILED_PRECONDITION,
            "NAN_LOSS",
            f"the training loss became NaN or infinite at step {step} (learning rate {learning_rate:.3g})",
            step=step,
            hint="Lower learning_rate (e.g. by 10x), keep max_grad_norm at 1.0, or use bf16 instead of fp16.",
        )


class OutOfMemoryError(TrainingError):
    def __init__(self, step: int, device: str, detail: str) -> None:
        super().__init__(
            ErrorKind.RESOURCE_EXHAUSTED,
            "OUT_OF_MEMORY",
            f"{device} ran out of memory at step {step}: {detail}",
            step=step,
            hint=(
                "Use a smaller per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective "
                "batch), a smaller max_length, gradient_checkpointing, or load_in_8bit / load_in_4bit."
            ),
        )


class NoUsableExamplesError(TrainingError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(
            ErrorKind.INVALID_ARGUMENT,
            "NO_USABLE_EXAMPLES",
            f"{field}: {message}",
            violations=[Violation(field, "NO_USABLE_EXAMPLES", message)],
            hint="Check the data format and that answers survive max_length (the prompt is masked from the loss).",
        )


class TrainingCancelled(Exception):  # noqa: N818 - a state, not an error
    """`should_stop()` returned True; training stopped between micro-steps and saved nothing extra."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled at step {step}")
        self.step = step
