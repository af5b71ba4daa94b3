"""The server as a process: health, reflection, presets, server info, graceful shutdown."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.host.cpu_policy import available_cpus

from .conftest import RunningServer, start_server, stop_server

SERVICE = "sage.finetune.v1.FineTuneService"
RPCS = {
    "ValidateConfig", "Train", "WatchJob", "GetJob", "ListJobs", "CancelJob", "Export", "DownloadArtifact",
    "UploadDataset", "ListPresets", "GetServerInfo",
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


def test_list_presets_has_the_seeds_presets_and_recommendations(channel: grpc.Channel) -> None:
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


def test_the_rpc_path_does_not_import_torch(tmp_path: Path, tiny_model_dir: Path) -> None:
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
HEAVY = {{"torch", "transformers", "peft", "bitsandbytes", "datasets"}}
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(heavy)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path, server_roots: tuple[Path, Path]) -> None:
    running = start_server(tmp_path, *server_roots)
    with grpc.insecure_channel(running.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )
    assert stop_server(running) == 0
    log = running.log_path.read_text()
    assert '"event": "server.draining"' in log and '"event": "server.stopped"' in log
