"""Token sampling on the device: greedy, temperature, top-k, top-p; one seeded uniform per draw.

Semantics (per row b of the step; reference.sample_row says the same row by row in float64):
    x = logits[b]                               # [V] float32
    T, k, p = temperature[b], top_k[b], top_p[b]
    if T == 0:  token = argmax(x)               # lowest id on ties, as torch.argmax
    else:
        prob = softmax(x / T)
        if 0 < k < V or p < 1:
            order = ids by descending x, ties by ascending id    # = descending prob
            cand = order[:k] if 0 < k < V else order
            q = prob[cand] / prob[cand].sum()                   # renormalized over top-k
            if p < 1:                                           # smallest prefix reaching p,
                n = 1 + min(i : cumsum(q)[i] >= p)              # the crossing token kept
                cand, q = cand[:n], q[:n] / q[:n].sum()
        else:
            cand, q = arange(V), prob           # token-id order: no sort
        u = uniform(seed[b], position[b])       # [0, 1), 24 bits, below
        token = cand[min(i : cumsum(q)[i] > u)]
    uniform(seed, position): 32-bit words s_lo, s_hi, p_lo, p_hi of the two int64s;
        k1 = mix32(s_lo ^ 0x9E3779B9); k2 = mix32(s_hi ^ k1)
        h = mix32(mix32(mix32(p_lo ^ k2) ^ p_hi ^ k1) ^ k2);  u = (h >> 8) / 2**24
    mix32 = hash-prospector's 2-round xorshift-multiply [16 21f0aaad 15 735a2d97 15].

So a draw depends only on (seed, position) and on the row's own logits: a request gets the same
tokens alone or inside any batch. Float32 arithmetic (exp2, cumsum) differs from the float64
reference by ~1e-7, so a token can differ from the reference (or between paths, devices or
batch layouts, whose vector/scalar exp lanes or scan order may differ in the last bit) only when
u lies that close to a boundary of the CDF or a cumulative probability that close to p.

Paths (Sampler(path=...); all draw from the same candidates in the same order, up to the order
of -inf logits, which carry no probability):
- "cpu" (the default on the CPU; engine.sampler_cpu): rows grouped on the host, top-k windows
  found in two levels and grown while a top-p row needs more; host reads, no CUDA graphs.
- "device" (the default elsewhere; sampler_ops.sample_window): every row through the same
  sync-free ops, shapes fixed by (B, V, W), so the decode step is captured in a CUDA graph.
  Greedy rows take the argmax; temperature-only rows draw from one exp2 pass with 64-token
  block sums (which also gives top-p rows their normalizer); only a step with a top-k or top-p
  row fetches a window of W candidates per row (torch.topk, W from WINDOWS, chosen on the host
  from the step's parameters; Sampler.window), ordered by (value descending, id ascending) with
  one sort of W int64 keys. A row whose draw needs more than its window (top-k > W, a top-p
  prefix that ends past the window: a nearly flat distribution, or u landing among tokens that
  tie with the window's smallest value, some of which may lie outside it) comes back as -1
  (sampler_ops.REDO), unless every token past the window has probability exactly 0;
  Sampler.finish re-draws those rows with the full sort after the step's one device-to-host
  copy of the tokens, so a step where every row fits pays nothing for the fallback.
- "full_sort" (sampler_ops.sample_sorted): one full stable sort of every row; exact, sync-free;
  the device path's fallback and its baseline.

Same (seed, position), device path vs full sort: a row drawn from the window uses the same u,
candidates, order, normalizer and cut as the full sort, and a row the window cannot decide is
drawn by the full sort itself, so the tokens are equal except where float32 rounding differs
(the window's exp2/cumsum run over a [B, W] tensor, the sort's over [B, V]: other vector lanes,
on CUDA maybe another scan order): u within ~1e-7 of a CDF boundary or a cumulative within
~1e-7 of top_p, as above. Ties cut by the window's edge never change a token: a draw that lands
on them is re-drawn by the full sort.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from uora_rt.engine.sampler_cpu import Workspace, sample_cpu
from uora_rt.engine.sampler_ops import REDO, sample_sorted, sample_window, uniform

__all__ = ["PATHS", "REDO", "TOP_P_WINDOW", "WINDOWS", "Sampler", "SamplingTensors", "uniform"]

log = logging.getLogger("uora_rt.engine")

_INT64_MAX = 2**63 - 1
PATHS = ("cpu", "device", "full_sort")
# Candidates per row on the device path. Each size is its own CUDA graph, so the set is small:
# torch.topk's cost is mostly its passes over V, and a 4096 window keeps top-k up to 4095 off
# the fallback. A top-p row without top-k asks for TOP_P_WINDOW (real next-token distributions
# keep up to several hundred tokens at top-p 0.9, T 1).
WINDOWS = (1024, 4096)
TOP_P_WINDOW = 1024


def window_need(temperature, top_k, top_p) -> int:
    """The candidates the device path needs per row for these parameters (host lists): top-k
    k + 1 (one more, so that a tie at the k-th value rarely reaches the window's edge), a top-p
    row without top-k TOP_P_WINDOW, others 0."""
    need = 0
    for t, k, p in zip(temperature, top_k, top_p):
        if t > 0:
            need = max(need, k + 1 if k > 0 else TOP_P_WINDOW if p < 1 else 0)
    return need


@dataclass
class SamplingTensors:
    """One row per sequence of the step, all on the logits' device."""

    temperature: Tensor  # [B] float32, 0 = greedy
    top_k: Tensor        # [B] int32 or int64, 0 = off
    top_p: Tensor        # [B] float32, 1.0 = off
    seed: Tensor         # [B] int64
    position: Tensor     # [B] int64: index of the token drawn among the request's outputs
    # Host-side, not a tensor: window_need() of the rows (from_lists fills it), None = unknown.
    window_need: int | None = None

    @classmethod
    def from_lists(cls, temperature, top_k, top_p, seed, position, device) -> SamplingTensors:
        """Validated on the host, then one packed host-to-device copy ([5, B] int64; the float32
        fields travel as their bit patterns). The engine's rows, checked once by SamplingParams,
        go through from_arrays instead."""
        cols = {"temperature": list(temperature), "top_k": list(top_k), "top_p": list(top_p),
                "seed": list(seed), "position": list(position)}
        lengths = {name: len(v) for name, v in cols.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"SamplingTensors.from_lists: fields differ in length: {lengths}")
        cls._check_values(cols)
        floats = np.array([cols["temperature"], cols["top_p"]], dtype=np.float32).reshape(2, -1)
        ints = np.array([cols["top_k"], cols["seed"]], dtype=np.int64).reshape(2, -1)
        return cls.from_arrays(floats, ints, np.asarray(cols["position"], dtype=np.int64),
                               device, window_need(cols["temperature"], cols["top_k"],
                                                   cols["top_p"]))

    @classmethod
    def from_arrays(cls, floats: np.ndarray, ints: np.ndarray, position: np.ndarray, device,
                    need: int) -> SamplingTensors:
        """Checked host columns: floats [2, B] float32 (temperature, top_p), ints [2, B] int64
        (top_k, seed), position [B] int64; need: their window_need. One packed
        host-to-device copy on CUDA; on the CPU the arrays' memory as it is (no copy)."""
        device = torch.device(device)
        if device.type == "cpu":
            return cls(torch.from_numpy(floats[0]), torch.from_numpy(ints[0]),
                       torch.from_numpy(floats[1]), torch.from_numpy(ints[1]),
                       torch.from_numpy(position), need)
        host = np.empty((5, position.shape[0]), dtype=np.int64)  # [5, B]
        host[0], host[2] = floats.view(np.int32)  # the float32 fields as their bit patterns
        host[1], host[3], host[4] = ints[0], ints[1], position
        packed = torch.from_numpy(host)
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        else:
            packed = packed.to(device)
        return cls(_as_f32(packed[0]), packed[1], _as_f32(packed[2]), packed[3], packed[4], need)

    @staticmethod
    def _check_values(cols) -> None:
        _check(cols["temperature"], "temperature", ">= 0 and finite (0 = greedy)",
               lambda v: _is_real(v) and math.isfinite(v) and v >= 0)
        _check(cols["top_p"], "top_p", "in (0, 1] (1 = off)", lambda v: _is_real(v) and 0 < v <= 1)
        _check(cols["top_k"], "top_k", "an integer >= 0 (0 = off)",
               lambda v: _is_int(v) and 0 <= v <= _INT64_MAX)
        _check(cols["seed"], "seed", "an integer in [0, 2**63)",
               lambda v: _is_int(v) and 0 <= v <= _INT64_MAX)
        _check(cols["position"], "position", "an integer in [0, 2**63)",
               lambda v: _is_int(v) and 0 <= v <= _INT64_MAX)

    def rows(self, ids: Tensor) -> SamplingTensors:
        """The rows ids [R] (int64, on the tensors' device)."""
        return SamplingTensors(*(getattr(self, n).index_select(0, ids) for n in
                                 ("temperature", "top_k", "top_p", "seed", "position")))


def _as_f32(row: Tensor) -> Tensor:
    return row.to(torch.int32).view(torch.float32)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check(values, name, want, ok):
    for i, v in enumerate(values):
        if not ok(v):
            raise ValueError(f"SamplingTensors.from_lists: {name}[{i}] = {v!r}: expected {want}")


class Sampler:
    """logits [B, V] float32 -> token ids [B] int64 (Semantics and paths in the module
    docstring; other floating dtypes are read as float32).

    path: None picks by device ("cpu" on the CPU, "device" elsewhere); any of PATHS forces one
    (tests run all three on CPU tensors). __call__ returns the exact tokens on the logits'
    device; the engine splits it into draw (sync-free on "device" and "full_sort", so a CUDA
    graph can hold it) and finish (after the step, on the host). fallback_rows counts the rows
    finish re-drew with the full sort."""

    def __init__(self, device, path: str | None = None):
        self.device = torch.device(device)
        if path is None:
            path = "cpu" if self.device.type == "cpu" else "device"
        if path not in PATHS:
            raise ValueError(f"Sampler: path must be one of {PATHS}, got {path!r}")
        self.path = path
        self.fallback_rows = 0
        self._ws = Workspace()  # CPU path only; one call at a time per Sampler
        self._said: set = set()

    def __call__(self, logits: Tensor, st: SamplingTensors, any_sampled: bool = True,
                 any_top_p: bool = True) -> Tensor:
        drawn = self.draw(logits, st, any_sampled, any_top_p)
        if self.path != "device":
            return drawn
        return self.finish(logits, drawn, st).to(drawn.device)

    def window(self, st: SamplingTensors, any_sampled: bool = True) -> int:
        """The window the device path fetches for these rows: 0 when none samples with top-k or
        top-p (no window at all), else the smallest of WINDOWS that holds st.window_need (the
        largest when none does: the rows with a larger top-k are re-drawn by finish). Decided
        on the host from the parameters; CUDA graphs are captured per window."""
        if self.path != "device" or not any_sampled:
            return 0
        need = TOP_P_WINDOW if st.window_need is None else st.window_need
        if need == 0:
            return 0
        return next((w for w in WINDOWS if w >= need), WINDOWS[-1])

    def draw(self, logits: Tensor, st: SamplingTensors, any_sampled: bool = True,
             any_top_p: bool = True, window: int | None = None) -> Tensor:
        """Token ids [B] on the logits' device; on the "device" path rows the window could not
        decide hold REDO (-1) and need finish. window: None = self.window(st)."""
        logits = self._check(logits, st)
        if logits.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=logits.device)
        if not any_sampled:
            return logits.argmax(-1)
        if self.path == "cpu":
            return sample_cpu(logits, st, any_top_p, self._ws)
        if self.path == "full_sort":
            self._say("full_sort", "sampler: one full sort of every row (the full_sort path)")
            return sample_sorted(logits, st, any_top_p)
        w = self.window(st) if window is None else window
        self._say(("window", w), "sampler: device path, %s", f"top-k windows of {w} candidates "
                  "per row" if w else "no window (no top-k / top-p row)")
        return sample_window(logits, st, any_top_p, w)

    def finish(self, logits: Tensor, drawn: Tensor, st: SamplingTensors) -> Tensor:
        """Tokens [B] on the host, exact: drawn (from draw) copied once to the host (the copy a
        step makes anyway), and its REDO rows, if any, re-drawn from logits with the full sort
        (all parameters as in st; logits must still hold what draw saw)."""
        if self.path != "device":  # exact already (no REDO rows): only the copy to the host,
            return drawn.to("cpu")  # none on the CPU, where drawn is a fresh tensor per draw
        host = drawn.to("cpu", copy=True)  # a copy on the CPU too: drawn stays as draw made it
        redo = (host == REDO).nonzero()[:, 0]
        if redo.numel():
            ids = redo.to(logits.device)
            x = logits.index_select(0, ids).float()
            host[redo] = sample_sorted(x, st.rows(ids), True).cpu()
            self.fallback_rows += redo.numel()
            self._say("fallback", "sampler: %d of %d rows re-drawn by the full sort (a top-k / "
                      "top-p prefix past the window, or a draw on a tie at its edge); later ones "
                      "are counted in Sampler.fallback_rows", redo.numel(), host.numel())
        return host

    def _say(self, key, msg, *args) -> None:
        if key not in self._said:
            self._said.add(key)
            log.info(msg, *args)

    def _check(self, logits: Tensor, st: SamplingTensors) -> Tensor:
        """Shapes, dtypes and devices only: reading values would sync with the device."""
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] == 0:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"Sampler: logits must be a [B, V] tensor with V >= 1, got {shape}")
        if not logits.is_floating_point():
            raise ValueError(f"Sampler: logits must be floating point, got {logits.dtype}")
        if logits.device.type != self.device.type:
            raise ValueError(f"Sampler: logits on {logits.device}, sampler on {self.device}")
        want = {"temperature": (torch.float32,), "top_k": (torch.int32, torch.int64),
                "top_p": (torch.float32,), "seed": (torch.int64,), "position": (torch.int64,)}
        for name, dtypes in want.items():
            t = getattr(st, name)
            if not isinstance(t, Tensor) or tuple(t.shape) != (logits.shape[0],):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"Sampler: {name} must be [{logits.shape[0]}] (one per logits "
                                 f"row), got {shape}")
            if t.dtype not in dtypes or t.device != logits.device:
                raise ValueError(f"Sampler: {name} must be {' or '.join(map(str, dtypes))} on "
                                 f"{logits.device}, got {t.dtype} on {t.device}")
        return logits.float().contiguous()
