"""e2e_sae: sparse autoencoders trained locally, end-to-end and e2e+downstream on TransformerLens
models (Braun et al. 2024), with modern architectures and an offline default job."""

from typing import TYPE_CHECKING, Any

from e2e_sae.config import Config, DatasetConfig, LossConfigs, demo_config, load_config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.saes import (
    ARCHITECTURES,
    SAE,
    BatchTopKSAE,
    CacheActs,
    GatedSAE,
    JumpReLUSAE,
    SAEActs,
    SAEBase,
    TopKSAE,
    build_sae,
)
from e2e_sae.version import __version__

if TYPE_CHECKING:
    from e2e_sae.analysis.browser import write_browser
    from e2e_sae.eval.evaluate import evaluate_run, write_eval
    from e2e_sae.eval.report import eval_table
    from e2e_sae.training.trainer import train

# Loaded on first use: `import e2e_sae` stays light (no training loop, matplotlib, ...).
_LAZY = {
    "train": "e2e_sae.training.trainer",
    "evaluate_run": "e2e_sae.eval.evaluate",
    "write_eval": "e2e_sae.eval.evaluate",
    "eval_table": "e2e_sae.eval.report",
    "write_browser": "e2e_sae.analysis.browser",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'e2e_sae' has no attribute '{name}'")


__all__ = [
    "__version__",
    "ARCHITECTURES",
    "SAE",
    "BatchTopKSAE",
    "CacheActs",
    "Config",
    "ConfigError",
    "DatasetConfig",
    "GatedSAE",
    "JumpReLUSAE",
    "LossConfigs",
    "SAEActs",
    "SAEBase",
    "SAETransformer",
    "TopKSAE",
    "UserError",
    "build_sae",
    "demo_config",
    "eval_table",
    "evaluate_run",
    "load_config",
    "train",
    "write_browser",
    "write_eval",
]
