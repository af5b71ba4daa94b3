"""Encoding examples a batch at a time into flat arrays: what the token cache stores, computed in any process.

The encoder is `encode.encode_many` (exactly what training used before the cache, and what validation measures
with); an example the template cannot render is dropped alone (validation reported it), and one that keeps no
trainable token after truncation is dropped and counted as unusable. This module imports neither torch nor pyarrow,
so the processes that encode in parallel start light.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from finetune_server.training.data.encode import IGNORE_INDEX, EncodedExample, encode_example, encode_many
from finetune_server.training.data.formats import Example
from finetune_server.training.data.template import TemplateError
from finetune_server.training.data.tokenizer import TextTokenizer

MAX_UNUSABLE_ROWS = 20  # row numbers of unusable examples kept for reports


@dataclass(frozen=True)
class EncoderSettings:
    """Everything the encoder needs; picklable, so each encoding process receives it once."""

    tokenizer: TextTokenizer
    template: str
    max_length: int
    train_on_prompt: bool


@dataclass(frozen=True)
class EncodedBatch:
    """The usable examples of a batch as flat arrays: example k's tokens are ids[offsets[k]:offsets[k + 1]]."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    offsets: np.ndarray  # int64, one more than examples
    trainable: np.ndarray  # int32: labels the loss counts after the causal shift
    num_tokens: np.ndarray  # int32: length before truncation
    rows: np.ndarray  # int64: the example's line or row in the source

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class BatchResult:
    """One batch encoded, with what was dropped and the lengths every rendered example had (token statistics)."""

    batch: EncodedBatch
    rows_read: int
    template_errors: int = 0
    truncated: int = 0  # usable examples cut at max_length
    unusable: int = 0  # no trainable token left after truncation
    over_max_length: int = 0  # every rendered example longer than max_length (usable or not)
    all_num_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    unusable_rows: list[int] = field(default_factory=list)


def shifted_trainable(labels: list[int]) -> int:
    # Position 0 is never a target of a causal LM (the same count as Batch.num_trainable).
    return max(0, len(labels) - 1) - labels[1:].count(IGNORE_INDEX)


def _encode(examples: list[Example], settings: EncoderSettings) -> list[tuple[int, EncodedExample]]:
    """(position in `examples`, encoding) of each example the template renders."""
    kwargs = {"max_length": settings.max_length, "train_on_prompt": settings.train_on_prompt}
    try:
        encoded = encode_many(examples, settings.tokenizer, settings.template, **kwargs)  # type: ignore[arg-type]
        return list(enumerate(encoded))
    except TemplateError:
        # One example the template cannot render: encode one by one and drop only those.
        kept = []
        for position, example in enumerate(examples):
            with contextlib.suppress(TemplateError):
                kept.append(
                    (position, encode_example(example, settings.tokenizer, settings.template, **kwargs))  # type: ignore[arg-type]
                )
        return kept


def encode_batch(items: Sequence[tuple[int, Example]], settings: EncoderSettings) -> BatchResult:
    """Encode (row, example) pairs; only examples with a trainable token land in the batch."""
    encoded = _encode([example for _, example in items], settings)
    result = BatchResult(batch=_flat([], []), rows_read=len(items), template_errors=len(items) - len(encoded))
    usable: list[EncodedExample] = []
    usable_rows: list[int] = []
    trainable: list[int] = []
    for position, example in encoded:
        row = items[position][0]
        count = shifted_trainable(example.labels)
        result.over_max_length += example.truncated
        if count == 0:
            result.unusable += 1
            if len(result.unusable_rows) < MAX_UNUSABLE_ROWS:
                result.unusable_rows.append(row)
            continue
        result.truncated += example.truncated
        usable.append(example)
        usable_rows.append(row)
        trainable.append(count)
    result.batch = _flat(usable, usable_rows, trainable)
    result.all_num_tokens = np.fromiter((e.num_tokens for _, e in encoded), dtype=np.int32, count=len(encoded))
    return result


def _flat(examples: list[EncodedExample], rows: list[int], trainable: list[int] | None = None) -> EncodedBatch:
    lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:  # list.extend and np.array loop in C; per-token Python iteration would dominate
        ids.extend(example.input_ids)
        labels.extend(example.labels)
    return EncodedBatch(
        ids=np.array(ids, dtype=np.int32),
        labels=np.array(labels, dtype=np.int32),
        offsets=offsets,
        trainable=np.asarray(trainable or [], dtype=np.int32),
        num_tokens=np.fromiter((e.num_tokens for e in examples), dtype=np.int32, count=len(examples)),
        rows=np.asarray(rows, dtype=np.int64),
    )
