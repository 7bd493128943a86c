"""The interface every SAE architecture implements (see `relu.py` for the paper's SAE)."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

NORM_EPS = 1e-12
"""Column norms are floored here, as in `F.normalize`."""


class _UnitColumns(torch.autograd.Function):
    """W [d, n] -> W / ||W||_col, the same values as `F.normalize(W, dim=0)`.

    Backward: g_W = (g - D * <g, D>_col) / ||W||_col, formed in three passes over [d, n]; autograd's
    generic chain through the division and the norm takes about twice as long
    (`benchmarks/bench_decoder.py`), which shows in the SAE-only steps of the activation cache.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, w: Tensor) -> Tensor:
        norms = w.norm(2, 0, keepdim=True).clamp_min(NORM_EPS)  # F.normalize's own reduction
        d = w / norms
        ctx.save_for_backward(d, norms)
        return d

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:
        d, norms = ctx.saved_tensors
        radial = torch.linalg.vecdot(g, d, dim=0).unsqueeze(0)  # no [d, n] temporary
        return torch.addcmul(g, d, radial, value=-1).div_(norms)  # (never write g: the caller's)


class _UnitDecode(torch.autograd.Function):
    """(c [N, n], W [d, n], b [d]) -> c @ (W / ||W||_col)^T + b: `F.linear(c, unit_columns(W), b)`
    in one node, so the weight gradient's radial projection runs in place on this node's own
    gradient buffer (one [d, n] allocation fewer per step than the two-node graph)."""

    @staticmethod
    def forward(ctx: FunctionCtx, c: Tensor, w: Tensor, b: Tensor) -> Tensor:
        norms = w.norm(2, 0, keepdim=True).clamp_min(NORM_EPS)
        d = w / norms
        ctx.save_for_backward(c, d, norms)
        return torch.addmm(b, c, d.t())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        c, d, norms = ctx.saved_tensors
        gc = g @ d if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = g.t() @ c  # the dense weight gradient, then its tangential part, in place
            radial = torch.linalg.vecdot(gw, d, dim=0).unsqueeze(0)  # no [d, n] temporary
            gw.addcmul_(d, radial, value=-1).div_(norms)
        gb = g.sum(0) if ctx.needs_input_grad[2] else None
        return gc, gw, gb


def unit_decode(c: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """c [..., n] @ unit_columns(w)^T + b, w [d, n]. Under autocast it is the two-node graph, so
    the GEMM runs in autocast's dtype as before."""
    if torch.is_autocast_enabled(c.device.type) or c.dtype != w.dtype:
        return F.linear(c, unit_columns(w), b)
    out = _UnitDecode.apply(c.reshape(-1, c.shape[-1]), w, b)
    assert isinstance(out, Tensor)
    return out.reshape(*c.shape[:-1], w.shape[0])


def unit_columns(w: Tensor) -> Tensor:
    """`F.normalize(w, dim=0)` with a cheaper backward (see `_UnitColumns`)."""
    out = _UnitColumns.apply(w)
    assert isinstance(out, Tensor)
    return out


def sae_key(hook_name: str) -> str:
    """The key of the SAE at `hook_name` in a model's `saes` ModuleDict and in checkpoints:
    ModuleDict keys may not contain '.', so the original library uses '-' instead."""
    return hook_name.replace(".", "-")


class SAEActs(NamedTuple):
    """What a spliced SAE saw and produced at one position (as in the original library)."""

    input: Tensor
    c: Tensor
    output: Tensor


class CacheActs(NamedTuple):
    """An activation cached (not modified) during a forward pass."""

    input: Tensor


class SAEBase(nn.Module):
    """Encoder/decoder pair. Subclasses set `architecture` and implement `encode`; their options
    are keywords after the sizes, which they pass on (`__init__(self, *args, k=..., **kwargs)`).

    Parameter names follow the original library (`encoder.0.weight` [d_sae, d_in], `encoder.0.bias`,
    `decoder.weight` [d_out, d_sae], `decoder.bias`) so checkpoints stay interchangeable.

    Decoder parameterisation (the original's): `decoder.weight` holds raw, unconstrained columns;
    the dictionary elements are `F.normalize(decoder.weight, dim=0)`, computed inside the autograd
    graph at every decode. So the gradient that reaches a raw column has its radial part projected
    out (and is scaled by 1 / its norm), Adam's moments live on the raw weights, and forward never
    writes a parameter: two identical calls give bit-identical outputs.
    """

    architecture: ClassVar[str] = "base"
    cross_layer: ClassVar[bool] = False
    """True for a cross-layer transcoder's dictionaries: built with `n_targets` (the layers each
    writes to), spliced in whole (`lm.sites.closure`)."""
    tokens_since_fired: Tensor
    W_skip: nn.Parameter | None

    def __init__(
        self,
        input_size: int,
        n_dict_components: int,
        init_decoder_orthogonal: bool = True,
        output_size: int | None = None,
        skip: bool = False,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size or input_size
        self.n_dict_components = n_dict_components
        self.encoder = nn.Sequential(nn.Linear(input_size, n_dict_components, bias=True))
        self.decoder = nn.Linear(n_dict_components, self.output_size, bias=True)
        if init_decoder_orthogonal:
            # orthonormal rows, as the original (its columns then have norm sqrt(d_out / d_sae))
            w = nn.init.orthogonal_(self.decoder.weight.data.T).T
            self.decoder.weight.data = w.contiguous()
        # Tokens since each latent last fired (training statistic, reported as dead counts).
        self.register_buffer("tokens_since_fired", torch.zeros(n_dict_components, dtype=torch.long))
        # A transcoder's linear skip path x @ W_skip^T [d_out, d_in] (Paulo et al. 2025), zero at
        # init: `transcoder_set.skip`, or the `skip_transcoder` architecture.
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(self.output_size, input_size))
        else:
            self.register_parameter("W_skip", None)
        self._since_bound: tuple[tuple[int, int], int] | None = None  # see `since_fired_bound`

    # --- the interface -------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        return self.encoder[0](x)

    def encode(self, x: Tensor) -> Tensor:
        """Sparse code c [..., d_sae] for input x [..., d_in]."""
        raise NotImplementedError

    def decode(self, c: Tensor) -> Tensor:
        """Output [..., d_out] = c @ dict_elements^T + b_dec."""
        return unit_decode(c, self.decoder.weight, self.decoder.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, c) like the original SAE. Pure: no parameter or buffer is written."""
        c = self.encode(x)
        return self.add_skip(self.decode(c), x), c

    def add_skip(self, output: Tensor, x: Tensor) -> Tensor:
        """`output` plus the skip path x @ W_skip^T (`decode` leaves it out); `output` itself
        without one."""
        return output if self.W_skip is None else output + F.linear(x, self.W_skip)

    def forward_targets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(what this dictionary writes to each hook it writes to, [n_targets, ..., d_out]; c).
        One target (its output hook) here; a cross-layer transcoder's dictionary writes to its
        own and every later layer of its set (`lm.sites.SpliceSite.targets`)."""
        output, c = self(x)
        return output.unsqueeze(0), c

    # --- training: what the generic step asks of an architecture ------------------------------
    def spliced_copies(self) -> int:
        """Copies of the batch an end-to-end training step should splice this SAE into (one
        spliced pass over them, copy-major along dim 0; `forward_copies` says what it writes into
        each). 1: the pass as at inference. The plan's count is the one every SAE asking for
        more than 1 agrees on (`objective.forward.make_plan`)."""
        return 1

    def forward_copies(self, x: Tensor, n_copies: int) -> tuple[Tensor, Tensor]:
        """(output, c) on input x holding `n_copies` copies of a batch along dim 0 (copy-major).
        The last copy is always the ordinary forward (what losses on the SAE's activations,
        firing statistics and evaluation see); this default processes every copy alike."""
        return self(x)

    def reconstruction_loss(self, acts: SAEActs, target: Tensor) -> Tensor:
        """What the `out_to_in` term counts for this SAE: MSE(output, target). `target` is what
        it reconstructs (`lm.sites.SpliceSite.target`: its input, or a transcoder's clean
        output)."""
        return F.mse_loss(acts.output, target)

    def aux_losses(self, acts: SAEActs, target: Tensor | None = None) -> dict[str, Tensor]:
        """Architecture-specific training losses, already multiplied by their coefficients.

        `target` is what `acts.output` should reconstruct (default `acts.input`; for a transcoder,
        the clean activation at the hook it replaces).
        """
        return {}

    def sparsity_penalty(self, acts: SAEActs, p_norm: float) -> Tensor:
        """Per-token penalty [...] that the `sparsity` loss term averages: ||c||_p by default.

        Architectures with their own penalty (JumpReLU's L0) override this.
        """
        return torch.norm(acts.c, p=p_norm, dim=-1)

    def init_kwargs(self) -> dict[str, Any]:
        """Constructor arguments beyond sizes (the architecture's), stored with checkpoints."""
        return {}

    def build_kwargs(self) -> dict[str, Any]:
        """`init_kwargs` plus the options every architecture takes (`skip`): what rebuilds it."""
        return {**self.init_kwargs(), **({"skip": True} if self.W_skip is not None else {})}

    @classmethod
    def run_defaults(cls, run_tokens: int | None) -> dict[str, Any]:
        """Defaults of constructor arguments that depend on the run's length in training tokens
        (None: unknown); `architecture_kwargs` override them."""
        return {}

    def idle_aux_losses(self, run_tokens: int) -> list[str]:
        """Why an auxiliary loss of this SAE can never act in a run of `run_tokens` training
        tokens (one line each; empty when every one can)."""
        return []

    @torch.no_grad()
    def center_input_(self, center: Tensor) -> None:
        """Shift the encoder's biases so that it sees x - center [d_in] (data-centred init)."""
        enc = self.encoder[0]
        assert isinstance(enc, nn.Linear)
        enc.bias.sub_(enc.weight @ center.to(enc.weight.dtype))

    # --- shared helpers --------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale the raw decoder columns to unit norm in place (init only: tied init); the
        outputs do not change, as decoding normalises anyway."""
        self.decoder.weight.copy_(F.normalize(self.decoder.weight, dim=0))

    @property
    def dict_elements(self) -> Tensor:
        """Unit-norm dictionary directions, [d_out, d_sae] (columns)."""
        return unit_columns(self.decoder.weight)

    @property
    def device(self) -> torch.device:
        return self.decoder.weight.device

    @torch.no_grad()
    def update_firing_stats(self, c: Tensor) -> None:
        fired = (c.reshape(-1, c.shape[-1]) != 0).any(dim=0)
        n_tokens = c.numel() // c.shape[-1]
        known = self._bound_now()
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)  # (no read: no mask index)
        if known is not None:
            self._since_bound = (self._buffer_key(), known + n_tokens)

    def since_fired_bound(self) -> int:
        """An upper bound of `tokens_since_fired.max()` known on the host: the counters are read
        (a host sync) only when the bound is unknown, i.e. after something other than
        `update_firing_stats` wrote them (loading, resampling, merging over ranks); each update
        raises it by the tokens seen. So "may a latent be dead yet?" costs no read while none can
        be (AuxK's dead set)."""
        known = self._bound_now()
        if known is None:
            buf = self.tokens_since_fired
            known = int(buf.max()) if buf.numel() else 0
            self._since_bound = (self._buffer_key(), known)
        return known

    def _buffer_key(self) -> tuple[int, int]:
        buf = self.tokens_since_fired
        return buf.data_ptr(), buf._version

    def _bound_now(self) -> int | None:
        b = self._since_bound
        return b[1] if b is not None and b[0] == self._buffer_key() else None

    def n_dead(self, dead_after_tokens: int) -> int:
        return int((self.tokens_since_fired >= dead_after_tokens).sum())


class SAEDict(nn.ModuleDict):
    """A model's SAEs, each stored under `sae_key(position)` (so the state dict keys are the
    original library's: `blocks-2-hook_resid_pre`); `at(position)` is the one way to get the SAE
    at a hook. Indexing and `in` take the hook name too (`saes["blocks.2.hook_resid_pre"]`)."""

    def __getitem__(self, key: str) -> nn.Module:
        try:
            return super().__getitem__(sae_key(key))
        except KeyError:
            have = ", ".join(k.replace("-", ".") for k in self.keys())
            raise KeyError(
                f"no SAE at '{key}' (SAEs at: {have}); see model.sae(position)"
            ) from None

    def __setitem__(self, key: str, module: nn.Module) -> None:
        super().__setitem__(sae_key(key), module)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(sae_key(key))

    def at(self, position: str) -> SAEBase:
        sae = self[sae_key(position)]
        assert isinstance(sae, SAEBase)
        return sae
