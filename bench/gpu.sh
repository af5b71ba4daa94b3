#!/usr/bin/env bash
# GPU benchmark: LoRA on random Qwen2.5-0.5B-shaped (and, if time allows, 1.5B-shaped) models built locally.
# Our engine 16-bit / 8-bit / 4-bit, packing off and on, vs HF Trainer padded to max_length and TRL SFTTrainer
# (packing, padding-free): tokens/s, MFU, peak memory. No downloads. At most 8 minutes.
# Writes bench/results/gpu.json and bench/results/gpu.md. Extra arguments go to `python -m bench.gpu` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

if [[ ! -x "$PY" ]]; then
  echo "gpu.sh: $PY not found: run 'make setup' first (with a CUDA build of torch)" >&2
  exit 2
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu.sh: no NVIDIA GPU visible (nvidia-smi missing or failing): this benchmark needs CUDA" >&2
  exit 2
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu.sh: torch in $PY cannot use CUDA ($("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1))" >&2
  exit 2
fi
if ! "$PY" -c 'import trl' 2>/dev/null; then
  echo "gpu.sh: trl is not installed in $PY (pip install -e '.[bench]'): the TRL baselines will fail" >&2
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Runs stop being started after --budget-s (default 420 s); the hard limit keeps the whole script within 8 minutes.
exec timeout --signal=TERM --kill-after=10 470 "$PY" -m bench.gpu "$@"
