#!/usr/bin/env bash
# Dead-latent resampling (relu): the packaged local config on shakespeare-lm, with and without
# `saes.resample_every_n_samples`. Prints each run's eval table; results.md holds a measured copy.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-runs/resample}
base=configs/shakespeare_local.yaml
for every in off 2000; do
  cfg=$(mktemp --suffix=.yaml)
  python - "$base" "$cfg" "$out" "$every" <<'PY'
import sys, yaml
base, dst, out, every = sys.argv[1:]
cfg = yaml.safe_load(open(base))
cfg.update(save_dir=out, run_name=f"resample-{every}", act_frequency_n_tokens=100_000)
if every != "off":
    cfg["saes"]["resample_every_n_samples"] = int(every)
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
PY
  echo "== resample_every_n_samples: $every"
  e2e-sae train "$cfg"
done
