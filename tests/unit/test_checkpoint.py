"""Checkpoints: atomic writes, newest complete one by integer step, pruning, and an exact state round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_server.storage import layout
from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
from finetune_server.training.engine import checkpoint as ckpt
from finetune_server.training.engine.model_loading import load_for_training


def _complete(root: Path, name: str) -> Path:
    folder = root / layout.CHECKPOINTS_DIR / name
    folder.mkdir(parents=True)
    (folder / layout.CHECKPOINT_COMPLETE_MARKER).write_text("x")
    return folder


def test_latest_is_by_integer_step_not_string_order(tmp_path: Path) -> None:
    for name in ("step-500", "step-999", "step-1000"):  # as strings, step-999 sorts last
        _complete(tmp_path, name)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-1000"
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [500, 999, 1000]


def test_temp_and_incomplete_folders_are_ignored(tmp_path: Path) -> None:
    _complete(tmp_path, layout.checkpoint_name(20))
    half = tmp_path / "checkpoints" / ".tmp-step-00000040-abc"  # a save that crashed before its rename
    (half / "adapter").mkdir(parents=True)
    (half / "optimizer.pt").write_bytes(b"partial")
    (tmp_path / layout.CHECKPOINTS_DIR / layout.checkpoint_name(30)).mkdir()  # no `complete` marker
    (tmp_path / layout.CHECKPOINTS_DIR / "notes.txt").write_text("not a checkpoint")

    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000020"
    assert ckpt.remove_stale_temp(tmp_path) == [half]
    assert not half.exists()


def test_no_checkpoint(tmp_path: Path) -> None:
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.prune(tmp_path, 2) == []


def test_prune_keeps_the_newest_by_step(tmp_path: Path) -> None:
    for step in (5, 100, 20, 1000, 300):
        _complete(tmp_path, layout.checkpoint_name(step))
    removed = ckpt.prune(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step-00000005", "step-00000020", "step-00000100"]
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [300, 1000]
    assert ckpt.prune(tmp_path, 0) == []  # 0: keep everything
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_prune_keeps_the_best_evaluated_checkpoint_too(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _complete(tmp_path, layout.checkpoint_name(step))
    removed = ckpt.prune(tmp_path, 2, best_step=10)
    assert [p.name for p in removed] == ["step-00000020"]
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [10, 30, 40]
    assert ckpt.prune(tmp_path, 2, best_step=35) == [tmp_path / "checkpoints" / "step-00000010"]  # no such checkpoint


@pytest.fixture()
def lora_model(tiny_model_dir: Path):
    config, _ = resolve(TrainingConfig(model_name=str(tiny_model_dir), lora=LoraSettings(r=4, dropout=0.0)))
    model, _ = load_for_training(config, tiny_model_dir, device="cpu")
    return model


def _one_step(model, optimizer, scheduler) -> None:
    ids = torch.randint(0, 500, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_save_and_load_restore_everything(tmp_path: Path, lora_model) -> None:
    params = [p for p in lora_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    _one_step(lora_model, optimizer, scheduler)
    saved_weights = {n: p.detach().clone() for n, p in lora_model.named_parameters() if p.requires_grad}
    saved_lr = scheduler.get_last_lr()
    rng = ckpt.capture_rng_states()
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(3))

    path = ckpt.save_checkpoint(
        tmp_path,
        7,
        model=lora_model,
        optimizer=optimizer,
        scheduler=scheduler,
        rng_states=[rng],
        data_position=ckpt.DataPosition(epoch=1, batch_index=3),
        extra={"history": [{"step": 1, "loss": 2.5}]},
    )
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert (path / "adapter" / "adapter_model.safetensors").is_file()
    assert (path / layout.CHECKPOINT_COMPLETE_MARKER).is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]

    # Move on: weights, optimizer moments, schedule and RNG all change.
    _one_step(lora_model, optimizer, scheduler)
    _one_step(lora_model, optimizer, scheduler)
    assert scheduler.get_last_lr() != saved_lr

    fresh_optimizer = torch.optim.AdamW(params, lr=1e-2)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda step: 1.0 / (1 + step))
    state = ckpt.load_checkpoint(path, model=lora_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler)

    assert state.step == 7
    assert state.data_position == ckpt.DataPosition(1, 3)
    assert state.extra == {"history": [{"step": 1, "loss": 2.5}]}
    for name, param in lora_model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, saved_weights[name]), name
    assert fresh_scheduler.get_last_lr() == saved_lr
    moments = [s["exp_avg"] for s in fresh_optimizer.state.values()]
    assert len(moments) == len(params) and all(torch.isfinite(m).all() for m in moments)
    assert int(next(iter(fresh_optimizer.state.values()))["step"]) == 1
    ckpt.restore_rng_states(ckpt.rng_states_for_rank(state.rng_states, 0))
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == expected_draws[:2]
    assert torch.equal(draws[2], expected_draws[2])


def _lora_model(model_dir: Path) -> object:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["q_proj"]))


def test_a_failed_save_leaves_no_checkpoint_and_keeps_the_previous(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    def half_written(_tensors: object, filename: str, **_: object) -> None:  # a full disk, mid-write
        Path(filename).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    previous = _complete(tmp_path, layout.checkpoint_name(10))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(
            tmp_path,
            20,
            model=_lora_model(tiny_model_dir),
            optimizer=optimizer,
            scheduler=scheduler,
            rng_states=[ckpt.capture_rng_states()],
            data_position=ckpt.DataPosition(0, 0),
        )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000010"]
    assert ckpt.latest_checkpoint(tmp_path) == previous


def test_a_checkpoint_adapter_loads_as_a_peft_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The checkpoint's adapter folder is a PEFT adapter: `PeftModel.from_pretrained` (what exports of a checkpoint
    use) loads exactly the saved weights."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = _lora_model(tiny_model_dir)
    for name, param in model.named_parameters():  # type: ignore[attr-defined]
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # not the zeros it starts at
    ckpt.save_adapter_weights(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    saved, again = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["inference_mode"] is True


def _save(tmp_path: Path, model: object, optimizer: torch.optim.Optimizer, **kwargs: object) -> Path:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return ckpt.save_checkpoint(
        tmp_path,
        1,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data_position=ckpt.DataPosition(0, 1),
        **kwargs,  # type: ignore[arg-type]
    )


def _load(path: Path, model: object, optimizer: torch.optim.Optimizer, **kwargs: object) -> ckpt.CheckpointState:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return ckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, **kwargs)  # type: ignore[arg-type]


def test_the_fp16_loss_scalers_state_survives_a_resume(tmp_path: Path, lora_model) -> None:
    """A resumed fp16 run goes on with the scale it had; a fresh 65536 would skip steps while it backs off."""
    params = [p for p in lora_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    for grad in (float("inf"), 1.0, 1.0):  # one overflow halves the scale, then two good steps count to growth
        scaler.scale(torch.zeros(())).item()  # the scaler starts its scale lazily, at the first scale()
        for p in params:
            p.grad = torch.full_like(p, grad)
        scaler.step(optimizer)
        scaler.update()
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0**15 and saved["_growth_tracker"] == 2
    path = _save(tmp_path, lora_model, optimizer, rng_states=[ckpt.capture_rng_states()], scaler=scaler)

    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    _load(path, lora_model, torch.optim.AdamW(params, lr=0.1), scaler=fresh)
    assert fresh.state_dict() == saved


def test_optimizer_step_counters_are_loaded_on_the_cpu_wherever_the_parameters_are(tmp_path: Path) -> None:
    """Loaded onto the parameters' device (a GPU), AdamW's step counters cost a host sync per parameter per step."""
    weight = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / layout.OPTIMIZER_FILE)

    on_meta = torch.nn.Parameter(torch.ones(2, 2, device="meta"))  # a device other than the CPU, as a GPU would be
    resumed = torch.optim.AdamW([on_meta], lr=0.1)
    ckpt.load_optimizer_state(resumed, tmp_path / layout.OPTIMIZER_FILE)
    state = resumed.state[on_meta]
    assert state["step"].device.type == "cpu" and int(state["step"]) == 1
    assert state["exp_avg"].device.type == "meta"  # the moments follow their parameter, as torch moves them


def test_each_rank_resumes_its_own_generators(tmp_path: Path, lora_model) -> None:
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(1)
    rank0 = ckpt.capture_rng_states()
    torch.manual_seed(2)
    rank1 = ckpt.capture_rng_states()
    assert rank0["cuda"] is None  # the CPU: no CUDA generator is touched (nor a CUDA context made)
    loaded = _load(_save(tmp_path, lora_model, optimizer, rng_states=[rank0, rank1]), lora_model, optimizer)
    assert len(loaded.rng_states) == 2
    for rank, seed in ((0, 1), (1, 2), (2, 1)):  # a rank the checkpoint did not know takes rank 0's
        ckpt.restore_rng_states(ckpt.rng_states_for_rank(loaded.rng_states, rank))
        draw = torch.rand(3)
        torch.manual_seed(seed)
        assert torch.equal(draw, torch.rand(3)), rank


def test_a_checkpoint_from_before_per_rank_generators_still_resumes(tmp_path: Path, lora_model) -> None:
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(3)
    rng = ckpt.capture_rng_states()
    path = _save(tmp_path, lora_model, optimizer, rng_states=[rng])
    # The earlier layout: one set, torch and every GPU's CUDA state in rng.pt, python/numpy in trainer_state.json.
    torch.save({"torch": rng["torch"], "cuda": []}, path / layout.RNG_FILE)
    state = json.loads((path / layout.TRAINER_STATE_FILE).read_text())
    state["rng"] = {"python": rng["python"], "numpy": rng["numpy"]}
    (path / layout.TRAINER_STATE_FILE).write_text(json.dumps(state))
    loaded = _load(path, lora_model, optimizer)
    assert len(loaded.rng_states) == 1 and loaded.rng_states[0]["cuda"] is None
    ckpt.restore_rng_states(loaded.rng_states[0])
    draw = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(draw, torch.rand(3))
