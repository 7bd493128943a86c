"""Training: one optimizer step (`engine`), what feeds it activations (`feeds`: the LM or an
activation cache), and the loop around it (`loop`: log / eval / save / signal triggers, several
runs on one batch stream). `e2e-sae train`, `e2e-sae train-cached` and the one-pass sweep
(`e2e_sae.training.cached.train_together`) all take their steps through `engine.Engine.train_step`.
"""
