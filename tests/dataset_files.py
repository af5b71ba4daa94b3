"""Writing the same rows as every kind of dataset source, and putting a dataset into a hub cache as the hub would.

The hub cache is huggingface_hub's layout: `datasets--<org>--<name>/refs/main` holds the commit, and
`snapshots/<commit>/` the repository's files, which is what `snapshot_download(..., local_files_only=True)` finds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

KINDS = ("jsonl", "json", "parquet", "csv", "arrow", "saved", "hub")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def write_rows(folder: Path, kind: str, rows: list[dict[str, Any]], stem: str = "data") -> Path:
    """`rows` as a dataset of `kind` in `folder` (hub: a hub repository's files); returns the file or folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        path = folder / f"{stem}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path = folder / f"{stem}.json"
        path.write_text(json.dumps(rows, indent=1))
    elif kind == "parquet":
        path = folder / f"{stem}.parquet"
        pq.write_table(_table(rows), path)
    elif kind == "csv":
        path = folder / f"{stem}.csv"
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows({k: "" if r.get(k) is None else r[k] for k in columns} for r in rows)
    elif kind == "arrow":
        path = folder / f"{stem}.arrow"
        table = _table(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    elif kind == "saved":
        import datasets

        path = folder / stem
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise ValueError(kind)
    return path


def put_in_hub_cache(
    cache_dir: Path,
    repo_id: str,
    files: dict[str, list[dict[str, Any]] | str],
    *,
    commit: str = COMMIT,
    branch: str = "main",
) -> Path:
    """A hub dataset in `cache_dir` (a hub cache, e.g. HF_HOME/hub): rows become Parquet files, strings are written
    as they are (a README.md with `configs`). Returns the snapshot folder."""
    import pyarrow.parquet as pq

    repo = cache_dir / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content)
        else:
            pq.write_table(_table(content), target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
