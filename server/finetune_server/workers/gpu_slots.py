"""Which GPU a job slot trains on: slot k is the k-th GPU the server itself may use, never a raw device number.

A server started with `CUDA_VISIBLE_DEVICES=3` (or `2,5`, or GPU UUIDs) owns only those GPUs, so slot 0 must become
`CUDA_VISIBLE_DEVICES=3` in its worker, not `0`. A slot beyond the server's GPUs is refused with a clear error: the
worker would otherwise see no GPU and train on the CPU in fp32, hours slower and silently. On a host without any
GPU a slot only counts concurrent jobs (the CPU is shared), so there it maps to nothing. No torch here: the server
counts its GPUs with nvidia-smi (`host.devices`).
"""

from __future__ import annotations

from collections.abc import Mapping

from finetune_server.errors import ErrorKind, FinetuneError

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def server_gpu_ids(parent_visible: str | None, gpu_count: int) -> list[str]:
    """The server's own GPUs, as CUDA_VISIBLE_DEVICES entries a child process understands, in CUDA's order.

    `parent_visible` is the server's CUDA_VISIBLE_DEVICES (None: unset, every GPU); `gpu_count` how many GPUs the
    server sees (nvidia-smi's, filtered by that variable). CUDA reads the list up to its first invalid entry ("-1"
    or an empty one hides the rest), and so does this.
    """
    if parent_visible is None:
        return [str(i) for i in range(gpu_count)]
    ids: list[str] = []
    for raw in parent_visible.split(","):
        entry = raw.strip()
        if not entry or entry.startswith("-"):
            break
        ids.append(entry)
    return ids[:gpu_count]


def slot_visible_devices(slot: int, gpu_ids: list[str], *, slots_hint: str = "") -> str:
    """The worker's CUDA_VISIBLE_DEVICES for `slot`, or FinetuneError(FAILED_PRECONDITION, NO_GPU_FOR_SLOT)."""
    if 0 <= slot < len(gpu_ids):
        return gpu_ids[slot]
    have = f"{len(gpu_ids)} GPU{'' if len(gpu_ids) == 1 else 's'} ({', '.join(gpu_ids)})" if gpu_ids else "no GPU"
    raise FinetuneError(
        ErrorKind.FAILED_PRECONDITION,
        "NO_GPU_FOR_SLOT",
        f"job slot {slot} has no GPU: this server may use {have}; the job would have trained on the CPU",
        hint=slots_hint
        or f"Start the server with --slots {max(1, len(gpu_ids))} (one job per GPU), or give it more GPUs through "
        "CUDA_VISIBLE_DEVICES.",
    )


def worker_visible_devices(slot: int, env: Mapping[str, str], gpu_count: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES a slot's worker gets: None on a host without GPUs, else its GPU (or the error)."""
    if gpu_count == 0:
        return None
    return slot_visible_devices(slot, server_gpu_ids(env.get(CUDA_VISIBLE_DEVICES), gpu_count))
