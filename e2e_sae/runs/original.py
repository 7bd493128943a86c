"""The original e2e_sae 2.1.1's files, read without a full unpickle.

What it writes:
  * an SAE run directory: `final_config.yaml` (its whole Config, `model_dump(mode="json")`) and
    `samples_<N>.pt`, a `torch.save` of `model.saes.state_dict()`: keys `<sae_key>.encoder.0.weight`
    [d_sae, d_in], `.encoder.0.bias`, `.decoder.weight` [d_in, d_sae] (raw, not unit norm),
    `.decoder.bias`; no firing statistics;
  * a custom LM (its `train_tlens` script): `epoch_<N>.pt`, a `torch.save` of the
    HookedTransformer's state dict, with a `final_config.yaml` beside it whose `tlens_config`
    holds the HookedTransformerConfig fields (`dtype` as a string, `tokenizer_name`).

`.pt` files are read with `torch.load(..., weights_only=True)` only. A zip-format file is first
checked against the CRC32 of every member, so a truncated or bit-flipped file is told apart from
one that genuinely needs a full unpickle (which is refused).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import pickle
import re
import typing
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

from e2e_sae.config import Config, parse_model, read_yaml
from e2e_sae.errors import ConfigError, DamagedFileError, UserError, first_line

if typing.TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

CONFIG_FILE = "final_config.yaml"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")
_UNSAFE_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL (\S+)")
# The original's TorchDtype strings (plus float16, which HookedTransformerConfig also takes).
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Parameters of one of the original's SAEs (its only sparsifier in 2.1.1).
SAE_PARAMS = ("encoder.0.weight", "encoder.0.bias", "decoder.weight", "decoder.bias")
# HookedTransformer buffers derived from the config, not learned.
OPTIONAL_LM_BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")


# --- .pt state dicts -----------------------------------------------------------------------------
def _zip_damage(path: Path) -> str | None:
    """Why a zip-format `torch.save` file is damaged (a member failing its CRC32, a broken
    directory), or None. Non-zip files (legacy format, or truncated past recognition) are left to
    `torch.load` to judge."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as err:
        return first_line(err)
    return f"CRC mismatch in {bad}" if bad is not None else None


def read_pt_state_dict(path: str | os.PathLike[str], what: str = "checkpoint") -> dict[str, Tensor]:
    """A `torch.save`d {name: tensor} dict, loaded with `weights_only=True` (never a full unpickle).

    Raises `DamagedFileError` for a truncated / emptied / corrupted file and a one-line
    `UserError` for a file that would need a full unpickle or is not a flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    damage = _zip_damage(path)
    if damage is not None:
        raise DamagedFileError(f"{what}: {path} is damaged ({damage})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        m = _UNSAFE_GLOBAL_RE.search(str(err))
        needs = f" (it references {m.group(1)})" if m else ""
        maybe = "" if zipfile.is_zipfile(path) else " or is damaged"
        raise UserError(
            f"{what}: {path} needs a full unpickle to load{needs}{maybe}; refused: only plain "
            "tensor state dicts are read (torch.load weights_only=True)"
        ) from None
    except Exception as err:  # noqa: BLE001 - EOFError, OSError, RuntimeError from a broken file
        raise DamagedFileError(f"{what}: {path} is damaged ({first_line(err)})") from None
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        got = type(obj).__name__
        raise UserError(f"{what}: {path} is not a state dict of tensors (got a {got})")
    return dict(obj)


def samples_of(path: Path) -> int | None:
    """N of a `samples_<N>.safetensors` / `samples_<N>.pt` name, else None."""
    m = re.match(r"^samples_(\d+)\.(?:safetensors|pt)$", path.name)
    return int(m.group(1)) if m else None


# --- final_config.yaml ---------------------------------------------------------------------------
def is_original_config(raw: Mapping[str, Any]) -> bool:
    """True for a config this library did not write: ours always records `precision` and
    `saes.architecture`, which the original's schema never had."""
    saes = raw.get("saes")
    return "precision" not in raw and not (isinstance(saes, Mapping) and "architecture" in saes)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds directly (`X`, `X | None`, `Annotated[X, ...]`)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _drop_unknown(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> list[str]:
    dropped: list[str] = []
    for key in list(data):
        field = model.model_fields.get(key)
        if field is None:
            dropped.append(prefix + key)
            del data[key]
            continue
        sub = _model_in(field.annotation)
        if sub is not None and isinstance(data[key], dict):
            dropped += _drop_unknown(sub, data[key], f"{prefix}{key}.")
    return dropped


def adapt_original_config(
    raw: Mapping[str, Any], source: str = "config", n_samples: int | None = None
) -> dict[str, Any]:
    """The original's config dict as one of ours: keys we do not use (`cooldown_samples`, keys of
    older versions, ...) are dropped with one log line; `n_samples: null` (the original's "the
    whole dataset") becomes `n_samples` (the checkpoint's sample count)."""
    data = copy.deepcopy(dict(raw))
    dropped = _drop_unknown(Config, data)
    saes = data.get("saes")
    if isinstance(saes, dict):
        kind = saes.get("type_of_sparsifier")
        if kind not in (None, "sae"):
            raise ConfigError(
                f"{source}: saes.type_of_sparsifier: '{kind}' is not supported "
                "(only the original's 'sae')"
            )
        if "k" in saes:  # the original's `k` sized its codebook sparsifier, never an SAE
            del saes["k"]
            dropped.append("saes.k")
    if dropped:
        logger.info(
            "%s: ignoring keys of the original e2e_sae that this library does not use: %s",
            source,
            ", ".join(dropped),
        )
    if data.get("n_samples") is None:
        data["n_samples"] = max(1, n_samples or 1)
    return data


def load_run_config(path: Path, n_samples: int | None = None) -> Config:
    """A run's `final_config.yaml`, ours or the original's (adapted, see above)."""
    raw = read_yaml(path)
    if isinstance(raw, dict) and is_original_config(raw):
        raw = adapt_original_config(raw, str(path), n_samples)
    config = parse_model(Config, raw, source=str(path))
    assert isinstance(config, Config)
    return config


# --- epoch_<N>.pt language models ----------------------------------------------------------------
def original_lm_file(path: str | os.PathLike[str]) -> Path | None:
    """The `epoch_<N>.pt` a `tlens_model_path` names when it is in the original's format: a `.pt`
    file, or a folder of `epoch_<N>.pt` files (the newest). None for anything else."""
    path = Path(path).expanduser()
    if path.suffix == ".pt":
        return path
    if path.is_dir():
        epochs = [
            (int(m.group(1)), p) for p in path.glob("epoch_*.pt") if (m := _EPOCH_RE.match(p.name))
        ]
        if epochs:
            return max(epochs)[1]
    return None


def original_lm_fields(pt: Path) -> dict[str, Any]:
    """HookedTransformerConfig fields from the `tlens_config` of the `final_config.yaml` beside
    `pt`; `dtype` becomes a torch dtype."""
    cfg_path = pt.parent / CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(
            f"tlens_model_path: {pt} has no {CONFIG_FILE} beside it (the original's train_tlens "
            "writes one holding tlens_config)"
        )
    raw = read_yaml(cfg_path)
    tlens = raw.get("tlens_config") if isinstance(raw, dict) else None
    if not isinstance(tlens, dict):
        raise ConfigError(f"{cfg_path}: tlens_config: required mapping is missing")
    fields = dict(tlens)
    dtype = fields.pop("dtype", None)
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ConfigError(
                f"{cfg_path}: tlens_config.dtype: unknown '{dtype}' ({', '.join(_DTYPES)})"
            )
        fields["dtype"] = _DTYPES[dtype]
    return fields


def read_original_lm(
    path: str | os.PathLike[str],
) -> tuple[Path, dict[str, Any], dict[str, Tensor]] | None:
    """(the `epoch_<N>.pt` file, its HookedTransformerConfig fields, its weights without the
    derived buffers) when `path` names one of the original's language models, else None."""
    pt = original_lm_file(path)
    if pt is None:
        return None
    if not pt.is_file():
        raise UserError(f"tlens_model_path: file not found: {pt}")
    fields = original_lm_fields(pt)
    state = read_pt_state_dict(pt, "tlens_model_path")
    # derived buffers (causal mask, ...): TransformerLens versions store them differently (TL 3
    # keeps an empty mask and builds it on use), so the model's own are kept
    state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in OPTIONAL_LM_BUFFERS}
    return pt, fields, state
