"""The original e2e_sae 2.1.1's `e2e_sae.loader` import path.

`load_tlens_model(tlens_model_name, tlens_model_path)` is ours (it also takes `tlens_config=` and
`device=`, and loads the offline built-ins `shakespeare-lm` / `smollm2-135m`, tokenizer attached);
`load_pretrained_saes` keeps the original's signature (safetensors or weights-only `.pt` files).
"""

from e2e_sae.compat.api import load_pretrained_saes
from e2e_sae.lm.load import load_tlens_model

__all__ = ["load_pretrained_saes", "load_tlens_model"]
