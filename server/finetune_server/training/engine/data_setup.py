"""What the recipe trains on and in which order: tokenizer and template, encoded examples, eval split, batch plan.

The dataset is encoded once, up front; examples that keep no trainable token after truncation are dropped (and
counted). The batch plan is a pure function of (seed, epoch), so a resumed run rebuilds the same epoch and skips to
its checkpointed position.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune_server.errors import ErrorKind, FinetuneError, Violation
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
from finetune_server.training.engine.batching import plan_batches
from finetune_server.training.engine.checkpoint import DataPosition
from finetune_server.training.engine.errors import NoUsableExamplesError


@dataclass(frozen=True)
class TokenizerSetup:
    tokenizer: TextTokenizer
    template: str  # the chat template trained with (saved with the adapter)
    template_source: str  # where it came from, e.g. SOURCE_FALLBACK for the ChatML fallback
    pad_token_id: int


def load_tokenizer_and_template(model_dir: Path, config: TrainingConfig) -> TokenizerSetup:
    """The model's tokenizer and chat template (the model's own, the config's, or ChatML when allowed)."""
    tokenizer = load_tokenizer(model_dir)
    try:
        template, source = choose_chat_template(
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
    return TokenizerSetup(tokenizer, template, source, _pad_token_id(tokenizer))


def _pad_token_id(tokenizer: TextTokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padded positions are masked out of attention and loss, so any id works


@dataclass
class EncodedSet:
    examples: list[EncodedExample]
    truncated: int  # usable examples cut at max_length
    unusable: int  # examples dropped: no trainable token left after truncation


def encode_file(
    path: Path, field_path: str, config: TrainingConfig, tokenizer: TextTokenizer, template: str
) -> EncodedSet:
    """Every valid record of `path`, encoded; raises NO_USABLE_EXAMPLES (for `field_path`) when none is trainable."""
    options = config.source_options(field_path)  # subset, split, revision: a hub or save_to_disk source's
    examples = [example for _row, example in iter_examples(str(path), config.data_format or "auto", **options)]
    kwargs = {"max_length": int(config.max_length or 2048), "train_on_prompt": bool(config.train_on_prompt)}
    try:
        encoded = encode_many(examples, tokenizer, template, **kwargs)  # type: ignore[arg-type]
    except TemplateError:
        # One example the template cannot render: encode one by one and drop only those (validation reported them).
        encoded = []
        for example in examples:
            with contextlib.suppress(TemplateError):
                encoded.append(encode_example(example, tokenizer, template, **kwargs))  # type: ignore[arg-type]
    usable = [e for e in encoded if shifted_trainable(e) > 0]
    if not usable:
        raise NoUsableExamplesError(
            field_path,
            f"none of the {len(examples)} valid records of {path.name} has a token to train on"
            if examples
            else f"{path.name} has no valid record",
        )
    return EncodedSet(usable, truncated=sum(e.truncated for e in usable), unusable=len(encoded) - len(usable))


def shifted_trainable(example: EncodedExample) -> int:
    # Position 0 is never a target of a causal LM (the same count as Batch.num_trainable).
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def split_eval(
    examples: list[EncodedExample], fraction: float, seed: int
) -> tuple[list[EncodedExample], list[EncodedExample]]:
    """(train, eval): a seeded `fraction` held out (at least one, never all); train keeps the file's order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(order) - 1, max(1, round(len(order) * fraction)))
    return [examples[i] for i in sorted(order[n_eval:])], [examples[i] for i in order[:n_eval]]


@dataclass
class TrainingData:
    train: list[EncodedExample]
    eval: list[EncodedExample]
    truncated: int  # of the training file
    unusable: int  # of the training file
    # Per training example: trainable tokens (after the causal shift) and all tokens.
    trainable: list[int] = field(init=False)
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.trainable = [shifted_trainable(e) for e in self.train]
        self.lengths = [len(e.input_ids) for e in self.train]


class BatchPlan:
    """The micro-batches of every epoch, a pure function of (seed, epoch); only the current epoch is kept."""

    def __init__(self, lengths: Sequence[int], *, batch_size: int, packing: bool, max_length: int, seed: int) -> None:
        self._lengths = lengths
        self._batch_size, self._packing, self._max_length, self._seed = batch_size, packing, max_length, seed
        self._epoch: int | None = None
        self._batches: list[list[int]] = []

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._batches = plan_batches(
                self._lengths,
                batch_size=self._batch_size,
                packing=self._packing,
                max_length=self._max_length,
                seed=self._seed,
                epoch=epoch,
            )
            self._epoch = epoch
        return self._batches

    def stream(self, start: DataPosition) -> Iterator[tuple[DataPosition, list[int]]]:
        """Planned micro-batches from `start` on, across epoch boundaries, without end."""
        epoch, index = start.epoch, start.batch_index
        while True:
            batches = self.epoch(epoch)
            while index < len(batches):
                yield DataPosition(epoch, index), batches[index]
                index += 1
            epoch, index = epoch + 1, 0
