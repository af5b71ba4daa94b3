"""What vLLM would refuse in an adapter, and the serve commands (adapter_config.json dicts as PEFT writes them)."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from finetune_server.export.vllm import vllm_compatibility
from finetune_server.training.vllm_rules import VLLM_MAX_LORA_RANKS


def lora(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": None,
        "use_dora": False,
        "bias": "none",
    }
    config.update(overrides)
    return config


def report(config: dict[str, Any], fmt: str = "adapter", **kwargs: Any) -> Any:
    return vllm_compatibility(config, fmt, artifact_name="my-adapter", base_model="Qwen/Qwen2.5-0.5B", **kwargs)


def test_r16_q_v_adapter_is_compatible_with_the_right_max_rank() -> None:
    result = report(lora(), files={"chat_template.jinja", "generation_config.json"})
    assert result.compatible and result.problems == []
    assert shlex.split(result.serve_command) == [
        "vllm",
        "serve",
        "Qwen/Qwen2.5-0.5B",
        "--enable-lora",
        "--lora-modules",
        "my-adapter=./my-adapter",
        "--max-lora-rank",
        "16",
        "--chat-template",
        "./my-adapter/chat_template.jinja",
        "--generation-config",
        "./my-adapter",
    ]


@pytest.mark.parametrize(("r", "max_rank"), [(8, 8), (12, 16), (64, 64), (100, 128), (300, 320), (512, 512)])
def test_max_lora_rank_is_the_smallest_allowed_value_holding_the_rank(r: int, max_rank: int) -> None:
    """vLLM accepts any r <= --max-lora-rank; only --max-lora-rank itself must be one of VLLM_MAX_LORA_RANKS."""
    result = report(lora(r=r))
    assert result.compatible
    assert shlex.split(result.serve_command)[7] == str(max_rank) and max_rank in VLLM_MAX_LORA_RANKS


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"r": 1024}, "rank 1024"),
        ({"r": 0}, "rank"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save (lm_head)"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "bias"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
        ({"target_modules": ".*attn.*"}, "pattern"),
        ({"peft_type": "IA3"}, "IA3"),
    ],
)
def test_each_refusal_is_one_problem(overrides: dict[str, Any], words: str) -> None:
    result = report(lora(**overrides))
    assert not result.compatible
    assert len(result.problems) == 1 and words in result.problems[0], result.problems


def test_every_problem_is_reported_at_once() -> None:
    result = report(lora(use_dora=True, modules_to_save=["embed_tokens"], bias="all"))
    assert len(result.problems) == 3


def test_qualified_target_names_are_checked_by_their_last_part() -> None:
    assert report(lora(target_modules=["model.layers.0.self_attn.q_proj", "mlp.gate_up_proj"])).compatible


def test_merged_weights_are_compatible_whatever_the_adapter() -> None:
    result = report(lora(use_dora=True, modules_to_save=["lm_head"]), "merged", artifact_path="/srv/art 1")
    assert result.compatible and result.problems == []
    assert shlex.split(result.serve_command) == ["vllm", "serve", "/srv/art 1"]


def test_names_are_quoted_never_interpolated_raw() -> None:
    result = vllm_compatibility(lora(), "adapter", artifact_name="a; rm -rf ~", base_model="$(whoami)")
    args = shlex.split(result.serve_command)
    assert args[2] == "$(whoami)" and args[5] == "a; rm -rf ~=./a; rm -rf ~"


def test_unknown_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="format"):
        report(lora(), "gguf")
