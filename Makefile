# Every target installs what it needs into .venv on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 50051
DATA_DIR ?= ./data

NODE_DIR := tests/xlang/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed-stamp

.PHONY: setup node-deps proto proto-check lint breaking test test-fast test-soak test-slow serve demo bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from this machine's disk (CPU build), so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 uv
	# The rest with uv: the same packages in ~30 s instead of ~4 minutes of pip. The constraint keeps the torch above
	# (uv does not look on this disk); bytecode is compiled at install, as pip does, since imports may not write it.
	$(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode -e '.[server,dev,bench,postgres,ray]' \
	  --constraint <(echo torch==2.13.0)
	touch $(STAMP)

setup: $(STAMP)

# The Node.js cross-language test's packages, exactly as locked (npm ci wipes node_modules first).
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	npm ci --prefix $(NODE_DIR) --ignore-scripts --no-audit --no-fund
	touch $(NODE_STAMP)

node-deps: $(NODE_STAMP)

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

# Fails when the committed generated code differs from what the proto generates.
proto-check: proto
	@git diff --exit-code --stat -- client/finetune_client/_generated || \
	  (echo "generated code is out of date: run 'make proto' and commit" && exit 1)
	@test -z "$$(git status --porcelain --untracked-files=all -- client/finetune_client/_generated)" || \
	  (echo "untracked generated files: run 'make proto' and commit" && exit 1)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint

# Compares the proto with its previous committed version (the newest earlier commit that changed proto/).
breaking: $(STAMP)
	@base=$$(git log --format=%H -- proto buf.yaml | sed -n 2p); \
	if [ -z "$$base" ]; then echo "buf breaking: no earlier version of the proto to compare with"; \
	else echo "buf breaking against $$base"; $(VENV)/bin/buf breaking --against ".git#ref=$$base"; fi

# Two pytest workers, a whole test file each at a time (module-scoped servers stay one per file); the files with slow
# tests start first (tests/conftest.py) so neither worker ends alone on a long one.
test: $(STAMP) node-deps proto-check lint breaking
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=25

# Chaos and load soaks (they write bench/results/reliability.md) and >= 10,000 fuzz cases; not part of `make test`.
test-soak: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m soak tests/soak
	FUZZ_EXAMPLES=1200 FUZZ_REPORT=1 $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_fuzz_rpcs.py

test-slow: test-soak

# The tests without the slow marker, for a quick loop while developing.
test-fast: $(STAMP) node-deps
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

serve: $(STAMP)
	$(VENV)/bin/finetune serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR) --model-dir ./models --dataset-dir ./datasets

demo: $(STAMP)
	$(VENV)/bin/finetune demo --data-dir $(DATA_DIR)

bench: $(STAMP)
	$(PY) -m bench

# On a CUDA machine with this venv: 16-bit vs 8-bit vs 4-bit, packing on/off, MFU (<= 8 minutes, no downloads).
bench-gpu: $(STAMP)
	bash bench/gpu.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(NODE_DIR)/node_modules
