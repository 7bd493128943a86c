"""The original e2e_sae 2.1.1's `e2e_sae.models` package (`transformers.SAETransformer`,
`sparsifiers.SAE`). Our model loading lives in `e2e_sae.lm.load`."""
