"""A light tokenizer: the model's tokenizer.json through the `tokenizers` library, plus its special tokens.

Used on the validation path (token statistics) and by the training engine, without importing transformers. Encoding
never adds special tokens from a post-processor (as `apply_chat_template` tokenizes with add_special_tokens=False);
special tokens written in the text (`<|im_end|>`) map to their ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.util.json_values import read_json_object


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict with `content`."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str) and value["content"]:
        return str(value["content"])
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int) and not isinstance(item, bool)]
    return []


class TextTokenizer:
    """tokenizer.json + special tokens from tokenizer_config.json (generation_config/config eos ids as fallback)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        bos_token: str | None = None,
        unk_token: str | None = None,
        extra_eos_ids: Sequence[int] = (),
        fallback_pad_id: int | None = None,
        add_bos: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        fallback_eos = next((i for i in extra_eos_ids if tokenizer.id_to_token(i) is not None), None)
        if eos_token is None and fallback_eos is not None:
            eos_token = tokenizer.id_to_token(fallback_eos)
        self.eos_token: str | None = eos_token
        self.eos_token_id: int | None = self.token_to_id(eos_token)
        self.bos_token: str | None = bos_token
        self.bos_token_id: int | None = self.token_to_id(bos_token)
        self.pad_token: str | None = pad_token
        self.pad_token_id: int | None = self.token_to_id(pad_token)
        if self.pad_token_id is None and fallback_pad_id is not None:
            self.pad_token_id = fallback_pad_id
            self.pad_token = tokenizer.id_to_token(fallback_pad_id)
        self.unk_token: str | None = unk_token
        # Every id that ends generation: the tokenizer's eos and generation_config's (e.g. Gemma's <end_of_turn>).
        ids = {i for i in extra_eos_ids if tokenizer.id_to_token(i) is not None}
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(ids)
        self.add_bos = add_bos and self.bos_token_id is not None

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def template_variables(self) -> dict[str, str]:
        """The special tokens a chat template may read (transformers passes its special_tokens_map)."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        names["unk_token"] = self.unk_token
        return {name: value for name, value in names.items() if value is not None}

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and their (start, end) character offsets in `text`."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), list(encoding.offsets)

    def encode_batch(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """encode_with_offsets for many texts at once (the Rust side runs them in parallel)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [(e.ids, e.offsets) for e in encodings]  # each a fresh list already

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))


def _adds_bos(tokenizer: Tokenizer, config: dict[str, Any], bos_token: str | None) -> bool:
    """Whether plain text should start with BOS: the config's add_bos_token, else what the post-processor does."""
    if isinstance(config.get("add_bos_token"), bool):
        return bool(config["add_bos_token"])
    bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
    if bos_id is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def load_tokenizer(model_dir: Path) -> TextTokenizer:
    """Load `model_dir`/tokenizer.json; FinetuneError(FAILED_PRECONDITION) when it is missing or unreadable."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FinetuneError(
            ErrorKind.FAILED_PRECONDITION,
            "TOKENIZER_NOT_FOUND",
            f"{model_dir.name} has no tokenizer.json (a fast tokenizer is required)",
            hint="save the tokenizer with a recent transformers (tokenizer.save_pretrained) to produce tokenizer.json",
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception for a malformed file
        raise FinetuneError(
            ErrorKind.FAILED_PRECONDITION, "TOKENIZER_INVALID", f"cannot read {path.name}: {exc}"
        ) from exc
    config = read_json_object(model_dir / "tokenizer_config.json")
    generation = read_json_object(model_dir / "generation_config.json")
    model_config = read_json_object(model_dir / "config.json")
    bos_token = _token_text(config.get("bos_token"))
    pad_ids = _ids(generation.get("pad_token_id")) or _ids(model_config.get("pad_token_id"))
    return TextTokenizer(
        tokenizer,
        eos_token=_token_text(config.get("eos_token")),
        pad_token=_token_text(config.get("pad_token")),
        bos_token=bos_token,
        unk_token=_token_text(config.get("unk_token")),
        extra_eos_ids=_ids(generation.get("eos_token_id")) + _ids(model_config.get("eos_token_id")),
        fallback_pad_id=pad_ids[0] if pad_ids else None,
        add_bos=_adds_bos(tokenizer, config, bos_token),
    )
