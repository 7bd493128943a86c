"""The same numbers on TransformerLens 3.x and 4.x.

`compute_numbers()` measures, for fixed weights and data: the logits of the shipped `shakespeare-lm`
and its residual stream at the demo's SAE hook, the logits of random-init `tlens_config` models of
several layouts (the weights come from the config's seed on both versions), the per-step losses and
final eval metrics of local / e2e / e2e+downstream training runs, a `train-lm` run's eval CE, and
the residual stream of a GPT-2-style Hugging Face model with HookedTransformer's weight processing
(fold_ln, centred writing weights and unembedding; what a hub name such as `gpt2` gets: on 3.x
HookedTransformer, on 4.x `TransformerBridge` with `enable_compatibility_mode()`).

`tests/data/tl3_numbers.json` holds what TransformerLens 3.x computed (written on 3.9 with
`python tests/test_tl_versions.py --write`). The test recomputes everything with the installed
TransformerLens and compares: on 3.x it checks the file is current, on 4.x that 4.x gives 3.x's
numbers. Tolerance: relative to the scale of each quantity (`assert_close_scaled`), 1e-5 for single
forward passes and 1e-4 for values after training steps (Adam amplifies rounding differences).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_TLENS, assert_close_scaled, make_config_dict, write_token_jsonl  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "data" / "tl3_numbers.json"
LAYOUTS: dict[str, dict[str, Any]] = {
    "ln_gelu": dict(TINY_TLENS),
    "llama_like": {
        **TINY_TLENS,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": 8,
        "gated_mlp": True,
        "act_fn": "silu",
        "n_key_value_heads": 2,
        "final_rms": True,
        "seed": 3,
    },
    "attn_only_lnpre": {
        **TINY_TLENS,
        "attn_only": True,
        "normalization_type": "LNPre",
        "act_fn": "relu",
        "positional_embedding_type": "rotary",
        "rotary_dim": 4,
        "seed": 5,
    },
}
RUNS: dict[str, dict[str, Any]] = {
    "local": {"sparsity": {"coeff": 0.01}, "out_to_in": {"coeff": 1.0}},
    "e2e": {"sparsity": {"coeff": 0.01}, "logits_kl": {"coeff": 1.0}},
    "e2e_ds": {
        "sparsity": {"coeff": 0.01},
        "logits_kl": {"coeff": 1.0},
        "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_pre"], "total_coeff": 1.0},
    },
}
EVAL_KEYS = (
    "eval/ce_loss_clean",
    "eval/ce_loss_with_saes",
    "eval/kl",
    "eval/l0/blocks.1.hook_resid_pre",
    "eval/explained_variance/blocks.1.hook_resid_pre",
)


def _tokens(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _resid(model: Any, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    got: list[torch.Tensor] = []

    def keep(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
        got.append(x.detach().clone())
        return x

    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, keep)]):
        logits = model(tokens)
    return torch.cat([logits.flatten(), got[0].flatten()])


def _shakespeare() -> list[float]:
    from e2e_sae.lm.load import load_tlens_model

    model = load_tlens_model("shakespeare-lm")
    return _resid(model, _tokens(4096, (2, 24), 0), "blocks.2.hook_resid_pre")[::101].tolist()


def _layouts() -> dict[str, list[float]]:
    from e2e_sae.lm.load import load_tlens_model

    out = {}
    for name, fields in LAYOUTS.items():
        model = load_tlens_model(tlens_config=fields, device="cpu")
        with torch.no_grad():
            out[name] = model(_tokens(97, (2, 16), 1)).flatten()[::13].tolist()
    return out


def _runs(tmp: Path) -> dict[str, dict[str, list[float]]]:
    from e2e_sae import load_config
    from e2e_sae.training.runlog import read_metrics
    from e2e_sae.training.trainer import train

    data = write_token_jsonl(tmp / "tokens.jsonl")
    out = {}
    for name, loss in RUNS.items():
        cfg = make_config_dict(data, tmp / "runs", loss=loss, run_name=name, lr=3e-3)
        run_dir = train(load_config(cfg), progress=False)
        records = read_metrics(run_dir)
        evals = [r for r in records if "eval/ce_loss_clean" in r][-1]
        out[name] = {
            "loss": [r["loss"] for r in records if "loss" in r],
            "eval": [float(evals[k]) for k in EVAL_KEYS],
        }
    return out


def _train_lm(tmp: Path) -> list[float]:
    from e2e_sae.training.train_lm import TrainLMConfig, train_lm

    data = write_token_jsonl(tmp / "lm.jsonl", n_rows=48)
    ds = {"dataset_name": str(data), "n_ctx": 16, "streaming": False}
    cfg = TrainLMConfig.model_validate(
        {
            "name": "lm",
            "tlens_config": {**TINY_TLENS, "n_layers": 2},
            "train": {"n_epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_samples": 8},
            "train_data": ds,
            "eval_data": ds,
            "save_dir": str(tmp / "models"),
        }
    )
    return train_lm(cfg, device="cpu", progress=False).eval_ce


def gpt2_folder(path: Path) -> Path:
    """A tiny GPT-2 (random weights from a fixed generator, the GPT-2 tokenizer) as a Hugging
    Face model folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from e2e_sae.data.tokenizer import load_tokenizer

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=50257)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    load_tokenizer("gpt2").save_pretrained(path)
    return path


def _gpt2_processed(tmp: Path) -> list[float]:
    """The residual stream and logits of the tiny GPT-2 with HookedTransformer's processing."""
    from e2e_sae.lm.tl import HAS_HOOKED

    folder = gpt2_folder(tmp / "gpt2")
    if HAS_HOOKED:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(folder)
        cfg = HookedTransformerConfig(
            d_model=32,
            d_head=8,
            n_heads=4,
            d_mlp=128,
            n_layers=2,
            n_ctx=32,
            d_vocab=50257,
            act_fn="gelu_new",
            normalization_type="LN",
            eps=hf.config.layer_norm_epsilon,
            original_architecture="GPT2LMHeadModel",
        )
        model: Any = HookedTransformer(cfg)
        model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg))  # from_pretrained's
    else:
        from e2e_sae.lm.load import load_pretrained

        model = load_pretrained(str(folder))  # what a hub name gets on 4.x
    tokens = _tokens(50257, (2, 12), 2)
    values = [
        _resid(model, tokens, f"blocks.{i}.{h}")
        for i in (0, 1)
        for h in ("hook_resid_pre", "hook_resid_post", "hook_mlp_out")
    ]
    # logits up to a constant per position (centre_unembed): compare log-softmax
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens), -1)[..., ::997].flatten()
    return torch.cat([*(v[2 * 12 * 50257 :][::7] for v in values), logp]).tolist()


def compute_numbers(tmp: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "shakespeare": _shakespeare(),
        "layouts": _layouts(),
        "runs": _runs(tmp),
        "train_lm": _train_lm(tmp),
        "gpt2_processed": _gpt2_processed(tmp),
    }


def _close(got: Any, want: Any, rtol: float, what: str) -> None:
    assert_close_scaled(torch.tensor(got), torch.tensor(want), rtol=rtol, what=what)


@pytest.fixture(scope="module")
def numbers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compute_numbers(tmp_path_factory.mktemp("tl_numbers"))


@pytest.fixture(scope="module")
def tl3() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def test_forward_passes_match_transformer_lens_3(numbers, tl3) -> None:
    _close(numbers["shakespeare"], tl3["shakespeare"], 1e-5, "shakespeare-lm")
    for name in LAYOUTS:
        _close(numbers["layouts"][name], tl3["layouts"][name], 1e-5, f"tlens_config {name}")
    _close(numbers["gpt2_processed"], tl3["gpt2_processed"], 1e-5, "processed GPT-2")


def test_training_runs_match_transformer_lens_3(numbers, tl3) -> None:
    for name in RUNS:
        got, want = numbers["runs"][name], tl3["runs"][name]
        assert len(got["loss"]) == len(want["loss"]) > 0
        _close(got["loss"], want["loss"], 1e-4, f"{name} losses")
        for key, g, w in zip(EVAL_KEYS, got["eval"], want["eval"], strict=True):
            assert math.isclose(g, w, rel_tol=1e-4, abs_tol=1e-4 * abs(w) + 1e-6), (name, key)
    _close(numbers["train_lm"], tl3["train_lm"], 1e-4, "train-lm eval CE")


if __name__ == "__main__":
    import tempfile

    from e2e_sae.lm.tl import HAS_HOOKED, TL_VERSION

    if sys.argv[1:] != ["--write"] or not HAS_HOOKED:
        raise SystemExit("usage (TransformerLens 3.x): python tests/test_tl_versions.py --write")
    with tempfile.TemporaryDirectory() as tmp:
        found = {"transformer_lens": TL_VERSION, **compute_numbers(Path(tmp))}
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(found, indent=None) + "\n")
    print(f"wrote {FIXTURE}")
