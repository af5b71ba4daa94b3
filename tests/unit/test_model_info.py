"""Model resolution (local folders, a real HTTP fake of the hub, its cache offline) and the weight-free summary."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.settings import ServerSettings
from finetune_server.training.model_info import (
    LinearShape,
    linear_layer_shapes,
    parameters_from_config,
    summarize_model,
    targeted_shapes,
)
from finetune_server.training.model_source import resolve_model
from finetune_server.util.paths import confine

COMMIT = "a" * 40

# Published config values (hub config.json) of two well-known models, with their known parameter counts.
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
QWEN25_05B_PARAMS = 494_032_768
GPT2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
GPT2_PARAMS = 124_439_808


class _FakeHub(BaseHTTPRequestHandler):
    """Answers huggingface_hub's HEAD/GET `/{org}/{name}/resolve/main/{file}` like the hub does."""

    repos: ClassVar[dict[str, Path]] = {}
    requests: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _lookup(self) -> bytes | None:
        self.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("/resolve/main/")
        repo, filename = parts[0].lstrip("/"), parts[1] if len(parts) == 2 else ""
        if repo == "org/gated":
            self._reply(403, {"X-Error-Code": "GatedRepo"})
            return None
        if repo not in self.repos:
            self._reply(404, {"X-Error-Code": "RepoNotFound"})
            return None
        file = self.repos[repo] / filename
        if not filename or not file.is_file():
            self._reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            return None
        return file.read_bytes()

    def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def _ok(self, body: bytes) -> None:
        etag = hashlib.sha256(body).hexdigest()
        self._reply(200, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}, body)

    def do_HEAD(self) -> None:
        body = self._lookup()
        if body is not None:
            self._ok(body)

    def do_GET(self) -> None:
        body = self._lookup()
        if body is not None:
            self._ok(body)


@pytest.fixture
def fake_hub(tiny_model_dir: Path) -> Iterator[str]:
    _FakeHub.repos = {"org/tiny": tiny_model_dir, "org/empty": tiny_model_dir / "no-such-folder"}
    _FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _settings(tmp_path: Path, **kwargs: object) -> ServerSettings:
    return ServerSettings(data_dir=tmp_path / "data", hf_cache_dir=tmp_path / "hf-cache", **kwargs)  # type: ignore[arg-type]


def _raises(kind: ErrorKind, reason: str, fn: object, *args: object) -> FinetuneError:
    with pytest.raises(FinetuneError) as info:
        fn(*args)  # type: ignore[operator]
    assert (info.value.kind, info.value.reason) == (kind, reason), info.value.message
    assert info.value.violations and info.value.violations[0].field == "model_name"
    return info.value


# --- local folders ----------------------------------------------------------------------------------------------------


def test_local_folder_by_name_under_root(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path, model_roots=[tiny_model_dir.parent])
    resolved = resolve_model(tiny_model_dir.name, settings)
    assert resolved.source == "local"
    assert resolved.path == tiny_model_dir.resolve()
    assert resolved.config["model_type"] == "qwen2"


def test_local_folder_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "empty").mkdir(parents=True)
    settings = _settings(tmp_path, model_roots=[root])
    _raises(ErrorKind.NOT_FOUND, "MODEL_NOT_FOUND", resolve_model, str(root / "missing"), settings)
    _raises(ErrorKind.INVALID_ARGUMENT, "NOT_A_MODEL_FOLDER", resolve_model, "./empty", settings)
    _raises(ErrorKind.PERMISSION_DENIED, "PATH_OUTSIDE_ROOTS", resolve_model, str(tiny_model_dir), settings)
    _raises(ErrorKind.PERMISSION_DENIED, "PATH_OUTSIDE_ROOTS", resolve_model, "../elsewhere", settings)


def test_a_tilde_is_never_expanded_to_a_home_on_the_server(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    settings = _settings(tmp_path, model_roots=[root])
    # "~0" once asked pathlib for user 0's home: RuntimeError, an INTERNAL status. Now it is a name under the root.
    for name in ("~0", "~/models/x", "~root/x", "~"):
        _raises(ErrorKind.NOT_FOUND, "MODEL_NOT_FOUND", resolve_model, name, settings)
    assert confine("~0", [root], "dataset") == (root / "~0").resolve()


def test_invalid_hub_id(tmp_path: Path) -> None:
    _raises(ErrorKind.INVALID_ARGUMENT, "INVALID_MODEL_NAME", resolve_model, "org/bad..name", _settings(tmp_path))
    _raises(ErrorKind.INVALID_ARGUMENT, "REQUIRED", resolve_model, "  ", _settings(tmp_path))


# --- the hub ----------------------------------------------------------------------------------------------------------


def test_hub_fetches_small_files_only_then_works_offline_from_cache(fake_hub: str, tmp_path: Path) -> None:
    resolved = resolve_model("org/tiny", _settings(tmp_path, hf_endpoint=fake_hub))
    assert resolved.source == "hub"
    assert resolved.path == tmp_path / "hf-cache" / "models--org--tiny" / "snapshots" / COMMIT
    fetched = sorted(p.name for p in resolved.path.iterdir())
    assert "config.json" in fetched
    assert "tokenizer.json" in fetched
    assert "chat_template.jinja" in fetched
    assert not any(name.endswith(".safetensors") for name in fetched)  # weights are never downloaded
    assert not any("model.safetensors " in r or r.endswith("/model.safetensors") for r in _FakeHub.requests)
    summary = summarize_model(resolved)
    assert summary.source == "hub"
    assert summary.has_chat_template
    assert summary.num_parameters == parameters_from_config(resolved.config) > 0  # no weights: from the config

    # Offline, the cached copy is used and the hub is not asked.
    before = len(_FakeHub.requests)
    offline = resolve_model("org/tiny", _settings(tmp_path, hf_endpoint=fake_hub, offline=True))
    assert offline.path == resolved.path
    assert len(_FakeHub.requests) == before


def test_hub_endpoint_from_env(fake_hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", fake_hub)
    assert resolve_model("org/tiny", _settings(tmp_path)).config["model_type"] == "qwen2"


def test_hub_errors(fake_hub: str, tmp_path: Path) -> None:
    settings = _settings(tmp_path, hf_endpoint=fake_hub)
    _raises(ErrorKind.NOT_FOUND, "MODEL_NOT_FOUND", resolve_model, "org/nothing", settings)
    _raises(ErrorKind.INVALID_ARGUMENT, "NOT_A_MODEL_FOLDER", resolve_model, "org/empty", settings)
    _raises(ErrorKind.PERMISSION_DENIED, "MODEL_GATED", resolve_model, "org/gated", settings)


def test_offline_and_not_cached(tmp_path: Path) -> None:
    error = _raises(
        ErrorKind.NOT_FOUND, "MODEL_NOT_CACHED_OFFLINE", resolve_model, "Qwen/Qwen2.5-0.5B-Instruct",
        _settings(tmp_path, offline=True),
    )  # fmt: skip
    assert "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct" in error.hint
    assert "HF_HUB_OFFLINE" in error.hint


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_hub_fails_fast(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    error = _raises(
        ErrorKind.UNAVAILABLE, "HUB_UNREACHABLE", resolve_model, "org/tiny", _settings(tmp_path, hf_endpoint=endpoint)
    )
    assert time.monotonic() - start < 5  # no retry backoff (huggingface_hub alone takes ~25 s)
    assert endpoint in error.message


def test_unreachable_hub_falls_back_to_cache(fake_hub: str, tmp_path: Path) -> None:
    cached = resolve_model("org/tiny", _settings(tmp_path, hf_endpoint=fake_hub))
    dead = f"http://127.0.0.1:{_closed_port()}"
    again = resolve_model("org/tiny", _settings(tmp_path, hf_endpoint=dead))
    assert again.path == cached.path


# --- summary and parameter counts -------------------------------------------------------------------------------------


def test_summary_of_tiny_model_matches_its_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(tiny_model_dir), _settings(tmp_path, model_roots=[tiny_model_dir.parent]))
    summary = summarize_model(resolved)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert summary.model_type == "qwen2"
    assert summary.architectures == ["Qwen2ForCausalLM"]
    assert (summary.hidden_size, summary.num_layers, summary.vocab_size) == (64, 2, config["vocab_size"])
    assert summary.max_position_embeddings == 2048
    assert summary.linear_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert summary.has_chat_template
    assert summary.torch_dtype == "float32"
    # Header count == config formula == what torch counts (139840, checked once against model.num_parameters()).
    assert summary.num_parameters == parameters_from_config(config) == 139_840


def _write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A real safetensors file with zero-filled F32 tensors."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_parameter_count_sources(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN25_05B))
    settings = _settings(tmp_path, model_roots=[tmp_path])
    # 1. Only the config: computed.
    assert summarize_model(resolve_model("m", settings)).num_parameters == QWEN25_05B_PARAMS
    # 2. An index without its shards: total_size / 2 bytes (bfloat16).
    index = {"metadata": {"total_size": 2 * 1000}, "weight_map": {"a": "s-1.safetensors", "b": "s-2.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert summarize_model(resolve_model("m", settings)).num_parameters == 1000
    # 3. One shard of two: still the index (a partial download must not give a partial count).
    _write_safetensors(folder / "s-1.safetensors", {"a": [10, 20]})
    assert summarize_model(resolve_model("m", settings)).num_parameters == 1000
    # 4. All shards: exact from the headers.
    _write_safetensors(folder / "s-2.safetensors", {"b": [3, 7], "c": [5]})
    assert summarize_model(resolve_model("m", settings)).num_parameters == 200 + 21 + 5
    # A corrupt header falls back to the index rather than failing validation.
    (folder / "s-2.safetensors").write_bytes(b"\xff" * 16)
    assert summarize_model(resolve_model("m", settings)).num_parameters == 1000
    shutil.rmtree(folder)


def test_parameters_from_known_configs() -> None:
    assert parameters_from_config(QWEN25_05B) == QWEN25_05B_PARAMS
    assert parameters_from_config(GPT2) == GPT2_PARAMS
    assert parameters_from_config({"model_type": "mamba", "hidden_size": 8, "vocab_size": 10}) == 0


def test_linear_shapes_and_targets() -> None:
    shapes = linear_layer_shapes(QWEN25_05B)
    assert shapes["self_attn.k_proj"] == LinearShape(896, 128, 24)  # 2 kv heads x head_dim 64
    assert shapes["mlp.down_proj"] == LinearShape(4864, 896, 24)
    assert set(targeted_shapes(shapes, ["q_proj", "v_proj"])) == {"self_attn.q_proj", "self_attn.v_proj"}
    assert targeted_shapes(shapes, []) == shapes
    gpt2 = linear_layer_shapes(GPT2)
    assert set(targeted_shapes(gpt2, ["c_proj"])) == {"attn.c_proj", "mlp.c_proj"}  # peft's suffix rule
    assert linear_layer_shapes({"model_type": "mamba", "hidden_size": 8, "num_hidden_layers": 2}) == {}


def test_unknown_architecture_has_no_linear_modules(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8, "vocab_size": 10}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    summary = summarize_model(resolve_model("odd", _settings(tmp_path, model_roots=[tmp_path])))
    assert summary.linear_modules == []
    assert summary.has_chat_template  # from tokenizer_config.json
    assert summary.num_parameters == 0


def test_validation_path_stays_light(tiny_model_dir: Path) -> None:
    """Resolving, summarising and estimating must not import torch & co. (ValidateConfig has to be fast)."""
    code = f"""
import sys
from pathlib import Path
from finetune_server.settings import ServerSettings
from finetune_server.training.config import TrainingConfig, resolve
from finetune_server.training.memory import estimate_memory
from finetune_server.training.model_info import summarize_model
from finetune_server.training.model_source import resolve_model
from finetune_server.training import presets
folder = Path({str(tiny_model_dir)!r})
resolved = resolve_model(str(folder), ServerSettings(data_dir=folder.parent / "d", model_roots=[folder.parent]))
config, _ = resolve(TrainingConfig(model_name="m", dataset="d"), presets.get_preset("minimal").config)
estimate_memory(config, summarize_model(resolved), resolved.config, sequence_length=512, devices=[("cpu", 1 << 34)])
print([m for m in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "grpc") if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_describing_a_model_needs_no_hub_code(tiny_model_dir: Path) -> None:
    """model_info reads files only: summarising a folder loads neither model_source nor huggingface_hub."""
    code = f"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from finetune_server.training.model_info import summarize_model
folder = Path({str(tiny_model_dir)!r})
found = SimpleNamespace(name="m", source="local", path=folder, config=json.loads((folder / "config.json").read_text()))
assert summarize_model(found).num_parameters == 139_840
print([m for m in ("finetune_server.training.model_source", "huggingface_hub") if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_summary_is_remembered_until_the_folder_changes(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "copy"
    shutil.copytree(tiny_model_dir, folder)
    settings = _settings(tmp_path, model_roots=[folder.parent])
    first = summarize_model(resolve_model("copy", settings))
    again = summarize_model(resolve_model("copy", settings))
    assert again == first and again is not first, "the same figures, as a copy the caller may change"
    again.linear_modules.append("changed by a caller")
    assert summarize_model(resolve_model("copy", settings)) == first
    # The weights replaced in place by another model's: the next summary reads them.
    (folder / "model.safetensors").unlink()
    shards = sorted(tiny_model_dir.glob("*.safetensors"))
    header = json.dumps({"w": {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(60))
    assert shards and summarize_model(resolve_model("copy", settings)).num_parameters == 15
