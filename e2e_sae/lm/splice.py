"""`SAETransformer`: a frozen LM with SAEs spliced in at hook points.

An SAE at hook `h` replaces the activation at `h` by its reconstruction; a transcoder reads one hook
and replaces another (`e2e_sae.lm.sites`: where each SAE reads, what it replaces and reconstructs).
The LM's parameters never receive gradients. The LM is a TransformerLens HookedTransformer or
TransformerBridge, reached only through its `e2e_sae.lm.runner.LMRunner` (`model.lm`). Sampling is
`e2e_sae.lm.generate`; what a trained run's files hold, `e2e_sae.runs.locate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from e2e_sae.config import Config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm import generate as generation
from e2e_sae.lm.load import default_device, load_lm
from e2e_sae.lm.runner import LM, Hooks, LMRunner, cache_into, make_runner
from e2e_sae.lm.sites import (
    PassWrites,
    SpliceSite,
    TranscoderSet,
    closure,
    dict_size,
    filter_names,
    resolve_sites,
    run_sites,
    transcoder_set_spec,
)
from e2e_sae.resources import check_memory
from e2e_sae.runs.checkpoint import load_sae_weights
from e2e_sae.runs.locate import locate_run
from e2e_sae.runs.wandb import download_wandb_run
from e2e_sae.saes import (
    CacheActs,
    SAEActs,
    SAEBase,
    SAEDict,
    build_sae,
    is_cross_layer,
    sae_key,
    sae_kwargs,
)


class HookShapes(dict[str, tuple[int, ...]]):
    """Activation shapes at the SAEs' hooks, as the original's `hook_shapes` dict; calling it
    with hook names measures those hooks instead (one short clean pass)."""

    def __init__(
        self,
        known: dict[str, tuple[int, ...]],
        measure: Callable[[Sequence[str]], dict[str, tuple[int, ...]]],
    ) -> None:
        super().__init__(known)
        self._measure = measure

    def __call__(self, hook_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        return self._measure(hook_names)


class SAETransformer(nn.Module):
    """A frozen LM (HookedTransformer or TransformerBridge, `tlens_model`; run through `lm`) plus
    its SAEs (`saes`, an `SAEDict` keyed by `sae_key(position)`; `sae(position)`).

    `sae_positions` lists the hooks whose activations the SAEs replace (for transcoders, the output
    hook); `sites[pos]` says where each SAE reads. As in the original library, `raw_sae_positions`
    holds those hook names and `all_sae_positions` the matching keys of `saes` ('.' -> '-');
    unlike it, the constructor also accepts substrings (`"hook_resid_pre"`: every layer).
    """

    def __init__(
        self,
        tlens_model: LM,
        raw_sae_positions: Sequence[str] | str,
        dict_size_to_input_ratio: float,
        init_decoder_orthogonal: bool = True,
        *,
        architecture: str = "relu",
        architecture_kwargs: dict[str, Any] | None = None,
        transcoders: Sequence[tuple[str, str]] = (),
        transcoder_set: TranscoderSet | None = None,
    ) -> None:
        super().__init__()
        self.tlens_model = tlens_model.eval()
        for p in self.tlens_model.parameters():
            p.requires_grad_(False)
        self.lm: LMRunner = make_runner(tlens_model)
        patterns = [raw_sae_positions] if isinstance(raw_sae_positions, str) else raw_sae_positions
        self.all_hook_names = self.lm.hook_names()
        cross_layer = is_cross_layer(architecture)
        if transcoder_set is not None and transcoder_set.cross_layer != cross_layer:
            transcoder_set = dataclasses.replace(transcoder_set, cross_layer=cross_layer)
        if cross_layer and (transcoder_set is None or patterns or transcoders):
            raise ConfigError(
                f"saes.architecture: {architecture} is a cross-layer transcoder over the layers "
                "of saes.transcoder_set (and nothing else: no sae_positions, no transcoders)"
            )
        sites = resolve_sites(
            self.all_hook_names, list(patterns or []), list(transcoders), transcoder_set
        )
        for pos, site in sites.items():
            problem = self.lm.replace_problem(pos)
            if problem is not None:
                field = "saes.transcoders.output" if site.is_transcoder else "saes.sae_positions"
                raise ConfigError(f"{field}: {problem}")
        order = {n: i for i, n in enumerate(self.all_hook_names)}
        self.sae_positions = sorted(sites, key=order.__getitem__)
        # The original's name for the resolved hook names (its callers pass them to forward()).
        self.raw_sae_positions = list(self.sae_positions)
        self.sites: dict[str, SpliceSite] = {p: sites[p] for p in self.sae_positions}
        shapes = self._measure_shapes(self.sae_hook_names())
        self._sae_hook_shapes = dict(shapes)
        run_order = list(shapes)  # hook_shapes caches in execution order
        for pos, site in self.sites.items():
            if site.is_transcoder and run_order.index(site.input_hook) > run_order.index(pos):
                raise ConfigError(
                    f"saes.transcoders: input '{site.input_hook}' runs after output '{pos}'"
                )
        self.saes = SAEDict()
        self.architecture = architecture
        # Set by `from_local_path`: the run's config, its directory and the checkpoint file
        # loaded (None for a model built in code).
        self.run_config: Config | None = None
        self.run_dir: Path | None = None
        self.checkpoint_path: Path | None = None
        sizes: dict[str, tuple[int, int, int]] = {}  # (d_in, d_sae, d_out) per SAE
        for pos, site in self.sites.items():
            d_in, d_out = shapes[site.input_hook][-1], shapes[site.output_hook][-1]
            sizes[pos] = (d_in, dict_size(d_in, dict_size_to_input_ratio, pos), d_out)
        if sizes:  # the weights alone (fp32; + a few vectors) must fit before they are allocated
            check_memory(
                sum(
                    4 * d_sae * (d_in + d_out * len(self.sites[p].targets) + 3)
                    for p, (d_in, d_sae, d_out) in sizes.items()
                ),
                self.lm.device,
                "saes.dict_size_to_input_ratio",
                f"{len(sizes)} SAE(s) of up to {max(s[1] for s in sizes.values()):,} latents",
            )
        for pos, (d_in, d_sae, d_out) in sizes.items():
            site = self.sites[pos]
            per_site: dict[str, Any] = {"skip": True} if site.skip else {}
            if cross_layer:
                per_site["n_targets"] = len(site.targets)
            self.saes[sae_key(pos)] = build_sae(
                architecture,
                d_in,
                d_sae,
                init_decoder_orthogonal=init_decoder_orthogonal,
                output_size=d_out,
                **{**(architecture_kwargs or {}), **per_site},
            )

    # --- shapes and bookkeeping ----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.lm.n_layers

    @property
    def backend(self) -> str:
        """The LM's backend: `hooked` (HookedTransformer) or `bridge` (TransformerBridge)."""
        return self.lm.backend

    def sae(self, position: str) -> SAEBase:
        return self.saes.at(position)

    @property
    def all_sae_positions(self) -> list[str]:
        """Keys of `saes`, in the order of `raw_sae_positions` (the original's attribute)."""
        return [sae_key(p) for p in self.sae_positions]

    @property
    def hook_shapes(self) -> HookShapes:
        """`model.hook_shapes[hook]` for the SAEs' hooks; `model.hook_shapes(names)` for others."""
        return HookShapes(self._sae_hook_shapes, self._measure_shapes)

    def sae_hook_names(self) -> list[str]:
        """Every hook an SAE reads or replaces, in execution order of their first listing."""
        return list(dict.fromkeys(h for s in self.sites.values() for h in s.hooks))

    @torch.no_grad()
    def _measure_shapes(self, hook_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        tokens = torch.zeros(1, 2, dtype=torch.long, device=self.lm.device)
        _, cache = self.run_until(tokens, hook_names)
        return {k: tuple(v.shape) for k, v in cache.items()}

    def resolve_sae_positions(
        self, sae_positions: Sequence[str] | str | None, field: str = "sae_positions"
    ) -> list[str]:
        """None or "all" -> every SAE position; otherwise SAE positions named exactly or by
        substring (`UserError` for a name that matches no SAE)."""
        if sae_positions is None or sae_positions == "all":
            return list(self.sae_positions)
        wanted = [sae_positions] if isinstance(sae_positions, str) else list(sae_positions)
        if not all(p in self.sites for p in wanted):
            for p in wanted:
                if not any(p in q for q in self.sae_positions):
                    raise UserError(
                        f"{field}: '{p}' is not an SAE position of this model "
                        f"(SAEs at: {', '.join(self.sae_positions) or 'none'})"
                    )
            wanted = filter_names(self.sae_positions, wanted, field)
        # a cross-layer transcoder splices in whole: its layers write into each other's outputs
        return closure(self.sites, wanted)

    def to(self, *args: Any, **kwargs: Any) -> SAETransformer:
        """`nn.Module.to`, also updating the LM's cfg.device / cfg.dtype as TransformerLens'
        own `to` does (it creates new tensors, e.g. tokens, on cfg.device). An LM spread over
        several devices (`n_devices` / `device_map`) stays where it is; only the SAEs move."""
        if self.lm.is_split:
            self.saes.to(*args, **kwargs)
            return self
        w = self.lm.embedding_weight()
        before = (w.device, w.dtype)
        super().to(*args, **kwargs)
        w = self.lm.embedding_weight()
        cfg = self.tlens_model.cfg
        if w.device != before[0]:
            cfg.device = str(w.device)
        if w.dtype != before[1]:
            cfg.dtype = w.dtype
        return self

    # --- forward passes -------------------------------------------------------------------------
    def run_until(
        self, tokens: Tensor, hook_names: Sequence[str]
    ) -> tuple[None, dict[str, Tensor]]:
        """Run the clean model only as far as needed to cache `hook_names` (nothing past them)."""
        cache: dict[str, Tensor] = {}
        if hook_names:
            names = list(dict.fromkeys(hook_names))
            hooks: Hooks = [(h, cache_into(cache, h, self.lm.device)) for h in names]
            self.lm.run_blocks(tokens, 0, hooks, stop_after=names)
        return None, cache

    def forward_raw(
        self,
        tokens: Tensor,
        run_entire_model: bool = True,
        final_layer: int | None = None,
        cache_positions: Sequence[str] | None = None,
        *,
        cache_sae_positions: bool = True,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The clean model (no SAEs). Returns (output, {hook: activation}).

        As in the original library the cache holds the SAE positions (and the hooks transcoders
        read) plus `cache_positions`, and `run_entire_model=False, final_layer=k` returns the
        residual stream before block k (TransformerLens' `stop_at_layer`), caching only the
        hooks before it. Ours on top: `run_entire_model=False` without `final_layer` stops right
        after the last cached hook and returns None as output (the original ran the whole model);
        `cache_sae_positions=False` caches `cache_positions` only.
        """
        if run_entire_model and final_layer is not None:
            raise UserError("forward_raw: final_layer needs run_entire_model=False")
        first: list[str] = self.sae_hook_names() if cache_sae_positions else []
        extra: Sequence[str] = cache_positions or []
        names: list[str] = list(dict.fromkeys([*first, *extra]))
        if not run_entire_model and final_layer is None:
            return self.run_until(tokens, names)
        cache: dict[str, Tensor] = {}
        hooks: Hooks = [(h, cache_into(cache, h, self.lm.device)) for h in names]
        with self.lm.hooks(hooks):
            out = self.lm.run(tokens, stop_at_layer=final_layer)
        return out, cache

    def forward(
        self,
        tokens: Tensor,
        sae_positions: Sequence[str] | str | None = None,
        cache_positions: Sequence[str] | None = None,
        orig_acts: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor | None, dict[str, SAEActs | CacheActs]]:
        """The model with SAEs spliced in at `sae_positions` (default, or "all": every SAE).

        Returns (logits, {position: SAEActs, cache_position: CacheActs}). When `orig_acts` holds
        the clean activations at the SAEs' input hooks (e.g. `forward_raw`'s cache), the SAEs run
        on those directly and no LM pass happens (local training); logits are then None.
        """
        positions = self.resolve_sae_positions(sae_positions)
        if orig_acts is not None:
            for pos in positions:
                site = self.sites[pos]
                if site.input_hook not in orig_acts:
                    raise UserError(
                        f"forward: orig_acts has no activation at '{site.input_hook}' "
                        "(forward_raw caches it)"
                    )
            sites = {p: self.sites[p] for p in positions}
            found = run_sites(sites, {p: self.sae(p) for p in positions}, orig_acts)
            return None, dict(found)
        return self.forward_with_hooks(tokens, positions, cache_positions)

    def forward_with_hooks(
        self,
        model_input: Tensor,
        sae_positions: Sequence[str],
        cache_positions: Sequence[str] | None = None,
        **model_kwargs: Any,
    ) -> tuple[Tensor | None, dict[str, SAEActs | CacheActs]]:
        """Run the LM (from tokens, or from a residual with `start_at_layer=`, which backend bridge
        lacks) with SAE hooks."""
        hooks, acts = self.splice_hooks(sae_positions, cache_positions)
        with self.lm.hooks(hooks):
            logits = self.lm.run(model_input, **model_kwargs)
        return logits, acts

    def splice_hooks(
        self,
        sae_positions: Sequence[str],
        cache_positions: Sequence[str] | None = None,
        copies: int = 1,
    ) -> tuple[Hooks, dict[str, SAEActs | CacheActs]]:
        """Forward hooks that splice the SAEs in at `sae_positions` and cache `cache_positions`,
        and the dict they fill during the pass (for any runner that calls TL-style hooks).
        `copies`: the pass runs that many copies of the batch (`SAEBase.forward_copies`).

        A cache position that is also a spliced SAE position keeps its `SAEActs` (as in the
        original); `spliced_activation` gives the value there that a downstream loss compares."""
        acts: dict[str, SAEActs | CacheActs] = {}
        hooks: Hooks = []
        writes = PassWrites()  # what the transcoders wrote to output hooks the pass has not reached
        for pos in closure(self.sites, sae_positions):
            hooks += self.sites[pos].splice(self.sae(pos), acts, copies, writes)
        for h in cache_positions or []:
            if h not in sae_positions:
                hooks.append((h, cache_into(acts, h, self.lm.device, wrap=CacheActs)))
        return hooks, acts

    def spliced_activation(self, hook: str, act: SAEActs | CacheActs) -> Tensor:
        """The activation at `hook` in the SAE-spliced pass that `in_to_orig` compares with the
        clean one: a cached value, or at an SAE position `SpliceSite.spliced_value`."""
        if isinstance(act, CacheActs):
            return act.input
        return self.sites[hook].spliced_value(act)

    # --- generation (`e2e_sae.lm.generate`) ------------------------------------------------------
    generate = generation.generate

    # --- from a config, a run directory or W&B ----------------------------------------------------
    @classmethod
    def from_config(cls, config: Config, device: str | None = None) -> SAETransformer:
        """The config's LM with fresh SAEs, on `device` (default: the config's, else auto)."""
        device = device or config.device or default_device()
        tlens = load_lm(config, device=device)
        # HookedTransformer re-seeds torch with its cfg.seed; without this every run's SAE init
        # would be the same whatever `seed` the run config sets.
        torch.manual_seed(config.seed)
        s = config.saes
        kwargs = sae_kwargs(s.architecture, s.architecture_kwargs, s.k, config.train_tokens)
        model = cls(
            tlens,
            s.sae_positions,
            s.dict_size_to_input_ratio,
            s.init_decoder_orthogonal,
            architecture=s.architecture,
            architecture_kwargs=kwargs,
            transcoders=[(t.input, t.output) for t in s.transcoders],
            transcoder_set=transcoder_set_spec(config),
        )
        # With a device_map the LM is where from_pretrained put it; the SAEs join its embedding.
        return model.to(model.lm.device if config.device_map is not None else device)

    @classmethod
    def from_local_path(
        cls,
        path: str | Path | None = None,
        checkpoint: str | Path | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        checkpoint_file: str | Path | None = None,
        config_file: str | Path | None = None,
        device: str | None = None,
    ) -> SAETransformer:
        """Rebuild the LM and SAEs of a run (ours or the original e2e_sae's), in eval mode.

        `path` (or, as in the original, `checkpoint_dir`): a run directory (its newest intact
        checkpoint) or one checkpoint file. `checkpoint_file` (alias `checkpoint`): that file
        (relative to the run directory, else as given); `config_file`: the config to use instead
        of the `final_config.yaml` beside the checkpoint (`e2e_sae.runs.locate`).
        """
        if path is not None and checkpoint_dir is not None:
            raise UserError("from_local_path: give path or checkpoint_dir, not both")
        if checkpoint is not None and checkpoint_file is not None:
            raise UserError("from_local_path: give checkpoint or checkpoint_file, not both")
        run = locate_run(
            path if path is not None else checkpoint_dir,
            checkpoint if checkpoint is not None else checkpoint_file,
            config_file=config_file,
        )
        model = cls.from_config(run.config, device=device)
        load_sae_weights(model, run.checkpoint, state=run.state)
        model.run_config = run.config
        model.run_dir = run.run_dir  # e.g. for its eval's feature frequencies
        model.checkpoint_path = run.checkpoint
        # eval mode: e.g. a BatchTopK SAE applies its learned threshold only outside training mode
        return model.eval()

    @classmethod
    def from_wandb(cls, wandb_project_run_id: str, device: str | None = None) -> SAETransformer:
        """Download the newest checkpoint (`samples_<N>.safetensors`, or the original's
        `samples_<N>.pt`) and config of a W&B run ("entity/project/run_id"), and load it."""
        return cls.from_local_path(download_wandb_run(wandb_project_run_id), device=device)
