"""Every file and folder the service keeps under its data dir, named in one place.

```
<data dir>/
    finetune.db                         the embedded job store (SQLite)
    data-dir-id                         this data dir's id, written at first start; its job store records it
    datasets/<dataset id>.<ext>         uploaded datasets (.jsonl, .json, .parquet); `.upload-*` still arriving
    jobs/<job id>/                      one job (the worker's output folder)
        worker_spec.json                what the current attempt's worker was told
        worker.pid                      the running worker's pid, for recovery after a server crash
        worker.log                      every attempt's stdout and stderr
        checkpoints/step-<8 digits>/    adapter/, optimizer.pt, scheduler.pt, rng.pt, trainer_state.json, complete
        checkpoints/.tmp-*              a checkpoint being written (renamed into place once complete)
        adapter/                        the final adapter, with the tokenizer files and the chat template
        metrics.json, loss_curve.png    the training report
        tensorboard/                    TensorBoard event files, when tensorboard is installed
        config.json                     the resolved TrainingConfig (jobs of the in-process LoRATrainer only)
    artifacts/<artifact id>/            one export: the adapter or merged model, with generation_config.json
    artifacts/<artifact id>.log         its export worker's log
    artifacts/.export-spec-*.json       an export worker's spec, while it runs
    generate/worker-<n>.log, .json      the generation workers' logs, and the spec of the one running as worker n
    token-cache/<key>/                  one dataset tokenized for one model, template and max_length (token_cache)
        tokens.arrow                    input_ids, labels, length, trainable, num_tokens, row (Arrow IPC stream)
        meta.json                       what the key is made of, and counts (truncated, unusable, token stats)
        last-used                       touched on every open (LRU order); held with a shared lock while in use
    token-cache/.staging-<key>-*        an entry being built (renamed into place once complete)
    token-cache/.lock-<key>             held while <key> is being built, so only one process tokenizes it
```

Other modules take paths from here and never spell these names themselves, so the layout can only change here. The
names inside a model folder that Hugging Face defines (config.json, tokenizer.json, ...) are not ours and are not
listed, except the adapter files and the chat template that our exports promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STORE_FILE = "finetune.db"
DATA_DIR_ID_FILE = "data-dir-id"
DATASETS_DIR = "datasets"
UPLOAD_TEMP_PREFIX = ".upload-"
UPLOAD_SUFFIXES = (".jsonl", ".json", ".parquet")  # an uploaded dataset's file is `<dataset id><suffix>`
JOBS_DIR = "jobs"
ARTIFACTS_DIR = "artifacts"
EXPORT_SPEC_TEMP_PREFIX = ".export-spec-"
TOKEN_CACHE_DIR = "token-cache"
GENERATE_DIR = "generate"
FORKSERVER_DIR = "forkservers"

WORKER_SPEC_FILE = "worker_spec.json"
WORKER_PID_FILE = "worker.pid"
WORKER_LOG_FILE = "worker.log"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_TEMP_PREFIX = ".tmp-"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"
RAY_TRAIN_DIR = "ray-train"  # Ray Train's run folders of a job's multi-worker attempts

# Inside a checkpoint folder.
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_COMPLETE_MARKER = "complete"  # written last: a folder without it is not a checkpoint
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"

# Inside an adapter folder (peft's names, which vLLM and PeftModel read) and an artifact.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
RESOLVED_CONFIG_FILE = "config.json"  # the in-process trainer's record of a job's resolved TrainingConfig

# Inside the token cache.
TOKEN_CACHE_STAGING_PREFIX = ".staging-"
TOKEN_CACHE_LOCK_PREFIX = ".lock-"
TOKENS_FILE = "tokens.arrow"
TOKEN_CACHE_META_FILE = "meta.json"
TOKEN_CACHE_USED_MARKER = "last-used"


class _Under:
    """A fixed name under a folder's `root`, declared once as a class attribute: `adapter = _Under(ADAPTER_DIR)`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, folder: _Folder, owner: type | None = None) -> Path:
        return folder.root / self.name


@dataclass(frozen=True)
class _Folder:
    root: Path


@dataclass(frozen=True)
class DataDir(_Folder):
    """The data dir's top level."""

    store = _Under(STORE_FILE)
    data_dir_id = _Under(DATA_DIR_ID_FILE)
    datasets = _Under(DATASETS_DIR)
    jobs = _Under(JOBS_DIR)
    artifacts = _Under(ARTIFACTS_DIR)

    def uploaded_dataset(self, dataset_id: str, suffix: str) -> Path:
        return self.datasets / f"{dataset_id}{suffix}"

    @property
    def token_cache(self) -> Path:
        return self.root / TOKEN_CACHE_DIR

    def job(self, job_id: str) -> JobDir:
        return JobDir(self.jobs / job_id)

    def artifact(self, artifact_id: str) -> Path:
        return self.artifacts / artifact_id

    def artifact_log(self, artifact_id: str) -> Path:
        return self.artifacts / f"{artifact_id}.log"

    def forkserver_logs(self, host: str) -> Path:
        """Where the warm pool's fork servers of the server on `host` log (their preload; each worker logs apart)."""
        return self.root / FORKSERVER_DIR / host

    def generate_log(self, worker: int) -> Path:
        """Generation worker `worker`'s log (every run of that worker number); each run's spec is beside it while it
        runs, as `.worker-N-spec-*.json`."""
        return self.root / GENERATE_DIR / f"worker-{worker}.log"


@dataclass(frozen=True)
class JobDir(_Folder):
    """One job's folder: what its workers write and what its exports read."""

    worker_spec = _Under(WORKER_SPEC_FILE)
    worker_pid = _Under(WORKER_PID_FILE)
    worker_log = _Under(WORKER_LOG_FILE)
    checkpoints = _Under(CHECKPOINTS_DIR)
    adapter = _Under(ADAPTER_DIR)
    metrics = _Under(METRICS_FILE)
    loss_curve = _Under(LOSS_CURVE_FILE)
    tensorboard = _Under(TENSORBOARD_DIR)
    ray_train = _Under(RAY_TRAIN_DIR)
    resolved_config = _Under(RESOLVED_CONFIG_FILE)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first by integer step; temp and incomplete folders skipped."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for child in self.checkpoints.iterdir():
            step = checkpoint_step(child.name)
            if step is not None and child.is_dir() and (child / CHECKPOINT_COMPLETE_MARKER).is_file():
                found.append((step, child))
        return sorted(found, key=lambda item: item[0])


@dataclass(frozen=True)
class TokenCacheDir:
    """The token cache's folder: complete entries by key, entries being built, and the build locks."""

    root: Path

    def entry(self, key: str) -> TokenCacheEntry:
        return TokenCacheEntry(self.root / key)

    def staging_prefix(self, key: str) -> str:
        """Staging folders of `key` are named this prefix plus a random suffix (tempfile.mkdtemp's)."""
        return f"{TOKEN_CACHE_STAGING_PREFIX}{key}-"

    def build_lock(self, key: str) -> Path:
        return self.root / f"{TOKEN_CACHE_LOCK_PREFIX}{key}"

    def entries(self) -> list[TokenCacheEntry]:
        """Every complete entry (hidden names are staging folders and locks)."""
        if not self.root.is_dir():
            return []
        return [TokenCacheEntry(p) for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")]

    def staging(self) -> list[tuple[str, Path]]:
        """(key, folder) of every staging folder, finished or abandoned."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob(f"{TOKEN_CACHE_STAGING_PREFIX}*")):
            key, dash, _ = path.name.removeprefix(TOKEN_CACHE_STAGING_PREFIX).rpartition("-")
            if dash and path.is_dir():
                found.append((key, path))
        return found


@dataclass(frozen=True)
class TokenCacheEntry:
    """One entry of the token cache (also the layout of a staging folder before it is renamed into place)."""

    root: Path

    @property
    def key(self) -> str:
        return self.root.name

    @property
    def tokens(self) -> Path:
        return self.root / TOKENS_FILE

    @property
    def meta(self) -> Path:
        return self.root / TOKEN_CACHE_META_FILE

    @property
    def used_marker(self) -> Path:
        return self.root / TOKEN_CACHE_USED_MARKER


def checkpoint_name(step: int) -> str:
    """Zero-padded, so the folders also sort by step as strings (a listing still sorts by the integer)."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a `step-<digits>` folder name; None for anything else (temp folders, strays)."""
    digits = name.removeprefix(CHECKPOINT_PREFIX)
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() and digits.isascii() else None


def has_adapter(folder: Path) -> bool:
    """True when `folder` holds a saved adapter (its config is written with the weights)."""
    return (folder / ADAPTER_CONFIG_FILE).is_file()
