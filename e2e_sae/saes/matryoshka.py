"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): one BatchTopK dictionary whose
nested prefixes must each reconstruct on their own.

With widths w_0 < w_1 < ... < w_{P-1} = d_sae, prefix p decodes with latents [0, w_p) only:

  out_p = c[..., :w_p] @ dict_elements[:, :w_p]^T + b_dec

where c is the usual BatchTopK code of the whole dictionary (k x tokens latents per batch in
training, the learned global threshold at inference, as `batchtopk`); b_dec is in every prefix, as
in SAELens' `MatryoshkaBatchTopKTrainingSAE`. `forward` returns out_{P-1} (the full dictionary),
so evaluation, splicing and export see a plain BatchTopK SAE (exported as SAELens does: jumprelu
with the threshold).

How the prefixes are trained (`matryoshka_e2e`):

- "all_prefixes" (default). Local: the `out_to_in` term is sum_p prefix_weights[p] *
  MSE(out_p, target) (weights default 1: SAELens' sum of the full and the inner MSEs).
  End-to-end: the spliced pass runs once per prefix, batched: the clean residual at the first SAE
  layer is repeated P times along the batch (prefix-major; `spliced_copies` asks the step for P),
  and in copy p every Matryoshka SAE encodes its own input of that copy and writes out_p
  (`forward_copies`); `logits_kl` is then the mean over the P
  passes of their KL to the clean model, and `in_to_orig` the mean of their downstream MSEs.
  Memory: the spliced pass from the first SAE layer on, and the SAEs' activations, are P times
  those of one pass (activations saved for backward scale with P x batch); the clean pass is not
  repeated. The SAEActs the loss terms, AuxK and the firing statistics see are those of the full
  dictionary's copy, and only that copy updates the BatchTopK threshold.
- "full_kl_inner_mse": every loss term sees the full dictionary only (one spliced pass, as for
  `batchtopk`), and the inner prefixes are trained by the auxiliary loss `matryoshka_inner` =
  inner_mse_coeff * sum_{p < P-1} prefix_weights[p] * MSE(out_p, target). The cheap e2e variant
  (memory and compute of one BatchTopK e2e pass plus one decode); for a local run with
  out_to_in coeff 1 and inner_mse_coeff 1 it is the same loss as "all_prefixes", logged in two
  parts as SAELens does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from e2e_sae.saes.base import SAEActs
from e2e_sae.saes.batchtopk import BatchTopKSAE
from e2e_sae.saes.registry import register_architecture
from e2e_sae.saes.topk import check_option

logger = logging.getLogger(__name__)

E2E_MODES = ("all_prefixes", "full_kl_inner_mse")


@register_architecture
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK SAE trained so that each prefix of its dictionary reconstructs (module doc).

    architecture_kwargs (besides batchtopk's k_aux, aux_coeff, dead_tokens_threshold,
    threshold_momentum):
      matryoshka_widths: strictly increasing prefix widths, the last = d_sae (appended when
        smaller, as SAELens does). Required.
      matryoshka_e2e: "all_prefixes" (default) or "full_kl_inner_mse" (module doc).
      prefix_weights: weight of each prefix's MSE (default all 1).
      inner_mse_coeff: "full_kl_inner_mse" only: weight of the inner prefixes' MSE (default 1).
    """

    architecture = "matryoshka"

    def __init__(
        self,
        *args: Any,
        matryoshka_widths: Sequence[int] | None = None,
        matryoshka_e2e: str = "all_prefixes",
        prefix_weights: Sequence[float] | None = None,
        inner_mse_coeff: float = 1.0,
        **batchtopk_kwargs: Any,
    ) -> None:
        super().__init__(*args, **batchtopk_kwargs)
        kw = "saes.architecture_kwargs"
        self.widths = _check_widths(matryoshka_widths, self.n_dict_components)
        check_option(
            matryoshka_e2e in E2E_MODES,
            f"{kw}.matryoshka_e2e",
            f"must be one of {', '.join(E2E_MODES)}, got {matryoshka_e2e!r}",
        )
        self.e2e_mode = str(matryoshka_e2e)
        weights = [1.0] * len(self.widths) if prefix_weights is None else list(prefix_weights)
        check_option(
            len(weights) == len(self.widths) and all(_is_number(w) and w >= 0 for w in weights),
            f"{kw}.prefix_weights",
            f"must be {len(self.widths)} numbers >= 0 (one per width), got {prefix_weights!r}",
        )
        self.prefix_weights = [float(w) for w in weights]
        check_option(
            _is_number(inner_mse_coeff) and inner_mse_coeff >= 0,
            f"{kw}.inner_mse_coeff",
            f"must be a number >= 0, got {inner_mse_coeff!r}",
        )
        self.inner_mse_coeff = float(inner_mse_coeff)

    @property
    def n_prefixes(self) -> int:
        return len(self.widths)

    # --- codes and prefix reconstructions -------------------------------------------------------
    def decode_prefix(self, c: Tensor, p: int) -> Tensor:
        """out_p [..., d_out]: the code's first widths[p] latents decoded, plus b_dec."""
        w = self.widths[p]
        return F.linear(c[..., :w], self.dict_elements[:, :w], self.decoder.bias)

    def inner_outputs(self, c: Tensor) -> list[Tensor]:
        """[out_0, ..., out_{P-2}], accumulated group by group (one decode of w_{P-2} latents)."""
        elements = self.dict_elements
        outs: list[Tensor] = []
        acc: Tensor | None = None
        lo = 0
        for w in self.widths[:-1]:
            part = F.linear(c[..., lo:w], elements[:, lo:w])
            acc = part + self.decoder.bias if acc is None else acc + part
            outs.append(acc)
            lo = w
        return outs

    # --- training ---------------------------------------------------------------------------------
    def spliced_copies(self) -> int:
        """ "all_prefixes" while it trains: one copy of the batch per prefix; else 1 (a frozen
        Matryoshka SAE decodes its full dictionary in every copy)."""
        if self.e2e_mode != "all_prefixes" or not any(p.requires_grad for p in self.parameters()):
            return 1
        return self.n_prefixes

    def forward_copies(self, x: Tensor, n_copies: int) -> tuple[Tensor, Tensor]:
        """With one copy per prefix (module doc): copy p encodes its own input and writes prefix
        p's reconstruction; only the last copy (the full dictionary) moves the threshold."""
        if n_copies != self.spliced_copies():
            return self(x)
        assert x.shape[0] % n_copies == 0, (n_copies, x.shape)
        chunks = x.unflatten(0, (n_copies, -1))
        last = n_copies - 1
        codes = [
            self.code(self.pre_acts(chunks[p]), update_threshold=p == last) for p in range(n_copies)
        ]
        outs = [self.decode_prefix(c, p) for p, c in enumerate(codes)]
        return self.add_skip(torch.cat(outs), x), torch.cat(codes)

    def reconstruction_loss(self, acts: SAEActs, target: Tensor) -> Tensor:
        """What `out_to_in` counts for this SAE: sum_p prefix_weights[p] * MSE(out_p, target)
        ("all_prefixes"), or the full dictionary's MSE ("full_kl_inner_mse")."""
        full = F.mse_loss(acts.output, target)
        if self.e2e_mode != "all_prefixes":
            return full
        total = self.prefix_weights[-1] * full
        for w, out in zip(self.prefix_weights, self.inner_outputs(acts.c), strict=False):
            total = total + w * F.mse_loss(self.add_skip(out, acts.input), target)
        return total

    def aux_losses(self, acts: SAEActs, target: Tensor | None = None) -> dict[str, Tensor]:
        """AuxK (batchtopk's, against the full dictionary's error), plus "full_kl_inner_mse"'s
        `matryoshka_inner`."""
        out = super().aux_losses(acts, target)
        if self.e2e_mode == "full_kl_inner_mse":
            target = acts.input if target is None else target
            inner = acts.output.new_zeros(())
            for w, o in zip(self.prefix_weights, self.inner_outputs(acts.c), strict=False):
                inner = inner + w * F.mse_loss(self.add_skip(o, acts.input), target)
            out["matryoshka_inner"] = self.inner_mse_coeff * inner
        return out

    def init_kwargs(self) -> dict[str, Any]:
        return {
            **super().init_kwargs(),
            "matryoshka_widths": list(self.widths),
            "matryoshka_e2e": self.e2e_mode,
            "prefix_weights": list(self.prefix_weights),
            "inner_mse_coeff": self.inner_mse_coeff,
        }


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_widths(widths: Sequence[int] | None, d_sae: int) -> list[int]:
    field = "saes.architecture_kwargs.matryoshka_widths"
    check_option(widths is not None, field, "required for architecture 'matryoshka'")
    assert widths is not None
    ok = isinstance(widths, (list, tuple)) and len(widths) > 0
    ok = ok and all(isinstance(w, int) and not isinstance(w, bool) for w in widths)
    check_option(ok, field, f"must be a non-empty list of integers, got {widths!r}")
    out = [int(w) for w in widths]
    check_option(
        all(a < b for a, b in zip(out, out[1:], strict=False)) and out[0] > 0,
        field,
        f"must be positive and strictly increasing, got {out}",
    )
    check_option(out[-1] <= d_sae, field, f"widths must be <= d_sae={d_sae}, got {out}")
    if out[-1] < d_sae:
        logger.info("matryoshka_widths: appending the full dictionary width %d", d_sae)
        out.append(d_sae)
    return out
