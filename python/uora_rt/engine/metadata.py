"""The one device-side record of a step, built once per step, in one place.

Tokens are packed [decode rows | prefill chunks]. Per token: id, position, KV slot and, per
projection family, its adapter slot (-1 = none). Per decode row: block table and length. Per
prefill chunk: where it sits, and (when it has context) the slots of its context and its offset
causal mask. Per sampled sequence: which packed token gives its logits and its sampling
parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from uora_rt.engine.processors import StepExtras, build_extras
from uora_rt.engine.sampler import SamplingTensors
from uora_rt.kernels.triton_prefill import tiles_for


@dataclass
class PrefillSegment:
    start: int                          # first packed token
    count: int
    context: int                        # positions of the sequence before this chunk
    context_slots: torch.Tensor | None  # [context + count] KV slots (SDPA path, context > 0)
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


def _slots(blocks: list[int], block_size: int, end: int) -> torch.Tensor:
    """KV slots of positions 0..end-1 of a sequence."""
    b = torch.tensor(blocks, dtype=torch.long)
    return (b[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:end]


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


def _table(seqs) -> np.ndarray:
    """Block tables of scheduled sequences, padded with block 0: [len(seqs), widest] int32."""
    width = max((len(s.req.blocks) for s in seqs), default=1)
    table = np.zeros((len(seqs), width), dtype=np.int32)
    for i, s in enumerate(seqs):
        table[i, : len(s.req.blocks)] = s.req.blocks
    return table


def build_step(scheduled, block_size: int, device, use_adapters: bool,
               gather_prefill: bool = True) -> StepMetadata:
    """gather_prefill: also build each prefill chunk's context slots and mask (the SDPA path
    needs them; paged kernels read the page table instead)."""
    decodes = [s for s in scheduled if s.count == 1]
    prefills = [s for s in scheduled if s.count > 1]
    ordered = decodes + prefills
    ids, pos, lens, slots = [], [], [], []
    feed_rows, feed_reqs = [], []
    for s in decodes:
        r, p = s.req, s.start
        if p < len(r.tokens):
            ids.append(r.tokens[p])
        else:  # the pending token: the runner fills it in on the device
            feed_rows.append(len(ids))
            feed_reqs.append(r)
            ids.append(0)
        pos.append(p)
        slots.append(r.blocks[p // block_size] * block_size + p % block_size)
        lens.append(p + 1)
    segments, chunks, q_start = [], [torch.tensor(slots, dtype=torch.long)], [0]
    for s in prefills:
        r, p0, n = s.req, s.start, s.count
        if p0 + n > len(r.tokens):
            raise RuntimeError("build_step: a prefill chunk reaches a token still in flight")
        seg_slots = _slots(r.blocks, block_size, p0 + n)
        chunks.append(seg_slots[p0:])
        context = mask = None
        if p0 and gather_prefill:
            context, mask = to_device(seg_slots, device), context_mask(p0, n, device)
        segments.append(PrefillSegment(len(ids), n, p0, context, mask))
        ids.extend(r.tokens[p0:p0 + n])
        pos.extend(range(p0, p0 + n))
        q_start.append(q_start[-1] + n)
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
            [s.req.num_tokens - s.req.prompt_len for _, s in sampled], device, validated=True)
    prompt_runs, prompt_rows = _prompt_logprob_rows(ordered, starts)
    extras = build_extras([s.req for _, s in sampled], prompt_runs, device)
    slots_by_fam, with_q = _adapter_slots(ordered, starts, t, device) if use_adapters else ({}, {})

    def dev(x, dtype=torch.int32):
        return to_device(torch.as_tensor(x, dtype=dtype), device)

    return StepMetadata(
        input_ids=dev(ids, torch.long), positions=dev(pos, torch.long),
        slot_mapping=to_device(torch.cat(chunks), device), num_decode=len(decodes),
        decode_block_tables=dev(_table(decodes)), decode_seq_lens=dev(lens),
        decode_query_start=torch.arange(len(decodes) + 1, dtype=torch.int32, device=device),
        prefills=segments, prefill_block_tables=dev(_table(prefills)),
        prefill_seq_lens=dev([s.start + s.count for s in prefills]),
        prefill_query_start=dev(q_start),
        prefill_tiles=dev(tiles_for(q_start)).reshape(-1, 2),
        logits_rows=dev(rows + prompt_rows, torch.long), sampled=[s for _, s in sampled],
        sampling=sampling,
        any_sampled=any(p.temperature > 0 for p in params),
        any_top_p=any(p.temperature > 0 and p.top_p < 1 for p in params),
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
