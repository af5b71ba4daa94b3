"""The data pipeline: dataset files -> records -> examples -> chat-templated token ids and loss masks.

One implementation serves ValidateConfig (line-by-line checks, token statistics; no torch or transformers import)
and the training engine (`iter_examples`, `encode_example` / `encode_many`).
"""

from finetune_server.training.data.checks import DatasetReport, TokenStats, check_dataset, iter_examples
from finetune_server.training.data.encode import (
    IGNORE_INDEX,
    EncodedExample,
    RenderedExample,
    encode_example,
    encode_many,
    encode_rendered,
    render_example,
)
from finetune_server.training.data.formats import Example, Message, RecordError, parse_record
from finetune_server.training.data.records import RawRecord, iter_records
from finetune_server.training.data.template import (
    FALLBACK_CHAT_TEMPLATE,
    TemplateError,
    choose_chat_template,
    load_chat_template,
    render,
)
from finetune_server.training.data.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "DatasetReport",
    "EncodedExample",
    "Example",
    "Message",
    "RawRecord",
    "RecordError",
    "RenderedExample",
    "TemplateError",
    "TextTokenizer",
    "TokenStats",
    "check_dataset",
    "choose_chat_template",
    "encode_example",
    "encode_many",
    "encode_rendered",
    "iter_examples",
    "iter_records",
    "load_chat_template",
    "load_tokenizer",
    "parse_record",
    "render",
    "render_example",
]
