"""Where a dataset comes from, and its records, numbered, whatever its kind.

A DatasetSource is a local file (JSONL, JSON, Parquet, CSV, Arrow), a `save_to_disk` folder, or a hub dataset pinned
to a commit whose files are in the hub cache (`hub.py` finds and fetches it; reading one never touches the network).
Its `ref` is the string a worker reopens it from (`DatasetSource.from_ref`): jobs hand workers strings. Its
`fingerprint()` names its content, so anything cached under it notices when the data changes.

Records are numbered as ValidateConfig reports them: JSONL by line, JSON by array element, every other kind by row
(1-based). JSON and JSONL go through `records.py`; tables through `tables.py`, a batch at a time. pyarrow and
`datasets` are imported only for the kinds that need them, so checking a JSONL file imports neither.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune_server.errors import ErrorKind, FinetuneError, Violation
from finetune_server.training.data.formats import AUTO
from finetune_server.training.data.records import JSON, JSONL, RawRecord, detect_file_format
from finetune_server.training.data.records import iter_records as iter_json_records
from finetune_server.util.hashing import sha256_file_cached

# kinds
FILE = "file"
SAVED = "saved"  # a folder written by datasets' save_to_disk
HUB = "hub"
# file formats (DatasetReport.file_format); a folder's and a hub dataset's are their kind
PARQUET = "parquet"
CSV = "csv"
ARROW = "arrow"
TABLE_FORMATS = (PARQUET, CSV, ARROW, SAVED, HUB)
_SUFFIX_FORMATS = {".parquet": PARQUET, ".pq": PARQUET, ".csv": CSV, ".tsv": CSV, ".arrow": ARROW, ".feather": ARROW}
_MAGIC = ((b"PAR1", PARQUET), (b"ARROW1", ARROW))
# What save_to_disk writes at the top of its folder: state.json for one Dataset, dataset_dict.json for several splits.
SAVED_DATASET_FILE = "state.json"
SAVED_DICT_FILE = "dataset_dict.json"
HUB_REF_PREFIX = "hf://datasets/"
_HUB_REF = re.compile(r"^hf:/+datasets/(?P<id>[^@]+)(?:@(?P<revision>.+))?$")  # a Path keeps one slash of two
DEFAULT_SPLIT = "train"


def detect_format(path: Path) -> str:
    """A file's format: by extension (.parquet, .csv, .tsv, .arrow, .feather), by magic bytes, else JSON or JSONL."""
    known = _SUFFIX_FORMATS.get(path.suffix.lower())
    if known is not None:
        return known
    with path.open("rb") as handle:
        head = handle.read(8)
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return detect_file_format(path)


def record_unit(file_format: str) -> str:
    """What a record's number counts, as reports say it: `line 3`, `element 3`, `row 3`."""
    return {JSONL: "line", JSON: "element"}.get(file_format, "row")


def field_of(field: str, option: str) -> str:
    """The config field of a dataset option: `dataset_split`, `eval_dataset_subset`, ..."""
    return f"{field}_{option}"


def choose_split(available: Sequence[str], requested: str, field: str) -> str:
    """The split to read: the one asked for, else `train`, else the only one. NOT_FOUND or INVALID_ARGUMENT naming
    the splits there are; `field` is the dataset's field (`dataset`, `eval_dataset`)."""
    path = field_of(field, "split")
    names = ", ".join(available) or "none"
    if requested:
        if requested in available:
            return requested
        message = f"the dataset has no split {requested!r}; it has: {names}"
        raise FinetuneError(
            ErrorKind.NOT_FOUND,
            "SPLIT_NOT_FOUND",
            f"{path}: {message}",
            violations=[Violation(path, "SPLIT_NOT_FOUND", message)],
        )
    if DEFAULT_SPLIT in available:
        return DEFAULT_SPLIT
    if len(available) == 1:
        return available[0]
    message = f"the dataset has several splits ({names}) and none is called {DEFAULT_SPLIT!r}: name one"
    raise FinetuneError(
        ErrorKind.INVALID_ARGUMENT,
        "SPLIT_REQUIRED",
        f"{path}: {message}",
        violations=[Violation(path, "SPLIT_REQUIRED", message)],
    )


def saved_splits(folder: Path) -> list[str] | None:
    """The splits of a save_to_disk DatasetDict folder, None for a single Dataset's (or an unreadable list)."""
    try:
        splits = json.loads((folder / SAVED_DICT_FILE).read_text(encoding="utf-8")).get("splits")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(s) for s in splits] if isinstance(splits, list) else None


def is_saved_dataset(folder: Path) -> bool:
    return (folder / SAVED_DATASET_FILE).is_file() or (folder / SAVED_DICT_FILE).is_file()


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@dataclass(frozen=True)
class DatasetSource:
    """One dataset to read. `location` is an absolute path (file, saved) or a hub id (hub); `revision` is a hub
    dataset's pinned commit; `split` is the split read from a DatasetDict folder or a hub dataset, `subset` a hub
    dataset's config name. `local_dir` is where a hub dataset's pinned snapshot lies in the hub cache."""

    kind: str
    location: str
    file_format: str
    subset: str = ""
    split: str = ""
    revision: str = ""
    local_dir: str = ""

    @classmethod
    def local(cls, path: Path, *, split: str = "", field: str = "dataset") -> DatasetSource:
        """A local file, or a save_to_disk folder with its split chosen (choose_split's errors)."""
        path = Path(path).resolve()
        if not path.is_dir():
            return cls(FILE, str(path), detect_format(path))
        splits = saved_splits(path)
        chosen = choose_split(splits, split, field) if splits is not None else ""
        return cls(SAVED, str(path), SAVED, split=chosen)

    @classmethod
    def from_ref(
        cls,
        ref: str,
        *,
        subset: str = "",
        split: str = "",
        revision: str = "",
        hub_cache_dir: Path | None = None,
        field: str = "dataset",
    ) -> DatasetSource:
        """Reopen a source from its `ref` (in a worker): a local path, or `hf://datasets/<id>[@<commit>]` read from
        the hub cache (`hub_cache_dir`, default huggingface_hub's) without any network access."""
        match = _HUB_REF.match(ref)
        if match is None:
            return cls.local(Path(ref), split=split, field=field)
        from finetune_server.training.data.hub import open_cached

        return open_cached(
            match["id"],
            revision=match["revision"] or revision,
            subset=subset,
            split=split,
            cache_dir=hub_cache_dir,
            field=field,
        )

    @property
    def ref(self) -> str:
        if self.kind == HUB:
            return f"{HUB_REF_PREFIX}{self.location}" + (f"@{self.revision}" if self.revision else "")
        return self.location

    @property
    def path(self) -> Path:
        """Where it is read from: the file, the folder, or the hub snapshot."""
        return Path(self.local_dir if self.kind == HUB else self.location)

    @property
    def unit(self) -> str:
        return record_unit(self.file_format)

    def fingerprint(self) -> str:
        """A key of the content: a file's sha256; for a folder the sha256 of its files' names and sha256s (and the
        split read); for a hub dataset of its id, pinned commit, subset and split."""
        if self.kind == FILE:
            return sha256_file_cached(self.path)
        digest = hashlib.sha256(f"{self.kind}\0{self.subset}\0{self.split}\0".encode())
        if self.kind == HUB:
            digest.update(f"{self.location}\0{self.revision}".encode())
        else:
            for file in _files_under(self.path):
                digest.update(f"{file.relative_to(self.path).as_posix()}\0{sha256_file_cached(file)}\0".encode())
        return digest.hexdigest()

    def size_bytes(self) -> int:
        if self.kind == FILE:
            return self.path.stat().st_size
        return sum(file.stat().st_size for file in _files_under(self.path))


def as_source(
    source: DatasetSource | Path | str, *, subset: str = "", split: str = "", revision: str = ""
) -> DatasetSource:
    """A DatasetSource as is; a Path as a local file or folder; a string as a ref (DatasetSource.from_ref)."""
    if isinstance(source, DatasetSource):
        return source
    if isinstance(source, Path):
        return DatasetSource.local(source, split=split)
    return DatasetSource.from_ref(source, subset=subset, split=split, revision=revision)


def estimated_rows(source: DatasetSource) -> int | None:
    """About how many records a source holds, cheaply, for a progress fraction: a JSONL file's lines, a Parquet
    file's row count from its footer; None for the other kinds."""
    if source.kind != FILE:
        return None
    if source.file_format == JSONL:
        count = 0
        with source.path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                count += chunk.count(b"\n")
        return count
    if source.file_format == PARQUET:
        import pyarrow.parquet as pq

        try:
            return int(pq.ParquetFile(source.path).metadata.num_rows)
        except (OSError, ValueError):  # not Parquet after all: the check reports why
            return None
    return None


def iter_records(source: DatasetSource | Path | str, data_format: str = AUTO) -> Iterator[RawRecord]:
    """Every record of a source in order, numbered (see the module docstring). A table whose columns fit no format
    (or not `data_format`) is one `line == 0` record, UNKNOWN_COLUMNS, instead of one problem per row."""
    source = as_source(source)
    if source.file_format in (JSONL, JSON):
        yield from iter_json_records(source.path)
        return
    from finetune_server.training.data.tables import iter_table_records

    yield from iter_table_records(source, data_format)
