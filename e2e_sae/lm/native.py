"""TransformerLens-format models on TransformerLens 4.x: a TransformerBridge over TL's native model.

Our own LMs (`shakespeare-lm`, `tlens_config`, `e2e-sae train-lm` folders, the original's
`epoch_<N>.pt`) are HookedTransformerConfig fields plus a HookedTransformer state dict
(`blocks.0.attn.W_Q` [n_heads, d_model, d_head], ...). TransformerLens 4.x has no HookedTransformer;
`TransformerBridge.boot_native` builds the same function from the same config fields (pre-norm
blocks, LN / RMS / their parameter-free variants, standard or rotary positions, GQA, plain or
gated MLPs), and its weights are those of the state dict, reshaped. No weight processing happens
on either side (HookedTransformer loads these state dicts as they are), so the activations at
every hook are the HookedTransformer's (to float rounding).

What differs in the layout, and is converted both ways (`to_native` / `from_native`):
- rotary: the native model rotates adjacent pairs (2i, 2i+1); HookedTransformer by default the
  two halves (i, i + rotary_dim/2). Permuting the query and key channels of every head alike
  leaves each q.k unchanged, so the converted model computes the same attention;
- a gated MLP has no biases in the native model (HookedTransformer's are zero unless trained).

Random weights (`tlens_config`) are drawn as HookedTransformer draws them (`init_weights`, GPT-2
init: torch.manual_seed(seed), then N(0, initializer_range) for every `W_` matrix in parameter
order; zero biases, unit norm weights), so a seed gives the same model on 3.x and 4.x (on CPU).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
import weakref
from pathlib import Path
from typing import Any

import einops
import torch
from torch import Tensor

from e2e_sae.data.tokenizer import attach_tokenizer
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.tl import TL_VERSION
from e2e_sae.resources import check_memory
from e2e_sae.runs.checkpoint import read_tensors

logger = logging.getLogger(__name__)

FIELDS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
"""The resolved HookedTransformerConfig fields of each bridge built here (what saving it as a
HookedTransformer state dict needs)."""

NORMS = ("LN", "LNPre", "RMS", "RMSPre")
ACTS = ("gelu", "gelu_new", "relu", "silu", "swish", "solu_ln")
_DEFAULTS: dict[str, Any] = {
    "d_mlp": None,
    "d_vocab_out": -1,
    "act_fn": "relu",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "attn_only": False,
    "eps": 1e-5,
    "gated_mlp": False,
    "final_rms": False,
    "n_key_value_heads": None,
    "rotary_dim": None,
    "rotary_base": 10000,
    "rotary_adjacent_pairs": False,
    "default_prepend_bos": True,
    "init_mode": "gpt2",
    "initializer_range": -1.0,
    "seed": None,
    "dtype": torch.float32,
}
_NATIVE_OK: dict[str, Any] = {
    # HookedTransformerConfig fields the native model has no counterpart for, and the value
    # at which they change nothing.
    "parallel_attn_mlp": False,
    "attention_dir": "causal",
    "use_local_attn": False,
    "attn_types": None,
    "original_architecture": None,
    "scale_attn_by_inverse_layer_idx": False,
    "use_attn_scale": True,
    "attn_scale": -1.0,
    "post_embedding_ln": False,
    "use_normalization_before_and_after": False,
    "num_experts": None,
    "use_qk_norm": False,
    "attn_scores_soft_cap": -1.0,
    "output_logits_soft_cap": -1.0,
    "n_devices": 1,
}
"""Fields whose other values need HookedTransformer (refused on 4.x); `original_architecture`
is only a label and any value is accepted."""
_IGNORED = {
    "tokenizer_name",
    "tokenizer_prepends_bos",
    "use_attn_result",
    "use_split_qkv_input",
    "use_hook_mlp_in",
    "use_attn_in",
    "use_hook_tokens",
    "init_weights",
    "model_name",
    "device",
    "n_params",
    "d_vocab",
    "d_model",
    "d_head",
    "n_heads",
    "n_layers",
    "n_ctx",
    "default_padding_side",
    "from_checkpoint",
    "checkpoint_index",
    "checkpoint_label_type",
    "checkpoint_value",
    "trust_remote_code",
    "load_in_4bit",
    "ungroup_grouped_query_attention",
    "dtype",
}


def _unsupported(field: str, value: Any) -> UserError:
    return UserError(
        f"tlens_config.{field}: {value!r} needs HookedTransformer, which TransformerLens "
        f"{TL_VERSION} no longer has (removed in 4.0); install transformer-lens>=3.9,<4 for it"
    )


def resolved_fields(tlens_config: dict[str, Any]) -> dict[str, Any]:
    """The HookedTransformerConfig fields of `tlens_config` with HookedTransformer's defaults
    filled in (those this module uses), checked: a field only HookedTransformer supports raises
    a one-line UserError naming it and the installed TransformerLens."""
    fields = {**_DEFAULTS, **tlens_config}
    for key in ("d_model", "n_layers", "n_ctx", "d_vocab"):
        if not isinstance(fields.get(key), int) or fields[key] <= 0:
            raise ConfigError(f"tlens_config.{key}: a positive integer is required")
    if "d_head" not in fields or "n_heads" not in fields:
        if "d_head" in fields and fields["d_head"] > 0:
            fields.setdefault("n_heads", fields["d_model"] // fields["d_head"])
        else:
            raise ConfigError("tlens_config.d_head: required (with n_heads)")
    if fields.get("n_heads", -1) <= 0:
        fields["n_heads"] = fields["d_model"] // fields["d_head"]
    for key, ok in _NATIVE_OK.items():
        value = fields.get(key, ok)
        if key == "original_architecture":
            continue
        if key.endswith("soft_cap"):
            if value is not None and float(value) > 0:
                raise _unsupported(key, value)
            continue
        if key == "attn_scale" and fields.get("use_attn_scale", True):
            if (
                value is not None
                and float(value) > 0
                and not math.isclose(float(value), math.sqrt(fields["d_head"]))
            ):
                raise _unsupported(key, value)
            continue
        if value != ok and not (ok is None and not value):
            raise _unsupported(key, value)
    if fields["normalization_type"] not in (*NORMS, None):
        raise _unsupported("normalization_type", fields["normalization_type"])
    if fields["positional_embedding_type"] not in ("standard", "rotary"):
        raise _unsupported("positional_embedding_type", fields["positional_embedding_type"])
    if fields["act_fn"] not in ACTS:
        raise _unsupported("act_fn", fields["act_fn"])
    if fields["act_fn"] == "solu_ln" and fields["gated_mlp"]:
        raise _unsupported("act_fn", "solu_ln with gated_mlp")
    if fields["d_vocab_out"] not in (-1, fields["d_vocab"]):
        raise _unsupported("d_vocab_out", fields["d_vocab_out"])
    if fields["init_mode"] != "gpt2":
        raise _unsupported("init_mode", fields["init_mode"])
    if fields["positional_embedding_type"] == "rotary" and fields["rotary_dim"] is None:
        fields["rotary_dim"] = fields["d_head"]
    if fields["d_mlp"] is None and not fields["attn_only"]:
        fields["d_mlp"] = 4 * fields["d_model"]
    if fields["initializer_range"] < 0:
        fields["initializer_range"] = 0.8 / math.sqrt(fields["d_model"])
    if isinstance(fields["dtype"], str):
        fields["dtype"] = getattr(torch, fields["dtype"].removeprefix("torch."))
    return fields


def bridge_config(fields: dict[str, Any]) -> Any:
    """The TransformerBridgeConfig of resolved fields (`resolved_fields`)."""
    from transformer_lens import TransformerBridgeConfig

    kwargs = {
        "d_model": fields["d_model"],
        "d_head": fields["d_head"],
        "n_heads": fields["n_heads"],
        "n_layers": fields["n_layers"],
        "n_ctx": fields["n_ctx"],
        "d_vocab": fields["d_vocab"],
        "d_mlp": fields["d_mlp"],
        "act_fn": fields["act_fn"],
        "eps": fields["eps"],
        "normalization_type": fields["normalization_type"],
        "positional_embedding_type": fields["positional_embedding_type"],
        "attn_only": fields["attn_only"],
        "gated_mlp": fields["gated_mlp"],
        "final_rms": fields["final_rms"],
        "n_key_value_heads": fields["n_key_value_heads"],
        "rotary_dim": fields["rotary_dim"],
        "rotary_base": fields["rotary_base"],
        "default_prepend_bos": fields["default_prepend_bos"],
        "init_weights": False,  # the weights come from `hooked_init` or a state dict
        "tokenizer_name": fields.get("tokenizer_name"),
        "model_name": str(fields.get("model_name") or "custom"),
        "dtype": fields["dtype"],
    }
    return TransformerBridgeConfig(**kwargs)


# --- HookedTransformer's parameters: names, shapes, initialisation ----------------------------


def hooked_param_shapes(fields: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """The HookedTransformer's parameters (name, shape) in its `named_parameters()` order."""
    d, h, dh, L = fields["d_model"], fields["n_heads"], fields["d_head"], fields["n_layers"]
    kv = fields["n_key_value_heads"]
    norm = fields["normalization_type"]
    out: list[tuple[str, tuple[int, ...]]] = [("embed.W_E", (fields["d_vocab"], d))]
    if fields["positional_embedding_type"] == "standard":
        out.append(("pos_embed.W_pos", (fields["n_ctx"], d)))

    def norm_params(prefix: str, kind: str | None) -> None:
        if kind in ("LN", "RMS"):
            out.append((f"{prefix}.w", (d,)))
        if kind == "LN":
            out.append((f"{prefix}.b", (d,)))

    for i in range(L):
        p = f"blocks.{i}"
        norm_params(f"{p}.ln1", norm)
        if not fields["attn_only"]:
            norm_params(f"{p}.ln2", norm)
        k = "_" if kv is not None else ""
        n_kv = kv if kv is not None else h
        out += [
            (f"{p}.attn.W_Q", (h, d, dh)),
            (f"{p}.attn.W_O", (h, dh, d)),
            (f"{p}.attn.b_Q", (h, dh)),
            (f"{p}.attn.b_O", (d,)),
            (f"{p}.attn.{k}W_K", (n_kv, d, dh)),
            (f"{p}.attn.{k}W_V", (n_kv, d, dh)),
            (f"{p}.attn.{k}b_K", (n_kv, dh)),
            (f"{p}.attn.{k}b_V", (n_kv, dh)),
        ]
        if not fields["attn_only"]:
            m, dm = f"{p}.mlp", fields["d_mlp"]
            if fields["gated_mlp"]:
                out += [(f"{m}.W_in", (d, dm)), (f"{m}.W_out", (dm, d)), (f"{m}.W_gate", (d, dm))]
                out += [(f"{m}.b_in", (dm,)), (f"{m}.b_out", (d,))]
            else:
                out += [(f"{m}.W_in", (d, dm)), (f"{m}.b_in", (dm,))]
                out += [(f"{m}.W_out", (dm, d)), (f"{m}.b_out", (d,))]
            if fields["act_fn"] == "solu_ln":
                out += [(f"{m}.ln.w", (dm,)), (f"{m}.ln.b", (dm,))]
    final = "RMS" if fields["final_rms"] and norm in ("LN", "RMS") else norm
    final = "RMSPre" if fields["final_rms"] and norm in ("LNPre", "RMSPre") else final
    norm_params("ln_final", final)
    out += [("unembed.W_U", (d, fields["d_vocab"])), ("unembed.b_U", (fields["d_vocab"],))]
    return out


def hooked_init(fields: dict[str, Any]) -> dict[str, Tensor]:
    """The weights `HookedTransformer(cfg)` draws for these fields (GPT-2 init, on CPU)."""
    state: dict[str, Tensor] = {}
    dtype = fields["dtype"]
    if fields["seed"] is not None:  # as HookedTransformer: the global RNG, left advanced
        torch.manual_seed(fields["seed"])
    for name, shape in hooked_param_shapes(fields):
        leaf = name.rsplit(".", 1)[1]
        if "W_" in name:
            t = torch.empty(shape, dtype=dtype)
            torch.nn.init.normal_(t, std=fields["initializer_range"])
        elif leaf == "w":
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.zeros(shape, dtype=dtype)
        state[name] = t
    return state


# --- the layout conversions -------------------------------------------------------------------


def _rotary_perm(fields: dict[str, Any]) -> Tensor | None:
    """Channel order within a head that turns half-split rotary into adjacent pairs (None: no
    permutation needed)."""
    if fields["positional_embedding_type"] != "rotary" or fields["rotary_adjacent_pairs"]:
        return None
    rd, dh = int(fields["rotary_dim"]), int(fields["d_head"])
    half = rd // 2
    rot = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    return torch.cat([rot, torch.arange(rd, dh)])


def to_native(state: dict[str, Tensor], fields: dict[str, Any], what: str) -> dict[str, Tensor]:
    """A HookedTransformer state dict as the native bridge's state dict (`what` names the source
    in errors)."""
    from transformer_lens.utilities.tl_checkpoint_conversion import (  # pyright: ignore[reportMissingImports]
        convert_tl_checkpoint,
    )

    state = {k: v for k, v in state.items() if not k.endswith(("rotary_sin", "rotary_cos"))}
    for name in list(state):
        if name.endswith((".mlp.b_in", ".mlp.b_out")) and fields["gated_mlp"]:
            if bool(state[name].ne(0).any()):
                raise UserError(
                    f"{what}: '{name}' is not zero; TransformerLens {TL_VERSION}'s native model "
                    "has no biases in a gated MLP (load it with transformer-lens>=3.9,<4)"
                )
            del state[name]
    perm = _rotary_perm(fields)
    if perm is not None:
        for name in list(state):
            if name.endswith(("W_Q", "W_K")):
                state[name] = state[name][..., perm]
            elif name.endswith(("b_Q", "b_K")):
                state[name] = state[name][..., perm]
    try:
        return convert_tl_checkpoint(state, bridge_config(fields))
    except ValueError as err:
        raise UserError(f"{what}: {str(err).splitlines()[0]}") from None


def from_native(bridge: Any, fields: dict[str, Any]) -> dict[str, Tensor]:
    """The bridge's weights as the HookedTransformer state dict (what `to_native` reads)."""
    h = fields["n_heads"]
    n_kv = fields["n_key_value_heads"] or h
    perm = _rotary_perm(fields)
    inv = None if perm is None else torch.argsort(perm)
    own = {n: t.detach() for n, t in bridge.state_dict().items()}
    out: dict[str, Tensor] = {}
    for name, shape in hooked_param_shapes(fields):
        prefix, leaf = name.rsplit(".", 1)
        if leaf in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
            key = f"{prefix}.{leaf[-1].lower()}.weight"
            heads = h if leaf == "W_Q" else n_kv
            t = einops.rearrange(own[key], "(n h) m -> n m h", n=heads)
        elif leaf in ("b_Q", "b_K", "b_V", "_b_K", "_b_V"):
            key = f"{prefix}.{leaf[-1].lower()}.bias"
            heads = h if leaf == "b_Q" else n_kv
            t = einops.rearrange(own[key], "(n h) -> n h", n=heads)
        elif leaf == "W_O":
            t = einops.rearrange(own[f"{prefix}.o.weight"], "m (n h) -> n h m", n=h)
        elif leaf == "b_O":
            t = own[f"{prefix}.o.bias"]
        elif leaf in ("W_in", "W_out", "W_gate"):
            t = own[f"{prefix}.{leaf[2:]}.weight"].T
        elif leaf in ("b_in", "b_out"):
            t = own.get(f"{prefix}.{leaf[2:]}.bias", torch.zeros(shape))
        elif leaf == "W_U":
            t = own["unembed.weight"].T
        elif leaf == "b_U":
            t = own.get("unembed.bias", torch.zeros(shape))
        elif leaf in ("W_E", "W_pos"):
            t = own[f"{prefix}.weight"]
        else:  # norm w / b
            t = own[f"{prefix}.{'weight' if leaf == 'w' else 'bias'}"]
        if inv is not None and leaf in ("W_Q", "W_K", "_W_K", "b_Q", "b_K", "_b_K"):
            t = t[..., inv]
        out[name] = t.contiguous()
        assert tuple(out[name].shape) == shape, (name, out[name].shape, shape)
    return out


# --- building the bridge ------------------------------------------------------------------------


def build(
    fields: dict[str, Any], state: dict[str, Tensor] | Path | None, device: str | None, what: str
) -> Any:
    """The TransformerBridge of HookedTransformerConfig fields and a HookedTransformer state dict
    (or the safetensors file holding one; None: random init), with its tokenizer if the fields
    name one: what `e2e_sae.lm.hooked.build` gives on TransformerLens 3.x."""
    fields = {k: v for k, v in fields.items() if k != "device"}
    resolved = resolved_fields(fields)
    shapes = dict(hooked_param_shapes(resolved))
    size = torch.empty((), dtype=resolved["dtype"]).element_size()
    check_memory(
        sum(map(math.prod, shapes.values())) * size, device or "cpu", what, "the model's weights"
    )
    if isinstance(state, Path):
        state = read_tensors(state, what)
    misfit = next(
        (k for k, v in (state or {}).items() if k in shapes and v.shape != shapes[k]), None
    )
    if misfit is not None:
        assert state is not None
        raise UserError(
            f"{what}: the weights do not fit the config ('{misfit}' is "
            f"{tuple(state[misfit].shape)}, the config builds {shapes[misfit]})"
        )
    model = build_bridge(resolved, state, device or "cpu", what)
    FIELDS[model] = resolved
    if resolved.get("tokenizer_name"):
        attach_tokenizer(model, str(resolved["tokenizer_name"]))
    return model


def build_bridge(
    fields: dict[str, Any],
    state: dict[str, Tensor] | None,
    device: str | None = None,
    what: str = "tlens_config",
) -> Any:
    """A TransformerBridge over TL's native model with these (resolved) fields and this
    HookedTransformer state dict (None: HookedTransformer's random init), eval mode, on `device`."""
    from transformer_lens.model_bridge import TransformerBridge

    cfg = bridge_config(fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_native(  # type: ignore[attr-defined]
            copy.deepcopy(cfg), device=device, dtype=fields["dtype"], model_name=cfg.model_name
        )
    native = to_native(state if state is not None else hooked_init(fields), fields, what)
    if "unembed.bias" not in native:
        native["unembed.bias"] = torch.zeros(fields["d_vocab"], dtype=fields["dtype"])
    result = bridge.load_state_dict(native, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("causal_mask", "_cached"))]
    if missing or result.unexpected_keys:
        problem = (
            f"lacks '{missing[0]}'"
            if missing
            else f"has an unexpected '{result.unexpected_keys[0]}'"
        )
        raise UserError(f"{what}: the weights do not fit the config ({problem})")
    head: Any = bridge.unembed.original_component
    if not isinstance(head.bias, torch.nn.Parameter):
        # The native head is built without a bias and the bridge loads HookedTransformer's b_U as
        # a plain tensor; as a parameter it trains (train-lm) as it does on HookedTransformer.
        head.bias = torch.nn.Parameter(head.bias, requires_grad=True)
    return bridge.eval()
