"""Activation analysis of SAE runs (Braun et al. 2024, section 3.3 and appendix: the norms and
directions of SAE outputs, and resample-ablation of principal directions).

For one SAE at hook h (spliced in alone, so its input x is the clean activation) over the same
eval tokens for every run:

- **Norms and cosine per sequence position**: for each position t of the window, the mean over
  windows of ||x||, ||x_hat||, ||x_hat|| / ||x|| and cos(x, x_hat). The paper's table reports the
  norm ratio at position 0 and at positions > 0.
- **Principal directions**: u_1..u_K, the top eigenvectors of the covariance of the clean x over
  all tokens (`principal_directions`), with the share of the total variance each carries.
  For each run, `explained` = 1 - sum_t ((x_t - x_hat_t)·u)^2 / sum_t ((x_t - mean x)·u)^2 (how
  much of the variance along u the SAE output reproduces; 1 = all of it) and `kept` =
  Var(x_hat·u) / Var(x·u) (how much variance along u the output carries, right or wrong).
- **Resample ablation**: replace the component of x along u by that of another token,
  x'_t = x_t - (x_t·u) u + (x_{π(t)}·u) u, with one fixed permutation π of the tokens (window
  and position flattened; position 0 of each window stays as it is unless `shuffle_first`), then
  run the rest of the model. Reported per direction: KL(P_ref || P_ablated) per token, mean over
  all tokens, where ref is the same model without the ablation. For the clean model the ablation
  acts on the activation at h; for a run, on the SAE's input (the SAE then encodes the ablated
  activation), so a run whose SAE ignores direction u gets a KL near 0 for it.

Everything runs without gradients; `activation_analysis` loads each run once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.analysis.geometry import run_labels, short_position, type_shades
from e2e_sae.analysis.plots import TYPE_COLORS, RunInfo, save_figure
from e2e_sae.data import create_data_loader
from e2e_sae.errors import UserError
from e2e_sae.eval.evaluate import eval_dataset
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.objective.losses import kl_clean_to_new
from e2e_sae.saes import SAEActs

logger = logging.getLogger(__name__)

KL_CHUNK_TOKENS = 2048


# --- formulas on tensors --------------------------------------------------------------------------
def norms_by_position(x: Tensor, x_hat: Tensor) -> dict[str, list[float]]:
    """Per sequence position (x, x_hat [batch, pos, d]): means over the batch of ||x||, ||x_hat||,
    ||x_hat|| / ||x|| and cos(x, x_hat) (norms floored at 1e-8)."""
    nx = x.float().norm(dim=-1)
    nh = x_hat.float().norm(dim=-1)
    cos = (x.float() * x_hat.float()).sum(-1) / (nx.clamp_min(1e-8) * nh.clamp_min(1e-8))
    return {
        "input_norm": nx.mean(0).tolist(),
        "output_norm": nh.mean(0).tolist(),
        "norm_ratio": (nh / nx.clamp_min(1e-8)).mean(0).tolist(),
        "cosine": cos.mean(0).tolist(),
    }


def first_and_rest(per_position: Sequence[float]) -> tuple[float, float]:
    """(value at position 0, mean over positions > 0) of a per-position mean."""
    rest = list(per_position[1:])
    return float(per_position[0]), float(np.mean(rest)) if rest else math.nan


def principal_directions(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k principal directions of the rows of x [..., d] (all tokens, centred): ([k, d] unit
    rows, [k] share of the total variance each carries). Each direction's sign makes its largest
    |component| positive, so the result does not depend on the eigensolver's sign choice."""
    flat = x.reshape(-1, x.shape[-1]).double()
    flat = flat - flat.mean(0)
    cov = flat.T @ flat / max(1, flat.shape[0] - 1)
    vals, vecs = torch.linalg.eigh(cov)
    order = torch.argsort(vals, descending=True)[:k]
    dirs = vecs[:, order].T  # [k, d]
    sign = torch.sign(dirs.gather(1, dirs.abs().argmax(1, keepdim=True)))
    dirs = dirs * sign
    share = vals[order] / vals.clamp_min(0).sum()
    return dirs.float(), share.float()


def direction_reconstruction(x: Tensor, x_hat: Tensor, dirs: Tensor) -> dict[str, list[float]]:
    """Per direction u (rows of dirs [k, d]): `explained` = 1 - sum((x - x_hat)·u)^2 /
    sum((x - mean x)·u)^2 and `kept` = Var(x_hat·u) / Var(x·u), over all tokens."""
    xf = x.reshape(-1, x.shape[-1]).double()
    hf = x_hat.reshape(-1, x_hat.shape[-1]).double()
    d = dirs.double()
    px, ph = xf @ d.T, hf @ d.T  # [tokens, k]
    var_x = (px - px.mean(0)).pow(2).sum(0)
    explained = 1 - (px - ph).pow(2).sum(0) / var_x
    kept = (ph - ph.mean(0)).pow(2).sum(0) / var_x
    return {"explained": explained.tolist(), "kept": kept.tolist()}


def resample_permutation(
    batch: int, n_ctx: int, seed: int = 0, shuffle_first: bool = False
) -> Tensor:
    """A fixed permutation of the batch*n_ctx token slots (flattened [batch, pos]): the tokens at
    positions > 0 (all positions with `shuffle_first`) are shuffled among themselves; the others
    map to themselves."""
    idx = torch.arange(batch * n_ctx)
    movable = idx if shuffle_first else idx[(idx % n_ctx) != 0]
    g = torch.Generator().manual_seed(seed)
    perm = idx.clone()
    perm[movable] = movable[torch.randperm(len(movable), generator=g)]
    return perm


def resample_direction(x: Tensor, u: Tensor, perm: Tensor) -> Tensor:
    """x [batch, pos, d] with its component along unit u [d] taken from the token perm[t] (over
    flattened [batch, pos]): x_t - (x_t·u) u + (x_perm(t)·u) u."""
    flat = x.reshape(-1, x.shape[-1])
    u = u.to(flat.dtype)
    proj = flat @ u  # [tokens]
    out = flat + (proj[perm] - proj)[:, None] * u[None, :]
    return out.reshape(x.shape)


# --- on a model -----------------------------------------------------------------------------------
@torch.no_grad()
def collect_activations(
    model: SAETransformer, batches: Sequence[Tensor], position: str
) -> tuple[Tensor, Tensor]:
    """(x, x_hat) [n_windows, n_ctx, d] at `position` with that SAE alone spliced in (so x is the
    clean activation), on CPU."""
    xs, hs = [], []
    for tokens in batches:
        _, acts = model.forward(tokens.to(model.lm.device), sae_positions=[position])
        a = acts[position]
        assert isinstance(a, SAEActs)
        xs.append(a.input.float().cpu())
        hs.append(a.output.float().cpu())
    return torch.cat(xs), torch.cat(hs)


@torch.no_grad()
def resample_ablation_kl(
    model: SAETransformer,
    batches: Sequence[Tensor],
    position: str,
    dirs: Tensor,
    *,
    spliced: bool,
    perm: Tensor | None = None,
    seed: int = 0,
    shuffle_first: bool = False,
    progress: bool = False,
    desc: str = "resample",
) -> list[float]:
    """Per direction (rows of dirs [k, d]): KL(P_ref || P_ablated) per token, mean over the tokens
    of all `batches` (see the module docstring). `spliced`: the SAE at `position` is spliced in
    and the ablation acts on its input; else the clean model, ablated at `position`. `perm`: a
    permutation of one batch's flattened tokens (default `resample_permutation(..., seed)`)."""
    site = model.sites.get(position)
    if spliced and (site is None or site.is_transcoder):
        raise UserError(f"resample ablation: no SAE reads and replaces '{position}'")
    sae = model.sae(position) if spliced else None

    def run(tokens: Tensor, edit: Callable[[Tensor], Tensor]) -> Tensor:
        def hook(x: Tensor, hook: Any = None) -> Tensor:
            y = edit(x)
            if sae is not None:
                y = sae(y.to(sae.device))[0].to(x.device)
            return y

        with model.lm.hooks([(position, hook)]):
            logits = model.lm.run(tokens)
        assert logits is not None
        return logits

    totals = [0.0] * len(dirs)
    n = 0
    steps = [(b, k) for b in range(len(batches)) for k in range(len(dirs))]
    bar = tqdm(total=len(steps), desc=desc, disable=not progress, leave=False)
    for tokens in batches:
        tokens = tokens.to(model.lm.device)
        p = perm
        if p is None:
            p = resample_permutation(tokens.shape[0], tokens.shape[1], seed, shuffle_first)
        if p.numel() != tokens.numel():
            raise UserError(
                f"resample ablation: permutation of {p.numel()} tokens for a batch of "
                f"{tokens.numel()}"
            )
        ref = run(tokens, lambda x: x)
        for k, u in enumerate(dirs):
            ablated = run(
                tokens, lambda x, u=u, p=p: resample_direction(x, u.to(x.device), p.to(x.device))
            )
            totals[k] += float(kl_clean_to_new(ref, ablated, KL_CHUNK_TOKENS)) * tokens.numel()
            bar.update(1)
        n += tokens.numel()
    bar.close()
    return [t / n for t in totals]


# --- over runs ------------------------------------------------------------------------------------
@dataclass
class RunActivations:
    """One run's results at one position."""

    run: RunInfo
    position: str
    by_position: dict[str, list[float]]
    directions: dict[str, list[float]]
    resample_kl: list[float]

    def summary(self) -> dict[str, float]:
        r0, r_rest = first_and_rest(self.by_position["norm_ratio"])
        c0, c_rest = first_and_rest(self.by_position["cosine"])
        return {
            "norm_ratio_pos0": r0,
            "norm_ratio_rest": r_rest,
            "cosine_pos0": c0,
            "cosine_rest": c_rest,
        }


@dataclass
class ActivationReport:
    """`activation_analysis` results: per position the clean model's principal directions and
    resample-ablation KL, and each run's results."""

    n_tokens: int
    n_ctx: int
    seed: int
    shuffle_first: bool
    variance_share: dict[str, list[float]] = field(default_factory=dict)
    clean_kl: dict[str, list[float]] = field(default_factory=dict)
    runs: list[RunActivations] = field(default_factory=list)
    samples: dict[tuple[Path, str], tuple[Tensor, Tensor]] = field(default_factory=dict)
    """(||x||, ||x_hat||) per token, a seeded sample for the scatter plot."""

    def to_json(self, labels: dict[Path, str]) -> dict[str, Any]:
        return {
            "n_tokens": self.n_tokens,
            "n_ctx": self.n_ctx,
            "seed": self.seed,
            "shuffle_first": self.shuffle_first,
            "kl": "KL(P_ref || P_ablated) per token, mean over tokens (nats)",
            "positions": {
                pos: {
                    "variance_share": self.variance_share[pos],
                    "clean_resample_kl": self.clean_kl[pos],
                    "runs": {
                        labels[r.run.run_dir]: {
                            "run_dir": r.run.run_dir.name,
                            "type": r.run.sae_type,
                            **r.summary(),
                            "by_position": r.by_position,
                            "direction_explained": r.directions["explained"],
                            "direction_kept": r.directions["kept"],
                            "resample_kl": r.resample_kl,
                        }
                        for r in self.runs
                        if r.position == pos
                    },
                }
                for pos in self.variance_share
            },
        }


def _same_lm(models: dict[Path, Any]) -> None:
    keys = {
        p: json.dumps(
            {k: getattr(c, k) for k in ("tlens_model_name", "tlens_model_path", "hf_model_name")}
            | {"tlens_config": c.tlens_config},
            default=str,
            sort_keys=True,
        )
        for p, c in models.items()
    }
    if len(set(keys.values())) > 1:
        names = ", ".join(p.name for p in keys)
        raise UserError(f"activation analysis: the runs use different language models ({names})")


def activation_analysis(
    runs: Sequence[RunInfo],
    *,
    n_tokens: int = 8192,
    n_directions: int = 16,
    batch_size: int = 8,
    seed: int = 0,
    shuffle_first: bool = False,
    device: str | None = None,
    progress: bool = False,
    scatter_points: int = 4000,
) -> ActivationReport:
    """The analyses of the module docstring for every run at every position it has an SAE, on the
    first `n_tokens` tokens (whole windows) of the first run's eval data, which every run sees.
    The principal directions and the clean model's resample-ablation KL are computed once per
    position from the first run that has an SAE there (every run must use the same LM)."""
    if not runs:
        raise UserError("activation analysis: no runs given")
    if n_directions < 1 or n_tokens < 1:
        raise UserError("activation analysis: n_directions and n_tokens must be positive")
    _same_lm({r.run_dir: r.config for r in runs})
    first = runs[0].config
    ds = eval_dataset(first)
    n_windows = max(1, math.ceil(n_tokens / ds.n_ctx))
    it = create_data_loader(ds, batch_size, first.seed + 42)
    batches: list[Tensor] = []
    got = 0
    while got < n_windows:
        b = next(it, None)
        if b is None:
            break
        b = b[: n_windows - got]
        batches.append(b)
        got += b.shape[0]
    if not batches:
        raise UserError("activation analysis: the eval data gave no windows")
    report = ActivationReport(got * ds.n_ctx, ds.n_ctx, seed, shuffle_first)
    dirs: dict[str, Tensor] = {}
    rng = torch.Generator().manual_seed(seed)
    for r in tqdm(runs, desc="runs", disable=not progress or len(runs) == 1, leave=False):
        model = SAETransformer.from_local_path(r.run_dir, device=device)
        for pos in model.sae_positions:
            if model.sites[pos].is_transcoder:
                logger.info("%s: %s is a transcoder; skipped", r.run_dir, pos)
                continue
            x, x_hat = collect_activations(model, batches, pos)
            if pos not in dirs:
                dirs[pos], share = principal_directions(x, min(n_directions, x.shape[-1]))
                report.variance_share[pos] = share.tolist()
                report.clean_kl[pos] = resample_ablation_kl(
                    model,
                    batches,
                    pos,
                    dirs[pos],
                    spliced=False,
                    seed=seed,
                    shuffle_first=shuffle_first,
                    progress=progress,
                    desc="resample (clean)",
                )
            kl = resample_ablation_kl(
                model,
                batches,
                pos,
                dirs[pos],
                spliced=True,
                seed=seed,
                shuffle_first=shuffle_first,
                progress=progress,
                desc=f"resample ({r.name})",
            )
            report.runs.append(
                RunActivations(
                    r,
                    pos,
                    norms_by_position(x, x_hat),
                    direction_reconstruction(x, x_hat, dirs[pos]),
                    kl,
                )
            )
            nx, nh = x.norm(dim=-1).flatten(), x_hat.norm(dim=-1).flatten()
            pick = torch.randperm(nx.numel(), generator=rng)[:scatter_points]
            report.samples[(r.run_dir, pos)] = (nx[pick], nh[pick])
        del model
    return report


# --- figures --------------------------------------------------------------------------------------
def _unique(runs: Sequence[RunInfo]) -> list[RunInfo]:
    """Each run once (by directory), in order."""
    return list({r.run_dir: r for r in reversed(runs)}.values())[::-1]


def _positions(report: ActivationReport) -> list[str]:
    return list(report.variance_share)


def _line_styles(runs: Sequence[RunInfo]) -> dict[Path, dict[str, Any]]:
    """A colour per run (shades of its type's colour) and a line style per type."""
    styles = {"local": "-", "e2e": "--", "e2e+ds": ":"}
    out: dict[Path, dict[str, Any]] = {}
    for pos in {p for r in runs for p in r.positions}:
        shades = type_shades([r for r in runs if pos in r.positions], pos)
        for r in runs:
            if r.run_dir in shades and r.run_dir not in out:
                out[r.run_dir] = {"color": shades[r.run_dir], "ls": styles[r.sae_type]}
    for r in runs:
        out.setdefault(r.run_dir, {"color": TYPE_COLORS[r.sae_type], "ls": styles[r.sae_type]})
    return out


# Legends right of the panel (saved with bbox_inches="tight"), so they never hide a line.
_OUTSIDE: dict[str, Any] = {
    "fontsize": 7,
    "frameon": False,
    "loc": "upper left",
    "bbox_to_anchor": (1.01, 1.0),
}


def norms_figure(report: ActivationReport) -> Figure:
    """Per SAE position: mean ||x_hat|| / ||x|| and mean cos(x, x_hat) against the sequence
    position, one line per run."""
    runs = [r.run for r in report.runs]
    labels, styles = run_labels(_unique(runs)), _line_styles(runs)
    positions = _positions(report)
    fig = Figure(figsize=(12.0, 3.6 * len(positions)))
    for i, pos in enumerate(positions):
        ax_n = fig.add_subplot(len(positions), 2, 2 * i + 1)
        ax_c = fig.add_subplot(len(positions), 2, 2 * i + 2)
        for ra in (r for r in report.runs if r.position == pos):
            t = np.arange(len(ra.by_position["norm_ratio"]))
            kw = styles[ra.run.run_dir]
            ax_n.plot(t, ra.by_position["norm_ratio"], label=labels[ra.run.run_dir], lw=1.2, **kw)
            ax_c.plot(t, ra.by_position["cosine"], lw=1.2, **kw)
        ax_n.axhline(1.0, color="0.4", lw=0.8, ls=":")
        ax_n.set_ylabel("mean ‖SAE output‖ / ‖input‖")
        ax_c.set_ylabel("mean cos(input, SAE output)")
        ax_n.set_title(f"{short_position(pos)}: output norm relative to input", fontsize=10)
        ax_c.set_title(f"{short_position(pos)}: direction of output vs input", fontsize=10)
        for ax in (ax_n, ax_c):
            ax.set_xlabel("position in the context window (tokens)")
            ax.grid(alpha=0.3)
        ax_c.legend(*ax_n.get_legend_handles_labels(), **_OUTSIDE)
    fig.tight_layout()
    return fig


def norm_scatter_figure(report: ActivationReport) -> Figure:
    """||x_hat|| against ||x|| per token (a seeded sample), one panel per run and position, with
    the diagonal ||x_hat|| = ||x||."""
    items = [(ra.run, ra.position) for ra in report.runs]
    labels = run_labels(_unique([r for r, _ in items]))
    ncols = min(4, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 3.4 * nrows))
    top = max(float(torch.cat(report.samples[(r.run_dir, p)]).max()) for r, p in items) * 1.05
    for i, (r, p) in enumerate(items):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        nx, nh = report.samples[(r.run_dir, p)]
        ax.scatter(
            nx.numpy(), nh.numpy(), s=2, alpha=0.3, color=TYPE_COLORS[r.sae_type], rasterized=True
        )
        ax.plot([0, top], [0, top], color="0.3", lw=0.8, ls="--")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_aspect("equal")
        ax.set_title(f"{labels[r.run_dir]}, {short_position(p)}", fontsize=9)
        ax.set_xlabel("‖input‖")
        if i % ncols == 0:
            ax.set_ylabel("‖SAE output‖")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def directions_figure(report: ActivationReport) -> Figure:
    """Per SAE position: the share of the residual's variance along each of its top principal
    directions (top), and how much of the variance along each direction every run's SAE output
    reproduces (explained, solid) (bottom)."""
    runs = [r.run for r in report.runs]
    labels, styles = run_labels(_unique(runs)), _line_styles(runs)
    positions = _positions(report)
    fig = Figure(figsize=(8.8 * len(positions), 6.4))
    for i, pos in enumerate(positions):
        share = report.variance_share[pos]
        k = np.arange(len(share))
        ax_s = fig.add_subplot(2, len(positions), i + 1)
        ax_s.bar(k, np.asarray(share) * 100, color="0.55")
        ax_s.set_ylabel("share of variance (%)")
        ax_s.set_xlabel("principal direction (0 = largest variance)")
        ax_s.set_title(
            f"{short_position(pos)}: principal directions of the clean input", fontsize=10
        )
        ax_e = fig.add_subplot(2, len(positions), len(positions) + i + 1, sharex=ax_s)
        for ra in (r for r in report.runs if r.position == pos):
            ax_e.plot(
                k,
                ra.directions["explained"],
                marker="o",
                ms=3,
                label=labels[ra.run.run_dir],
                **styles[ra.run.run_dir],
            )
        ax_e.axhline(0.0, color="0.4", lw=0.8, ls=":")
        ax_e.set_ylabel("variance along it explained")
        ax_e.set_xlabel("principal direction (0 = largest variance)")
        ax_e.set_title(f"{short_position(pos)}: reconstructed by each SAE", fontsize=10)
        ax_e.legend(**_OUTSIDE)
        for ax in (ax_s, ax_e):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def resample_figure(report: ActivationReport) -> Figure:
    """Per SAE position: KL(P_ref || P_ablated) when one principal direction is resample-ablated,
    for the clean model (black) and each run spliced in."""
    runs = [r.run for r in report.runs]
    labels, styles = run_labels(_unique(runs)), _line_styles(runs)
    positions = _positions(report)
    fig = Figure(figsize=(6.8 * len(positions), 4.2))
    for i, pos in enumerate(positions):
        ax = fig.add_subplot(1, len(positions), i + 1)
        kl = report.clean_kl[pos]
        k = np.arange(len(kl))
        ax.plot(k, kl, "o-", color="black", ms=3, label="clean model")
        for ra in (r for r in report.runs if r.position == pos):
            ax.plot(
                k,
                ra.resample_kl,
                marker="o",
                ms=3,
                label=labels[ra.run.run_dir],
                **styles[ra.run.run_dir],
            )
        ax.set_xlabel("principal direction resample-ablated (0 = largest variance)")
        ax.set_ylabel("KL(unablated ‖ ablated) (nats/token)")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{short_position(pos)}: sensitivity to each direction", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


# --- tables and one call for all of it ------------------------------------------------------------
def activations_markdown(report: ActivationReport) -> str:
    runs = _unique([r.run for r in report.runs])
    labels = run_labels(runs)
    first = "" if report.shuffle_first else " (position 0 of each window left in place)"
    lines = [
        "# Activation analysis",
        "",
        f"{report.n_tokens:,} eval tokens ({report.n_tokens // report.n_ctx} windows of "
        f"{report.n_ctx}). Each SAE spliced in alone. Resample ablation: the component along a "
        f"principal direction of the clean input is exchanged between tokens by one fixed "
        f"permutation (seed {report.seed}){first}; KL(P_unablated || P_ablated) per token, in "
        "nats, mean over all tokens.",
        "",
    ]
    for pos in _positions(report):
        mine = [r for r in report.runs if r.position == pos]
        share = report.variance_share[pos]
        kl = report.clean_kl[pos]
        show = min(4, len(share))
        lines += [
            f"## {pos}",
            "",
            "| run | type | ‖out‖/‖in‖ pos 0 | ‖out‖/‖in‖ pos > 0 | cos pos 0 | cos pos > 0 | "
            + " | ".join(f"EV dir {k}" for k in range(show))
            + " | "
            + " | ".join(f"KL dir {k}" for k in range(show))
            + " |",
            "|" + "---|" * (6 + 2 * show),
        ]
        lines.append(
            "| clean model | | | | | | "
            + " | ".join("" for _ in range(show))
            + " | "
            + " | ".join(f"{v:.4f}" for v in kl[:show])
            + " |"
        )
        for ra in mine:
            s = ra.summary()
            lines.append(
                f"| {labels[ra.run.run_dir]} | {ra.run.sae_type} | {s['norm_ratio_pos0']:.3f} | "
                f"{s['norm_ratio_rest']:.3f} | {s['cosine_pos0']:.3f} | {s['cosine_rest']:.3f} | "
                + " | ".join(f"{v:.3f}" for v in ra.directions["explained"][:show])
                + " | "
                + " | ".join(f"{v:.4f}" for v in ra.resample_kl[:show])
                + " |"
            )
        lines += [
            "",
            "Share of the input's variance along directions 0-"
            f"{len(share) - 1}: " + ", ".join(f"{100 * v:.1f}%" for v in share) + ".",
            "",
        ]
    return "\n".join(lines)


def write_activations(report: ActivationReport, out_dir: str | Path) -> list[Path]:
    """The figures and tables of `report` into `out_dir`: activation_norms_by_position,
    activation_norm_scatter, principal_directions_reconstructed, resample_ablation_kl (PNG +
    SVG), activations.md and activations.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if not report.runs:
        return paths
    paths += save_figure(norms_figure(report), out, "activation_norms_by_position")
    paths += save_figure(norm_scatter_figure(report), out, "activation_norm_scatter")
    paths += save_figure(directions_figure(report), out, "principal_directions_reconstructed")
    paths += save_figure(resample_figure(report), out, "resample_ablation_kl")
    md = out / "activations.md"
    md.write_text(activations_markdown(report))
    js = out / "activations.json"
    labels = run_labels(_unique([r.run for r in report.runs]))
    js.write_text(json.dumps(report.to_json(labels), indent=2))
    return paths + [md, js]
