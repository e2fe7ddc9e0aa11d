"""Which kernels a forward runs, decided once per step in this one place.

A step knows everything the choice depends on: the device, the model's dtype, the dtype of the
adapters' shared factors, how many rows it computes and whether autograd records. `choose`
turns that and the user's `KernelPrefs` into `Routes`, which the model (elementwise ops) and the
adapter batch (shrink and expand) then follow without asking again. Every distinct choice is
logged once, so a slower path never runs unannounced.

The routes (docs/kernels.md has the measurements behind each threshold):
- fused: the Triton elementwise decoder kernels (kernels.fused) instead of the torch ops;
- parallel_shrink: each adapter family's shrink u = x A_catᵀ is one GEMM over every row, issued
  beside the base GEMM (on CUDA on a side stream), then the expand; off, uora_group_ shrinks only
  the rows that have an adapter, after the base GEMM (the CPU's choice: it is compute-bound);
- triton_expand: the expand as one Triton kernel (decode-size CUDA batches), else the C++ op;
- deferred: with the fused kernels, small decode batches compute the whole adapter delta on the
  side stream into a float32 buffer that the consumer kernel adds as it reads the GEMM output.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from uora_rt.kernels import triton_expand
from uora_rt.kernels._triton import triton_available

log = logging.getLogger("uora_rt.kernels")

# Up to this many rows the decode expand is deferred. H200, 7B, 64 adapters: at batch 1 deferred
# +2.2 % over no adapters against +3.4 % in place; at batch 64 +4.0 % against +2.8 % (the float32
# delta's traffic and the side stream's longer branch outweigh the saved launch). 16 lies between
# the two measured points and was not measured itself.
DEFER_MAX_ROWS = 16
_HALF = (torch.bfloat16, torch.float16)


@dataclass
class KernelPrefs:
    """What the user (or a benchmark comparing paths) asks for; None = the device's best."""

    fused: bool | None = None            # True: the Triton kernels or an error saying why not
    parallel_shrink: bool | None = None  # None: on for CUDA, off for the CPU
    triton_expand: bool = True           # False: always the C++ expand
    defer_expand: bool = True            # False: expand in place after the base GEMM


@dataclass(frozen=True)
class Routes:
    fused: bool
    parallel_shrink: bool
    triton_expand: bool
    deferred: bool
    side_stream: bool  # CUDA: adapter kernels go on a side stream beside the base GEMM

    def describe(self) -> str:
        expand = ("deferred Triton expand" if self.deferred else "Triton expand"
                  if self.triton_expand else "C++ expand")
        shrink = ("one shrink GEMM per family" if self.parallel_shrink
                  else "grouped shrink+expand op")
        return (f"elementwise {'Triton fused' if self.fused else 'torch'}; adapters: {shrink}"
                + (f", {expand}" if self.parallel_shrink else "")
                + (", side stream" if self.side_stream else ""))


# Training and reference forwards: differentiable torch ops, the grouped adapter op.
TORCH = Routes(fused=False, parallel_shrink=False, triton_expand=False, deferred=False,
               side_stream=False)
_said: set = set()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fused(prefs: KernelPrefs, device: torch.device, decoder: bool) -> bool:
    why = None
    if not decoder:
        why = "the model is an encoder"
    elif not triton_available():
        why = "Triton is not installed"
    elif device.type != "cuda" and not _interpret():
        why = f"the tensors are on {device.type}"
    elif torch.is_grad_enabled():
        why = "autograd is recording (training takes the differentiable torch ops)"
    if prefs.fused and why:
        raise ValueError(f"fused decoder kernels requested but {why}")
    return prefs.fused is not False and why is None


def choose(prefs: KernelPrefs, device, dtype: torch.dtype, factor_dtype: torch.dtype, rows: int,
           decoder: bool = True) -> Routes:
    """The routes of one forward of `rows` tokens of a model in `dtype` on `device`, whose
    adapters' shared factors are in `factor_dtype`."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    fused = _fused(prefs, device, decoder)
    parallel = cuda if prefs.parallel_shrink is None else prefs.parallel_shrink
    tensor_core = dtype in _HALF and factor_dtype == dtype
    triton_ok = parallel and prefs.triton_expand and triton_available() and tensor_core
    routes = Routes(
        fused=fused, parallel_shrink=parallel,
        triton_expand=triton_ok and cuda and rows <= triton_expand.MAX_ROWS,
        deferred=triton_ok and fused and prefs.defer_expand and rows <= DEFER_MAX_ROWS,
        side_stream=cuda)
    key = (routes, device.type)
    if key not in _said:
        _said.add(key)
        log.info("kernels on %s (steps of %d rows and alike): %s", device.type, rows,
                 routes.describe())
    return routes
