"""Hook names: matching config patterns to a model's hook names, the block a hook is in, the
dictionary size of an SAE there."""

from __future__ import annotations

import re
from collections.abc import Sequence

from e2e_sae.errors import ConfigError

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


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


def filter_names(all_names: Sequence[str], patterns: Sequence[str], field: str) -> list[str]:
    """Resolve hook names or substrings (`hook_resid_pre` matches every layer), in model order."""
    out: list[str] = []
    for pat in patterns:
        matches = [pat] if pat in all_names else [n for n in all_names if pat in n]
        if not matches:
            raise ConfigError(
                f"{field}: '{pat}' matches no hook of the model (e.g. {all_names[1]})"
            )
        out.extend(m for m in matches if m not in out)
    order = {n: i for i, n in enumerate(all_names)}
    return sorted(out, key=order.__getitem__)


def one_hook(all_names: Sequence[str], pattern: str, field: str) -> str:
    """A hook name, or a substring that matches exactly one hook (else a ConfigError)."""
    names = filter_names(all_names, [pattern], field)
    if len(names) > 1:
        raise ConfigError(f"{field}: '{pattern}' matches {len(names)} hooks; name one hook")
    return names[0]
