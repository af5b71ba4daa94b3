"""Exports of a really trained tiny adapter: files, checksums, template, merged weights that equal base+adapter.

The module trains the tiny model once in-process (10 steps, a checkpoint every step); each test exports from it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune_server.demo.tiny_model import CHATML_TEMPLATE
from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.export.package import ArtifactManifest, export_artifact, generation_settings, merge_dtype
from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
from finetune_server.training.engine.recipe import run_training
from finetune_server.workers.protocol import ExportProgress
from finetune_server.workers.supervisor import run_export

from ..conftest import write_alpaca

STEPS = 10
# The trained template differs from the tiny model's own, so "the template used in training" is observable.
TRAINED_TEMPLATE = "{#- trained with this one -#}\n" + CHATML_TEMPLATE
Progress = list[tuple[str, float, str]]


def train(model_dir: Path, out: Path, **values: Any) -> dict[str, Any]:
    dataset = write_alpaca(out.parent / f"{out.name}.jsonl")
    settings: dict[str, Any] = {
        "max_steps": STEPS,
        "save_steps": 1,
        "save_total_limit": 0,
        "max_length": 96,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "chat_template": TRAINED_TEMPLATE,
    }
    settings.update(values)
    config, _ = resolve(
        TrainingConfig(
            model_name=str(model_dir),
            dataset=str(dataset),
            lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
            **settings,
        )
    )
    run_training(
        config, model_ref=model_dir, dataset_path=dataset, output_dir=out, on_event=lambda e: None, device="cpu"
    )
    return config.to_dict()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, dict[str, Any]]:
    job_dir = tmp_path_factory.mktemp("jobs") / "job-1"
    return job_dir, train(tiny_model_dir, job_dir)


def export(
    job: tuple[Path, dict[str, Any]], model_dir: Path, target: Path, fmt: str, step: int | None = None
) -> tuple[ArtifactManifest, Progress]:
    progress: Progress = []
    manifest = export_artifact(
        job_dir=job[0],
        config=job[1],
        model_ref=str(model_dir),
        fmt=fmt,
        checkpoint_step=step,
        target_dir=target,
        on_progress=lambda stage, fraction, message: progress.append((stage, fraction, message)),
    )
    return manifest, progress


@pytest.fixture(scope="module")
def adapter_export(
    job: tuple[Path, dict[str, Any]], tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, ArtifactManifest, Progress]:
    target = tmp_path_factory.mktemp("artifacts") / "art-adapter"
    return (target, *export(job, tiny_model_dir, target, "adapter"))


@pytest.fixture(scope="module")
def merged_export(
    job: tuple[Path, dict[str, Any]], tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, ArtifactManifest, Progress]:
    target = tmp_path_factory.mktemp("artifacts") / "art-merged"
    return (target, *export(job, tiny_model_dir, target, "merged"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_manifest_matches_folder(folder: Path, manifest: ArtifactManifest) -> None:
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert [f.path for f in manifest.files] == on_disk
    for entry in manifest.files:
        assert entry.size_bytes == (folder / entry.path).stat().st_size
        assert entry.sha256 == sha256(folder / entry.path)
    assert manifest.total_size_bytes == sum(f.size_bytes for f in manifest.files)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]  # no staging left behind


def im_end_id(model_dir: Path) -> int:
    from transformers import AutoTokenizer

    return int(AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|im_end|>"))


def eos_ids(generation_config: dict[str, Any]) -> list[int]:
    value = generation_config["eos_token_id"]
    return value if isinstance(value, list) else [value]


def sample_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "<|im_start|>user\nWhat is the secret number of city 3?<|im_end|>\n<|im_start|>assistant\nIt is"
    return torch.tensor([tokenizer(text)["input_ids"]])


@torch.no_grad()
def peft_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base logits, base+adapter logits), fp32, through peft without merging."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    plain = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return plain, model(input_ids=ids).logits


@torch.no_grad()
def plain_logits(merged_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits


# --- ADAPTER ----------------------------------------------------------------------------------------------------------


def test_adapter_export_has_the_adapter_tokenizer_and_training_template(
    job: tuple[Path, dict[str, Any]], adapter_export: tuple[Path, ArtifactManifest, Progress]
) -> None:
    folder, manifest, progress = adapter_export
    paths = {f.path for f in manifest.files}
    expected = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected | {"chat_template.jinja", "generation_config.json"} <= paths
    assert (folder / "adapter_model.safetensors").read_bytes() == (
        job[0] / "adapter/adapter_model.safetensors"
    ).read_bytes()
    assert (folder / "chat_template.jinja").read_text() == TRAINED_TEMPLATE
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == TRAINED_TEMPLATE
    assert (manifest.format, manifest.step) == ("adapter", STEPS)
    assert manifest.vllm.compatible and manifest.vllm.problems == []
    assert "--max-lora-rank 16" in manifest.vllm.serve_command
    assert "--chat-template ./art-adapter/chat_template.jinja" in manifest.vllm.serve_command
    assert_manifest_matches_folder(folder, manifest)
    fractions = [fraction for _, fraction, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"saving", "checksumming"} <= {stage for stage, _, _ in progress}


def test_adapter_generation_config_stops_at_end_of_turn(
    adapter_export: tuple[Path, ArtifactManifest, Progress], tiny_model_dir: Path
) -> None:
    generation = json.loads((adapter_export[0] / "generation_config.json").read_text())
    assert im_end_id(tiny_model_dir) in eos_ids(generation)
    assert generation["pad_token_id"] is not None


# --- MERGED -----------------------------------------------------------------------------------------------------------


def test_merged_loads_with_plain_transformers_and_equals_base_plus_adapter(
    job: tuple[Path, dict[str, Any]], merged_export: tuple[Path, ArtifactManifest, Progress], tiny_model_dir: Path
) -> None:
    folder, manifest, progress = merged_export
    paths = {f.path for f in manifest.files}
    assert "adapter_config.json" not in paths and any(p.endswith(".safetensors") for p in paths)
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= paths
    assert (folder / "chat_template.jinja").read_text() == TRAINED_TEMPLATE
    assert (manifest.format, manifest.step, manifest.base_model) == ("merged", STEPS, str(tiny_model_dir))
    assert manifest.vllm.compatible and manifest.vllm.serve_command == "vllm serve ./art-merged"
    assert_manifest_matches_folder(folder, manifest)
    stages = [stage for stage, _, _ in progress]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == [
        "loading_base",
        "merging",
        "saving",
        "checksumming",
    ]

    ids = sample_ids(folder)
    base, with_adapter = peft_logits(tiny_model_dir, job[0] / "adapter", ids)
    merged = plain_logits(folder, ids)
    assert (with_adapter - base).abs().max() > 1e-3  # the adapter changes the model, so equality below means something
    assert (merged - with_adapter).abs().max() < 1e-4
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is True  # tied in the base, untouched by a q/v/down adapter


def test_merged_generation_config_stops_at_end_of_turn(
    merged_export: tuple[Path, ArtifactManifest, Progress], tiny_model_dir: Path
) -> None:
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(merged_export[0])
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert im_end_id(tiny_model_dir) in eos
    assert generation.pad_token_id is not None


def test_generation_eos_adds_the_templates_end_of_turn_to_the_tokenizers_eos(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A base whose eos is <|endoftext|> (like Qwen2.5 base) trained with ChatML must also stop at <|im_end|>."""
    variant = tmp_path / "eos-endoftext"
    shutil.copytree(tiny_model_dir, variant)
    tokenizer_config = json.loads((variant / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = "<|endoftext|>"
    (variant / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(variant)
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert endoftext != im_end

    settings = generation_settings({"eos_token_id": endoftext, "temperature": 0.7}, variant, CHATML_TEMPLATE)
    assert eos_ids(settings) == [endoftext, im_end] and settings["temperature"] == 0.7
    # A template that ends turns with no special token adds nothing beyond the tokenizer's eos.
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert eos_ids(generation_settings({}, variant, plain)) == [endoftext]


# --- checkpoints ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unpadded_job(job: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints 2, 9 and 10 named without zero padding (string order 10 < 2 < 9), and no final adapter."""
    job_dir = tmp_path_factory.mktemp("jobs") / "job-unpadded"
    for step in (2, 9, 10):
        shutil.copytree(job[0] / f"checkpoints/step-{step:08d}", job_dir / f"checkpoints/step-{step}")
    return job_dir


@pytest.mark.parametrize("step", [10, 9])
def test_checkpoint_export_picks_the_integer_step(
    step: int, job: tuple[Path, dict[str, Any]], unpadded_job: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    manifest, _ = export((unpadded_job, job[1]), tiny_model_dir, tmp_path / "art", "adapter", step=step)
    exported = (tmp_path / "art/adapter_model.safetensors").read_bytes()
    assert exported == (job[0] / f"checkpoints/step-{step:08d}/adapter/adapter_model.safetensors").read_bytes()
    other = 9 if step == 10 else 10
    assert exported != (job[0] / f"checkpoints/step-{other:08d}/adapter/adapter_model.safetensors").read_bytes()
    assert manifest.step == step
    # No final adapter in this job: the template is chosen again from the config, as training chose it.
    assert (tmp_path / "art/chat_template.jinja").read_text() == TRAINED_TEMPLATE


def test_missing_checkpoint_step_is_not_found_with_the_available_steps(
    job: tuple[Path, dict[str, Any]], unpadded_job: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(FinetuneError) as caught:
        export((unpadded_job, job[1]), tiny_model_dir, tmp_path / "art", "adapter", step=5)
    assert (caught.value.kind, caught.value.reason) == (ErrorKind.NOT_FOUND, "CHECKPOINT_NOT_FOUND")
    assert "2, 9, 10" in caught.value.message
    assert caught.value.metadata["available_steps"] == "2,9,10"
    with pytest.raises(FinetuneError) as final:
        export((unpadded_job, job[1]), tiny_model_dir, tmp_path / "art", "adapter")
    assert (final.value.kind, final.value.reason) == (ErrorKind.NOT_FOUND, "ADAPTER_NOT_FOUND")
    assert not (tmp_path / "art").exists() and list(tmp_path.iterdir()) == []


# --- quantised training, modules_to_save ---------------------------------------------------------------------------


def test_4bit_trained_adapter_merges_into_a_full_precision_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    job_dir = tmp_path / "job-4bit"
    config = train(tiny_model_dir, job_dir, max_steps=2, save_steps=0, load_in_4bit=True)
    manifest, _ = export((job_dir, config), tiny_model_dir, tmp_path / "art", "merged")
    folder = tmp_path / "art"
    assert manifest.step == 2
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    for name in (f.path for f in manifest.files if f.path.endswith(".safetensors")):
        for key, tensor in load_file(folder / name).items():
            assert tensor.dtype == torch.float32, key  # fp32 on CPU: not int8/uint8 packed 4-bit weights
    ids = sample_ids(folder)
    _, with_adapter = peft_logits(tiny_model_dir, job_dir / "adapter", ids)
    assert (plain_logits(folder, ids) - with_adapter).abs().max() < 1e-4


def test_modules_to_save_lm_head_on_a_tied_model_is_saved_untied(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A trained lm_head copy must survive the merge: saved as tied, it would be dropped for the old embeddings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    job_dir = tmp_path / "job"
    model.save_pretrained(job_dir / "adapter")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, job_dir / "adapter" / name)
    (job_dir / "adapter/chat_template.jinja").write_text(CHATML_TEMPLATE)

    manifest, _ = export((job_dir, {}), tiny_model_dir, tmp_path / "art", "merged")
    assert json.loads((tmp_path / "art/config.json").read_text())["tie_word_embeddings"] is False
    ids = sample_ids(tmp_path / "art")
    _, with_adapter = peft_logits(tiny_model_dir, job_dir / "adapter", ids)
    assert (plain_logits(tmp_path / "art", ids) - with_adapter).abs().max() < 1e-4
    assert manifest.vllm.compatible  # merged weights carry the lm_head; the adapter itself would not be
    adapter_manifest, _ = export((job_dir, {}), tiny_model_dir, tmp_path / "art-adapter", "adapter")
    assert any("modules_to_save" in p for p in adapter_manifest.vllm.problems)


def test_merge_keeps_the_bases_dtype(job: tuple[Path, dict[str, Any]], tiny_model_dir: Path, tmp_path: Path) -> None:
    """A bf16 base ships bf16 (it was fp32 from a CPU merge and bf16 from a GPU one, whatever the base)."""
    from transformers import AutoModelForCausalLM

    assert merge_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert merge_dtype({"torch_dtype": "float16"}) == "float16"  # configs written before transformers 5
    assert merge_dtype({"dtype": "float32"}) == "float32"
    assert merge_dtype({}) == "auto"  # transformers reads it off the weights
    bf16_base = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, bf16_base / name)
    manifest, progress = export(job, bf16_base, tmp_path / "art", "merged")
    assert "loading the base model in bfloat16 on cpu" in [message for _, _, message in progress]
    dtypes = {
        tensor.dtype
        for name in (f.path for f in manifest.files if f.path.endswith(".safetensors"))
        for tensor in load_file(tmp_path / "art" / name).values()
    }
    assert dtypes == {torch.bfloat16}


# --- the worker subprocess -----------------------------------------------------------------------------------------


def test_export_worker_module_does_not_import_torch() -> None:
    code = "import sys, finetune_server.workers.export; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def leftovers(folder: Path, prefix: str) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(prefix)]


def spec_for(job: tuple[Path, dict[str, Any]], model_dir: Path, target: Path, fmt: str) -> dict[str, Any]:
    return {
        "job_dir": str(job[0]),
        "config": job[1],
        "model_ref": str(model_dir),
        "fmt": fmt,
        "checkpoint_step": None,
        "target_dir": str(target),
        "hub_cache_dir": None,
        "hub_offline": True,
    }


@pytest.mark.slow
async def test_run_export_in_a_subprocess_relays_progress_and_returns_the_manifest(
    job: tuple[Path, dict[str, Any]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    seen: list[ExportProgress] = []

    async def on_progress(message: ExportProgress) -> None:
        seen.append(message)

    target = tmp_path / "artifacts/art-1"
    spec = {**spec_for(job, tiny_model_dir, target, "merged"), "base_model": "org/tiny", "device": "cpu"}
    result = await run_export(spec, on_progress=on_progress, log_path=tmp_path / "art-1.log")
    manifest = ArtifactManifest.from_dict(result)
    assert (manifest.format, manifest.step, manifest.base_model) == ("merged", STEPS, "org/tiny")
    assert_manifest_matches_folder(target, manifest)
    assert all(isinstance(m, ExportProgress) for m in seen)
    fractions = [m.fraction for m in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert seen[0].stage == "loading_base" and seen[-1].stage == "checksumming"
    assert leftovers(tmp_path, ".export-spec-") == []  # the spec file is cleaned up


async def test_run_export_reports_a_failed_export_as_its_error(
    job: tuple[Path, dict[str, Any]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    async def on_progress(message: ExportProgress) -> None:
        raise AssertionError("no progress expected")

    spec = spec_for((tmp_path / "no-such-job", job[1]), tiny_model_dir, tmp_path / "art", "adapter")
    with pytest.raises(FinetuneError) as caught:
        await run_export(spec, on_progress=on_progress, log_path=tmp_path / "art.log")
    assert (caught.value.kind, caught.value.reason) == (ErrorKind.NOT_FOUND, "ADAPTER_NOT_FOUND")
    assert "no-such-job has no final adapter" in caught.value.message
    assert not (tmp_path / "art").exists()


async def test_run_export_reports_a_crash_with_the_log_tail(
    job: tuple[Path, dict[str, Any]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    async def on_progress(message: ExportProgress) -> None:
        pass

    broken = tmp_path / "broken-job"
    (broken / "adapter").mkdir(parents=True)
    (broken / "adapter/adapter_config.json").write_text("{not json")  # an unexpected exception in the worker
    spec = spec_for((broken, job[1]), tiny_model_dir, tmp_path / "art", "adapter")
    (tmp_path / ".tmp-art-killed").mkdir()  # what a worker killed mid-export leaves (it cannot clean up itself)
    with pytest.raises(FinetuneError) as caught:
        await run_export(spec, on_progress=on_progress, log_path=tmp_path / "art.log")
    assert (caught.value.kind, caught.value.reason) == (ErrorKind.UNAVAILABLE, "EXPORT_CRASHED")
    assert "exit code 2" in caught.value.message and "JSONDecodeError" in caught.value.message
    assert leftovers(tmp_path, ".tmp-art-") == []  # staging folders of the dead worker are removed
