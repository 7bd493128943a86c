"""Where the frozen LM comes from (a hub name, a GGUF (SmolLM2), a local checkpoint, or a config)
and what runs it (`resolve_backend`).

`load_tlens_model` gives HookedTransformers; `load_lm` also gives TransformerBridges around any
Hugging Face causal LM (`hf_model_name`, `backend: bridge`; see `e2e_sae.lm.bridge`).

This module reads a source (a folder's fields and weights, an original `epoch_<N>.pt`, a
`tlens_config`) and hands it to the one loader of the installed TransformerLens
(`build_tlens_model`): `e2e_sae.lm.hooked` builds a HookedTransformer on 3.x; on 4.x (no
HookedTransformer) `e2e_sae.lm.native` builds a TransformerBridge with the HookedTransformer's
numbers over TL's native model, and hub models load through `e2e_sae.lm.bridge` with
TransformerLens' weight processing (`enable_compatibility_mode`), `smollm2-135m` as its HF model.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from e2e_sae.data.tokenizer import GGUF_MODEL_ALIASES, is_gguf_model_name
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm import hooked, native
from e2e_sae.lm.bridge import (
    is_local_folder,
    load_bridge,
    load_compat_bridge,
    load_smollm2_bridge,
)
from e2e_sae.lm.tl import HAS_HOOKED, HookedTransformer
from e2e_sae.runs.original import CONFIG_FILE, read_original_lm

if TYPE_CHECKING:
    from e2e_sae.config import Config
    from e2e_sae.lm.runner import LM

logger = logging.getLogger(__name__)

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "tlens_config.json"
"""The files of a saved model folder (`save_tlens_model`, `e2e-sae train-lm`)."""
Backend = Literal["hooked", "bridge"]


def builtin_model_dir(name: str) -> Path | None:
    """Folder of a model shipped with the package (e.g. `shakespeare-lm`), if any."""
    folder = Path(__file__).resolve().parent.parent / "assets" / "models" / name
    return folder if (folder / MODEL_CONFIG).exists() else None


def builtin_model_names() -> list[str]:
    """The models shipped in the package (`shakespeare-lm`, ...)."""
    root = Path(__file__).resolve().parent.parent / "assets" / "models"
    return sorted(p.name for p in root.iterdir() if (p / MODEL_CONFIG).is_file())


def check_model_name(name: str, field: str) -> None:
    """Refuse a name that is not a built-in or GGUF model (nor a local folder) but close to one:
    a typo such as `shakespeare_lm` would otherwise go to the Hugging Face Hub, retry there for
    half a minute and fail. Other unknown names may be hub models and are left to the loader."""
    builtin = builtin_model_names()
    if name in builtin or is_gguf_model_name(name) or Path(name).expanduser().exists():
        return
    offline = [*builtin, *GGUF_MODEL_ALIASES]
    close = difflib.get_close_matches(name.strip().lower(), offline, 1, 0.8)
    if close:
        raise UserError(f"{field}: unknown model '{name}' (did you mean '{close[0]}'?)")


def build_random_model(
    tlens_config: dict[str, Any], device: str | None = None, n_devices: int | None = None
) -> HookedTransformer:
    """A random-weight HookedTransformer from HookedTransformerConfig fields (+ `seed`);
    `n_devices` overrides the config's. On TransformerLens 4.x the same model (same weights for
    a seed) as a TransformerBridge (`e2e_sae.lm.native`)."""
    fields = dict(tlens_config)
    fields.setdefault("seed", 0)
    if n_devices is not None:
        fields["n_devices"] = n_devices
    return build_tlens_model(fields, None, device, "tlens_config")


def build_tlens_model(
    fields: dict[str, Any], state: hooked.State, device: str | None, what: str
) -> HookedTransformer:
    """The model of HookedTransformerConfig fields and a HookedTransformer state dict (or its
    file; None: random init) on the installed TransformerLens: a HookedTransformer on 3.x
    (`e2e_sae.lm.hooked`), the same function as a TransformerBridge on 4.x
    (`e2e_sae.lm.native`). `what` names the source in errors."""
    if HAS_HOOKED:
        return hooked.build(fields, state, device, what)
    return native.build(fields, state, device, what)


def save_tlens_model(model: HookedTransformer, out_dir: Path, extra: dict[str, Any] | None = None):
    """Weights as safetensors + the HookedTransformerConfig as JSON (atomic writes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = native.FIELDS.get(model) if not HAS_HOOKED else None
    if fields is not None:  # TransformerLens 4.x: written as HookedTransformer's state dict
        state = native.from_native(model, fields)
    else:
        state = model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = out_dir / (MODEL_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out_dir / MODEL_WEIGHTS)
    cfg = _serialisable_cfg(model.cfg if fields is None else _Fields(fields))
    cfg.update(extra or {})
    tmp = out_dir / (MODEL_CONFIG + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, out_dir / MODEL_CONFIG)


_CFG_KEYS = (
    "d_model",
    "d_head",
    "n_heads",
    "d_mlp",
    "n_layers",
    "n_ctx",
    "d_vocab",
    "d_vocab_out",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
    "attn_only",
    "eps",
    "tokenizer_name",
    "original_architecture",
    "rotary_dim",
    "rotary_base",
    "gated_mlp",
    "final_rms",
    "n_key_value_heads",
    "default_prepend_bos",
    "parallel_attn_mlp",
    "seed",
    "tokenizer_prepends_bos",
    "rotary_adjacent_pairs",
    "use_attn_result",
    "init_weights",
)


class _Fields:
    """Config fields as attributes (what `_serialisable_cfg` reads)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)


def _serialisable_cfg(cfg: Any) -> dict[str, Any]:
    out = {}
    for k in _CFG_KEYS:
        v = getattr(cfg, k, None)
        if v is None:
            continue
        out[k] = v if isinstance(v, str | int | float | bool) else str(v)
    return out


def load_original_lm(path: str | os.PathLike[str], device: str | None = None) -> HookedTransformer:
    """A HookedTransformer from the original's `epoch_<N>.pt` (or a folder of them). Offline: the
    `tokenizer_name` of its config is recorded on `cfg` but not loaded."""
    found = read_original_lm(path)
    if found is None:
        raise UserError(f"tlens_model_path: {path} is not an original epoch_<N>.pt")
    return _original_lm(*found, device=device)


def _original_lm(
    pt: Path, fields: dict[str, Any], state: dict[str, Tensor], device: str | None
) -> HookedTransformer:
    try:
        return build_tlens_model(fields, state, device, f"tlens_model_path: {pt}")
    except ConfigError as err:
        raise ConfigError(f"{pt.parent / CONFIG_FILE}: {err}") from None


def load_tlens_model_from_path(
    path: Path, device: str | None = None, n_devices: int | None = None
) -> HookedTransformer:
    """Load a model saved by `save_tlens_model` (a folder, or its model.safetensors file), or one
    of the original e2e_sae's `epoch_<N>.pt` files (with its `final_config.yaml` beside it)."""
    path = Path(path).expanduser()
    original = None if (path / MODEL_CONFIG).exists() else read_original_lm(path)
    if original is not None:
        return _original_lm(*original, device=device)
    folder = path.parent if path.is_file() else path
    weights = path if path.is_file() else folder / MODEL_WEIGHTS
    if not weights.exists() or not (folder / MODEL_CONFIG).exists():
        raise UserError(
            f"tlens_model_path: {path} is not a saved model (expected {MODEL_WEIGHTS} and "
            f"{MODEL_CONFIG}, as written by `e2e-sae train-lm`, or an original epoch_<N>.pt)"
        )
    fields = json.loads((folder / MODEL_CONFIG).read_text())
    fields = {k: v for k, v in fields.items() if k in _CFG_KEYS}
    if n_devices is not None:
        fields["n_devices"] = n_devices
    return build_tlens_model(fields, weights, device, f"tlens_model_path: {path}")


def load_pretrained(
    name: str,
    device: str | None = None,
    n_devices: int | None = None,
    field: str = "tlens_model_name",
) -> HookedTransformer:
    """A model by name: a built-in folder (`shakespeare-lm`), the packaged SmolLM2 GGUF, or a
    hub model HookedTransformer knows (on 4.x: as a bridge in compatibility mode)."""
    folder = builtin_model_dir(name)
    if folder is not None:
        return load_tlens_model_from_path(folder, device=device, n_devices=n_devices)
    gguf = is_gguf_model_name(name)
    if HAS_HOOKED:
        if gguf:
            return hooked.smollm2(name, device, n_devices)
        return hooked.from_hub(name, field, device, n_devices)
    if gguf:  # its HF model as it is: RMSNorm, so the residual stream is HookedTransformer's too
        smollm2: Any = load_smollm2_bridge(device, None, n_devices)
        return smollm2
    bridge: Any = load_compat_bridge(name, field, device, n_devices)
    return bridge


def load_tlens_model(
    tlens_model_name: str | None = None,
    tlens_model_path: Path | None = None,
    tlens_config: dict[str, Any] | None = None,
    device: str | None = None,
    *,
    n_devices: int | None = None,
) -> HookedTransformer:
    """Exactly one source must be given (the config validator guarantees it)."""
    if tlens_config is not None:
        model = build_random_model(tlens_config, device=device, n_devices=n_devices)
    elif tlens_model_path is not None:
        model = load_tlens_model_from_path(tlens_model_path, device=device, n_devices=n_devices)
    else:
        assert tlens_model_name is not None
        model = load_pretrained(tlens_model_name, device=device, n_devices=n_devices)
    model.eval()
    return model


def load_lm(config: Config, device: str | None = None) -> LM:
    """The LM of a run config: a HookedTransformer or, for `backend` bridge (or auto on a model
    HookedTransformer does not support), a TransformerBridge (`e2e_sae.lm.bridge`)."""
    name, field = model_name_field(config)
    if name is not None:
        check_model_name(name, field)  # a typo of a built-in name: fail now, not after hub retries
    if resolve_backend(config) == "bridge":
        assert name is not None  # the config validator refuses bridge without an HF model
        if builtin_model_dir(name) is not None:
            raise UserError(
                f"backend: bridge cannot run '{name}' (a HookedTransformer shipped with e2e_sae, "
                "not a Hugging Face model); use backend: hooked or auto"
            )
        return load_bridge(name, field, device, config.device_map, config.n_devices)
    if config.hf_model_name is not None:
        if is_local_folder(config.hf_model_name):
            raise UserError(
                f"backend: hooked cannot load the local folder {config.hf_model_name} "
                "(HookedTransformer loads hub models it knows); use backend: bridge or auto"
            )
        return load_pretrained(config.hf_model_name, device, config.n_devices, "hf_model_name")
    return load_tlens_model(
        config.tlens_model_name,
        config.tlens_model_path,
        config.tlens_config,
        device=device,
        n_devices=config.n_devices,
    )


def hooked_supports(name: str) -> bool:
    """Whether HookedTransformer.from_pretrained knows this hub name (TransformerLens' own list
    of official names and aliases; no network; on 4.x the list it keeps of them)."""
    if HAS_HOOKED:
        from transformer_lens.loading_from_pretrained import get_official_model_name
    else:
        import importlib

        get_official_model_name = importlib.import_module(
            "transformer_lens.supported_models"
        ).get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        return False
    return True


def resolve_backend(config: Config) -> Backend:
    """What runs the config's LM. `auto`: hooked for tlens_config / tlens_model_path / built-in
    and GGUF names / names HookedTransformer supports; bridge for any other Hugging Face model,
    and whenever `device_map` is set (HookedTransformer has none)."""
    if config.backend != "auto":
        return config.backend
    if config.tlens_config is not None or config.tlens_model_path is not None:
        return "hooked"
    name = config.hf_model_name or config.tlens_model_name
    assert name is not None
    if config.device_map is not None:
        return "bridge"
    if is_gguf_model_name(name) or builtin_model_dir(name) is not None:
        return "hooked"
    return "hooked" if hooked_supports(name) and not is_local_folder(name) else "bridge"


def model_name_field(config: Config) -> tuple[str | None, str]:
    """(the model's name, the config key it came from) for name sources; (None, key) else."""
    if config.hf_model_name is not None:
        return config.hf_model_name, "hf_model_name"
    if config.tlens_model_name is not None:
        return config.tlens_model_name, "tlens_model_name"
    return None, "tlens_model_path" if config.tlens_model_path is not None else "tlens_config"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
