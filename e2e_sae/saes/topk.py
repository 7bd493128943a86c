"""TopK SAE (Gao et al. 2024): exactly `k` active latents per token, plus the AuxK dead-latent loss.

Latents are chosen with `torch.topk` on the pre-activations, so ties never select more than k.
The chosen values are ReLU'd as usual, except that a chosen latent whose pre-activation is <= 0
keeps the smallest positive normal float instead of 0: the code then has exactly k non-zeros
(L0 == k; the latent counts as fired, as in selection-based TopK bookkeeping) while it adds
nothing measurable to the output and, as under a ReLU, receives no gradient.

Sparsity is set by `k`, so the `sparsity` loss term is usually absent for this family.

Sparse training path. Only the encoder's pre-activations need a dense GEMM (to pick the top k);
when k <= SPARSE_MAX_DENSITY * d_sae, `TopKSAE.forward` does everything else on the k selected
latents per token (`sparse_ops`: decode, and the gradients of the code values, W_dec, b_dec,
W_enc, b_enc and the input) instead of four more [tokens, d_sae]-sized GEMMs. Same values and
gradients as the dense path up to float summation order; `forward` still returns the dense code
c, built by scattering the selected values, so a loss on c (a sparsity term) reaches them too.
The dictionary elements are W_dec's columns normalised inside the graph, as in `SAEBase.decode`;
here by scaling the k selected values by 1 / their columns' norms (no dense normalised copy;
`SparseDecode` forms the gradient's radial correction in one in-place pass).
The sparse products cost far more per flop than a GEMM, so the dense path wins for larger k:
`benchmarks/bench_topk.py` (SAE step with Adam, d_in 576, d_sae 4608, 512 tokens, 2-core Xeon)
put the crossover near k / d_sae = 0.03 in fp32 with 2 threads (0.04 with 1 thread, about 0.06
under bf16 autocast), hence SPARSE_MAX_DENSITY = 0.03 (not measured on CUDA). At k = 32
(k / d_sae = 0.007) the step took 58 ms instead of 85 with 2 threads, 114 instead of 154 with 1
(`benchmarks/results/topk-20261127-003254.txt`).
Subclasses that change `encode` (BatchTopK: a variable number per token in training) keep the
dense path, and so does AuxK: its k_aux (default d_out / 2) is far above the crossover against
the dead set it selects from.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2e_sae.errors import ConfigError
from e2e_sae.saes.base import SAEActs, SAEBase
from e2e_sae.saes.registry import register_architecture
from e2e_sae.saes.sparse_ops import sparse_topk_forward

SPARSE_MAX_DENSITY = 0.03
"""`forward` takes the sparse path when k <= SPARSE_MAX_DENSITY * d_sae (module docstring)."""


def positive_values(values: Tensor) -> Tensor:
    """ReLU, but never exactly 0: selected latents stay non-zero (gradient as for ReLU)."""
    return F.relu(values).clamp_min(torch.finfo(values.dtype).tiny)


def topk_code(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest pre-activations of each token [..., d_sae]; all others are 0."""
    values, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, positive_values(values))


GAO_DEAD_TOKENS = 10_000_000
"""Gao et al. 2024's AuxK dead threshold (tokens without firing)."""


def default_dead_tokens_threshold(run_tokens: int | None) -> int:
    """AuxK's default dead threshold: a tenth of the run's training tokens, at most Gao et al.'s
    10M (their runs are far longer than 100M tokens). A fixed 10M would never be reached in a
    shorter run: AuxK would stay exactly 0 and dead latents stay dead. None (length unknown,
    e.g. an SAE built in code): 10M."""
    if run_tokens is None:
        return GAO_DEAD_TOKENS
    return max(1, min(GAO_DEAD_TOKENS, run_tokens // 10))


def check_option(cond: bool, field: str, what: str) -> None:
    """Raise a one-line ConfigError naming `field` unless `cond` holds."""
    if not cond:
        raise ConfigError(f"{field}: {what}")


@register_architecture
class TopKSAE(SAEBase):
    """ReLU SAE whose code keeps only each token's k largest pre-activations.

    architecture_kwargs:
      k_aux: dead latents used by AuxK per token (default output size // 2).
      aux_coeff: weight of the AuxK loss (default 1/32, as in Gao et al.; 0 turns it off).
      dead_tokens_threshold: a latent is dead after this many training tokens without firing
        (default: `default_dead_tokens_threshold` of the run's length; 10M, as in Gao et al.,
        for runs of 100M tokens or more).

    `sparse_max_density` (class attribute, default SPARSE_MAX_DENSITY) picks the forward: the
    sparse path when k <= sparse_max_density * d_sae. Set it on an instance to force one path
    (1.0: sparse, 0.0: dense), as the tests and benchmarks do.
    """

    architecture = "topk"
    sparse_max_density: float = SPARSE_MAX_DENSITY

    def __init__(
        self,
        *args: Any,
        k: int | None = None,
        k_aux: int | None = None,
        aux_coeff: float = 1 / 32,
        dead_tokens_threshold: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_option(k is not None, "saes.k", f"required for architecture '{self.architecture}'")
        assert k is not None
        check_option(
            0 < k <= self.n_dict_components,
            "saes.k",
            f"must be in 1..{self.n_dict_components} (the dictionary size), got {k}",
        )
        k_aux = k_aux if k_aux is not None else max(1, self.output_size // 2)
        kw = "saes.architecture_kwargs"
        if dead_tokens_threshold is None:
            dead_tokens_threshold = default_dead_tokens_threshold(None)
        check_option(k_aux > 0, f"{kw}.k_aux", f"must be positive, got {k_aux}")
        check_option(aux_coeff >= 0, f"{kw}.aux_coeff", f"must be >= 0, got {aux_coeff}")
        check_option(
            dead_tokens_threshold > 0,
            f"{kw}.dead_tokens_threshold",
            f"must be positive, got {dead_tokens_threshold}",
        )
        self.k = int(k)
        self.k_aux = int(k_aux)
        self.aux_coeff = float(aux_coeff)
        self.dead_tokens_threshold = int(dead_tokens_threshold)

    def encode(self, x: Tensor) -> Tensor:
        return topk_code(self.pre_acts(x), self.k)

    def uses_sparse_path(self) -> bool:
        """Whether `forward` runs on the k selected latents only (see the module docstring).

        Subclasses that change `encode` or `pre_acts` (BatchTopK) keep the dense path.
        """
        same_code = type(self).encode is TopKSAE.encode and type(self).pre_acts is SAEBase.pre_acts
        return same_code and self.k <= self.sparse_max_density * self.n_dict_components

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.uses_sparse_path() or x.numel() == 0:
            return super().forward(x)
        enc = cast(nn.Linear, self.encoder[0])
        output, c = sparse_topk_forward(
            x,
            enc.weight,
            enc.bias,
            self.decoder.weight,
            self.decoder.bias,
            self.k,
            positive_values,
            unit_columns=True,
        )
        return self.add_skip(output, x), c

    def dead_mask(self) -> Tensor:
        """[d_sae] bool: latents that have not fired for `dead_tokens_threshold` tokens."""
        return self.tokens_since_fired >= self.dead_tokens_threshold

    def aux_losses(self, acts: SAEActs, target: Tensor | None = None) -> dict[str, Tensor]:
        """AuxK: the top-k_aux dead latents reconstruct the detached residual error.

        MSE between W_dec[:, dead] z_aux (no decoder bias) and (target - output).detach(), where
        z_aux keeps each token's k_aux largest dead pre-activations (ReLU'd), computed from the
        detached input. Gradients reach only the dead latents' encoder rows, encoder biases and
        decoder columns: nothing upstream (the LM, earlier SAEs) and no live latent.

        The dead set stays a mask on the device (live latents' pre-activations are -inf, so they
        are never picked, and ReLU sends any -inf that fills a row short of k_aux dead latents to
        0): selecting the dead latents by index would make the host wait for their count every
        step. Zero when no latent is dead, decided on the device too.
        """
        zero = acts.output.new_zeros(())
        if self.aux_coeff == 0 or self.since_fired_bound() < self.dead_tokens_threshold:
            return {"auxk": zero}  # (no latent can be dead yet: decided without a read)
        dead = self.dead_mask()
        target = acts.input if target is None else target
        residual = (target - acts.output).detach()
        enc = cast(nn.Linear, self.encoder[0])
        pre = F.linear(acts.input.detach(), enc.weight, enc.bias).masked_fill(~dead, -torch.inf)
        values, idx = pre.topk(min(self.k_aux, pre.shape[-1]), dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(-1, idx, F.relu(values))
        recon = F.linear(z, F.normalize(self.decoder.weight, dim=0))
        return {"auxk": torch.where(dead.any(), self.aux_coeff * F.mse_loss(recon, residual), zero)}

    @classmethod
    def run_defaults(cls, run_tokens: int | None) -> dict[str, Any]:
        return {"dead_tokens_threshold": default_dead_tokens_threshold(run_tokens)}

    def idle_aux_losses(self, run_tokens: int) -> list[str]:
        if self.aux_coeff == 0 or self.dead_tokens_threshold < run_tokens:
            return []
        return [
            f"AuxK can never act: saes.architecture_kwargs.dead_tokens_threshold "
            f"({self.dead_tokens_threshold:,} tokens) is not below the run's "
            f"{run_tokens:,} training tokens, so no latent counts as dead"
        ]

    def init_kwargs(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "k_aux": self.k_aux,
            "aux_coeff": self.aux_coeff,
            "dead_tokens_threshold": self.dead_tokens_threshold,
        }
