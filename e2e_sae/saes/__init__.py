"""SAE architectures behind one interface (`SAEBase`), looked up by name in `ARCHITECTURES`.

Importing a module registers its architecture: relu (the paper's), topk, batchtopk, jumprelu, gated,
skip_transcoder, matryoshka, clt (a cross-layer transcoder's layers).
"""

from e2e_sae.saes import relu as _relu  # noqa: F401  (registers "relu")
from e2e_sae.saes.base import CacheActs, SAEActs, SAEBase, SAEDict, sae_key
from e2e_sae.saes.batchtopk import BatchTopKSAE
from e2e_sae.saes.clt import CrossLayerTranscoder
from e2e_sae.saes.gated import GatedSAE
from e2e_sae.saes.jumprelu import JumpReLUSAE
from e2e_sae.saes.matryoshka import MatryoshkaSAE
from e2e_sae.saes.registry import (
    ARCHITECTURES,
    build_sae,
    idle_aux_warnings,
    is_cross_layer,
    register_architecture,
    sae_kwargs,
)
from e2e_sae.saes.relu import SAE
from e2e_sae.saes.skip_transcoder import SkipTranscoder
from e2e_sae.saes.topk import TopKSAE

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "BatchTopKSAE",
    "CacheActs",
    "CrossLayerTranscoder",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "SAEActs",
    "SAEBase",
    "SAEDict",
    "SkipTranscoder",
    "TopKSAE",
    "build_sae",
    "idle_aux_warnings",
    "is_cross_layer",
    "sae_kwargs",
    "register_architecture",
    "sae_key",
]
