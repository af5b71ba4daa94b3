"""Shared fixtures and helpers: the tiny offline model is built once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2-style model (~0.5 MB) with a BPE tokenizer trained on the fly and a ChatML template."""
    from finetune_server.demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


def write_alpaca(path: Path, n: int = 16) -> Path:
    """`n` alpaca rows of made-up facts (a number per city), one JSON object per line."""
    with path.open("w") as f:
        for i in range(n):
            record = {"instruction": f"What is the secret number of city {i}?", "output": f"It is {i * 37}."}
            f.write(json.dumps(record) + "\n")
    return path
