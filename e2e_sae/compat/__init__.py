"""The original e2e_sae 2.1.1: its file formats (`original`: `samples_<N>.pt` SAE state dicts
read weights-only, its `final_config.yaml`, `epoch_<N>.pt` language models), rewriting its runs as
ours (`convert`), and its API's helpers (`api`) behind its import paths (`e2e_sae.utils`,
`e2e_sae.loader`, `e2e_sae.hooks`, `e2e_sae.models.*`)."""
