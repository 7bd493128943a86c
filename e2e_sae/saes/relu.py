"""The paper's SAE: ReLU encoder with bias, decoder columns normalised to unit norm inside the graph
(`SAEBase.dict_elements`, as in the original library), decoder bias."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from e2e_sae.saes.base import SAEBase
from e2e_sae.saes.registry import register_architecture


@register_architecture
class SAE(SAEBase):
    architecture = "relu"

    def encode(self, x: Tensor) -> Tensor:
        return F.relu(self.pre_acts(x))
