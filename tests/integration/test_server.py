"""The server as a process: health, reflection, presets, server info, graceful shutdown."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.host.cpu_policy import available_cpus

from .conftest import GRACE_S, RunningServer, start_server

SERVICE = "sage.finetune.v1.FineTuneService"
RPCS = {
    "ValidateConfig", "StreamValidateConfig", "Train", "WatchJob", "GetJob", "ListJobs", "CancelJob", "Export",
    "DeleteJob", "ListCheckpoints", "DownloadArtifact", "ListArtifacts", "GetArtifact", "DeleteArtifact", "Generate",
    "UploadDataset", "ListDatasets", "GetDataset", "DeleteDataset", "ListPresets", "GetServerInfo",
}  # fmt: skip


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def test_health_is_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_can_be_watched(channel: grpc.Channel) -> None:
    # Watch writes with context.write instead of yielding: the interceptors must carry that kind of handler too.
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_reflection_lists_the_service_with_every_rpc(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    methods: set[str] = set()
    for blob in described.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(blob)
        for service in file.service:
            if f"{file.package}.{service.name}" == SERVICE:
                methods = {m.name for m in service.method}
    assert methods == RPCS


def test_reflection_carries_field_behavior_for_other_languages(channel: grpc.Channel) -> None:
    """REQUIRED, OUTPUT_ONLY and IMMUTABLE are options on the fields, not only words in comments: a caller that
    loads the contract by reflection (or any generator) sees them, and gets the googleapis file that defines them."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
    (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b) for b in reply.file_descriptor_response.file_descriptor_proto
    ]
    (contract,) = [f for f in files if f.package == "sage.finetune.v1"]
    assert "google/api/field_behavior.proto" in contract.dependency
    behavior = {
        (message.name, field.name): list(field.options.Extensions[field_behavior_pb2.field_behavior])
        for message in contract.message_type
        for field in message.field
    }
    required, output_only, immutable = (
        field_behavior_pb2.REQUIRED,
        field_behavior_pb2.OUTPUT_ONLY,
        field_behavior_pb2.IMMUTABLE,
    )
    for name in ("model_name", "dataset"):
        assert behavior["TrainingConfig", name] == [required]
    for message in ("GetJobRequest", "WatchJobRequest", "CancelJobRequest", "ExportRequest"):
        assert behavior[message, "job_id"] == [required]
    assert behavior["TrainRequest", "config"] == behavior["ValidateConfigRequest", "config"] == [required]
    assert behavior["ExportRequest", "format"] == behavior["DownloadArtifactRequest", "artifact_id"] == [required]
    for name in ("id", "state", "config", "create_time", "last_sequence", "owner"):
        assert behavior["Job", name] == [output_only]
    assert behavior["Artifact", "id"] == behavior["Dataset", "id"] == [output_only]
    assert behavior["Job", "request_id"] == behavior["Job", "display_name"] == [immutable]
    assert behavior["TrainingConfig", "max_length"] == [], "optional fields carry no behaviour"


def test_list_presets_has_the_services_presets_and_recommendations(channel: grpc.Channel) -> None:
    reply = pb_grpc.FineTuneServiceStub(channel).ListPresets(pb.ListPresetsRequest(), timeout=10)
    presets = {p.name: p for p in reply.presets}
    assert {"rtx_3060", "rtx_4090", "a100", "minimal"} <= set(presets)
    rtx = presets["rtx_3060"].config
    assert rtx.load_in_8bit and rtx.max_length == 1024 and rtx.per_device_train_batch_size == 1
    assert rtx.gradient_accumulation_steps == 16 and rtx.gradient_checkpointing and rtx.optim == "paged_adamw_8bit"
    assert not rtx.HasField("learning_rate"), "a preset carries only the fields it sets"
    models = [r.model_name for r in reply.recommendations]
    assert models[0] == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert {"Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"} <= set(models)
    assert all(r.cautions for r in reply.recommendations if "7B" in r.model_name)


def test_server_info_describes_devices_and_versions(channel: grpc.Channel) -> None:
    info = pb_grpc.FineTuneServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    cpu = [d for d in info.devices if d.name == "cpu"]
    assert cpu and cpu[0].total_memory_bytes > 2**30 and not cpu[0].bf16_supported
    assert {"torch", "transformers", "peft", "grpcio"} <= set(info.library_versions)
    assert info.offline, "the fixture starts the server with HF_HUB_OFFLINE=1"
    assert info.slots == 1 and info.max_upload_bytes > 0 and info.cpu_count >= 1
    assert info.worker_threads == max(1, len(available_cpus()) - 1) and info.worker_cpus == ""  # the defaults


def test_the_rpc_path_does_not_import_torch_nor_ray(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Server assembly plus a whole validation in a fresh interpreter, then a look at what got imported."""
    import json
    import subprocess

    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    code = f"""
import sys
import finetune_server.app, finetune_server.cli.main
from finetune_server.settings import ServerSettings
from finetune_server.training.config import TrainingConfig
from finetune_server.training.validation import validate
settings = ServerSettings(data_dir={str(tmp_path / "data")!r}, model_roots=[{str(tiny_model_dir.parent)!r}],
                          dataset_roots=[{str(tmp_path)!r}])
report = validate(TrainingConfig(model_name={tiny_model_dir.name!r}, dataset="d.jsonl"), settings)
assert report.valid, report.violations
HEAVY = {{"torch", "transformers", "peft", "bitsandbytes", "datasets", "ray"}}  # ray: only --executor ray
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(heavy)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def on_goaway(channel: grpc.Channel) -> threading.Event:
    """An event set once `channel` leaves READY: the server told the connection to take no new calls (GOAWAY)."""
    left_ready = threading.Event()

    def on_state(state: grpc.ChannelConnectivity) -> None:
        if state != grpc.ChannelConnectivity.READY:
            left_ready.set()

    channel.subscribe(on_state)
    return left_ready


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path, server_roots: tuple[Path, Path]) -> None:
    """On SIGTERM the server keeps serving calls in flight (a health Watch stream hears NOT_SERVING), refuses new
    ones at once, ends what is still open after the grace with a status, and exits 0. A second SIGTERM during the
    drain waits for that drain: one shutdown, never two closing the same things."""
    running = start_server(tmp_path, *server_roots)
    try:
        with grpc.insecure_channel(running.address) as channel:
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            watch = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # the call is in flight on the server
            goaway = on_goaway(channel)
            sigterm_at = time.monotonic()
            running.process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING, "in-flight calls are still served"
            running.process.send_signal(signal.SIGTERM)  # impatient: the drain has seconds of grace left
            assert goaway.wait(timeout=30)
            with grpc.insecure_channel(running.address) as fresh, pytest.raises(grpc.RpcError) as refused:
                pb_grpc.FineTuneServiceStub(fresh).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, "new calls are refused during the drain"
            with pytest.raises(grpc.RpcError) as ended:
                next(watch)
            open_for = time.monotonic() - sigterm_at
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert GRACE_S - 0.5 <= open_for < GRACE_S + 20, f"the in-flight call ended {open_for:.1f} s after SIGTERM"
        assert running.process.wait(timeout=30) == 0  # no SIGTERM now: it could land after the handlers are gone
    finally:
        if running.process.poll() is None:  # a check above failed: leave no server behind
            running.process.kill()
    log = running.log_path.read_text()
    assert log.count('"event": "server.draining"') == 1 and log.count('"event": "server.stopped"') == 1
