"""The client must stay light: importing it never loads torch, transformers, peft or the server package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLIENT_ROOT = Path(__file__).resolve().parents[2] / "client"

_PROBE = """
import sys
import finetune_client
from finetune_client import GrpcFineTuneService, FinetuneManager, IFineTuneService, config_from_dict
import finetune_client.studio, finetune_client.remote, finetune_client.errors, finetune_client.convert
banned = {'torch', 'transformers', 'peft', 'bitsandbytes', 'ray', 'finetune_server'}
heavy = sorted({m.split('.')[0] for m in sys.modules} & banned)
assert not heavy, heavy
assert 'grpc' in sys.modules
print('ok', len(finetune_client.__all__))
"""


def test_client_imports_without_heavy_modules() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(CLIENT_ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("ok ")


def test_interface_module_is_pure_python() -> None:
    # interface.py is imported through the package __init__, which loads grpc; load the module file on its own.
    source = CLIENT_ROOT / "finetune_client" / "interface.py"
    probe = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('iface', {str(source)!r}); "
        "mod = importlib.util.module_from_spec(spec); sys.modules['iface'] = mod; spec.loader.exec_module(mod); "
        "assert not {m.split('.')[0] for m in sys.modules} & {'grpc', 'google'}, 'interface pulled grpc/protobuf'; "
        "assert issubclass(mod.ValidationResult, __import__('collections.abc').abc.Mapping)"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60)
    assert completed.returncode == 0, completed.stderr
