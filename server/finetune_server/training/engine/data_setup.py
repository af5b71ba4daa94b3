"""What the recipe trains on and in which order: tokenizer and template, encoded examples, eval split, batch plan.

The dataset is encoded once into the token cache (training/data/token_build.py) and trained on memory-mapped:
every job, retry and resume with the same data, model and settings opens the same entry. Examples that keep no
trainable token after truncation are dropped (and counted). Everything held per example is a numpy array (lengths,
trainable counts, the plan), never a Python object, so memory stays flat in the row count. The batch plan is a pure
function of (seed, epoch), so a resumed run rebuilds the same epoch and skips to its checkpointed position.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune_server.errors import ErrorKind, FinetuneError, Violation
from finetune_server.training.config import TrainingConfig
from finetune_server.training.data import (
    TemplateError,
    TextTokenizer,
    choose_chat_template,
    iter_examples,
    load_tokenizer,
)
from finetune_server.training.data.batch_encode import EncoderSettings
from finetune_server.training.data.sources import DatasetSource, estimated_rows
from finetune_server.training.data.token_build import CacheOpen, ProgressCallback, open_or_build
from finetune_server.training.data.token_cache import TokenCache, cache_key
from finetune_server.training.data.token_table import TokenTable
from finetune_server.training.engine.batching import EpochPlan, plan_epoch, shuffled_range
from finetune_server.training.engine.checkpoint import DataPosition
from finetune_server.training.engine.errors import NoUsableExamplesError, disk_full_detail


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
    """One dataset's usable examples, memory-mapped from the token cache, and what was dropped."""

    table: TokenTable
    truncated: int  # usable examples cut at max_length
    unusable: int  # examples dropped: no trainable token left after truncation
    opened: CacheOpen


@dataclass(frozen=True)
class CacheAccess:
    """Where and how the data is tokenized: the cache, encoding processes, progress and stop callbacks."""

    cache: TokenCache
    processes: int = 1
    on_progress: ProgressCallback | None = None
    should_stop: Callable[[], bool] = lambda: False
    hub_cache_dir: Path | None = None  # where a hub dataset's pinned snapshot lies (None: huggingface_hub's default)


def encode_file(
    path: Path, field_path: str, config: TrainingConfig, tokens: TokenizerSetup, model_dir: Path, access: CacheAccess
) -> EncodedSet:
    """Every valid record of `path` encoded: the token cache's entry, built on a miss.

    Raises NO_USABLE_EXAMPLES (for `field_path`) when none is trainable, CacheStopped on a stop request, DISK_FULL
    when the cache cannot be written.
    """
    settings = EncoderSettings(
        tokens.tokenizer, tokens.template, int(config.max_length or 2048), bool(config.train_on_prompt)
    )
    # A ref: a local path or a hub dataset pinned at validation; subset and split come from the config.
    source = DatasetSource.from_ref(str(path), hub_cache_dir=access.hub_cache_dir, **config.source_options(field_path))
    with _disk_full_as_error(access.cache.root, field_path):
        opened = open_or_build(
            access.cache,
            cache_key(source, config, model_dir, tokens.template),
            lambda: iter_examples(source, config.data_format or "auto"),
            settings,
            processes=access.processes,
            total_rows=lambda: estimated_rows(source),
            on_progress=access.on_progress,
            should_stop=access.should_stop,
        )
    meta = opened.meta
    if not len(opened.table):
        opened.table.close()
        rows = int(meta.get("rows_read", 0))
        raise NoUsableExamplesError(
            field_path,
            f"none of the {rows} valid records of {path.name} has a token to train on"
            if rows
            else f"{path.name} has no valid record",
        )
    return EncodedSet(opened.table, int(meta.get("truncated", 0)), int(meta.get("unusable", 0)), opened)


@contextlib.contextmanager
def _disk_full_as_error(folder: Path, field_path: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        detail = disk_full_detail(exc)
        if detail is None:
            raise
        raise FinetuneError(
            ErrorKind.RESOURCE_EXHAUSTED,
            "DISK_FULL",
            f"the disk is full: tokenizing {field_path} into the token cache under {folder} failed ({detail}); "
            "nothing half-written was left",
            violations=[Violation(field_path, "DISK_FULL", detail)],
            hint="Free space on that disk (old jobs' checkpoints, artifacts), or lower --token-cache-max-gib.",
        ) from exc


def split_eval(table: TokenTable, fraction: float, seed: int) -> tuple[TokenTable, TokenTable]:
    """(train, eval): a seeded `fraction` held out (at least one, never all); train keeps the file's order."""
    order = shuffled_range(random.Random(seed), len(table))
    n_eval = min(len(order) - 1, max(1, round(len(order) * fraction)))
    return table.take(np.sort(order[n_eval:])), table.take(order[:n_eval])


@dataclass
class TrainingData:
    """The training and eval examples (token tables) and the training file's drop counts."""

    train: TokenTable
    eval: TokenTable
    truncated: int  # of the training file
    unusable: int  # of the training file

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each training example (int32)."""
        return self.train.lengths

    @property
    def trainable(self) -> np.ndarray:
        """Trainable tokens of each training example, after the causal shift (int32)."""
        return self.train.trainable

    def tokens_in(self, indices: Sequence[int]) -> int:
        return int(self.train.lengths[np.asarray(indices, dtype=np.int64)].sum())

    def trainable_in(self, indices: Sequence[int]) -> int:
        return int(self.train.trainable[np.asarray(indices, dtype=np.int64)].sum())

    def close(self) -> None:
        self.train.close()
        self.eval.close()


class BatchPlan:
    """The micro-batches of every epoch, a pure function of (seed, epoch); only the current epoch is kept."""

    def __init__(self, lengths: np.ndarray, *, batch_size: int, packing: bool, max_length: int, seed: int) -> None:
        self._lengths = lengths
        self._batch_size, self._packing, self._max_length, self._seed = batch_size, packing, max_length, seed
        self._epoch: int | None = None
        self._batches = EpochPlan(lengths[:0], np.zeros(1, dtype=np.int64), lengths[:0])

    def epoch(self, epoch: int) -> EpochPlan:
        if epoch != self._epoch:
            self._batches = plan_epoch(
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
