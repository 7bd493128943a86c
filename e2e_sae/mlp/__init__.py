"""SAEs on a small MLP classifier (8x8 digits offline, MNIST online), trained locally or e2e."""

from e2e_sae.mlp.config import MLPConfig, MLPSAERunConfig, MLPTrainConfig
from e2e_sae.mlp.data import Split, load_digits_split, load_split
from e2e_sae.mlp.model import MLP
from e2e_sae.mlp.train import (
    MLPJobResult,
    build_mlp_saes,
    evaluate_mlp,
    load_mlp_config,
    results_table,
    run_mlp_job,
    train_mlp,
    train_mlp_saes,
)

__all__ = [
    "MLP",
    "MLPConfig",
    "MLPJobResult",
    "MLPSAERunConfig",
    "MLPTrainConfig",
    "Split",
    "build_mlp_saes",
    "evaluate_mlp",
    "load_digits_split",
    "load_mlp_config",
    "load_split",
    "results_table",
    "run_mlp_job",
    "train_mlp",
    "train_mlp_saes",
]
