"""The data dir and the job store belong together: every server of one store must mount the same data dir.

At its first start a data dir gets an id (a file written once, atomically); the store records the id of the data dir
it was first used with. A server started with a store and a data dir whose ids differ is refused: its jobs would
look for checkpoints, uploads and artifacts that are not there.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from finetune_server.storage.job_store import JobStore, StoreRefusedError


class DataDirMismatchError(StoreRefusedError):
    """The data dir is not the one the job store was set up with."""


def data_dir_id(path: Path) -> str:
    """The data dir's id, written now when it has none (by one server when several start at once)."""
    if not path.exists():
        fresh = f"dd-{uuid.uuid4().hex}"
        temp = path.with_name(f".{path.name}-{fresh}")
        temp.write_text(fresh + "\n")
        try:
            os.link(temp, path)  # fails when another server wrote it first: then that one is the id
        except FileExistsError:
            pass
        finally:
            temp.unlink()
    return path.read_text().strip()


def check_data_dir(store: JobStore, path: Path, *, data_dir: Path, store_name: str) -> str:
    """Bind the store to this data dir on first use; refuse a data dir that another one was bound to."""
    own = data_dir_id(path)
    bound = store.bind_data_dir(own)
    if bound != own:
        raise DataDirMismatchError(
            f"the data dir {data_dir} (id {own}) is not the one the job store {store_name} belongs to (id {bound}): "
            "start every server of this store with the same --data-dir"
        )
    return own
