"""Where models come from without the network: the models shipped in the package, the files a
saved model folder holds, and the hint listing the offline choices."""

from __future__ import annotations

import difflib
from pathlib import Path

from e2e_sae.data.tokenizer import GGUF_MODEL_ALIASES, is_gguf_model_name
from e2e_sae.errors import UserError

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


def builtin_model_names() -> list[str]:
    """The models shipped in the package (`shakespeare-lm`, ...)."""
    root = Path(__file__).resolve().parent.parent / "assets" / "models"
    return sorted(p.name for p in root.iterdir() if (p / MODEL_CONFIG).is_file())


def check_model_name(name: str, field: str) -> None:
    """Refuse a name that is not a built-in or GGUF model (nor a local folder) but close to one:
    a typo such as `shakespeare_lm` would otherwise go to the Hugging Face Hub, retry there for
    half a minute and fail. Other unknown names may be hub models and are left to the loader."""
    builtin = builtin_model_names()
    if name in builtin or is_gguf_model_name(name) or Path(name).expanduser().exists():
        return
    offline = [*builtin, *GGUF_MODEL_ALIASES]
    close = difflib.get_close_matches(name.strip().lower(), offline, 1, 0.8)
    if close:
        raise UserError(f"{field}: unknown model '{name}' (did you mean '{close[0]}'?)")
