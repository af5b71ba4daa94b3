#!/usr/bin/env bash
# The prepared GPU run, on the GPU machine as it is: its own python3 (3.12), torch and transformers; no .venv, no
# internet. Installs the wheels bench/gpu_setup.sh fetched (bench/gpu_wheels/part-*, whichever came along) into
# bench/gpu_site/, checks every import (one line per missing piece), then CUDA ("no CUDA device" without it), then the
# checks of bench/gpu_check.py within 8 minutes. Results: bench/results/gpu_check.{json,md}, gpu.{json,md}.
# Arguments go to `python3 -m bench.gpu_check` (--skip-bench, --work DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
SITE=bench/gpu_site
mkdir -p "$SITE"
path="$PWD/server:$PWD/client:$PWD"
# The wheels are CPython 3.12's: on another interpreter they would shadow its own packages with unloadable ones.
if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then path="$path:$PWD/$SITE"; fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec timeout --signal=TERM --kill-after=10 480 "$PY" -m bench.gpu_check "$@"
