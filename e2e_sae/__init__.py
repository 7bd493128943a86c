"""e2e_sae: sparse autoencoders trained locally, end-to-end and e2e+downstream on TransformerLens
models (Braun et al. 2024), with modern architectures and an offline default job."""

from e2e_sae.config import Config, DatasetConfig, LossConfigs, load_config
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
    "load_config",
]
