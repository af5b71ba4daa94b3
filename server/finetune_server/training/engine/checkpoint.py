"""Checkpoints that are either complete or absent, found by step number, and enough to resume exactly.

Layout of `output_dir/checkpoints/step-00000100/`:
    adapter/              the LoRA adapter: adapter_config.json and adapter_model.safetensors, as PEFT writes them
                          (no model card: PEFT's templating of one cost ~40 ms per checkpoint)
    optimizer.pt          optimizer state dict
    scheduler.pt          LR scheduler state dict
    rng.pt                each rank's torch CPU generator and its own GPU's generator
    trainer_state.json    step, data position, each rank's python/numpy RNG states, the fp16 loss scaler's state
                          and `extra` (loss history, counters)
    complete              written last

A checkpoint is written into a temp folder next to the others, every file fsynced, then renamed into place and the
parent fsynced, so a crash leaves either the whole checkpoint or a temp folder that is ignored (and removed later).
Checkpoints are ordered by the integer step, never by their names as strings.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from finetune_server import faults
from finetune_server.storage import layout
from finetune_server.storage.layout import checkpoint_name
from finetune_server.util.paths import folder_bytes

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream resumes: the next micro-batch is `batch_index` of epoch `epoch`'s batch plan."""

    epoch: int
    batch_index: int


@dataclass
class CheckpointState:
    """What `load_checkpoint` hands back besides restoring the model, optimizer and scheduler in place."""

    step: int
    path: Path
    data_position: DataPosition
    rng_states: list[dict[str, Any]]  # one per rank that saved it, in rank order (`rng_states_for_rank`)
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng_states(device: torch.device | None = None) -> dict[str, Any]:
    """This process's generators: python, numpy, torch CPU, and the CUDA generator of `device` only.

    Only this rank's own GPU: the `*_all` calls would create a CUDA context on every visible GPU (hundreds of MiB
    each, on GPUs other jobs use) and a rank would restore another rank's state.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None,
    }


def restore_rng_states(states: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `capture_rng_states` took (the CUDA generator onto `device`, when both are there)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    cuda_state = states.get("cuda")
    if isinstance(cuda_state, torch.Tensor) and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)


def rng_states_for_rank(states: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """This rank's saved generators; a rank the checkpoint did not have (more processes now) takes rank 0's."""
    return states[rank] if rank < len(states) else states[0]


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder bottom-up, so the rename publishes data that is on disk."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(staging: Path, target: Path) -> None:
    """Atomically put the finished folder `staging` at `target` (same parent), replacing an existing one."""
    _fsync_tree(staging)
    if target.exists():
        # A folder cannot be renamed over a non-empty one: move the old aside first, then drop it.
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{layout.CHECKPOINT_TEMP_PREFIX}old-{target.name}-"))
        os.replace(target, old / target.name)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    _fsync_dir(target.parent)


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a full disk then shows as OSError(ENOSPC) in the exception chain (with a
    path, torch raises only an opaque "unexpected pos" RuntimeError)."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng_states: list[dict[str, Any]],
    data_position: DataPosition,
    extra: dict[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write `checkpoints/step-{step:08d}` atomically and return its path. `extra` must be JSON-serialisable.

    `rng_states`: `capture_rng_states()` of every rank, in rank order. `scaler`: fp16's loss scaler, whose scale
    and growth counter a resume needs to continue exactly (a fresh scale would skip steps while it backs off).
    """
    parent = layout.JobDir(Path(output_dir)).checkpoints
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / checkpoint_name(step)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f"{layout.CHECKPOINT_TEMP_PREFIX}{target.name}-"))
    try:
        save_adapter_weights(model, staging / layout.ADAPTER_DIR)
        faults.on_checkpoint_write(staging)  # FINETUNE_FAULTS=disk_full_at_checkpoint=N (tests, chaos drills)
        _torch_save(optimizer.state_dict(), staging / layout.OPTIMIZER_FILE)
        _torch_save(scheduler.state_dict(), staging / layout.SCHEDULER_FILE)
        _torch_save(
            {"ranks": [{"torch": r["torch"], "cuda": r.get("cuda")} for r in rng_states]}, staging / layout.RNG_FILE
        )
        state = {
            "step": step,
            "data_position": {"epoch": data_position.epoch, "batch_index": data_position.batch_index},
            "rng": {"ranks": [{"python": r["python"], "numpy": r["numpy"]} for r in rng_states]},
            "scaler": scaler.state_dict() if scaler is not None else None,  # plain numbers
            "extra": extra or {},
        }
        (staging / layout.TRAINER_STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        (staging / layout.CHECKPOINT_COMPLETE_MARKER).write_text(f"{step}\n", encoding="utf-8")
        publish_dir(staging, target)
    except BaseException:
        # Also on a full disk (ENOSPC): the half-written staging folder goes, the previous checkpoint stays newest.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first by integer step. Temp and incomplete folders are skipped."""
    return layout.JobDir(Path(output_dir)).complete_checkpoints()


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint by step number, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def prune(output_dir: Path, keep: int, *, best_step: int | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest `keep` (keep <= 0: keep all), except the one at
    `best_step` (the best evaluation's), which is kept as well. Returns what went."""
    if keep <= 0:
        return []
    doomed = [path for step, path in list_checkpoints(output_dir)[:-keep] if step != best_step]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def remove_stale_temp(output_dir: Path) -> list[Path]:
    """Remove temp folders a crashed save left behind (call only when no save is in progress)."""
    parent = layout.JobDir(Path(output_dir)).checkpoints
    if not parent.is_dir():
        return []
    stale = [child for child in parent.iterdir() if child.name.startswith(layout.CHECKPOINT_TEMP_PREFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def folder_size(path: Path) -> int:
    return folder_bytes(path)


def load_checkpoint(
    path: Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None = None,
) -> CheckpointState:
    """Restore the adapter weights, optimizer, scheduler and loss scaler in place; return the step, data position,
    RNG and extra.

    RNG states are returned, not applied: the caller restores them right before the loop, after everything that
    draws random numbers during setup (model init, LoRA init).
    """
    path = Path(path)
    if not (path / layout.CHECKPOINT_COMPLETE_MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint")
    load_adapter_weights(model, path / layout.ADAPTER_DIR)
    load_optimizer_state(optimizer, path / layout.OPTIMIZER_FILE)
    scheduler.load_state_dict(torch.load(path / layout.SCHEDULER_FILE, weights_only=True))
    torch_rng = torch.load(path / layout.RNG_FILE, weights_only=True)
    state = json.loads((path / layout.TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    position = state["data_position"]
    return CheckpointState(
        step=int(state["step"]),
        path=path,
        data_position=DataPosition(epoch=int(position["epoch"]), batch_index=int(position["batch_index"])),
        rng_states=_rank_rng_states(state["rng"], torch_rng),
        extra=state.get("extra", {}),
    )


def save_adapter_weights(model: Any, adapter_dir: Path) -> None:
    """The PEFT model's trainable weights and its adapter config, the two files `PeftModel.from_pretrained` and
    `load_adapter_weights` read (what `save_pretrained` writes, without its README model card)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter_dir.mkdir(parents=True, exist_ok=True)
    weights: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in get_peft_model_state_dict(model).items():
        storage = tensor.untyped_storage().data_ptr()
        # safetensors refuses aliased tensors (tied modules_to_save): a second view of a storage is copied.
        weights[name] = tensor.clone() if storage in storages else tensor.contiguous()
        storages.add(storage)
    save_file(weights, str(adapter_dir / layout.ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = copy.copy(model.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(adapter_dir))


def load_adapter_weights(model: Any, adapter_dir: Path) -> None:
    """Load a saved adapter folder's weights into the PEFT model in place (on the model's device); ValueError when
    they are not this model's adapter (a LoRA weight the folder lacks, or one the model has no place for)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(p.device for p in model.parameters())
    weights = load_file(str(Path(adapter_dir) / layout.ADAPTER_WEIGHTS_FILE), device=str(device))
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # a tensor of another shape (another rank)
        raise ValueError(f"the adapter in {adapter_dir} does not fit the model: {exc}") from exc
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"the adapter in {adapter_dir} does not match the model: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )


def load_optimizer_moments(optimizer: torch.optim.Optimizer, checkpoint_dir: Path) -> None:
    """A checkpoint's optimizer state (AdamW's moments and step counts) into `optimizer`, keeping its own
    hyperparameters (learning rate, weight decay): a continued job trains at its own learning rate and schedule."""
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    load_optimizer_state(optimizer, Path(checkpoint_dir) / layout.OPTIMIZER_FILE)
    for group, values in zip(optimizer.param_groups, own, strict=True):
        group.update(values)


def _rank_rng_states(host: dict[str, Any], device: dict[str, Any]) -> list[dict[str, Any]]:
    """Each rank's generators; a checkpoint written before they were per rank holds one set (its CUDA list is
    dropped: it was every visible GPU's, not this rank's)."""
    if "ranks" not in host:
        return [{"python": host["python"], "numpy": host["numpy"], "torch": device["torch"], "cuda": None}]
    return [{**h, **d} for h, d in zip(host["ranks"], device["ranks"], strict=True)]


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load an optimizer state saved by `save_checkpoint`, read onto the CPU.

    `Optimizer.load_state_dict` moves the moments to their parameters' device and dtype itself but leaves AdamW's
    `step` counters where the file was mapped; mapped to a GPU, each step would then read every counter back to
    the host (one sync per parameter per step). Read on the CPU, they stay there as a fresh run keeps them.
    """
    optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
