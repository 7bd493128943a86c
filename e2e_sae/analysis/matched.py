"""Matched comparisons of SAE types on their (L0, CE-loss increase) Pareto fronts: the CE increase
of each type at the same L0 and the L0 at the same CE increase (Braun et al. 2024, Tables 2-3),
interpolated on each type's front (linear in log L0 / linear in CE increase)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from e2e_sae.analysis.plots import (
    TYPE_ORDER,
    RunInfo,
    interpolate_x_at_y,
    interpolate_y_at_x,
    pareto_front,
)

# The paper's GPT-2 small results (Braun et al. 2024): at equal L0, e2e SAEs increase the CE loss by
# less than 0.45x of a local SAE's; at equal CE increase local SAEs need 2.2-2.6x the L0.
PAPER_CE_RATIO_AT_L0 = 0.45
PAPER_L0_RATIO_AT_CE = (2.2, 2.6)


def points(
    runs: Sequence[RunInfo], kind: str, position: str, seed: int | None = 0
) -> tuple[list[float], list[float], list[float]]:
    """(L0, CE increase, alive) of the runs of one type (of one seed; None: all seeds)."""
    rs = [
        r
        for r in runs
        if r.sae_type == kind
        and (seed is None or r.config.seed == seed)
        and position in r.positions
    ]
    return (
        [r.sae(position)["l0"] for r in rs],
        [r.eval["ce_loss_increase"] for r in rs],
        [r.sae(position)["alive_dict_elements"] for r in rs],
    )


def alive_at_ce(l0: list[float], ce: list[float], alive: list[float], at: float) -> float:
    """Alive elements on the (L0, CE) Pareto front at CE increase `at` (linear in CE)."""
    front = pareto_front(l0, ce)
    ces = [ce[i] for i in front][::-1]
    if not ces or at < ces[0] - 1e-12 or at > ces[-1] + 1e-12:
        return math.nan
    return float(np.interp(at, ces, [alive[i] for i in front][::-1]))


def overlap(ranges: list[tuple[float, float]]) -> tuple[float, float] | None:
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return (lo, hi) if lo < hi else None


def front_range(xs: list[float], ys: list[float], which: str) -> tuple[float, float]:
    front = pareto_front(xs, ys)
    vals = [xs[i] if which == "x" else ys[i] for i in front]
    return min(vals), max(vals)


def matched_tables(
    runs: Sequence[RunInfo], position: str, n_ref: int = 3, seed: int | None = 0
) -> dict[str, Any]:
    """Interpolated comparisons on each type's Pareto front, at `n_ref` reference points spread
    over the range every type covers (L0 geometric, CE increase linear)."""
    kinds = [k for k in TYPE_ORDER if points(runs, k, position, seed)[0]]
    pts = {k: points(runs, k, position, seed) for k in kinds}
    out: dict[str, Any] = {"types": kinds, "same_l0": [], "same_ce": []}
    if not kinds:
        return out
    l0_range = overlap([front_range(p[0], p[1], "x") for p in pts.values()])
    if l0_range:
        for l0 in np.geomspace(*l0_range, n_ref + 2)[1:-1]:
            row = {"l0": float(l0)}
            for k in kinds:
                row[k] = interpolate_y_at_x(pts[k][0], pts[k][1], float(l0))
            out["same_l0"].append(row)
    ce_range = overlap([front_range(p[0], p[1], "y") for p in pts.values()])
    if ce_range:
        for ce in np.linspace(*ce_range, n_ref + 2)[1:-1]:
            row = {"ce_loss_increase": float(ce)}
            for k in kinds:
                row[k] = interpolate_x_at_y(pts[k][0], pts[k][1], float(ce))
                row[f"{k}_alive"] = alive_at_ce(*pts[k], float(ce))
            out["same_ce"].append(row)
    return out


def ratios(matched: dict[str, Any], kind: str, base: str = "local") -> dict[str, list[float]]:
    """From `matched_tables`: CE increase of `kind` / `base` at each matched L0, and L0 of `base` /
    `kind` at each matched CE increase (the paper's two ratios)."""
    return {
        "ce_at_l0": [r[kind] / r[base] for r in matched["same_l0"]],
        "l0_at_ce": [r[base] / r[kind] for r in matched["same_ce"]],
    }


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
