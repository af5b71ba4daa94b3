"""The token cache on real files: keys, the same tokens as the encoder, hits, interrupted builds, LRU, removal."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_server.errors import FinetuneError
from finetune_server.training.config import TrainingConfig, resolve
from finetune_server.training.data import Example, encode_many, iter_examples, load_chat_template, load_tokenizer
from finetune_server.training.data.batch_encode import EncoderSettings, shifted_trainable
from finetune_server.training.data.token_build import BATCH_ROWS, open_or_build
from finetune_server.training.data.token_cache import (
    CacheKey,
    CacheStopped,
    TokenCache,
    cache_key,
    dataset_fingerprint,
    read_meta,
)
from finetune_server.training.data.token_table import TableWriter, TokenTable
from finetune_server.training.engine.data_setup import (
    CacheAccess,
    encode_file,
    load_tokenizer_and_template,
)


def write_rows(path: Path, n: int, *, long_prompt_every: int = 0) -> Path:
    """`n` alpaca rows; every `long_prompt_every`-th has a prompt longer than max_length 48 (unusable)."""
    with path.open("w") as f:
        for i in range(n):
            prompt = f"What is the code of agent {i}?"
            if long_prompt_every and i % long_prompt_every == 0:
                prompt += " Tell me more about it, please." * 12
            f.write(json.dumps({"instruction": prompt, "output": f"Agent {i} uses code Z{i * 37 % 1000}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def settings(tiny_model_dir: Path) -> EncoderSettings:
    template = load_chat_template(tiny_model_dir)
    assert template is not None
    return EncoderSettings(load_tokenizer(tiny_model_dir), template, max_length=48, train_on_prompt=False)


def key_for(path: Path, settings: EncoderSettings, **changes: object) -> CacheKey:
    values: dict[str, object] = {
        "dataset": dataset_fingerprint(path),
        "tokenizer": "tiny",
        "template": settings.template,
        "max_length": settings.max_length,
        "data_format": "auto",
        "train_on_prompt": settings.train_on_prompt,
        **changes,
    }
    return CacheKey.of(**values)  # type: ignore[arg-type]


def build(
    cache: TokenCache, path: Path, settings: EncoderSettings, *, processes: int = 1, **key_changes: object
) -> TokenTable:
    opened = open_or_build(
        cache, key_for(path, settings, **key_changes), lambda: iter_examples(path), settings, processes=processes
    )
    return opened.table


def leftovers(root: Path) -> list[str]:
    """Everything under the cache folder but build lock files."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".lock-")) if root.exists() else []


# --- keys ------------------------------------------------------------------------------------------------------------


def test_the_key_changes_with_everything_that_changes_the_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_rows(tmp_path / "a.jsonl", 4)
    config, _ = resolve(TrainingConfig(model_name=str(tiny_model_dir), dataset=str(data), max_length=64))
    template = load_chat_template(tiny_model_dir) or ""
    base = cache_key(data, config, tiny_model_dir, template).digest
    assert cache_key(data, config, tiny_model_dir, template).digest == base, "the key is a pure function"
    config.max_length = 65
    assert cache_key(data, config, tiny_model_dir, template).digest != base
    config.max_length = 64
    assert cache_key(data, config, tiny_model_dir, template + " ").digest != base
    config.train_on_prompt = True
    assert cache_key(data, config, tiny_model_dir, template).digest != base
    config.train_on_prompt = False
    config.data_format = "alpaca"
    assert cache_key(data, config, tiny_model_dir, template).digest != base
    config.data_format = None
    renamed = data.rename(tmp_path / "b.jsonl")
    assert cache_key(renamed, config, tiny_model_dir, template).digest == base, "content, not the name"
    with renamed.open("a") as f:
        f.write(json.dumps({"instruction": "One more?", "output": "Yes."}) + "\n")
    assert cache_key(renamed, config, tiny_model_dir, template).digest != base


def test_a_changed_tokenizer_file_changes_the_key(tmp_path: Path, tiny_model_dir: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (model / name).write_bytes((tiny_model_dir / name).read_bytes())
    data = write_rows(tmp_path / "a.jsonl", 4)
    config, _ = resolve(TrainingConfig(model_name=str(model), dataset=str(data)))
    before = cache_key(data, config, model, "t").digest
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert cache_key(data, config, model, "t").digest != before


# --- contents --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_the_table_holds_exactly_what_the_encoder_gives(
    tmp_path: Path, settings: EncoderSettings, processes: int
) -> None:
    # More than 4 batches, so processes=2 really encodes in two child processes.
    data = write_rows(tmp_path / "rows.jsonl", 4 * BATCH_ROWS + 100, long_prompt_every=97)
    opened = open_or_build(
        TokenCache(tmp_path / "cache"), key_for(data, settings), lambda: iter_examples(data), settings,
        processes=processes,
    )  # fmt: skip
    examples: list[Example] = [example for _, example in iter_examples(data)]
    expected = encode_many(examples, settings.tokenizer, settings.template, max_length=48)
    usable = [(row, e) for row, e in enumerate(expected, start=1) if shifted_trainable(e.labels) > 0]
    table = opened.table
    assert len(table) == len(usable) < len(expected)
    for i in (0, 1, len(usable) // 2, len(usable) - 1):
        row, example = usable[i]
        assert table.row(i).input_ids.tolist() == example.input_ids
        assert table.row(i).labels.tolist() == example.labels
        assert table.column("row")[i] == row
    assert table.lengths.tolist() == [len(e.input_ids) for _, e in usable]
    assert table.trainable.tolist() == [shifted_trainable(e.labels) for _, e in usable]
    meta = opened.meta
    assert meta["rows_read"] == len(expected)
    assert meta["unusable"] == len(expected) - len(usable)
    assert meta["truncated"] == sum(e.truncated for _, e in usable)
    assert meta["token_stats"]["max"] == max(e.num_tokens for e in expected)
    assert meta["unusable_rows"][:2] == [1, 98]
    table.close()


def test_a_second_open_is_a_hit_that_reads_no_data(tmp_path: Path, settings: EncoderSettings) -> None:
    data = write_rows(tmp_path / "rows.jsonl", 30)
    cache = TokenCache(tmp_path / "cache")
    first = open_or_build(cache, key_for(data, settings), lambda: iter_examples(data), settings)
    assert first.built

    def unreadable() -> Iterator[tuple[int, Example]]:
        raise AssertionError("a hit must not read the dataset")

    second = open_or_build(cache, key_for(data, settings), unreadable, settings)
    assert not second.built and second.key == first.key and len(second.table) == len(first.table) == 30
    assert leftovers(cache.root) == [first.key]
    first.table.close()
    second.table.close()


def test_datasets_reads_an_entry_as_a_dataset(tmp_path: Path, settings: EncoderSettings) -> None:
    datasets = pytest.importorskip("datasets")
    data = write_rows(tmp_path / "rows.jsonl", 10)
    cache = TokenCache(tmp_path / "cache")
    table = build(cache, data, settings)
    entry = cache.dir.entries()[0]
    loaded = datasets.Dataset.from_file(str(entry.tokens))
    assert loaded.num_rows == 10 and loaded[3]["input_ids"] == table.row(3).input_ids.tolist()
    table.close()


# --- interrupted builds ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_a_stopped_build_leaves_nothing(tmp_path: Path, settings: EncoderSettings, processes: int) -> None:
    data = write_rows(tmp_path / "rows.jsonl", 8 * BATCH_ROWS)
    cache = TokenCache(tmp_path / "cache")
    checks = iter(range(1_000_000))

    def stop_after_three() -> bool:
        return next(checks) >= 3

    with pytest.raises(CacheStopped):
        open_or_build(
            cache, key_for(data, settings), lambda: iter_examples(data), settings,
            processes=processes, should_stop=stop_after_three,
        )  # fmt: skip
    assert leftovers(cache.root) == []
    assert cache.lease(key_for(data, settings).digest) is None


def test_a_build_that_fails_midway_leaves_nothing(tmp_path: Path, settings: EncoderSettings) -> None:
    data = write_rows(tmp_path / "rows.jsonl", 3 * BATCH_ROWS)
    cache = TokenCache(tmp_path / "cache")

    def breaks_midway() -> Iterator[tuple[int, Example]]:
        for row, example in iter_examples(data):
            if row == 2 * BATCH_ROWS + 5:
                raise OSError(errno.EIO, "the disk went away")
            yield row, example

    with pytest.raises(OSError, match="went away"):
        open_or_build(cache, key_for(data, settings), breaks_midway, settings)
    assert leftovers(cache.root) == []


def test_a_full_disk_is_disk_full_and_leaves_nothing(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_rows(tmp_path / "rows.jsonl", 2 * BATCH_ROWS)
    config, _ = resolve(TrainingConfig(model_name=str(tiny_model_dir), dataset=str(data), max_length=48))
    tokens = load_tokenizer_and_template(tiny_model_dir, config)
    written = {"batches": 0}
    real_write = TableWriter.write

    def fills_the_disk(self: TableWriter, batch: object) -> None:
        written["batches"] += 1
        if written["batches"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(TableWriter, "write", fills_the_disk)
    cache = TokenCache(tmp_path / "cache")
    with pytest.raises(FinetuneError) as failed:
        encode_file(data, "dataset", config, tokens, tiny_model_dir, CacheAccess(cache))
    assert failed.value.reason == "DISK_FULL" and failed.value.violations[0].field == "dataset"
    assert leftovers(cache.root) == []


def test_an_abandoned_staging_folder_is_removed(tmp_path: Path, settings: EncoderSettings) -> None:
    data = write_rows(tmp_path / "rows.jsonl", 10)
    cache = TokenCache(tmp_path / "cache")
    key = key_for(data, settings).digest
    dead = cache.new_staging(key)  # a builder that died: its lock is free
    (dead.tokens).write_bytes(b"half a table")
    other = cache.new_staging("0" * 32)
    build(cache, data, settings).close()
    assert not dead.root.exists(), "the next build of the key removes it"
    cache.evict()
    assert not other.root.exists(), "eviction removes any whose lock is free"
    assert leftovers(cache.root) == [key]


# --- size cap and removal --------------------------------------------------------------------------------------------


def test_least_recently_used_entries_beyond_the_cap_go_but_never_one_in_use(
    tmp_path: Path, settings: EncoderSettings
) -> None:
    data = write_rows(tmp_path / "rows.jsonl", 200)
    cache = TokenCache(tmp_path / "cache")
    keys = []
    for max_length in (40, 41, 42):
        build(cache, data, settings, max_length=max_length).close()
        keys.append(key_for(data, settings, max_length=max_length).digest)
    sizes = {e.key: sum(p.stat().st_size for p in e.root.iterdir()) for e in cache.dir.entries()}
    # Last used: 42 (oldest), then 40, then 41 (newest); 40 is open (in use).
    for key, used_at in zip(keys, (2_000, 3_000, 1_000), strict=True):
        os.utime(cache.dir.entry(key).used_marker, (used_at, used_at))
    in_use = cache.lease(keys[0])
    assert in_use is not None
    os.utime(cache.dir.entry(keys[0]).used_marker, (2_000, 2_000))  # leasing touched it; make it the oldest again
    cache.max_bytes = sizes[keys[1]] + sizes[keys[0]]  # room for two
    assert cache.evict() == [keys[2]], "the oldest in use stays; the next oldest goes"
    cache.max_bytes = 1
    assert cache.evict() == [keys[1]]
    assert [e.key for e in cache.dir.entries()] == [keys[0]]
    in_use.release()
    assert cache.evict() == [keys[0]]
    assert leftovers(cache.root) == []


def test_a_build_trims_the_cache_to_its_cap(tmp_path: Path, settings: EncoderSettings) -> None:
    data = write_rows(tmp_path / "rows.jsonl", 200)
    cache = TokenCache(tmp_path / "cache", max_bytes=1)  # smaller than any entry: only the one in use stays
    build(cache, data, settings, max_length=40).close()
    table = build(cache, data, settings, max_length=41)
    assert [e.key for e in cache.dir.entries()] == [key_for(data, settings, max_length=41).digest]
    table.close()


def test_remove_dataset_removes_the_entries_of_that_content(tmp_path: Path, settings: EncoderSettings) -> None:
    one = write_rows(tmp_path / "one.jsonl", 20)
    two = write_rows(tmp_path / "two.jsonl", 21)
    cache = TokenCache(tmp_path / "cache")
    for max_length in (40, 41):
        build(cache, one, settings, max_length=max_length).close()
    kept = build(cache, two, settings)
    sizes = {e.key: sum(f.stat().st_size for f in e.root.rglob("*") if f.is_file()) for e in cache.dir.entries()}
    removed = cache.remove_dataset(dataset_fingerprint(one))
    assert len(removed) == 2 and all(removed[key] == sizes[key] > 0 for key in removed)
    remaining = cache.dir.entries()
    assert [read_meta(e)["key"]["dataset"] for e in remaining] == [dataset_fingerprint(two)]
    assert cache.remove_dataset(dataset_fingerprint(two)) == {}, "an entry in use is kept"
    kept.close()
