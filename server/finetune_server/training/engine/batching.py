"""Micro-batches without waste: length-grouped dynamic padding, or packing without cross-example attention.

Two steps, kept apart so a resumed run can rebuild exactly the same epoch and skip to its data position:

- `plan_epoch` (`plan_batches` as lists) decides which example indices form each micro-batch. It is a pure function
  of its arguments and keeps numpy arrays, not a Python list per batch.
- `collate` turns one micro-batch of encoded examples into tensors.

Packing fills rows of at most `max_length` tokens (best-fit decreasing) and puts `batch_size` rows in a micro-batch,
with `position_ids` restarting at 0 for each example and no attention mask. transformers 5 then derives a
block-diagonal causal mask per row from the position ids (`find_packed_sequence_indices` in `masking_utils`) for
eager, sdpa, flex and flash attention alike, but ONLY when the model runs without a KV cache: with a cache
(`config.use_cache` is True by default, even in train mode) the detection is skipped and examples silently attend to
each other. `Batch.model_inputs()` therefore always passes `use_cache=False`; call the model with it.
tests/unit/test_packing_leakage.py proves per-token losses of packed rows equal those of each example alone.
Rows, not one row for the whole micro-batch: for sdpa and eager that mask is dense, rows x T x T, and attention costs
T^2 per row; one row of batch x max_length tokens (32768 at 8 x 4096) would cost a 1 GiB mask and batch times the
attention work of the same tokens as rows of max_length. A row's padding tail is a segment of its own (positions from
0, no labels), so no example attends to it.

A padded micro-batch can still mix lengths (the long tail lands next to shorter rows): the engine then runs it as
several forward passes (`split_for_padding`) when padding would cost more than another pass. Each pass's loss is
its token sum over the step's trainable tokens, so the gradient is the one of the whole micro-batch. On a pretrained
135M model with long-tailed data at max_length 1024 it took the engine from 1.51x to 2.94x HF Trainer's dynamic
padding in tokens/s, and its memory growth from 16.7 GiB to 7.2 (bench/results/real_model.md: the figures after).

Measured on a CPU, packing (and any padding-free layout without a variable-length attention kernel) trains ~3x
slower than dynamic padding, and grouping examples by length removes most of padding's waste, so length-grouped
padding is the default. On a GPU with a varlen attention kernel (flash attention) the order can reverse.
"""

from __future__ import annotations

import bisect
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from itertools import accumulate
from typing import Any, Protocol

import numpy as np
import structlog
import torch

log = structlog.get_logger(__name__)

IGNORE_INDEX = -100
# Length grouping sorts within chunks of this many batches: large enough to group lengths well, small enough that
# the epoch order stays random at a coarser scale.
MEGA_CHUNK_BATCHES = 50


class EncodedLike(Protocol):
    """Anything with token ids and labels of the same length (IGNORE_INDEX where a token is not trained on):
    lists, or the integer arrays a token cache table hands out."""

    @property
    def input_ids(self) -> Sequence[int] | np.ndarray: ...

    @property
    def labels(self) -> Sequence[int] | np.ndarray: ...


@dataclass(frozen=True)
class Batch:
    """One micro-batch ready for the model.

    `attention_mask` is the 2-D padding mask, or None for packed rows (the packed-sequence detection needs None).
    `num_tokens` counts non-padding tokens; `num_trainable` counts the labels the loss averages over after the causal
    shift (what `num_items_in_batch` must sum to across gradient-accumulation steps). `seq_lens` are the example
    lengths in order (for packed rows, the segment lengths); `segments` where each starts, as (row, offset).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    num_tokens: int
    num_trainable: int
    packed: bool
    seq_lens: tuple[int, ...]
    segments: tuple[tuple[int, int], ...]

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


def shuffled_range(rng: random.Random, n: int) -> np.ndarray:
    """range(n) shuffled by `rng`, the same permutation random.shuffle gives a list of range(n) (so plans stay what
    they always were), in 8 bytes an index: the shuffle runs on a typed array, not on a list of Python ints."""
    order = array("q", range(n))
    rng.shuffle(order)
    return np.frombuffer(order, dtype=np.int64) if n else np.zeros(0, dtype=np.int64)


class EpochPlan:
    """One epoch's micro-batches, compactly: batch k is `flat[starts[b]:starts[b + 1]]` with b = `order[k]`.

    Three integer arrays instead of a Python list per batch, so a plan over millions of examples stays small.
    """

    def __init__(self, flat: np.ndarray, starts: np.ndarray, order: np.ndarray) -> None:
        self.flat, self.starts, self.order = flat, starts, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> list[int]:
        b = int(self.order[k])
        return self.flat[self.starts[b] : self.starts[b + 1]].tolist()

    def to_lists(self) -> list[list[int]]:
        return [self[k] for k in range(len(self))]


def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    packing: bool,
    max_length: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> list[list[int]]:
    """Example indices for each micro-batch of one epoch; every index appears exactly once (see `plan_epoch`)."""
    return plan_epoch(
        lengths,
        batch_size=batch_size,
        packing=packing,
        max_length=max_length,
        seed=seed,
        epoch=epoch,
        group_by_length=group_by_length,
    ).to_lists()


def plan_epoch(
    lengths: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    packing: bool,
    max_length: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> EpochPlan:
    """The micro-batches of one epoch, as an EpochPlan; every index appears exactly once.

    A pure, deterministic function of its arguments, so a resumed run rebuilds the same epoch and skips the batches
    already done. Padding mode: batches of `batch_size` examples, grouped by length unless `group_by_length` is False.
    Packing mode: rows of at most `max_length` tokens (best-fit decreasing), `batch_size` rows a batch (so a batch
    holds at most `batch_size * max_length` tokens, as a padded one does); `collate` with the same `max_length`
    rebuilds the rows. In both modes the batch with the most tokens comes first, so an out-of-memory shows at step 1,
    not hours later.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    sizes = np.asarray(lengths, dtype=np.int64)
    if sizes.size and int(sizes.min()) < 1:
        raise ValueError("every example must have at least one token")
    rng = _rng(seed, epoch)
    order = shuffled_range(rng, len(sizes))
    if not len(order):
        return EpochPlan(order, np.zeros(1, dtype=np.int64), order)
    if packing:
        flat, starts = _rows_into_batches(*_pack_best_fit_decreasing(order, sizes, budget=max_length), batch_size, rng)
    elif group_by_length:
        flat, starts = _length_grouped(order, sizes, batch_size), _every(batch_size, len(order))
    else:
        flat, starts = order, _every(batch_size, len(order))
    batch_order = shuffled_range(rng, len(starts) - 1)
    cost = _batch_costs(flat, starts, sizes, packing)[batch_order]
    heaviest = int(np.argmax(cost))  # the first of the heaviest, as max() picks
    batch_order = np.concatenate([batch_order[heaviest : heaviest + 1], np.delete(batch_order, heaviest)])
    return EpochPlan(flat, starts, batch_order)


def _every(batch_size: int, n: int) -> np.ndarray:
    return np.append(np.arange(0, n, batch_size, dtype=np.int64), n)


def _batch_costs(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, packing: bool) -> np.ndarray:
    """Tokens each batch occupies in memory: the sum when packed, rows times the longest when padded."""
    sizes = lengths[flat]
    if packing:
        return np.add.reduceat(sizes, starts[:-1])
    return np.diff(starts) * np.maximum.reduceat(sizes, starts[:-1])


def _length_grouped(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """Within each chunk of MEGA_CHUNK_BATCHES batches of the shuffled order, longest first.

    A stable sort, so ties keep the shuffled order and the plan stays a function of the seed. Chunks are whole
    batches, so consecutive runs of `batch_size` never straddle two chunks.
    """
    chunk = np.arange(len(order), dtype=np.int64) // (batch_size * MEGA_CHUNK_BATCHES)
    return order[np.lexsort((-lengths[order], chunk))]


def _pack_best_fit_decreasing(order: np.ndarray, lengths: np.ndarray, *, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: each example (longest first) goes into the open bin it fills most tightly.

    Returns the examples grouped by bin (in bin order, each bin in the order its examples went in) and the bins'
    start offsets.
    """
    by_size = order[np.argsort(-lengths[order], kind="stable")]
    bin_of = np.empty(len(by_size), dtype=np.int64)
    bins = 0
    # Open bins as (space left, bin number), sorted; full bins leave the list.
    open_bins: list[tuple[int, int]] = []
    for k, size in enumerate(lengths[by_size].tolist()):
        if size > budget:
            log.warning("example longer than the packing budget gets its own bin", length=size, budget=budget)
            bin_of[k], bins = bins, bins + 1
            continue
        pos = bisect.bisect_left(open_bins, (size, -1))
        if pos < len(open_bins):
            space, number = open_bins.pop(pos)
        else:
            space, number, bins = budget, bins, bins + 1
        bin_of[k] = number
        if space - size > 0:
            bisect.insort(open_bins, (space - size, number))
    flat = by_size[np.argsort(bin_of, kind="stable")]
    starts = np.zeros(bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(bin_of, minlength=bins), out=starts[1:])
    return flat, starts


def _rows_into_batches(
    flat: np.ndarray, row_starts: np.ndarray, batch_size: int, rng: random.Random
) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows (examples grouped by row, as `_pack_best_fit_decreasing` returns them) shuffled and taken
    `batch_size` at a time: the examples grouped by batch, and the batches' start offsets."""
    rows = len(row_starts) - 1
    row_order = shuffled_range(rng, rows)
    pieces = [flat[row_starts[r] : row_starts[r + 1]] for r in row_order.tolist()]
    sizes = np.diff(row_starts)[row_order]
    batch_ends = np.cumsum(sizes)[np.minimum(np.arange(batch_size, rows + batch_size, batch_size), rows) - 1]
    return np.concatenate(pieces) if pieces else flat, np.concatenate([[0], batch_ends]).astype(np.int64)


def next_fit_rows(seq_lens: Sequence[int], max_length: int | None) -> list[list[int]]:
    """Consecutive examples into rows of at most `max_length` tokens (None: all in one row); an example longer than
    that gets a row of its own. Over a batch that `plan_epoch` packed (rows concatenated), this never makes more rows
    than the plan had: each planned row adds at most one."""
    rows: list[list[int]] = []
    used = 0
    for k, n in enumerate(seq_lens):
        if rows and (max_length is None or used + n <= max_length):
            rows[-1].append(k)
            used += n
        else:
            rows.append([k])
            used = n
    return rows


# What one more forward+backward pass costs beyond its tokens, in tokens: on a CPU a pass's fixed work is a few
# milliseconds (~64 tokens of a 135M model's throughput); a GPU step of a few tokens is bound by kernel launches and
# weight reads, worth ~1k tokens there (an estimate, to be calibrated by bench/gpu.sh).
PASS_OVERHEAD_TOKENS = {"cpu": 64}
ACCELERATOR_PASS_OVERHEAD_TOKENS = 1024


def pass_overhead_tokens(device_type: str) -> int:
    return PASS_OVERHEAD_TOKENS.get(device_type, ACCELERATOR_PASS_OVERHEAD_TOKENS)


def split_for_padding(seq_lens: Sequence[int], *, overhead_tokens: int) -> list[list[int]]:
    """Positions of one padded micro-batch regrouped into forward passes that waste less: a batch whose lengths run
    from 100 to 1024 tokens pads every row to 1024, and on a padded batch SDPA falls back to a kernel with a dense
    mask (memory and time quadratic in the padded length). The groups are contiguous runs of the lengths sorted
    longest first, chosen to minimise the padded tokens plus `overhead_tokens` per extra forward pass (what a pass
    costs beyond its tokens). The loss is a token-weighted sum over the step's window, so any grouping gives the
    same gradient; length-grouped batches mostly stay whole."""
    order = sorted(range(len(seq_lens)), key=lambda k: -seq_lens[k])
    lengths = [seq_lens[k] for k in order]
    n = len(lengths)
    # best[j]: the cheapest cost of the first j (longest) examples; cut[j]: where its last group starts.
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the last group is order[i:j]; its width is lengths[i], the longest in it
            cost = best[i] + (j - i) * lengths[i] + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(sorted(order[cut[j] : j]))
        j = cut[j]
    return groups[::-1]


def collate(
    examples: Sequence[EncodedLike], *, packing: bool, pad_token_id: int, max_length: int | None = None
) -> Batch:
    """Tensors for one micro-batch: right-padded rows, or packed rows of at most `max_length` tokens (None: one row)
    (see the module docstring)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    seq_lens = tuple(len(e.input_ids) for e in examples)
    for n, e in zip(seq_lens, examples, strict=True):
        if n == 0:
            raise ValueError("cannot collate an example without tokens")
        if len(e.labels) != n:
            raise ValueError(f"labels ({len(e.labels)}) and input_ids ({n}) differ in length")
    if packing:
        return _collate_packed(examples, seq_lens, next_fit_rows(seq_lens, max_length), pad_token_id)
    return _collate_padded(examples, seq_lens, pad_token_id)


def _collate_packed(
    examples: Sequence[EncodedLike], seq_lens: tuple[int, ...], rows: list[list[int]], pad_token_id: int
) -> Batch:
    row_tokens = [sum(seq_lens[k] for k in row) for row in rows]
    width = max(row_tokens)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segments: list[tuple[int, int]] = [(0, 0)] * len(seq_lens)
    for r, row in enumerate(rows):
        offsets = [0, *accumulate(seq_lens[k] for k in row)]
        for k, start in zip(row, offsets, strict=False):
            n = seq_lens[k]
            input_ids[r, start : start + n] = torch.as_tensor(np.asarray(examples[k].input_ids, dtype=np.int64))
            labels[r, start + 1 : start + n] = torch.as_tensor(np.asarray(examples[k].labels[1:], dtype=np.int64))
            # Positions restart at 0 at each segment start; the first token of a segment is never a target, so the
            # last token of one example never predicts the next.
            position_ids[r, start : start + n] = torch.arange(n, dtype=torch.long)
            segments[k] = (r, start)
        # The padding tail is one more segment (positions from 0 again): attended by nothing before it.
        position_ids[r, row_tokens[r] :] = torch.arange(width - row_tokens[r], dtype=torch.long)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=None,
        position_ids=position_ids,
        num_tokens=sum(seq_lens),
        num_trainable=_count_trainable(labels),
        packed=True,
        seq_lens=seq_lens,
        segments=tuple(segments),
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
        segments=tuple((row, 0) for row in range(rows)),
    )


def _count_trainable(labels: torch.Tensor) -> int:
    # A causal LM predicts labels[t + 1] from position t: the label at position 0 of a row is never a target.
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
