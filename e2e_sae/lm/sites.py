"""Where each dictionary sits in the LM: hook names (a config's patterns matched against the
model's, the block a hook is in), and each SAE's site: the hook it reads, the hook whose activation
it replaces, and so what it reconstructs; the hooks that splice it into a pass.

An SAE reads and replaces one hook. A transcoder reads hook `input` and replaces hook `output` by
its prediction. A transcoder set is one transcoder per listed block, each reading that block's MLP
input and replacing its MLP output (`TranscoderSet`). A cross-layer transcoder (CLT) is such a set
whose dictionary at block l also writes to the MLP outputs of every later listed block: its site
lists those hooks (`SpliceSite.later_outputs`), and the value at each output hook is the sum of
what every dictionary writing there wrote. `resolve_sites` turns a config's patterns into sites,
in the model's hook order.

In a pass (`SpliceSite.splice`, one `PassWrites` shared by every site of the pass) a dictionary
runs when its input hook fires and adds what it writes to each of its output hooks; each output
hook is replaced by the sum when the pass reaches it. On clean activations (local training)
`run_sites` computes the same sums without a pass.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor

from e2e_sae.config import Config
from e2e_sae.errors import ConfigError
from e2e_sae.lm.runner import Hooks, move_to
from e2e_sae.saes import SAEActs, SAEBase, is_cross_layer

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
_BLOCK_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


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
    """Where one dictionary reads (`input_hook`) and which activation it replaces (`output_hook`,
    its position); a cross-layer transcoder's dictionary also writes to `later_outputs` (the
    output hooks of the later blocks of its set), and `skip` gives it a linear skip path from its
    input to its outputs (`transcoder_set.skip`)."""

    input_hook: str
    output_hook: str
    later_outputs: tuple[str, ...] = ()
    skip: bool = False

    @property
    def is_transcoder(self) -> bool:
        return self.input_hook != self.output_hook

    @property
    def targets(self) -> tuple[str, ...]:
        """Every hook the dictionary here writes to: its own output hook first."""
        return (self.output_hook, *self.later_outputs)

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

    def splice(
        self, sae: SAEBase, acts: dict[str, Any], copies: int = 1, writes: PassWrites | None = None
    ) -> Hooks:
        """Forward hooks that splice `sae` into a pass here, recording its `SAEActs` in
        `acts[output_hook]` (for any runner that calls TransformerLens-style hooks). `copies`:
        the pass holds that many copies of the batch (`SAEBase.forward_copies`). `writes`: what
        the dictionaries of this pass wrote to hooks it has not reached yet, shared by all sites
        of one pass (a transcoder's own when not given)."""
        pos = self.output_hook
        if not self.is_transcoder:
            run = sae if copies == 1 else partial(sae.forward_copies, n_copies=copies)
            return [(pos, _replace_hook(sae, run, pos, acts))]
        state = writes if writes is not None else PassWrites()
        return [
            (self.input_hook, _read_hook(self, sae, copies, state)),
            (pos, _write_hook(pos, acts, state)),
        ]


class PassWrites:
    """What the dictionaries of one pass (or of one `run_sites` call) have written: per output
    hook, the sum of their contributions so far (`pending`), and per position what its
    dictionary read and its code (`reads`), until the output hook takes them."""

    def __init__(self) -> None:
        self.pending: dict[str, Tensor] = {}
        self.reads: dict[str, tuple[Tensor, Tensor]] = {}

    def add(self, targets: Sequence[str], outputs: Tensor) -> None:
        """Add `outputs[j]` (a dictionary's contribution [n_targets, ..., d]) to `targets[j]`."""
        for hook, out in zip(targets, outputs, strict=True):
            before = self.pending.get(hook)
            self.pending[hook] = out if before is None else before + out

    def take(self, pos: str) -> SAEActs:
        """The `SAEActs` of the dictionary at `pos`: its input and code, and the sum written to
        its output hook."""
        x, c = self.reads.pop(pos)
        return SAEActs(x, c, self.pending.pop(pos))


def contributions(sae: SAEBase, x: Tensor, copies: int = 1) -> tuple[Tensor, Tensor]:
    """(what `sae` writes for input x to each of its target hooks [n_targets, ..., d_out], its
    code): `SAEBase.forward_targets`, or on `copies` copies of the batch `forward_copies`."""
    if copies == 1:
        return sae.forward_targets(x)
    out, c = sae.forward_copies(x, copies)
    return out.unsqueeze(0), c


def run_sites(
    sites: Mapping[str, SpliceSite], saes: Mapping[str, SAEBase], clean: Mapping[str, Tensor]
) -> dict[str, SAEActs]:
    """The dictionaries at `sites` on the clean activations they read (a local step: no pass
    through the LM): each position's `SAEActs`, whose output is the sum of what every
    dictionary here wrote to its output hook (a CLT's later layers sum the earlier layers')."""
    writes = PassWrites()
    for pos, site in sites.items():
        x = clean[site.input_hook]
        outputs, c = contributions(saes[pos], x)
        writes.add(site.targets, outputs)
        writes.reads[pos] = (x, c)
    return {pos: writes.take(pos) for pos in sites}


def closure(sites: Mapping[str, SpliceSite], positions: Sequence[str]) -> list[str]:
    """`positions` plus every site that must splice in with them: one that writes to an included
    output hook, or whose output hook an included one writes to (all of a CLT's layers)."""
    chosen = set(positions)
    while True:
        written = {t for p in chosen for t in sites[p].targets}
        more = {
            p
            for p, s in sites.items()
            if p not in chosen and (p in written or any(t in chosen for t in s.targets))
        }
        if not more:
            return [p for p in sites if p in chosen]
        chosen |= more


@dataclass(frozen=True)
class TranscoderSet:
    """One transcoder per listed block (`layers`; None: every block), reading the block-relative
    hook `input` and replacing `output` (TransformerLens names, e.g. `ln2.hook_normalized` and
    `hook_mlp_out`). `cross_layer`: one cross-layer transcoder over them (consecutive layers).
    `field`: the config field the errors name."""

    layers: Sequence[int] | None
    input: str
    output: str
    skip: bool = False
    cross_layer: bool = False
    field: str = "saes.transcoder_set"


def transcoder_set_spec(config: Config) -> TranscoderSet | None:
    """The config's `saes.transcoder_set` (cross-layer for `architecture: clt`), or None."""
    t = config.saes.transcoder_set
    if t is None:
        return None
    cross = is_cross_layer(config.saes.architecture)
    return TranscoderSet(t.layer_list, t.input, t.output, t.skip, cross_layer=cross)


def config_sites(config: Config, all_names: Sequence[str]) -> dict[str, SpliceSite]:
    """The sites of `config`'s SAEs (`resolve_sites` of its `saes` entries), from the model's hook
    names: what `SAETransformer.from_config` builds, for callers without the model."""
    s = config.saes
    pairs = [(t.input, t.output) for t in s.transcoders]
    return resolve_sites(all_names, s.sae_positions, pairs, transcoder_set_spec(config))


def n_blocks(all_names: Sequence[str]) -> int:
    """The number of blocks of a model, from its hook names."""
    layers = [int(m.group(1)) for n in all_names if (m := _LAYER_RE.match(n))]
    return max(layers) + 1 if layers else 0


def transcoder_set_sites(all_names: Sequence[str], spec: TranscoderSet) -> dict[str, SpliceSite]:
    """The sites of a transcoder set, in block order (one-line ConfigErrors naming the field:
    a layer the model lacks, a block without the hooks, a CLT's layers with a gap)."""
    f = spec.field
    n = n_blocks(all_names)
    layers = sorted(set(spec.layers)) if spec.layers is not None else list(range(n))
    if spec.layers is not None and len(layers) != len(spec.layers):
        raise ConfigError(f"{f}.layers: {list(spec.layers)} lists a layer twice")
    if not layers:
        raise ConfigError(f"{f}.layers: no layer (the model has {n} blocks)")
    bad = [lay for lay in layers if not 0 <= lay < n]
    if bad:
        raise ConfigError(f"{f}.layers: {bad[0]} is not a block of this model (blocks 0..{n - 1})")
    if spec.cross_layer and layers != list(range(layers[0], layers[-1] + 1)):
        raise ConfigError(
            f"{f}.layers: a cross-layer transcoder needs consecutive layers (its features write "
            f"to every later layer), got {layers}"
        )
    names = set(all_names)
    for key in ("input", "output"):
        hook = getattr(spec, key)
        missing = [lay for lay in layers if f"blocks.{lay}.{hook}" not in names]
        if missing:
            suffixes = {m.group(2) for h in all_names if (m := _BLOCK_HOOK_RE.match(h))}
            mlp = sorted(h for h in suffixes if "mlp" in h or "ln2" in h)
            what = "MLP input" if key == "input" else "MLP output"
            have = f"its blocks' MLP hooks: {', '.join(mlp)}" if mlp else "its blocks have no MLP"
            raise ConfigError(
                f"{f}.{key}: block {missing[0]} has no hook '{hook}' (a transcoder set reads "
                f"each block's {what} there; {have})"
            )
    outputs = [f"blocks.{lay}.{spec.output}" for lay in layers]
    inputs = [f"blocks.{lay}.{spec.input}" for lay in layers]
    if set(inputs) & set(outputs):
        raise ConfigError(f"{f}: input and output are the same hook ('{spec.input}')")
    return {
        o: SpliceSite(i, o, tuple(outputs[k + 1 :]) if spec.cross_layer else (), spec.skip)
        for k, (i, o) in enumerate(zip(inputs, outputs, strict=True))
    }


def resolve_sites(
    all_names: Sequence[str],
    sae_positions: Sequence[str] | None,
    transcoders: Sequence[tuple[str, str]] = (),
    transcoder_set: TranscoderSet | None = None,
) -> dict[str, SpliceSite]:
    """The one resolution of SAE sites, used by the model, the activation cache and `--dry-run`:
    `sae_positions` patterns (names or substrings, see `filter_names`), transcoder
    (input, output) pairs (one hook each) and a transcoder set, in model order. A hook matched by
    two entries (two patterns, or a pattern and a transcoder output) or a substring naming several
    hooks where one is needed is a one-line ConfigError naming the field."""
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
    if transcoder_set is not None:
        for o, site in transcoder_set_sites(all_names, transcoder_set).items():
            if o in sites:
                raise ConfigError(f"{transcoder_set.field}.output: '{o}' already has an SAE")
            sites[o] = site
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


def _read_hook(
    site: SpliceSite, sae: SAEBase, copies: int, writes: PassWrites
) -> Callable[..., Tensor]:
    """At a transcoder's input hook: run it and add what it writes to each of its targets."""

    def hook(x: Tensor, hook: Any = None) -> Tensor:
        x_in = move_to(x, sae.device)
        outputs, c = contributions(sae, x_in, copies)
        writes.add(site.targets, outputs)
        writes.reads[site.output_hook] = (x_in, c)
        return x

    return hook


def _write_hook(pos: str, acts: dict[str, Any], writes: PassWrites) -> Callable[..., Tensor]:
    """At a transcoder's output hook: replace the activation by the sum written to it."""

    def hook(x: Tensor, hook: Any = None) -> Tensor:
        acts[pos] = writes.take(pos)
        return move_to(acts[pos].output, x.device)

    return hook
