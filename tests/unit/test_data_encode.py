"""Tokenizer and encoder, cross-checked against transformers on the tiny ChatML model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from finetune_server.training.data.encode import IGNORE_INDEX, EncodedExample, encode_example, encode_many
from finetune_server.training.data.formats import Example, Message
from finetune_server.training.data.template import TemplateError
from finetune_server.training.data.tokenizer import TextTokenizer, load_tokenizer

CONVERSATION = Example(
    "messages",
    (
        Message("system", "You answer briefly."),
        Message("user", "What is the capital city?"),
        Message("assistant", "The capital is Paris."),
        Message("user", "And the river?"),
        Message("assistant", "The river is the Seine!"),
    ),
)

# Turns end with a blank line, never with the eos token: the encoder must add eos itself.
PLAIN_TEMPLATE = (
    "{% for m in messages %}### {{ m.role }}:\n{{ m.content }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _labelled_runs(encoded: EncodedExample) -> list[list[int]]:
    """Contiguous runs of labelled tokens (labels must equal the input ids there)."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


def _tokenizer_dir(tmp_path: Path, tiny_model_dir: Path, tokenizer_config: dict[str, object], **files: object) -> Path:
    """A folder with the tiny model's tokenizer.json and the given tokenizer_config (plus `name=content` files)."""
    folder = tmp_path / "tok"
    folder.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


# -------------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_transformers_and_maps_special_tokens(tokenizer: TextTokenizer, hf_tokenizer: Any) -> None:
    text = "<|im_start|>user\nHello there, the capital?<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == hf_tokenizer.eos_token_id
    assert tokenizer.pad_token_id == hf_tokenizer.pad_token_id
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") and tokenizer.eos_token_id in ids
    batch = tokenizer.encode_batch([text, "plain words"])
    assert batch[0] == tokenizer.encode_with_offsets(text)
    assert batch[1][0] == tokenizer.encode("plain words")
    ids, offsets = batch[0]
    assert text[offsets[0][0] : offsets[0][1]] == "<|im_start|>"
    assert "".join(text[s:e] for s, e in offsets) == text
    assert tokenizer.decode(ids) == text


def test_special_tokens_as_dicts_and_eos_fallbacks(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = _tokenizer_dir(
        tmp_path,
        tiny_model_dir,
        {
            "eos_token": {"content": "<|endoftext|>", "special": True},
            "bos_token": "<|im_start|>",
            "add_bos_token": True,
        },
        generation_config={"eos_token_id": [0, 2]},
        config={"pad_token_id": 0},
    )
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.eos_token_ids == {0, 2}
    assert tokenizer.pad_token_id == 0
    assert tokenizer.add_bos and tokenizer.bos_token_id == 1
    # Without eos in tokenizer_config, generation_config's first id is the eos.
    only_generation = _tokenizer_dir(tmp_path / "b", tiny_model_dir, {}, generation_config={"eos_token_id": 2})
    assert load_tokenizer(only_generation).eos_token == "<|im_end|>"


# ---------------------------------------------------------------------------------------------------- conversations


def test_conversation_text_and_ids_equal_transformers(
    tokenizer: TextTokenizer, template: str, hf_tokenizer: Any
) -> None:
    encoded = encode_example(CONVERSATION, tokenizer, template, max_length=1024)
    messages = CONVERSATION.message_dicts()
    expected_text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    expected_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert tokenizer.decode(encoded.input_ids) == expected_text
    assert encoded.input_ids == list(expected_ids)
    assert encoded.num_tokens == len(expected_ids) and not encoded.truncated


def test_labels_are_exactly_the_assistant_contents_and_their_eos(tokenizer: TextTokenizer, template: str) -> None:
    encoded = encode_example(CONVERSATION, tokenizer, template, max_length=1024)
    runs = [tokenizer.decode(run) for run in _labelled_runs(encoded)]
    assert runs == ["The capital is Paris.<|im_end|>", "The river is the Seine!<|im_end|>"]
    assert encoded.num_trainable == sum(len(run) for run in _labelled_runs(encoded))


def test_train_on_prompt_labels_every_token(tokenizer: TextTokenizer, template: str) -> None:
    encoded = encode_example(CONVERSATION, tokenizer, template, max_length=1024, train_on_prompt=True)
    assert encoded.labels == encoded.input_ids
    assert encoded.num_trainable == len(encoded.input_ids)


def test_truncation_keeps_the_start_and_reports_it(tokenizer: TextTokenizer, template: str) -> None:
    full = encode_example(CONVERSATION, tokenizer, template, max_length=1024)
    cut = encode_example(CONVERSATION, tokenizer, template, max_length=20)
    assert cut.truncated and cut.num_tokens == full.num_tokens
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
    # The first answer starts after the system and user turns: 20 tokens leave nothing to learn.
    assert cut.num_trainable == 0
    assert full.num_trainable > 0


def test_eos_is_added_when_the_template_does_not_end_turns_with_it(tokenizer: TextTokenizer) -> None:
    encoded = encode_example(CONVERSATION, tokenizer, PLAIN_TEMPLATE, max_length=1024)
    runs = [tokenizer.decode(run) for run in _labelled_runs(encoded)]
    assert runs == ["The capital is Paris.<|im_end|>", "The river is the Seine!<|im_end|>"]
    text = tokenizer.decode(encoded.input_ids)
    assert "### assistant:\nThe capital is Paris.<|im_end|>\n\n### user:" in text
    assert text.endswith("The river is the Seine!<|im_end|>\n\n")


def test_turn_end_marker_before_eos_is_trained(tokenizer: TextTokenizer) -> None:
    """A template ending turns with its own marker then eos: the model learns marker and eos, nothing is inserted."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% if m.role == 'assistant' %} [done]{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoded = encode_example(CONVERSATION, tokenizer, template, max_length=1024)
    runs = [tokenizer.decode(run) for run in _labelled_runs(encoded)]
    assert runs == ["The capital is Paris. [done]<|im_end|>", "The river is the Seine! [done]<|im_end|>"]
    assert tokenizer.eos_token_id is not None
    assert encoded.input_ids.count(tokenizer.eos_token_id) == 2


def test_templates_that_rewrite_earlier_turns_fall_back_to_search(tokenizer: TextTokenizer) -> None:
    """Marking the last message changes every prefix, so spans are found by locating the contents instead."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}{% if loop.last %} (last){% endif %}\n"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoded = encode_example(CONVERSATION, tokenizer, template, max_length=1024)
    runs = [tokenizer.decode(run) for run in _labelled_runs(encoded)]
    assert runs == ["The capital is Paris.<|im_end|>", "The river is the Seine!<|im_end|>"]


def test_a_template_that_refuses_the_conversation_raises(tokenizer: TextTokenizer) -> None:
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    with pytest.raises(TemplateError, match="no system role"):
        encode_example(CONVERSATION, tokenizer, template, max_length=64)


# ------------------------------------------------------------------------------------------------------- plain text


def test_plain_text_is_text_plus_eos_all_trained(tokenizer: TextTokenizer, template: str) -> None:
    encoded = encode_example(Example("text", text="The old river."), tokenizer, template, max_length=64)
    assert encoded.input_ids == [*tokenizer.encode("The old river."), tokenizer.eos_token_id]
    assert encoded.labels == encoded.input_ids


def test_plain_text_starts_with_bos_when_the_tokenizer_adds_one(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = _tokenizer_dir(
        tmp_path, tiny_model_dir, {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "add_bos_token": True}
    )
    tokenizer = load_tokenizer(folder)
    encoded = encode_example(Example("text", text="Hello"), tokenizer, "", max_length=64)
    assert encoded.input_ids == [1, *tokenizer.encode("Hello"), 2]


# ------------------------------------------------------------------------------------------------------------ batch


def test_encode_many_equals_one_by_one(tokenizer: TextTokenizer, template: str) -> None:
    """Its speed is measured in `make bench` (the data benchmark's encoding ratio), not asserted here."""
    examples = [
        Example(
            "messages",
            (Message("user", f"Tell me the number {i} please."), Message("assistant", f"It is {i}, in blue.")),
        )
        for i in range(10_000)
    ]
    examples.append(Example("text", text="Just some words."))
    batch = encode_many(examples, tokenizer, template, max_length=256)
    assert len(batch) == len(examples)
    for index in (0, 4321, len(examples) - 1):
        assert batch[index] == encode_example(examples[index], tokenizer, template, max_length=256)
