"""The original e2e_sae 2.1.1's `e2e_sae.models.transformers` import path."""

from e2e_sae.lm.splice import SAETransformer

__all__ = ["SAETransformer"]
