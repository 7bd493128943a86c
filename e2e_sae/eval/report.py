"""Plain-text tables for the CLI (the library itself returns values and never prints)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from e2e_sae.eval.evaluate import EvalResult


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def eval_table(result: EvalResult) -> str:
    """Model-level metrics, then one row per SAE (ours, then SAEBench's core-eval metrics)."""
    m = result.metrics
    order = (
        "ce_loss_clean",
        "ce_loss_with_saes",
        "ce_loss_increase",
        "ce_loss_zero_abl",
        "ce_loss_score",
        "kl",
        "kl_div_score",
        "top1_agreement",
        "tvd",
        "graph_replacement_score",
        "graph_completeness_score",
        "n_tokens",
    )
    keys = [k for k in order if k in m]
    top = table(["metric", "value"], [[k, m[k]] for k in keys])
    cols = [
        "l0",
        "alive_dict_elements",
        "dead_dict_elements",
        "explained_variance",
        "explained_variance_ln",
        "explained_variance_local",
        "mse",
    ]
    cols = [c for c in cols if any(c in d for d in result.per_sae.values())]
    out = top + "\n\n" + _per_sae_table(result, cols)
    if "dead_dict_elements" in cols and "n_tokens" in m:
        out += f"\n(dead: fired on none of the {int(m['n_tokens']):,} eval tokens)"
    saebench = ["l1", "l2_ratio", "relative_reconstruction_bias", "cossim"]
    saebench = [c for c in saebench if any(c in d for d in result.per_sae.values())]
    if saebench:  # a second table: one row of all ten columns would not fit a terminal
        out += "\n\n" + _per_sae_table(result, saebench)
    return out


def _per_sae_table(result: EvalResult, cols: list[str]) -> str:
    rows = [[pos, *(d.get(c, "") for c in cols)] for pos, d in result.per_sae.items()]
    return table(["sae_position", *cols], rows)


def downstream_table(result: EvalResult) -> str:
    """One row per residual-stream hook after the first SAE (spliced vs clean run)."""
    rows = [[h, d["explained_variance"], d["mse"]] for h, d in result.downstream.items()]
    return table(["hook", "explained_variance", "mse"], rows)
