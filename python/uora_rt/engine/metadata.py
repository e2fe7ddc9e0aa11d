"""The one device-side record of a step, built once per step, in one place.

Tokens are packed [decode rows | prefill chunks]. Per token: id, position, KV slot and, per
projection family, its adapter slot (-1 = none). Per decode row: block table and length. Per
prefill chunk: where it sits, and (when it has context) the slots of its context and its offset
causal mask. Per sampled sequence: which packed token gives its logits and its sampling
parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uora_rt.engine.sampler import SamplingTensors


@dataclass
class PrefillSegment:
    start: int                          # first packed token
    count: int
    context_slots: torch.Tensor | None  # [context + count] KV slots; None = no context
    mask: torch.Tensor | None           # [count, context + count] bool: query j sees keys <= ctx + j


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
    logits_rows: torch.Tensor           # [R] int64: packed tokens whose logits are sampled
    sampled: list                       # [R] the ScheduledSeq each logits row belongs to
    sampling: SamplingTensors | None
    any_sampled: bool                   # some row has temperature > 0
    any_top_p: bool                     # some row has top_p < 1
    hook: object                        # the adapter hook (pool.AdapterBatch) or None
    adapter_slots: dict                 # family -> [T] int32 slots (what the hook was built from)
    adapter_with_q: dict                # family -> any adapter of it with reinit events

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def _slots(blocks: list[int], block_size: int, end: int) -> torch.Tensor:
    """KV slots of positions 0..end-1 of a sequence."""
    b = torch.tensor(blocks, dtype=torch.long)
    return (b[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:end]


def build_step(scheduled, pool, block_size: int, device, use_adapters: bool) -> StepMetadata:
    decodes = [s for s in scheduled if s.count == 1]
    prefills = [s for s in scheduled if s.count > 1]
    ids, pos, slots = [], [], []
    lens, tables = [], []
    for s in decodes:
        r, p = s.req, s.start
        ids.append(r.tokens[p])
        pos.append(p)
        slots.append(r.blocks[p // block_size] * block_size + p % block_size)
        lens.append(p + 1)
        tables.append(r.blocks)
    width = max((len(t) for t in tables), default=1)
    table = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = t
    segments, extra_slots = [], []
    for s in prefills:
        r, p0, n = s.req, s.start, s.count
        seg_slots = _slots(r.blocks, block_size, p0 + n)
        start = len(ids) + sum(len(x) for x in extra_slots)
        extra_slots.append(seg_slots[p0:])
        if p0 == 0:
            segments.append(PrefillSegment(start, n, None, None))
        else:
            q_pos = torch.arange(p0, p0 + n)
            mask = torch.arange(p0 + n)[None, :] <= q_pos[:, None]
            segments.append(PrefillSegment(start, n, seg_slots.to(device), mask.to(device)))
    for s in prefills:
        ids.extend(s.req.tokens[s.start:s.start + s.count])
        pos.extend(range(s.start, s.start + s.count))
    slot_t = torch.cat([torch.tensor(slots, dtype=torch.long)] + extra_slots)
    ordered = decodes + prefills
    starts, t = [], 0
    for s in ordered:
        starts.append(t)
        t += s.count
    sampled = [(st, s) for st, s in zip(starts, ordered) if s.sample]
    rows = [st + s.count - 1 for st, s in sampled]
    params = [s.req.params for _, s in sampled]
    sampling = None
    if sampled:
        sampling = SamplingTensors.from_lists(
            [p.temperature for p in params], [p.top_k for p in params],
            [p.top_p for p in params], [s.req.seed for _, s in sampled],
            [s.req.num_tokens - s.req.prompt_len for _, s in sampled], device)
    slots_by_fam, with_q = _adapter_slots(ordered, starts, t, device) if use_adapters else ({}, {})
    return StepMetadata(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(pos, dtype=torch.long, device=device),
        slot_mapping=slot_t.to(device),
        num_decode=len(decodes),
        decode_block_tables=torch.from_numpy(table).to(device),
        decode_seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        decode_query_start=torch.arange(len(decodes) + 1, dtype=torch.int32, device=device),
        prefills=segments,
        logits_rows=torch.tensor(rows, dtype=torch.long, device=device),
        sampled=[s for _, s in sampled],
        sampling=sampling,
        any_sampled=any(p.temperature > 0 for p in params),
        any_top_p=any(p.temperature > 0 and p.top_p < 1 for p in params),
        hook=pool.hook(slots_by_fam, with_q) if slots_by_fam else None,
        adapter_slots=slots_by_fam, adapter_with_q=with_q)


def _adapter_slots(ordered, starts, total, device):
    """Each token's adapter slot, per projection family (every lease here is pinned)."""
    per_fam, with_q = {}, {}
    for st, s in zip(starts, ordered):
        lease = s.req.lease
        if lease is None:
            continue
        fam = lease.family
        arr = per_fam.get(fam)
        if arr is None:
            arr = per_fam[fam] = np.full(total, -1, dtype=np.int32)
        arr[st:st + s.count] = lease.slot
        with_q[fam] = with_q.get(fam, False) or lease.has_q
    return {f: torch.from_numpy(a).to(device) for f, a in per_fam.items()}, with_q
