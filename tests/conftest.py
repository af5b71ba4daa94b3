"""Shared fixtures: the tiny offline model is built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2-style model (~0.5 MB) with a BPE tokenizer trained on the fly and a ChatML template."""
    from finetune_server.embedded.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")
