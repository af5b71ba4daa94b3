"""A Node.js caller (@grpc/grpc-js + proto-loader, the proto read at run time) against a real server.

Proves that the contract works outside Python: plain unary calls, rich error details decoded from the
`grpc-status-details-bin` trailer, server streams (Train's events, Generate's text), and the published service
config's retry policies (grpc-js retries what it names, and not Train) against a server that refuses each method's
first call. The npm packages come from tests/xlang/node/package-lock.json; `make test` installs them, and this test
runs `npm ci` itself when they are missing. Node is required, never skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.rpc import status_pb2

from finetune_client import GrpcFineTuneService
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb

from .conftest import RunningServer

NODE_DIR = Path(__file__).resolve().parents[1] / "xlang" / "node"
# google/rpc/status.proto and error_details.proto ship with googleapis-common-protos, next to their _pb2 modules.
RPC_PROTOS = Path(status_pb2.__file__).resolve().parents[2]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: the cross-language test needs Node.js 20+ and npm")
    return path


@pytest.fixture(scope="module")
def node() -> str:
    node = _tool("node")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        # Exactly the locked versions; no install scripts are needed by these packages.
        install = subprocess.run(
            [_tool("npm"), "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=NODE_DIR, check=False, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert install.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{install.stderr}"
    return node


def run_node(node: str, server: RunningServer, model: Path, *extra: str) -> dict[str, Any]:
    assert (RPC_PROTOS / "google" / "rpc" / "error_details.proto").is_file()
    command = [
        node, "client.mjs", "--address", server.address, "--model", model.name,
        "--dataset", "facts.jsonl", "--rpc-protos", str(RPC_PROTOS), "--timeout", "240", *extra,
    ]  # fmt: skip
    done = subprocess.run(command, check=False, cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"node client failed:\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def observed(node: str, server: RunningServer, tiny_model_dir: Path) -> dict[str, Any]:
    return run_node(node, server, tiny_model_dir)


def test_node_validates_a_good_config(observed: dict[str, Any]) -> None:
    good = observed["validate_good"]
    assert good["valid"] is True and good["violations"] == []
    assert good["lora_r"] == 8, "the resolved config keeps the r that was sent"
    assert good["lora_alpha"] == 16, "and fills the default alpha = 2 r"
    assert good["max_length"] == 128 and good["model_type"] == "qwen2"
    assert int(good["memory_total_bytes"]) > 0, "int64 arrives intact as a decimal string"


def test_node_decodes_rich_error_details_from_the_trailer(observed: dict[str, Any]) -> None:
    bad = observed["validate_bad"]
    assert bad["code"] == "INVALID_ARGUMENT" and bad["status_code"] == 3
    assert bad["reason"] == "INVALID_CONFIG" and bad["domain"] == "finetune.sage"
    fields = {v["field"]: v["reason"] for v in bad["violations"]}
    # Explicit zeros of proto3 `optional` fields were sent as set (not dropped as defaults) and rejected.
    assert fields.get("lora.r") == "OUT_OF_RANGE" and fields.get("learning_rate") == "OUT_OF_RANGE"
    assert all(v["description"] for v in bad["violations"])
    assert bad["detail_types"][:2] == ["google.rpc.ErrorInfo", "google.rpc.BadRequest"]
    assert "sage.finetune.v1.ValidateConfigResponse" in bad["detail_types"] and bad["report_valid"] is False


def test_node_trains_and_follows_the_stream_to_the_end(observed: dict[str, Any], server: RunningServer) -> None:
    train = observed["train"]
    assert train["first_message"] == "job"
    assert train["job"]["id"].startswith("job-") and train["job"]["state"] == "JOB_STATE_QUEUED"
    assert train["job"]["lora_r"] == 8
    events = train["events"]
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1)), "gap-free from 1"
    states = [e["state"] for e in events if e["kind"] == "state_change"]
    assert states == ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    assert events[-1]["kind"] == "state_change" and train["final_state"] == "JOB_STATE_SUCCEEDED"
    assert [e["step"] for e in events if e["kind"] == "progress"] == [1, 2, 3]
    assert [e["steps"] for e in events if e["kind"] == "result"] == [3]

    # The server's own record agrees with what the Node caller saw.
    channel, stub = server.stub()
    with channel:
        job = stub.GetJob(pb.GetJobRequest(job_id=train["job"]["id"]), timeout=10).job
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.last_sequence == len(events)
    assert job.display_name == "node-client" and job.result.steps == 3


def test_node_streams_generated_text_from_the_job(observed: dict[str, Any], server: RunningServer) -> None:
    generated = observed["generate"]
    finish = generated["finish"]
    assert (generated["pieces"] and finish["completion_tokens"] == 4) or finish["reason"] == "FINISH_REASON_EOS"
    assert finish["step"] == 3 and finish["prompt_tokens"] > 0
    request = generated["request"]
    with GrpcFineTuneService(server.address, timeout=120) as client:  # the same request from Python
        answer = "".join(client.generate(request["messages"], job_id=request["job_id"], max_new_tokens=4))
    assert "".join(generated["pieces"]) == answer


def test_node_retries_what_the_service_config_names_and_not_train(
    node: str, flaky_server: RunningServer, tiny_model_dir: Path
) -> None:
    retried = run_node(node, flaky_server, tiny_model_dir, "--scenario", "retries")
    assert retried["server_info_version"], "GetServerInfo's refused first attempt was retried by grpc-js"
    assert retried["train_codes"] == ["UNAVAILABLE", "INVALID_ARGUMENT"], "Train has no retry policy"
