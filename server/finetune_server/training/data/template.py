"""Chat templates: finding a model's template, the ChatML fallback, and rendering with transformers' semantics.

Rendering uses the same Jinja environment as `transformers.apply_chat_template` (ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does not HTML-escape,
`strftime_now`, and a pass-through `{% generation %}` block), so the text we train on is exactly the text the model
is served with, without importing transformers on the validation path.

FALLBACK_CHAT_TEMPLATE is ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n` per message, and
`<|im_start|>assistant\\n` as the generation prompt). It is used only when the tokenizer ships no template, the
config gives none and `allow_fallback_chat_template` is true; the template used is saved with the adapter and every
export, so training and serving agree.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from finetune_server.storage.layout import CHAT_TEMPLATE_FILE
from finetune_server.training.data.formats import Message

FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Where a template came from, as reported by choose_chat_template.
SOURCE_CONFIG = "config"
SOURCE_TOKENIZER = "tokenizer"
SOURCE_FALLBACK = "fallback"


class TemplateError(ValueError):
    """A chat template that does not compile, or fails to render a conversation (e.g. `raise_exception`)."""


# What a tokenizer may consist of; copied with adapters and exports so they tokenise exactly as training did.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def save_tokenizer_files(source: Path, dest: Path, template: str) -> None:
    """Copy the tokenizer from `source` to `dest` with `template` as its one chat template, in both places readers
    look (chat_template.jinja and tokenizer_config.json), so training and serving agree."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    config_file = dest / "tokenizer_config.json"
    if config_file.is_file():
        tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
        tokenizer_config["chat_template"] = template
        config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8")
    (dest / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")


def load_chat_template(model_dir: Path) -> str | None:
    """The model's own template: chat_template.jinja, else tokenizer_config.json's `chat_template`.

    A list of named templates (`[{name, template}]`) yields the one named `default`.
    """
    jinja_file = model_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        value = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return None
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item.get("name") == "default" and isinstance(item.get("template"), str):
                return str(item["template"])
    return None


def choose_chat_template(model_dir: Path | None, override: str = "", allow_fallback: bool = True) -> tuple[str, str]:
    """The template to train with and where it came from: the config's, the tokenizer's, or the fallback.

    Raises TemplateError when there is none and the fallback is not allowed.
    """
    if override.strip():
        return override, SOURCE_CONFIG
    own = load_chat_template(model_dir) if model_dir is not None else None
    if own is not None:
        return own, SOURCE_TOKENIZER
    if allow_fallback:
        return FALLBACK_CHAT_TEMPLATE, SOURCE_FALLBACK
    raise TemplateError("the tokenizer has no chat template and allow_fallback_chat_template is false")


class _GenerationBlock(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (templates written for assistant masks): render the body."""

    tags = {"generation"}  # noqa: RUF012 - jinja's declared API

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per distinct template text (rendering an example is then ~tens of microseconds)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template does not compile: {exc.message} (template line {exc.lineno})") from exc


@lru_cache(maxsize=32)
def _globals(compiled: jinja2.Template) -> dict[str, Any]:
    return dict(compiled.globals)


def render(
    template: str,
    messages: Sequence[Message | Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """Render as `apply_chat_template(..., tokenize=False)` does; unset special tokens stay undefined."""
    compiled = compile_template(template)
    chat = [{"role": m.role, "content": m.content} if isinstance(m, Message) else dict(m) for m in messages]
    variables = {name: value for name, value in extra.items() if value is not None}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    # What Template.render does, with the globals merged from a plain dict instead of the template's ChainMap of
    # them on every call: the same output in less than half the time (rendering is most of what encoding costs).
    values = {**_globals(compiled), "messages": chat, "add_generation_prompt": add_generation_prompt, **variables}
    try:
        return compiled.environment.concat(compiled.root_render_func(compiled.new_context(values, shared=True)))
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template failed: {exc.message or exc}") from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
