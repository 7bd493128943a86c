"""Where each dictionary sits in the LM: hook names (a config's patterns matched against the
model's, the block a hook is in), and each SAE's site: the hook it reads, the hook whose activation
it replaces, and so what it reconstructs; the hooks that splice it into a pass.

An SAE reads and replaces one hook. A transcoder reads hook `input` and replaces hook `output` by
its prediction. `resolve_sites` turns a config's patterns into sites, in the model's hook order.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor

from e2e_sae.errors import ConfigError
from e2e_sae.lm.runner import Hooks, move_to
from e2e_sae.saes import SAEActs, SAEBase

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
            example = all_names[min(1, len(all_names) - 1)]
            hint = f"did you mean '{close[0]}'?" if close else f"e.g. {example}"
            raise ConfigError(f"{field}: '{pat}' matches no hook of the model ({hint})")
        out.extend(m for m in matches if m not in out)
    order = {n: i for i, n in enumerate(all_names)}
    return sorted(out, key=order.__getitem__)


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


def one_hook(all_names: Sequence[str], pattern: str, field: str) -> str:
    """A hook name, or a substring that matches exactly one hook (else a ConfigError)."""
    names = filter_names(all_names, [pattern], field)
    if len(names) > 1:
        raise ConfigError(f"{field}: '{pattern}' matches {len(names)} hooks; name one hook")
    return names[0]


@dataclass(frozen=True)
class SpliceSite:
    """Where one SAE reads (`input_hook`) and which activation it replaces (`output_hook`, its
    position)."""

    input_hook: str
    output_hook: str

    @property
    def is_transcoder(self) -> bool:
        return self.input_hook != self.output_hook

    @property
    def hooks(self) -> tuple[str, ...]:
        """The hooks it reads and replaces (a clean run caches them for it)."""
        return (self.input_hook,) if not self.is_transcoder else (self.input_hook, self.output_hook)

    def target(self, acts: SAEActs, clean: Mapping[str, Tensor]) -> Tensor:
        """What the SAE here reconstructs: the activation it replaces. An SAE reads it too, so
        its input (in a spliced pass: what earlier SAEs made of it); a transcoder reads another
        hook, so the clean run's activation at `output_hook`."""
        return clean[self.output_hook] if self.is_transcoder else acts.input

    def spliced_value(self, acts: SAEActs) -> Tensor:
        """The value at `output_hook` that a downstream loss compares with the clean run's: the
        SAE's input (the original's choice: what earlier SAEs made of it), a transcoder's
        output (what it wrote)."""
        return acts.output if self.is_transcoder else acts.input

    def run(self, sae: SAEBase, clean: Mapping[str, Tensor]) -> SAEActs:
        """The SAE on the clean activation it reads (a local step: no pass through the LM)."""
        x = clean[self.input_hook]
        output, c = sae(x)
        return SAEActs(x, c, output)

    def splice(self, sae: SAEBase, acts: dict[str, Any], copies: int = 1) -> Hooks:
        """Forward hooks that splice `sae` into a pass here, recording its `SAEActs` in
        `acts[output_hook]` (for any runner that calls TransformerLens-style hooks). `copies`:
        the pass holds that many copies of the batch (`SAEBase.forward_copies`)."""
        pos = self.output_hook
        run = sae if copies == 1 else partial(sae.forward_copies, n_copies=copies)
        if not self.is_transcoder:
            return [(pos, _replace_hook(sae, run, pos, acts))]
        pending: dict[str, Tensor] = {}
        return [
            (self.input_hook, _transcoder_read_hook(sae, run, pos, acts, pending)),
            (pos, _transcoder_write_hook(pos, pending)),
        ]


def resolve_sites(
    all_names: Sequence[str],
    sae_positions: Sequence[str] | None,
    transcoders: Sequence[tuple[str, str]] = (),
) -> dict[str, SpliceSite]:
    """The one resolution of SAE sites, used by the model, the activation cache and `--dry-run`:
    `sae_positions` patterns (names or substrings, see `filter_names`) and transcoder
    (input, output) pairs (one hook each), in model order. A hook matched by two entries (two
    patterns, or a pattern and a transcoder output) or a substring naming several hooks where one
    is needed is a one-line ConfigError naming the field."""
    sites: dict[str, SpliceSite] = {}
    matched_by: dict[str, str] = {}
    for pat in sae_positions or []:
        for name in filter_names(all_names, [pat], "saes.sae_positions"):
            if name in matched_by:
                raise ConfigError(
                    f"saes.sae_positions: '{pat}' and '{matched_by[name]}' both "
                    f"match {name}; list each hook once"
                )
            matched_by[name] = pat
            sites[name] = SpliceSite(name, name)
    for inp, outp in transcoders:
        i = one_hook(all_names, inp, "saes.transcoders.input")
        o = one_hook(all_names, outp, "saes.transcoders.output")
        if o in sites:
            raise ConfigError(f"saes.transcoders.output: '{o}' already has an SAE")
        sites[o] = SpliceSite(i, o)
    order = {n: k for k, n in enumerate(all_names)}
    return {p: sites[p] for p in sorted(sites, key=order.__getitem__)}


# The hooks below run the SAE (`run`: its forward, or its forward on several copies) on its own
# device (a no-op unless the LM is spread over several devices) and hand the LM back its
# activation's device.
Run = Callable[[Tensor], tuple[Tensor, Tensor]]


def _replace_hook(sae: SAEBase, run: Run, pos: str, acts: dict[str, Any]) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: Any = None) -> Tensor:
        x_in = move_to(x, sae.device)
        output, c = run(x_in)
        acts[pos] = SAEActs(x_in, c, output)
        return move_to(output, x.device)

    return hook


def _transcoder_read_hook(
    sae: SAEBase, run: Run, pos: str, acts: dict[str, Any], pending: dict[str, Tensor]
) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: Any = None) -> Tensor:
        x_in = move_to(x, sae.device)
        output, c = run(x_in)
        acts[pos] = SAEActs(x_in, c, output)
        pending[pos] = output
        return x

    return hook


def _transcoder_write_hook(pos: str, pending: dict[str, Tensor]) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: Any = None) -> Tensor:
        return move_to(pending.pop(pos), x.device)

    return hook
