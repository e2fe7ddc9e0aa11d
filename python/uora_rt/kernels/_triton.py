"""The one place Triton is imported. The CPU wheel of torch brings no Triton: then `triton` and
`tl` are None and every Triton kernel module defines its wrappers only (they are never called,
because kernels.routes never picks a Triton path without it)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def triton_available() -> bool:
    """Whether Triton kernels can run in this process (on CUDA, or in its CPU interpreter)."""
    return triton is not None
