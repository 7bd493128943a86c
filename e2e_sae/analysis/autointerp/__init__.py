"""Automated interpretability of SAE features (Bills et al. 2023; Braun et al. 2024, section 3.4).

- `pipeline`: `run_autointerp(run, explainer)`: sample, explain, score, summarise (resumable);
- `sampling`: stratified-by-frequency seeded feature samples;
- `examples`: top / quantile examples (the feature browser's scan), random and silent windows;
- `prompts`, `scorers`: the explainer, the simulation and detection scorers;
- `backends`: an OpenAI-compatible chat endpoint (`HttpChat`) or a local model (`LocalChat`);
- `metrics`: simulation correlation, detection accuracy / AUC, bootstrap intervals;
- `report`: the comparison across runs, `autointerp_figures(results, out_dir)`;
- `store`: the results on disk.

This package's `__init__` imports none of them, so the browser can read results (`store`)
without importing the pipeline, which imports the browser.
"""
