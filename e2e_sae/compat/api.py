"""The helper functions of the original e2e_sae 2.1.1 that its users import, on top of our code.

They back the thin modules at the original's import paths (`e2e_sae.hooks`, `e2e_sae.loader`,
`e2e_sae.utils`) and keep the original's signatures and results. Where ours differ on purpose:
tensors are written as safetensors whatever the file name (`save_module`), `.pt` files are read
with `torch.load(weights_only=True)` only, and a bad argument raises our `UserError` /
`ConfigError` (one line naming it) where the original used `assert`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from pydantic import BaseModel
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from transformer_lens.hook_points import HookPoint

from e2e_sae.config import load_config as load_ours
from e2e_sae.config import parse_model
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.runs.checkpoint import atomic_save_tensors, atomic_write_bytes, read_tensors
from e2e_sae.saes import CacheActs, SAEActs

T = TypeVar("T", bound=BaseModel)


# --- hooks (e2e_sae.hooks) ---------------------------------------------------------------------
def sae_hook(
    x: Tensor,
    hook: HookPoint | None,
    sae: nn.Module,
    hook_acts: dict[str, Any],
    hook_key: str,
) -> Tensor:
    """Replace `x` by the SAE's output and record `SAEActs(x, c, output)` at `hook_acts[hook_key]`
    (use with `functools.partial` as a TransformerLens forward hook)."""
    output, c = sae(x)
    hook_acts[hook_key] = SAEActs(input=x, c=c, output=output)
    return output


def cache_hook(
    x: Tensor, hook: HookPoint | None, hook_acts: dict[str, Any], hook_key: str
) -> Tensor:
    """Record `CacheActs(x)` at `hook_acts[hook_key]` and leave `x` unchanged."""
    hook_acts[hook_key] = CacheActs(input=x)
    return x


# --- loading (e2e_sae.loader) ------------------------------------------------------------------
def read_state_dict(path: str | Path, what: str = "pretrained_sae_paths") -> dict[str, Tensor]:
    """Tensors of a safetensors file, or of a `.pt`/`.pth` state dict (read weights-only)."""

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    with path.open("rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return read_tensors(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable or not weights-only: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{what}: cannot read {path} as a weights-only state dict ({first})"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{what}: {path} is not a state dict of tensors")
    return {str(k): v for k, v in state.items()}


def load_pretrained_saes(
    saes: nn.ModuleDict,
    pretrained_sae_paths: Sequence[str | Path],
    all_param_names: list[str],
    retrain_saes: bool,
) -> list[str]:
    """Load SAE weights (files keyed `<sae key>.<param>`, later files winning) into `saes` in
    place; return the names in `all_param_names` that stay trainable (all of them when
    `retrain_saes`, else those not loaded)."""
    loaded: dict[str, Tensor] = {}
    for p in pretrained_sae_paths:
        loaded.update(read_state_dict(p))
    own = saes.state_dict()
    for k, v in loaded.items():
        if k not in own:
            raise UserError(f"pretrained_sae_paths: '{k}' matches no parameter of the SAEs")
        if own[k].shape != v.shape:
            raise UserError(
                f"pretrained_sae_paths: '{k}' has shape {tuple(v.shape)}, the SAE has "
                f"{tuple(own[k].shape)}"
            )
    saes.load_state_dict({**own, **loaded})
    if retrain_saes:
        return list(all_param_names)
    return [n for n in all_param_names if n not in loaded]


# --- utilities (e2e_sae.utils) -----------------------------------------------------------------
def filter_names(all_names: list[str], filter_names: list[str] | str) -> list[str]:
    """The names in `all_names` (in its order) that contain any of `filter_names`."""
    patterns = [filter_names] if isinstance(filter_names, str) else list(filter_names)
    return [n for n in all_names if any(p in n for p in patterns)]


@torch.no_grad()
def get_hook_shapes(tlens_model: Any, hook_names: list[str]) -> dict[str, list[int]]:
    """Activation shapes at `hook_names` for a one-token prompt ([1, 1, ...])."""
    shapes: dict[str, list[int]] = {}

    def record(name: str) -> Callable[[Tensor, HookPoint], None]:
        def fn(x: Tensor, hook: HookPoint) -> None:
            shapes[name] = list(x.shape)

        return fn

    # by the names asked for (a TransformerBridge's hook points carry its own names; the
    # TransformerLens names are aliases of them); names the model lacks are left out
    hook_dict = tlens_model.hook_dict
    hooks = [(name, record(name)) for name in dict.fromkeys(hook_names) if name in hook_dict]
    tokens = torch.zeros(1, 1, dtype=torch.long, device=tlens_model.cfg.device)
    tlens_model.run_with_hooks(tokens, return_type=None, fwd_hooks=hooks)
    return shapes


def load_config(config_path_or_obj: Path | str | T, config_model: type[T]) -> T:
    """A `config_model` instance as is, or one read from a YAML file (validated)."""

    if isinstance(config_path_or_obj, config_model):
        return config_path_or_obj
    if not isinstance(config_path_or_obj, str | Path):
        raise ConfigError(
            f"config: expected a YAML path or a {config_model.__name__}, "
            f"got {type(config_path_or_obj).__name__}"
        )
    return load_ours(config_path_or_obj, config_model)


def save_module(
    config_dict: dict[str, Any],
    save_dir: Path,
    module: nn.Module,
    model_filename: str,
    config_filename: str = "final_config.yaml",
) -> None:
    """Write `module`'s state dict to `save_dir/model_filename` (safetensors, whatever the file
    name; `load_pretrained_saes` reads it) and, when `save_dir` is new, the config as YAML."""

    save_dir = Path(save_dir)
    if not save_dir.exists():
        save_dir.mkdir(parents=True)
        text = yaml.safe_dump(config_dict, sort_keys=False)
        atomic_write_bytes(save_dir / config_filename, text.encode())
    atomic_save_tensors(module.state_dict(), save_dir / model_filename)


def to_numpy(tensor: Any) -> np.ndarray:
    """A NumPy array from a tensor, array, list/tuple or Python scalar."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, Tensor):
        return tensor.detach().cpu().numpy()
    if isinstance(tensor, list | tuple | int | float | bool | str):
        return np.array(tensor)
    raise TypeError(f"to_numpy: unsupported type {type(tensor).__name__}")


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def replace_pydantic_model(model: T, *updates: Mapping[str, Any]) -> T:
    """A copy of `model` with (nested) dict `updates` applied in order, validated again."""

    data = model.model_dump()
    for u in updates:
        data = _deep_merge(data, u)
    return parse_model(type(model), data)


def get_linear_lr_schedule(
    warmup_samples: int,
    cooldown_samples: int,
    n_samples: int | None,
    effective_batch_size: int,
    min_lr_factor: float = 0.0,
) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warmup to 1 over `warmup_samples`, constant, then a
    linear cooldown over the last `cooldown_samples` down to `min_lr_factor`."""
    warmup = warmup_samples // effective_batch_size
    cooldown = cooldown_samples // effective_batch_size
    if n_samples is None:
        if cooldown_samples:
            raise ConfigError("cooldown_samples: a cooldown needs n_samples")
        cooldown_start: float = math.inf
    else:
        # +1: the scheduler also steps once after the last optimizer step.
        cooldown_start = math.ceil(n_samples / effective_batch_size) + 1 - cooldown
        if cooldown_start <= warmup:
            raise ConfigError("cooldown_samples: the cooldown would start before warmup ends")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step >= cooldown_start:
            return max(min_lr_factor, 1 - (step - cooldown_start) / cooldown)
        return 1.0

    return factor


def get_cosine_schedule_with_warmup(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    min_lr_factor: float = 0.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warmup from 0, then a cosine from 1 down to `min_lr_factor` (half a period by
    default), as `transformers.get_cosine_schedule_with_warmup` plus a floor."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        cos = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
        return max(min_lr_factor, min_lr_factor + (1 - min_lr_factor) * cos)

    return LambdaLR(optimizer, factor, last_epoch)
