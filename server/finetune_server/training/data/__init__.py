"""The data pipeline: dataset sources -> records -> examples -> chat-templated token ids and loss masks.

One implementation serves ValidateConfig (record-by-record checks, token statistics; no torch or transformers
import) and the training engine (`iter_examples`, `encode_example` / `encode_many`). Sources are local files,
save_to_disk folders and hub datasets (`sources.DatasetSource`; `hub.fetch_dataset` finds and fetches hub ones).
"""

from finetune_server.training.data.checks import DatasetReport, TokenStats, check_dataset, iter_examples
from finetune_server.training.data.encode import (
    IGNORE_INDEX,
    EncodedExample,
    RenderedExample,
    encode_example,
    encode_many,
    encode_prompt,
    encode_rendered,
    render_example,
)
from finetune_server.training.data.formats import Example, Message, RecordError, parse_record
from finetune_server.training.data.records import RawRecord
from finetune_server.training.data.sources import DatasetSource, iter_records
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
    "DatasetSource",
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
    "encode_prompt",
    "encode_rendered",
    "iter_examples",
    "iter_records",
    "load_chat_template",
    "load_tokenizer",
    "parse_record",
    "render",
    "render_example",
]
