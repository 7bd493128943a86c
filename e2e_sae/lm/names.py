"""Hook names and SAE keys: matching config patterns to a model's hook names, the block a hook
is in, the ModuleDict key of an SAE, its dictionary size."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from e2e_sae.errors import ConfigError

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def sae_key(hook_name: str) -> str:
    """ModuleDict keys may not contain '.', so the original library uses '-' instead."""
    return hook_name.replace(".", "-")


def hook_layer(hook_name: str, n_layers: int) -> int:
    """Index of the block a hook lives in (-1 before the blocks, n_layers after them)."""
    m = _LAYER_RE.match(hook_name)
    if m:
        return int(m.group(1))
    return -1 if hook_name.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")) else n_layers


def dict_size(d_in: int, ratio: float, position: str) -> int:
    """Latents of an SAE reading `d_in` dims (at least one)."""
    n = int(d_in * ratio)
    if n < 1:
        raise ConfigError(
            f"saes.dict_size_to_input_ratio: {ratio:g} x d_in {d_in} at "
            f"'{position}' gives {n} latents (need at least 1)"
        )
    return n


def matches_pattern(name: str, pattern: str) -> bool:
    """Whether `pattern` is `name` or a run of whole dot-separated parts of it: `hook_resid_pre`
    and `blocks.2` match `blocks.2.hook_resid_pre`; `blocks.2.hook_resid_pr` and `resid_pre` do
    not (a typo must not match a longer name)."""
    if pattern == name:
        return True
    parts, want = name.split("."), pattern.split(".")
    n = len(want)
    return any(parts[i : i + n] == want for i in range(len(parts) - n + 1))


def filter_names(all_names: Sequence[str], patterns: Sequence[str], field: str) -> list[str]:
    """Resolve hook names or runs of whole name parts (`hook_resid_pre` matches every layer; see
    `matches_pattern`), in model order. A pattern matching nothing is a ConfigError naming the
    field, with the closest hook name."""
    out: list[str] = []
    for pat in patterns:
        matches = [n for n in all_names if matches_pattern(n, pat)]
        if not matches:
            close = difflib.get_close_matches(pat, list(all_names), 1, 0.6)
            hint = (
                f"did you mean '{close[0]}'?"
                if close
                else f"e.g. {all_names[min(1, len(all_names) - 1)]}"
            )
            raise ConfigError(f"{field}: '{pat}' matches no hook of the model ({hint})")
        out.extend(m for m in matches if m not in out)
    order = {n: i for i, n in enumerate(all_names)}
    return sorted(out, key=order.__getitem__)


def one_hook(all_names: Sequence[str], pattern: str, field: str) -> str:
    """A hook name, or a substring that matches exactly one hook (else a ConfigError)."""
    names = filter_names(all_names, [pattern], field)
    if len(names) > 1:
        raise ConfigError(f"{field}: '{pattern}' matches {len(names)} hooks; name one hook")
    return names[0]


def check_after_first_sae(
    order: Sequence[str], outputs: Sequence[str], hooks: Sequence[str], field: str
) -> None:
    """Downstream (`in_to_orig`) hooks must run after the first SAE output: before it (or at it)
    the spliced run equals the clean one and the term would be 0 at every step. `order`: hook
    names in the order the forward pass runs them."""
    first = min(outputs, key=order.index)
    early = [h for h in hooks if order.index(h) <= order.index(first)]
    if early:
        raise ConfigError(
            f"{field}: '{early[0]}' is not after the first SAE ('{first}'), where the "
            "spliced run equals the clean run (the term would be 0)"
        )
