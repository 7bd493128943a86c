"""`train --dry-run`: every check of the real run that needs no weights and no download.

The model is built from its HookedTransformerConfig on the meta device (no memory, no weights, no
tokenizer) and run once there on two tokens, so its hook names and activation sizes are exactly
those of the real run: hooks resolve by the same rules (`config_sites`, `filter_names`), and the
SAEs are built (also on the meta device) by the same code with the same keywords, so an unknown
architecture, a missing `k` or a bad `architecture_kwargs` fails here as it would there. Also
checked: the model name (a near miss of a built-in one), the datasets (a missing path, a near miss
of a built-in corpus), each tokenizer that loads offline against the model's vocabulary, each
`n_ctx` against the model's context, the teacher cache, and which auxiliary losses can never act
in a run this long (a warning, as in the real run).

Hub models need their config from the Hugging Face Hub (or its cache); when it cannot be had the
model-dependent checks are skipped and the report says why. So are they for `backend: bridge` (a
TransformerBridge's hook names come from the loaded Hugging Face model). On TransformerLens
4.x our own models are checked through their native TransformerBridge built on the meta device;
hub models and `smollm2-135m` are not checked there.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from typing import Any

import torch

from e2e_sae.config import Config, DatasetConfig
from e2e_sae.data import check_dataset_name, data_errors
from e2e_sae.data.tokenizer import (
    check_tokenizer_name,
    hub_is_reachable,
    is_gguf_model_name,
    load_tokenizer,
    loads_offline,
)
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.gguf import smollm2_config
from e2e_sae.lm.load import (
    _CFG_KEYS,
    MODEL_CONFIG,
    builtin_model_dir,
    check_model_name,
    model_name_field,
    resolve_backend,
)
from e2e_sae.lm.sites import check_after_first_sae, config_sites, dict_size, filter_names
from e2e_sae.lm.tl import HAS_HOOKED, TL_VERSION
from e2e_sae.saes import SAEBase, build_sae, idle_aux_warnings, is_cross_layer, sae_kwargs
from e2e_sae.saes.registry import architecture_class


def model_config(config: Config) -> Any:
    """The HookedTransformerConfig the run would load (raises UserError if it cannot be had; on
    TransformerLens 4.x its resolved fields as attributes)."""
    if resolve_backend(config) == "bridge":
        raise UserError("backend bridge: the TransformerBridge's hook names need the loaded model")
    fields: dict[str, Any] | None = None
    if config.tlens_config is not None:
        fields = dict(config.tlens_config)
    elif config.tlens_model_path is not None:
        path = config.tlens_model_path.expanduser()
        folder = path.parent if path.is_file() else path
        if not (folder / MODEL_CONFIG).is_file():
            raise ConfigError(f"tlens_model_path: {path} is not a saved model (no {MODEL_CONFIG})")
        fields = json.loads((folder / MODEL_CONFIG).read_text())
    else:
        name = config.tlens_model_name or config.hf_model_name
        assert name is not None
        if not HAS_HOOKED and builtin_model_dir(name) is None:
            raise UserError(
                f"TransformerLens {TL_VERSION} has the hook names of '{name}' only once the "
                "model is loaded"
            )
        if is_gguf_model_name(name):
            return smollm2_config(device="meta")
        folder = builtin_model_dir(name)
        if folder is not None:
            fields = json.loads((folder / MODEL_CONFIG).read_text())
        else:
            from transformer_lens.loading_from_pretrained import get_pretrained_model_config

            # unreachable hub: the local HF cache only (the hub client would retry for ~25 s)
            local = not hub_is_reachable()
            try:
                return get_pretrained_model_config(name, device="meta", local_files_only=local)
            except Exception as err:  # noqa: BLE001 - offline, unknown name, ...
                msg = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
                raise UserError(f"model config of '{name}' unavailable ({msg})") from None
    assert fields is not None
    fields = {k: v for k, v in fields.items() if k in _CFG_KEYS}
    fields.pop("tokenizer_name", None)
    if not HAS_HOOKED:  # TransformerLens 4.x
        from types import SimpleNamespace

        from e2e_sae.lm import native

        return SimpleNamespace(**native.resolved_fields(fields))
    from transformer_lens import HookedTransformerConfig

    try:
        return HookedTransformerConfig(**{**fields, "device": "meta"})
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"tlens_config: {str(err).splitlines()[0]}") from None


def hook_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """{hook name: activation shape} of the model, in execution order, from its config alone
    (a forward pass on the meta device; [batch, pos, ...] for a [1, 2] token batch)."""
    if not HAS_HOOKED:
        return _native_hook_shapes(model_config(config))
    from transformer_lens import HookedTransformer

    cfg = dataclasses.replace(model_config(config), tokenizer_name=None, device="meta")
    cfg.init_weights = False
    shapes: dict[str, tuple[int, ...]] = {}

    def record(x: torch.Tensor, hook: Any) -> None:
        shapes[hook.name] = tuple(x.shape)

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
        tokens = torch.zeros(1, 2, dtype=torch.long)
        model.run_with_hooks(tokens, fwd_hooks=[(lambda _: True, record)])
    # hooks that did not run (e.g. attention-pattern hooks of other code paths) come last
    return {**shapes, **{n: () for n in model.hook_dict if n not in shapes}}


def hook_names(config: Config) -> list[str]:
    """The model's hook names (construction order), from its config alone: no forward pass."""
    if not HAS_HOOKED:
        return list(_native_bridge(model_config(config)).hook_dict)
    from transformer_lens import HookedTransformer

    cfg = dataclasses.replace(model_config(config), tokenizer_name=None, device="meta")
    cfg.init_weights = False
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return list(HookedTransformer(cfg).hook_dict)


def _native_bridge(cfg: Any) -> Any:
    """TransformerLens 4.x: the native TransformerBridge of resolved fields, on the meta device."""
    import copy

    from transformer_lens.model_bridge import TransformerBridge

    from e2e_sae.lm import native

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_native(  # type: ignore[attr-defined]
            copy.deepcopy(native.bridge_config(vars(cfg)))
        )


def _native_hook_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """TransformerLens 4.x: `hook_shapes` through the native bridge (by the names asked for: a
    bridge's hook points carry its own names, the TransformerLens names are aliases)."""
    bridge = _native_bridge(cfg)
    by_point: dict[int, tuple[int, ...]] = {}

    def record(x: torch.Tensor, hook: Any) -> None:
        by_point[id(hook)] = tuple(x.shape)

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # "filter matched gated-off hook name ..."
        tokens = torch.zeros(1, 2, dtype=torch.long)
        bridge.run_with_hooks(tokens, fwd_hooks=[(lambda _: True, record)])
    hook_dict = bridge.hook_dict
    fired = {point: i for i, point in enumerate(by_point)}  # execution order
    late = len(fired)
    names = sorted(hook_dict, key=lambda n: fired.get(id(hook_dict[n]), late))  # stable
    return {n: by_point.get(id(hook_dict[n]), ()) for n in names}


def check_hooks(config: Config, names: list[str] | None = None) -> str:
    """Resolve `saes.sae_positions`, `saes.transcoders`, `saes.transcoder_set` and
    `loss.in_to_orig.hook_positions` as
    the real run does (ConfigError naming the field when one matches nothing); returns a one-line
    summary, or why the hooks could not be checked. `names`: the model's hook names, if known
    (the sweep checks each of its runs this way; `dry_run` checks far more)."""

    try:
        names = hook_names(config) if names is None else names
    except ConfigError:
        raise
    except UserError as err:
        return f"hooks not checked: {err}"
    found = list(config_sites(config, names))
    if config.loss.in_to_orig is not None:
        field = "loss.in_to_orig.hook_positions"
        filter_names(names, config.loss.in_to_orig.hook_positions, field)
    return f"SAE positions: {', '.join(found)}"


def _datasets(config: Config) -> list[tuple[str, DatasetConfig]]:
    sets = [("train_data", config.train_data)]
    if config.eval_data is not None:
        sets.append(("eval_data", config.eval_data))
    return sets


def check_data(config: Config, model_cfg: Any | None) -> list[str]:
    """Dataset names, and (with the model's config) each `n_ctx` against the model's context and
    each tokenizer that loads offline against the model's vocabulary; returns what it could not
    check."""
    skipped = []
    for field, ds in _datasets(config):
        tokenizer = None
        with data_errors(field):
            check_dataset_name(ds.dataset_name)
            if ds.tokenizer_name and not ds.is_tokenized:
                check_tokenizer_name(ds.tokenizer_name)
                if loads_offline(ds.tokenizer_name):
                    tokenizer = load_tokenizer(ds.tokenizer_name)
                else:
                    skipped.append(f"{field}.tokenizer_name '{ds.tokenizer_name}' not checked")
        if model_cfg is None:
            continue
        if ds.n_ctx > model_cfg.n_ctx:
            raise ConfigError(
                f"{field}.n_ctx: {ds.n_ctx} is longer than the model's context "
                f"n_ctx={model_cfg.n_ctx}"
            )
        if tokenizer is not None and len(tokenizer) > model_cfg.d_vocab:
            raise ConfigError(
                f"{field}.tokenizer_name: '{ds.tokenizer_name}' has {len(tokenizer):,} tokens, "
                f"more than the model's d_vocab {model_cfg.d_vocab:,} (tokenizer_name does not "
                "match the model)"
            )
    return skipped


def check_architecture(config: Config) -> None:
    """Without the model's sizes: the architecture's name, and `k` where it needs one."""
    cls = architecture_class(config.saes.architecture)
    params = inspect.signature(cls.__init__).parameters
    # (a CLT takes k only with activation topk; its constructor says so in `build_meta_saes`)
    needs_k = "k" in params and not cls.cross_layer
    if needs_k and config.saes.k is None and "k" not in config.saes.architecture_kwargs:
        raise ConfigError(f"saes.k: required for architecture '{config.saes.architecture}'")


def build_meta_saes(config: Config, shapes: dict[str, tuple[int, ...]]) -> dict[str, SAEBase]:
    """The run's SAEs, built on the meta device with the real run's sizes and keywords."""
    s = config.saes
    names = list(shapes)
    sites = config_sites(config, names)
    for pos, site in sites.items():
        if site.is_transcoder and names.index(site.input_hook) > names.index(pos):
            raise ConfigError(
                f"saes.transcoders: input '{site.input_hook}' runs after output '{pos}'"
            )
    if config.loss.in_to_orig is not None:
        field = "loss.in_to_orig.hook_positions"
        hooks = filter_names(names, config.loss.in_to_orig.hook_positions, field)
        check_after_first_sae(names, [site.output_hook for site in sites.values()], hooks, field)
    kwargs = sae_kwargs(s.architecture, s.architecture_kwargs, s.k, config.train_tokens)
    saes = {}
    with torch.device("meta"):
        for pos, site in sites.items():
            d_in, d_out = shapes[site.input_hook][-1], shapes[site.output_hook][-1]
            saes[pos] = build_sae(
                s.architecture,
                d_in,
                dict_size(d_in, s.dict_size_to_input_ratio, pos),
                init_decoder_orthogonal=False,
                output_size=d_out,
                **kwargs,
                **({"skip": True} if site.skip else {}),
                **({"n_targets": len(site.targets)} if is_cross_layer(s.architecture) else {}),
            )
    return saes


def dry_run(config: Config) -> list[str]:
    """Check `config` as the real run would, short of loading weights or downloading anything;
    raises the first problem as a one-line UserError. Returns report lines: what was resolved,
    what could not be checked and why, and warnings."""
    name, field = model_name_field(config)
    if name is not None:
        check_model_name(name, field)
    if config.teacher_cache is not None and not config.teacher_cache.expanduser().exists():
        raise ConfigError(f"teacher_cache: {config.teacher_cache} does not exist")
    check_architecture(config)
    try:
        model_cfg = model_config(config)
    except ConfigError:
        raise
    except UserError as err:
        return [*check_data(config, None), f"not checked against the model: {err}"]
    skipped = check_data(config, model_cfg)
    saes = build_meta_saes(config, hook_shapes(config))
    lines = [f"SAE positions: {', '.join(saes)} ({config.saes.architecture})", *skipped]
    lines += [f"warning: {w}" for w in idle_aux_warnings(config, saes)]
    return lines
