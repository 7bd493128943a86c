"""SAE architectures behind one interface (`SAEBase`), looked up by name in `ARCHITECTURES`."""

from e2e_sae.saes import relu as _relu  # noqa: F401  (registers "relu")
from e2e_sae.saes.base import CacheActs, SAEActs, SAEBase
from e2e_sae.saes.registry import ARCHITECTURES, build_sae, register_architecture
from e2e_sae.saes.relu import SAE

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "CacheActs",
    "SAEActs",
    "SAEBase",
    "build_sae",
    "register_architecture",
]
