"""`SAETransformer`: a frozen TransformerLens model with SAEs spliced in at hook points.

An SAE at hook `h` replaces the activation at `h` by its reconstruction. A transcoder reads hook
`input` and replaces hook `output` by its prediction. The LM's parameters never receive gradients.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from e2e_sae.errors import ConfigError
from e2e_sae.saes import CacheActs, SAEActs, SAEBase, build_sae

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
# TransformerLens types fwd_hooks as list[tuple[str | Callable, Callable]] (invariant).
_Hooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]


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
        raise ConfigError(f"saes.dict_size_to_input_ratio: {ratio:g} x d_in {d_in} at "
                          f"'{position}' gives {n} latents (need at least 1)")  # fmt: skip
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


@dataclass(frozen=True)
class SpliceSite:
    """Where one SAE reads (`input_hook`) and which activation it replaces (`output_hook`)."""

    input_hook: str
    output_hook: str

    @property
    def is_transcoder(self) -> bool:
        return self.input_hook != self.output_hook


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once every needed activation is cached."""


class SAETransformer(nn.Module):
    """A frozen HookedTransformer plus a ModuleDict of SAEs keyed by `sae_key(position)`.

    `sae_positions` lists the hooks whose activations the SAEs replace (for transcoders, the output
    hook); `sites[pos]` says where each SAE reads.
    """

    def __init__(
        self,
        tlens_model: HookedTransformer,
        raw_sae_positions: Sequence[str] | str,
        dict_size_to_input_ratio: float,
        init_decoder_orthogonal: bool = True,
        *,
        architecture: str = "relu",
        architecture_kwargs: dict[str, Any] | None = None,
        transcoders: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__()
        self.tlens_model = tlens_model.eval()
        for p in self.tlens_model.parameters():
            p.requires_grad_(False)
        if isinstance(raw_sae_positions, str):
            raw_sae_positions = [raw_sae_positions]
        self.raw_sae_positions = list(raw_sae_positions)
        self.all_hook_names = list(self.tlens_model.hook_dict.keys())
        sites: dict[str, SpliceSite] = {}
        if self.raw_sae_positions:
            for name in filter_names(
                self.all_hook_names, self.raw_sae_positions, "saes.sae_positions"
            ):
                sites[name] = SpliceSite(name, name)
        for inp, outp in transcoders:
            i = self._one_hook(inp, "saes.transcoders.input")
            o = self._one_hook(outp, "saes.transcoders.output")
            if sites.get(o) is not None:
                raise ConfigError(f"saes.transcoders.output: '{o}' already has an SAE")
            sites[o] = SpliceSite(i, o)
        order = {n: i for i, n in enumerate(self.all_hook_names)}
        self.sae_positions = sorted(sites, key=order.__getitem__)
        self.sites = {p: sites[p] for p in self.sae_positions}
        shapes = self.hook_shapes(
            [h for s in self.sites.values() for h in (s.input_hook, s.output_hook)]
        )
        run_order = list(shapes)  # hook_shapes caches in execution order
        for pos, site in self.sites.items():
            if site.is_transcoder and run_order.index(site.input_hook) > run_order.index(pos):
                raise ConfigError(
                    f"saes.transcoders: input '{site.input_hook}' runs after output '{pos}'"
                )
        self.saes = nn.ModuleDict()
        self.architecture = architecture
        for pos, site in self.sites.items():
            d_in = shapes[site.input_hook][-1]
            d_out = shapes[site.output_hook][-1]
            self.saes[sae_key(pos)] = build_sae(
                architecture,
                d_in,
                dict_size(d_in, dict_size_to_input_ratio, pos),
                init_decoder_orthogonal=init_decoder_orthogonal,
                output_size=d_out,
                **(architecture_kwargs or {}),
            )

    # --- shapes and bookkeeping ----------------------------------------------------------------
    def _one_hook(self, pattern: str, field: str) -> str:
        """A hook name, or a substring that matches exactly one hook."""
        names = filter_names(self.all_hook_names, [pattern], field)
        if len(names) > 1:
            raise ConfigError(f"{field}: '{pattern}' matches {len(names)} hooks; name one hook")
        return names[0]

    @property
    def n_layers(self) -> int:
        return self.tlens_model.cfg.n_layers

    def sae(self, position: str) -> SAEBase:
        sae = self.saes[sae_key(position)]
        assert isinstance(sae, SAEBase)
        return sae

    @torch.no_grad()
    def hook_shapes(self, hook_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        tokens = torch.zeros(1, 2, dtype=torch.long, device=self.tlens_model.cfg.device)
        _, cache = self.run_until(tokens, hook_names)
        return {k: tuple(v.shape) for k, v in cache.items()}

    def last_layer_needed(self, hook_names: Sequence[str]) -> int:
        return max(hook_layer(h, self.n_layers) for h in hook_names)

    # --- forward passes -------------------------------------------------------------------------
    def run_until(
        self, tokens: Tensor, hook_names: Sequence[str]
    ) -> tuple[None, dict[str, Tensor]]:
        """Run the clean model only as far as needed to cache `hook_names` (nothing past them)."""
        cache: dict[str, Tensor] = {}
        wanted = set(hook_names)

        def cache_hook(x: Tensor, hook: HookPoint) -> Tensor:
            assert hook.name is not None
            cache[hook.name] = x
            if wanted.issubset(cache):
                raise _StopForward
            return x

        hooks: _Hooks = [(h, cache_hook) for h in wanted]
        try:
            with self.tlens_model.hooks(fwd_hooks=hooks):
                self.tlens_model(tokens, return_type=None)
        except _StopForward:
            pass
        return None, cache

    def forward_raw(
        self,
        tokens: Tensor,
        run_entire_model: bool = True,
        final_layer: int | None = None,
        cache_positions: Sequence[str] | None = None,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The clean model (no SAEs). Returns (logits or None, {hook: activation}).

        With `run_entire_model=False` the pass stops right after the last cached hook (or before
        block `final_layer` when given), and logits are None.
        """
        cache_positions = list(cache_positions or [])
        if not run_entire_model:
            if final_layer is not None and not cache_positions:
                resid = self.tlens_model(tokens, stop_at_layer=final_layer)
                return None, {f"blocks.{final_layer}.hook_resid_pre": resid}
            return self.run_until(tokens, cache_positions)
        cache: dict[str, Tensor] = {}
        hooks: _Hooks = [(h, _cache_into(cache)) for h in cache_positions]
        with self.tlens_model.hooks(fwd_hooks=hooks):
            logits = self.tlens_model(tokens)
        return logits, cache

    def forward(
        self,
        tokens: Tensor,
        sae_positions: Sequence[str] | None = None,
        cache_positions: Sequence[str] | None = None,
        orig_acts: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor | None, dict[str, SAEActs | CacheActs]]:
        """The model with SAEs spliced in at `sae_positions` (default: all).

        Returns (logits, {position: SAEActs, cache_position: CacheActs}). When `orig_acts` holds
        the clean activations at the SAEs' input hooks, the SAEs run on those directly and no LM
        pass happens (local training); logits are then None.
        """
        positions = list(sae_positions) if sae_positions is not None else self.sae_positions
        if orig_acts is not None:
            acts: dict[str, SAEActs | CacheActs] = {}
            for pos in positions:
                x = orig_acts[self.sites[pos].input_hook]
                output, c = self.sae(pos)(x)
                acts[pos] = SAEActs(x, c, output)
            return None, acts
        return self.forward_with_hooks(tokens, positions, cache_positions)

    def forward_with_hooks(
        self,
        model_input: Tensor,
        sae_positions: Sequence[str],
        cache_positions: Sequence[str] | None = None,
        **model_kwargs: Any,
    ) -> tuple[Tensor | None, dict[str, SAEActs | CacheActs]]:
        """Run the LM (from tokens, or from a residual with `start_at_layer=`) with SAE hooks."""
        hooks, acts = self.splice_hooks(sae_positions, cache_positions)
        with self.tlens_model.hooks(fwd_hooks=hooks):
            logits = self.tlens_model(model_input, **model_kwargs)
        return logits, acts

    def splice_hooks(
        self, sae_positions: Sequence[str], cache_positions: Sequence[str] | None = None
    ) -> tuple[_Hooks, dict[str, SAEActs | CacheActs]]:
        """Forward hooks that splice the SAEs in at `sae_positions` and cache `cache_positions`,
        and the dict they fill during the pass (for any runner that calls TL-style hooks)."""
        acts: dict[str, SAEActs | CacheActs] = {}
        pending: dict[str, Tensor] = {}
        hooks: _Hooks = []
        for pos in sae_positions:
            site = self.sites[pos]
            sae = self.sae(pos)
            if not site.is_transcoder:
                hooks.append((pos, _replace_hook(sae, pos, acts)))
            else:
                hooks.append((site.input_hook, _transcoder_read_hook(sae, pos, acts, pending)))
                hooks.append((pos, _transcoder_write_hook(pos, pending)))
        for h in cache_positions or []:
            hooks.append((h, _cache_into(acts, wrap=CacheActs)))
        return hooks, acts

    # --- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input: str | Tensor,
        sae_positions: Sequence[str] | None = None,
        max_new_tokens: int = 20,
        **generate_kwargs: Any,
    ) -> Any:
        """Sample from the model with SAEs spliced in (`sae_positions=[]` for the clean model)."""
        positions = self.sae_positions if sae_positions is None else list(sae_positions)
        hooks: _Hooks = []
        scratch: dict[str, SAEActs | CacheActs] = {}
        pending: dict[str, Tensor] = {}
        for pos in positions:
            site, sae = self.sites[pos], self.sae(pos)
            if site.is_transcoder:
                hooks.append((site.input_hook, _transcoder_read_hook(sae, pos, scratch, pending)))
                hooks.append((pos, _transcoder_write_hook(pos, pending)))
            else:
                hooks.append((pos, _replace_hook(sae, pos, scratch)))
        generate_kwargs.setdefault("verbose", False)
        with self.tlens_model.hooks(fwd_hooks=hooks):
            return self.tlens_model.generate(
                input, max_new_tokens=max_new_tokens, use_past_kv_cache=False, **generate_kwargs
            )

    # --- persistence -----------------------------------------------------------------------------
    @classmethod
    def from_local_path(
        cls, path: str | Path, checkpoint: str | Path | None = None, device: str | None = None
    ) -> SAETransformer:
        """Rebuild the LM and SAEs of a run directory (newest checkpoint unless given)."""
        from e2e_sae.checkpoint import load_run

        return load_run(path, checkpoint=checkpoint, device=device)

    @classmethod
    def from_wandb(cls, wandb_project_run_id: str, device: str | None = None) -> SAETransformer:
        """Download the newest checkpoint and config of a W&B run ("entity/project/run_id")."""
        from e2e_sae.wandb_utils import download_wandb_run

        return cls.from_local_path(download_wandb_run(wandb_project_run_id), device=device)

    @classmethod
    def from_saelens(
        cls,
        tlens_model: HookedTransformer,
        paths: Sequence[str | Path],
        device: str | None = None,
        allow_inexact: bool = False,
    ) -> SAETransformer:
        """Splice SAELens-format SAEs (folders or hf://user/repo/folder) into `tlens_model` at the
        hooks their cfg.json names; see `e2e_sae.interop.saelens`."""
        from e2e_sae.interop.saelens import saelens_transformer

        return saelens_transformer(tlens_model, paths, device=device, allow_inexact=allow_inexact)


def _cache_into(store: dict, wrap: Callable[[Tensor], Any] = lambda x: x) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: HookPoint) -> Tensor:
        assert hook.name is not None
        store[hook.name] = wrap(x)
        return x

    return hook


def _replace_hook(sae: SAEBase, pos: str, acts: dict) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: HookPoint) -> Tensor:
        output, c = sae(x)
        acts[pos] = SAEActs(x, c, output)
        return output

    return hook


def _transcoder_read_hook(
    sae: SAEBase, pos: str, acts: dict, pending: dict[str, Tensor]
) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: HookPoint) -> Tensor:
        output, c = sae(x)
        acts[pos] = SAEActs(x, c, output)
        pending[pos] = output
        return x

    return hook


def _transcoder_write_hook(pos: str, pending: dict[str, Tensor]) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: HookPoint) -> Tensor:
        return pending.pop(pos)

    return hook
