#!/usr/bin/env bash
# Reproduce the built-in `shakespeare-lm` and its tokenizer `shakespeare-bpe` (see results.md).
# About 26 min on 2 shared CPU cores. Run from the repository root.
set -euo pipefail
PY=${PY:-.venv/bin/python}
# 1. Byte-level BPE, 4096 tokens, trained on the train split only.
$PY experiments/small_lm/train_tokenizer.py --vocab-size 4096
# 2. The LM (one thread per process was much faster than two on a busy 2-core machine).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 \
  $PY -m e2e_sae train-lm experiments/small_lm/shakespeare_lm.yaml
# 3. Ship it: the package loads `tlens_model_name: shakespeare-lm` from this folder.
mkdir -p e2e_sae/assets/models/shakespeare-lm
cp experiments/small_lm/runs/shakespeare-lm/{model.safetensors,tlens_config.json} \
  e2e_sae/assets/models/shakespeare-lm/
cp experiments/small_lm/runs/shakespeare-lm/metrics.jsonl experiments/small_lm/metrics.jsonl
