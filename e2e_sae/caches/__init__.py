"""Stored model outputs that stand in for LM passes: clean activations for local training
(`activations`) and the clean model's top-k next-token distributions (`teacher`)."""
