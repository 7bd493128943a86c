"""Short names of runs for figures and tables: what was trained (type, architecture) and what set
its sparsity (`λ=2` or `k=16`), plus the settings that tell apart runs that would otherwise share
a name (`seed=1`, `lr=0.001`). Full run directory names go into a side table (`runs_table`).

The SAE type comes from the loss config: `e2e+ds` when an `in_to_orig` (downstream) term is set,
`e2e` when `logits_kl` is set, `local` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from e2e_sae.config import Config

TYPE_ORDER = ("local", "e2e", "e2e+ds")
# Config keys that name a run or say where it goes, not what it learns.
NAME_KEYS = ("run_name", "wandb_run_name", "wandb_run_name_prefix", "save_dir", "wandb_project")
# Keys worth naming first when runs differ by them (then any other key, alphabetically).
_PREFERRED = ("seed", "lr", "saes.dict_size_to_input_ratio", "n_samples", "saes.sae_positions")


def sae_type(config: Config) -> str:
    """`local`, `e2e` or `e2e+ds`, from which loss terms the run optimised (coefficient > 0)."""
    loss = config.loss
    if loss.in_to_orig is not None and loss.in_to_orig.total_coeff > 0:
        return "e2e+ds"
    if loss.logits_kl is not None and loss.logits_kl.coeff > 0:
        return "e2e"
    return "local"


def sparsity_label(config: Config) -> str:
    """What sets the run's sparsity: `k=32` (TopK family) or `λ=0.5` (the sparsity coeff)."""
    if config.saes.k is not None:
        return f"k={config.saes.k}"
    sp = config.loss.sparsity
    return f"λ={sp.coeff:g}" if sp is not None else ""


def base_label(config: Config) -> str:
    """`e2e relu λ=2`: type, architecture, sparsity."""
    return " ".join(
        x for x in (sae_type(config), config.saes.architecture, sparsity_label(config)) if x
    )


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(_value(x) for x in v)
    return str(v)


def unique_labels(configs: Sequence[Config], max_extra: int = 2) -> list[str]:
    """`base_label` of each config; where several share one, each gets the (up to `max_extra`)
    settings that differ between them (`e2e relu λ=1, seed=1`), and `#2`, `#3`, ... if they are
    still equal (the same config trained twice)."""
    labels = [base_label(c) for c in configs]
    flat = [_flat(c.model_dump(mode="json", exclude=set(NAME_KEYS))) for c in configs]
    out = list(labels)
    for label in dict.fromkeys(labels):
        group = [i for i, lb in enumerate(labels) if lb == label]
        if len(group) < 2:
            continue
        keys = sorted({k for i in group for k in flat[i]})
        differ = [k for k in keys if len({_value(flat[i].get(k)) for i in group}) > 1]
        differ.sort(key=lambda k: (_PREFERRED.index(k) if k in _PREFERRED else len(_PREFERRED), k))
        for i in group:
            extra = [f"{k.rsplit('.', 1)[-1]}={_value(flat[i].get(k))}" for k in differ[:max_extra]]
            out[i] = ", ".join([label, *extra])
        same = [out[i] for i in group]
        seen: dict[str, int] = {}
        for i, lb in zip(group, same, strict=True):
            if same.count(lb) > 1:
                seen[lb] = seen.get(lb, 0) + 1
                out[i] = f"{lb} #{seen[lb]}"
    return out


def runs_table(
    labels: Sequence[str],
    run_dirs: Sequence[Path],
    rows: Sequence[Sequence[Any]] = (),
    headers: Sequence[str] = (),
) -> str:
    """A Markdown table: each run's label (as in the figures), extra columns, its directory."""
    head = ["label", *headers, "run directory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    extra = list(rows) or [[] for _ in labels]
    for label, row, d in zip(labels, extra, run_dirs, strict=True):
        cells = [label, *(_value(x) for x in row), str(d)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
