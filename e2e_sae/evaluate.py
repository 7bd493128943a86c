"""Held-out metrics with every SAE spliced in together.

Per batch we run the clean model and the SAE-spliced model over the full context and accumulate:
CE loss (clean / with SAEs / increase), KL(clean || SAE), and per SAE the L0, the latents that fired
at least once, and the explained variance 1 - SSE / total variance of the target activation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.forward import StepPlan, run_forward
from e2e_sae.losses import LossTerm, compute_losses, kl_clean_to_new
from e2e_sae.splice import SAETransformer


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean CE (nats) of predicting tokens[:, 1:] from logits[:, :-1]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).mean()


def l0(c: Tensor) -> Tensor:
    """Mean number of non-zero code entries per token."""
    return (c != 0).float().sum(-1).mean()


def explained_variance(target: Tensor, recon: Tensor) -> Tensor:
    """1 - sum||target - recon||^2 / sum||target - mean(target)||^2 over tokens (mean per token)."""
    t = target.reshape(-1, target.shape[-1]).float()
    r = recon.reshape(-1, recon.shape[-1]).float()
    return 1 - (t - r).pow(2).sum() / (t - t.mean(0)).pow(2).sum()


@dataclass
class _SAEStats:
    n_tokens: int = 0
    l0_sum: float = 0.0
    sse: float = 0.0
    sum_x: Tensor | None = None
    sum_x2: float = 0.0
    fired: Tensor | None = None

    def update(self, target: Tensor, c: Tensor, output: Tensor) -> None:
        t = target.reshape(-1, target.shape[-1]).double()
        cc = c.reshape(-1, c.shape[-1])
        self.n_tokens += t.shape[0]
        self.l0_sum += float((cc != 0).sum())
        self.sse += float((t - output.reshape(t.shape).double()).pow(2).sum())
        self.sum_x = t.sum(0) if self.sum_x is None else self.sum_x + t.sum(0)
        self.sum_x2 += float(t.pow(2).sum())
        f = (cc != 0).any(0)
        self.fired = f if self.fired is None else self.fired | f

    def result(self) -> dict[str, float]:
        assert self.sum_x is not None and self.fired is not None
        total_var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.n_tokens
        alive = int(self.fired.sum())
        return {
            "l0": self.l0_sum / self.n_tokens,
            "alive_dict_elements": alive,
            "dead_dict_elements": int(self.fired.numel()) - alive,
            "explained_variance": 1 - self.sse / total_var if total_var > 0 else float("nan"),
            "mse": self.sse / (self.n_tokens * self.sum_x.numel()),
        }


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    per_sae: dict[str, dict[str, float]] = field(default_factory=dict)

    def flat(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}{k}": v for k, v in self.metrics.items()}
        for pos, d in self.per_sae.items():
            out.update({f"{prefix}{k}/{pos}": v for k, v in d.items()})
        return out


@torch.no_grad()
def evaluate(
    model: SAETransformer,
    batches: Iterator[Tensor],
    n_batches: int,
    plan: StepPlan,
    loss_terms: list[LossTerm],
    progress: bool = False,
) -> EvalResult:
    """Metrics over `n_batches` held-out batches (`plan` must have `e2e=True`)."""
    assert plan.e2e, "evaluation needs both logits: make_plan(..., force_full_pass=True)"
    device = next(model.saes.parameters()).device
    totals: dict[str, float] = {}
    stats: dict[str, _SAEStats] = {p: _SAEStats() for p in plan.sae_positions}
    n = 0
    for _, tokens in zip(
        range(n_batches), tqdm(batches, total=n_batches, desc="eval", disable=not progress, leave=False)
    ):
        tokens = tokens.to(device)
        inputs = run_forward(model, tokens, plan)
        assert inputs.orig_logits is not None and inputs.new_logits is not None
        _, values = compute_losses(loss_terms, inputs)
        values["ce_loss_clean"] = next_token_ce(inputs.orig_logits, tokens)
        values["ce_loss_with_saes"] = next_token_ce(inputs.new_logits, tokens)
        values["kl"] = kl_clean_to_new(inputs.orig_logits, inputs.new_logits, chunk_tokens=2048)
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        for pos, acts in inputs.sae_acts.items():
            target = inputs.orig_acts[pos] if pos in plan.transcoder_targets else acts.input
            stats[pos].update(target, acts.c, acts.output)
        n += 1
    if n == 0:
        raise ValueError("evaluation got no batches")
    metrics = {k: v / n for k, v in totals.items()}
    metrics["ce_loss_increase"] = metrics["ce_loss_with_saes"] - metrics["ce_loss_clean"]
    metrics["n_tokens"] = float(n * tokens.numel())
    return EvalResult(metrics, {p: s.result() for p, s in stats.items()})
