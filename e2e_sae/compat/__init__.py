"""Readers for files written by other libraries' versions of this one.

`original`: the original e2e_sae 2.1.1 (ApolloResearch): `samples_<N>.pt` SAE state dicts, its
`final_config.yaml`, and `epoch_<N>.pt` language models from its `train_tlens` script.
"""

from e2e_sae.compat.original import (
    adapt_original_config,
    convert_original_run,
    is_original_config,
    load_original_lm,
    original_lm_file,
    read_pt_state_dict,
)

__all__ = [
    "adapt_original_config",
    "convert_original_run",
    "is_original_config",
    "load_original_lm",
    "original_lm_file",
    "read_pt_state_dict",
]
