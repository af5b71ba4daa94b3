"""The record-by-record dataset check behind ValidateConfig and UploadDataset, and the example stream for training.

Both read records with the same parser, so what validation accepts is exactly what training trains on. Records are
numbered by line (JSONL), element (JSON) or row (tables), see sources.py. The check keeps counting past
`max_violations` (num_invalid is always the total) and, given a tokenizer and template, measures token lengths with
the same encoder training uses, in batches: of every valid example, or of an even sample of a big dataset's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from finetune_server.errors import ConfigWarning, ErrorKind, FinetuneError, Violation
from finetune_server.training.data.encode import RenderedExample, encode_rendered, render_example
from finetune_server.training.data.formats import AUTO, Example, RecordError, parse_record
from finetune_server.training.data.sources import FILE, DatasetSource, as_source, estimated_rows, iter_records
from finetune_server.training.data.template import TemplateError
from finetune_server.training.data.tokenizer import TextTokenizer

log = structlog.get_logger(__name__)

_BATCH = 512  # examples tokenized together when measuring lengths
MAX_WARNINGS = 20
SAMPLE_EXAMPLES = 10_000  # beyond twice this many valid examples, token statistics come from a uniform sample
_POLL_RECORDS = 256  # records between two looks at should_stop and two progress reports

CheckProgress = Callable[[int, int | None], None]  # (records checked, estimated total or None)


# TokenStats.source
ALL = "all"
SAMPLE = "sample"
TOKEN_CACHE = "token_cache"


class CheckStopped(Exception):  # noqa: N818 - a state, not an error
    """should_stop() turned True: the check ended early and its partial report was dropped."""

    def __init__(self, records: int) -> None:
        super().__init__(f"stopped after {records} records")
        self.records = records


@dataclass
class TokenStats:
    """Token lengths of the valid examples (proto TokenStats)."""

    min: int = 0
    max: int = 0
    mean: float = 0.0
    p50: int = 0
    p95: int = 0
    total: int = 0
    examples_measured: int = 0  # how many valid examples were tokenized for these figures
    source: str = ALL  # ALL, SAMPLE (see _Checker) or TOKEN_CACHE (exact, from an earlier job's cache entry)


@dataclass
class DatasetReport:
    """Proto DatasetReport, field for field.

    Two attributes are not proto fields (and not dataclass fields, so a generic converter skips them):
    `violations`, the bad lines (up to the cap) plus any whole-file problem, and `warnings`, e.g. examples whose
    answer truncation cuts off entirely.
    """

    name: str
    file_format: str
    num_examples: int = 0
    num_valid: int = 0
    num_invalid: int = 0
    format_counts: dict[str, int] = field(default_factory=dict)
    token_stats: TokenStats | None = None
    num_over_max_length: int = 0
    violations_truncated: bool = False
    size_bytes: int = 0

    def __post_init__(self) -> None:
        self.violations: list[Violation] = []
        self.warnings: list[ConfigWarning] = []


def _percentile(ordered: list[int], fraction: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def token_stats(lengths: list[int]) -> TokenStats | None:
    if not lengths:
        return None
    ordered = sorted(lengths)
    total = sum(ordered)
    return TokenStats(
        min=ordered[0],
        max=ordered[-1],
        mean=total / len(ordered),
        p50=_percentile(ordered, 0.5),
        p95=_percentile(ordered, 0.95),
        total=total,
        examples_measured=len(ordered),
    )


def answer_truncated(field: str, unit: str, line: int, max_length: int) -> ConfigWarning:
    """The warning about an example whose prompt alone fills max_length."""
    message = (
        f"{unit} {line}: its prompt alone is longer than max_length ({max_length} tokens), "
        "so truncation leaves no answer token to learn from; it will be skipped"
    )
    return ConfigWarning(field, "ANSWER_TRUNCATED", message)


def _require_file(path: Path, field_path: str) -> None:
    if not path.exists():
        raise FinetuneError(
            ErrorKind.NOT_FOUND,
            "DATASET_NOT_FOUND",
            f"dataset {path.name} does not exist",
            violations=[Violation(field_path, "NOT_FOUND", f"dataset {path.name} does not exist")],
        )
    if not path.is_file():
        raise FinetuneError(
            ErrorKind.INVALID_ARGUMENT,
            "DATASET_NOT_A_FILE",
            f"dataset {path.name} is not a file",
            violations=[Violation(field_path, "NOT_A_FILE", f"dataset {path.name} is not a file")],
        )


class _Checker:
    """Accumulates one dataset's report; lengths are measured a batch at a time.

    Every record is parsed (the schema check is always whole); rendering and tokenizing, most of the cost, run on
    every valid example up to 2 x `sample_examples`, then on a uniform sample: every `stride`-th valid example,
    the stride doubling (and half the measured lengths dropped) whenever the sample reaches twice the target. The
    sample thus stays between one and two targets, spread evenly over the whole dataset.
    """

    def __init__(
        self,
        report: DatasetReport,
        *,
        field_path: str,
        unit: str,
        tokenizer: TextTokenizer | None,
        template: str | None,
        max_length: int | None,
        max_violations: int,
        sample_examples: int,
    ) -> None:
        self.report = report
        self.field = field_path
        self.unit = unit
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.max_violations = max_violations
        self.sample_examples = sample_examples
        self.formats: Counter[str] = Counter()
        self.valid_seen = 0  # valid examples so far (parsed; rendered or not)
        self.stride = 1
        self.measured: list[tuple[int, int, bool]] = []  # (valid example index, tokens, over max_length)
        self.pending: list[tuple[int, int, RenderedExample]] = []  # (index, line, rendered)
        self.line_violations = 0

    def invalid(self, line: int, reason: str, message: str) -> None:
        self.report.num_invalid += 1
        if self.line_violations < self.max_violations:
            self.line_violations += 1
            self.report.violations.append(Violation(self.field, reason, f"{self.unit} {line}: {message}", line))
        else:
            self.report.violations_truncated = True

    def valid(self, line: int, example: Example) -> None:
        index = self.valid_seen
        self.valid_seen += 1
        if self.tokenizer is None or self.template is None or index % self.stride:
            self.formats[example.format] += 1
            return
        try:
            rendered = render_example(example, self.tokenizer, self.template)
        except TemplateError as exc:
            self.invalid(line, "TEMPLATE_ERROR", str(exc))
            return
        self.formats[example.format] += 1
        self.pending.append((index, line, rendered))
        if len(self.pending) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.pending or self.tokenizer is None:
            return
        limit = self.max_length if self.max_length is not None else 1 << 62
        encoded = encode_rendered([item for _, _, item in self.pending], self.tokenizer, max_length=limit)
        for (index, line, _), result in zip(self.pending, encoded, strict=True):
            self.measured.append((index, result.num_tokens, result.truncated))
            if result.truncated and result.num_trainable == 0 and len(self.report.warnings) < MAX_WARNINGS:
                self.report.warnings.append(answer_truncated(self.field, self.unit, line, limit))
        self.pending.clear()
        while len(self.measured) >= 2 * self.sample_examples:
            self.stride *= 2
            self.measured = [m for m in self.measured if m[0] % self.stride == 0]

    def finish(self) -> None:
        self.flush()
        report = self.report
        report.format_counts = dict(sorted(self.formats.items()))
        report.num_valid = sum(self.formats.values())
        report.num_examples = report.num_valid + report.num_invalid
        over = sum(1 for m in self.measured if m[2])
        stats = token_stats([m[1] for m in self.measured])
        if stats is not None and self.stride > 1:  # a sample: scale the counts up to every valid example
            scale = report.num_valid / len(self.measured)
            stats.total = round(stats.total * scale)
            stats.source = SAMPLE
            over = round(over * scale)
        report.token_stats = stats
        report.num_over_max_length = over


def check_dataset(
    source: DatasetSource | Path,
    *,
    name: str,
    field: str = "dataset",
    data_format: str = AUTO,
    tokenizer: TextTokenizer | None = None,
    template: str | None = None,
    max_length: int | None = None,
    max_violations: int = 100,
    sample_examples: int = SAMPLE_EXAMPLES,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: CheckProgress | None = None,
) -> DatasetReport:
    """Check every record of a dataset; token statistics need both a tokenizer and a template, and come from a
    uniform sample of about `sample_examples` to twice that for a bigger dataset (TokenStats.source says which).

    A Path is a local file (FinetuneError NOT_FOUND / INVALID_ARGUMENT when it is not a file). Everything about the
    content is reported in the returned report's `violations`. `should_stop` is polled every few hundred records
    (CheckStopped: the caller went away); `on_progress` hears how far the check is at the same pace.
    """
    if isinstance(source, Path):
        _require_file(source, field)  # a Path names a file; folders and hub datasets come as DatasetSources
        source = DatasetSource.local(source)
    elif source.kind == FILE:
        _require_file(source.path, field)
    report = DatasetReport(name=name, file_format=source.file_format, size_bytes=source.size_bytes())
    checker = _Checker(
        report,
        field_path=field,
        unit=source.unit,
        tokenizer=tokenizer,
        template=template,
        max_length=max_length,
        max_violations=max_violations,
        sample_examples=sample_examples,
    )
    file_problem = False
    total = estimated_rows(source) if on_progress is not None else None
    for count, record in enumerate(iter_records(source, data_format), start=1):
        if count % _POLL_RECORDS == 0:
            if should_stop():
                raise CheckStopped(count)
            if on_progress is not None:
                on_progress(count, total)
        if record.line == 0:  # the file as a whole is unreadable, or its columns fit no format
            file_problem = True
            report.violations.append(Violation(field, record.reason or "BAD_FILE", f"{name}: {record.error}", 0))
            continue
        if record.error is not None:
            checker.invalid(record.line, record.reason or "BAD_LINE", record.error)
            continue
        try:
            example = parse_record(record.value, data_format)
        except RecordError as exc:
            checker.invalid(record.line, exc.reason, exc.message)
            continue
        checker.valid(record.line, example)
    checker.finish()
    if not file_problem and report.num_examples == 0:
        report.violations.append(Violation(field, "EMPTY_DATASET", f"{name} holds no examples", 0))
    elif not file_problem and report.num_valid == 0:
        message = f"{name} holds no valid example ({report.num_invalid} invalid)"
        report.violations.append(Violation(field, "NO_VALID_EXAMPLES", message, 0))
    log.debug(
        "dataset_checked",
        dataset=name,
        examples=report.num_examples,
        invalid=report.num_invalid,
        formats=report.format_counts,
    )
    return report


def iter_examples(
    source: DatasetSource | Path | str,
    data_format: str = AUTO,
    *,
    subset: str = "",
    split: str = "",
    revision: str = "",
) -> Iterator[tuple[int, Example]]:
    """Stream (record number, Example) for training, skipping bad records (validation has reported them, or the
    config skips them); a file unreadable past some record (changed since it was validated) raises
    DATASET_UNREADABLE. A string is a source's ref (DatasetSource.from_ref, with the subset, split and revision)."""
    source = as_source(source, subset=subset, split=split, revision=revision)
    skipped = 0
    for record in iter_records(source, data_format):
        if record.line == 0:  # the file broke off after the records read so far: never train on part of it
            raise FinetuneError(
                ErrorKind.INVALID_ARGUMENT,
                "DATASET_UNREADABLE",
                f"{source.path.name} cannot be read to its end: {record.error}",
                violations=[Violation("dataset", record.reason or "BAD_FILE", record.error or "")],
            )
        if record.error is not None:
            skipped += 1
            continue
        try:
            yield record.line, parse_record(record.value, data_format)
        except RecordError:
            skipped += 1
    if skipped:
        log.warning("dataset_records_skipped", dataset=source.ref, skipped=skipped)
