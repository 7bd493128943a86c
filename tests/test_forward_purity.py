"""Forward, eval, generate, export and the feature browser never change a parameter: two identical
calls are bit-identical and the state dict is the same afterwards (issue: forward used to
renormalise `decoder.weight` in place on every call, also under `torch.no_grad()`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_TLENS

from e2e_sae import SAETransformer
from e2e_sae.analysis.browser import collect_feature_data, promoted_tokens
from e2e_sae.config import LossConfigs
from e2e_sae.eval.evaluate import evaluate
from e2e_sae.interop.saelens import save_saelens
from e2e_sae.lm.load import build_random_model
from e2e_sae.objective.forward import make_plan
from e2e_sae.objective.losses import build_loss_terms
from e2e_sae.saes import ARCHITECTURES, build_sae

ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "topk": {"k": 3},
    "batchtopk": {"k": 3},
    "matryoshka": {"k": 3, "matryoshka_widths": [8, 16]},
}
POS = "blocks.1.hook_resid_pre"


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        same = torch.allclose(v, after[k], rtol=0, atol=0, equal_nan=True)  # (unset thresholds)
        assert same, f"{k} changed"


def far_from_unit_norm(sae: torch.nn.Module) -> None:
    with torch.no_grad():
        w = sae.decoder.weight  # type: ignore[union-attr]
        w.mul_(torch.linspace(0.3, 3.0, w.shape[1]))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_sae_forward_is_pure(arch: str, grad: bool) -> None:
    torch.manual_seed(0)
    sae = build_sae(arch, 12, 40, **ARCH_KWARGS.get(arch, {})).eval()
    far_from_unit_norm(sae)
    before = snapshot(sae)
    x = torch.randn(3, 5, 12)
    with torch.set_grad_enabled(grad):
        out1, c1 = sae(x)
        out2, c2 = sae(x)
    assert torch.equal(out1, out2) and torch.equal(c1, c2)
    assert_same_state(before, sae)
    if arch == "relu":  # the output uses the normalised columns, not the raw ones
        w = sae.decoder.weight.detach()
        want = c1.detach() @ (w / w.norm(dim=0)).T + sae.decoder.bias.detach()
        torch.testing.assert_close(out1.detach(), want)


@pytest.fixture
def model() -> SAETransformer:
    tl = build_random_model(TINY_TLENS, device="cpu").train()
    m = SAETransformer(tl, [POS], 2.0)
    far_from_unit_norm(m.sae(POS))
    return m.eval()


def test_transformer_forward_generate_eval_export_browse_change_nothing(
    model: SAETransformer, tmp_path: Path
) -> None:
    before = snapshot(model)
    tokens = torch.randint(0, TINY_TLENS["d_vocab"], (2, 10))
    with torch.no_grad():
        logits1, _ = model.forward(tokens, [POS])
        logits2, _ = model.forward(tokens, [POS])
        assert logits1 is not None and logits2 is not None
        assert torch.equal(logits1, logits2)
        raw1, _ = model.forward_raw(tokens, run_entire_model=True)
        raw2, _ = model.forward_raw(tokens, run_entire_model=True)
        assert torch.equal(raw1, raw2)
    gen = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(model.generate(tokens[:1], **gen), model.generate(tokens[:1], **gen))
    assert_same_state(before, model)

    loss_cfg = LossConfigs.model_validate({"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1}})
    plan = make_plan(model, loss_cfg, force_full_pass=True)
    terms = build_loss_terms(loss_cfg, plan.new_cache)
    batches = [torch.randint(0, TINY_TLENS["d_vocab"], (2, 10)) for _ in range(2)]
    first = evaluate(model, iter(batches), 2, plan, terms)
    second = evaluate(model, iter(batches), 2, plan, terms)
    assert first.metrics == second.metrics
    save_saelens(model.sae(POS), tmp_path / "export", POS)
    collect_feature_data(model, POS, iter(batches), 2)
    promoted_tokens(model, POS, torch.arange(4))
    assert_same_state(before, model)
