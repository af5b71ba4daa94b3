"""A continued job's engine start: the source adapter's weights (and optimizer state) loaded before the first step,
and its own checkpoint, not the source, once it has one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from finetune_server.errors import FinetuneError
from finetune_server.storage import layout
from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
from finetune_server.training.data.token_cache import TokenCache
from finetune_server.training.engine.errors import TrainingCancelled
from finetune_server.training.engine.events import CheckpointEvent, Event
from finetune_server.training.engine.recipe import Initialisation, LoRARecipe, run_training

from .test_resume import write_facts


def make_config(model_dir: Path, dataset: Path, **kwargs: Any) -> TrainingConfig:
    fields: dict[str, Any] = {"max_length": 128, "max_steps": 4, "save_steps": 2, "learning_rate": 1e-2, **kwargs}
    fields.setdefault("lora", LoraSettings(r=8))
    config, _ = resolve(TrainingConfig(model_name=str(model_dir), dataset=str(dataset), **fields))
    return config


def _ignore(event: Event) -> None:
    pass


def set_up(config: TrainingConfig, model_dir: Path, dataset: Path, output: Path, init: Initialisation) -> LoRARecipe:
    recipe = LoRARecipe(
        config,
        model_ref=model_dir,
        dataset_path=dataset,
        eval_dataset_path=None,
        output_dir=output,
        on_event=_ignore,
        should_stop=lambda: False,
        device="cpu",
        job_id=output.name,
        hub_cache_dir=None,
        hub_offline=True,
        token_cache=TokenCache(output.parent / "token-cache", None),
        init=init,
    )
    output.mkdir(parents=True, exist_ok=True)
    recipe.setup()
    return recipe


def assert_weights_are(recipe: LoRARecipe, adapter_dir: Path) -> None:
    saved = load_file(str(adapter_dir / layout.ADAPTER_WEIGHTS_FILE))
    loaded = get_peft_model_state_dict(recipe.model.peft_model)
    assert saved.keys() == loaded.keys() and saved
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A trained source job's folder (checkpoints at steps 2 and 4, the final adapter) and its dataset."""
    root = tmp_path_factory.mktemp("continue")
    dataset = write_facts(root / "facts.jsonl", n=12)
    output = root / "source"
    config = make_config(tiny_model_dir, dataset)
    cache = TokenCache(root / "token-cache", None)
    run_training(
        config, model_ref=tiny_model_dir, dataset_path=dataset, output_dir=output, on_event=_ignore, token_cache=cache
    )
    return output, dataset


def test_the_source_adapter_and_optimizer_state_are_loaded_with_this_jobs_hyperparameters(
    tmp_path: Path, tiny_model_dir: Path, source: tuple[Path, Path]
) -> None:
    job_dir, dataset = source
    checkpoint = layout.JobDir(job_dir).checkpoint(2)
    config = make_config(tiny_model_dir, dataset, learning_rate=5e-4, weight_decay=0.1)
    fresh = set_up(config, tiny_model_dir, dataset, tmp_path / "fresh", Initialisation())
    recipe = set_up(
        config, tiny_model_dir, dataset, tmp_path / "new", Initialisation(checkpoint / "adapter", checkpoint)
    )
    try:
        assert_weights_are(recipe, checkpoint / "adapter")
        lora_b = [name for name in get_peft_model_state_dict(fresh.model.peft_model) if "lora_B" in name]
        assert lora_b and all(not get_peft_model_state_dict(fresh.model.peft_model)[name].any() for name in lora_b), (
            "a fresh adapter starts with B = 0: the loaded weights are not what LoRA's initialisation gives"
        )
        saved = torch.load(checkpoint / layout.OPTIMIZER_FILE, weights_only=True)
        state = recipe.optim.optimizer.state_dict()
        assert saved["state"].keys() == state["state"].keys() and saved["state"]
        for index, moments in saved["state"].items():
            torch.testing.assert_close(state["state"][index]["exp_avg"], moments["exp_avg"], rtol=0, atol=0)
            assert float(state["state"][index]["step"]) == 2.0
        groups = recipe.optim.optimizer.param_groups
        assert [g["initial_lr"] for g in groups] == [5e-4] * len(groups), "this job's learning rate, not the source's"
        assert groups[0]["weight_decay"] == 0.1
        assert fresh.optim.optimizer.state_dict()["state"] == {}, "without init_optimizer_dir the optimizer is fresh"
    finally:
        recipe.close()
        fresh.close()


def test_a_resumed_continued_job_goes_on_from_its_own_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, source: tuple[Path, Path]
) -> None:
    job_dir, dataset = source
    init = Initialisation(layout.JobDir(job_dir).adapter)
    config = make_config(tiny_model_dir, dataset)
    output = tmp_path / "continued"
    events: list[Event] = []
    with pytest.raises(TrainingCancelled):
        run_training(
            config,
            model_ref=tiny_model_dir,
            dataset_path=dataset,
            output_dir=output,
            on_event=events.append,
            should_stop=lambda: any(isinstance(e, CheckpointEvent) for e in events),
            token_cache=TokenCache(tmp_path / "token-cache", None),
            init_adapter_dir=init.adapter_dir,
        )
    own = layout.JobDir(output).checkpoint(2)
    recipe = set_up(config, tiny_model_dir, dataset, output, init)
    try:
        assert recipe.state.step == 2
        assert_weights_are(recipe, own / "adapter")
        source_weights = load_file(str(init.adapter_dir / layout.ADAPTER_WEIGHTS_FILE))  # type: ignore[operator]
        own_weights = load_file(str(own / "adapter" / layout.ADAPTER_WEIGHTS_FILE))
        assert any(not torch.equal(source_weights[k], own_weights[k]) for k in own_weights), "two steps moved it"
    finally:
        recipe.close()


def test_an_adapter_of_another_shape_is_a_typed_error(
    tmp_path: Path, tiny_model_dir: Path, source: tuple[Path, Path]
) -> None:
    job_dir, dataset = source
    config = make_config(tiny_model_dir, dataset, lora=LoraSettings(r=4))
    with pytest.raises(FinetuneError) as caught:
        set_up(config, tiny_model_dir, dataset, tmp_path / "other", Initialisation(layout.JobDir(job_dir).adapter))
    assert caught.value.reason == "INIT_ADAPTER_MISMATCH" and "does not fit the model" in caught.value.message
