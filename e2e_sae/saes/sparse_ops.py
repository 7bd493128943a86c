"""TopK encode and decode that touch only the k selected latents per token (forward and backward).

With k of d_sae latents active, only the encoder's pre-activations need a dense GEMM (to pick the
top k). Everything else is done on the N*k selected (token, latent) pairs:

- `TopKSelect`: pre = x W_enc^T + b_enc, then topk. Backward: grad pre is non-zero only at the
  selected entries, so grad W_enc / grad b_enc are scatter-adds of k rows per token (a sparse
  [d_sae, N] @ [N, d_in] product) and grad x = sum_j gval[t, j] W_enc[idx[t, j]].
- `SparseDecode`: out[t] = sum_j vals[t, j] W_dec[:, idx[t, j]] + b_dec (`F.embedding_bag` over
  the rows of W_dec^T). Backward: grad vals[t, j] = <grad_out[t], W_dec[:, idx[t, j]]>,
  grad W_dec = scatter-add of vals[t, j] * grad_out[t] into column idx[t, j].

Same math as the dense path (up to float summation order). The sparse products run in the
parameters' dtype with autocast off; outputs take the dtype the dense path would give (the
pre-activations' dtype, bf16 under bf16 autocast).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from e2e_sae.saes.base import NORM_EPS


def _no_autocast(t: Tensor) -> torch.autocast:
    return torch.autocast(t.device.type, enabled=False)


def gather_sum(idx: Tensor, weights: Tensor, table: Tensor) -> Tensor:
    """[N, d]: out[t] = sum_j weights[t, j] * table[idx[t, j]], for idx, weights [N, k] and a
    contiguous table [n_rows, d]; never materialises table[idx] ([N, k, d])."""
    return F.embedding_bag(idx, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def gathered_dots(idx: Tensor, g: Tensor, table: Tensor) -> Tensor:
    """[N, k]: <g[t], table[idx[t, j]]>.

    This is the gradient of `gather_sum` w.r.t. its weights, so it is taken from embedding_bag's
    own backward (a fused kernel on CPU and CUDA), again without the [N, k, d] gather.
    """
    w = torch.ones(idx.shape, dtype=table.dtype, device=table.device, requires_grad=True)
    with torch.enable_grad():
        out = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
    (grad,) = torch.autograd.grad(out, w, g.to(out.dtype))
    return grad


def scatter_outer(idx: Tensor, weights: Tensor, y: Tensor, n_rows: int) -> Tensor:
    """[n_rows, d]: row r = sum over (t, j) with idx[t, j] == r of weights[t, j] * y[t].

    That is S^T @ y for the sparse [N, n_rows] matrix S holding `weights` at (t, idx[t, j]); done
    as one sparse-dense product (no [N*k, d] temporary of outer products).
    """
    n, k = idx.shape
    tokens = torch.arange(n, device=idx.device).repeat_interleave(k)
    s_t = torch.sparse_coo_tensor(
        torch.stack([idx.reshape(-1), tokens]),
        weights.reshape(-1).to(y.dtype),
        (n_rows, n),
        check_invariants=False,  # in range by construction; torch.sparse.mm coalesces
    )
    return torch.sparse.mm(s_t, y)


def scatter_outer_t(idx: Tensor, weights: Tensor, y: Tensor, n_cols: int) -> Tensor:
    """[d, n_cols] = `scatter_outer(idx, weights, y, n_cols).T`, contiguous.

    Computed as y^T @ S with S in CSR (its rows are the tokens: no sort), which avoids a
    transposed copy of the [n_cols, d] result; where a backend lacks strided @ CSR products
    (not documented for every device) it falls back to the COO product and a transpose.
    """
    n, k = idx.shape
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    with warnings.catch_warnings():  # "CSR support is in beta": one product, valid indices
        warnings.simplefilter("ignore", UserWarning)
        s = torch.sparse_csr_tensor(
            crow,
            idx.reshape(-1),
            weights.reshape(-1).to(y.dtype),
            (n, n_cols),
            check_invariants=False,
        )
    try:
        return y.t() @ s
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError):
        return scatter_outer(idx, weights, y, n_cols).t().contiguous()


class TopKSelect(torch.autograd.Function):
    """(x [N, d_in], W_enc [d_sae, d_in], b_enc [d_sae], k) -> (vals [N, k], idx [N, k]):
    the k largest pre-activations of each token (unsorted, as `Tensor.topk(sorted=False)`)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor, k: int) -> Any:
        pre = F.linear(x, weight, bias)  # under autocast when the caller is: as the dense path
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, weight, idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_vals: Tensor, _g_idx: Tensor | None) -> Any:
        x, weight, idx = ctx.saved_tensors
        g = g_vals.to(weight.dtype)
        gx = gw = gb = None
        with _no_autocast(g):
            if ctx.needs_input_grad[0]:
                gx = gather_sum(idx, g, weight).to(x.dtype)
            if ctx.needs_input_grad[1]:
                gw = scatter_outer(idx, g, x.to(weight.dtype), weight.shape[0])
            if ctx.needs_input_grad[2]:
                gb = torch.zeros_like(weight[:, 0]).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return gx, gw, gb, None


class SparseDecode(torch.autograd.Function):
    """(vals [N, k], idx [N, k], W_dec [d_out, d_sae], b_dec [d_out], unit) -> out [N, d_out]
    = sum_j vals[t, j] D[:, idx[t, j]] + b_dec: the dense decode of the code that holds `vals`
    at `idx` and zeros elsewhere, with D = W_dec, or with `unit` its columns normalised to unit
    norm (the original's parameterisation), D = W_dec * s, s_j = 1 / ||W_dec[:, j]||.

    With `unit` no normalised copy of W_dec is formed: the selected values are scaled by s[idx].
    Backward: grad W_j = sum_t g_t vals_tj s_j (the scatter, with scaled values) - s_j^3 W_j
    sum_t vals_tj <g_t, W_j> (through s_j), the second term one in-place pass over the gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, vals: Tensor, idx: Tensor, weight: Tensor, bias: Tensor, unit: bool
    ) -> Any:
        with _no_autocast(vals):
            w_t = weight.t().contiguous()  # raw dictionary elements as rows: [d_sae, d_out]
            scale = None
            v = vals.to(w_t.dtype)
            if unit:
                scale = torch.linalg.vector_norm(w_t, dim=1).clamp_min(NORM_EPS).reciprocal()
                v = v * scale[idx]
            out = gather_sum(idx, v, w_t) + bias
        ctx.save_for_backward(vals, idx, w_t, scale, weight if unit else None)
        ctx.d_sae = weight.shape[1]
        return out.to(vals.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_out: Tensor) -> Any:
        vals, idx, w_t, scale, weight = ctx.saved_tensors
        g = g_out.to(w_t.dtype)
        g_vals = gw = gb = None
        with _no_autocast(g):
            dots = None  # <g_t, W_idx> of the raw columns, [N, k]
            if ctx.needs_input_grad[0] or (ctx.needs_input_grad[2] and scale is not None):
                dots = gathered_dots(idx, g, w_t)
            if ctx.needs_input_grad[0]:
                assert dots is not None
                g_vals = (dots if scale is None else dots * scale[idx]).to(vals.dtype)
            if ctx.needs_input_grad[2]:
                v = vals.to(w_t.dtype)
                if scale is None:
                    gw = scatter_outer_t(idx, v, g, ctx.d_sae)
                else:
                    assert dots is not None
                    gw = scatter_outer_t(idx, v * scale[idx], g, ctx.d_sae)
                    flat_idx, flat_vd = idx.reshape(-1), (v * dots).reshape(-1)
                    d_scale = torch.zeros_like(scale).index_add_(0, flat_idx, flat_vd)
                    gw.addcmul_(weight.to(gw.dtype), (-d_scale * scale.pow(3))[None, :])
            if ctx.needs_input_grad[3]:
                gb = g.sum(0)
        return g_vals, None, gw, gb, None


def sparse_topk_forward(
    x: Tensor,
    enc_weight: Tensor,
    enc_bias: Tensor,
    dec_weight: Tensor,
    dec_bias: Tensor,
    k: int,
    activation: Callable[[Tensor], Tensor],
    unit_columns: bool = False,
) -> tuple[Tensor, Tensor]:
    """TopK SAE forward on x [..., d_in] -> (output [..., d_out], dense code c [..., d_sae]).

    `activation` maps the selected pre-activations [N, k] to code values (TopK's ReLU variant);
    c is built by scattering them, so a loss on c sends its gradient to the same values.
    `unit_columns`: decode with W_dec's columns normalised to unit norm (see `SparseDecode`).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    raw, idx = TopKSelect.apply(x2, enc_weight, enc_bias, k)
    vals = activation(raw)
    c = torch.zeros(
        x2.shape[0], enc_weight.shape[0], dtype=vals.dtype, device=vals.device
    ).scatter_(-1, idx, vals)  # in place: no copy of the zeros
    out = SparseDecode.apply(vals, idx, dec_weight, dec_bias, unit_columns)
    return out.reshape(*lead, dec_weight.shape[0]), c.reshape(*lead, enc_weight.shape[0])
