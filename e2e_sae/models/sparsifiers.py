"""The original e2e_sae 2.1.1's `e2e_sae.models.sparsifiers` import path (its ReLU `SAE`).

Same constructor, `forward(x) -> (output, c)`, `dict_elements` and parameter names; unlike the
original, `encoder` holds the linear layer only (the code is `sae.encode(x)`).
"""

from e2e_sae.saes import SAE

__all__ = ["SAE"]
