"""uora_rt: train, store and serve UORA adapters (arXiv 2505.20154).

Training: UORAConfig, inject, reinit_step, merge, unmerge, save_adapter, load_adapter.
Projections: projections(seed, r, max_in, max_out).
Serving: load (a base and its adapters), Runtime, Engine, SamplingParams, RequestOutput.
"""

from uora_rt._native import build_info
from uora_rt.core.config import UORAConfig
from uora_rt.engine import Engine, EngineLoop, RequestOutput, SamplingParams
from uora_rt.errors import AdapterFormatError
from uora_rt.training.inject import (inject, load_adapter, merge, reinit_step, save_adapter,
                                     to_adapter, unmerge)
from uora_rt.core.projections import projections
from uora_rt.runtime import Runtime, load

__all__ = [
    "AdapterFormatError", "Engine", "EngineLoop", "RequestOutput", "SamplingParams", "UORAConfig",
    "build_info", "inject", "load_adapter", "merge", "Runtime", "load", "projections",
    "reinit_step", "save_adapter", "to_adapter", "unmerge",
]
__version__ = "0.1.0"
