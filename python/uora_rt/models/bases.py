"""The bases a user can name: a Hugging Face folder, or a packaged model by its short name."""

from __future__ import annotations

from pathlib import Path

from uora_rt.models.assets import minilm_dir
from uora_rt.models.gguf_import import default_base


# The names a user may give for a packaged base, and the name it is served and reported under.
PACKAGED = {"smollm2": "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct",
            "minilm": "all-MiniLM-L6-v2", "all-MiniLM-L6-v2": "all-MiniLM-L6-v2"}


def resolve_base(base) -> Path:
    """A Hugging Face folder, or the name of a packaged model: "smollm2" (the default, None) or
    "minilm"."""
    name = PACKAGED.get("smollm2" if base is None else base)
    if name == "SmolLM2-135M-Instruct":
        return default_base()
    if name == "all-MiniLM-L6-v2":
        return minilm_dir()
    return Path(base)


def base_name(base, folder) -> str:
    """What a base is called: the packaged model's name, else its folder's."""
    return PACKAGED.get("smollm2" if base is None else base, Path(folder).name)
