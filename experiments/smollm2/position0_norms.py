"""The measurement behind the SmolLM2 result: the residual stream at blocks.15.hook_resid_pre of
SmolLM2-135M-Instruct on 16 validation windows, norm at position 0 vs later positions and the share
of the variance that position 0 holds. Run after run.py (it reads the e2e run's config):

    .venv/bin/python experiments/smollm2/position0_norms.py
"""

import glob

import torch

from e2e_sae.checkpoint import build_model
from e2e_sae.config import load_config

torch.set_num_threads(1)
cfg = load_config(glob.glob("experiments/smollm2/runs/e2e_c12/final_config.yaml")[0])
model = build_model(cfg, device="cpu")
from e2e_sae.data import load_windows

w = load_windows(cfg.eval_data)
tokens = torch.as_tensor(w.tokens[:16] if hasattr(w, "tokens") else w[:16])
_, cache = model.run_until(tokens, ["blocks.15.hook_resid_pre"])
x = cache["blocks.15.hook_resid_pre"]
n = x.norm(dim=-1)
print("norm pos0 mean", float(n[:, 0].mean()), "other pos mean", float(n[:, 1:].mean()))
var_total = ((x - x.mean((0, 1))) ** 2).sum()
x0 = x[:, 0]
share0 = float((((x0 - x.mean((0, 1))) ** 2).sum()) / var_total)
print("share of total variance from position 0:", share0, "positions:", x.shape[1])
xo = x[:, 1:].reshape(-1, x.shape[-1])
v = xo.var(0)
top = v.sort(descending=True)
print(
    "positions>=1: top-1 dim share of variance",
    float(top.values[0] / v.sum()),
    "dim",
    int(top.indices[0]),
)
