"""Held-out metrics with every SAE spliced in together.

Per batch three passes run over the full context: the clean model, the model with every SAE spliced
in, and the model with every replaced activation zero-ablated. Reported (`EvalResult`):

Model level. CE losses are over next-token predictions (positions 0..T-2); the distribution metrics
compare the next-token distributions at every position.
- `ce_loss_clean`, `ce_loss_with_saes`, `ce_loss_zero_abl` (nats/token), `ce_loss_increase`.
- `ce_loss_score` (SAELens' name; also `ce_loss_recovered`):
  (CE_zero - CE_sae) / (CE_zero - CE_clean); 1 = no loss, 0 = as bad as zero-ablating the hooks.
- `kl` = KL(P_clean || P_sae) per token (the training `logits_kl` direction), `kl_zero_abl`, and
  `kl_div_score` (SAELens) = 1 - kl / kl_zero_abl.
- `top1_agreement`: fraction of positions where the argmax tokens agree.
- `tvd`: total-variation distance 0.5 * sum_v |P_clean(v) - P_sae(v)|, mean over positions.

Per SAE (`per_sae[position]`): `l0` (non-zero latents per token), `alive_dict_elements` /
`dead_dict_elements` (latents that fired / never fired on any eval token), `explained_variance`
(1 - SSE / total variance of the target, pooled over tokens), `explained_variance_ln` (the same
after normalising target and reconstruction each by a layer norm without affine parameters: zero
mean and unit variance over d_model per token, eps 1e-5; it ignores the scale of the
reconstruction, which the next block's layer norm removes anyway), `mse`. The target is the SAE's
input (for a transcoder, the clean activation at the hook it replaces).

Also per SAE, SAEBench's core-eval metrics under its names, with x the target and x_hat the SAE
output per token (`sae_bench.evals.core.main.get_sparsity_and_variance_metrics`):
- `l2_ratio`: mean over tokens of ||x_hat|| / ||x|| (a token with ||x|| < 1e-4 divides by 1).
- `relative_reconstruction_bias`: mean_t ||x_hat||^2 / mean_t <x, x_hat> (Gao et al. 2024,
  eq. 10, as SAEBench writes it: `x_hat_norm_squared.mean() / x_dot_x_hat.mean()`); 1 is unbiased,
  < 1 means shrinkage. SAEBench takes this ratio per batch and then averages the batch values; we
  take it once over all eval tokens (sums accumulated over batches), which is what its per-batch
  formula gives on one batch holding every token.
- `cossim`: mean over tokens of <x, x_hat> / (||x|| ||x_hat||), each norm floored at 1e-8 (as
  `F.cosine_similarity`; SAEBench divides unguarded, so a zero vector gives NaN there, 0 here).
- `l1`: mean over tokens of ||c||_1. SAEBench sums the code without abs, the same for every
  architecture here (their codes are >= 0).
SAEBench's own `explained_variance` and `mse` are per-token ratios averaged over tokens and drop
BOS / padding tokens; ours (above) are pooled over all tokens and kept as they were.

Transcoder sets and cross-layer transcoders: the model-level metrics are the replacement model's
(every listed MLP output replaced at once, in one pass), and a transcoder's `explained_variance`,
`l0` are in that pass (it reads an input the earlier replacements changed: errors compound);
`explained_variance_local` is its FVE on the clean run's input (a CLT layer: the sum of every
layer's contribution, each reading its clean input). `e2e-sae eval --graph-prompts N` adds
circuit-tracer's replacement and completeness scores of attribution graphs for N fixed prompts
(`graph_replacement_score`, `graph_completeness_score`, per prompt in `graphs`), computed in
circuit-tracer's own environment (`e2e_sae.interop.circuits.graph_scores`).

Downstream (`downstream[hook]`): MSE and explained variance of the SAE-spliced run's activation vs
the clean run's at every residual-stream hook after the first SAE (`hook_resid_pre` of later blocks
and the last block's `hook_resid_post`). With several SAEs every one before the hook contributes.
`layer` is the residual index: `blocks.i.hook_resid_pre` is i, the last `hook_resid_post` n_layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.config import Config, DatasetConfig
from e2e_sae.data import eval_batches
from e2e_sae.errors import UserError
from e2e_sae.lm.sites import hook_layer, run_sites
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.objective.forward import StepPlan, make_plan, run_forward, with_runner
from e2e_sae.objective.losses import LossTerm, build_loss_terms, compute_losses, kl_clean_to_new
from e2e_sae.runs.checkpoint import atomic_save_tensors, atomic_write_bytes
from e2e_sae.saes import sae_key

LN_EPS = 1e-5
L2_RATIO_MIN_NORM = 1e-4  # SAEBench's: below it, l2_ratio divides by 1 instead of ||x||
COSSIM_MIN_NORM = 1e-8  # keeps cossim finite (0) for a zero vector
EVAL_JSON = "eval.json"
CHUNK_TOKENS = 2048  # bounds the [tokens, d_vocab] temporaries of the distribution metrics


# --- metrics on one batch (each a direct formula; the accumulators below pool them) ---------------
def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean CE (nats) of predicting tokens[:, 1:] from logits[:, :-1]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).mean()


def l0(c: Tensor) -> Tensor:
    """Mean number of non-zero code entries per token."""
    return (c != 0).float().sum(-1).mean()


def firing_counts(c: Tensor) -> Tensor:
    """Per latent, the number of tokens on which it is non-zero: [..., d_sae] -> [d_sae] (int64)."""
    return (c.reshape(-1, c.shape[-1]) != 0).sum(0)


def explained_variance(target: Tensor, recon: Tensor) -> Tensor:
    """1 - sum||target - recon||^2 / sum||target - mean(target)||^2 over tokens (mean per token)."""
    t = target.reshape(-1, target.shape[-1]).float()
    r = recon.reshape(-1, recon.shape[-1]).float()
    return 1 - (t - r).pow(2).sum() / (t - t.mean(0)).pow(2).sum()


def layer_normalize(x: Tensor, eps: float = LN_EPS) -> Tensor:
    """Layer norm without affine parameters over the last dim: (x - mean) / sqrt(var + eps)."""
    x = x.float()
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _at_least_f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def l2_ratio(target: Tensor, recon: Tensor) -> Tensor:
    """Per token ||recon|| / ||target|| [...] (SAEBench: a target norm < 1e-4 divides by 1)."""
    n_in = _at_least_f32(target).norm(dim=-1)
    n_in = torch.where(n_in < L2_RATIO_MIN_NORM, torch.ones_like(n_in), n_in)
    return _at_least_f32(recon).norm(dim=-1) / n_in


def cosine_similarity(target: Tensor, recon: Tensor) -> Tensor:
    """Per token <target, recon> / (||target|| ||recon||) [...], each norm floored at 1e-8."""
    t, r = _at_least_f32(target), _at_least_f32(recon)
    norms = t.norm(dim=-1).clamp_min(COSSIM_MIN_NORM) * r.norm(dim=-1).clamp_min(COSSIM_MIN_NORM)
    return (t * r).sum(-1) / norms


def top1_agreement(orig_logits: Tensor, new_logits: Tensor) -> Tensor:
    """Fraction of positions where both models' most likely next token is the same."""
    return (orig_logits.argmax(-1) == new_logits.argmax(-1)).float().mean()


def total_variation(
    orig_logits: Tensor, new_logits: Tensor, chunk_tokens: int | None = None
) -> Tensor:
    """0.5 * sum_v |P_orig(v) - P_new(v)| per position, mean over positions (in [0, 1])."""
    orig = orig_logits.reshape(-1, orig_logits.shape[-1])
    new = new_logits.reshape(-1, new_logits.shape[-1])
    step = chunk_tokens or orig.shape[0]
    total = orig.new_zeros((), dtype=torch.float32)
    for s in range(0, orig.shape[0], step):
        p = F.softmax(orig[s : s + step].float(), -1)
        q = F.softmax(new[s : s + step].float(), -1)
        total = total + 0.5 * (p - q).abs().sum()
    return total / orig.shape[0]


def ce_loss_score(ce_clean: float, ce_sae: float, ce_zero_abl: float) -> float:
    """Fraction of the CE loss gap of zero-ablation that the SAEs recover (SAELens' definition)."""
    gap = ce_zero_abl - ce_clean
    return (ce_zero_abl - ce_sae) / gap if gap != 0 else float("nan")


def kl_div_score(kl_sae: float, kl_zero_abl: float) -> float:
    """1 - KL(clean || SAE) / KL(clean || zero-ablated) (SAELens' definition)."""
    return 1 - kl_sae / kl_zero_abl if kl_zero_abl != 0 else float("nan")


def downstream_hooks(model: SAETransformer, positions: list[str]) -> list[str]:
    """Residual hooks after the first SAE: later `hook_resid_pre`s + the last `hook_resid_post`.

    SAE positions themselves are left out (there the spliced run's value is the SAE output, which
    the per-SAE metrics already cover)."""
    n = model.n_layers
    first = min(hook_layer(p, n) for p in positions)
    hooks = [f"blocks.{i}.hook_resid_pre" for i in range(first + 1, n)]
    hooks.append(f"blocks.{n - 1}.hook_resid_post")
    names = set(model.all_hook_names)
    return [h for h in hooks if h in names and h not in positions]


# --- accumulators over batches --------------------------------------------------------------------
@dataclass
class _EVStats:
    """Pooled explained variance / MSE of a reconstruction over many batches (float64 sums)."""

    n_tokens: int = 0
    sse: float = 0.0
    sum_x: Tensor | None = None
    sum_x2: float = 0.0

    def update(self, target: Tensor, recon: Tensor) -> None:
        t = target.reshape(-1, target.shape[-1]).double()
        self.n_tokens += t.shape[0]
        self.sse += float((t - recon.reshape(t.shape).double()).pow(2).sum())
        self.sum_x = t.sum(0) if self.sum_x is None else self.sum_x + t.sum(0)
        self.sum_x2 += float(t.pow(2).sum())

    def result(self) -> dict[str, float]:
        assert self.sum_x is not None
        total_var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.n_tokens
        return {
            "explained_variance": 1 - self.sse / total_var if total_var > 0 else float("nan"),
            "mse": self.sse / (self.n_tokens * self.sum_x.numel()),
        }


@dataclass
class _SAEStats:
    """L0, firing counts, explained variance (plain and after layer norm) and SAEBench's core
    metrics of one SAE: float64 sums over tokens, so the result is the all-tokens-at-once value."""

    n_tokens: int = 0
    l0_sum: float = 0.0
    l1_sum: float = 0.0
    l2_ratio_sum: float = 0.0
    cossim_sum: float = 0.0
    recon_sq_sum: float = 0.0  # sum_t ||x_hat||^2
    dot_sum: float = 0.0  # sum_t <x, x_hat>
    counts: Tensor | None = None
    ev: _EVStats = field(default_factory=_EVStats)
    ev_ln: _EVStats = field(default_factory=_EVStats)

    def update(self, target: Tensor, c: Tensor, output: Tensor) -> None:
        counts = firing_counts(c).cpu()
        self.n_tokens += c.numel() // c.shape[-1]
        self.l0_sum += float(counts.sum())
        self.counts = counts if self.counts is None else self.counts + counts
        self.ev.update(target, output)
        self.ev_ln.update(layer_normalize(target), layer_normalize(output))
        t, r = target.double(), output.reshape(target.shape).double()
        self.l1_sum += float(c.double().abs().sum())
        self.l2_ratio_sum += float(l2_ratio(t, r).sum())
        self.cossim_sum += float(cosine_similarity(t, r).sum())
        self.recon_sq_sum += float(r.pow(2).sum())
        self.dot_sum += float((t * r).sum())

    @property
    def fired(self) -> Tensor:
        assert self.counts is not None
        return self.counts > 0

    def result(self) -> dict[str, float]:
        alive = int(self.fired.sum())
        plain, ln = self.ev.result(), self.ev_ln.result()
        return {
            "l0": self.l0_sum / self.n_tokens,
            "alive_dict_elements": alive,
            "dead_dict_elements": int(self.fired.numel()) - alive,
            "explained_variance": plain["explained_variance"],
            "explained_variance_ln": ln["explained_variance"],
            "mse": plain["mse"],
            "l1": self.l1_sum / self.n_tokens,
            "l2_ratio": self.l2_ratio_sum / self.n_tokens,
            "relative_reconstruction_bias": (
                self.recon_sq_sum / self.dot_sum if self.dot_sum != 0 else float("nan")
            ),
            "cossim": self.cossim_sum / self.n_tokens,
        }


@dataclass
class EvalResult:
    """`metrics`: model-level values; `per_sae[position]`; `downstream[hook]` (mse, explained
    variance, layer); `feature_counts[position]`: tokens (of `metrics["n_tokens"]`) each latent
    fired on."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_sae: dict[str, dict[str, float]] = field(default_factory=dict)
    downstream: dict[str, dict[str, float]] = field(default_factory=dict)
    feature_counts: dict[str, Tensor] = field(default_factory=dict)
    graphs: list[dict[str, Any]] = field(default_factory=list)
    """circuit-tracer's attribution graphs' scores per prompt (`--graph-prompts`), else empty."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What was evaluated on what (`eval_settings`): the same settings give the same numbers."""

    def flat(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}{k}": v for k, v in self.metrics.items()}
        for pos, d in self.per_sae.items():
            out.update({f"{prefix}{k}/{pos}": v for k, v in d.items()})
        for hook, d in self.downstream.items():
            out.update({f"{prefix}downstream_{k}/{hook}": v for k, v in d.items() if k != "layer"})
        return out

    def feature_frequency(self, position: str) -> Tensor:
        """Fraction of eval tokens on which each latent fired, [d_sae]."""
        return self.feature_counts[position].double() / self.metrics["n_tokens"]

    def to_json(self) -> dict[str, Any]:
        """What `eval.json` holds: `settings`, model-level metrics at the top, then `per_sae`,
        `downstream` (and `graphs` with `--graph-prompts`)."""
        out = {
            "settings": self.settings,
            **self.metrics,
            "per_sae": self.per_sae,
            "downstream": self.downstream,
        }
        return {**out, "graphs": self.graphs} if self.graphs else out


def _zero_ablated_logits(model: SAETransformer, tokens: Tensor, positions: list[str]) -> Tensor:
    def zero(x: Tensor, hook: Any) -> Tensor:
        return torch.zeros_like(x)

    with model.lm.hooks([(p, zero) for p in positions]):
        logits = model.lm.run(tokens)
    assert logits is not None
    return logits


@torch.no_grad()
def evaluate(
    model: SAETransformer,
    batches: Iterator[Tensor],
    n_batches: int,
    plan: StepPlan,
    loss_terms: list[LossTerm],
    progress: bool = False,
    *,
    zero_ablation: bool = True,
    downstream: bool = True,
) -> EvalResult:
    """Metrics over `n_batches` held-out batches (`plan` must have `e2e=True`).

    `zero_ablation=False` skips the third pass (no `ce_loss_score` / `kl_div_score`);
    `downstream=False` skips the later-layer reconstruction metrics."""
    assert plan.e2e, "evaluation needs both logits: make_plan(..., force_full_pass=True)"
    later = downstream_hooks(model, plan.sae_positions) if downstream else []
    plan = with_runner(
        model,
        dataclasses.replace(
            plan,
            orig_cache=plan.orig_cache + [h for h in later if h not in plan.orig_cache],
            new_cache=plan.new_cache + [h for h in later if h not in plan.new_cache],
        ),
    )
    device = next(model.saes.parameters()).device
    loss_totals: dict[str, float] = {}
    sums: dict[str, float] = {}
    stats = {p: _SAEStats() for p in plan.sae_positions}
    # transcoders: also on the clean run's inputs (no compounding), `explained_variance_local`
    local = {p: _EVStats() for p in plan.sae_positions if model.sites[p].is_transcoder}
    down = {h: _EVStats() for h in later}
    n = n_tok = n_pred = 0
    bar = tqdm(batches, total=n_batches, desc="eval", disable=not progress, leave=False)
    for _, tokens in zip(range(n_batches), bar, strict=False):
        tokens = tokens.to(device)
        inputs = run_forward(model, tokens, plan)
        orig, new = inputs.orig_logits, inputs.new_logits
        assert orig is not None and new is not None
        _, values = compute_losses(loss_terms, inputs)
        for k, v in values.items():
            loss_totals[k] = loss_totals.get(k, 0.0) + float(v)
        bt, bp = tokens.numel(), tokens.shape[0] * (tokens.shape[1] - 1)
        batch = {
            "ce_loss_clean": float(next_token_ce(orig, tokens)) * bp,
            "ce_loss_with_saes": float(next_token_ce(new, tokens)) * bp,
            "kl": float(kl_clean_to_new(orig, new, CHUNK_TOKENS)) * bt,
            "top1_agreement": float(top1_agreement(orig, new)) * bt,
            "tvd": float(total_variation(orig, new, CHUNK_TOKENS)) * bt,
        }
        if zero_ablation:
            zero = _zero_ablated_logits(model, tokens, plan.sae_positions)
            batch["ce_loss_zero_abl"] = float(next_token_ce(zero, tokens)) * bp
            batch["kl_zero_abl"] = float(kl_clean_to_new(orig, zero, CHUNK_TOKENS)) * bt
        for k, v in batch.items():
            sums[k] = sums.get(k, 0.0) + v
        for pos, acts in inputs.sae_acts.items():
            stats[pos].update(inputs.target(pos), acts.c, acts.output)
        if local:
            sites = {p: model.sites[p] for p in local}
            clean_run = run_sites(sites, {p: model.sae(p) for p in local}, inputs.orig_acts)
            for pos, ev in local.items():
                ev.update(inputs.target(pos), clean_run[pos].output)
        for h in later:
            down[h].update(inputs.orig_acts[h], inputs.new_acts[h])
        n, n_tok, n_pred = n + 1, n_tok + bt, n_pred + bp
    if n == 0:
        raise UserError("evaluation got no batches (is the eval dataset empty?)")
    metrics = {k: v / n for k, v in loss_totals.items()}
    for k, v in sums.items():
        metrics[k] = v / (n_pred if k.startswith("ce_") else n_tok)
    metrics["ce_loss_increase"] = metrics["ce_loss_with_saes"] - metrics["ce_loss_clean"]
    if zero_ablation:
        metrics["ce_loss_score"] = ce_loss_score(
            metrics["ce_loss_clean"], metrics["ce_loss_with_saes"], metrics["ce_loss_zero_abl"]
        )
        metrics["ce_loss_recovered"] = metrics["ce_loss_score"]
        metrics["kl_div_score"] = kl_div_score(metrics["kl"], metrics["kl_zero_abl"])
    metrics["n_tokens"] = float(n_tok)
    n_layers = model.n_layers
    per_sae = {p: s.result() for p, s in stats.items()}
    for p, ev in local.items():
        per_sae[p]["explained_variance_local"] = ev.result()["explained_variance"]
    return EvalResult(
        metrics,
        per_sae,
        {
            h: {**s.result(), "layer": hook_layer(h, n_layers) + ("resid_post" in h)}
            for h, s in down.items()
        },
        {p: s.counts for p, s in stats.items() if s.counts is not None},
    )


# --- the eval windows -----------------------------------------------------------------------------
EVAL_SEED_OFFSET = 42
"""Eval batches come from the data loader seeded `seed + 42` (another order than training's, as in
the original)."""
DEFAULT_EVAL_WINDOWS = 50


def eval_windows(config: Config, n_tokens: int | None, n_ctx: int) -> int:
    """Windows an evaluation scans: `n_tokens` rounded up to whole windows of `n_ctx`, by
    default the run's `eval_n_samples` (else 50), as in training's evaluations."""
    if n_tokens is None:
        return config.eval_n_samples or DEFAULT_EVAL_WINDOWS
    if n_tokens <= 0:
        raise UserError(f"--n-tokens: expected a positive number, got {n_tokens}")
    return math.ceil(n_tokens / n_ctx)


def eval_window_batches(
    data: DatasetConfig, batch_size: int, n_windows: int, seed: int, request: str | None = None
) -> tuple[Iterator[Tensor], int, int]:
    """(batches, how many, windows): `n_windows` eval windows in batches of `batch_size` (the last
    one cut short), in the order every evaluation of the run uses (loader seed `seed + 42`), so
    training's evaluations, `e2e-sae eval` and `browse` see the same tokens. An eval set holding
    fewer windows: see `data.eval_batches` (a UserError naming `request`; without one, the whole
    set, and `windows` says how many that is)."""
    n_batches = math.ceil(n_windows / batch_size)
    loader, n_batches = eval_batches(data, batch_size, seed + EVAL_SEED_OFFSET, n_batches, request)
    n_windows = min(n_windows, n_batches * batch_size)

    def cut() -> Iterator[Tensor]:
        left = n_windows
        for batch in loader:  # a streaming dataset may end first
            yield batch[:left]
            left -= batch.shape[0]
            if left <= 0:
                return

    return cut(), n_batches, n_windows


def eval_settings(
    data: DatasetConfig, n_windows: int, batch_size: int, seed: int, checkpoint: Path | None
) -> dict[str, Any]:
    """The settings an `eval.json` records: dataset, split, tokenizer, window length, windows and
    tokens, batch size, the loader's seed and the checkpoint file evaluated."""
    return {
        "dataset": data.dataset_name,
        "split": data.split,
        "tokenizer_name": data.tokenizer_name,
        "n_ctx": data.n_ctx,
        "n_windows": n_windows,
        "n_tokens": n_windows * data.n_ctx,
        "batch_size": batch_size,
        "data_seed": seed + EVAL_SEED_OFFSET,
        "checkpoint": checkpoint.name if checkpoint is not None else None,
    }


# --- evaluating a run directory -------------------------------------------------------------------
def check_count(value: int | None, option: str) -> None:
    """A command-line count given must be positive (0 or less is a mistake, never 'the default')."""
    if value is not None and value < 1:
        raise UserError(f"{option}: expected a positive number, got {value}")


def eval_request(config: Config, n_tokens: int | None) -> str | None:
    """What an evaluation of a run was asked to cover, for `data.eval_batches`: `n_tokens`, else
    the run's `eval_n_samples`; None when neither is set (the default of 50 windows, or the whole
    eval set if it is smaller)."""
    if n_tokens is not None:
        return f"--n-tokens: {n_tokens} tokens"
    if config.eval_n_samples:
        return f"eval_n_samples: {config.eval_n_samples} windows (the run's; pass --n-tokens)"
    return None


def check_finite_weights(saes: torch.nn.Module, where: object) -> None:
    """Refuse SAEs (`model.saes`, or one SAE) holding NaN / inf, as a diverged run leaves them:
    their metrics, exports and feature pages would be meaningless. An all-NaN `threshold` is
    BatchTopK's unset threshold (no training batch yet; eval uses per-token TopK), not a
    divergence."""
    for name, t in saes.state_dict().items():
        if not t.is_floating_point() or bool(t.isfinite().all()):
            continue
        if name.rsplit(".", 1)[-1] == "threshold" and bool(t.isnan().all()):
            continue
        raise UserError(
            f"{where}: the checkpoint holds non-finite weights (saes.{name}); the run diverged"
        )


def eval_dataset(
    config: Config, data: str | None = None, split: str | None = None
) -> DatasetConfig:
    """The run's eval data, with `data` (dataset name or path) / `split` overriding it."""
    base = config.eval_data or config.train_data
    updates: dict[str, object] = {}
    if data is not None:
        updates["dataset_name"] = data
        if not Path(data).expanduser().exists():
            updates["streaming"] = base.streaming
    if split is not None:
        updates["split"] = split
    if config.eval_data is None and split is None and data is None:
        raise UserError("eval: the run has no eval_data; pass --data and/or --split")
    return DatasetConfig.model_validate({**base.model_dump(), **updates})


def open_run(
    run: str | Path | SAETransformer, device: str | None, command: str
) -> tuple[SAETransformer, Config]:
    """A run directory loaded (`SAETransformer.from_local_path`), or the model given, with its run
    config (`command` names who asks, for the error when the model has none)."""
    if not isinstance(run, SAETransformer):
        run = SAETransformer.from_local_path(run, device=device)
    model = run
    if model.run_config is None:
        raise UserError(f"{command}: the model has no run config (load it with from_local_path)")
    return model, model.run_config


def evaluate_run(
    run_dir: str | Path | SAETransformer,
    *,
    data: str | None = None,
    split: str | None = None,
    n_tokens: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Load a run directory (or take a model from `SAETransformer.from_local_path`) and evaluate
    all its SAEs together.

    `n_tokens` defaults to the run's `eval_n_samples` (else 50) windows; it is rounded up to whole
    windows. Batches come from the eval data in the order training's evaluation uses (seed + 42,
    `eval_batches`). The result's `settings` say what was evaluated on what.
    """

    model, config = open_run(run_dir, device, "eval")
    ds = eval_dataset(config, data, split)
    check_count(batch_size, "--batch-size")
    check_count(n_tokens, "--n-tokens")
    bs = batch_size or config.batch_size
    asked = eval_request(config, n_tokens)
    n_windows = eval_windows(config, n_tokens, ds.n_ctx)
    plan = make_plan(model, config.loss, force_full_pass=True)
    terms = build_loss_terms(config.loss, plan.new_cache)
    where = run_dir if not isinstance(run_dir, SAETransformer) else "model"
    check_finite_weights(model.saes, where)
    batches, n_batches, n_windows = eval_window_batches(ds, bs, n_windows, config.seed, asked)
    model.eval()
    result = evaluate(model, batches, n_batches, plan, terms, progress=progress)
    result.settings = eval_settings(ds, n_windows, bs, config.seed, model.checkpoint_path)
    bad = next(((k, v) for k, v in result.flat("").items() if not math.isfinite(v)), None)
    if bad is not None:
        raise UserError(
            f"{where}: evaluation metric '{bad[0]}' is {bad[1]} (non-finite: the "
            "SAE weights are too large or the run diverged)"
        )
    return result


def feature_frequency_path(eval_json: Path) -> Path:
    """Where the per-latent firing frequencies of an `eval.json` live (next to it)."""
    return eval_json.with_name(eval_json.stem + ".feature_frequency.safetensors")


def settings_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """How the settings of an existing eval file differ from `new` ('split: validation -> test,
    ...'), None if they are the same."""
    if old is None:
        return "it records no settings (an older e2e_sae wrote it)"
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    if not keys:
        return None
    return ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys)


def write_eval(result: EvalResult, out: Path, overwrite: bool = False) -> Path:
    """Write `out` (JSON, see `EvalResult.to_json`) and the per-latent firing frequencies next to it
    (safetensors, one [d_sae] float32 tensor per SAE keyed by `sae_key(position)`).

    An existing `out` that records other settings (another split, token count, checkpoint, ...) is
    replaced only with `overwrite`: an evaluation never silently replaces one of other settings."""

    out = Path(out)
    if out.is_file() and not overwrite:
        try:
            old = json.loads(out.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        change = settings_change(
            old.get("settings") if isinstance(old, dict) else None, result.settings
        )
        if change is not None:
            raise UserError(
                f"{out} holds an evaluation of other settings ({change}); write this one "
                "elsewhere with --out FILE, or replace it with --overwrite"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result.to_json(), indent=2, default=_json_default)
    atomic_write_bytes(out, text.encode())
    freqs = {sae_key(p): result.feature_frequency(p).float() for p in result.feature_counts}
    if freqs:
        meta = {
            "n_tokens": str(int(result.metrics["n_tokens"])),
            "positions": json.dumps(list(result.feature_counts)),
        }
        atomic_save_tensors(freqs, feature_frequency_path(out), meta)
    return out


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def read_eval(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's `eval.json`, or None if it was never evaluated."""
    path = Path(run_dir) / EVAL_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON (rerun `e2e-sae eval {run_dir}`)") from None


def read_feature_frequency(run_dir: str | Path) -> dict[str, Tensor]:
    """{position: firing frequency per latent} from a run's eval, or {} if absent."""
    from safetensors import safe_open

    path = feature_frequency_path(Path(run_dir) / EVAL_JSON)
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        positions = json.loads((f.metadata() or {}).get("positions", "[]"))
        return {p: f.get_tensor(sae_key(p)) for p in positions}
