"""Tensor-parallel serving over torch.distributed (gloo on the CPU, nccl on CUDA).

What tensor parallelism adds to the one-device path, and nothing more: shard.py (how a
Llama-family checkpoint splits across ranks; the model's row-parallel groups sum over them),
comm.py (the communicator: messages from the driver, rank 0, to the workers as tensors), step.py
(a step's metadata to and from those tensors), driver.py (rank 0: starts the workers, sends
them adapter changes and steps) and worker.py (ranks 1..N-1: replay them). Every rank runs the
same model code, adapter batch and model runner as a single device.
"""
