# One-command set-up and entry points. Every target installs what it needs first; the set-up is idempotent and
# re-runs only when pyproject.toml or this Makefile change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.embserve-installed
TORCH_VERSION := 2.13.0
FBGEMM_VERSION := 1.8.0
TORCHREC_VERSION := 1.8.0
# The Triton client the Open Inference Protocol tests call the server with (see the dev extra in pyproject.toml).
TRITONCLIENT_VERSION := 2.73.0
# CUDA hosts get the CUDA fbgemm-gpu wheel, every other host the CPU one.
FBGEMM := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo fbgemm-gpu || echo fbgemm-gpu-cpu)
HOST ?= 127.0.0.1
PORT ?= 50051
ARGS ?=

.PHONY: setup serve cluster test test-fast lint typecheck format protos bench bench-ray soak gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" "$(FBGEMM)==$(FBGEMM_VERSION)"
	$(BIN)/pip install --quiet --no-deps "torchrec==$(TORCHREC_VERSION)"
	$(BIN)/pip install --quiet -e ".[server,dev,bench]"
	$(BIN)/pip install --quiet --no-deps "tritonclient==$(TRITONCLIENT_VERSION)"
	touch $@

serve: $(STAMP)
	$(BIN)/embserve serve --host $(HOST) --port $(PORT) $(ARGS)

# A sharded deployment on loopback until Ctrl-C: one shard server per shard of the plan and a router in front,
# router on PORT, shard K on PORT + 1 + K. ARGS="--model M --plan P [--shard-arg=--checkpoint=C]"
# (docs/deployment.md, "A sharded deployment").
cluster: $(STAMP)
	$(BIN)/python -m embserve.benchmarks.cluster --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP) lint
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not attack" $(ARGS)

# Lint: pyflakes and import order (ruff), formatting (ruff format --check; `make format` applies it), and mypy
# (strict) over the hand-written code and the tests. mypy sees the folders under their import names
# (embserve.server, ...) through a tree of links that mirrors pyproject's package-dir mapping, so that every
# `from embserve.X import ...` resolves to the real module.
LINTED := server client embeddings benchmarks protos/embserve/v1/wire.py protos/embserve/v1/sharding.py protos/embserve/oip/wire.py tests
TYPECHECK_ROOT := build/typecheck
lint: $(STAMP)
	$(BIN)/ruff check --quiet $(LINTED)
	$(BIN)/ruff format --quiet --check $(LINTED)
	$(BIN)/python -c 'import os, tomllib; root = "$(TYPECHECK_ROOT)"; dirs = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]; \
	dirs["tests"] = "tests"; [os.makedirs(os.path.join(root, *pkg.split(".")[:-1]), exist_ok=True) for pkg in dirs]; \
	[os.path.lexists(p) and os.remove(p) or os.symlink(os.path.relpath(d, os.path.dirname(p)), p) for pkg, d in dirs.items() for p in [os.path.join(root, *pkg.split("."))]]'
	cd $(TYPECHECK_ROOT) && MYPYPATH=. $(CURDIR)/$(BIN)/python -m mypy --config-file $(CURDIR)/pyproject.toml \
		--explicit-package-bases embserve/server embserve/client embserve/embeddings embserve/benchmarks embserve/v1/wire.py embserve/v1/sharding.py \
		embserve/oip/wire.py tests

typecheck: lint

format: $(STAMP)
	$(BIN)/ruff check --quiet --select I --fix $(LINTED)
	$(BIN)/ruff format --quiet $(LINTED)

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos --pyi_out=protos \
		protos/embserve/v1/embserve.proto protos/embserve/oip/grpc_predict_v2.proto
	$(BIN)/python -m grpc_tools.protoc -I protos --descriptor_set_out=protos/embserve/oip/grpc_predict_v2.binpb \
		protos/embserve/oip/grpc_predict_v2.proto

bench: $(STAMP)
	$(BIN)/python -m embserve.benchmarks.run $(ARGS)

# The CPU benchmark beside Ray Serve (benchmarks/ray_server.py: the same model, direct gRPC ingress, @serve.batch).
# Ray is not part of embserve's stack: it gets a virtual environment of its own, RAY_VENV, with the same torch stack
# and embserve installed from this checkout. ARGS: more `embserve.benchmarks.cpu` flags.
RAY_VENV ?= .venv-ray
RAY_VERSION := 2.60.0
RAY_STAMP := $(RAY_VENV)/.embserve-installed
$(RAY_STAMP): pyproject.toml Makefile
	test -x $(RAY_VENV)/bin/python || $(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/pip install --quiet "torch==$(TORCH_VERSION)" "$(FBGEMM)==$(FBGEMM_VERSION)"
	$(RAY_VENV)/bin/pip install --quiet --no-deps "torchrec==$(TORCHREC_VERSION)"
	$(RAY_VENV)/bin/pip install --quiet -e ".[server]" "ray[serve]==$(RAY_VERSION)"
	touch $@

bench-ray: $(STAMP) $(RAY_STAMP)
	$(BIN)/python -m embserve.benchmarks.cpu --ray-python $(RAY_VENV)/bin/python --apis Lookup LookupStream --no-sdk \
		--out benchmarks/results/cpu-ray $(ARGS)

soak: $(STAMP)
	$(BIN)/python -m embserve.benchmarks.soak $(ARGS)

# On a CUDA host: the CUDA tests and a short benchmark of both engines, written to benchmarks/results/gpu_check.json
# (see DESIGN.md, "GPU check"). Elsewhere it says there is no CUDA device and fails.
gpu-check: $(STAMP)
	$(BIN)/python -m embserve.benchmarks.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
