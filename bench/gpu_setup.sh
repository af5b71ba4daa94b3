#!/usr/bin/env bash
# Run HERE (a machine with internet), before bench/gpu_run.sh goes to the GPU machine, which has its own python3 3.12,
# torch and transformers but nothing else of ours and no internet. Fetches wheels of bench/gpu_requirements.txt and
# their dependencies for CPython 3.12 on manylinux x86_64 into bench/gpu_wheels/ (git-ignored).
#
# torch and transformers are the GPU machine's own: the dependencies are resolved against stand-in wheels of its
# versions (GPU_TORCH, GPU_TRANSFORMERS, with a local label only the stand-ins carry: metadata, no dependencies), so
# nothing chosen asks for a newer torch or transformers and no CUDA wheel is fetched; what those two bring (numpy,
# huggingface-hub, tokenizers, ...) is left out as well. GPU_WHEELS_TRL=1 adds trl and datasets (the benchmark's TRL
# baselines; ~60 MB more). The wheels are split into part-N folders of at most 60 MiB each, because a device run
# carries at most 64 MiB: carry one part per run (bench/README.md says how); gpu_run.sh installs what it finds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-/work/main/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
GPU_TORCH="${GPU_TORCH:-2.11.0}+gpumachine"
GPU_TRANSFORMERS="${GPU_TRANSFORMERS:-5.17.0}+gpumachine"
OUT=bench/gpu_wheels
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
extra=()
[[ "${GPU_WHEELS_TRL:-0}" == 1 ]] && extra=("trl>=1.0,<2" "datasets>=4.0")

"$PY" - "$work/standins" "$GPU_TORCH" "$GPU_TRANSFORMERS" <<'PY'
import sys, zipfile
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir()
for name, version in (("torch", sys.argv[2]), ("transformers", sys.argv[3])):
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(out / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: gpu_setup\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
PY
# Resolution only (pip reads wheel metadata, installs nothing), with the stand-ins preferred by exact pins.
"$PY" -m pip install --quiet --dry-run --ignore-installed --target "$work/t" "${TARGET[@]}" --find-links "$work/standins" \
  --report "$work/report.json" -r bench/gpu_requirements.txt "${extra[@]}" \
  "torch==$GPU_TORCH" "transformers==$GPU_TRANSFORMERS"

"$PY" - "$work/report.json" > "$work/pins.txt" <<'PY'
import importlib.metadata as md, json, re, sys
# What torch and transformers bring is on the GPU machine already (their requirements, as installed here).
brought = {"torch", "transformers"}
for dist in ("torch", "transformers"):
    for req in md.requires(dist) or []:
        if "extra ==" not in req:
            brought.add(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-"))
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"].lower().replace("_", "-"), item["metadata"]["version"]
    if name not in brought and not name.startswith(("nvidia-", "cuda-", "triton")):
        print(f"{name}=={version}")
PY
rm -rf "$OUT" && mkdir -p "$OUT"
echo "gpu_setup: fetching $(wc -l < "$work/pins.txt") packages (torch, transformers and what they bring left out)"
"$PY" -m pip download --quiet --no-deps "${TARGET[@]}" -d "$work/wheels" -r "$work/pins.txt"
"$PY" - "$work/wheels" "$OUT" <<'PY'
import shutil, sys
from pathlib import Path
PART = 60 << 20  # bytes per part: under the 64 MiB a device run carries
wheels = sorted(Path(sys.argv[1]).glob("*.whl"), key=lambda w: -w.stat().st_size)
parts: list[list[Path]] = []
for wheel in wheels:  # first fit decreasing
    size = wheel.stat().st_size
    part = next((p for p in parts if sum(w.stat().st_size for w in p) + size <= PART), None)
    if part is None:
        parts.append(part := [])
    part.append(wheel)
for n, part in enumerate(parts, 1):
    folder = Path(sys.argv[2]) / f"part-{n}"
    folder.mkdir(parents=True)
    for wheel in part:
        shutil.move(str(wheel), folder / wheel.name)
    print(f"gpu_setup: {folder}: {len(part)} wheels, {sum(w.stat().st_size for w in folder.iterdir()) / 2**20:.1f} MiB")
PY
cp "$work/pins.txt" "$OUT/pins.txt"
