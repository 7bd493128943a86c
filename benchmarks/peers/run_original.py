"""The original e2e_sae 2.1.1's training step, run in its own venv (benchmarks/peers.py).

What its `run_train_tlens_saes.train` does per batch for an e2e run (KL + L1, no accumulation):
`forward_raw` (clean pass with a cache), `forward` (the SAE-spliced pass), `calc_loss`,
`backward`, `clip_grad_norm_(...).item()`, Adam step, `zero_grad`, scheduler step. Logging,
evaluation, firing-frequency collection and saving happen on their own steps and are left out.
The original has no precision option: fp32. Prints one line `PEER_JSON {...}`.

PyPI's e2e-sae 2.1.1 wheel does not ship `e2e_sae/scripts/train_tlens/`, which its `loader.py`
imports (for `HookedTransformerPreConfig`, used only to load LMs it trained itself): `import
e2e_sae` fails as installed. The runner puts a stand-in for that one module in `sys.modules`;
nothing in the timed step uses it.
"""

import argparse
import dataclasses
import json
import sys
import time
import types
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

MISSING = "e2e_sae.scripts.train_tlens.run_train_tlens"
for i in range(2, 5):
    sys.modules.setdefault(".".join(MISSING.split(".")[:i]), types.ModuleType(MISSING))
sys.modules[MISSING].HookedTransformerPreConfig = type("HookedTransformerPreConfig", (), {})  # type: ignore[attr-defined]

from e2e_sae.losses import LossConfigs, calc_loss  # noqa: E402, I001
from e2e_sae.models.transformers import SAETransformer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--ratio", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = json.loads((args.data / "smollm2-tlens" / "tlens_config.json").read_text())
    fields = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    raw.pop("tokenizer_name", None)  # offline: no tokenizer
    cfg = HookedTransformerConfig(**{k: v for k, v in raw.items() if k in fields})
    tlens = HookedTransformer(cfg)
    state = load_file(str(args.data / "smollm2-tlens" / "model.safetensors"))
    params = {n for n, _ in tlens.named_parameters()}
    assert params <= set(state), f"weights missing: {sorted(params - set(state))[:5]}"
    # parameters only: the buffers (causal masks, rotary tables) are this model's own
    tlens.load_state_dict({k: v for k, v in state.items() if k in params}, strict=False)
    tokens = load_file(str(args.data / "tokens.safetensors"))["tokens"]
    batch = 4
    n = args.warmup + args.steps
    assert tokens.shape[0] >= n * batch, "benchmarks/peers.py setup wrote too few windows"

    torch.manual_seed(0)
    model = SAETransformer(tlens, [f"blocks.{args.layer}.hook_resid_pre"], args.ratio)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("saes.")
    model.saes.train()
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_configs = LossConfigs(
        sparsity={"p_norm": 1.0, "coeff": 1.0},
        in_to_orig=None,
        out_to_orig=None,
        out_to_in=None,
        logits_kl={"coeff": 1.0},
    )

    times, losses = [], []
    for i in range(n):
        toks = tokens[i * batch : (i + 1) * batch]
        t0 = time.perf_counter()
        orig_logits, orig_acts = model.forward_raw(
            tokens=toks, run_entire_model=True, final_layer=None, cache_positions=None
        )
        new_logits, new_acts = model.forward(
            tokens=toks, sae_positions=model.raw_sae_positions, cache_positions=None, orig_acts=None
        )
        loss, _ = calc_loss(
            orig_acts=orig_acts,
            new_acts=new_acts,
            orig_logits=orig_logits.detach().clone(),
            new_logits=new_logits,
            loss_configs=loss_configs,
            is_log_step=False,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.saes.parameters(), 1.0).item()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    sae = model.saes[model.all_sae_positions[0]]
    print(
        "PEER_JSON "
        + json.dumps(
            {
                "peer": "original",
                "precision": "fp32",
                "sae": f"ReLU + L1, {sae.n_dict_components} latents",
                "step_s": times[args.warmup :],
                "tokens_per_step": batch * toks.shape[1],
                "losses": losses,
                "versions": {k: version(k) for k in ("e2e_sae", "transformer_lens", "torch")},
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
