"""The paged KV cache: one pool of fixed-size blocks allocated at start, and its allocator.

k, v: [layers, num_blocks, block_size, kv_heads, head_dim]. A sequence holds the blocks its
tokens need, listed in its block table; position p lives in block table[p // block_size] at
offset p % block_size (slot = block * block_size + offset). Block 0 is reserved and zeroed: the
padding tokens of a fixed-shape step write there, and padded block-table entries point there.

Prefix caching: a full block whose keys/values are computed gets a key that chains the key of
the block before it, its token ids and, at the root, the identity of what computed it (the base
model's weights version and the adapter's tensor digest, adapters.family.kv_identity). A later
sequence whose first blocks have the same keys reads those blocks instead of computing them.
The last, partial block of a sequence never has a key, so it is never shared.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict

import torch


class BlockAllocator:
    """Hands out KV blocks by reference count and, with prefix caching, keeps full computed
    blocks findable by key (block_keys) after their requests end, until their memory is needed.

    Every block but the reserved 0 is either held (ref > 0: listed in that many block tables;
    a keyed one may be shared) or free (ref == 0, in `free`). A free block that carries a key is
    a cached block: lookup() still finds it, and allocate() reuses free blocks in order, those
    without a key first, then the least recently released (its key is forgotten then). num_free
    counts every free block, cached or not: all of them can be handed out.
    """

    def __init__(self, num_blocks: int, caching: bool = False):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got "
                             f"{num_blocks}")
        self.num_blocks, self.caching = num_blocks, caching
        self.ref = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.by_key: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.evicted = 0  # cached blocks whose memory was reused

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever get (all but the reserved one)."""
        return self.num_blocks - 1

    @property
    def num_cached(self) -> int:
        """Blocks that carry a key (held or free)."""
        return len(self.by_key)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"allocate({n}) with {len(self.free)} free blocks")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            key = self.key_of[b]
            if key is not None:  # a cached block's memory is reused: its key goes
                del self.by_key[key]
                self.key_of[b] = None
                self.evicted += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drops one reference to each block. The tail goes first: a sequence's later blocks
        are reused before its earlier ones, which more prompts share (and a key is reachable
        only through every key before it)."""
        for b in reversed(blocks):
            if not 0 < b < self.num_blocks or self.ref[b] <= 0:
                raise RuntimeError(f"release of block {b}, which is not held")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if self.key_of[b] is None:  # holds nothing findable: reused first
                    self.free.move_to_end(b, last=False)

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks of the longest run of keys, from the first, that are cached."""
        out = []
        for key in keys:
            b = self.by_key.get(key)
            if b is None:
                break
            out.append(b)
        return out

    def evictable(self, blocks: list[int]) -> int:
        """How many of these (cached) blocks are free: taking them uses free capacity."""
        return sum(self.ref[b] == 0 for b in blocks)

    def touch(self, blocks: list[int]) -> None:
        """Takes a reference to cached blocks found by lookup()."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def register(self, block: int, key: bytes) -> bool:
        """Makes a held, full, computed block findable under its key. False (nothing changes)
        when caching is off, the block already has a key, or another block holds this one
        (two sequences computed the same block: the first stays, this one is reused first)."""
        if not self.caching or self.key_of[block] is not None or key in self.by_key:
            return False
        if self.ref[block] <= 0:
            raise RuntimeError(f"register of block {block}, which is not held")
        self.by_key[key] = block
        self.key_of[block] = key
        return True

    def check(self, held: dict[int, int] | None = None) -> None:
        """Asserts the invariants (tests): every block free xor held, keys one-to-one, and,
        given {block: references} of every block table, the counts match."""
        for b in range(1, self.num_blocks):
            assert (self.ref[b] == 0) == (b in self.free), (b, self.ref[b])
            assert self.ref[b] >= 0
            if held is not None:
                assert self.ref[b] == held.get(b, 0), (b, self.ref[b], held.get(b, 0))
        assert 0 not in self.free and self.ref[0] == 0
        assert len(self.free) <= self.capacity
        assert all(self.key_of[b] == k for k, b in self.by_key.items())
        assert sum(k is not None for k in self.key_of) == len(self.by_key)


def block_keys(keys: list[bytes], root: bytes, tokens: list[int], block_size: int) -> list[bytes]:
    """Extends `keys` (a sequence's first full blocks') to every full block of `tokens`:
    key[i] = SHA-256(key[i-1] (root for i = 0) || the block's token ids as int64). A key so
    names the block's tokens, every token before them, and the root: what computed them."""
    prev = keys[-1] if keys else root
    for i in range(len(keys), len(tokens) // block_size):
        block = array("q", tokens[i * block_size:(i + 1) * block_size])
        prev = hashlib.sha256(prev + block.tobytes()).digest()
        keys.append(prev)
    return keys


def bytes_per_token(spec, dtype) -> int:
    return (2 * spec.layers * spec.kv_heads * spec.head_dim
            * torch.empty((), dtype=dtype).element_size())


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
