"""The worker subprocess and its supervisor, for real: the tiny model, real processes, real signals.

A fresh worker start costs ~9 s of imports (torch, transformers, peft) before it trains. Most tests here take their
workers from one warm pool for the module (forks of a fork server that imported those once, as a server's workers
are); the ones about a fresh start (still importing when cancelled, a parent that dies, a fault flag in the
environment) start theirs fresh.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
from finetune_server.training.engine.checkpoint import list_checkpoints
from finetune_server.workers import executor as executor_module
from finetune_server.workers.executor import LocalSubprocessExecutor
from finetune_server.workers.process import kill_process_group
from finetune_server.workers.protocol import (
    Cancelled,
    Error,
    Event,
    Message,
    Result,
    Started,
    decode_line,
    module_command,
)
from finetune_server.workers.supervisor import WorkerExit, run_worker, spec_path_for, worker_env
from finetune_server.workers.train import WORKER_MODULE, WorkerSpec
from finetune_server.workers.warm_pool import WarmPool

from ..conftest import write_alpaca

TOTAL_STEPS = 6
SAVE_STEPS = 2

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the pool's fork server lives in the module's loop


def stable_env() -> dict[str, str]:
    """Our environment without pytest's per-test variable: the pool keys fork servers by the whole environment."""
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


async def run_pooled(pool: WarmPool, spec: WorkerSpec, **kwargs: Any) -> WorkerExit:
    """`run_worker` with its worker forked from the module's pool."""
    return await run_worker(spec, **kwargs, env=stable_env(), launcher=pool)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WarmPool]:
    warm = WarmPool(1, tmp_path_factory.mktemp("pool"))
    yield warm
    await warm.close()


def make_spec(tmp_path: Path, model_dir: Path, dataset: Path | None = None, **config: Any) -> WorkerSpec:
    dataset = dataset or write_alpaca(tmp_path / "train.jsonl")
    values: dict[str, Any] = {
        "max_steps": TOTAL_STEPS,
        "save_steps": SAVE_STEPS,
        "save_total_limit": 0,
        "max_length": 128,
        "per_device_train_batch_size": 2,
        "learning_rate": 3e-3,
        "logging_steps": 1,
    }
    values.update(config)
    resolved, _ = resolve(
        TrainingConfig(
            model_name=str(model_dir), dataset=str(dataset), lora=LoraSettings(r=8, alpha=16, dropout=0.0), **values
        )
    )
    return WorkerSpec(
        job_id="job-test",
        config=resolved.to_dict(),
        model_ref=str(model_dir),
        dataset_path=str(dataset),
        output_dir=str(tmp_path / "job"),
        hub_offline=True,
        device="cpu",
        data_dir=str(tmp_path),
    )


class Recorder:
    """on_message that keeps every message, and runs a hook on each (to cancel or kill at a chosen point)."""

    def __init__(self, hook: Any = None) -> None:
        self.messages: list[Message] = []
        self.hook = hook

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)
        if self.hook is not None:
            self.hook(message)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [m.data for m in self.messages if isinstance(m, Event) and m.kind == kind]


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left either
        os.killpg(pid, 0)


@pytest.mark.slow
@in_module_loop
async def test_run_to_completion(tmp_path: Path, tiny_model_dir: Path, pool: WarmPool) -> None:
    spec = make_spec(tmp_path, tiny_model_dir)
    recorder = Recorder()
    log_path = tmp_path / "job" / "worker.log"

    exit_ = await run_pooled(pool, spec, on_message=recorder, cancel=asyncio.Event(), log_path=log_path)

    assert exit_.returncode == 0 and exit_.signal is None and not exit_.crashed and not exit_.oom_killed
    types = [m.TYPE for m in recorder.messages]
    assert types[0] == "started" and types[-1] == "result" and types.count("result") == 1
    assert recorder.messages[0] == Started(resumed_from_step=None, pid=exit_.pid)
    progress = recorder.events("progress")
    assert [p["step"] for p in progress] == list(range(1, TOTAL_STEPS + 1))
    assert {p["total_steps"] for p in progress} == {TOTAL_STEPS}
    first = progress[0]
    assert set(first) == {
        "step",
        "total_steps",
        "epoch",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "elapsed",
        "eta",
        "memory",
        "tokens_seen",
    }
    assert first["memory"]["device"] == "cpu" and first["memory"]["allocated_bytes"] > 0
    assert first["loss"] > 0 and first["tokens_seen"] > 0 and first["eta"] > 0
    checkpoints = recorder.events("checkpoint")
    assert [c["step"] for c in checkpoints] == [2, 4, 6]
    assert all(c["path"].startswith("checkpoints/") and c["size_bytes"] > 0 for c in checkpoints)
    assert all(log["level"] in {"DEBUG", "INFO", "WARNING", "ERROR"} for log in recorder.events("log"))

    result = exit_.final
    assert isinstance(result, Result) and result is recorder.messages[-1]
    data = result.data
    assert data["steps"] == TOTAL_STEPS and data["trained_tokens"] > 0 and data["train_runtime"] > 0
    assert data["adapter_location"] == "job/adapter"  # relative to data_dir
    assert (tmp_path / data["adapter_location"] / "adapter_config.json").is_file()
    assert data["metrics"]["total_steps"] == TOTAL_STEPS
    # The spec was left in the job folder; structlog wrote JSON lines, bound with the job id, to the log file.
    assert WorkerSpec.read(spec_path_for(spec)) == spec
    logged = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(entry.get("event") == "worker started" and entry.get("job_id") == "job-test" for entry in logged)
    assert_gone(exit_.pid)


def cancel_at_first_progress(cancel: asyncio.Event) -> Recorder:
    """A recorder that sets `cancel` when the first progress event arrives."""

    def on_progress(message: Message) -> None:
        if isinstance(message, Event) and message.kind == "progress":
            cancel.set()

    return Recorder(on_progress)


@in_module_loop
async def test_cancel_mid_run(tmp_path: Path, tiny_model_dir: Path, pool: WarmPool) -> None:
    spec = make_spec(tmp_path, tiny_model_dir, max_steps=200)
    cancel = asyncio.Event()
    recorder = cancel_at_first_progress(cancel)
    exit_ = await run_pooled(pool, spec, on_message=recorder, cancel=cancel, log_path=tmp_path / "worker.log")

    assert exit_.returncode == 0 and exit_.signal is None
    assert isinstance(exit_.final, Cancelled)
    assert 1 <= exit_.final.step < 200
    assert recorder.messages[-1] is exit_.final
    assert_gone(exit_.pid)


@in_module_loop
async def test_sigkill_then_resume(tmp_path: Path, tiny_model_dir: Path, pool: WarmPool) -> None:
    spec = make_spec(tmp_path, tiny_model_dir)
    killed_at: list[int] = []
    pids: list[int] = []

    def kill_after_first_checkpoint(message: Message) -> None:
        if isinstance(message, Started):
            pids.append(message.pid)
        if isinstance(message, Event) and message.kind == "checkpoint" and not killed_at:
            killed_at.append(message.data["step"])
            assert kill_process_group(pids[0]) is True

    first = await run_pooled(
        pool,
        spec,
        on_message=Recorder(kill_after_first_checkpoint),
        cancel=asyncio.Event(),
        log_path=tmp_path / "w.log",
    )
    assert first.signal == signal.SIGKILL and first.returncode == -signal.SIGKILL
    assert first.final is None and first.crashed and not first.oom_killed
    assert first.started is not None and first.started.pid == first.pid
    assert killed_at == [SAVE_STEPS]
    assert_gone(first.pid)
    # The kill lands within milliseconds; the checkpoint on disk is the one reported (or, at worst, a later one).
    newest_on_disk = list_checkpoints(Path(spec.output_dir))[-1][0]
    assert newest_on_disk >= killed_at[0]

    recorder = Recorder()
    second = await run_pooled(pool, spec, on_message=recorder, cancel=asyncio.Event(), log_path=tmp_path / "w.log")

    assert second.returncode == 0 and isinstance(second.final, Result)
    assert second.started is not None and second.started.resumed_from_step == newest_on_disk
    progress = recorder.events("progress")
    assert [p["step"] for p in progress] == list(range(newest_on_disk + 1, TOTAL_STEPS + 1))
    assert {p["total_steps"] for p in progress} == {TOTAL_STEPS}
    assert second.final.data["steps"] == TOTAL_STEPS


@in_module_loop
async def test_typed_error(tmp_path: Path, tiny_model_dir: Path, pool: WarmPool) -> None:
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"unrelated": 1}\n{"unrelated": 2}\n')
    spec = make_spec(tmp_path, tiny_model_dir, dataset, data_format="alpaca")
    recorder = Recorder()

    exit_ = await run_pooled(pool, spec, on_message=recorder, cancel=asyncio.Event(), log_path=tmp_path / "w.log")

    assert exit_.returncode == 1 and exit_.signal is None
    error = exit_.final
    assert isinstance(error, Error)
    assert error.reason == "NO_USABLE_EXAMPLES" and error.kind == "INVALID_ARGUMENT"
    assert error.step == 0 and error.hint and "bad.jsonl" in error.message
    assert [m.TYPE for m in recorder.messages] == ["started", "error"]


@in_module_loop
async def test_crash_is_exit_2_without_final_message(tmp_path: Path, tiny_model_dir: Path, pool: WarmPool) -> None:
    spec = make_spec(tmp_path, tiny_model_dir)
    broken = WorkerSpec.from_dict({**spec.to_dict(), "config": {**spec.config, "no_such_field": 1}})
    recorder = Recorder()

    exit_ = await run_pooled(pool, broken, on_message=recorder, cancel=asyncio.Event(), log_path=tmp_path / "w.log")

    assert exit_.returncode == 2 and exit_.signal is None and exit_.crashed
    assert [m.TYPE for m in recorder.messages] == ["started"]
    assert any("no_such_field" in line for line in exit_.log_tail)


async def test_cancel_escalates_to_sigterm(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A worker that does not stop within the grace (here: still importing torch) is terminated with its group."""
    spec = make_spec(tmp_path, tiny_model_dir)
    cancel = asyncio.Event()
    cancel.set()

    exit_ = await run_worker(
        spec, on_message=Recorder(), cancel=cancel, log_path=tmp_path / "w.log", cancel_grace_s=0.2
    )

    assert exit_.signal == signal.SIGTERM and exit_.final is None
    assert_gone(exit_.pid)


@pytest.mark.slow
def test_stdin_eof_stops_an_orphan(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The server dies (its end of stdin closes): the worker stops at its next micro-step and exits."""
    spec = make_spec(tmp_path, tiny_model_dir, max_steps=200)
    spec_path = spec.write(tmp_path / "spec.json")
    read_fd, write_fd = os.pipe()
    with (tmp_path / "w.log").open("ab") as log_file:
        process = subprocess.Popen(
            module_command(WORKER_MODULE, spec_path, write_fd),
            stdin=subprocess.PIPE,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_fd,),
            start_new_session=True,
            env=worker_env(spec),
        )
    os.close(write_fd)
    messages: list[Message] = []
    try:
        with os.fdopen(read_fd, "rb") as events:
            for line in events:
                messages.append(decode_line(line))
                if isinstance(messages[-1], Event) and messages[-1].kind == "progress" and process.stdin is not None:
                    process.stdin.close()
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            kill_process_group(process.pid)
            process.wait()
    assert returncode == 0
    assert isinstance(messages[-1], Cancelled) and 1 <= messages[-1].step < 200


def test_kill_process_group_of_a_gone_worker_is_harmless() -> None:
    process = subprocess.Popen(["true"], start_new_session=True)
    process.wait()
    assert kill_process_group(process.pid) is False
    with pytest.raises(ValueError):
        kill_process_group(1)


async def test_executor_maps_slots_through_the_servers_own_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from finetune_server.host.devices import Device

    seen: list[WorkerSpec] = []

    async def fake_run_worker(spec: WorkerSpec, **_: Any) -> WorkerExit:
        seen.append(spec)
        return WorkerExit(pid=0, returncode=0, signal=None, final=None)

    async def noop(_: Message) -> None:
        return None

    async def place(slot: int, gpus: int, env: dict[str, str]) -> WorkerExit:
        monkeypatch.setattr(executor_module, "detect_devices", lambda: [Device(name=f"cuda:{i}") for i in range(gpus)])
        spec = WorkerSpec("j", {}, "m", "d", str(tmp_path), gpu_slot=slot, device="cuda:1")
        return await LocalSubprocessExecutor(env=env).run(
            spec, on_message=noop, cancel=asyncio.Event(), log_path=tmp_path / "l"
        )

    monkeypatch.setattr(executor_module, "run_worker", fake_run_worker)
    await place(1, 0, {})  # no GPU on the host: a slot only counts jobs
    assert seen[-1].gpu_slot is None and seen[-1].cuda_visible_devices is None
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(seen[-1], {})

    await place(1, 2, {})
    assert seen[-1].gpu_slot == 1 and seen[-1].device == "cuda:0"
    assert worker_env(seen[-1], {})["CUDA_VISIBLE_DEVICES"] == "1"

    # A server started on GPU 3 sends slot 0 to GPU 3, not to GPU 0 (nvidia-smi shows it one GPU, as cuda:0).
    await place(0, 1, {"CUDA_VISIBLE_DEVICES": "3"})
    assert worker_env(seen[-1], {"CUDA_VISIBLE_DEVICES": "3"})["CUDA_VISIBLE_DEVICES"] == "3"
    await place(1, 2, {"CUDA_VISIBLE_DEVICES": "2,5"})
    assert seen[-1].cuda_visible_devices == "5"

    # --slots 2 on one GPU: slot 1 is refused, it does not train on the CPU.
    runs = len(seen)
    refused = await place(1, 1, {"CUDA_VISIBLE_DEVICES": "3"})
    assert len(seen) == runs, "no worker was started"
    assert isinstance(refused.final, Error) and refused.final.reason == "NO_GPU_FOR_SLOT"
    assert "1 GPU (3)" in refused.final.message and "--slots 1" in refused.final.hint


def test_oom_heuristic(tmp_path: Path) -> None:
    import structlog

    from finetune_server.workers.supervisor import _exit_report, _Seen

    log_path = tmp_path / "w.log"
    log_path.write_text('{"event": "loading model"}\nKilled\n')
    bound = structlog.get_logger()
    nothing = _Seen()
    assert _exit_report(1, -signal.SIGKILL, nothing, log_path, None, bound).oom_killed
    assert not _exit_report(1, -signal.SIGTERM, nothing, log_path, None, bound).oom_killed
    reported = _Seen(final=Cancelled(step=1))
    assert not _exit_report(1, -signal.SIGKILL, reported, log_path, None, bound).oom_killed
    log_path.write_text("the job was killed by the user\n")
    assert not _exit_report(1, -signal.SIGKILL, nothing, log_path, None, bound).oom_killed


@in_module_loop
async def test_cancelled_caller_does_not_orphan_the_worker(
    tmp_path: Path, tiny_model_dir: Path, pool: WarmPool
) -> None:
    """If the coroutine running the worker is cancelled (server shutdown), the worker still stops and is reaped."""
    from finetune_server.workers import supervisor

    spec = make_spec(tmp_path, tiny_model_dir, max_steps=200)
    started = asyncio.Event()
    pids: list[int] = []

    async def on_message(message: Message) -> None:
        if isinstance(message, Started):
            pids.append(message.pid)
        if isinstance(message, Event) and message.kind == "progress":
            started.set()

    task = asyncio.create_task(
        run_pooled(pool, spec, on_message=on_message, cancel=asyncio.Event(), log_path=tmp_path / "w.log")
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.gather(*supervisor._background)  # the worker stops on stdin EOF, long before any escalation
    assert_gone(pids[0])


@pytest.mark.slow
async def test_out_of_memory_at_model_load_is_reported_as_out_of_memory_not_a_crash(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A crash would be retried into the same failure; OUT_OF_MEMORY fails the job at once with the hints."""
    spec = make_spec(tmp_path, tiny_model_dir)
    recorder = Recorder()
    env = {**os.environ, "FINETUNE_FAULTS": "oom_at_model_load=1"}
    exit_ = await run_worker(
        spec, on_message=recorder, cancel=asyncio.Event(), log_path=tmp_path / "job" / "worker.log", env=env
    )
    assert not exit_.crashed, exit_.log_tail
    assert isinstance(exit_.final, Error) and exit_.final.reason == "OUT_OF_MEMORY", exit_.final
    assert "while loading the model" in exit_.final.message and exit_.final.step == 0
    assert "per_device_train_batch_size" in exit_.final.hint
