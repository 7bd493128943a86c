"""Run directories on disk: SAE checkpoints as safetensors and atomic writes (`checkpoint`), and the
original e2e_sae 2.1.1's files read weights-only (`original`)."""
