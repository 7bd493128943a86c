"""A lean forward pass over a frozen HookedTransformer's weights (the training fast path).

It computes the same function as TransformerLens' forward (checked numerically when it is built),
but cheaper on a CPU: TransformerLens re-lays out every weight matrix on every call
(`W.T.contiguous()`, einops rearranges: a copy of the whole model per pass), adds all-zero biases,
and runs attention as a dozen separate ops. Here Q, K and V are laid out once as one fused matrix
(the other weights are used in place, as views), zero biases are skipped (adding 0.0 is exact),
attention is one fused `scaled_dot_product_attention` call, and only the hook points a step asks
for exist.

`precision="bf16"` keeps a bf16 copy of the weights and runs the matmuls and attention in bf16,
while the residual stream, the norms and everything after the unembedding stay fp32 (what
`torch.autocast` does, without re-casting the frozen weights on every call).

Supported: LN / LNPre / RMS / RMSPre, standard or rotary positions, grouped-query attention, gated
and plain MLPs, attention-only models. For anything else (or a numerical mismatch at build time),
`get_lean_lm` returns None and callers use TransformerLens.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

logger = logging.getLogger(__name__)

HookFn = Callable[..., Tensor]
"""TransformerLens hook signature: fn(activation, hook=HookPoint) -> activation."""

BLOCK_HOOKS = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "hook_mlp_out",
    "hook_resid_post",
)
_BLOCK_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class _Norm:
    kind: str  # "LN", "LNPre", "RMS", "RMSPre"
    w: Tensor | None
    b: Tensor | None
    eps: float

    def __call__(self, x: Tensor, hook: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        d = (x.shape[-1],)
        if hook is None:
            if self.kind.startswith("LN"):
                return F.layer_norm(x, d, self.w, self.b, self.eps)
            return F.rms_norm(x, d, self.w, self.eps)
        # A hook on `hook_normalized` sees the normalised input before the affine part.
        x = (
            F.layer_norm(x, d, None, None, self.eps)
            if self.kind.startswith("LN")
            else (F.rms_norm(x, d, None, self.eps))
        )
        x = hook(x)
        if self.w is not None:
            x = x * self.w
        if self.b is not None:
            x = x + self.b
        return x


@dataclass
class _Block:
    ln1: _Norm | None
    ln2: _Norm | None
    w_qkv: Tensor  # [(n_heads + 2 n_kv) d_head, d_model]
    b_qkv: Tensor | None
    w_o: Tensor  # [d_model, n_heads d_head]
    b_o: Tensor | None
    n_heads: int
    n_kv: int
    d_head: int
    scale: float  # multiplies q.k (1 / TransformerLens' attn_scale)
    mlp: _MLP | None


@dataclass
class _MLP:
    w_in: Tensor  # [d_mlp, d_model]
    b_in: Tensor | None
    w_gate: Tensor | None  # [d_mlp, d_model]
    w_out: Tensor  # [d_model, d_mlp]
    b_out: Tensor | None
    act: Callable[[Tensor], Tensor]


def _rope(x: Tensor, cos: Tensor, sin: Tensor, adjacent: bool) -> Tensor:
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    if adjacent:
        flip = torch.stack([-x_rot[..., 1::2], x_rot[..., ::2]], dim=-1).flatten(-2)
    else:
        half = rd // 2
        flip = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = x_rot * cos + flip * sin
    return out if x_pass.shape[-1] == 0 else torch.cat([out, x_pass], dim=-1)


def _attention(
    blk: _Block,
    h: Tensor,
    rope: tuple[Tensor, Tensor] | None,
    dtype: torch.dtype,
    adjacent: bool,
) -> Tensor:
    b, n, _ = h.shape
    nq, nkv, dh = blk.n_heads, blk.n_kv, blk.d_head
    qkv = F.linear(h.to(dtype), blk.w_qkv, blk.b_qkv).view(b, n, nq + 2 * nkv, dh)
    qk, v = qkv.split([nq + nkv, nkv], dim=2)
    if rope is not None:
        qk = _rope(qk, *rope, adjacent)  # queries and keys in one go: fewer, larger ops
    q, k = qk.split([nq, nkv], dim=2)
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        scale=blk.scale,
        enable_gqa=nkv != nq,
    )
    z = z.transpose(1, 2).reshape(b, n, nq * dh)
    return F.linear(z, blk.w_o, blk.b_o)


def _mlp(m: _MLP, h: Tensor, dtype: torch.dtype) -> Tensor:
    h = h.to(dtype)
    pre = F.linear(h, m.w_in, m.b_in if m.w_gate is None else None)
    if m.w_gate is not None:
        # TransformerLens: act(x W_gate) * (x W_in) + b_in
        post = m.act(F.linear(h, m.w_gate)) * pre
        if m.b_in is not None:
            post = post + m.b_in
    else:
        post = m.act(pre)
    return F.linear(post, m.w_out, m.b_out)


def _plain_block(
    blk: _Block,
    x: Tensor,
    rope: tuple[Tensor, Tensor] | None,
    dtype: torch.dtype,
    adjacent: bool,
) -> Tensor:
    """One block with no hook in it (what `LeanLM.compile` compiles)."""
    h = blk.ln1(x) if blk.ln1 is not None else x
    x = x + _attention(blk, h, rope, dtype, adjacent)
    if blk.mlp is None:
        return x
    h = blk.ln2(x) if blk.ln2 is not None else x
    return x + _mlp(blk.mlp, h, dtype)


def _nonzero(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """None for a missing or all-zero bias (adding zeros is exact, so skipping it is too)."""
    if t is None or not bool(t.detach().ne(0).any()):
        return None
    return t.detach().to(dtype)


def unsupported_reason(tl: HookedTransformer) -> str | None:
    """Why the lean pass cannot stand in for this model's forward (None if it can)."""
    cfg = tl.cfg
    checks: list[tuple[bool, str]] = [
        (cfg.normalization_type in ("LN", "LNPre", "RMS", "RMSPre"), "normalization_type"),
        (cfg.positional_embedding_type in ("standard", "rotary"), "positional_embedding_type"),
        (cfg.attention_dir == "causal", "attention_dir"),
        (cfg.dtype == torch.float32, "dtype"),
        (cfg.n_devices == 1, "n_devices"),
        (not cfg.parallel_attn_mlp, "parallel_attn_mlp"),
        (not cfg.use_split_qkv_input and not cfg.use_attn_in, "use_split_qkv_input/use_attn_in"),
        (not cfg.use_attn_result, "use_attn_result"),
        (not cfg.use_normalization_before_and_after, "use_normalization_before_and_after"),
        (not cfg.post_embedding_ln, "post_embedding_ln"),
        (not cfg.use_local_attn and not cfg.attn_types, "local attention"),
        (not cfg.use_qk_norm and cfg.clip_qkv is None, "qk norm / clip"),
        (not cfg.use_logn_attn and not cfg.use_dynamic_ntk_rope, "logn / dynamic NTK rope"),
        (not cfg.use_attention_sinks, "attention sinks"),
        ((cfg.attn_scores_soft_cap or -1) <= 0, "attn_scores_soft_cap"),
        ((cfg.output_logits_soft_cap or -1) <= 0, "output_logits_soft_cap"),
        (not cfg.num_experts, "mixture of experts"),
        (not cfg.load_in_4bit, "load_in_4bit"),
        (not cfg.is_layer_norm_activation(), "act_fn with a layer norm"),
    ]
    for ok, what in checks:
        if not ok:
            return what
    tok = getattr(tl, "tokenizer", None)
    if tok is not None and getattr(tok, "padding_side", "right") == "left":
        return "left-padding tokenizer (TransformerLens would mask pad tokens)"
    return None


class LeanLM:
    """The frozen LM's forward as plain tensor ops on weights laid out once.

    `run(x, start, hooks)` runs blocks `start..` on residual x [batch, pos, d_model] (or embeds
    tokens when `start == 0` and x is integer), applying `hooks` (name -> fn) at the supported
    `blocks.L.<BLOCK_HOOKS>` points; returns the final normalised residual, the unembedding's
    input. Gradients flow through activations only (the weights are detached copies/views).
    """

    def __init__(self, tl: HookedTransformer, precision: str = "fp32") -> None:
        # Weakly: the per-model cache below is keyed by the model, and a strong reference from
        # the value would keep every model alive.
        self._tl = weakref.ref(tl)
        self.cfg = tl.cfg
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.n_layers = tl.cfg.n_layers
        self.rotary = tl.cfg.positional_embedding_type == "rotary"
        self.adjacent = bool(tl.cfg.rotary_adjacent_pairs)
        self.compiled: Callable[..., Tensor] | None = None
        """`compile()`d hook-free blocks (None: eager)."""
        self._rope_cache: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self._versions = self._weight_versions()
        self._build()

    @property
    def tl(self) -> HookedTransformer:
        tl = self._tl()
        assert tl is not None, "the LM of this LeanLM was garbage-collected"
        return tl

    # --- construction --------------------------------------------------------------------------
    def _weight_versions(self) -> tuple[tuple[int, int], ...]:
        return tuple((p.data_ptr(), p._version) for p in self.tl.parameters())

    def is_stale(self) -> bool:
        """True when the LM's weights changed since the layout was built."""
        return self._weight_versions() != self._versions

    def _norm(self, mod: Any) -> _Norm | None:
        kind = self.cfg.normalization_type
        if mod is None or kind is None:
            return None
        w = getattr(mod, "w", None)
        b = getattr(mod, "b", None)
        # Norm weights stay fp32: the norms run on the fp32 residual stream.
        return _Norm(kind, None if w is None else w.detach(), _nonzero(b, torch.float32), mod.eps)

    def _build(self) -> None:
        tl, dt = self.tl, self.dtype
        cfg = tl.cfg
        cast: Callable[[Tensor], Tensor] = (
            (lambda t: t.detach()) if dt == torch.float32 else (lambda t: t.detach().to(dt))
        )
        self.w_e = tl.embed.W_E.detach()
        self.w_pos = (
            tl.pos_embed.W_pos.detach() if cfg.positional_embedding_type == "standard" else None
        )
        self.blocks: list[_Block] = []
        for blk in tl.blocks:
            attn: Any = blk.attn
            n_heads, d_head = cfg.n_heads, cfg.d_head
            w_k = getattr(attn, "_W_K", attn.W_K)
            w_v = getattr(attn, "_W_V", attn.W_V)
            b_k = getattr(attn, "_b_K", attn.b_K)
            b_v = getattr(attn, "_b_V", attn.b_V)
            n_kv = w_k.shape[0]
            # [heads, d_model, d_head] -> F.linear layout [(heads d_head), d_model]
            w_qkv = torch.cat(
                [w.detach().permute(0, 2, 1).reshape(-1, cfg.d_model) for w in (attn.W_Q, w_k, w_v)]
            ).to(dt)
            b_qkv = _nonzero(
                torch.cat([attn.b_Q.reshape(-1), b_k.reshape(-1), b_v.reshape(-1)]), dt
            )
            # [heads, d_head, d_model] -> [(heads d_head), d_model] is a view; F.linear takes its .T
            w_o = cast(attn.W_O.reshape(n_heads * d_head, cfg.d_model).T)
            mlp = None
            if not cfg.attn_only:
                m: Any = blk.mlp
                # F.linear takes W.T views (no copy); bf16 needs its own contiguous copies anyway.
                mlp = _MLP(
                    w_in=cast(m.W_in.T),
                    b_in=_nonzero(m.b_in, dt),
                    w_gate=cast(m.W_gate.T) if cfg.gated_mlp else None,
                    w_out=cast(m.W_out.T),
                    b_out=_nonzero(m.b_out, dt),
                    act=m.act_fn,
                )
            self.blocks.append(
                _Block(
                    ln1=self._norm(getattr(blk, "ln1", None)),
                    ln2=self._norm(getattr(blk, "ln2", None)) if not cfg.attn_only else None,
                    w_qkv=w_qkv,
                    b_qkv=b_qkv,
                    w_o=w_o,
                    b_o=_nonzero(attn.b_O, dt),
                    n_heads=n_heads,
                    n_kv=n_kv,
                    d_head=d_head,
                    scale=1.0 / float(attn.attn_scale),
                    mlp=mlp,
                )
            )
        self.ln_final = self._norm(getattr(tl, "ln_final", None))
        self.w_u = cast(tl.unembed.W_U.T)  # [d_vocab, d_model]
        self.b_u = _nonzero(tl.unembed.b_U, torch.float32)
        self.hook_points: dict[str, HookPoint] = dict(tl.hook_dict)

    # --- what it can do -------------------------------------------------------------------------
    def supports(self, hook_names: Sequence[str]) -> bool:
        for h in hook_names:
            m = _BLOCK_HOOK_RE.match(h)
            if not m or m.group(2) not in BLOCK_HOOKS or int(m.group(1)) >= self.n_layers:
                return False
            if self.cfg.attn_only and m.group(2) in (
                "hook_resid_mid",
                "ln2.hook_normalized",
                "hook_mlp_out",
            ):
                return False
        return True

    # --- the forward pass -----------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """Residual stream before block 0 [batch, pos, d_model] (fp32)."""
        x = self.w_e[tokens]
        if self.w_pos is not None:
            x = x + self.w_pos[: tokens.shape[1]]
        return x

    def run(
        self,
        x: Tensor,
        start: int = 0,
        hooks: Sequence[tuple[Any, HookFn]] = (),
        stop_at_layer: int | None = None,
    ) -> Tensor:
        """Blocks `start .. stop_at_layer-1` (default: all, then the final norm) on residual x.

        Returns the final normalised residual [batch, pos, d_model], or the residual before block
        `stop_at_layer`. A hook may end the pass early by raising (`runner.run_blocks`' stop).
        """
        if not x.is_floating_point():
            assert start == 0, "token input needs start=0"
            x = self.embed(x)
        by_name: dict[str, list[HookFn]] = {}
        for name, fn in hooks:
            assert isinstance(name, str), "the lean pass takes hook names, not filters"
            by_name.setdefault(name, []).append(fn)
        stop = self.n_layers if stop_at_layer is None else stop_at_layer
        for i in range(start, stop):
            x = self._block(i, x, by_name)
        if stop_at_layer is not None:
            return x
        return self.ln_final(x) if self.ln_final is not None else x

    def _hook(self, name: str, x: Tensor, by_name: dict[str, list[HookFn]]) -> Tensor:
        fns = by_name.get(name)
        if fns:
            hp = self.hook_points[name]
            for fn in fns:
                y = fn(x, hook=hp)
                # An SAE run under autocast returns bf16; the residual stream stays in its dtype.
                x = y if y.dtype == x.dtype else y.to(x.dtype)
        return x

    def _block(self, i: int, x: Tensor, by_name: dict[str, list[HookFn]]) -> Tensor:
        blk = self.blocks[i]
        p = f"blocks.{i}."
        rope = self._rotary(i, x.shape[1]) if self.rotary else None
        if self.compiled is not None and not any(k.startswith(p) for k in by_name):
            return self.compiled(blk, x, rope, self.dtype, self.adjacent)
        x = self._hook(p + "hook_resid_pre", x, by_name)
        h = self._normed(blk.ln1, p + "ln1.hook_normalized", x, by_name)
        attn_out = _attention(blk, h, rope, self.dtype, self.adjacent)
        attn_out = self._hook(p + "hook_attn_out", attn_out, by_name)
        if blk.mlp is None:
            return self._hook(p + "hook_resid_post", x + attn_out, by_name)
        x = self._hook(p + "hook_resid_mid", x + attn_out, by_name)
        h = self._normed(blk.ln2, p + "ln2.hook_normalized", x, by_name)
        mlp_out = self._hook(p + "hook_mlp_out", _mlp(blk.mlp, h, self.dtype), by_name)
        return self._hook(p + "hook_resid_post", x + mlp_out, by_name)

    def _normed(
        self, norm: _Norm | None, name: str, x: Tensor, by_name: dict[str, list[HookFn]]
    ) -> Tensor:
        if norm is None:
            return x
        if name in by_name:
            return norm(x, lambda t: self._hook(name, t, by_name))
        return norm(x)

    def _rotary(self, i: int, n: int) -> tuple[Tensor, Tensor]:
        """Block i's rotary tables for n positions, in the matmul dtype (cast once per length,
        not once per block and pass)."""
        cached = self._rope_cache.get((i, n))
        if cached is not None:
            return cached
        attn = self.tl.blocks[i].attn
        if n > attn.rotary_cos.shape[0]:
            attn._extend_rotary_embeddings(
                min(self.cfg.n_ctx, max(n, 2 * attn.rotary_cos.shape[0]))
            )
        cos = attn.rotary_cos[None, :n, None, :].to(self.dtype)
        sin = attn.rotary_sin[None, :n, None, :].to(self.dtype)
        self._rope_cache[(i, n)] = (cos, sin)
        return cos, sin

    def compile(self) -> None:
        """Run the blocks that a pass hooks nothing in through `torch.compile` (inductor): after
        the first SAE that is every block of the clean pass and, without downstream hooks, of
        the spliced one. One graph serves all blocks of a shape (the weights are its inputs)."""
        if self.compiled is None:
            self.compiled = torch.compile(_plain_block, dynamic=False)

    # --- the unembedding ------------------------------------------------------------------------
    def logits(self, final: Tensor) -> Tensor:
        """fp32 logits [..., d_vocab] from the final normalised residual."""
        out = F.linear(final.to(self.dtype), self.w_u).float()
        return out if self.b_u is None else out + self.b_u


# One layout per (model, precision), rebuilt if the model's weights change.
_CACHE: weakref.WeakKeyDictionary[HookedTransformer, dict[str, LeanLM | None]] = (
    weakref.WeakKeyDictionary()
)


def get_lean_lm(tl: HookedTransformer, precision: str = "fp32") -> LeanLM | None:
    """The lean forward for `tl` (None where unsupported: callers then use TransformerLens).

    The fp32 layout is checked against TransformerLens once; a bf16 layout is the same code on
    cast weights, so it exists exactly when the fp32 one does."""
    per_model = _CACHE.setdefault(tl, {})
    lean = per_model.get(precision, ...)
    if isinstance(lean, LeanLM) and not lean.is_stale():
        return lean
    if lean is None:
        return None
    if precision != "fp32":
        fresh = LeanLM(tl, precision) if get_lean_lm(tl, "fp32") is not None else None
        per_model[precision] = fresh
        return fresh
    reason = unsupported_reason(tl)
    if reason is not None:
        logger.info("lean forward unavailable (%s); using TransformerLens", reason)
        per_model[precision] = None
        return None
    fresh = LeanLM(tl, precision)
    if not _matches_tlens(fresh):
        logger.warning("lean forward does not match TransformerLens here; using TransformerLens")
        per_model[precision] = None
        return None
    per_model[precision] = fresh
    return fresh


def _matches_tlens(lean: LeanLM) -> bool:
    """Compare logits with TransformerLens on a few random tokens (fp32: outside any autocast
    region the first training step may have opened)."""
    device_type = torch.device(lean.tl.cfg.device or "cpu").type
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        return _max_logit_error(lean) <= 1e-4


def _max_logit_error(lean: LeanLM) -> float:
    tl = lean.tl
    g = torch.Generator().manual_seed(0)
    n = min(tl.cfg.n_ctx, 8)
    tokens = torch.randint(0, tl.cfg.d_vocab, (2, n), generator=g).to(tl.cfg.device)
    # Block by block through `forward` (not `__call__`): hooks users put on the LM's modules
    # should see only real passes.
    resid = tl.input_to_embed(tokens)[0]
    for blk in tl.blocks:
        resid = type(blk).forward(blk, resid)
    if tl.cfg.normalization_type is not None:
        resid = type(tl.ln_final).forward(tl.ln_final, resid)
    want = type(tl.unembed).forward(tl.unembed, resid)
    got = lean.logits(lean.run(tokens))
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
