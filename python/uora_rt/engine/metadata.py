"""The one device-side record of a step, built once per step, in one place.

Tokens are packed [decode rows | prefill chunks]. Per token: id, position, KV slot and, per
projection family, its adapter slot (-1 = none). Per decode row: block table and length. Per
prefill chunk: where it sits, and (when it has context) the slots of its context and its offset
causal mask. Per sampled sequence: which packed token gives its logits and its sampling
parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from uora_rt.engine.processors import StepExtras, build_extras
from uora_rt.engine.sampler import SamplingTensors, window_need
from uora_rt.kernels.triton_prefill import tiles_for


@dataclass
class PrefillSegment:
    start: int                          # first packed token
    count: int
    context: int                        # positions of the sequence before this chunk
    context_slots: torch.Tensor | None  # [context + count] KV slots (SDPA path, context > 0)
    # [count, context + count] bool: query j sees keys <= ctx + j
    mask: torch.Tensor | None


@dataclass
class StepMetadata:
    input_ids: torch.Tensor             # [T] int64
    positions: torch.Tensor             # [T] int64
    slot_mapping: torch.Tensor          # [T] int64: where each token's key/value is written
    num_decode: int
    decode_block_tables: torch.Tensor   # [num_decode, W] int32
    decode_seq_lens: torch.Tensor       # [num_decode] int32 (including this step's token)
    decode_query_start: torch.Tensor    # [num_decode + 1] int32 (0, 1, 2, ...)
    prefills: list[PrefillSegment]
    prefill_block_tables: torch.Tensor  # [P, W] int32 of the prefill chunks' sequences
    prefill_seq_lens: torch.Tensor      # [P] int32: context + chunk
    prefill_query_start: torch.Tensor   # [P + 1] int32, relative to the first prefill token
    prefill_tiles: torch.Tensor         # [NT, 2] int32 (triton_prefill.tiles_for)
    logits_rows: torch.Tensor           # [R] int64: packed tokens whose logits are sampled
    sampled: list                       # [R] the ScheduledSeq each logits row belongs to
    sampling: SamplingTensors | None
    any_sampled: bool                   # some row has temperature > 0
    any_top_p: bool                     # some row has top_p < 1
    adapter_slots: dict                 # family id -> [T] int32 slots (-1 = not this family)
    adapter_with_q: dict                # family id -> any adapter of it with reinit events
    extras: StepExtras | None = None    # logit processing / logprobs (None: nobody asks)
    # Async scheduling: decode rows whose input is a token still in flight (drawn by the
    # previous step, not yet on the host): input_ids holds 0 there until the runner copies the
    # token in on the device. feed_rows[i] is the packed row, feed_reqs[i] its Request.
    feed_rows: list = field(default_factory=list)
    feed_reqs: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def _slots(blocks: list[int], block_size: int, end: int) -> np.ndarray:
    """KV slots of positions 0..end-1 of a sequence: [end] int64."""
    b = np.asarray(blocks, dtype=np.int64)
    return (b[:, None] * block_size + np.arange(block_size)).reshape(-1)[:end]


def context_mask(context: int, count: int, device) -> torch.Tensor:
    """[count, context + count] bool: query j of a chunk after `context` positions sees keys
    <= context + j."""
    q_pos = torch.arange(context, context + count)
    return to_device(torch.arange(context + count)[None, :] <= q_pos[:, None], device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on the step's device. On CUDA through pinned memory, without waiting: a
    plain copy from pageable memory waits for the stream, i.e. for the step still running
    there, which would put the host back on the device's critical path."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _table(blocks: list[list[int]]) -> np.ndarray:
    """Block tables, padded with block 0: [len(blocks), widest] int32 (width 1 when empty)."""
    if len(blocks) <= 8:  # a few rows (prefill chunks): padded lists are cheapest
        width = max(map(len, blocks), default=0) or 1
        return np.array([b + [0] * (width - len(b)) for b in blocks],
                        dtype=np.int32).reshape(len(blocks), width)
    lens = np.fromiter(map(len, blocks), dtype=np.int64, count=len(blocks))
    table = np.zeros((len(blocks), max(int(lens.max()), 1)), dtype=np.int32)
    # row-major: the mask's True cells are each row's first len(row) cells, in order
    table[np.arange(table.shape[1]) < lens[:, None]] = list(chain.from_iterable(blocks))
    return table


# read-only step columns that only depend on their size, made once per (size, device):
# (rows, device) -> arange(rows + 1) int32, ("no prefill", device) -> _no_prefill
_FIXED: dict = {}


def _no_prefill(device) -> tuple:
    """The prefill columns of a step without prefill chunks (read-only, made once)."""
    key = ("no prefill", str(device))
    t = _FIXED.get(key)
    if t is None:
        t = _FIXED[key] = tuple(
            torch.tensor(x, dtype=torch.int32, device=device).reshape(shape)
            for x, shape in (([], (0, 1)), ([], (0,)), ([0], (1,)), ([], (0, 2))))
    return t


def _query_start(rows: int, device) -> torch.Tensor:
    key = (rows, str(device))
    t = _FIXED.get(key)
    if t is None:
        t = _FIXED[key] = torch.arange(rows + 1, dtype=torch.int32, device=device)
    return t


class _Pack:
    """Host columns of one dtype, sent to the device together: on CUDA laid end to end as one
    tensor (one copy instead of one per column) and handed back as views of it; on the CPU
    each column is wrapped as it is (torch.from_numpy: no copy, and cheaper than slicing)."""

    def __init__(self, dtype):
        self.dtype, self.arrays, self.shapes = dtype, [], []

    def add(self, values, shape=None) -> None:
        self.arrays.append(np.asarray(values, dtype=self.dtype).reshape(-1))
        self.shapes.append(shape)

    def send(self, device) -> list[torch.Tensor]:
        if torch.device(device).type != "cuda":
            return [torch.from_numpy(a if shape is None else a.reshape(shape))
                    for a, shape in zip(self.arrays, self.shapes)]
        flat = to_device(torch.from_numpy(np.concatenate(self.arrays)), device)
        out, at = [], 0
        for a, shape in zip(self.arrays, self.shapes):
            v = flat[at:at + a.size]
            at += a.size
            out.append(v if shape is None else v.view(shape))
        return out


class SampledRows:
    """What a step needs of its sampled requests that does not change while they run: their
    sampling columns (host arrays), prompt lengths and flags."""

    def __init__(self, reqs: list):
        self.reqs = reqs
        temp, top_k, top_p, seed = zip(*(r.sampling for r in reqs))
        self.floats = np.array([temp, top_p], dtype=np.float32)  # [2, B]
        self.ints = np.array([top_k, seed], dtype=np.int64)      # [2, B]
        self.prompt_len = np.fromiter((r.prompt_len for r in reqs), dtype=np.int64,
                                      count=len(reqs))
        self.need = window_need(temp, top_k, top_p)
        self.any_sampled = max(temp) > 0
        self.any_top_p = any(x > 0 and p < 1 for x, p in zip(temp, top_p))
        self.plain = all(r.plain for r in reqs)


class RowCache:
    """The last step's SampledRows, reused while the same requests are sampled in the same
    order (a run of decode steps: the usual case), so their columns are built once, not per
    step. The arrays are only read (a step's tensors share them on the CPU)."""

    def __init__(self):
        self.last: SampledRows | None = None
        self._tables = (None, None, None)  # decode requests, their block counts, their table

    def table(self, reqs: list) -> np.ndarray:
        """_table of these requests' blocks; while the same requests decode in the same order,
        only the rows whose block count changed (a block every block_size steps) are written.
        A copy each step: a step still running may read the one before."""
        blocks = [r.blocks for r in reqs]
        lens = np.fromiter(map(len, blocks), dtype=np.int64, count=len(blocks))
        last, last_lens, table = self._tables
        if last is None or last != reqs or lens.max(initial=0) > table.shape[1] \
                or (lens < last_lens).any():
            table = _table(blocks)
        else:
            for i in np.flatnonzero(lens != last_lens).tolist():
                table[i, :lens[i]] = blocks[i]
        self._tables = (reqs, lens, table)
        return table.copy()

    def rows(self, reqs: list) -> SampledRows:
        last = self.last
        if last is None or last.reqs != reqs:  # identity compares: no Request defines __eq__
            last = self.last = SampledRows(reqs)
        return last


def build_step(scheduled, block_size: int, device, use_adapters: bool,
               gather_prefill: bool = True, cache: RowCache | None = None) -> StepMetadata:
    """gather_prefill: also build each prefill chunk's context slots and mask (the SDPA path
    needs them; paged kernels read the page table instead). cache: the engine's RowCache.

    Per-row work is column building (comprehensions over the rows, then numpy), and all the
    step's integer columns go to the device as two tensors (int64, int32)."""
    decodes = [s for s in scheduled if s.count == 1]
    prefills = [s for s in scheduled if s.count > 1]
    ordered = decodes + prefills
    nd = len(decodes)
    # decode rows: one token each, at its position p
    dreqs = [s.req for s in decodes]
    dpos = [s.start for s in decodes]
    pos_d = np.array(dpos, dtype=np.int64)
    known = np.fromiter((len(r.tokens) for r in dreqs), dtype=np.int64, count=nd)
    feed = pos_d >= known  # the pending token: the runner fills it in on the device
    feed_rows = np.flatnonzero(feed).tolist()
    feed_reqs = [dreqs[i] for i in feed_rows]
    if len(feed_rows) == nd:
        ids_d = np.zeros(nd, dtype=np.int64)
    else:
        ids_d = np.array([0 if f else r.tokens[p] for r, p, f in zip(dreqs, dpos, feed.tolist())],
                         dtype=np.int64)
    blk = np.fromiter((r.blocks[p // block_size] for r, p in zip(dreqs, dpos)), dtype=np.int64,
                      count=nd)
    slots_d = blk * block_size + pos_d % block_size
    ids, pos, slots = [ids_d], [pos_d], [slots_d]
    segments, q_start, t = [], [0], nd
    for s in prefills:
        r, p0, n = s.req, s.start, s.count
        if p0 + n > len(r.tokens):
            raise RuntimeError("build_step: a prefill chunk reaches a token still in flight")
        seg_slots = _slots(r.blocks, block_size, p0 + n)
        slots.append(seg_slots[p0:])
        context = mask = None
        if p0 and gather_prefill:
            context = to_device(torch.from_numpy(seg_slots), device)
            mask = context_mask(p0, n, device)
        segments.append(PrefillSegment(t, n, p0, context, mask))
        ids.append(np.asarray(r.tokens[p0:p0 + n], dtype=np.int64))
        pos.append(np.arange(p0, p0 + n, dtype=np.int64))
        q_start.append(q_start[-1] + n)
        t += n
    starts = list(range(nd)) + [nd + q for q in q_start[:-1]]
    sampled = [(st, s) for st, s in zip(starts, ordered) if s.sample]
    rows = [st + s.count - 1 for st, s in sampled]
    sreqs = [s.req for _, s in sampled]
    sampling, any_sampled, any_top_p, plain = None, False, False, True
    if sampled:
        rows_of = cache.rows(sreqs) if cache is not None else SampledRows(sreqs)
        position = np.fromiter((s.start + s.count for _, s in sampled), dtype=np.int64,
                               count=len(sampled)) - rows_of.prompt_len
        sampling = SamplingTensors.from_arrays(rows_of.floats, rows_of.ints, position, device,
                                               rows_of.need)
        any_sampled, any_top_p, plain = rows_of.any_sampled, rows_of.any_top_p, rows_of.plain
    # logit processing, logprobs, prompt logprobs: only rows of requests that ask for them
    if plain and all(s.req.plain for s in ordered if not s.sample):
        extras, prompt_rows = None, []
    else:
        prompt_runs, prompt_rows = _prompt_logprob_rows(ordered, starts)
        extras = build_extras(sreqs, prompt_runs, device)
    slots_by_fam, with_q = _adapter_slots(ordered, starts, t, device) if use_adapters else ({}, {})

    longs, ints = _Pack(np.int64), _Pack(np.int32)
    for col in (ids, pos, slots):
        longs.add(np.concatenate(col) if len(col) > 1 else col[0])
    longs.add(rows + prompt_rows)
    dtab = cache.table(dreqs) if cache is not None else _table([r.blocks for r in dreqs])
    ints.add(pos_d + 1)  # decode seq lens
    ints.add(dtab, dtab.shape)
    if prefills:
        ptab = _table([s.req.blocks for s in prefills])
        ints.add(ptab, ptab.shape)
        ints.add([s.start + s.count for s in prefills])
        ints.add(q_start)
        tiles = tiles_for(q_start)
        ints.add(tiles, (len(tiles), 2))
    input_ids, positions, slot_mapping, logits_rows = longs.send(device)
    lens_d, dtab_t, *rest = ints.send(device)
    ptab_t, lens_p, q_start_t, tiles_t = rest if prefills else _no_prefill(device)
    return StepMetadata(
        input_ids=input_ids, positions=positions, slot_mapping=slot_mapping, num_decode=nd,
        decode_block_tables=dtab_t, decode_seq_lens=lens_d,
        decode_query_start=_query_start(nd, device),
        prefills=segments, prefill_block_tables=ptab_t, prefill_seq_lens=lens_p,
        prefill_query_start=q_start_t, prefill_tiles=tiles_t,
        logits_rows=logits_rows, sampled=[s for _, s in sampled], sampling=sampling,
        any_sampled=any_sampled, any_top_p=any_top_p,
        adapter_slots=slots_by_fam, adapter_with_q=with_q, extras=extras,
        feed_rows=feed_rows, feed_reqs=feed_reqs)


def _prompt_logprob_rows(ordered, starts):
    """For requests that want prompt logprobs: (request, prompt tokens predicted) per chunk, and
    the packed tokens whose logits predict them (they follow the sampled rows in logits_rows)."""
    runs, rows = [], []
    for st, s in zip(starts, ordered):
        r = s.req
        if r.prompt_logprobs is None:
            continue
        lo = max(r.prompt_logprobs_done, s.start + 1)      # position j is predicted at j - 1
        hi = min(s.start + s.count, r.prompt_len - 1)
        if lo <= hi:
            runs.append((r, r.tokens[lo:hi + 1]))
            rows.extend(range(st + lo - 1 - s.start, st + hi - s.start))
    return runs, rows


def _adapter_slots(ordered, starts, total, device):
    """Each token's adapter slot, per projection family id (every lease here is pinned)."""
    per_fam, with_q = {}, {}
    for st, s in zip(starts, ordered):
        lease = s.req.lease
        if lease is None:
            continue
        fid = lease.family.fid
        arr = per_fam.get(fid)
        if arr is None:
            arr = per_fam[fid] = np.full(total, -1, dtype=np.int32)
        arr[st:st + s.count] = lease.slot
        with_q[fid] = with_q.get(fid, False) or lease.has_q
    return {f: to_device(torch.from_numpy(a), device) for f, a in per_fam.items()}, with_q
