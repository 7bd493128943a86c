"""Matryoshka BatchTopK SAEs: prefix losses, prefixes that use only their latents, and the e2e
loss as the mean of the per-prefix KLs (one batched spliced pass), each against a direct
computation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TLENS, train_on_same_batches
from torch import Tensor, nn

from e2e_sae import SAETransformer, load_config
from e2e_sae.caches.activations import ActivationCache
from e2e_sae.caches.teacher import TeacherCache
from e2e_sae.config import LossConfigs
from e2e_sae.errors import ConfigError
from e2e_sae.lm.load import build_random_model
from e2e_sae.lm.sites import SpliceSite
from e2e_sae.lm.tl import HookedTransformer
from e2e_sae.objective.forward import make_plan, run_forward
from e2e_sae.objective.losses import LossInputs, OutToInLoss, build_loss_terms, compute_losses
from e2e_sae.saes import MatryoshkaSAE, SAEActs, build_sae
from e2e_sae.training.engine import TrainState
from e2e_sae.training.trainer import setup

SAE_POS = "blocks.1.hook_resid_pre"
TC_IN, TC_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
DOWNSTREAM = "blocks.2.hook_resid_pre"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def matryoshka(d_in: int = 8, d_sae: int = 24, seed: int = 0, **kw: Any) -> MatryoshkaSAE:
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"k": 3, "matryoshka_widths": [4, 10, 24], **kw}
    sae = cast(MatryoshkaSAE, build_sae("matryoshka", d_in, d_sae, **kwargs))
    with torch.no_grad():  # raw columns far from unit norm, non-trivial biases
        sae.decoder.weight.mul_(torch.linspace(0.3, 3.0, d_sae))
        sae.decoder.bias.normal_(0, 0.3)
        cast(nn.Linear, sae.encoder[0]).bias.normal_(0, 0.3)
    return sae


def direct_code(sae: MatryoshkaSAE, x: Tensor) -> Tensor:
    """BatchTopK in training: the k * n_tokens largest pre-activations of the batch, ReLU'd."""
    enc = cast(nn.Linear, sae.encoder[0])
    pre = x @ enc.weight.T + enc.bias
    flat = pre.reshape(-1)
    vals, idx = flat.topk(sae.k * (flat.numel() // pre.shape[-1]))
    kept = vals.relu().clamp_min(torch.finfo(vals.dtype).tiny)
    return torch.zeros_like(flat).scatter(0, idx, kept).reshape(pre.shape)


def direct_prefix(sae: MatryoshkaSAE, c: Tensor, width: int) -> Tensor:
    w = sae.decoder.weight
    elements = w / w.norm(dim=0, keepdim=True)
    return c[..., :width] @ elements[:, :width].T + sae.decoder.bias


# --- local: each prefix's loss -------------------------------------------------------------------
@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_local_loss_is_the_weighted_sum_of_prefix_mses(transcoder: bool) -> None:
    weights = [0.5, 2.0, 1.5]
    sae = matryoshka(d_sae=24, prefix_weights=weights, output_size=6 if transcoder else None)
    sae.train()
    x = torch.randn(5, 7, 8)
    target = torch.randn(5, 7, 6) if transcoder else x
    out, c = sae(x)
    acts = SAEActs(x, c, out)
    inputs = LossInputs(
        {"p": acts},
        orig_acts={"t": target},
        sites={"p": SpliceSite("x", "t")} if transcoder else {},
        saes={"p": sae},
    )
    got = OutToInLoss(1.0)(inputs)
    code = direct_code(sae, x)
    torch.testing.assert_close(c, code)
    mses = [F.mse_loss(direct_prefix(sae, code, w), target) for w in (4, 10, 24)]
    want = sum(wt * m for wt, m in zip(weights, mses, strict=True))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(out, direct_prefix(sae, code, 24))
    assert sae.aux_losses(acts, target).keys() == {"auxk"}

    # the cheap variant: out_to_in sees the full dictionary, the inner prefixes an aux loss
    cheap = matryoshka(
        d_sae=24,
        prefix_weights=weights,
        matryoshka_e2e="full_kl_inner_mse",
        inner_mse_coeff=0.25,
        output_size=6 if transcoder else None,
    )
    cheap.train()
    out2, c2 = cheap(x)
    acts2 = SAEActs(x, c2, out2)
    inputs2 = LossInputs(
        {"p": acts2},
        orig_acts=inputs.orig_acts,
        sites=inputs.sites,
        saes={"p": cheap},
    )
    torch.testing.assert_close(OutToInLoss(1.0)(inputs2), mses[2])
    aux = cheap.aux_losses(acts2, target)
    torch.testing.assert_close(aux["matryoshka_inner"], 0.25 * (0.5 * mses[0] + 2.0 * mses[1]))
    assert "auxk" in aux


def test_prefix_reconstruction_uses_only_its_latents() -> None:
    sae = matryoshka()
    c = torch.randn(6, 24).relu()
    inner = sae.inner_outputs(c)
    for p, w in enumerate(sae.widths):
        out = sae.decode_prefix(c, p)
        torch.testing.assert_close(out, direct_prefix(sae, c, w))
        if p < len(inner):
            torch.testing.assert_close(inner[p], out)
        # other latents' values and decoder columns change nothing ...
        c2 = c.clone()
        c2[:, w:] = torch.randn(6, 24 - w).abs() * 5
        sae.zero_grad()
        sae.decode_prefix(c2, p).square().sum().backward()
        torch.testing.assert_close(sae.decode_prefix(c2, p), out)
        grad = sae.decoder.weight.grad
        assert grad is not None
        # ... and get no gradient, while the prefix's own columns do
        assert torch.equal(grad[:, w:], torch.zeros_like(grad[:, w:]))
        assert (grad[:, :w].abs().sum(0) > 0).any()


def test_options_and_errors() -> None:
    sae = matryoshka(matryoshka_widths=[4, 10])  # d_sae is appended, as SAELens does
    assert sae.widths == [4, 10, 24] and sae.spliced_copies() == 3
    assert sae.init_kwargs()["matryoshka_widths"] == [4, 10, 24]
    bad = [
        ({"matryoshka_widths": None}, "required"),
        ({"matryoshka_widths": [10, 4, 24]}, "strictly increasing"),
        ({"matryoshka_widths": [0, 24]}, "strictly increasing"),
        ({"matryoshka_widths": [4, 30]}, "<= d_sae"),
        ({"matryoshka_widths": "4,24"}, "list of integers"),
        ({"matryoshka_e2e": "some"}, "matryoshka_e2e"),
        ({"prefix_weights": [1.0, 1.0]}, "prefix_weights"),
        ({"inner_mse_coeff": -1}, "inner_mse_coeff"),
    ]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            matryoshka(**kw)


# --- e2e: the mean of the per-prefix KLs ----------------------------------------------------------
def tiny_lm() -> HookedTransformer:
    return build_random_model(TINY_TLENS, device="cpu").train()


def spliced_model(with_transcoder: bool, **kw: Any) -> SAETransformer:
    kwargs = {"k": 4, "matryoshka_widths": [8, 24, 64], **kw}
    tcs = [(TC_IN, TC_OUT)] if with_transcoder else []
    model = SAETransformer(
        tiny_lm(),
        [SAE_POS],
        2.0,
        architecture="matryoshka",
        architecture_kwargs=kwargs,
        transcoders=tcs,
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for pos in model.sae_positions:
            sae = model.sae(pos)
            sae.decoder.weight.mul_(torch.rand(sae.decoder.weight.shape[1]) * 2 + 0.3)
            sae.decoder.bias.normal_(0, 0.1)
    return model.train()


def one_prefix_pass(model: SAETransformer, tokens: Tensor, p: int) -> tuple[Tensor, dict]:
    """Logits of a spliced pass in which every SAE writes its prefix p reconstruction, and
    {"c": the SAE's code, "ds": the downstream activation}."""
    seen: dict[str, Tensor] = {}
    pending: dict[str, Tensor] = {}

    def replace(x: Tensor, hook: Any) -> Tensor:
        sae = cast(MatryoshkaSAE, model.sae(SAE_POS))
        seen["c"] = direct_code(sae, x)
        return direct_prefix(sae, seen["c"], sae.widths[p])

    def tc_read(x: Tensor, hook: Any) -> Tensor:
        sae = cast(MatryoshkaSAE, model.sae(TC_OUT))
        pending["out"] = direct_prefix(sae, direct_code(sae, x), sae.widths[p])
        return x

    def ds(x: Tensor, hook: Any) -> Tensor:
        seen["ds"] = x
        return x

    hooks: list[Any] = [(SAE_POS, replace), (DOWNSTREAM, ds)]
    if TC_OUT in model.sites:
        hooks += [(TC_IN, tc_read), (TC_OUT, lambda x, hook: pending.pop("out"))]
    return model.tlens_model.run_with_hooks(tokens, fwd_hooks=hooks), seen


def direct_e2e(
    model: SAETransformer, tokens: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per prefix p, one spliced pass in which every SAE writes its prefix p reconstruction:
    (KL to the clean model, downstream MSE, the SAE's code) per prefix."""
    tl = model.tlens_model
    with torch.no_grad():
        clean_cache: dict[str, Tensor] = {}

        def keep(x: Tensor, hook: Any) -> Tensor:
            clean_cache[DOWNSTREAM] = x  # (hook.name: a bridge's own name for it)
            return x

        clean = tl.run_with_hooks(tokens, fwd_hooks=[(DOWNSTREAM, keep)])
    kls, mses, codes = [], [], []
    for p in range(3):
        new, seen = one_prefix_pass(model, tokens, p)
        v = clean.shape[-1]
        logp_new, logp_clean = (F.log_softmax(t.reshape(-1, v), -1) for t in (new, clean))
        kls.append(F.kl_div(logp_new, logp_clean, log_target=True, reduction="batchmean"))
        mses.append(F.mse_loss(seen["ds"], clean_cache[DOWNSTREAM]))
        codes.append(seen["c"])
    return kls, mses, codes


@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("with_transcoder", [False, True], ids=["sae", "sae+transcoder"])
def test_e2e_loss_is_the_mean_of_per_prefix_kls(path: str, with_transcoder: bool) -> None:
    model = spliced_model(with_transcoder)
    loss_cfg = LossConfigs.model_validate(
        {
            "logits_kl": {"coeff": 1.0},
            "in_to_orig": {"hook_positions": [DOWNSTREAM], "total_coeff": 0.5},
        }
    )
    plan = make_plan(model, loss_cfg)
    assert plan.spliced_copies == 3
    terms = build_loss_terms(loss_cfg, plan.new_cache)
    tokens = torch.randint(0, TINY_TLENS["d_vocab"], (2, 8))
    inputs = run_forward(model, tokens, plan, reference=path == "reference")
    _, values = compute_losses(terms, inputs)
    params = [p for p in model.saes.parameters() if p.requires_grad]
    got = torch.autograd.grad(values["logits_kl"] + 0.5 * values["in_to_orig"], params)

    sae = cast(MatryoshkaSAE, model.sae(SAE_POS))
    threshold = sae.threshold.clone()  # set by the full dictionary's copy only
    kls, mses, codes = direct_e2e(model, tokens)
    torch.testing.assert_close(values["logits_kl"], torch.stack(kls).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(values["in_to_orig"], torch.stack(mses).mean(), rtol=1e-4, atol=1e-6)
    want = torch.autograd.grad(torch.stack(kls).mean() + 0.5 * torch.stack(mses).mean(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)
    # the loss terms, AuxK and the firing statistics see the full dictionary's pass
    acts = inputs.sae_acts[SAE_POS]
    assert acts.c.shape[0] == tokens.shape[0]
    torch.testing.assert_close(acts.c, codes[-1])
    full = codes[-1]
    torch.testing.assert_close(threshold, full[full > 0].min())


def test_plans_one_pass_for_eval_local_and_the_cheap_variant() -> None:
    e2e = LossConfigs.model_validate({"logits_kl": {"coeff": 1.0}})
    local = LossConfigs.model_validate({"out_to_in": {"coeff": 1.0}})
    model = spliced_model(False)
    assert make_plan(model, e2e).spliced_copies == 3
    assert make_plan(model, e2e, force_full_pass=True).spliced_copies == 1
    assert make_plan(model, local).spliced_copies == 1
    model.saes.requires_grad_(False)  # frozen (pretrained) SAEs decode their full dictionary
    assert make_plan(model, e2e).spliced_copies == 1
    cheap = spliced_model(False, matryoshka_e2e="full_kl_inner_mse")
    plan = make_plan(cheap, e2e)
    assert plan.spliced_copies == 1
    tokens = torch.randint(0, TINY_TLENS["d_vocab"], (2, 8))
    inputs = run_forward(cheap, tokens, plan)
    assert inputs.new_final is not None and inputs.new_final.shape[0] == 2
    aux = cheap.sae(SAE_POS).aux_losses(inputs.sae_acts[SAE_POS], inputs.target(SAE_POS))
    assert aux["matryoshka_inner"] > 0


# --- the activation cache and the teacher cache ---------------------------------------------------
MATRYOSHKA_SAES = {
    "sae_positions": [SAE_POS, DOWNSTREAM],
    "dict_size_to_input_ratio": 2.0,
    "architecture": "matryoshka",
    "k": 4,
    "architecture_kwargs": {"matryoshka_widths": [8, 32], "dead_tokens_threshold": 16},
}


def test_cache_training_matches_lm_training(config_dict: Any, tmp_path: Path) -> None:
    cfg = load_config(
        config_dict(
            loss={"out_to_in": {"coeff": 1.0}},
            saes=MATRYOSHKA_SAES,
            n_samples=16,
            max_grad_norm=1.0,
        )
    )
    t = setup(cfg, device="cpu")
    token_batches = [next(t.batches(cfg.train_data, cfg.seed, start=i)) for i in range(3)]
    cache = ActivationCache.build(t.model, token_batches, 3, tmp_path / "acts", progress=False)
    cached = setup(cfg, device="cpu").fed_from_cache()
    lm_batches, state = iter(token_batches), TrainState()
    for _ in range(3):
        t.train_step(lm_batches, state)
    train_on_same_batches([cached], cache.batches(cfg.batch_size, seed=None), n_steps=3)
    for name, p in t.model.saes.state_dict().items():
        assert torch.allclose(cached.saes.state_dict()[name], p, rtol=1e-5, atol=1e-6), name


def test_all_prefixes_with_a_full_teacher_cache_equals_the_clean_pass(
    config_dict: Any, tmp_path: Path
) -> None:
    """A teacher cache keeping every token's whole distribution (k = d_vocab) gives the step of
    the clean pass, for the P batched prefix passes too."""
    cfg = load_config(config_dict(loss={"logits_kl": {"coeff": 1.0}}, saes=MATRYOSHKA_SAES))
    t = setup(cfg, device="cpu")
    assert t.plan.spliced_copies == 3
    batches = [next(t.batches(cfg.train_data, cfg.seed, start=i)) for i in range(2)]
    TeacherCache.build(t.model, batches, 2, tmp_path / "teacher", k=97, progress=False)
    taught = setup(cfg.model_copy(update={"teacher_cache": tmp_path / "teacher"}), device="cpu")
    got = [taught.train_step(iter([b]), TrainState()) for b in batches]
    want = [t.train_step(iter([b]), TrainState()) for b in batches]
    for g, w in zip(got, want, strict=True):
        assert g["logits_kl"] == pytest.approx(w["logits_kl"], rel=1e-5)
    for name, p in t.model.saes.state_dict().items():
        assert torch.allclose(taught.model.saes.state_dict()[name], p, atol=1e-6), name
