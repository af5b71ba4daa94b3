"""LoRATrainer: the in-process IFineTuneService (validate, train with progress, cancel, export)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from finetune_client.convert import ConfigConversionError
from finetune_client.interface import IFineTuneService, ProgressUpdate
from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.inprocess.trainer import LoRATrainer
from finetune_server.settings import ServerSettings

from ..dataset_files import put_in_hub_cache


def _dataset(path: Path, n: int = 8) -> Path:
    rows = [{"question": f"What is the code of room {i}?", "answer": f"The code is {i * 11}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model_dir: Path, dataset: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model_name": str(model_dir),
        "dataset": str(dataset),
        "max_steps": 3,
        "max_length": 64,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "save_steps": 0,
        "lora": {"r": 8, "dropout": 0.0},
        **extra,
    }


def test_train_reports_progress_and_exports_the_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    trainer = LoRATrainer(tmp_path / "work", device="cpu")
    assert isinstance(trainer, IFineTuneService)
    updates: list[ProgressUpdate] = []
    result = trainer.train(_config(tiny_model_dir, _dataset(tmp_path / "qa.jsonl")), updates.append)

    assert result.success and result.state == "succeeded" and result["steps"] == 3
    assert [(u.step, u.total_steps) for u in updates] == [(1, 3), (2, 3), (3, 3)]
    assert all(u.job_id == result.job_id and u.tokens_per_second > 0 and u.memory_bytes > 0 for u in updates)
    assert updates[-1].fraction == 1.0
    assert result.final_loss == pytest.approx(updates[-1].loss)
    assert Path(result.adapter_location, "adapter_model.safetensors").is_file()

    exported = trainer.export_model(tmp_path / "export")
    assert exported.success and exported.format == "adapter"
    names = {f["path"] for f in exported.files}
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json"} <= names
    weights = next(f for f in exported.files if f["path"] == "adapter_model.safetensors")
    assert (
        weights["sha256"]
        == hashlib.sha256((tmp_path / "export" / "adapter_model.safetensors").read_bytes()).hexdigest()
    )
    assert exported.total_size_bytes == sum(f["size_bytes"] for f in exported.files)
    assert exported.vllm["compatible"] is True

    with pytest.raises(FinetuneError) as exists:
        trainer.export_model(tmp_path / "export")
    assert exists.value.kind is ErrorKind.ALREADY_EXISTS
    assert trainer.export_model(tmp_path / "export", overwrite=True).success
    merged = trainer.export_model(tmp_path / "merged", format="merged")
    assert merged.success and merged.format == "merged" and merged.vllm["compatible"] is True
    merged_names = {f["path"] for f in merged.files}
    assert "model.safetensors" in merged_names and "adapter_config.json" not in merged_names
    assert merged_names == {p.name for p in (tmp_path / "merged").iterdir()}


def test_validate_config_and_invalid_train(tmp_path: Path, tiny_model_dir: Path) -> None:
    trainer = LoRATrainer(tmp_path / "work", device="cpu")
    dataset = _dataset(tmp_path / "qa.jsonl")
    good = trainer.validate_config(_config(tiny_model_dir, dataset))
    assert good.valid and good["resolved_config"]["lora"]["alpha"] == 16
    assert good.dataset is not None and good.dataset["num_valid"] == 8

    bad_config = _config(tiny_model_dir, dataset, lora={"r": 0})
    bad = trainer.validate_config(bad_config)
    assert not bad.valid and any(v.field == "lora.r" for v in bad.violations)
    with pytest.raises(FinetuneError):
        trainer.train(bad_config)
    assert not (tmp_path / "work" / "jobs").exists() or not any((tmp_path / "work" / "jobs").iterdir())
    # Reported as the remote client reports it: a result, each problem at its field path.
    unknown = trainer.validate_config({**_config(tiny_model_dir, dataset), "learning_rat": 1e-3})
    assert not unknown.valid and [(v.field, v.reason) for v in unknown.violations] == [
        ("learning_rat", "UNKNOWN_FIELD")
    ]
    with pytest.raises(ConfigConversionError) as unconvertible:
        trainer.train({**_config(tiny_model_dir, dataset), "learning_rat": 1e-3})
    assert unconvertible.value.violations == unknown.violations


def test_cancel_from_the_progress_callback(tmp_path: Path, tiny_model_dir: Path) -> None:
    trainer = LoRATrainer(tmp_path / "work", device="cpu")

    def stop_after_first(update: ProgressUpdate) -> None:
        trainer.cancel()

    result = trainer.train(_config(tiny_model_dir, _dataset(tmp_path / "qa.jsonl"), max_steps=10), stop_after_first)
    assert not result.success and result.state == "cancelled" and result.steps == 1
    with pytest.raises(FinetuneError) as missing:
        trainer.export_model(tmp_path / "export")
    assert missing.value.reason == "ADAPTER_NOT_FOUND"


def test_a_hub_dataset_trains_from_the_settings_own_hub_cache(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation and the training run both read the hub dataset from `settings.hf_cache_dir`, not the default one."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "not-this-cache"))
    rows = [{"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(8)]
    put_in_hub_cache(tmp_path / "hub-cache", "org/facts", {"data/train-00000-of-00001.parquet": rows})
    work = tmp_path / "work"
    settings = ServerSettings(
        data_dir=work, model_roots=[Path("/")], dataset_roots=[Path("/")], hf_cache_dir=tmp_path / "hub-cache",
        offline=True,
    )  # fmt: skip
    result = LoRATrainer(work, settings=settings, device="cpu").train(_config(tiny_model_dir, Path("org/facts")))
    assert result.success, result.error
    assert result.steps == 3
