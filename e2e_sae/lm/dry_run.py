"""`train --dry-run` checks: resolve the config's hooks against the model's config, no weights.

The model is built from its HookedTransformerConfig on the meta device (no memory, no weights, no
tokenizer), so its hook names are exactly those of the real run and the same `filter_names` rules
apply. Hub models need their config from the Hugging Face Hub (or its cache); when it cannot be
had, the hooks are not checked and `check_hooks` says why. Neither are they for `backend: bridge`
(a TransformerBridge's hook names come from the loaded Hugging Face model).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import torch

from e2e_sae.config import Config
from e2e_sae.data.tokenizer import is_gguf_model_name
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.gguf import smollm2_config
from e2e_sae.lm.load import _CFG_KEYS, MODEL_CONFIG, builtin_model_dir, resolve_backend
from e2e_sae.lm.sites import config_sites, filter_names


def model_config(config: Config) -> Any:
    """The HookedTransformerConfig the run would load (raises UserError if it cannot be had)."""
    from transformer_lens import HookedTransformerConfig

    if resolve_backend(config) == "bridge":
        raise UserError("backend bridge: the TransformerBridge's hook names need the loaded model")
    fields: dict[str, Any] | None = None
    if config.tlens_config is not None:
        fields = dict(config.tlens_config)
    elif config.tlens_model_path is not None:
        path = config.tlens_model_path.expanduser()
        folder = path.parent if path.is_file() else path
        if not (folder / MODEL_CONFIG).is_file():
            raise UserError(f"tlens_model_path: {path} is not a saved model (no {MODEL_CONFIG})")
        fields = json.loads((folder / MODEL_CONFIG).read_text())
    else:
        name = config.tlens_model_name or config.hf_model_name
        assert name is not None

        if is_gguf_model_name(name):
            return smollm2_config(device="meta")
        folder = builtin_model_dir(name)
        if folder is not None:
            fields = json.loads((folder / MODEL_CONFIG).read_text())
        else:
            from transformer_lens.loading_from_pretrained import get_pretrained_model_config

            try:
                return get_pretrained_model_config(name, device="meta")
            except Exception as err:  # noqa: BLE001 - offline, unknown name, ...
                msg = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
                raise UserError(f"model config of '{name}' unavailable ({msg})") from None
    assert fields is not None
    fields = {k: v for k, v in fields.items() if k in _CFG_KEYS}
    fields.pop("tokenizer_name", None)
    try:
        return HookedTransformerConfig(**{**fields, "device": "meta"})
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"tlens_config: {str(err).splitlines()[0]}") from None


def hook_names(config: Config) -> list[str]:
    """The model's hook names in execution order, from its config alone."""
    from transformer_lens import HookedTransformer

    cfg = dataclasses.replace(model_config(config), tokenizer_name=None, device="meta")
    cfg.init_weights = False
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return list(HookedTransformer(cfg).hook_dict)


def check_hooks(config: Config, names: list[str] | None = None) -> str:
    """Resolve `saes.sae_positions`, `saes.transcoders`, `saes.transcoder_set` and
    `loss.in_to_orig.hook_positions` as
    the real run does (ConfigError naming the field when one matches nothing); returns a one-line
    summary, or why the hooks could not be checked. `names`: the model's hook names, if known."""

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
