"""The original e2e_sae 2.1.1's `e2e_sae.hooks` import path (activation records, hook functions)."""

from e2e_sae.compat.api import cache_hook, sae_hook
from e2e_sae.saes import CacheActs, SAEActs

__all__ = ["CacheActs", "SAEActs", "cache_hook", "sae_hook"]
