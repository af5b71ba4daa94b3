"""The published service config and the channel options built from it (no server needed)."""

from __future__ import annotations

import json

from finetune_client import channel_options, service_config
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client.channel import retrying_service_config

SERVICE = pb.DESCRIPTOR.services_by_name["FineTuneService"]
RETRIED = {
    "ValidateConfig", "GetJob", "ListJobs", "ListPresets", "GetServerInfo", "ListDatasets", "GetDataset",
    "ListCheckpoints", "ListArtifacts", "GetArtifact",
}  # fmt: skip


def _retried(config: dict[str, object]) -> dict[str, dict[str, object]]:
    return {
        name["method"]: method_config["retryPolicy"]
        for method_config in config["methodConfig"]  # type: ignore[attr-defined]
        if "retryPolicy" in method_config
        for name in method_config["name"]
    }


def test_the_published_config_retries_exactly_the_unary_reads_on_unavailable() -> None:
    config = service_config()
    names = [name for method_config in config["methodConfig"] for name in method_config["name"]]
    assert {n["service"] for n in names} == {SERVICE.full_name}
    assert {n["method"] for n in names} <= set(SERVICE.methods_by_name), "gRPC ignores a misspelt method silently"
    policies = _retried(config)
    assert set(policies) == RETRIED, "no Train, CancelJob, Export, upload or stream"
    for method in policies:
        assert not SERVICE.methods_by_name[method].server_streaming
    assert all(p["retryableStatusCodes"] == ["UNAVAILABLE"] and p["maxAttempts"] == 4 for p in policies.values())


def test_retries_set_the_attempts_and_backoff_and_zero_means_no_policy() -> None:
    policies = _retried(retrying_service_config(1, 0.01, 0.05))
    assert {(p["maxAttempts"], p["initialBackoff"], p["maxBackoff"]) for p in policies.values()} == {
        (2, "0.010s", "0.050s")
    }
    assert {p["maxAttempts"] for p in _retried(retrying_service_config(10, 1, 2)).values()} == {5}, "gRPC's cap"
    assert _retried(retrying_service_config(0, 1, 2)) == {}, "gRPC refuses a policy of one attempt"


def test_channel_options_carry_the_config_and_keepalive() -> None:
    options = dict(channel_options(keepalive_time=7, keepalive_timeout=3, retries=2))
    assert _retried(json.loads(options["grpc.service_config"]))["GetJob"]["maxAttempts"] == 3
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.keepalive_time_ms"] == 7000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 3000
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert "grpc.keepalive_time_ms" not in dict(channel_options(keepalive_time=None))
