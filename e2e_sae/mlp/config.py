"""Config of an MLP job: train a small MLP classifier, then SAEs on its hidden layers.

Loss terms are the language-model ones (`e2e_sae.config.LossConfigs`): `out_to_in` trains
locally (MSE to the SAE's input), `logits_kl` end-to-end (KL(P_clean || P_with_SAEs) of the
class distribution), `in_to_orig` matches later hidden layers (`hidden.<i>`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from e2e_sae.config import (
    Count,
    LossConfigs,
    OptimizerConfig,
    PathComponent,
    Seed,
    StrList,
    _Frozen,
)


class MLPTrainConfig(_Frozen):
    """The classifier: input -> hidden_sizes (ReLU) -> classes, trained with Adam on CE."""

    hidden_sizes: list[PositiveInt] = Field(default_factory=lambda: [64, 64])
    lr: PositiveFloat = 3e-3
    batch_size: PositiveInt = 64
    n_epochs: PositiveInt = 40
    weight_decay: NonNegativeFloat = 0.0


class MLPSAERunConfig(OptimizerConfig):
    """One set of SAEs (all trained together, spliced in together when end-to-end), stepped as
    every trainer here (`OptimizerConfig`; constant lr by default)."""

    name: PathComponent
    """Names its files (`sae_<name>.safetensors`): one file name, no '/'."""
    sae_positions: StrList
    """Hidden layers to replace: `hidden.0`, `hidden.1`, ... (the ReLU outputs)."""
    dict_size_to_input_ratio: PositiveFloat = 4.0
    architecture: str = "relu"
    k: PositiveInt | None = None
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    loss: LossConfigs
    lr: PositiveFloat = 1e-3
    batch_size: Count = 64
    lr_schedule: Literal["linear", "cosine", "constant"] = "constant"
    n_epochs: PositiveInt = 40


class MLPConfig(_Frozen):
    """`e2e-sae train-mlp CONFIG`: the MLP, then each entry of `saes` in turn."""

    seed: Seed = 0
    dataset: Literal["digits", "mnist"] = "digits"
    """digits: scikit-learn's bundled 8x8 digits (offline); mnist: torchvision download."""
    data_dir: Path | None = None
    """Where MNIST is downloaded (default: the e2e_sae cache)."""
    test_fraction: PositiveFloat = 0.2
    """digits only: held-out fraction (stratified by class)."""
    mlp: MLPTrainConfig = Field(default_factory=MLPTrainConfig)
    saved_mlp_path: Path | None = None
    """An `mlp.safetensors` (or a run folder holding one) to use instead of training the MLP."""
    saes: list[MLPSAERunConfig] = Field(default_factory=list)
    save_dir: Path | None = Path("runs")
    run_name: PathComponent | None = None
    wandb_project: str | None = None
    device: str | None = None

    @model_validator(mode="after")
    def _check(self) -> MLPConfig:
        if self.test_fraction >= 1:
            raise ValueError("test_fraction must be < 1")
        names = [r.name for r in self.saes]
        if len(set(names)) != len(names):
            raise ValueError("saes: run names must be unique")
        return self
