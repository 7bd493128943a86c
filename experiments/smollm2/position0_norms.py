"""The measurement behind the SmolLM2 result: the residual stream at blocks.15.hook_resid_pre of
SmolLM2-135M-Instruct on 16 validation windows, norm at position 0 vs later positions and the share
of the variance that position 0 holds. Run after run.py (it reads the e2e run's config):

    .venv/bin/python experiments/smollm2/position0_norms.py
"""

from pathlib import Path

import torch

from e2e_sae.config import Config, load_config
from e2e_sae.data import load_windows
from e2e_sae.lm.splice import SAETransformer

HOOK = "blocks.15.hook_resid_pre"
torch.set_num_threads(1)
cfg = load_config(Path(__file__).resolve().parent / "runs" / "e2e_c12" / "final_config.yaml")
assert isinstance(cfg, Config) and cfg.eval_data is not None
model = SAETransformer.from_config(cfg, device="cpu")
tokens = load_windows(cfg.eval_data).tokens[:16]
_, cache = model.run_until(tokens, [HOOK])
x = cache[HOOK]
norms = x.norm(dim=-1)
print(
    f"norm at position 0: {float(norms[:, 0].mean()):.1f}, later: {float(norms[:, 1:].mean()):.1f}"
)
centred = x - x.mean((0, 1))
share = float((centred[:, 0] ** 2).sum() / (centred**2).sum())
print(f"share of the variance at position 0: {share:.4f} ({x.shape[1]} positions)")
