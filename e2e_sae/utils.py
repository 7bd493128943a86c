"""The original e2e_sae 2.1.1's `e2e_sae.utils` import path: the helpers its users import."""

from e2e_sae.compat.api import (
    filter_names,
    get_cosine_schedule_with_warmup,
    get_hook_shapes,
    get_linear_lr_schedule,
    load_config,
    replace_pydantic_model,
    save_module,
    to_numpy,
)
from e2e_sae.training.trainer import set_seed

__all__ = [
    "filter_names",
    "get_cosine_schedule_with_warmup",
    "get_hook_shapes",
    "get_linear_lr_schedule",
    "load_config",
    "replace_pydantic_model",
    "save_module",
    "set_seed",
    "to_numpy",
]
