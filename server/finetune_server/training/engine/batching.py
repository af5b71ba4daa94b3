"""Micro-batches without waste: length-grouped dynamic padding, or packing without cross-example attention.

Two steps, kept apart so a resumed run can rebuild exactly the same epoch and skip to its data position:

- `plan_batches` decides which example indices form each micro-batch. It is a pure function of its arguments.
- `collate` turns one micro-batch of encoded examples into tensors.

Packing puts a micro-batch into ONE row with `position_ids` restarting at 0 for each example and no attention mask.
transformers 5 then derives a block-diagonal causal mask from the position ids (`find_packed_sequence_indices` in
`masking_utils`) for eager, sdpa, flex and flash attention alike, but ONLY when the model runs without a KV cache:
with a cache (`config.use_cache` is True by default, even in train mode) the detection is skipped and examples
silently attend to each other. `Batch.model_inputs()` therefore always passes `use_cache=False`; call the model with
it. tests/unit/test_packing_leakage.py proves per-token losses of a packed row equal those of each example alone.

Measured on a CPU, packing (and any padding-free layout without a variable-length attention kernel) trains ~3x
slower than dynamic padding, and grouping examples by length removes most of padding's waste, so length-grouped
padding is the default. On a GPU with a varlen attention kernel (flash attention) the order can reverse.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from itertools import accumulate, chain
from typing import Any, Protocol

import structlog
import torch

log = structlog.get_logger(__name__)

IGNORE_INDEX = -100
# Length grouping sorts within chunks of this many batches: large enough to group lengths well, small enough that
# the epoch order stays random at a coarser scale.
MEGA_CHUNK_BATCHES = 50


class EncodedLike(Protocol):
    """Anything with token ids and labels of the same length (IGNORE_INDEX where a token is not trained on)."""

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def labels(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class Batch:
    """One micro-batch ready for the model.

    `attention_mask` is the 2-D padding mask, or None for a packed row (the packed-sequence detection needs None).
    `num_tokens` counts non-padding tokens; `num_trainable` counts the labels the loss averages over after the causal
    shift (what `num_items_in_batch` must sum to across gradient-accumulation steps). `seq_lens` are the example
    lengths in order (for a packed row, the segment lengths).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    num_tokens: int
    num_trainable: int
    packed: bool
    seq_lens: tuple[int, ...]

    @property
    def num_examples(self) -> int:
        return len(self.seq_lens)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device`."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def model_inputs(self, *, include_labels: bool = True) -> dict[str, Any]:
        """Keyword arguments for a causal LM's forward. `use_cache=False` is what keeps packed examples apart."""
        inputs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.attention_mask,
            "use_cache": False,
        }
        if include_labels:
            inputs["labels"] = self.labels
        return inputs


def _rng(seed: int, epoch: int) -> random.Random:
    # An int seed: random.Random seeds ints identically in every process (no hash randomisation).
    return random.Random(seed * 1_000_003 + epoch)


def plan_batches(
    lengths: Sequence[int],
    *,
    batch_size: int,
    packing: bool,
    max_length: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> list[list[int]]:
    """Example indices for each micro-batch of one epoch; every index appears exactly once.

    A pure, deterministic function of its arguments, so a resumed run rebuilds the same epoch and skips the batches
    already done. Padding mode: batches of `batch_size` examples, grouped by length unless `group_by_length` is False.
    Packing mode: bins of at most `batch_size * max_length` tokens (best-fit decreasing), one packed row each. In both
    modes the batch with the most tokens comes first, so an out-of-memory shows at step 1, not hours later.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if any(n < 1 for n in lengths):
        raise ValueError("every example must have at least one token")
    rng = _rng(seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not order:
        return []
    if packing:
        batches = _pack_best_fit_decreasing(order, lengths, budget=batch_size * max_length)
    elif group_by_length:
        batches = _length_grouped(order, lengths, batch_size)
    else:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    cost = [_batch_cost(b, lengths, packing) for b in batches]
    heaviest = max(range(len(batches)), key=cost.__getitem__)
    batches.insert(0, batches.pop(heaviest))
    return batches


def _batch_cost(batch: list[int], lengths: Sequence[int], packing: bool) -> int:
    """Tokens the batch occupies in memory: the sum when packed, rows times the longest when padded."""
    if packing:
        return sum(lengths[i] for i in batch)
    return len(batch) * max(lengths[i] for i in batch)


def _length_grouped(order: list[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    chunk = batch_size * MEGA_CHUNK_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        # sorted() is stable: ties keep the shuffled order, so the plan stays a function of the seed.
        group = sorted(order[start : start + chunk], key=lambda i: lengths[i], reverse=True)
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return batches


def _pack_best_fit_decreasing(order: list[int], lengths: Sequence[int], *, budget: int) -> list[list[int]]:
    """Best-fit decreasing: each example (longest first) goes into the open bin it fills most tightly."""
    bins: list[list[int]] = []
    # Open bins as (space left, bin number), sorted; full bins leave the list.
    open_bins: list[tuple[int, int]] = []
    for index in sorted(order, key=lambda i: lengths[i], reverse=True):
        size = lengths[index]
        if size > budget:
            log.warning("example longer than the packing budget gets its own bin", length=size, budget=budget)
            bins.append([index])
            continue
        pos = bisect.bisect_left(open_bins, (size, -1))
        if pos < len(open_bins):
            space, number = open_bins.pop(pos)
        else:
            space, number = budget, len(bins)
            bins.append([])
        bins[number].append(index)
        if space - size > 0:
            bisect.insort(open_bins, (space - size, number))
    return bins


def collate(examples: Sequence[EncodedLike], *, packing: bool, pad_token_id: int) -> Batch:
    """Tensors for one micro-batch: right-padded rows, or one packed row (see the module docstring)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    seq_lens = tuple(len(e.input_ids) for e in examples)
    for n, e in zip(seq_lens, examples, strict=True):
        if n == 0:
            raise ValueError("cannot collate an example without tokens")
        if len(e.labels) != n:
            raise ValueError(f"labels ({len(e.labels)}) and input_ids ({n}) differ in length")
    return _collate_packed(examples, seq_lens) if packing else _collate_padded(examples, seq_lens, pad_token_id)


def _collate_packed(examples: Sequence[EncodedLike], seq_lens: tuple[int, ...]) -> Batch:
    total = sum(seq_lens)
    input_ids = torch.tensor(list(chain.from_iterable(e.input_ids for e in examples)), dtype=torch.long)
    labels = torch.tensor(list(chain.from_iterable(e.labels for e in examples)), dtype=torch.long)
    starts = torch.tensor([0, *accumulate(seq_lens[:-1])], dtype=torch.long)
    # Positions restart at 0 at each segment start (one arange per example, not a loop per token).
    position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in seq_lens])
    # The first token of each segment is never a target, so the last token of one example never predicts the next.
    labels[starts] = IGNORE_INDEX
    return Batch(
        input_ids=input_ids.unsqueeze(0),
        labels=labels.unsqueeze(0),
        attention_mask=None,
        position_ids=position_ids.unsqueeze(0),
        num_tokens=total,
        num_trainable=_count_trainable(labels.unsqueeze(0)),
        packed=True,
        seq_lens=seq_lens,
    )


def _collate_padded(examples: Sequence[EncodedLike], seq_lens: tuple[int, ...], pad_token_id: int) -> Batch:
    rows, width = len(examples), max(seq_lens)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, (n, e) in enumerate(zip(seq_lens, examples, strict=True)):
        input_ids[row, :n] = torch.as_tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.as_tensor(e.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    # Right padding: positions are a plain arange; the model ignores those of pad tokens.
    position_ids = torch.arange(width, dtype=torch.long).expand(rows, width).contiguous()
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        position_ids=position_ids,
        num_tokens=sum(seq_lens),
        num_trainable=_count_trainable(labels),
        packed=False,
        seq_lens=seq_lens,
    )


def _count_trainable(labels: torch.Tensor) -> int:
    # A causal LM predicts labels[t + 1] from position t: the label at position 0 of a row is never a target.
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
