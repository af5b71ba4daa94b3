"""Half-written uploads left by a crash are removed at start; on a shared data dir only clearly abandoned ones."""

from __future__ import annotations

import os
import time
from pathlib import Path

from finetune_server.settings import ServerSettings
from finetune_server.storage import layout
from finetune_server.storage.dataset_uploads import remove_stale_uploads


def test_only_uploads_untouched_for_the_cutoff_go_when_other_servers_may_be_receiving(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path)
    settings.uploads_dir.mkdir(parents=True)
    fresh = settings.uploads_dir / f"{layout.UPLOAD_TEMP_PREFIX}fresh"
    old = settings.uploads_dir / f"{layout.UPLOAD_TEMP_PREFIX}old"
    kept = settings.uploads_dir / "ds-0123456789abcdef.jsonl"
    for path in (fresh, old, kept):
        path.write_text("{}\n")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))

    remove_stale_uploads(settings, older_than_s=3600)
    assert (fresh.exists(), old.exists(), kept.exists()) == (True, False, True)
    remove_stale_uploads(settings)  # the one server of a private store: every leftover is its own
    assert (fresh.exists(), kept.exists()) == (False, True)
