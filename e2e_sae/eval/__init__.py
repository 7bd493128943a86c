"""Evaluation of SAEs spliced into the LM (`evaluate`) and its tables (`report`)."""
