"""Analysis of trained SAEs: plots, dictionary geometry, feature browser."""
