"""A step's inputs as a message (ints + tensors) and back: what a worker's forward needs.

The driver keeps the full StepMetadata (sampling, logits rows: rank 0 alone samples, from the
replicated hidden state). A worker gets the tokens, the KV slots, the page tables, the prefill
chunks and, per projection family id, each token's adapter slot (a worker's manager replays the
driver's registrations in order, so family ids and slots agree across ranks).
"""

from __future__ import annotations

import torch

from uora_rt.engine.metadata import PrefillSegment, StepMetadata, context_mask

_STEP_FIELDS = ("input_ids", "positions", "slot_mapping", "decode_block_tables",
                "decode_seq_lens", "decode_query_start", "prefill_block_tables",
                "prefill_seq_lens", "prefill_query_start", "prefill_tiles")


def adapter_ints_tensors(slots: dict, with_q: dict):
    """(ints, tensors) of {family id: [T] int32 slots}, {family id: bool}."""
    fids = list(slots)
    return ([len(fids)] + fids + [int(with_q.get(f, False)) for f in fids],
            [slots[f] for f in fids])


def split_adapters(ints: list[int], tensors: list[torch.Tensor]):
    """Inverse of adapter_ints_tensors: ({fid: slots}, {fid: with_q}), the rest of ints."""
    n = ints[0]
    fids, qs = ints[1:1 + n], ints[1 + n:1 + 2 * n]
    return dict(zip(fids, tensors)), dict(zip(fids, map(bool, qs))), ints[1 + 2 * n:]


def encode_step(meta: StepMetadata, kv_id: int):
    segs = torch.tensor([[s.start, s.count, s.context] for s in meta.prefills],
                        dtype=torch.int64).reshape(-1, 3)
    ctx = [s.context_slots for s in meta.prefills if s.context_slots is not None]
    gather = int(bool(ctx))
    ctx_slots = torch.cat(ctx) if ctx else torch.empty(0, dtype=torch.int64)
    a_ints, a_tensors = adapter_ints_tensors(meta.adapter_slots, meta.adapter_with_q)
    tensors = [getattr(meta, f) for f in _STEP_FIELDS] + [segs, ctx_slots] + a_tensors
    return [kv_id, meta.num_decode, gather] + a_ints, tensors


def decode_step(ints: list[int], tensors: list[torch.Tensor], device):
    """-> (kv_id, StepMetadata without sampling or logits rows)."""
    kv_id, num_decode, gather = ints[:3]
    n = len(_STEP_FIELDS)
    fields = dict(zip(_STEP_FIELDS, tensors[:n]))
    segs, ctx_slots = tensors[n].tolist(), tensors[n + 1]
    slots, with_q, _ = split_adapters(ints[3:], tensors[n + 2:])
    prefills, at = [], 0
    for start, count, context in segs:
        cs = mask = None
        if gather and context:  # the driver's context slots, in chunk order
            cs = ctx_slots[at:at + context + count]
            at += context + count
            mask = context_mask(context, count, device)
        prefills.append(PrefillSegment(start, count, context, cs, mask))
    meta = StepMetadata(**fields, num_decode=num_decode, prefills=prefills,
                        logits_rows=torch.empty(0, dtype=torch.long, device=device), sampled=[],
                        sampling=None, any_sampled=False, any_top_p=False,
                        adapter_slots=slots, adapter_with_q=with_q)
    return kv_id, meta
