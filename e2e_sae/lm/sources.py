"""Where models come from without the network: the models shipped in the package, the files a
saved model folder holds, and the hint listing the offline choices."""

from __future__ import annotations

from pathlib import Path

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "tlens_config.json"
OFFLINE_MODELS_HINT = (
    "offline models: smollm2-135m, shakespeare-lm, a tlens_model_path, a tlens_config, or a "
    "local Hugging Face model folder as hf_model_name"
)


def builtin_model_dir(name: str) -> Path | None:
    """Folder of a model shipped with the package (e.g. `shakespeare-lm`), if any."""
    folder = Path(__file__).resolve().parent.parent / "assets" / "models" / name
    return folder if (folder / MODEL_CONFIG).exists() else None


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
