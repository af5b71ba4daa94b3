"""The training worker's allocator setting: with gradient checkpointing, freed activation-sized blocks go back to the
system at once."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys
import torch
from finetune_server.host.allocator import settle_for_training

fixed = settle_for_training(gradient_checkpointing=sys.argv[1] == "checkpointed")

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

first = torch.ones(2 << 20)  # 8 MiB: glibc maps it; freeing it raises glibc's own threshold to its size
del first
before = rss()
blocks, pins = [], []
for _ in range(40):  # 320 MiB of activation-sized blocks, each followed by a small block that stays
    blocks.append(torch.ones(2 << 20))
    pins.append(torch.ones(1024))
del blocks
print(json.dumps({"fixed": fixed, "kept": rss() - before}))
"""


def test_a_checkpointed_job_returns_freed_large_blocks_and_others_keep_glibcs_default() -> None:
    kept = {}
    for mode in ("plain", "checkpointed"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        assert result["fixed"] == (mode == "checkpointed")
        kept[mode] = result["kept"]
    allocated = 40 * (8 << 20)
    assert kept["plain"] > allocated // 2  # glibc's default keeps them in the heap: what the setting is for
    assert kept["checkpointed"] < allocated // 20
