"""Batch planning (determinism, coverage, length grouping, packing budget) and collation (masks, counts)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from finetune_server.training.engine.batching import IGNORE_INDEX, collate, plan_batches, split_for_padding

PAD = 0


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _long_tailed(n: int, seed: int = 7) -> list[int]:
    """Mostly short examples, a few long ones (like instruction data): lognormal, clipped to 16..512."""
    rng = random.Random(seed)
    return [min(512, max(16, int(rng.lognormvariate(4.0, 0.8)))) for _ in range(n)]


def _example(n: int, prompt: int, start: int = 1) -> Example:
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


def _padding_fraction(plan: list[list[int]], lengths: list[int]) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    return 1 - sum(lengths) / padded


@pytest.mark.parametrize("packing", [False, True])
def test_plan_is_deterministic_and_changes_with_epoch(packing: bool) -> None:
    lengths = _long_tailed(300)
    kwargs: dict[str, Any] = {"batch_size": 8, "packing": packing, "max_length": 512, "seed": 3}
    first = plan_batches(lengths, epoch=0, **kwargs)
    assert first == plan_batches(lengths, epoch=0, **kwargs)
    assert first != plan_batches(lengths, epoch=1, **kwargs)
    assert first != plan_batches(lengths, epoch=0, **{**kwargs, "seed": 4})


@pytest.mark.parametrize(("packing", "group"), [(False, True), (False, False), (True, True)])
def test_every_index_exactly_once(packing: bool, group: bool) -> None:
    lengths = _long_tailed(437)
    for epoch in range(3):
        plan = plan_batches(
            lengths, batch_size=8, packing=packing, max_length=512, seed=0, epoch=epoch, group_by_length=group
        )
        flat = [i for batch in plan for i in batch]
        assert sorted(flat) == list(range(len(lengths)))
        if not packing:
            assert sum(len(b) != 8 for b in plan) == 1  # 437 = 54 * 8 + 5: one short batch


def test_length_grouping_cuts_padding_on_long_tailed_data() -> None:
    lengths = _long_tailed(2000)
    kwargs: dict[str, Any] = {"batch_size": 8, "packing": False, "max_length": 512, "seed": 0, "epoch": 0}
    grouped = _padding_fraction(plan_batches(lengths, **kwargs), lengths)
    random_batches = _padding_fraction(plan_batches(lengths, group_by_length=False, **kwargs), lengths)
    assert random_batches > 0.4
    assert grouped < 0.1
    assert grouped < random_batches / 4


def test_heaviest_batch_comes_first() -> None:
    lengths = _long_tailed(400)
    plan = plan_batches(lengths, batch_size=4, packing=False, max_length=512, seed=1, epoch=2)
    assert lengths.index(max(lengths)) in plan[0]


def test_packing_respects_token_budget_and_fills_bins() -> None:
    lengths = _long_tailed(500)
    batch_size, max_length = 4, 512
    plan = plan_batches(lengths, batch_size=batch_size, packing=True, max_length=max_length, seed=0, epoch=0)
    budget = batch_size * max_length
    totals = [sum(lengths[i] for i in b) for b in plan]
    assert max(totals) <= budget
    # Best-fit decreasing on many small items: bins are nearly full, and barely more than the lower bound.
    lower_bound = -(-sum(lengths) // budget)
    assert len(plan) <= lower_bound + 1
    assert totals[0] == max(totals)


def test_packing_gives_an_oversized_example_its_own_bin() -> None:
    plan = plan_batches([10, 50, 10], batch_size=1, packing=True, max_length=20, seed=0, epoch=0)
    assert [1] in plan
    assert sorted(i for b in plan for i in b) == [0, 1, 2]


def test_plan_rejects_bad_arguments() -> None:
    assert plan_batches([], batch_size=2, packing=False, max_length=8, seed=0, epoch=0) == []
    with pytest.raises(ValueError):
        plan_batches([3, 0], batch_size=2, packing=False, max_length=8, seed=0, epoch=0)
    with pytest.raises(ValueError):
        plan_batches([3], batch_size=0, packing=True, max_length=8, seed=0, epoch=0)


def test_collate_padded() -> None:
    examples = [_example(5, 2), _example(3, 1, start=10), _example(7, 7, start=20)]
    batch = collate(examples, packing=False, pad_token_id=PAD)
    assert batch.input_ids.shape == (3, 7)
    assert batch.input_ids[1].tolist() == [10, 11, 12, PAD, PAD, PAD, PAD]
    assert batch.labels[1].tolist() == [IGNORE_INDEX, 11, 12] + [IGNORE_INDEX] * 4
    assert batch.attention_mask is not None
    assert batch.attention_mask.sum(1).tolist() == [5, 3, 7]
    assert batch.position_ids[0].tolist() == list(range(7))
    assert batch.num_tokens == 15
    assert batch.input_ids.numel() - batch.num_tokens == 6  # padding
    # Trainable after the shift: 3 + 2 + 0 (the fully masked example contributes nothing).
    assert batch.num_trainable == 5
    assert not batch.packed


def test_collate_packed() -> None:
    examples = [_example(4, 0), _example(3, 0, start=10), _example(2, 1, start=20)]
    batch = collate(examples, packing=True, pad_token_id=PAD)
    assert batch.attention_mask is None
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 10, 11, 12, 20, 21]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    # Each segment's first token is masked, so no token predicts across a boundary.
    assert batch.labels.tolist() == [[IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21]]
    assert batch.num_tokens == 9
    assert batch.num_trainable == 3 + 2 + 1
    assert batch.seq_lens == (4, 3, 2)
    assert batch.input_ids.numel() - batch.num_tokens == 0  # no padding


def test_collate_packs_rows_of_at_most_max_length_tokens() -> None:
    """Not one row of the whole batch: sdpa would get a dense (batch x max_length)^2 mask and that much work."""
    examples = [_example(4, 0), _example(3, 0, start=10), _example(2, 1, start=20)]
    batch = collate(examples, packing=True, pad_token_id=PAD, max_length=6)
    assert batch.attention_mask is None
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, PAD], [10, 11, 12, 20, 21]]
    # Row 0's padding tail restarts its positions: a segment of its own, no labels.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21]]
    assert batch.segments == ((0, 0), (1, 0), (1, 3)) and batch.num_tokens == 9 and batch.num_trainable == 6


def test_planned_packed_batches_fit_in_batch_size_rows_of_max_length() -> None:
    lengths = _long_tailed(300)
    batch_size, max_length = 4, 512
    plan = plan_batches(lengths, batch_size=batch_size, packing=True, max_length=max_length, seed=3, epoch=1)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for indices in plan:
        examples = [_example(lengths[i], 0) for i in indices]
        batch = collate(examples, packing=True, pad_token_id=PAD, max_length=max_length)
        assert batch.input_ids.shape[0] <= batch_size and batch.input_ids.shape[1] <= max_length


def test_packed_and_padded_train_on_the_same_tokens() -> None:
    rng = random.Random(5)
    examples = [_example(rng.randint(1, 40), rng.randint(0, 5), start=rng.randint(1, 100)) for _ in range(9)]
    packed = collate(examples, packing=True, pad_token_id=PAD)
    padded = collate(examples, packing=False, pad_token_id=PAD)
    assert packed.num_trainable == padded.num_trainable
    assert packed.num_tokens == padded.num_tokens == sum(len(e.input_ids) for e in examples)


def test_collate_rejects_bad_examples() -> None:
    with pytest.raises(ValueError):
        collate([], packing=True, pad_token_id=PAD)
    with pytest.raises(ValueError):
        collate([Example([1, 2], [1])], packing=False, pad_token_id=PAD)
    with pytest.raises(ValueError):
        collate([Example([], [])], packing=True, pad_token_id=PAD)


def test_batch_to_and_model_inputs() -> None:
    batch = collate([_example(3, 1)], packing=True, pad_token_id=PAD).to("cpu")
    inputs = batch.model_inputs()
    assert inputs["use_cache"] is False
    assert inputs["attention_mask"] is None
    assert torch.equal(inputs["labels"], batch.labels)
    assert "labels" not in batch.model_inputs(include_labels=False)
    assert batch.to(torch.device("cpu")).input_ids.dtype == torch.long


def _padded_cost(seq_lens: list[int], groups: list[list[int]], overhead: int) -> int:
    return sum(len(g) * max(seq_lens[k] for k in g) + overhead for g in groups)


def test_a_long_row_among_short_ones_gets_a_pass_of_its_own() -> None:
    lengths = [120, 1024, 95, 110]
    groups = split_for_padding(lengths, overhead_tokens=64)
    assert groups == [[1], [0, 2, 3]]  # 1024 + 3 x 120 (+ 2 passes) instead of 4 x 1024
    assert _padded_cost(lengths, groups, 64) < _padded_cost(lengths, [[0, 1, 2, 3]], 64)


def test_similar_lengths_stay_one_pass() -> None:
    assert split_for_padding([100, 96, 104, 99], overhead_tokens=64) == [[0, 1, 2, 3]]
    assert split_for_padding([100, 96, 104, 99], overhead_tokens=0) != [[0, 1, 2, 3]]  # a free pass: no padding
    assert split_for_padding([7], overhead_tokens=64) == [[0]]


def test_the_split_is_a_partition_no_grouping_beats() -> None:
    """Every position exactly once, and no grouping of the sorted lengths into runs costs less (checked by brute
    force over every cut of the sorted order)."""
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.choice([rng.randint(8, 64), rng.randint(200, 1024)]) for _ in range(rng.randint(1, 7))]
        overhead = rng.choice([0, 16, 64, 1024])
        groups = split_for_padding(lengths, overhead_tokens=overhead)
        assert sorted(k for g in groups for k in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
        n = len(order)
        best = min(
            _padded_cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, n), strict=True)], overhead)
            for mask in range(1 << (n - 1))
            for cuts in [tuple(i + 1 for i in range(n - 1) if mask >> i & 1)]
        )
        assert _padded_cost(lengths, groups, overhead) == best
