"""SAE architectures (relu, topk, batchtopk, jumprelu, gated), AuxK, init options, transcoders and
KL fine-tuning, each checked against a direct computation on small data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TLENS
from safetensors.torch import load_file
from torch import nn

from e2e_sae import SAETransformer, load_config
from e2e_sae.config import LossConfigs
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm import native
from e2e_sae.lm.load import build_random_model
from e2e_sae.lm.tl import HAS_HOOKED, HookedTransformer
from e2e_sae.objective.forward import make_plan, run_forward
from e2e_sae.objective.losses import LogitsKLLoss, LossInputs, OutToInLoss, SparsityLoss
from e2e_sae.runs.checkpoint import list_checkpoints, save_checkpoint, tensor_metadata, write_config
from e2e_sae.saes import (
    ARCHITECTURES,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    SAEActs,
    SAEBase,
    TopKSAE,
    build_sae,
    sae_key,
)
from e2e_sae.saes.init import geometric_median
from e2e_sae.training.engine import TrainState
from e2e_sae.training.runlog import read_metrics
from e2e_sae.training.trainer import setup, train

TC_IN, TC_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
SAE_POS = "blocks.1.hook_resid_pre"

# Small settings per architecture: dead after 16 tokens so AuxK acts within a few steps; JumpReLU
# thresholds and kernel sized for activations of order 1.
ARCH_SAES: dict[str, dict[str, Any]] = {
    "relu": {},
    "topk": {"k": 4, "architecture_kwargs": {"dead_tokens_threshold": 16, "k_aux": 8}},
    "batchtopk": {"k": 4, "architecture_kwargs": {"dead_tokens_threshold": 16, "k_aux": 8}},
    "matryoshka": {
        "k": 4,
        "architecture_kwargs": {
            "dead_tokens_threshold": 16,
            "k_aux": 8,
            "matryoshka_widths": [8, 32],
        },
    },
    "jumprelu": {"architecture_kwargs": {"bandwidth": 0.1, "init_threshold": 0.1}},
    "gated": {"architecture_kwargs": {"aux_coeff": 0.5}},
    "skip_transcoder": {},
}
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add overhead (large on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def enc(sae: SAEBase) -> nn.Linear:
    return cast(nn.Linear, sae.encoder[0])


def tiny_model() -> HookedTransformer:
    return build_random_model(TINY_TLENS, device="cpu").train()


def forward_on_path(model: SAETransformer, path: str) -> LossInputs:
    """One forward pass with a sparsity term, on the local, fast e2e or reference e2e path."""
    loss = {
        "sparsity": {"coeff": 1.0},
        "out_to_in" if path == "local" else "logits_kl": {"coeff": 1.0},
    }
    plan = make_plan(model, LossConfigs.model_validate(loss))
    tokens = torch.randint(0, TINY_TLENS["d_vocab"], (2, 8))
    return run_forward(model, tokens, plan, reference=path == "e2e_reference")


def read_tokens(path: Path) -> torch.Tensor:
    return torch.tensor([json.loads(line)["input_ids"] for line in path.read_text().splitlines()])


def losses_for(arch: str, kind: str) -> dict[str, Any]:
    loss: dict[str, Any] = {
        "local": {"out_to_in": {"coeff": 1.0}},
        "e2e": {"logits_kl": {"coeff": 1.0}},
        "e2e_ds": {
            "logits_kl": {"coeff": 0.5},
            "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_pre"], "total_coeff": 1.0},
        },
    }[kind]
    if arch not in TOPK_FAMILY:  # the TopK family needs no sparsity term: k sets it
        loss["sparsity"] = {"coeff": 0.1}
    return loss


# --- relu: the paper's SAE, unchanged -------------------------------------------------------------
def test_relu_matches_direct_computation() -> None:
    torch.manual_seed(0)
    sae = build_sae("relu", 6, 10)
    with torch.no_grad():
        sae.decoder.weight.mul_(3.0)  # not unit norm: forward must normalise the columns
        sae.decoder.bias.normal_()
    w, b = enc(sae).weight.detach().clone(), enc(sae).bias.detach().clone()
    w_dec = sae.decoder.weight.detach().clone()
    b_dec = sae.decoder.bias.detach().clone()
    x = torch.randn(2, 3, 6)
    out, c = sae(x)
    c_want = F.relu(x @ w.T + b)
    out_want = c_want @ (w_dec / w_dec.norm(dim=0, keepdim=True)).T + b_dec
    torch.testing.assert_close(c, c_want)
    torch.testing.assert_close(out, out_want)
    # the `sparsity` term asks the SAE for its penalty: for relu still ||c||_p / d_in
    acts = SAEActs(x, c, out)
    with_sae = SparsityLoss(1.0, 1.0)(LossInputs(sae_acts={"p": acts}, saes={"p": sae}))
    torch.testing.assert_close(with_sae, c_want.abs().sum(-1).mean() / 6)


# --- topk -----------------------------------------------------------------------------------------
def test_topk_keeps_exactly_k_per_token_even_with_ties_and_negative_pre_acts() -> None:
    torch.manual_seed(0)
    sae = TopKSAE(8, 16, k=4)
    x = torch.randn(5, 7, 8)
    pre = sae.pre_acts(x).detach()
    out, c = sae(x)
    assert ((c != 0).sum(-1) == 4).all()
    kth = pre.topk(4, dim=-1).values[..., -1:]
    assert torch.equal(c != 0, pre >= kth)  # the k largest pre-activations
    kept = c != 0
    torch.testing.assert_close(c[kept], F.relu(pre[kept]).clamp_min(torch.finfo(c.dtype).tiny))
    torch.testing.assert_close(out, c @ sae.dict_elements.detach().T + sae.decoder.bias)

    with torch.no_grad():  # every pre-activation equal (ties) and negative
        enc(sae).weight.zero_()
        enc(sae).bias.fill_(-1.0)
    out, c = sae(x)
    assert ((c != 0).sum(-1) == 4).all()
    # such latents count as active but add nothing measurable: the output is the decoder bias
    torch.testing.assert_close(out, sae.decoder.bias.expand_as(out))


def test_topk_requires_a_valid_k() -> None:
    with pytest.raises(ConfigError, match="saes.k"):
        build_sae("topk", 8, 16)
    with pytest.raises(ConfigError, match="saes.k"):
        build_sae("topk", 8, 16, k=17)
    with pytest.raises(ConfigError, match="k_aux"):
        build_sae("batchtopk", 8, 16, k=2, k_aux=0)


# --- batchtopk ------------------------------------------------------------------------------------
def test_batchtopk_training_keeps_k_times_tokens_and_tracks_threshold() -> None:
    torch.manual_seed(0)
    sae = BatchTopKSAE(8, 16, k=3, threshold_momentum=0.25).train()
    assert torch.isnan(sae.threshold)
    x1, x2 = torch.randn(2, 5, 8), torch.randn(4, 8)
    for i, x in enumerate((x1, x2)):
        old = float(sae.threshold)
        pre = sae.pre_acts(x).detach()
        _, c = sae(x)
        n_tokens = pre.numel() // 16
        assert int((c != 0).sum()) == 3 * n_tokens  # mean L0 == k exactly
        smallest = pre.flatten().topk(3 * n_tokens).values[-1]
        assert torch.equal(c != 0, pre >= smallest)  # top k*n_tokens of the whole batch
        assert float(smallest) > 0  # (so the smallest kept activation is pre itself)
        want = float(smallest) if i == 0 else old + 0.25 * (float(smallest) - old)
        assert float(sae.threshold) == pytest.approx(want, rel=1e-6)
    # eval mode: one global threshold, so a single token works
    sae.eval()
    x = torch.randn(1, 8)
    pre = sae.pre_acts(x).detach()
    _, c = sae(x)
    torch.testing.assert_close(c, torch.where(pre > sae.threshold, pre, torch.zeros_like(pre)))
    # no threshold learned yet: eval falls back to per-token TopK
    fresh = BatchTopKSAE(8, 16, k=3).eval()
    _, c = fresh(torch.randn(6, 8))
    assert ((c != 0).sum(-1) == 3).all()


def test_batchtopk_inference_threshold_gives_l0_near_k_on_held_out(token_data: Path) -> None:
    model = tiny_model()
    tokens = read_tokens(token_data)
    _, cache = model.run_with_cache(tokens, names_filter=SAE_POS)
    acts = cache[SAE_POS]
    train_acts, held_out = acts[:48], acts[48:]  # split by row: held-out tokens never trained on
    torch.manual_seed(0)
    k = 8
    sae = BatchTopKSAE(32, 128, k=k, threshold_momentum=0.05).train()
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        x = train_acts[torch.randperm(48, generator=g)[:8]]
        out, c = sae(x)
        assert int((c != 0).sum()) == k * x.shape[0] * x.shape[1]
        opt.zero_grad()
        F.mse_loss(out, x).backward()
        opt.step()
    sae.eval()
    with torch.no_grad():
        _, c = sae(held_out)
    mean_l0 = float((c != 0).sum(-1).float().mean())
    assert abs(mean_l0 - k) <= 0.2 * k, mean_l0


# --- jumprelu -------------------------------------------------------------------------------------
def test_jumprelu_straight_through_gradients_match_the_pseudo_derivatives() -> None:
    torch.manual_seed(0)
    eps = 0.5
    sae = JumpReLUSAE(6, 10, bandwidth=eps, init_threshold=0.3)
    with torch.no_grad():
        sae.log_threshold.add_(0.5 * torch.randn(10))
    x = torch.randn(4, 5, 6)
    z = sae.pre_acts(x).detach()
    theta = sae.threshold.detach()
    window = ((z - theta).abs() < eps / 2).float()
    c = sae.encode(x)
    torch.testing.assert_close(c, z * (z > theta))
    g = torch.randn_like(c)
    (c * g).sum().backward()
    # d/dlog(theta) = theta * d/dtheta, with d c / d theta := -(theta / eps) K((z - theta) / eps)
    want = theta * (-(theta / eps) * window * g).sum((0, 1))
    assert sae.log_threshold.grad is not None
    torch.testing.assert_close(sae.log_threshold.grad, want)
    assert (sae.log_threshold.grad != 0).sum() >= 5  # thresholds do learn

    # the L0 penalty: a count of the non-zero entries; its gradient reaches only the thresholds
    sae.zero_grad()
    out, c = sae(x)
    penalty = sae.sparsity_penalty(SAEActs(x, c, out), p_norm=1.0)
    assert torch.equal(penalty, (c != 0).sum(-1).float())
    penalty.sum().backward()
    torch.testing.assert_close(sae.log_threshold.grad, theta * (-(1 / eps) * window).sum((0, 1)))
    assert enc(sae).weight.grad is None
    loss = SparsityLoss(1.0)(LossInputs(sae_acts={"p": SAEActs(x, c, out)}, saes={"p": sae}))
    torch.testing.assert_close(loss, (c != 0).sum(-1).float().mean() / 6)


@pytest.mark.parametrize("path", ["local", "e2e", "e2e_reference"])
def test_sparsity_term_is_the_l0_count_on_every_forward_path(path: str) -> None:
    model = SAETransformer(
        tiny_model(),
        [SAE_POS],
        2.0,
        architecture="jumprelu",
        transcoders=[(TC_IN, TC_OUT)],
        architecture_kwargs={"init_threshold": 0.1},
    )
    inputs = forward_on_path(model, path)
    want = sum(
        (a.c != 0).sum(-1).float().mean() / a.input.shape[-1] for a in inputs.sae_acts.values()
    )
    assert len(inputs.sae_acts) == 2
    torch.testing.assert_close(SparsityLoss(1.0)(inputs), want)


# --- gated ----------------------------------------------------------------------------------------
def gated_sae(aux_coeff: float = 0.5, d_in: int = 6, d_sae: int = 12, seed: int = 0) -> GatedSAE:
    """A gated SAE with non-trivial magnitude parameters and decoder columns far from unit norm."""
    torch.manual_seed(seed)
    sae = build_sae("gated", d_in, d_sae, aux_coeff=aux_coeff)
    assert isinstance(sae, GatedSAE)
    with torch.no_grad():
        sae.r_mag.normal_(0, 0.5)
        sae.b_mag.normal_(0.5, 0.5)  # mostly positive: many latents with pi_mag > 0 get gated off
        sae.decoder.weight.mul_(3.0)
        sae.decoder.bias.normal_()
    return sae


def gated_direct(sae: GatedSAE, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(pi_gate, pi_mag, c, output) written out from detached copies of the parameters."""
    w, b = enc(sae).weight.detach(), enc(sae).bias.detach()
    w_dec, b_dec = sae.decoder.weight.detach(), sae.decoder.bias.detach()
    pi_gate = x @ w.T + b
    pi_mag = (x @ (w * sae.r_mag.detach().exp()[:, None]).T) + sae.b_mag.detach()
    c = (pi_gate > 0).float() * F.relu(pi_mag)
    return pi_gate, pi_mag, c, c @ (w_dec / w_dec.norm(dim=0, keepdim=True)).T + b_dec


def test_gated_encode_matches_the_formula_and_the_gate_zeroes_c() -> None:
    sae = gated_sae()
    x = torch.randn(3, 5, 6)
    pi_gate, pi_mag, c_want, out_want = gated_direct(sae, x)
    out, c = sae(x)
    torch.testing.assert_close(c, c_want)
    torch.testing.assert_close(out, out_want)
    torch.testing.assert_close(sae.decode(c), out_want)
    assert torch.equal(c == 0, (pi_gate <= 0) | (pi_mag <= 0))
    assert (c[pi_gate <= 0] == 0).all()
    assert ((pi_gate <= 0) & (pi_mag > 0)).any()  # the gate, not the magnitude, zeroed these
    assert ((pi_gate > 0) & (pi_mag > 0)).any()
    # the step passes no gradient to the gate; the magnitude path learns from c
    c.sum().backward()
    assert enc(sae).bias.grad is None
    assert sae.r_mag.grad is not None and sae.b_mag.grad is not None
    active = (c > 0).any(dim=(0, 1))
    assert (sae.b_mag.grad[active] != 0).all() and (sae.b_mag.grad[~active] == 0).all()


@pytest.mark.parametrize("p_norm", [1.0, 2.0])
def test_gated_sparsity_penalty_is_the_norm_of_relu_gate_and_trains_the_gate(p_norm: float) -> None:
    sae = gated_sae()
    x = torch.randn(3, 5, 6)
    out, c = sae(x)
    acts = SAEActs(x, c, out)
    w = enc(sae).weight.detach().clone().requires_grad_(True)
    b = enc(sae).bias.detach().clone().requires_grad_(True)
    relu_gate = F.relu(x @ w.T + b)
    want = relu_gate.pow(p_norm).sum(-1).pow(1 / p_norm)
    penalty = sae.sparsity_penalty(acts, p_norm)
    torch.testing.assert_close(penalty, want)
    assert not torch.allclose(penalty, torch.norm(c, p=p_norm, dim=-1))  # not ||c||_p
    loss = SparsityLoss(1.0, p_norm)(LossInputs(sae_acts={"p": acts}, saes={"p": sae}))
    torch.testing.assert_close(loss, want.mean() / 6)
    loss.backward()
    (want.mean() / 6).backward()
    assert enc(sae).weight.grad is not None and enc(sae).bias.grad is not None
    torch.testing.assert_close(enc(sae).weight.grad, w.grad)
    torch.testing.assert_close(enc(sae).bias.grad, b.grad)
    assert (enc(sae).bias.grad != 0).any()
    assert sae.r_mag.grad is None and sae.b_mag.grad is None
    assert sae.decoder.weight.grad is None and sae.decoder.bias.grad is None


def test_gated_aux_loss_matches_direct_computation_and_trains_only_the_gate() -> None:
    sae = gated_sae(aux_coeff=0.5)
    x = torch.randn(3, 5, 6, requires_grad=True)  # stands in for upstream activations
    target = torch.randn(3, 5, 6)
    out, c = sae(x)
    aux = sae.aux_losses(SAEActs(x, c, out), target)
    assert list(aux) == ["gated_aux"]

    w = enc(sae).weight.detach().clone().requires_grad_(True)
    b = enc(sae).bias.detach().clone().requires_grad_(True)
    w_dec, b_dec = sae.decoder.weight.detach(), sae.decoder.bias.detach()
    recon = F.relu(x.detach() @ w.T + b) @ (w_dec / w_dec.norm(dim=0, keepdim=True)).T + b_dec
    want = 0.5 * ((recon - target) ** 2).mean()  # mean over elements, like out_to_in's MSE
    torch.testing.assert_close(aux["gated_aux"], want)
    # without a target the SAE reconstructs its input
    no_target = sae.aux_losses(SAEActs(x, c, out))["gated_aux"]
    torch.testing.assert_close(no_target, 0.5 * F.mse_loss(recon, x.detach()))

    aux["gated_aux"].backward()
    want.backward()
    assert x.grad is None  # nothing flows upstream
    torch.testing.assert_close(enc(sae).weight.grad, w.grad)
    torch.testing.assert_close(enc(sae).bias.grad, b.grad)
    assert enc(sae).bias.grad is not None and (enc(sae).bias.grad != 0).any()
    for p in (sae.decoder.weight, sae.decoder.bias, sae.r_mag, sae.b_mag):
        assert p.grad is None

    off = gated_sae(aux_coeff=0.0)
    out_off, c_off = off(x)
    assert off.aux_losses(SAEActs(x, c_off, out_off), target) == {}


def test_gated_options_and_errors() -> None:
    sae = build_sae("gated", 4, 8)
    assert isinstance(sae, GatedSAE) and sae.init_kwargs() == {"aux_coeff": 1.0}
    assert torch.equal(sae.r_mag, torch.zeros(8)) and torch.equal(sae.b_mag, torch.zeros(8))
    assert {"r_mag", "b_mag"} <= set(sae.state_dict())
    assert build_sae("gated", 4, 8, aux_coeff=0).init_kwargs() == {"aux_coeff": 0.0}
    for bad in (-0.1, float("nan"), "1", True):
        with pytest.raises(ConfigError, match=r"saes\.architecture_kwargs\.aux_coeff"):
            build_sae("gated", 4, 8, aux_coeff=bad)
    with pytest.raises(ConfigError, match="saes.architecture_kwargs"):
        build_sae("gated", 4, 8, k=3)


@pytest.mark.parametrize("path", ["local", "e2e", "e2e_reference"])
def test_gated_penalty_reads_the_input_that_made_the_code_on_every_forward_path(path: str) -> None:
    torch.manual_seed(0)
    model = SAETransformer(
        tiny_model(),
        [SAE_POS],
        2.0,
        architecture="gated",
        transcoders=[(TC_IN, TC_OUT)],
    )
    inputs = forward_on_path(model, path)
    assert len(inputs.sae_acts) == 2
    want = torch.zeros(())
    for pos, a in inputs.sae_acts.items():
        sae = model.sae(pos)
        relu_gate = F.relu(sae.pre_acts(a.input.detach())).detach()
        assert (a.c[relu_gate == 0] == 0).all() and (a.c != 0).any()
        want = want + relu_gate.sum(-1).mean() / a.input.shape[-1]
    torch.testing.assert_close(SparsityLoss(1.0)(inputs).detach(), want)


# --- AuxK -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TOPK_FAMILY)
def test_auxk_matches_direct_computation_and_touches_only_dead_latents(arch: str) -> None:
    torch.manual_seed(0)
    extra: dict[str, Any] = {"matryoshka_widths": [8, 32]} if arch == "matryoshka" else {}
    sae = build_sae(arch, 8, 32, k=2, k_aux=3, aux_coeff=0.5, dead_tokens_threshold=10, **extra)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 4, 5, 9, 20, 31]] = True
    sae.tokens_since_fired[dead] = 10
    x = torch.randn(3, 4, 8, requires_grad=True)  # stands in for upstream activations
    target = torch.randn(3, 4, 8)
    out, c = sae(x)
    aux = sae.aux_losses(SAEActs(x, c, out), target)["auxk"]

    w, b = enc(sae).weight.detach(), enc(sae).bias.detach()
    pre = x.detach() @ w[dead].T + b[dead]
    vals, idx = pre.topk(3, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
    w_dec = sae.decoder.weight.detach()[:, dead]
    recon = z @ (w_dec / w_dec.norm(dim=0, keepdim=True)).T
    torch.testing.assert_close(aux, 0.5 * F.mse_loss(recon, (target - out).detach()))

    aux.backward()
    assert x.grad is None  # nothing flows upstream
    enc_w, enc_b, dec_w = (
        enc(sae).weight.grad,
        enc(sae).bias.grad,
        sae.decoder.weight.grad,
    )
    assert enc_w is not None and enc_b is not None and dec_w is not None
    assert (enc_w[~dead] == 0).all() and (enc_b[~dead] == 0).all() and (dec_w[:, ~dead] == 0).all()
    assert (enc_w[dead] != 0).any() and (dec_w[:, dead] != 0).any()
    assert sae.decoder.bias.grad is None or (sae.decoder.bias.grad == 0).all()

    sae.tokens_since_fired.zero_()  # nothing dead: AuxK is 0
    assert float(sae.aux_losses(SAEActs(x, c, out), target)["auxk"]) == 0.0


def test_auxk_in_a_spliced_model_gives_no_gradient_upstream() -> None:
    model = SAETransformer(
        tiny_model(),
        ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"],
        2.0,
        architecture="topk",
        architecture_kwargs={"k": 4, "dead_tokens_threshold": 1},
    )
    later = model.sae("blocks.1.hook_resid_pre")
    later.tokens_since_fired.fill_(1)  # every latent of the later SAE is dead
    tokens = torch.randint(0, TINY_TLENS["d_vocab"], (2, 8))
    _, acts = model.forward(tokens)
    a = acts["blocks.1.hook_resid_pre"]
    assert isinstance(a, SAEActs) and a.input.requires_grad  # it depends on the earlier SAE
    aux = later.aux_losses(a)["auxk"]
    assert float(aux.detach()) > 0
    aux.backward()
    earlier = model.sae("blocks.0.hook_resid_pre")
    assert all(p.grad is None for p in earlier.parameters())
    assert all(p.grad is None for p in model.tlens_model.parameters())
    assert enc(later).weight.grad is not None


# --- transcoders ----------------------------------------------------------------------------------
def test_transcoder_replaces_its_output_hook_and_leaves_its_input_hook() -> None:
    out_hook = "blocks.0.mlp.hook_post"  # d_mlp = 64 wide, read from the d_model = 32 LN output
    model = SAETransformer(tiny_model(), [], 2.0, transcoders=[(TC_IN, out_hook)])
    sae = model.sae(out_hook)
    assert (sae.input_size, sae.output_size) == (32, 64)
    tokens = torch.randint(0, TINY_TLENS["d_vocab"], (2, 8))
    watch = [TC_IN, "blocks.0.hook_mlp_out"]
    clean_logits, clean = model.forward_raw(tokens, cache_positions=[*watch, out_hook])
    with torch.no_grad():
        logits, acts = model.forward(tokens, cache_positions=watch)
    tc = acts[out_hook]
    assert isinstance(tc, SAEActs)
    torch.testing.assert_close(tc.input, clean[TC_IN])  # reads the clean input hook...
    torch.testing.assert_close(acts[TC_IN].input, clean[TC_IN])  # ...and leaves it as it was
    tl = model.tlens_model
    params = (
        dict(tl.named_parameters()) if HAS_HOOKED else native.from_native(tl, native.FIELDS[tl])
    )
    w_out, b_out = params["blocks.0.mlp.W_out"], params["blocks.0.mlp.b_out"]
    # the MLP continues from the transcoder's output instead of its own hook_post
    want_mlp_out = tc.output @ w_out + b_out
    torch.testing.assert_close(acts["blocks.0.hook_mlp_out"].input, want_mlp_out)
    assert not torch.allclose(tc.output, clean[out_hook])
    assert logits is not None and clean_logits is not None
    assert not torch.allclose(logits, clean_logits)

    # local training compares the output with the clean activation of the replaced hook
    plan = make_plan(model, LossConfigs.model_validate({"out_to_in": {"coeff": 1.0}}))
    inputs = run_forward(model, tokens, plan)
    got = OutToInLoss(1.0)(inputs)
    torch.testing.assert_close(got, F.mse_loss(inputs.sae_acts[out_hook].output, clean[out_hook]))
    torch.testing.assert_close(inputs.target(out_hook), clean[out_hook])
    # e2e: the fast forward path splices the transcoder in as the TransformerLens path does
    plan = make_plan(model, LossConfigs.model_validate({"logits_kl": {"coeff": 1.0}}))
    with torch.no_grad():
        fast, ref = (run_forward(model, tokens, plan, reference=r) for r in (False, True))
        kl_fast, kl_ref = LogitsKLLoss(1.0)(fast), LogitsKLLoss(1.0)(ref)
    assert float(kl_ref) > 0
    torch.testing.assert_close(kl_fast, kl_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.sae_acts[out_hook].output, tc.output, rtol=1e-4, atol=1e-5)


def test_transcoder_config_errors() -> None:
    with pytest.raises(ConfigError, match="matches 3 hooks"):
        SAETransformer(tiny_model(), [], 1.0, transcoders=[("ln2.hook_normalized", TC_OUT)])
    with pytest.raises(ConfigError, match="runs after output"):
        SAETransformer(tiny_model(), [], 1.0, transcoders=[("blocks.1.hook_resid_pre", TC_OUT)])


# --- every architecture under every loss, then save / load ----------------------------------------
@pytest.mark.parametrize("kind", ["local", "e2e", "e2e_ds"])
# (clt: a cross-layer transcoder over a transcoder set, tests/test_transcoder_sets.py)
@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - {"clt"}))
def test_trains_under_each_loss_and_round_trips(
    arch: str, kind: str, config_dict, tmp_path: Path
) -> None:
    saes = {
        "sae_positions": [SAE_POS],
        "transcoders": [{"input": TC_IN, "output": TC_OUT}],
        "dict_size_to_input_ratio": 2.0,
        "architecture": arch,
        **ARCH_SAES[arch],
    }
    cfg = load_config(config_dict(loss=losses_for(arch, kind), saes=saes))
    t = setup(cfg, device="cpu")
    before = {k: v.clone() for k, v in t.model.saes.state_dict().items()}
    batches = t.batches(cfg.train_data, cfg.seed)
    state = TrainState()
    t.model.train()
    values = {}
    for _ in range(3):
        values = t.train_step(batches, state)
    assert all(math.isfinite(v) for v in values.values())
    after = t.model.saes.state_dict()
    for pos in (SAE_POS, TC_OUT):
        key = sae_key(pos)
        assert not torch.equal(before[f"{key}.encoder.0.weight"], after[f"{key}.encoder.0.weight"])
        if arch in TOPK_FAMILY:
            assert values[f"auxk/{pos}"] > 0  # latents went dead after 16 tokens; AuxK acts
        if arch == "jumprelu":
            assert not torch.equal(before[f"{key}.log_threshold"], after[f"{key}.log_threshold"])
        if arch == "gated":
            assert values[f"gated_aux/{pos}"] > 0
            for name in ("r_mag", "b_mag", "encoder.0.bias"):
                assert not torch.equal(before[f"{key}.{name}"], after[f"{key}.{name}"]), name

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, cfg)
    ckpt = save_checkpoint(run_dir, t.model, state.n_samples)
    init_kwargs = json.loads(tensor_metadata(ckpt)["init_kwargs"])
    assert init_kwargs[SAE_POS] == t.model.sae(SAE_POS).build_kwargs()
    loaded = SAETransformer.from_local_path(run_dir, device="cpu")
    assert loaded.sites == t.model.sites
    for k, v in loaded.saes.state_dict().items():
        assert torch.equal(v, after[k]), k
    tokens = next(batches)
    t.model.eval()
    loaded.eval()
    with torch.no_grad():
        logits_a, acts_a = t.model.forward(tokens)
        logits_b, acts_b = loaded.forward(tokens)
    assert logits_a is not None and logits_b is not None
    assert torch.equal(logits_a, logits_b)
    for pos in (SAE_POS, TC_OUT):
        a, b = acts_a[pos], acts_b[pos]
        assert isinstance(a, SAEActs) and isinstance(b, SAEActs)
        assert torch.equal(a.c, b.c) and torch.equal(a.output, b.output)


# --- init options ---------------------------------------------------------------------------------
def test_geometric_median_against_direct_conditions() -> None:
    pts = torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]])
    assert float(geometric_median(pts)) == pytest.approx(2.0, abs=1e-4)  # 1-D: the median
    torch.manual_seed(0)
    pts = torch.cat([torch.randn(200, 5), torch.full((20, 5), 50.0)])  # 10% far outliers
    m = geometric_median(pts).double()
    diffs = pts.double() - m
    # optimality: the unit vectors from the median to the points sum to ~0
    assert float((diffs / diffs.norm(dim=-1, keepdim=True)).sum(0).norm()) < 1e-3
    cost = lambda y: float((pts.double() - y).norm(dim=-1).sum())  # noqa: E731
    assert cost(m) < cost(pts.double().mean(0))
    assert float(m.norm()) < 1.0  # robust: the outliers barely move it


@pytest.mark.parametrize("method", ["mean", "geometric_median"])
def test_init_b_dec_and_tied_init_from_config(method: str, config_dict, token_data: Path) -> None:
    tc = {"input": TC_IN, "output": "blocks.0.mlp.hook_post"}
    tied = method == "mean"
    # tying needs equal input and output sizes, so no 32 -> 64 transcoder then
    saes: dict[str, Any] = {"sae_positions": [SAE_POS], "transcoders": [] if tied else [tc]}
    base = setup(load_config(config_dict(saes=saes)), device="cpu").model  # same initial weights
    cfg = load_config(config_dict(saes={**saes, "init_b_dec": method, "tied_init": tied}))
    t = setup(cfg, device="cpu")
    model = t.model
    first = next(t.batches(cfg.train_data, cfg.seed))  # the sample the init used
    hooks = [SAE_POS, TC_IN, tc["output"]]
    _, acts = model.forward_raw(first, run_entire_model=False, cache_positions=hooks)

    def center(a: torch.Tensor) -> torch.Tensor:
        flat = a.reshape(-1, a.shape[-1])
        return flat.mean(0) if method == "mean" else geometric_median(flat)

    pairs = [(SAE_POS, acts[SAE_POS], acts[SAE_POS])]
    if not tied:
        pairs.append((tc["output"], acts[TC_IN], acts[tc["output"]]))
    for pos, inp, out in pairs:
        sae, ref = model.sae(pos), base.sae(pos)
        w = enc(sae).weight.detach()
        if tied:
            torch.testing.assert_close(w, F.normalize(ref.decoder.weight.detach(), dim=0).T)
        else:
            torch.testing.assert_close(w, enc(ref).weight.detach())
        torch.testing.assert_close(sae.decoder.bias.detach(), center(out))
        # the encoder sees the centred input: b_enc = b_enc0 - W_enc @ center(input)
        want_b = enc(ref).bias.detach() - w @ center(inp)
        torch.testing.assert_close(enc(sae).bias.detach(), want_b)


def test_tied_init_needs_equal_sizes(config_dict) -> None:
    tc = {"input": TC_IN, "output": "blocks.0.mlp.hook_post"}
    cfg = load_config(config_dict(saes={"transcoders": [tc], "tied_init": True}))
    with pytest.raises(ConfigError, match="saes.tied_init"):
        setup(cfg, device="cpu")


# --- local training, then KL fine-tuning of chosen SAEs ------------------------------------------
def test_local_then_kl_finetune_trains_only_the_chosen_saes(config_dict, tmp_path: Path) -> None:
    positions = ["blocks.0.hook_resid_pre", SAE_POS]
    saes = {"sae_positions": positions, "architecture": "batchtopk", "k": 4}
    stage1 = load_config(
        config_dict(
            saes=saes,
            loss={"out_to_in": {"coeff": 1.0}},
            run_name="local",
            n_samples=16,
            act_frequency_n_tokens=32,
        )
    )
    dir1 = train(stage1, progress=False)
    ckpt1 = load_file(str(list_checkpoints(dir1)[-1]))
    # dead counts are logged from the tracked tokens-since-fired, with the configured window
    last = [r for r in read_metrics(dir1) if "loss" in r][-1]
    for pos in positions:
        want = int((ckpt1[f"{sae_key(pos)}.tokens_since_fired"] >= 32).sum())
        assert last[f"dead_dict_elements/{pos}"] == want

    pattern = str(Path(stage1.save_dir or ".") / "local_*")  # the newest matching run
    finetune = {"pretrained_sae_paths": [pattern], "retrain_saes": [SAE_POS]}
    stage2 = load_config(
        config_dict(
            saes={**saes, **finetune},
            loss={"logits_kl": {"coeff": 1.0}},
            run_name="kl",
            n_samples=12,
            seed=1,
        )
    )
    t = setup(stage2, device="cpu")
    assert t.trainable == [SAE_POS]
    for pos in positions:  # both start from the stage-1 weights
        for k, v in t.model.sae(pos).state_dict().items():
            assert torch.equal(v, ckpt1[f"{sae_key(pos)}.{k}"])
    frozen = t.model.sae(positions[0])
    assert not any(p.requires_grad for p in frozen.parameters())

    dir2 = train(stage2, progress=False)
    ckpt2 = load_file(str(list_checkpoints(dir2)[-1]))
    for name in ("encoder.0.weight", "encoder.0.bias", "decoder.bias", "threshold"):
        # the frozen SAE ran as at inference: weights and learned threshold untouched
        key0, key1 = f"{sae_key(positions[0])}.{name}", f"{sae_key(SAE_POS)}.{name}"
        assert torch.equal(ckpt2[key0], ckpt1[key0])
        assert not torch.equal(ckpt2[key1], ckpt1[key1])
    key0 = f"{sae_key(positions[0])}.decoder.weight"  # forward writes no weight
    assert torch.equal(ckpt2[key0], ckpt1[key0])

    everything = load_config(config_dict(saes={**saes, **finetune, "retrain_saes": True}))
    assert setup(everything, device="cpu").trainable == positions
    nothing = load_config(config_dict(saes={**saes, **finetune, "retrain_saes": False}))
    with pytest.raises(UserError, match="retrain_saes"):
        setup(nothing, device="cpu")


def test_example_configs_validate() -> None:
    root = Path(__file__).resolve().parent.parent / "configs"
    files = [root / "topk_e2e.yaml", *sorted((root / "local_then_kl_finetune").glob("*.yaml"))]
    assert len(files) == 3
    for f in files:
        cfg = load_config(f)
        assert cfg.saes.architecture == "topk" and cfg.loss.sparsity is None
    stage1, stage2 = (load_config(f) for f in files[1:])
    assert stage2.saes.pretrained_sae_paths and stage1.run_name
    assert str(stage2.saes.pretrained_sae_paths[0]).endswith(f"{stage1.run_name}_*")
    assert stage2.n_samples and stage1.n_samples and stage2.n_samples < stage1.n_samples


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_center_input_makes_the_encoder_see_centred_inputs(arch: str) -> None:
    """After `center_input_(m)`, every architecture encodes x as it encoded x - m before."""
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"k": 3} if arch in TOPK_FAMILY else {}
    if arch == "matryoshka":
        kwargs["matryoshka_widths"] = [4, 12]
    sae = build_sae(arch, 6, 12, **kwargs)
    with torch.no_grad():
        for p in sae.parameters():  # non-trivial biases and magnitude scales
            p.add_(0.1 * torch.randn_like(p))
    sae.eval()
    x, m = torch.randn(5, 6), torch.randn(6)
    want = sae.encode(x - m).detach()
    sae.center_input_(m)
    torch.testing.assert_close(sae.encode(x).detach(), want)
