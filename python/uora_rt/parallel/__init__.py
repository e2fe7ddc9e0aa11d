"""Tensor-parallel serving over torch.distributed (gloo on the CPU, nccl on CUDA).

shard.py: how a Llama-family model splits across ranks; hook.py: the column-/row-parallel linears
with their UORA adapters; comm.py: messages from the driver (rank 0) to the workers as tensors;
step.py: a step's metadata to and from those tensors; driver.py: rank 0 (spawns the workers,
mirrors the adapter pool); worker.py: ranks 1..N-1.
"""
