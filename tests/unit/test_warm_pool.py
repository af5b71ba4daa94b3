"""The warm worker pool, for real: a fork server that preloaded torch, transformers and peft forks each worker.

One fork server start is ~10 s of imports; each test pays it once and then forks several workers from it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from finetune_server.workers.protocol import Cancelled, Message, Result
from finetune_server.workers.supervisor import run_worker, supervise
from finetune_server.workers.warm_pool import UNKNOWN_RETURNCODE, WarmPool

from .test_worker_supervisor import Recorder, assert_gone, cancel_at_first_progress, make_spec

PROBE = "tests.unit.pool_probe_worker"
REPO = Path(__file__).resolve().parents[2]


def probe_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


async def run_probe(pool: WarmPool, tmp_path: Path, name: str, env: dict[str, str], **spec: Any) -> Any:
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    recorder = Recorder()

    async def on_message(message: Message) -> None:
        await recorder(message)

    return await supervise(
        PROBE,
        spec_path,
        on_message=on_message,
        log_path=tmp_path / f"{name}.log",
        env=env,
        bound=_Quiet(),
        launcher=pool,
    )


class _Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@pytest.mark.slow
async def test_each_worker_is_a_fresh_fork_of_a_pristine_preloaded_process(tmp_path: Path) -> None:
    pool = WarmPool(1, tmp_path / "pool")
    env = probe_env(OMP_NUM_THREADS="2")
    try:
        first = await run_probe(pool, tmp_path, "first", env)
        second = await run_probe(pool, tmp_path, "second", env)
        crashed = await run_probe(pool, tmp_path, "crashed", env, crash=True)
        after_crash = await run_probe(pool, tmp_path, "after-crash", env)
    finally:
        await pool.close()

    seen = [e.final.data for e in (first, second, after_crash)]
    assert all(isinstance(e.final, Result) and e.returncode == 0 for e in (first, second, after_crash))
    # One fork server served all of them, each in a process (and process group) of its own.
    assert len({s["ppid"] for s in seen}) == 1 and seen[0]["ppid"] != os.getpid()
    assert len({s["pid"] for s in seen}) == 3 and all(s["pgid"] == s["pid"] for s in seen)
    assert pool.forked == 4 and pool.fresh == 0
    # Nothing one worker changed reaches the next: module globals, the environment.
    assert [s["dirtied"] for s in seen] == [0, 0, 0] and [s["marker"] for s in seen] == [None] * 3
    # The libraries came preloaded and work: threads as the environment says (the preload ran with 1), no CUDA.
    assert all(s["torch_preloaded"] and s["threads"] == 2 and s["matmul"] == 64.0 for s in seen)
    assert not any(s["cuda_initialized"] for s in seen) and all(s["stdin_is_devnull"] for s in seen)
    # A crash is a crash as with a fresh process (exit 1, traceback in its own log) and does not poison the pool.
    assert crashed.crashed and crashed.returncode == 1
    assert "probe crash on purpose" in (tmp_path / "crashed.log").read_text()
    assert "probe done" in (tmp_path / "first.log").read_text()
    for s in seen:
        assert_gone(s["pid"])


@pytest.mark.slow
async def test_a_dead_fork_server_is_replaced_and_environments_get_their_own(tmp_path: Path) -> None:
    pool = WarmPool(1, tmp_path / "pool")
    try:
        before = (await run_probe(pool, tmp_path, "before", probe_env())).final.data
        os.kill(before["ppid"], signal.SIGKILL)  # the fork server dies between two workers
        # The pool notices (its socket's EOF, or the failed request) and starts a new one for that environment.
        after = await run_probe(pool, tmp_path, "after", probe_env())
        other_env = (await run_probe(pool, tmp_path, "other", probe_env(PROBE_MARKER="set"))).final.data
    finally:
        await pool.close()
    assert isinstance(after.final, Result)
    assert after.final.data["ppid"] != before["ppid"]
    # A different environment is another fork server (size 1: the previous one is closed), seen exactly.
    assert other_env["marker"] == "set" and other_env["ppid"] not in {before["ppid"], after.final.data["ppid"]}
    assert pool.forked == 3 and pool.fresh == 0


@pytest.mark.slow
async def test_cancel_stops_a_pooled_training_worker(tmp_path: Path, tiny_model_dir: Path) -> None:
    pool = WarmPool(1, tmp_path / "pool")
    spec = make_spec(tmp_path, tiny_model_dir, max_steps=200)
    cancel = asyncio.Event()
    recorder = cancel_at_first_progress(cancel)
    try:
        exit_ = await run_worker(
            spec, on_message=recorder, cancel=cancel, log_path=tmp_path / "worker.log", launcher=pool
        )
    finally:
        await pool.close()
    assert pool.forked == 1
    assert exit_.returncode == 0 and isinstance(exit_.final, Cancelled) and 1 <= exit_.final.step < 200
    assert recorder.messages[0].TYPE == "started" and recorder.messages[-1] is exit_.final
    assert_gone(exit_.pid)


async def test_a_worker_outliving_its_fork_server_still_ends_for_its_supervisor(tmp_path: Path) -> None:
    pool = WarmPool(1, tmp_path / "pool")
    (tmp_path / "wait.json").write_text(json.dumps({"wait_for_stdin": True}))
    commands: asyncio.Queue[bytes | None] = asyncio.Queue()
    seen: list[Message] = []

    async def on_message(message: Message) -> None:
        seen.append(message)
        if message.TYPE == "started":  # the fork server dies while its worker runs; then the worker is let go
            os.kill(_parent_of(message.pid), signal.SIGKILL)
            await commands.put(None)

    try:
        exit_ = await asyncio.wait_for(
            supervise(
                PROBE,
                tmp_path / "wait.json",
                on_message=on_message,
                log_path=tmp_path / "wait.log",
                env=probe_env(),
                bound=_Quiet(),
                commands=commands,
                launcher=pool,
            ),
            timeout=120,
        )
    finally:
        await pool.close()
    assert [m.TYPE for m in seen] == ["started", "result"] and isinstance(exit_.final, Result)
    assert exit_.returncode == UNKNOWN_RETURNCODE, "its status went with the fork server; its end did not"
    # Ended: gone, or a zombie left to whatever adopted it (an init that does not reap, as in some sandboxes).
    assert _state_of(exit_.pid) in {None, "Z"}


def _state_of(pid: int) -> str | None:
    """The process's state letter (R, S, Z...), None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])
