# loraserve: `make run` (demo on the embedded default model) and `make test` (the test suite).
# Both set up everything themselves: virtualenv, dependencies, generated gRPC code, services.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
STUBS   := services/core/v1/registry_pb2.py
PROTOS  := $(wildcard protos/loraserve/v1/*.proto)
PYTEST_ARGS ?=

.PHONY: all install protos model services test test-gpu run bench bench-gpu soak clean lint

all: install protos

# torch is pinned so that pip takes the CPU build on disk instead of a multi-GB CUDA download
$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,triton]'
	touch $(STAMP)

install: $(STAMP)

$(STUBS): $(PROTOS) scripts/gen_protos.py $(STAMP)
	$(BIN)/python scripts/gen_protos.py

protos: $(STUBS)

# the default model is committed; rebuild it only if it is missing
model: models/default/config.json
models/default/config.json: | $(STAMP)
	$(BIN)/python scripts/make_default_model.py

# test-only servers (PostgreSQL) from Debian's packages, when this machine can install them
services:
	@bash scripts/install_services.sh

test: install protos model services
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-gpu: install protos
	$(BIN)/pytest -q -m gpu $(PYTEST_ARGS)

# the reliability suite of issue 9 at full size (minutes; `make test` runs its short version):
# fuzz/soak/faults on loopback servers, then the adapter-parser fuzzer (10,000 mutated adapters)
soak: install protos model
	@rc=0; $(BIN)/python scripts/soak.py $(SOAK_ARGS) || rc=1; \
	LORASERVE_FUZZ_CASES=$${LORASERVE_FUZZ_CASES:-10000} $(BIN)/python -m tests.reliability.fuzz_adapters || rc=1; \
	exit $$rc

# on the GPU machine (no venv there: its python3 has torch/triton/transformers); see scripts/bench_gpu.sh
bench-gpu:
	bash scripts/bench_gpu.sh

# other ports: make run INFERENCE_PORT=51051 REGISTRY_PORT=51052 METRICS_PORT=9500 OPENAI_PORT=8100
INFERENCE_PORT ?= 50051
REGISTRY_PORT  ?= 50052
METRICS_PORT   ?= 9400
OPENAI_PORT    ?= 8000
run: install protos model
	$(BIN)/python scripts/demo.py --port $(INFERENCE_PORT) --registry-port $(REGISTRY_PORT) \
		--metrics-port $(METRICS_PORT) --openai-port $(OPENAI_PORT)

# ruff (from PyPI, installed into the venv on first use) and, when installed, buf lint of protos/
lint: install
	@if command -v buf >/dev/null 2>&1; then buf lint && echo "buf lint: ok"; \
	else echo "buf not installed: skipping buf lint of protos/ (install buf to run it)"; fi
	@$(BIN)/python -m ruff --version >/dev/null 2>&1 || $(BIN)/pip install -q ruff
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) var/ services/core/v1/*_pb2*.py services/core/v1/*_pb2*.pyi .pytest_cache
