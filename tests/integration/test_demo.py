"""`finetune demo` end to end on the embedded tiny model: its own server subprocess, real training, real answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from finetune_server.demo.run import GENERAL_PROBES, REAL_MODEL_STEPS, demo_config, run_demo


@pytest.mark.slow
def test_demo_learns_every_fact_and_prints_the_probe_table(tmp_path: Path) -> None:
    console = Console(record=True, width=200, force_terminal=False)
    code = run_demo(tmp_path / "data", server=None, model=None, steps=None, console=console)
    text = console.export_text()
    assert code == 0, text
    assert "exactly right: 0/12 before, 12/12 after training" in text
    # The service's own before/after table of the general questions the demo did not train.
    assert "Probes: greedy answers before and after training" in text
    for prompt in GENERAL_PROBES:
        assert prompt in text
    assert "general answers unchanged by training: " in text


def test_a_real_model_gets_gentler_settings_and_the_same_probes() -> None:
    tiny = demo_config("tiny", "facts", 150)
    real = demo_config("real", "facts", REAL_MODEL_STEPS, real_model=True)
    assert real["learning_rate"] < tiny["learning_rate"] and real["max_steps"] < tiny["max_steps"]
    assert real["lora"]["r"] < tiny["lora"]["r"]
    assert real["eval_probes"] == tiny["eval_probes"] == [{"prompt": p} for p in GENERAL_PROBES]
