"""Fixtures the unit tests of the data pipeline share: the tiny model's tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_server.training.data import TextTokenizer, load_chat_template, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> TextTokenizer:
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def template(tiny_model_dir: Path) -> str:
    text = load_chat_template(tiny_model_dir)
    assert text is not None
    return text
