"""Hugging Face causal LMs through TransformerLens' TransformerBridge (`backend: bridge`).

The bridge wraps the stock Hugging Face model (its own forward, its own weights, not folded or
centred) and exposes TransformerLens hook names (`blocks.N.hook_resid_pre` is an alias of
`blocks.N.hook_in`, ...). `load_bridge` boots one from a hub name or a local folder (config.json +
weights + tokenizer files), or, for `smollm2-135m`, from the HF model built offline from the
packaged GGUF file. What `backend: auto` means for a config is `e2e_sae.lm.load.resolve_backend`.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from e2e_sae.data.tokenizer import SMOLLM2_HUB_ID, is_gguf_model_name, load_smollm2_tokenizer
from e2e_sae.errors import UserError, first_line
from e2e_sae.lm.gguf import load_smollm2_hf

logger = logging.getLogger(__name__)

DeviceMap = str | dict[str, str | int]
OFFLINE_MODELS_HINT = (
    "offline models: smollm2-135m, shakespeare-lm, a tlens_model_path, a tlens_config, or a "
    "local Hugging Face model folder as hf_model_name"
)


def is_local_folder(name: str) -> bool:
    """Whether a model name is meant as a local folder (it exists, or is written as a path)."""
    return Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~"))


def load_bridge(
    name: str,
    field: str = "hf_model_name",
    device: str | None = None,
    device_map: DeviceMap | None = None,
    n_devices: int | None = None,
) -> TransformerBridge:
    """A TransformerBridge (eval mode, fp32) around the HF model `name` (hub name or local
    folder; `field` is the config key that named it, for error messages). `device_map` goes to
    `from_pretrained`; `n_devices` > 1 balances the layers over that many GPUs."""
    if is_gguf_model_name(name):
        return load_smollm2_bridge(device, device_map, n_devices)
    local = is_local_folder(name)
    source = str(Path(name).expanduser()) if local else name
    if local and not (Path(source) / "config.json").is_file():
        what = "not found" if not Path(source).exists() else "has no config.json"
        raise UserError(
            f"{field}: {source} {what} (a Hugging Face model folder holds "
            "config.json, the weights and the tokenizer files)"
        )
    placement: dict[str, Any] = {"device_map": device_map, "n_devices": n_devices}
    if device_map is None and (n_devices or 1) <= 1:
        placement["device"] = device or "cpu"
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation and "eager attention" notices
            bridge = TransformerBridge.boot_transformers(source, dtype=torch.float32, **placement)
    except Exception as err:  # noqa: BLE001 - hub/network/format failures become one line
        msg = first_line(err)
        for key in ("device_map", "n_devices"):  # a placement the machine cannot give
            if placement.get(key) is not None and key in msg:
                raise UserError(f"{key}: {msg}") from None
        where = "" if local else " from the Hugging Face Hub"
        raise UserError(
            f"{field}: cannot load '{name}'{where} ({msg}); {OFFLINE_MODELS_HINT}"
        ) from None
    logger.info("Booted %s as a TransformerBridge in %.1f s", name, time.perf_counter() - start)
    return bridge.eval()


def load_compat_bridge(
    name: str, field: str, device: str | None = None, n_devices: int | None = None
) -> TransformerBridge:
    """A hub model with HookedTransformer's weight processing (`enable_compatibility_mode`): what
    a HookedTransformer name loads as on TransformerLens 4.x."""
    bridge = load_bridge(name, field, device, None, n_devices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode(disable_warnings=True)  # type: ignore[attr-defined]
    return bridge.eval()


def load_smollm2_bridge(
    device: str | None = None,
    device_map: DeviceMap | None = None,
    n_devices: int | None = None,
) -> TransformerBridge:
    """SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, dequantized) as a TransformerBridge,
    offline. Its tokenizer and `to_tokens` behave as the HookedTransformer's (no BOS)."""
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    try:  # the bridge takes a loaded model as it is: placement happens at from_pretrained
        resolved, max_memory = resolve_device_map(n_devices, device_map, None)
    except ValueError as err:
        key = "device_map" if device_map is not None else "n_devices"
        raise UserError(f"{key}: {first_line(err)}") from None
    placement: dict[str, Any] = {}
    if resolved is not None:
        placement["device_map"] = resolved
    if max_memory is not None:
        placement["max_memory"] = max_memory
    start = time.perf_counter()
    try:
        hf_model = load_smollm2_hf(**placement)
    except (ValueError, ImportError, RuntimeError) as err:
        raise UserError(f"device_map: {first_line(err)}") from None
    if resolved is None:
        torch.nn.Module.to(hf_model, torch.device(device or "cpu"))
    bridge = smollm2_bridge_from_hf(hf_model)
    logger.info("Loaded smollm2-135m as a TransformerBridge in %.1f s", time.perf_counter() - start)
    return bridge


def smollm2_bridge_from_hf(hf_model: Any) -> TransformerBridge:
    """Boot the bridge on a loaded SmolLM2 HF model (which it wraps in place: convert it to a
    HookedTransformer, if wanted, before this)."""
    tokenizer = copy.deepcopy(load_smollm2_tokenizer())  # the bridge adjusts its tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            SMOLLM2_HUB_ID, hf_model=hf_model, tokenizer=tokenizer, dtype=torch.float32
        )
    # As the HookedTransformer of this model: text is tokenized without a BOS.
    bridge.cfg.default_prepend_bos = False
    return bridge.eval()
