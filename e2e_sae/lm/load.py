"""Where the frozen LM comes from (a hub name, a GGUF (SmolLM2), a local checkpoint, or a config)
and what runs it (`resolve_backend`).

`load_tlens_model` gives HookedTransformers; `load_lm` also gives TransformerBridges around any
Hugging Face causal LM (`hf_model_name`, `backend: bridge`; see `e2e_sae.lm.bridge`).
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from e2e_sae.data.tokenizer import GGUF_MODEL_ALIASES, is_gguf_model_name, load_tokenizer
from e2e_sae.errors import ConfigError, UserError, first_line
from e2e_sae.lm.bridge import OFFLINE_MODELS_HINT, is_local_folder, load_bridge
from e2e_sae.lm.gguf import GGUF_MODELS
from e2e_sae.resources import check_memory
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
    `n_devices` overrides the config's."""
    fields = dict(tlens_config)
    fields.setdefault("seed", 0)
    if n_devices is not None:
        fields["n_devices"] = n_devices
    tokenizer_name = fields.pop("tokenizer_name", None)
    try:
        cfg = HookedTransformerConfig(**fields, device=device or fields.pop("device", "cpu"))
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"tlens_config: {str(err).splitlines()[0]}") from None
    check_memory(weights_bytes(cfg), cfg.device, "tlens_config", "the model's weights")
    model = HookedTransformer(cfg)
    if tokenizer_name:
        cfg.tokenizer_name = tokenizer_name
    return model


def weights_bytes(cfg: HookedTransformerConfig) -> int:
    """The memory a HookedTransformer's weights take (blocks, embedding, unembedding, positions):
    what building it allocates at least."""
    n = cfg.n_params or 0
    n += 2 * max(cfg.d_vocab, 0) * cfg.d_model + cfg.n_ctx * cfg.d_model
    return n * torch.empty((), dtype=cfg.dtype).element_size()


def save_tlens_model(model: HookedTransformer, out_dir: Path, extra: dict[str, Any] | None = None):
    """Weights as safetensors + the HookedTransformerConfig as JSON (atomic writes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out_dir / (MODEL_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out_dir / MODEL_WEIGHTS)
    cfg = _serialisable_cfg(model.cfg)
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


def _serialisable_cfg(cfg: HookedTransformerConfig) -> dict[str, Any]:
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
        model = build_random_model({**fields, "init_weights": False}, device=device)
    except ConfigError as err:
        raise ConfigError(f"{pt.parent / CONFIG_FILE}: {err}") from None
    own = model.state_dict()
    params = dict(model.named_parameters())
    problem = next((f"lacks '{k}'" for k in params if k not in state), None)
    problem = problem or next((f"has an unexpected '{k}'" for k in state if k not in own), None)
    problem = problem or next(
        (
            f"'{k}' is {tuple(v.shape)}, the config builds {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and own[k].shape != v.shape
        ),
        None,
    )
    if problem is not None:
        raise UserError(f"tlens_model_path: {pt} does not fit its tlens_config ({problem})")
    model.load_state_dict(state, strict=False)
    return model.eval()


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
    fields["init_weights"] = False
    model = build_random_model(fields, device=device, n_devices=n_devices)
    try:
        state = load_file(str(weights), device=str(model.cfg.device))
        model.load_state_dict(state, strict=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(
            f"tlens_model_path: cannot load {weights}: {str(err).splitlines()[0]}"
        ) from None
    if fields.get("tokenizer_name"):
        attach_tokenizer(model, str(fields["tokenizer_name"]))
    return model


def attach_tokenizer(model: HookedTransformer, tokenizer_name: str) -> None:
    """Give `model` its tokenizer (for `to_tokens`, `to_string`, `generate` on text), loaded
    offline where `load_tokenizer` can; if it cannot be loaded the model stays without one."""

    try:
        shared = load_tokenizer(tokenizer_name)
    except Exception as err:  # noqa: BLE001 - the model works without one (token ids only)
        logger.info("model loaded without a tokenizer: %s", err)
        return
    # load_tokenizer's objects are shared; TransformerLens changes padding settings on its own.
    tokenizer = copy.deepcopy(shared)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # to_tokens pads, even a single prompt
    # Not set_tokenizer: it reloads the tokenizer by name with add_bos_token=True (hub access).
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0


def load_pretrained(
    name: str,
    device: str | None = None,
    n_devices: int | None = None,
    field: str = "tlens_model_name",
) -> HookedTransformer:

    if is_gguf_model_name(name):
        return GGUF_MODELS[name.lower()](device=device or "cpu", n_devices=n_devices or 1)
    folder = builtin_model_dir(name)
    if folder is not None:
        return load_tlens_model_from_path(folder, device=device, n_devices=n_devices)
    try:
        return HookedTransformer.from_pretrained(name, device=device, n_devices=n_devices or 1)
    except Exception as err:  # noqa: BLE001 - any hub/network failure becomes one line
        raise UserError(
            f"{field}: cannot load '{name}' from the Hugging Face Hub ({first_line(err)}); "
            f"{OFFLINE_MODELS_HINT}"
        ) from None


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
        model = load_pretrained(config.hf_model_name, device, config.n_devices, "hf_model_name")
        return model.eval()
    return load_tlens_model(
        config.tlens_model_name,
        config.tlens_model_path,
        config.tlens_config,
        device=device,
        n_devices=config.n_devices,
    )


def hooked_supports(name: str) -> bool:
    """Whether HookedTransformer.from_pretrained knows this hub name (TransformerLens' own list
    of official names and aliases; no network)."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

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
    if is_local_folder(name):
        return "bridge"
    return "hooked" if hooked_supports(name) else "bridge"


def model_name_field(config: Config) -> tuple[str | None, str]:
    """(the model's name, the config key it came from) for name sources; (None, key) else."""
    if config.hf_model_name is not None:
        return config.hf_model_name, "hf_model_name"
    if config.tlens_model_name is not None:
        return config.tlens_model_name, "tlens_model_name"
    return None, "tlens_model_path" if config.tlens_model_path is not None else "tlens_config"


def check_device(device: str | None, field: str = "device") -> None:
    """A device string torch understands and this machine has (else a one-line UserError)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(
            f"{field}: '{device}' is not a device (use cpu, cuda, cuda:1, ...)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{field}: '{device}' requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise UserError(f"{field}: '{device}' but only {n} CUDA device(s) are visible")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"{field}: device type '{dev.type}' is not supported (use cpu or cuda)")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
