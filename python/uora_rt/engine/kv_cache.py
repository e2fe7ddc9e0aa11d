"""The paged KV cache: one pool of fixed-size blocks allocated at start, and its allocator.

k, v: [layers, num_blocks, block_size, kv_heads, head_dim]. A sequence holds the blocks its
tokens need, listed in its block table; position p lives in block table[p // block_size] at
offset p % block_size (slot = block * block_size + offset). Block 0 is reserved and zeroed: the
padding tokens of a fixed-shape step write there, and padded block-table entries point there.
"""

from __future__ import annotations

import os

import torch


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got "
                             f"{num_blocks}")
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever get (all but the reserved one)."""
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"allocate({n}) with {len(self.free)} free blocks")
        out = self.free[len(self.free) - n:][::-1]
        del self.free[len(self.free) - n:]
        return out

    def release(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))


def bytes_per_token(spec, dtype) -> int:
    return 2 * spec.layers * spec.kv_heads * spec.head_dim * torch.empty((), dtype=dtype).element_size()


def default_kv_tokens(spec, dtype, device: torch.device, weights_bytes: int) -> int:
    """What the device's free memory allows: on a GPU, 90% of what is free after the weights
    minus headroom for activations; on the CPU a quarter of the available memory (capped at
    16 GiB: the pages are only touched as sequences use them)."""
    per = bytes_per_token(spec, dtype)
    if device.type == "cuda":
        # Blocks torch's caching allocator holds unused go back first, so that what the driver
        # reports free is what a single large allocation can get.
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.9 * free - 2 * 2**30
    else:
        budget = min(_available_ram() / 4, 16 * 2**30)
    return max(int(budget // per), 0)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class KVPool:
    def __init__(self, spec, num_blocks: int, block_size: int, dtype, device):
        shape = (spec.layers, num_blocks, block_size, spec.kv_heads, spec.head_dim)
        # empty, not zeros: a sequence only ever reads positions it wrote; only block 0 (the
        # padding target, and where masked reads of the torch path land) must be zero.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, 0].zero_()
        self.v[:, 0].zero_()
        self.block_size, self.num_blocks = block_size, num_blocks

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
