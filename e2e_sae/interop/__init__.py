"""Interoperability: SAELens' on-disk format, the Hugging Face Hub, SAEBench's custom-SAE API.

Nothing here imports `sae_lens`, `sae_bench` or the network at import time.
"""

from e2e_sae.interop.hub import is_hf_uri, is_saelens_dir, parse_hf_uri, push_to_hub, resolve_path
from e2e_sae.interop.pretrained import PAPER_SAES, load_paper_sae, write_paper_run
from e2e_sae.interop.saebench import SAEBenchConfig, SAEBenchSAE, to_saebench
from e2e_sae.interop.saelens import (
    SAELensInfo,
    export_run_saelens,
    load_saelens_into,
    load_saelens_sae,
    saelens_transformer,
    save_saelens,
)

__all__ = [
    "PAPER_SAES",
    "SAEBenchConfig",
    "SAEBenchSAE",
    "SAELensInfo",
    "export_run_saelens",
    "is_hf_uri",
    "is_saelens_dir",
    "load_paper_sae",
    "load_saelens_into",
    "load_saelens_sae",
    "parse_hf_uri",
    "push_to_hub",
    "resolve_path",
    "saelens_transformer",
    "save_saelens",
    "to_saebench",
    "write_paper_run",
]
