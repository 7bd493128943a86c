"""TopK SAE sparse path (`saes/sparse_ops.py`): values and gradients against a dense computation
written out here (pre-activations, topk, scatter, decode with the normalised decoder)."""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TLENS
from torch import Tensor, nn

from e2e_sae import SAETransformer
from e2e_sae.lm.load import build_random_model
from e2e_sae.saes import BatchTopKSAE, SAEActs, TopKSAE
from e2e_sae.saes.sparse_ops import scatter_outer, scatter_outer_t
from e2e_sae.saes.topk import SPARSE_MAX_DENSITY


def make_sae(d_in: int, d_sae: int, k: int, d_out: int | None = None, seed: int = 0) -> TopKSAE:
    """A TopK SAE on the sparse path, with decoder columns far from unit norm and non-zero
    biases (decoding must normalise the columns in the graph; every parameter gets a gradient)."""
    torch.manual_seed(seed)
    sae = TopKSAE(d_in, d_sae, output_size=d_out, k=k)
    sae.sparse_max_density = 1.0
    with torch.no_grad():
        sae.decoder.weight.mul_(torch.rand(d_sae) * 2 + 0.5)
        sae.decoder.bias.normal_()
        cast(nn.Linear, sae.encoder[0]).bias.normal_(std=0.1)
    return sae


def dense_reference(
    params: dict[str, Tensor], x: Tensor, k: int, sparsity: bool, proj: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(output, c, loss) of the dense TopK computation on leaf tensors `params`.

    As the original library: the dictionary is W_dec / ||W_dec column||, inside the graph, so
    the raw weight's gradient has no radial part.
    """
    pre = x @ params["enc_w"].T + params["enc_b"]
    vals, idx = pre.topk(k, dim=-1)
    kept = F.relu(vals).clamp_min(torch.finfo(vals.dtype).tiny)
    c = torch.zeros_like(pre).scatter(-1, idx, kept)
    dict_elements = params["dec_w"] / params["dec_w"].norm(dim=0, keepdim=True)
    out = c @ dict_elements.T + params["dec_b"]
    return out, c, loss_of(out, c, sparsity, proj)


def loss_of(out: Tensor, c: Tensor, sparsity: bool, proj: Tensor) -> Tensor:
    loss = (out.float() * proj).sum()
    if sparsity:  # the `sparsity` term's ||c||_1 per token
        loss = loss + 0.3 * torch.norm(c.float(), p=1, dim=-1).sum()
    return loss


def leaf_params(sae: TopKSAE) -> dict[str, Tensor]:
    enc = cast(nn.Linear, sae.encoder[0])
    tensors = {
        "enc_w": enc.weight,
        "enc_b": enc.bias,
        "dec_w": sae.decoder.weight,
        "dec_b": sae.decoder.bias,
    }
    return {n: t.detach().clone().requires_grad_() for n, t in tensors.items()}


def sae_grads(sae: TopKSAE) -> dict[str, Tensor | None]:
    enc = cast(nn.Linear, sae.encoder[0])
    return {
        "enc_w": enc.weight.grad,
        "enc_b": enc.bias.grad,
        "dec_w": sae.decoder.weight.grad,
        "dec_b": sae.decoder.bias.grad,
    }


def assert_grad_close(got: Tensor | None, want: Tensor | None) -> None:
    assert got is not None and want is not None
    scale = float(want.abs().max()) + 1e-30
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * scale)


CASES = [  # (x shape, d_sae, k, d_out)
    ((4, 7, 16), 96, 3, None),
    ((2, 5, 24), 200, 8, None),
    ((33, 12), 64, 1, None),
    ((3, 4, 10), 80, 5, 14),  # transcoder: output size != input size
    ((12,), 40, 4, None),  # a single token
]


@pytest.mark.parametrize("sparsity", [False, True], ids=["no-sparsity", "sparsity"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-const", "x-grad"])
@pytest.mark.parametrize(("shape", "d_sae", "k", "d_out"), CASES)
def test_sparse_path_matches_dense_values_and_gradients(
    shape: tuple[int, ...], d_sae: int, k: int, d_out: int | None, sparsity: bool, x_grad: bool
) -> None:
    sae = make_sae(shape[-1], d_sae, k, d_out)
    params = leaf_params(sae)
    torch.manual_seed(1)
    x = torch.randn(shape)
    proj = torch.randn((*shape[:-1], d_out or shape[-1]))
    x_sparse = x.clone().requires_grad_(x_grad)
    x_dense = x.clone().requires_grad_(x_grad)

    assert sae.uses_sparse_path()
    out, c = sae(x_sparse)
    loss_of(out, c, sparsity, proj).backward()
    out_want, c_want, loss_want = dense_reference(params, x_dense, k, sparsity, proj)
    loss_want.backward()

    assert out.shape == out_want.shape and c.shape == c_want.shape
    torch.testing.assert_close(out, out_want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, c_want, rtol=1e-5, atol=0)
    assert int((c != 0).sum(-1).min()) == k == int((c != 0).sum(-1).max())
    # forward wrote no parameter (the raw decoder columns keep their norms)
    assert torch.equal(sae.decoder.weight.detach(), params["dec_w"].detach())
    for name, got in sae_grads(sae).items():
        assert_grad_close(got, params[name].grad)
    if x_grad:
        assert_grad_close(x_sparse.grad, x_dense.grad)
    else:
        assert x_sparse.grad is None


def test_selected_latents_with_negative_pre_acts_get_no_gradient() -> None:
    """All pre-activations < 0: the code keeps k tiny values, and nothing reaches the encoder."""
    sae = make_sae(8, 48, 4)
    with torch.no_grad():
        cast(nn.Linear, sae.encoder[0]).bias.fill_(-100.0)
    params = leaf_params(sae)
    x = torch.randn(6, 8)
    proj = torch.randn(6, 8)
    out, c = sae(x)
    loss_of(out, c, True, proj).backward()
    _, c_want, loss_want = dense_reference(params, x, 4, True, proj)
    loss_want.backward()
    assert int((c != 0).sum(-1).min()) == 4 and float(c.detach().max()) < 1e-30
    torch.testing.assert_close(c, c_want, rtol=0, atol=0)
    grads = sae_grads(sae)
    assert grads["enc_w"] is not None and not grads["enc_w"].any()
    assert grads["enc_b"] is not None and not grads["enc_b"].any()
    assert_grad_close(grads["dec_b"], params["dec_b"].grad)


def test_default_threshold_picks_the_path() -> None:
    assert TopKSAE(576, 4608, k=32).uses_sparse_path()
    assert not TopKSAE(576, 4608, k=1024).uses_sparse_path()
    d_sae = 1000
    k_edge = int(SPARSE_MAX_DENSITY * d_sae)
    assert TopKSAE(8, d_sae, k=k_edge).uses_sparse_path()
    assert not TopKSAE(8, d_sae, k=k_edge + 1).uses_sparse_path()
    assert not BatchTopKSAE(576, 4608, k=32).uses_sparse_path()  # variable count per token

    def ops_in_graph(t: Tensor) -> set[str]:
        seen, todo = set(), [t.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is not None and type(fn).__name__ not in seen:
                seen.add(type(fn).__name__)
                todo += [f for f, _ in fn.next_functions]
        return seen

    x = torch.randn(3, 8)
    assert "SparseDecodeBackward" in ops_in_graph(TopKSAE(8, d_sae, k=k_edge)(x)[0])
    assert "SparseDecodeBackward" not in ops_in_graph(TopKSAE(8, d_sae, k=k_edge + 1)(x)[0])


def test_scatter_outer_helpers_match_a_dense_product() -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 30, (9, 4))  # repeated indices within and across rows
    w = torch.randn(9, 4)
    y = torch.randn(9, 5)
    s = torch.zeros(9, 30).index_put_(
        (torch.arange(9).repeat_interleave(4), idx.reshape(-1)), w.reshape(-1), accumulate=True
    )
    torch.testing.assert_close(scatter_outer(idx, w, y, 30), s.T @ y)
    got_t = scatter_outer_t(idx, w, y, 30)
    assert got_t.is_contiguous()
    torch.testing.assert_close(got_t, (s.T @ y).T)


def test_no_grad_empty_and_repeated_forwards() -> None:
    sae = make_sae(10, 64, 3)
    dense = copy.deepcopy(sae)
    dense.sparse_max_density = 0.0
    x = torch.randn(5, 10)
    with torch.no_grad():
        out, c = sae(x)
        out_d, c_d = dense(x)
    torch.testing.assert_close(out, out_d)
    torch.testing.assert_close(c, c_d)
    out_e, c_e = sae(torch.randn(0, 10))
    assert out_e.shape == (0, 10) and c_e.shape == (0, 64)
    # two forwards in one graph before a backward (nothing shared between calls)
    x2 = torch.randn(4, 10)
    for m in (sae, dense):
        a, ca = m(x)
        b, _ = m(x2)
        (a.sum() + 2 * b.sum() + ca.sum()).backward()
    for name, got in sae_grads(sae).items():
        assert_grad_close(got, sae_grads(dense)[name])


def test_bf16_autocast_dtypes_and_values_follow_the_dense_path() -> None:
    sae = make_sae(16, 128, 4)
    dense = copy.deepcopy(sae)
    dense.sparse_max_density = 0.0
    fp32 = copy.deepcopy(sae)
    x = torch.randn(6, 16)
    proj = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, c = sae(x)
        out_d, c_d = dense(x)
    out32, _ = fp32(x)
    assert out.dtype == out_d.dtype == torch.bfloat16 and c.dtype == c_d.dtype == torch.bfloat16
    torch.testing.assert_close(c, c_d)  # same selection, same bf16 values
    torch.testing.assert_close(out.float(), out_d.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), out32, rtol=2e-2, atol=2e-2)
    loss_of(out, c, True, proj).backward()
    loss_of(out_d, c_d, True, proj).backward()
    for name, got in sae_grads(sae).items():
        want = sae_grads(dense)[name]
        assert got is not None and want is not None and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * float(want.abs().max()))


def test_auxk_from_sparse_path_acts_matches_dense() -> None:
    sae = make_sae(8, 96, 2)
    sae.k_aux, sae.aux_coeff, sae.dead_tokens_threshold = 3, 0.5, 4
    with torch.no_grad():
        sae.tokens_since_fired[::3] = 10  # a third of the latents are dead
    dense = copy.deepcopy(sae)
    dense.sparse_max_density = 0.0
    x = torch.randn(2, 5, 8)
    target = torch.randn(2, 5, 8)
    aux = {}
    for name, m in (("sparse", sae), ("dense", dense)):
        out, c = m(x)
        aux[name] = m.aux_losses(SAEActs(x, c, out), target)["auxk"]
        (aux[name] + (out * target).sum()).backward()
    assert float(aux["sparse"].detach()) > 0
    torch.testing.assert_close(aux["sparse"], aux["dense"], rtol=1e-5, atol=0)
    for name, got in sae_grads(sae).items():
        assert_grad_close(got, sae_grads(dense)[name])


def test_two_spliced_saes_backpropagate_through_the_later_input() -> None:
    """e2e with two SAEs: the later SAE's input depends on the earlier one, so the sparse path's
    input gradient carries the KL-like loss back into the earlier SAE."""
    positions = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    tl = build_random_model(TINY_TLENS, device="cpu").train()
    kwargs: dict[str, Any] = {"architecture": "topk", "architecture_kwargs": {"k": 3}}
    sparse = SAETransformer(tl, positions, 8.0, **kwargs)  # d_sae 256: k / d_sae ~ 0.012
    dense = copy.deepcopy(sparse)
    for pos in positions:
        assert cast(TopKSAE, sparse.sae(pos)).uses_sparse_path()
        cast(TopKSAE, dense.sae(pos)).sparse_max_density = 0.0
    tokens = torch.randint(0, TINY_TLENS["d_vocab"], (2, 8))
    for model in (sparse, dense):
        logits, acts = model.forward(tokens)
        assert logits is not None
        later = acts[positions[1]]
        assert isinstance(later, SAEActs) and later.input.requires_grad
        logits.logsumexp(-1).mean().backward()
    for pos in positions:
        got, want = (
            sae_grads(cast(TopKSAE, sparse.sae(pos))),
            sae_grads(cast(TopKSAE, dense.sae(pos))),
        )
        for name in got:
            assert_grad_close(got[name], want[name])
