"""Validation of big datasets: every record parsed, tokens measured on an even sample, or read from the token cache
of a job that tokenized the same data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_server.settings import ServerSettings
from finetune_server.training.config import TrainingConfig
from finetune_server.training.data import check_dataset, load_chat_template, load_tokenizer
from finetune_server.training.data.checks import ALL, SAMPLE, TOKEN_CACHE
from finetune_server.training.data.token_cache import TokenCache
from finetune_server.training.dataset_source import training_refs
from finetune_server.training.engine.data_setup import CacheAccess, encode_file, load_tokenizer_and_template
from finetune_server.training.validation import validate


def write_growing(path: Path, n: int, *, broken_every: int = 0, long_prompt_every: int = 0) -> Path:
    """Rows whose answers grow along the file (a sample of only its head would miss the longest), some broken JSON
    lines and some prompts that fill max_length 48 alone."""
    with path.open("w") as f:
        for i in range(n):
            if broken_every and i % broken_every == broken_every - 1:
                f.write('{"instruction": "cut\n')
                continue
            prompt = f"What is item {i}?" + (
                " Tell me all about it." * 12 if long_prompt_every and i % long_prompt_every == 0 else ""
            )
            f.write(json.dumps({"instruction": prompt, "output": "word " * (i // 20) + "end."}) + "\n")
    return path


def test_a_big_dataset_is_parsed_whole_and_measured_on_an_even_sample(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows, broken_every = 1200, 97
    path = write_growing(tmp_path / "growing.jsonl", rows, broken_every=broken_every)
    tokenizer, template = load_tokenizer(tiny_model_dir), load_chat_template(tiny_model_dir)
    common = {"name": path.name, "tokenizer": tokenizer, "template": template, "max_length": 64}
    exact = check_dataset(path, **common, sample_examples=10_000)  # type: ignore[arg-type]
    sampled = check_dataset(path, **common, sample_examples=60)  # type: ignore[arg-type]
    assert exact.token_stats is not None and sampled.token_stats is not None
    assert exact.token_stats.source == ALL and exact.token_stats.examples_measured == exact.num_valid
    assert sampled.token_stats.source == SAMPLE and 60 <= sampled.token_stats.examples_measured < 120
    # The schema check stays whole: every record counted, every broken line reported with its number.
    broken = rows // broken_every
    assert (sampled.num_valid, sampled.num_invalid) == (exact.num_valid, exact.num_invalid) == (rows - broken, broken)
    assert [v.line for v in sampled.violations] == [v.line for v in exact.violations]
    # The sample spans the file: its longest is within a few tokens of the true longest, at the file's end.
    assert exact.token_stats.max - 10 <= sampled.token_stats.max <= exact.token_stats.max
    assert sampled.token_stats.p50 == pytest.approx(exact.token_stats.p50, rel=0.05)
    assert sampled.token_stats.total == pytest.approx(exact.token_stats.total, rel=0.03)
    assert exact.num_over_max_length > 0
    assert sampled.num_over_max_length == pytest.approx(exact.num_over_max_length, rel=0.1)


def _settings(tmp_path: Path, model: Path, **kwargs: object) -> ServerSettings:
    return ServerSettings(
        data_dir=tmp_path / "data",
        model_roots=[model.parent],
        dataset_roots=[tmp_path],
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_sampled_validation_says_so_and_estimates_memory_at_max_length(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_growing(tmp_path / "growing.jsonl", 600)
    config = TrainingConfig(model_name=tiny_model_dir.name, dataset="growing.jsonl", max_length=256)
    exact = validate(config, _settings(tmp_path, tiny_model_dir))
    sampled = validate(config, _settings(tmp_path, tiny_model_dir, validation_sample_examples=50))
    assert exact.valid and sampled.valid
    assert not any(w.reason == "TOKEN_STATS_SAMPLED" for w in exact.warnings)
    notes = [w.message for w in sampled.warnings if w.reason == "TOKEN_STATS_SAMPLED"]
    assert len(notes) == 1 and "600" in notes[0]
    assert exact.memory_estimate is not None and sampled.memory_estimate is not None
    # The exact run knows its longest example (< 256 tokens); the sample might have missed it: max_length is assumed.
    assert sampled.memory_estimate.total_bytes > exact.memory_estimate.total_bytes


def test_after_a_job_tokenized_the_data_validation_reads_the_exact_figures_from_its_cache(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    write_growing(tmp_path / "data.jsonl", 400, broken_every=50, long_prompt_every=37)
    settings = _settings(tmp_path, tiny_model_dir)
    config = TrainingConfig(model_name=tiny_model_dir.name, dataset="data.jsonl", max_length=48, skip_invalid_rows=True)
    first = validate(config, settings)
    assert first.dataset is not None and first.dataset.token_stats is not None
    assert first.dataset.token_stats.source == ALL

    # What a job's worker does with the resolved config: tokenize into the token cache.
    resolved = first.resolved_config
    _, dataset_ref, _ = training_refs(resolved, settings)
    tokens = load_tokenizer_and_template(tiny_model_dir, resolved)
    access = CacheAccess(TokenCache(settings.token_cache_dir))
    encode_file(Path(dataset_ref), "dataset", resolved, tokens, tiny_model_dir, access).table.close()

    second = validate(config, settings)
    assert second.dataset is not None and second.dataset.token_stats is not None
    assert second.dataset.token_stats.source == TOKEN_CACHE, "nothing was tokenized again"
    figures = ("min", "max", "mean", "p50", "p95", "total", "examples_measured")
    assert {f: getattr(second.dataset.token_stats, f) for f in figures} == {
        f: getattr(first.dataset.token_stats, f) for f in figures
    }
    for same in ("num_examples", "num_valid", "num_invalid", "num_over_max_length", "format_counts"):
        assert getattr(second.dataset, same) == getattr(first.dataset, same), same
    assert second.dataset.violations == first.dataset.violations
    assert second.warnings == first.warnings  # ANSWER_TRUNCATED rows and INVALID_ROWS_SKIPPED alike
    assert any(w.reason == "ANSWER_TRUNCATED" for w in second.warnings)
