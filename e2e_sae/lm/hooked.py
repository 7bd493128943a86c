"""TransformerLens-format models on HookedTransformer (TransformerLens 3.x).

`build` makes every model of ours (`shakespeare-lm`, `tlens_config`, `e2e-sae train-lm` folders,
the original's `epoch_<N>.pt`) from HookedTransformerConfig fields and a state dict; `from_hub`
and `smollm2` give the hub's and the packaged GGUF model. On TransformerLens 4.x `build` is
`e2e_sae.lm.native.build`, and hub and GGUF models load through `e2e_sae.lm.bridge`;
`e2e_sae.lm.load` chooses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from e2e_sae.data.tokenizer import attach_tokenizer
from e2e_sae.errors import ConfigError, UserError, first_line
from e2e_sae.lm.bridge import OFFLINE_MODELS_HINT
from e2e_sae.lm.gguf import GGUF_MODELS
from e2e_sae.lm.tl import HookedTransformer, HookedTransformerConfig
from e2e_sae.resources import check_memory
from e2e_sae.runs.checkpoint import read_tensors

State = dict[str, Tensor] | Path | None
"""A HookedTransformer state dict, the safetensors file holding one, or None (random init)."""


def build(fields: dict[str, Any], state: State, device: str | None, what: str) -> HookedTransformer:
    """The HookedTransformer of these HookedTransformerConfig fields (+ `seed`) with these
    weights, its tokenizer attached if the fields name one. `what` names the source in errors
    (the config key, or the file the fields come from)."""
    fields = dict(fields)
    tokenizer_name = fields.pop("tokenizer_name", None)
    if state is not None:
        fields["init_weights"] = False
    recorded = fields.pop("device", "cpu")
    try:
        cfg = HookedTransformerConfig(**fields, device=device or recorded)
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"{what}: {str(err).splitlines()[0]}") from None
    check_memory(weights_bytes(cfg), cfg.device, what, "the model's weights")
    model = HookedTransformer(cfg)
    if isinstance(state, Path):
        state = read_tensors(state, what)
    if state is not None:
        problem = state_problem(model, state)
        if problem is not None:
            raise UserError(f"{what}: the weights do not fit the config ({problem})")
        model.load_state_dict(state, strict=False)
    if tokenizer_name:
        cfg.tokenizer_name = tokenizer_name
        attach_tokenizer(model, str(tokenizer_name))
    return model.eval()


def state_problem(model: torch.nn.Module, state: dict[str, Tensor]) -> str | None:
    """What keeps `state` from being `model`'s weights (a missing parameter, an unknown key, a
    shape), or None; the buffers HookedTransformer computes itself may be missing."""
    own = model.state_dict()
    params = dict(model.named_parameters())
    problem = next((f"lacks '{k}'" for k in params if k not in state), None)
    problem = problem or next((f"has an unexpected '{k}'" for k in state if k not in own), None)
    return problem or next(
        (
            f"'{k}' is {tuple(v.shape)}, the config builds {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and own[k].shape != v.shape
        ),
        None,
    )


def weights_bytes(cfg: HookedTransformerConfig) -> int:
    """The memory a HookedTransformer's weights take (blocks, embedding, unembedding, positions):
    what building it allocates at least."""
    n = cfg.n_params or 0
    n += 2 * max(cfg.d_vocab, 0) * cfg.d_model + cfg.n_ctx * cfg.d_model
    return n * torch.empty((), dtype=cfg.dtype).element_size()


def smollm2(name: str, device: str | None, n_devices: int | None) -> HookedTransformer:
    """The packaged SmolLM2-135M GGUF model (any accepted spelling of its name)."""
    return GGUF_MODELS[name.lower()](device=device or "cpu", n_devices=n_devices or 1).eval()


def from_hub(name: str, field: str, device: str | None, n_devices: int | None) -> Any:
    """`HookedTransformer.from_pretrained` (weights processed as TransformerLens does); any
    hub or network failure is one line naming `field` and what loads offline."""
    try:
        model = HookedTransformer.from_pretrained(name, device=device, n_devices=n_devices or 1)
    except Exception as err:  # noqa: BLE001 - any hub/network failure becomes one line
        raise UserError(
            f"{field}: cannot load '{name}' from the Hugging Face Hub ({first_line(err)}); "
            f"{OFFLINE_MODELS_HINT}"
        ) from None
    return model.eval()
