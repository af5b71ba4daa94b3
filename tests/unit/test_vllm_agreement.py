"""ValidateConfig and Export judge vLLM compatibility by one rule: for each LoRA setting, the warnings validation gives
the config are exactly the problems Export finds in the adapter_config.json that training writes for it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from finetune_server.export.formats import ExportFormat
from finetune_server.export.vllm import vllm_compatibility
from finetune_server.settings import ServerSettings
from finetune_server.storage import layout
from finetune_server.training.config import LoraSettings, TrainingConfig
from finetune_server.training.engine.model_loading import load_for_training
from finetune_server.training.validation import validate

from ..conftest import write_alpaca

CASES = [
    # (lora settings, vLLM serves it, the --max-lora-rank the serve command names)
    pytest.param(LoraSettings(r=8), True, 8, id="r8"),
    pytest.param(LoraSettings(r=12), True, 16, id="r12"),  # any r <= --max-lora-rank serves; 12 is no allowed maximum
    pytest.param(LoraSettings(r=16), True, 16, id="r16"),
    pytest.param(LoraSettings(r=64), True, 64, id="r64"),
    pytest.param(LoraSettings(r=16, use_dora=True), False, 16, id="dora"),
    pytest.param(LoraSettings(r=16, modules_to_save=["lm_head"]), False, 16, id="modules_to_save"),
    pytest.param(LoraSettings(r=1024), False, 512, id="r1024"),
]


@pytest.mark.parametrize(("lora", "serves", "max_rank"), CASES)
def test_validation_and_export_give_the_same_verdict(
    lora: LoraSettings, serves: bool, max_rank: int, tiny_model_dir: Path, tmp_path: Path
) -> None:
    write_alpaca(tmp_path / "train.jsonl")
    settings = ServerSettings(data_dir=tmp_path / "data", model_roots=[tiny_model_dir.parent], dataset_roots=[tmp_path])
    report = validate(TrainingConfig(model_name=tiny_model_dir.name, dataset="train.jsonl", lora=lora), settings)
    assert report.valid, report.violations
    warned = [w.message for w in report.warnings if w.reason.startswith("VLLM_")]

    model, _ = load_for_training(report.resolved_config, tiny_model_dir, device="cpu")
    model.save_pretrained(tmp_path / "adapter")  # what training writes
    adapter_config = json.loads((tmp_path / "adapter" / layout.ADAPTER_CONFIG_FILE).read_text())
    exported = vllm_compatibility(adapter_config, ExportFormat.ADAPTER, artifact_name="a", base_model="m")

    assert exported.problems == warned
    assert exported.compatible is (not warned) is serves
    args = shlex.split(exported.serve_command)
    assert args[args.index("--max-lora-rank") + 1] == str(max_rank)
