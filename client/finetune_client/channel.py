"""The client's side of the connection as gRPC channel options: keepalive, and the published service config.

`service_config.json` (shipped in this package, for callers in any language) gives the unary methods that only read
or check (ValidateConfig, GetJob, ListJobs, ListPresets, GetServerInfo, the List and Get of checkpoints, datasets and
artifacts) a retry policy: gRPC itself repeats them on UNAVAILABLE, within the call's deadline. Nothing else has one,
each for a reason:
- Train creates a job: only a Train with a request_id may be repeated, and a per-method policy cannot see the request.
- WatchJob and DownloadArtifact are streams: gRPC never retries a call once a response arrived, and resuming one needs
  what the caller has already seen (the last event's sequence, the bytes written), so the caller resumes them.
- CancelJob answers FAILED_PRECONDITION, and the Delete methods NOT_FOUND, when repeated after they succeeded;
  Export and UploadDataset do work and are streams. The typed client (`remote.py`) resumes Train (with a
  request_id), WatchJob and downloads itself, so every method is retried by exactly one mechanism.

Keepalive pings let both ends notice a connection that died silently (a load balancer or NAT that dropped it sends
no FIN or RST): a WatchJob on a queued job may carry nothing for hours, and without pings it would wait forever.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SERVICE_CONFIG_FILE = "service_config.json"
KEEPALIVE_TIME_S = 30.0  # a ping every 30 s of silence keeps even a 60 s idle timeout from dropping the connection
KEEPALIVE_TIMEOUT_S = 10.0  # no answer to a ping within this: the connection is dead, calls fail UNAVAILABLE
MAX_ATTEMPTS_CAP = 5  # gRPC treats a larger maxAttempts as 5


def service_config() -> dict[str, Any]:
    """The published service config, as a fresh dict."""
    text = resources.files("finetune_client").joinpath(SERVICE_CONFIG_FILE).read_text(encoding="utf-8")
    config: dict[str, Any] = json.loads(text)
    return config


def retrying_service_config(retries: int, initial_backoff: float, max_backoff: float) -> dict[str, Any]:
    """The published config with `retries` retries (at most 4) and this backoff; no retry policy when `retries` is 0."""
    config = service_config()
    for method_config in config["methodConfig"]:
        policy = method_config.get("retryPolicy")
        if policy is None:
            continue
        if retries < 1:
            del method_config["retryPolicy"]  # gRPC refuses a policy with fewer than 2 attempts
            continue
        policy["maxAttempts"] = min(retries + 1, MAX_ATTEMPTS_CAP)
        policy["initialBackoff"] = _duration(initial_backoff)
        policy["maxBackoff"] = _duration(max(max_backoff, initial_backoff))
    return config


def keepalive_options(time_s: float | None, timeout_s: float) -> list[tuple[str, int]]:
    """Ping after `time_s` seconds of silence (None or 0: never), give up on the connection `timeout_s` later."""
    if not time_s:
        return []
    return [
        ("grpc.keepalive_time_ms", _milliseconds(time_s)),
        ("grpc.keepalive_timeout_ms", _milliseconds(timeout_s)),
        # gRPC core times out an unanswered ping with this one (default 60 s) and never arms keepalive_timeout_ms
        # (grpc/grpc#39239): without it a dead connection is found a minute late.
        ("grpc.http2.ping_timeout_ms", _milliseconds(timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),  # an idle channel (between calls) stays known-good too
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a stream that carries nothing for hours
    ]


def channel_options(
    *,
    keepalive_time: float | None = KEEPALIVE_TIME_S,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT_S,
    retries: int = 3,
    initial_backoff: float = 0.25,
    max_backoff: float = 10.0,
) -> list[tuple[str, Any]]:
    """Channel options (for `grpc.insecure_channel`/`secure_channel`) as GrpcFineTuneService sets them."""
    config = retrying_service_config(retries, initial_backoff, max_backoff)
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(config)),
        *keepalive_options(keepalive_time, keepalive_timeout),
    ]


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _duration(seconds: float) -> str:
    """A protobuf JSON Duration ("0.25s"); gRPC needs backoffs above zero."""
    return f"{max(seconds, 0.001):.3f}s"
