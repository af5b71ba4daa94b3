"""Server settings: where state lives, which local folders callers may name, hub access and limits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from finetune_server.host.cpu_policy import check_cpus, worker_threads
from finetune_server.storage.layout import DataDir
from finetune_server.storage.store_url import StoreUrl, parse_store_url

DEFAULT_MAX_UPLOAD_BYTES = 1 << 30  # 1 GiB
DEFAULT_TOKEN_CACHE_MAX_BYTES = 50 << 30  # 50 GiB: least recently used token cache entries beyond it are removed
DEFAULT_LEASE_SECONDS = 30.0


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RaySettings:
    """Where `--executor ray` sends jobs and what each attempt's actor asks for."""

    address: str = "auto"  # "auto" (the local cluster, or RAY_ADDRESS) or host:port of the head's GCS
    namespace: str = "sage-finetune"  # the job actors' names are unique within it
    gpus_per_job: int = 0  # per Ray Train worker when workers_per_job > 1
    cpus_per_job: float = 1.0  # likewise
    workers_per_job: int = 1  # > 1: one DDP attempt over that many Ray Train workers, on any nodes


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class ServerSettings:
    data_dir: Path
    model_roots: list[Path] = field(default_factory=list)
    dataset_roots: list[Path] = field(default_factory=list)
    offline: bool = False  # no hub downloads; also on when HF_HUB_OFFLINE=1
    hf_endpoint: str = ""  # informational; huggingface_hub reads HF_ENDPOINT itself
    hf_cache_dir: Path | None = None  # None: huggingface_hub's default (HF_HOME / HF_HUB_CACHE)
    allow_hub_datasets: bool = True  # a config may name a hub dataset (`org/name`); False: local and uploaded only
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    slots: int = 1
    max_queued_jobs: int = 1000  # beyond: RESOURCE_EXHAUSTED
    max_streams_per_connection: int = 256  # HTTP/2 concurrent streams: one client cannot hold unbounded resources
    # HTTP/2 keepalive. The server pings a connection silent this long, so a client that vanished without a FIN (its
    # WatchJob streams hold subscriptions) is noticed, and middleboxes see traffic; an unanswered ping closes it.
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # Clients may ping this often (grpc-go's clients never ping more often than 10 s); faster pings get GOAWAY.
    keepalive_min_ping_interval_s: float = 10.0
    disk_reserve_bytes: int = 512 << 20  # kept free on the data dir's disk beyond what a job or export needs
    token_cache_max_bytes: int = DEFAULT_TOKEN_CACHE_MAX_BYTES  # the tokenized datasets under the data dir
    # A validated dataset with more than twice this many valid examples has its token statistics measured on an even
    # sample of this many to twice as many (every record is still parsed): tokenizing is most of a validation.
    validation_sample_examples: int = 10_000
    auth_token_file: Path | None = None  # None: no authentication
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate signed by it (mutual TLS)
    metrics_port: int | None = None  # None: no Prometheus endpoint
    worker_threads: int = 0  # torch/OpenMP threads per worker; 0: see cpu_policy.worker_threads
    worker_cpus: list[int] = field(default_factory=list)  # CPUs workers are pinned to; empty: the server's own
    store_url: str = ""  # the job store (see storage/store_url.py); empty: SQLite in the data dir
    # A job's lease lasts this long unless renewed (every third of it): how long a dead server's jobs wait to be
    # re-queued, and how long a stalled server may go quiet before its jobs are taken from it.
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    store_reread_s: float = 1.0  # shared store: how often the tables are re-read in case a notice was lost
    store_probe_s: float = 2.0  # how often health asks whether the job store is reachable
    executor: str = "local"  # one of EXECUTORS: worker subprocesses on this host, or actors on a Ray cluster
    ray: RaySettings = field(default_factory=RaySettings)
    # Generate: worker processes (each holds one model; apart from the training slots, sharing a GPU with them),
    # how long an idle one stays loaded for the next request with the same model, the largest max_new_tokens.
    # Warm workers: fork servers kept with torch, transformers and peft imported (one per worker environment: a GPU
    # slot's, CPU exports'), so a worker starts in well under a second instead of ~10 s; 0: every worker starts
    # fresh. `prewarm_workers` starts the training slots' ones with the server, not with the first job.
    warm_workers: int = 2
    prewarm_workers: bool = True
    max_generate_workers: int = 1
    generate_idle_s: float = 60.0
    max_new_tokens_limit: int = 1024

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.model_roots = [Path(p).expanduser().resolve() for p in self.model_roots]
        self.dataset_roots = [Path(p).expanduser().resolve() for p in self.dataset_roots]
        self.offline = self.offline or _env_flag("HF_HUB_OFFLINE")
        self.hf_endpoint = self.hf_endpoint or os.environ.get("HF_ENDPOINT", "")
        self.worker_cpus = sorted(set(self.worker_cpus))
        check_cpus(self.worker_cpus)
        if self.warm_workers < 0:
            raise ValueError("warm_workers must be 0 (off) or more")
        if self.lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.store  # noqa: B018 - a URL that cannot be used is refused here, not at start
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r}; known: {', '.join(EXECUTORS)}")

    @property
    def store(self) -> StoreUrl:
        return parse_store_url(self.store_url, self.layout.store)

    @property
    def threads_per_worker(self) -> int:
        return worker_threads(self.worker_threads, self.worker_cpus, self.slots)

    @property
    def layout(self) -> DataDir:
        return DataDir(self.data_dir)

    @property
    def token_cache_dir(self) -> Path:
        return self.layout.token_cache

    @property
    def uploads_dir(self) -> Path:
        return self.layout.datasets

    @property
    def jobs_dir(self) -> Path:
        return self.layout.jobs

    @property
    def artifacts_dir(self) -> Path:
        return self.layout.artifacts
