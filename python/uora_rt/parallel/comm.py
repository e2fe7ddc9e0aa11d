"""Messages from the driver (rank 0) to the workers, as tensors only (no pickle).

A message is an opcode, a few integers and a list of tensors. It travels as two broadcasts from
rank 0: a fixed-size int64 header (opcode, the integers, each tensor's dtype and shape, the
payload's length), then one uint8 payload holding every tensor's bytes back to back. The header
goes over a group with a very long timeout, because an idle server's workers wait in it for the
next step; everything after it (the payload, the forward's all-reduces) uses the default group,
whose timeout bounds how long a dead or stuck peer can block a step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Opcodes.
STOP, ADD, DROP, UPLOAD, KV_OPEN, KV_CLOSE, STEP, FORWARD = range(1, 9)

HEADER_WORDS = 256
_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float32, torch.bfloat16,
           torch.float16]
_MAX_DIMS = 3


def _pack_header(op: int, ints: list[int], tensors: list[torch.Tensor], nbytes: int):
    words = [op, len(ints), len(tensors), nbytes, *ints]
    for t in tensors:
        if t.dim() > _MAX_DIMS:
            raise ValueError(f"comm: tensors of at most {_MAX_DIMS} dims, got {list(t.shape)}")
        dims = list(t.shape) + [1] * (_MAX_DIMS - t.dim())
        words += [_DTYPES.index(t.dtype), t.dim(), *dims]
    if len(words) > HEADER_WORDS:
        raise ValueError(f"comm: a message of {len(ints)} integers and {len(tensors)} tensors "
                         f"does not fit the {HEADER_WORDS}-word header")
    return torch.tensor(words + [0] * (HEADER_WORDS - len(words)), dtype=torch.int64)


def _padded(nbytes: int) -> int:
    """Each tensor starts at a multiple of 8 bytes: view(dtype) needs aligned offsets."""
    return -(-nbytes // 8) * 8


def _bytes(t: torch.Tensor) -> torch.Tensor:
    b = t.contiguous().reshape(-1).view(torch.uint8)
    pad = _padded(b.numel()) - b.numel()
    return torch.cat([b, b.new_zeros(pad)]) if pad else b


class Channel:
    """control: the long-timeout group for headers; device: where the tensors travel (nccl
    needs CUDA tensors, gloo CPU ones)."""

    def __init__(self, control, device):
        self.control, self.device = control, torch.device(device)

    def send(self, op: int, ints=(), tensors=()) -> None:
        """Rank 0 only."""
        tensors = [t.to(self.device) for t in tensors]
        chunks = [_bytes(t) for t in tensors]
        nbytes = sum(c.numel() for c in chunks)
        header = _pack_header(op, [int(i) for i in ints], tensors, nbytes).to(self.device)
        dist.broadcast(header, 0, group=self.control)
        if nbytes:
            dist.broadcast(torch.cat(chunks), 0)

    def recv(self) -> tuple[int, list[int], list[torch.Tensor]]:
        """Workers: blocks until rank 0 sends; returns (op, ints, tensors on self.device)."""
        header = torch.empty(HEADER_WORDS, dtype=torch.int64, device=self.device)
        dist.broadcast(header, 0, group=self.control)
        words = header.tolist()
        op, n_ints, n_tensors, nbytes = words[:4]
        ints = words[4:4 + n_ints]
        payload = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if nbytes:
            dist.broadcast(payload, 0)
        tensors, pos, at = [], 4 + n_ints, 0
        for _ in range(n_tensors):
            code, ndim, *dims = words[pos:pos + 2 + _MAX_DIMS]
            pos += 2 + _MAX_DIMS
            dtype, shape = _DTYPES[code], dims[:ndim]
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            tensors.append(payload[at:at + size].view(dtype).reshape(shape))
            at += _padded(size)
        return op, ints, tensors


def text(t: torch.Tensor) -> str:
    return t.cpu().numpy().tobytes().decode("utf-8")


def text_tensor(s: str) -> torch.Tensor:
    return torch.tensor(list(s.encode("utf-8")), dtype=torch.uint8)
