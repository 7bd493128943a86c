"""Training: one optimizer step (`engine`, for SAE runs and the MLP's SAEs alike), what feeds it
activations (`feeds`: the LM or an activation cache), and the loop around it (`loop`: log / eval /
save / signal triggers, several runs on one batch stream). `e2e-sae train` and `e2e-sae
train-cached` (`cached`) both set runs up with `trainer.setup` and take their steps through
`engine.Engine.train_step` (and every trainer here the lr schedule `engine.lr_schedule`);
`train_lm` trains an LM.
Runs continue exactly (`resume`, `find_run`) and stop cleanly (`loop`).
"""
