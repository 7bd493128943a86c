"""e2e_sae: sparse autoencoders trained locally, end-to-end and e2e+downstream on TransformerLens
models (Braun et al. 2024), with modern architectures and an offline default job.

The public names below are imported on first use (PEP 562), so `import e2e_sae` and the `e2e-sae`
command start without torch: a Ctrl-C in the first seconds of a command reaches the command, which
ends with one line instead of an import's traceback."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from e2e_sae.version import __version__

if TYPE_CHECKING:
    from e2e_sae.analysis.browser import write_browser
    from e2e_sae.config import Config, DatasetConfig, LossConfigs, demo_config, load_config
    from e2e_sae.errors import ConfigError, UserError
    from e2e_sae.eval.evaluate import evaluate_run, write_eval
    from e2e_sae.eval.report import eval_table
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
    from e2e_sae.training.trainer import train

_WHERE = {
    "Config": "e2e_sae.config",
    "DatasetConfig": "e2e_sae.config",
    "LossConfigs": "e2e_sae.config",
    "load_config": "e2e_sae.config",
    "demo_config": "e2e_sae.config",
    "train": "e2e_sae.training.trainer",
    "evaluate_run": "e2e_sae.eval.evaluate",
    "write_eval": "e2e_sae.eval.evaluate",
    "eval_table": "e2e_sae.eval.report",
    "write_browser": "e2e_sae.analysis.browser",
    "ConfigError": "e2e_sae.errors",
    "UserError": "e2e_sae.errors",
    "SAETransformer": "e2e_sae.lm.splice",
    **{
        name: "e2e_sae.saes"
        for name in (
            "ARCHITECTURES",
            "SAE",
            "BatchTopKSAE",
            "CacheActs",
            "GatedSAE",
            "JumpReLUSAE",
            "SAEActs",
            "SAEBase",
            "TopKSAE",
            "build_sae",
        )
    },
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'e2e_sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # (once)
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


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
