"""Loading a base model for LoRA training: targets, quantisation, checkpointing, DoRA, hub ids via the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
from finetune_server.training.engine.model_loading import add_lora, linear_module_names, load_for_training
from finetune_server.training.model_source import resolve_model_dir

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _config(model_dir: Path, **kwargs: object) -> TrainingConfig:
    lora = kwargs.pop("lora", LoraSettings(r=4, dropout=0.0))
    config, _ = resolve(TrainingConfig(model_name=str(model_dir), lora=lora, **kwargs))  # type: ignore[arg-type]
    return config


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def test_default_targets_every_decoder_projection_in_fp32(tiny_model_dir: Path) -> None:
    model, tokenizer_dir = load_for_training(_config(tiny_model_dir), tiny_model_dir, device="cpu")
    assert tokenizer_dir == tiny_model_dir
    adapted = _lora_layers(model)
    assert sorted({name.rsplit(".", 1)[-1] for name in adapted}) == PROJECTIONS
    assert len(adapted) == 2 * len(PROJECTIONS)  # two decoder layers
    assert not any("lm_head" in name for name in adapted)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.peft_config["default"].r == 4
    assert model.peft_config["default"].lora_alpha == 8  # resolve(): 2 * r
    assert not model.peft_config["default"].modules_to_save


def test_linear_module_names_leave_out_lm_head(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert linear_module_names(base) == PROJECTIONS


def test_explicit_targets_dora_modules_to_save_and_checkpointing(tiny_model_dir: Path) -> None:
    config = _config(
        tiny_model_dir,
        gradient_checkpointing=True,
        lora=LoraSettings(
            r=4, alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"]
        ),
    )
    model, _ = load_for_training(config, tiny_model_dir, device="cpu")
    assert sorted({name.rsplit(".", 1)[-1] for name in _lora_layers(model)}) == ["q_proj", "v_proj"]
    assert any("lora_magnitude_vector" in name for name, _ in model.named_parameters())
    assert any("modules_to_save" in name and p.requires_grad for name, p in model.named_parameters())
    assert model.base_model.model.is_activation_checkpointing
    ids = torch.randint(0, 500, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # non-reentrant checkpointing still reaches the adapter
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_unknown_target_module_lists_what_exists(tiny_model_dir: Path) -> None:
    config = _config(tiny_model_dir, lora=LoraSettings(r=4, target_modules=["q_proj", "query_key_value"]))
    with pytest.raises(FinetuneError) as info:
        load_for_training(config, tiny_model_dir, device="cpu")
    error = info.value
    assert error.kind is ErrorKind.INVALID_ARGUMENT
    assert error.reason == "TARGET_MODULES_NOT_FOUND"
    assert [v.field for v in error.violations] == ["lora.target_modules"]
    assert "query_key_value" in error.message and "q_proj" in error.message and "down_proj" in error.message


@pytest.mark.parametrize(
    ("flag", "layer_type"), [("load_in_8bit", bnb.nn.Linear8bitLt), ("load_in_4bit", bnb.nn.Linear4bit)]
)
def test_quantised_base_with_trainable_adapter(tiny_model_dir: Path, flag: str, layer_type: type) -> None:
    model, _ = load_for_training(_config(tiny_model_dir, **{flag: True}), tiny_model_dir, device="cpu")
    layers = _lora_layers(model)
    assert layers and all(isinstance(m.base_layer, layer_type) for m in layers.values())
    base = next(iter(layers.values())).base_layer
    if flag == "load_in_4bit":
        assert base.weight.quant_type == "nf4"
        assert base.weight.quant_state.nested  # double quantisation
        assert base.weight.dtype == torch.uint8
    else:
        assert base.weight.dtype == torch.int8
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def _fake_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    return snapshot


def test_hub_id_resolves_from_the_cache_offline(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    snapshot = _fake_hub_cache(tmp_path / "hub", "acme/tiny-chat", tiny_model_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir("acme/tiny-chat", cache_dir=tmp_path / "hub") == snapshot
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_dir("acme/tiny-chat") == snapshot


def test_hub_id_not_cached_offline_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FinetuneError) as info:
        resolve_model_dir("acme/not-there", cache_dir=tmp_path / "empty")
    assert info.value.reason == "MODEL_NOT_CACHED"
    assert info.value.kind is ErrorKind.FAILED_PRECONDITION


def test_local_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError) as info:
        resolve_model_dir(tmp_path)
    assert info.value.reason == "MODEL_INVALID"


def test_every_trainable_parameter_is_fp32_on_a_16_bit_base_so_fp16_loss_scaling_works(tiny_model_dir: Path) -> None:
    """modules_to_save copies the fp16 module; GradScaler refuses fp16 gradients at the first step."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16)
    config = _config(tiny_model_dir, lora=LoraSettings(r=4, dropout=0.0, modules_to_save=["lm_head"]))
    model = add_lora(base, config, ["q_proj", "v_proj"])
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in name for name in trainable)
    assert set(trainable.values()) == {torch.float32}, trainable
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}  # the base stays 16-bit

    # One fp16 step with loss scaling, as on a GPU (GradScaler works on the CPU too).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # raised "Attempting to unscale FP16 gradients" before
    scaler.step(optimizer)
    scaler.update()
