"""Cross-layer transcoder (CLT; Ameisen et al. 2025, "Circuit Tracing"): one dictionary per layer
of a transcoder set, whose features read that layer's MLP input and write to the MLP output of
that layer and of every later layer of the set.

With layers 0..L-1 and c_s the code of layer s's features,

    mlp_out_hat[t] = sum_{s <= t} c_s @ D[s -> t]^T + b_dec[t],

so layer t's reconstruction sums the contributions of layers 0..t. This module is layer s's part:
its encoder (W_enc [d_sae, d_in], b_enc), its decoders to layers s..L-1 stacked in one matrix
`decoder.weight` [n_targets * d_out, d_sae] (row block j writes to layer s + j) and the bias
`decoder.bias` [d_out] of its own layer. `lm.sites` adds the contributions: in a pass, layer s's
encoder runs when its input hook fires, and each output hook is replaced by the sum written to it.

Parameters: a CLT over L layers with d latents per layer holds L * d encoder rows and
L(L+1)/2 * d decoder columns (each [d_out]): the decoders grow as L(L+1)/2, a transcoder set of the
same width has L.

Decoder parameterisation (the house's, `SAEBase`): a feature's dictionary element is its decoder
column over all the layers it writes to, concatenated ([n_targets * d_out]), normalised to unit norm
inside the graph; its activation is then the norm of everything it writes. `unit_decoders: false`
decodes with the raw columns instead (the published CLTs' parameterisation), and the sparsity
penalties below weight each feature by its decoder norm ||D_i|| (the concatenated column's norm;
1 with unit decoders), so shrinking a code while growing its decoder does not pay.

Sparsity (the published CLTs'), `activation`:
- `jumprelu` (default): c = z * H(z - theta) with learned thresholds (straight-through gradients,
  as `jumprelu.py`); `penalty: l0` (default) sum_i ||D_i|| H(z_i - theta_i), or `penalty: tanh`
  sum_i tanh(tanh_scale * ||D_i|| * c_i) (Anthropic's).
- `topk`: the k largest pre-activations of each token per layer (`saes.k`; a global top-k over
  layers cannot run in one spliced pass, where layer s+1's input depends on layer s's output),
  with AuxK on the own layer's residual error (dead latents reconstruct it; `k_aux`, `aux_coeff`,
  `dead_tokens_threshold` as for `topk`). Usually no sparsity term.
- `relu`: ||D_i|| * c_i under the `sparsity` term's p-norm (L1 by default).
Every penalty is what the `sparsity` loss term averages over tokens (and divides by d_in).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2e_sae.errors import ConfigError
from e2e_sae.saes.base import SAEActs, SAEBase, unit_columns, unit_decode
from e2e_sae.saes.jumprelu import jumprelu, step
from e2e_sae.saes.registry import register_architecture
from e2e_sae.saes.topk import check_option, topk_code

ACTIVATIONS = ("jumprelu", "topk", "relu")
PENALTIES = {"jumprelu": ("l0", "tanh"), "relu": ("lp", "tanh"), "topk": ("lp",)}


class _Decoder(nn.Module):
    """A CLT layer's decoders: `weight` [n_targets * d_out, d_sae] (row block j: layer s + j) and
    `bias` [d_out] (its own layer's)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)


@register_architecture
class CrossLayerTranscoder(SAEBase):
    """One layer of a cross-layer transcoder (module doc). Built by `SAETransformer` for every
    layer of `saes.transcoder_set` with `architecture: clt`; `n_targets` (the layers it writes to)
    comes from its site.

    architecture_kwargs:
      activation: jumprelu (default), topk, relu.
      penalty: jumprelu: l0 (default) or tanh; relu: lp (default, the `sparsity` term's p-norm)
        or tanh; topk: lp.
      tanh_scale: the tanh penalty's scale (default 1.0, in units of the code).
      bandwidth, init_threshold: jumprelu's (defaults 0.001, as `jumprelu`).
      unit_decoders: true (default; decode with unit-norm concatenated columns) or false.
      k_aux, aux_coeff, dead_tokens_threshold: topk's AuxK (as `topk`).
    """

    architecture = "clt"
    cross_layer = True
    decoder: _Decoder  # type: ignore[assignment]

    def __init__(
        self,
        input_size: int,
        n_dict_components: int,
        init_decoder_orthogonal: bool = True,
        output_size: int | None = None,
        *,
        n_targets: int = 1,
        activation: str = "jumprelu",
        k: int | None = None,
        penalty: str | None = None,
        tanh_scale: float = 1.0,
        bandwidth: float = 0.001,
        init_threshold: float = 0.001,
        unit_decoders: bool = True,
        k_aux: int | None = None,
        aux_coeff: float = 1 / 32,
        dead_tokens_threshold: int = 10_000_000,
        skip: bool = False,
    ) -> None:
        kw = "saes.architecture_kwargs"
        check_option(not skip, "saes.transcoder_set.skip", "not for a cross-layer transcoder")
        check_option(
            isinstance(n_targets, int) and n_targets >= 1,
            f"{kw}.n_targets",
            f"must be a positive integer, got {n_targets!r}",
        )
        d_out = output_size or input_size
        # the base builds (and initialises) the stacked decoder; its bias is cut to one layer's
        super().__init__(
            input_size, n_dict_components, init_decoder_orthogonal, output_size=n_targets * d_out
        )
        self.output_size = d_out
        self.n_targets = int(n_targets)
        base = self.decoder
        self.decoder = _Decoder(base.weight.data, base.bias.data[:d_out].clone())
        check_option(
            activation in ACTIVATIONS,
            f"{kw}.activation",
            f"must be one of {', '.join(ACTIVATIONS)}, got {activation!r}",
        )
        self.activation = activation
        penalty = penalty if penalty is not None else PENALTIES[activation][0]
        check_option(
            penalty in PENALTIES[activation],
            f"{kw}.penalty",
            f"for activation {activation} one of {', '.join(PENALTIES[activation])}, "
            f"got {penalty!r}",
        )
        self.penalty = penalty
        for name, value in (
            ("tanh_scale", tanh_scale),
            ("bandwidth", bandwidth),
            ("init_threshold", init_threshold),
        ):
            check_option(
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                f"{kw}.{name}",
                f"must be a positive number, got {value!r}",
            )
        self.tanh_scale = float(tanh_scale)
        self.bandwidth = float(bandwidth)
        self.init_threshold = float(init_threshold)
        self.unit_decoders = bool(unit_decoders)
        self.k: int | None = None
        if activation == "topk":
            check_option(k is not None, "saes.k", "required for a clt with activation topk")
            assert k is not None
            check_option(
                0 < k <= n_dict_components,
                "saes.k",
                f"must be in 1..{n_dict_components} (the latents per layer), got {k}",
            )
            self.k = int(k)
        elif k is not None:
            raise ConfigError(f"saes.k: only for a clt with activation topk (it is {activation})")
        k_aux = k_aux if k_aux is not None else max(1, d_out // 2)
        check_option(k_aux > 0, f"{kw}.k_aux", f"must be positive, got {k_aux}")
        check_option(aux_coeff >= 0, f"{kw}.aux_coeff", f"must be >= 0, got {aux_coeff}")
        check_option(
            dead_tokens_threshold > 0,
            f"{kw}.dead_tokens_threshold",
            f"must be positive, got {dead_tokens_threshold}",
        )
        self.k_aux, self.aux_coeff = int(k_aux), float(aux_coeff)
        self.dead_tokens_threshold = int(dead_tokens_threshold)
        if activation == "jumprelu":
            self.log_threshold = nn.Parameter(
                torch.full((n_dict_components,), math.log(init_threshold))
            )

    # --- code -------------------------------------------------------------------------------------
    @property
    def threshold(self) -> Tensor:
        """[d_sae] jumprelu thresholds theta > 0."""
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        z = self.pre_acts(x)
        if self.activation == "jumprelu":
            return jumprelu(z, self.threshold, self.bandwidth)
        if self.activation == "topk":
            assert self.k is not None
            return topk_code(z, self.k)
        return F.relu(z)

    # --- decoders ---------------------------------------------------------------------------------
    def decoder_weights(self) -> Tensor:
        """The decoders as they decode, [n_targets * d_out, d_sae]: unit-norm columns (default) or
        the raw ones (`unit_decoders: false`)."""
        w = self.decoder.weight
        return unit_columns(w) if self.unit_decoders else w

    def decoder_norms(self) -> Tensor | None:
        """||D_i|| per latent [d_sae] (over every layer it writes to), None when it is 1 (unit
        decoders): the sparsity penalties' weights."""
        return None if self.unit_decoders else self.decoder.weight.norm(dim=0)

    def decode_targets(self, c: Tensor) -> Tensor:
        """What the code writes to each of its layers, [n_targets, ..., d_out] (its own layer's
        bias in the first)."""
        t, d = self.n_targets, self.output_size
        b = self.decoder.bias
        bias = F.pad(b, (0, (t - 1) * d)) if t > 1 else b
        w = self.decoder.weight
        out = unit_decode(c, w, bias) if self.unit_decoders else F.linear(c, w, bias)
        return out.unflatten(-1, (t, d)).movedim(-2, 0)

    def decode(self, c: Tensor) -> Tensor:
        """Its own layer's part of the reconstruction (the later layers' are `decode_targets`)."""
        return self.decode_targets(c)[0]

    def forward_targets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = self.encode(x)
        return self.decode_targets(c), c

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(its own layer's contribution, c): a CLT layer alone does not reconstruct its layer
        (the earlier layers' features write there too); `lm.sites.run_sites` sums them."""
        outputs, c = self.forward_targets(x)
        return outputs[0], c

    @property
    def dict_elements(self) -> Tensor:
        """[d_out, d_sae]: what each feature adds to the residual stream in total, per unit of
        activation (its decoders to every layer, summed; not unit norm). The feature browser's
        promoted tokens and decoder similarities use it."""
        w = self.decoder_weights()
        return w.unflatten(0, (self.n_targets, self.output_size)).sum(0)

    def target_decoders(self) -> Tensor:
        """[n_targets, d_out, d_sae]: the decoders as they decode, per layer written to."""
        return self.decoder_weights().unflatten(0, (self.n_targets, self.output_size))

    # --- training ---------------------------------------------------------------------------------
    def sparsity_penalty(self, acts: SAEActs, p_norm: float) -> Tensor:
        """Per token [...]: the penalty of `penalty` (module doc), each latent weighted by its
        decoder norm."""
        w = self.decoder_norms()
        if self.penalty == "l0":
            with torch.no_grad():  # d H / d z = 0: only the thresholds (and ||D||) learn from it
                z = self.pre_acts(acts.input)
            fired = step(z, self.threshold, self.bandwidth)
            return (fired if w is None else fired * w).sum(-1)
        c = acts.c if w is None else acts.c * w
        if self.penalty == "tanh":
            return torch.tanh(self.tanh_scale * c).sum(-1)
        return torch.norm(c, p=p_norm, dim=-1)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_tokens_threshold

    def aux_losses(self, acts: SAEActs, target: Tensor | None = None) -> dict[str, Tensor]:
        """topk: AuxK on the own layer (as `topk.TopKSAE.aux_losses`, with this layer's block of
        the decoders): the top-k_aux dead latents reconstruct the detached error of the own
        layer's reconstruction."""
        if self.activation != "topk":
            return {}
        zero = acts.output.new_zeros(())
        dead = self.dead_mask().nonzero().squeeze(-1)
        if dead.numel() == 0 or self.aux_coeff == 0:
            return {"auxk": zero}
        target = acts.input if target is None else target
        residual = (target - acts.output).detach()
        enc = cast(nn.Linear, self.encoder[0])
        pre = F.linear(acts.input.detach(), enc.weight[dead], enc.bias[dead])
        values, idx = pre.topk(min(self.k_aux, dead.numel()), dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(-1, idx, F.relu(values))
        own = self.decoder_weights()[: self.output_size, dead]
        return {"auxk": self.aux_coeff * F.mse_loss(F.linear(z, own), residual)}

    def init_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_targets": self.n_targets,
            "activation": self.activation,
            "penalty": self.penalty,
            "tanh_scale": self.tanh_scale,
            "bandwidth": self.bandwidth,
            "init_threshold": self.init_threshold,
            "unit_decoders": self.unit_decoders,
            "k_aux": self.k_aux,
            "aux_coeff": self.aux_coeff,
            "dead_tokens_threshold": self.dead_tokens_threshold,
        }
        if self.k is not None:
            out["k"] = self.k
        return out
