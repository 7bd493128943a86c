"""The original e2e_sae 2.1.1's users: rewriting its runs as ours (`convert`), and its API's
helpers (`api`) behind its import paths (`e2e_sae.utils`, `e2e_sae.loader`, `e2e_sae.hooks`,
`e2e_sae.models.*`). Its file formats are read by `e2e_sae.runs.original`."""
