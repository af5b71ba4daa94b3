#!/usr/bin/env bash
# GPU check of `finetune serve --executor ray`: a one-node Ray cluster with one GPU, one tiny job with one GPU; it
# passes when the job succeeds on cuda:0 and its worker saw exactly one CUDA device. At most 5 minutes.
# Writes bench/results/ray_gpu.json. Needs the `ray` extra and a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

if [[ ! -x "$PY" ]]; then
  echo "ray_gpu.sh: $PY not found: run 'make setup' first (with a CUDA build of torch)" >&2
  exit 2
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "ray_gpu.sh: torch in $PY cannot use CUDA: this check needs a GPU" >&2
  exit 2
fi
if ! "$PY" -c 'import ray' 2>/dev/null; then
  echo "ray_gpu.sh: ray is not installed in $PY (pip install -e '.[server,ray]')" >&2
  exit 2
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH="$PWD/server:$PWD/client:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM --kill-after=10 290 "$PY" -m bench.ray_gpu "$@"
