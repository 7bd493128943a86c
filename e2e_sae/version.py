"""The package version (read by the CLI and written into exports)."""

__version__ = "3.0.0"
