"""A tiny random Qwen2-style model with a byte-level BPE tokenizer trained on the fly and a ChatML chat template.

It needs no network: tests, the demo and benchmarks build it into a folder on first use. The weights are random
(seeded), so it knows nothing until it is trained; what it learns in a few hundred steps is exactly what it was taught.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MARKER = "tiny_model.json"

_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had not but "
    "what all when there can who been one if would will more their so about out up into do than other time only new "
    "some could these two may first then any like now my such make over our even most after also did many before must "
    "through back years where much your way well down should because each just those people how too little state good "
    "very world still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three question answer instruction "
    "input output user assistant system please tell me code name city capital river colour number secret password "
    "planet animal favourite born lives works makes called known answer hello thanks yes no zero four five six seven "
    "eight nine ten hundred thousand blue red green yellow purple orange black white"
).split()


@dataclass(frozen=True)
class TinyModelSpec:
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0


def _corpus(seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(4000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.append(f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.randint(0, 9999)}")
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    return lines


def _train_tokenizer(spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )


def is_tiny_model(path: str | os.PathLike[str], spec: TinyModelSpec | None = None) -> bool:
    return built_from(path, asdict(spec or TinyModelSpec()))


def built_from(path: str | os.PathLike[str], recipe: dict[str, Any]) -> bool:
    """Whether the model folder at `path` was written by `write_model_folder` from this recipe."""
    marker = Path(path) / _MARKER
    return marker.is_file() and json.loads(marker.read_text()) == recipe


def write_model_folder(path: str | os.PathLike[str], model: Any, tokenizer: Any, recipe: dict[str, Any]) -> Path:
    """Save the model, its tokenizer and the recipe they were built from at `path`, whole or not at all."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps(recipe))
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def build_tiny_model(path: str | os.PathLike[str], spec: TinyModelSpec | None = None) -> Path:
    """Write the model folder at `path` (atomically), unless an identical one is already there."""
    spec = spec or TinyModelSpec()
    target = Path(path)
    if is_tiny_model(target, spec):
        return target

    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(spec)
    torch.manual_seed(spec.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return write_model_folder(target, model, tokenizer, asdict(spec))
