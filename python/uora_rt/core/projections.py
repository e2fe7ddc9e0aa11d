"""Deterministic UORA projection families (docs/design.md §2), built by the C++ core and cached per
family.

A family is (algorithm, seed, r, max_in, max_out). Its four float32 factors are
  A0, QA: [r, max_in]  orthonormal rows    (depend only on seed, r, max_in)
  B0, QB: [max_out, r] orthonormal columns (depend only on seed, r, max_out)
bit-identical on every machine. The cache hands out the same (read-only by convention) tensors to
every caller; code that mutates projections (training) clones them first.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import torch

from uora_rt._native import ops

ALGORITHM = "uora-philox-qr-v1"
STREAM_A0, STREAM_B0, STREAM_QA, STREAM_QB = 0, 1, 2, 3
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ProjectionSpec:
    algorithm: str
    seed: int
    r: int
    max_in: int
    max_out: int

    def to_dict(self) -> dict:
        return asdict(self)


def check_family(seed: int, r: int, max_in: int, max_out: int) -> None:
    """Raises ValueError for a family that cannot exist."""
    for name, value in (("seed", seed), ("r", r), ("max_in", max_in), ("max_out", max_out)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"projections: {name} must be an int, got {type(value).__name__}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"projections: seed must be in [0, 2**63 - 1], got {seed}")
    if r < 1:
        raise ValueError(f"projections: r must be >= 1, got {r}")
    if max_in < 1 or max_out < 1:
        raise ValueError(f"projections: max_in and max_out must be >= 1, got {max_in}, {max_out}")
    if r > min(max_in, max_out):
        raise ValueError(
            f"projections: r = {r} > min(max_in, max_out) = min({max_in}, {max_out}); "
            f"an r x {max_in} "
            f"matrix with orthonormal rows and a {max_out} x r one with orthonormal columns need "
            f"r <= both")


_lock = threading.Lock()
_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _side(seed: int, r: int, n: int, a_side: bool) -> tuple[torch.Tensor, torch.Tensor]:
    key = (seed, r, n, a_side)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    first, target = (STREAM_A0, STREAM_QA) if a_side else (STREAM_B0, STREAM_QB)
    built = (ops.projection_factor(seed, first, n, r, a_side),
             ops.projection_factor(seed, target, n, r, a_side))
    with _lock:  # two threads may race to build; both results are bit-identical, keep the first
        return _cache.setdefault(key, built)


def projections(seed: int, r: int, max_in: int, max_out: int):
    """The projection family `(A0, B0, QA, QB)` as float32 CPU tensors (cached; do not mutate).

    Semantics:
        A0, QA: [r, max_in],  A0 @ A0.T == I_r (to float32 rounding)
        B0, QB: [max_out, r], B0.T @ B0 == I_r
    """
    check_family(seed, r, max_in, max_out)
    a0, qa = _side(seed, r, max_in, True)
    b0, qb = _side(seed, r, max_out, False)
    return a0, b0, qa, qb


def clear_cache() -> None:
    with _lock:
        _cache.clear()
        _vera_cache.clear()


# ------------------------------------------------------------------------------------------------
# PEFT VeRA's own draw (algorithm "peft-vera-kaiming-mt19937"): Kaiming-uniform values from one
# CPU MT19937 stream, A then B. The serving runtime calls vera_projections for that algorithm.
# ------------------------------------------------------------------------------------------------

VERA_ALGORITHM = "peft-vera-kaiming-mt19937"
_vera_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def vera_projections(seed: int, r: int, max_in: int, max_out: int):
    """PEFT VeRA's `(vera_A, vera_B)` for projection_prng_key `seed`, float32 CPU, bit for bit as
    PEFT draws them (cached; do not mutate).

    Semantics: see ops.vera_kaiming_factors. A: [r, max_in], B: [max_out, r]. B depends on max_in
    too (it comes after A in the same stream). Like torch.Generator.manual_seed, any seed in
    [-2**63, 2**64) is accepted and only its low 32 bits matter.
    """
    for name, value in (("seed", seed), ("r", r), ("max_in", max_in), ("max_out", max_out)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"vera_projections: {name} must be an int, got {type(value).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"vera_projections: seed must be in [-2**63, 2**64), got {seed}")
    if r < 1 or max_in < 1 or max_out < 1:
        raise ValueError(f"vera_projections: r, max_in, max_out must be >= 1, got {r}, {max_in}, "
                         f"{max_out}")
    key = (seed & 0xFFFFFFFF, r, max_in, max_out)  # equal low words give equal draws: one entry
    with _lock:
        hit = _vera_cache.get(key)
    if hit is not None:
        return hit
    built = tuple(ops.vera_kaiming_factors(key[0], r, max_in, max_out))
    with _lock:
        return _vera_cache.setdefault(key, built)
