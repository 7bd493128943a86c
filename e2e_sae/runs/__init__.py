"""Run directories on disk: SAE checkpoints as safetensors and atomic writes (`checkpoint`), the
lock a live run holds (`lock`), and the original e2e_sae 2.1.1's files read weights-only
(`original`)."""
