"""`SAETransformer`: a frozen LM with SAEs spliced in at hook points.

An SAE at hook `h` replaces the activation at `h` by its reconstruction. A transcoder reads hook
`input` and replaces hook `output` by its prediction. The LM's parameters never receive gradients.
The LM is a TransformerLens HookedTransformer or TransformerBridge, reached only through its
`e2e_sae.lm.runner.LMRunner` (`model.lm`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformer_lens.utilities import LocallyOverridenDefaults, sample_logits

from e2e_sae.compat.original import load_run_config, samples_of
from e2e_sae.config import Config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.checkpoint import (
    CONFIG_FILE,
    list_sae_checkpoints,
    load_sae_weights,
    newest_intact,
    read_tensors,
)
from e2e_sae.lm.load import default_device, load_lm
from e2e_sae.lm.names import dict_size, filter_names, hook_layer, one_hook, sae_key
from e2e_sae.lm.runner import LM, LMRunner, make_runner, move_to
from e2e_sae.lm.runner import Hooks as _Hooks
from e2e_sae.saes import CacheActs, SAEActs, SAEBase, build_sae, sae_kwargs
from e2e_sae.wandb_utils import download_wandb_run


@dataclass(frozen=True)
class SpliceSite:
    """Where one SAE reads (`input_hook`) and which activation it replaces (`output_hook`)."""

    input_hook: str
    output_hook: str

    @property
    def is_transcoder(self) -> bool:
        return self.input_hook != self.output_hook


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


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once every needed activation is cached."""


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


class SAEDict(nn.ModuleDict):
    """A model's SAEs, keyed by `sae_key(position)` (ModuleDict keys may not hold '.', so
    `blocks-2-hook_resid_pre`, as in the original library); indexing and `in` also take the hook
    name itself (`saes["blocks.2.hook_resid_pre"]`)."""

    def __getitem__(self, key: str) -> nn.Module:
        try:
            return super().__getitem__(sae_key(key))
        except KeyError:
            have = ", ".join(k.replace("-", ".") for k in self.keys())
            raise KeyError(
                f"no SAE at '{key}' (SAEs at: {have}); see model.sae(position)"
            ) from None

    def __setitem__(self, key: str, module: nn.Module) -> None:
        super().__setitem__(sae_key(key), module)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(sae_key(key))


class SAETransformer(nn.Module):
    """A frozen LM (HookedTransformer or TransformerBridge, `tlens_model`; run through `lm`) plus
    a ModuleDict of SAEs keyed by `sae_key(position)`.

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
    ) -> None:
        super().__init__()
        self.tlens_model = tlens_model.eval()
        for p in self.tlens_model.parameters():
            p.requires_grad_(False)
        self.lm: LMRunner = make_runner(tlens_model)
        patterns = [raw_sae_positions] if isinstance(raw_sae_positions, str) else raw_sae_positions
        self.all_hook_names = self.lm.hook_names()
        sites = resolve_sites(self.all_hook_names, list(patterns or []), list(transcoders))
        for pos, site in sites.items():
            problem = self.lm.replace_problem(pos)
            if problem is not None:
                field = "saes.transcoders.output" if site.is_transcoder else "saes.sae_positions"
                raise ConfigError(f"{field}: {problem}")
        order = {n: i for i, n in enumerate(self.all_hook_names)}
        self.sae_positions = sorted(sites, key=order.__getitem__)
        # The original's name for the resolved hook names (its callers pass them to forward()).
        self.raw_sae_positions = list(self.sae_positions)
        self.sites = {p: sites[p] for p in self.sae_positions}
        shapes = self._measure_shapes(self.sae_hook_names())
        self._sae_hook_shapes = dict(shapes)
        run_order = list(shapes)  # hook_shapes caches in execution order
        for pos, site in self.sites.items():
            if site.is_transcoder and run_order.index(site.input_hook) > run_order.index(pos):
                raise ConfigError(
                    f"saes.transcoders: input '{site.input_hook}' runs after output '{pos}'"
                )
        self.saes: nn.ModuleDict = SAEDict()
        self.architecture = architecture
        # Set by `from_local_path` / `checkpoint.load_run`: the run's config, its directory and
        # the checkpoint file loaded (None for a model built in code).
        self.run_config: Config | None = None
        self.run_dir: Path | None = None
        self.checkpoint_path: Path | None = None
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
    @property
    def n_layers(self) -> int:
        return self.lm.n_layers

    @property
    def backend(self) -> str:
        """The LM's backend: `hooked` (HookedTransformer) or `bridge` (TransformerBridge)."""
        return self.lm.backend

    def sae(self, position: str) -> SAEBase:
        sae = self.saes[sae_key(position)]
        assert isinstance(sae, SAEBase)
        return sae

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
        return list(
            dict.fromkeys(h for s in self.sites.values() for h in (s.input_hook, s.output_hook))
        )

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
        if all(p in self.sites for p in wanted):
            return wanted
        for p in wanted:
            if not any(p in q for q in self.sae_positions):
                raise UserError(
                    f"{field}: '{p}' is not an SAE position of this model "
                    f"(SAEs at: {', '.join(self.sae_positions) or 'none'})"
                )
        return filter_names(self.sae_positions, wanted, field)

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

    def last_layer_needed(self, hook_names: Sequence[str]) -> int:
        return max(hook_layer(h, self.n_layers) for h in hook_names)

    # --- forward passes -------------------------------------------------------------------------
    def run_until(
        self, tokens: Tensor, hook_names: Sequence[str]
    ) -> tuple[None, dict[str, Tensor]]:
        """Run the clean model only as far as needed to cache `hook_names` (nothing past them)."""
        cache: dict[str, Tensor] = {}
        wanted = set(hook_names)
        if not wanted:
            return None, cache

        device = self.lm.device

        def cache_hook(name: str) -> Callable[..., Tensor]:
            # By the name asked for: a bridge calls hooks with its canonical name, not the alias.
            def hook(x: Tensor, hook: Any = None) -> Tensor:
                cache[name] = move_to(x, device)
                if wanted.issubset(cache):
                    raise _StopForward
                return x

            return hook

        hooks: _Hooks = [(h, cache_hook(h)) for h in wanted]
        try:
            with self.lm.hooks(hooks):
                self.lm.run(tokens, return_type=None)
        except _StopForward:
            pass
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
        hooks: _Hooks = [(h, _cache_into(cache, h, self.lm.device)) for h in names]
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
            acts: dict[str, SAEActs | CacheActs] = {}
            for pos in positions:
                x = orig_acts.get(self.sites[pos].input_hook)
                if x is None:
                    raise UserError(
                        f"forward: orig_acts has no activation at '{self.sites[pos].input_hook}' "
                        "(forward_raw caches it)"
                    )
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
        """Run the LM (from tokens, or from a residual with `start_at_layer=`, which backend bridge
        lacks) with SAE hooks."""
        hooks, acts = self.splice_hooks(sae_positions, cache_positions)
        with self.lm.hooks(hooks):
            logits = self.lm.run(model_input, **model_kwargs)
        return logits, acts

    def splice_hooks(
        self, sae_positions: Sequence[str], cache_positions: Sequence[str] | None = None
    ) -> tuple[_Hooks, dict[str, SAEActs | CacheActs]]:
        """Forward hooks that splice the SAEs in at `sae_positions` and cache `cache_positions`,
        and the dict they fill during the pass (for any runner that calls TL-style hooks).

        A cache position that is also a spliced SAE position keeps its `SAEActs` (as in the
        original); `spliced_activation` gives the value there that a downstream loss compares."""
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
            if h not in sae_positions:
                hooks.append((h, _cache_into(acts, h, self.lm.device, wrap=CacheActs)))
        return hooks, acts

    def spliced_activation(self, hook: str, act: SAEActs | CacheActs) -> Tensor:
        """The activation at `hook` in the SAE-spliced pass that `in_to_orig` compares with the
        clean one: a cached value; at an SAE position the SAE's input (the original's choice:
        what earlier SAEs made of it), at a transcoder's output hook what the transcoder wrote."""
        if isinstance(act, CacheActs):
            return act.input
        return act.output if self.sites[hook].is_transcoder else act.input

    # --- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input: str | Tensor = "",
        sae_positions: Sequence[str] | str | None = "all",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        return_type: str | None = "input",
        verbose: bool = False,
    ) -> Tensor | str:
        """Sample up to `max_new_tokens` tokens, one full forward pass per token (no KV cache).

        The original library's signature and meaning: `sae_positions="all"` (default) splices
        every SAE in, a list splices those, None runs the clean model; `input` is a string (needs
        the model's tokenizer) or a [batch, pos] token tensor; `return_type` "input" returns the
        input's type, "str" the decoded first sequence (without a prepended BOS), "tensor" /
        "tokens" the token ids. `do_sample=False` (or temperature 0) is greedy. A sequence ends
        at `eos_token_id` (default: the tokenizer's EOS) when `stop_at_eos`; ours differs in
        that a model with no known EOS generates `max_new_tokens` instead of failing, and
        `verbose` (a progress bar) defaults to False.
        """
        tl: Any = self.tlens_model  # HookedTransformer or TransformerBridge: the same text API
        positions = None if sae_positions is None else self.resolve_sae_positions(sae_positions)
        if return_type not in ("input", "str", "tensor", "tokens", None):
            raise UserError(
                f"generate: return_type '{return_type}' must be 'input', 'str' or 'tensor'"
            )
        if isinstance(input, str):
            if tl.tokenizer is None:
                raise UserError(
                    "generate: a string prompt needs a tokenizer (model.tlens_model.tokenizer is "
                    "None); pass token ids [batch, pos] instead"
                )
            want_str = return_type in ("input", "str")
        elif isinstance(input, Tensor) and input.ndim == 2:
            want_str = return_type == "str"
        else:
            raise UserError("generate: input must be a string or a [batch, pos] token tensor")
        if want_str and tl.tokenizer is None:
            raise UserError("generate: return_type 'str' needs the model's tokenizer")
        with LocallyOverridenDefaults(tl, prepend_bos=prepend_bos, padding_side=padding_side):
            if isinstance(input, str):
                tokens = tl.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
            else:
                tokens = input.to(tl.cfg.device)
            if tokens.shape[1] + max_new_tokens > tl.cfg.n_ctx:
                raise UserError(
                    f"generate: {tokens.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} "
                    f"exceed the model's context of {tl.cfg.n_ctx} tokens"
                )
            stop_tokens = self._stop_tokens(stop_at_eos, eos_token_id)
            hooks = self.splice_hooks(positions)[0] if positions is not None else []
            with self._eval_mode(), self.lm.hooks(hooks):
                tokens = self._sample_loop(
                    tokens,
                    max_new_tokens,
                    stop_tokens,
                    do_sample,
                    top_k,
                    top_p,
                    temperature,
                    freq_penalty,
                    verbose,
                )
            if not want_str:
                return tokens
            assert tl.tokenizer is not None
            first = tokens[0, 1:] if tl.cfg.default_prepend_bos else tokens[0]
            text = tl.tokenizer.decode(first)
            assert isinstance(text, str)
            return text

    def _stop_tokens(
        self, stop_at_eos: bool, eos_token_id: int | Sequence[int] | None
    ) -> list[int]:
        if not stop_at_eos:
            return []
        if eos_token_id is None:
            tok = self.lm.tokenizer
            eos_token_id = getattr(tok, "eos_token_id", None) if tok is not None else None
        if eos_token_id is None:
            return []
        return [eos_token_id] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]

    def _sample_loop(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        stop_tokens: list[int],
        do_sample: bool,
        top_k: int | None,
        top_p: float | None,
        temperature: float,
        freq_penalty: float,
        verbose: bool,
    ) -> Tensor:
        from tqdm.auto import tqdm

        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        stops = torch.tensor(stop_tokens, dtype=tokens.dtype, device=tokens.device)
        for _ in tqdm(range(max_new_tokens), disable=not verbose, leave=False):
            logits = self.lm.run(tokens)
            assert logits is not None
            final_logits = logits[:, -1, :]
            if do_sample:
                new = sample_logits(
                    final_logits,
                    top_k=top_k,
                    top_p=top_p,
                    temperature=temperature,
                    freq_penalty=freq_penalty,
                    tokens=tokens,
                )
            else:
                new = final_logits.argmax(-1)
            new = new.to(tokens.device)
            if stop_tokens:
                # A finished sequence is padded with the (first) EOS token.
                new[finished] = stop_tokens[0]
                finished |= torch.isin(new, stops)
            tokens = torch.cat([tokens, new.unsqueeze(-1)], dim=-1)
            if stop_tokens and bool(finished.all()):
                break
        return tokens

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode for the duration (e.g. BatchTopK uses its threshold), then each module's
        previous mode back."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    # --- persistence -----------------------------------------------------------------------------
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
        of the `final_config.yaml` beside the checkpoint.
        """
        if path is not None and checkpoint_dir is not None:
            raise UserError("from_local_path: give path or checkpoint_dir, not both")
        if checkpoint is not None and checkpoint_file is not None:
            raise UserError("from_local_path: give checkpoint or checkpoint_file, not both")
        return load_run(
            path if path is not None else checkpoint_dir,
            checkpoint=checkpoint if checkpoint is not None else checkpoint_file,
            device=device,
            config_file=config_file,
        )

    @classmethod
    def from_wandb(cls, wandb_project_run_id: str, device: str | None = None) -> SAETransformer:
        """Download the newest checkpoint (`samples_<N>.safetensors`, or the original's
        `samples_<N>.pt`) and config of a W&B run ("entity/project/run_id"), and load it."""

        return cls.from_local_path(download_wandb_run(wandb_project_run_id), device=device)

    @classmethod
    def from_saelens(
        cls,
        tlens_model: LM,
        paths: Sequence[str | Path],
        device: str | None = None,
        allow_inexact: bool = False,
    ) -> SAETransformer:
        """Splice SAELens-format SAEs (folders or hf://user/repo/folder) into `tlens_model` at the
        hooks their cfg.json names; see `e2e_sae.interop.saelens`."""
        # the contract's one upward import (pyproject.toml): interop builds SAETransformers
        from e2e_sae.interop.saelens import saelens_transformer  # keep lazy

        model = saelens_transformer(tlens_model, paths, device=device, allow_inexact=allow_inexact)
        return model.eval()


# The hook functions below key what they store by the name they were registered under (a bridge
# calls them with its canonical hook point, not the alias asked for) and keep everything on the
# SAEs' device (a no-op unless the LM is spread over several devices).
def _cache_into(
    store: dict, name: str, device: torch.device, wrap: Callable[[Tensor], Any] = lambda x: x
) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: Any = None) -> Tensor:
        store[name] = wrap(move_to(x, device))
        return x

    return hook


def _replace_hook(sae: SAEBase, pos: str, acts: dict) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: Any = None) -> Tensor:
        x_in = move_to(x, sae.device)
        output, c = sae(x_in)
        acts[pos] = SAEActs(x_in, c, output)
        return move_to(output, x.device)

    return hook


def _transcoder_read_hook(
    sae: SAEBase, pos: str, acts: dict, pending: dict[str, Tensor]
) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: Any = None) -> Tensor:
        x_in = move_to(x, sae.device)
        output, c = sae(x_in)
        acts[pos] = SAEActs(x_in, c, output)
        pending[pos] = output
        return x

    return hook


def _transcoder_write_hook(pos: str, pending: dict[str, Tensor]) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: Any = None) -> Tensor:
        return move_to(pending.pop(pos), x.device)

    return hook


def check_vocab(model: SAETransformer, tokens: Tensor, field: str) -> None:
    """Token ids and window length must fit the model (a wrong tokenizer or n_ctx otherwise
    fails deep inside the forward pass)."""
    if tokens.shape[-1] > model.lm.n_ctx:
        raise UserError(
            f"{field}.n_ctx: {tokens.shape[-1]} is longer than the model's context "
            f"n_ctx={model.lm.n_ctx}"
        )
    low, top = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise UserError(f"{field}: token id {low} is negative (token ids are 0 .. d_vocab - 1)")
    if top >= model.lm.d_vocab:
        raise UserError(
            f"{field}: token id {top} >= the model's d_vocab {model.lm.d_vocab} "
            "(tokenizer_name does not match the model)"
        )


# --- from a config or a run directory -------------------------------------------------------------
def build_model(config: Config, device: str | None = None) -> SAETransformer:
    device = device or config.device or default_device()
    tlens = load_lm(config, device=device)
    # HookedTransformer re-seeds torch with its cfg.seed; without this every run's SAE init
    # would be the same whatever `seed` the run config sets.
    torch.manual_seed(config.seed)
    s = config.saes
    kwargs = sae_kwargs(s.architecture, s.architecture_kwargs, s.k, config.train_tokens)
    model = SAETransformer(
        tlens,
        s.sae_positions,
        s.dict_size_to_input_ratio,
        s.init_decoder_orthogonal,
        architecture=s.architecture,
        architecture_kwargs=kwargs,
        transcoders=[(t.input, t.output) for t in s.transcoders],
    )
    # With a device_map the LM is where from_pretrained put it; the SAEs join its embedding.
    return model.to(model.lm.device if config.device_map is not None else device)


def load_run(
    path: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    *,
    config_file: str | Path | None = None,
) -> SAETransformer:
    """Rebuild an `SAETransformer` (in eval mode) from a run directory or one of its checkpoint
    files, ours or the original e2e_sae's.

    `checkpoint`: a file (relative to the run directory, else as given); default: the newest
    intact one, skipping damaged newer files with a warning. `config_file`: instead of the run
    directory's `final_config.yaml`. A relative `tlens_model_path` is looked up in the config's
    folder first."""
    ckpt: Path | None = None
    if path is None:
        if checkpoint is None and config_file is None:
            raise UserError("load: give a run directory, a checkpoint file or a config file")
        run_dir = Path(checkpoint or config_file or "").expanduser().parent
    else:
        run_dir = Path(path).expanduser()
        if run_dir.is_file():
            if checkpoint is not None:
                raise UserError(f"load: {run_dir} is a checkpoint file; do not also give one")
            run_dir, ckpt = run_dir.parent, run_dir
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        ckpt = run_dir / ckpt if not ckpt.is_absolute() and (run_dir / ckpt).exists() else ckpt
    cfg_path = Path(config_file).expanduser() if config_file is not None else run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        if config_file is not None:
            raise UserError(f"config_file: file not found: {cfg_path}")
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir}: not found")
        raise UserError(f"run directory {run_dir}: no {CONFIG_FILE} (is it a training run?)")
    ckpts = [ckpt] if ckpt is not None else list_sae_checkpoints(run_dir)
    if not ckpts:
        raise UserError(
            f"run directory {run_dir}: no samples_<N>.safetensors (or original samples_<N>.pt) "
            "checkpoint"
        )
    config = _local_model_path(load_run_config(cfg_path, samples_of(ckpts[-1])), cfg_path.parent)
    if ckpt is not None:
        state = read_tensors(ckpt)
    else:
        ckpt, state = newest_intact(ckpts, f"run directory {run_dir}")
    model = build_model(config, device=device)
    load_sae_weights(model, ckpt, state=state)
    model.run_config = config
    model.run_dir = run_dir  # e.g. for its eval's feature frequencies
    model.checkpoint_path = ckpt
    # eval mode: e.g. a BatchTopK SAE applies its learned threshold only outside training mode
    return model.eval()


def _local_model_path(config: Config, folder: Path) -> Config:
    """A relative `tlens_model_path` that exists under the config's folder (as `e2e-sae convert`
    writes it) is taken from there; otherwise it stays relative to the working directory."""
    p = config.tlens_model_path
    if p is None or p.is_absolute() or not (folder / p).exists():
        return config
    return config.model_copy(update={"tlens_model_path": folder / p})
