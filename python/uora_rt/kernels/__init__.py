"""Every kernel the package runs, each beside the plain-PyTorch truth it is tested against.

ops: typed wrappers over the compiled operators (uora_rt._C: projections, reinit, the grouped
adapter op, CPU paged attention); triton_expand, triton_decode, triton_prefill, fused: the Triton
kernels for CUDA; dense: the GEMM of every linear; reference: the oracle (plain PyTorch / numpy);
routes: which of them a step runs, decided once per step.
"""

from uora_rt.kernels._triton import triton_available

__all__ = ["triton_available"]
