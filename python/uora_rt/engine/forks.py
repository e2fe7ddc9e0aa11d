"""n > 1: the sequences of one request share the prompt's prefill. The first sequence is
scheduled as any request; its siblings wait (Request.forks) until its prompt is computed, then
take a reference to its full prompt blocks (shared, read-only: nobody writes a full block of a
prompt), get a device-to-device copy of the partial block the prompt's last token lies in, and
compute only that last token (their first draw, each with its own seed). Afterwards the
sequences are independent (preempted, aborted or finished alone; the allocator's reference
counts free a shared block with its last holder)."""

from __future__ import annotations

import torch

from uora_rt.engine.request import Request, Status


def fork(parent: Request, scheduler, allocator, kv, stats: dict) -> None:
    """Hands parent's prompt KV to its waiting siblings. A sibling that finds no free block for
    its copy of the partial block prefills its own prompt instead (counted in
    stats["fork_prefills"]), as does one of a one-token prompt (nothing to share)."""
    kids = [k for k in parent.forks if k.status is not Status.FINISHED]
    parent.forks = []
    for kid in kids:  # one prompt, one list of prompt logprobs
        kid.prompt_logprobs = parent.prompt_logprobs
    keep = parent.prompt_len - 1
    full, nb = keep // scheduler.block_size, scheduler.blocks_for(keep)
    shared, partial = parent.blocks[:full], parent.blocks[full:nb]
    src, dst, forked = [], [], []
    for kid in kids:
        if 0 < nb and len(partial) <= allocator.num_free:
            allocator.touch(shared)
            own = allocator.allocate(len(partial))
            kid.blocks, kid.computed = shared + own, keep
            kid.cache_root, kid.cached_blocks = parent.cache_root, full  # already findable
            src += partial
            dst += own
            forked.append(kid)
        else:
            scheduler.add(kid)
            stats["fork_prefills"] += 1
    if dst:
        index_src = torch.tensor(src, device=kv.k.device)
        index_dst = torch.tensor(dst, device=kv.k.device)
        for cache in (kv.k, kv.v):
            cache[:, index_dst] = cache[:, index_src]
    # Next in line: they hold blocks, so they must not wait behind requests that need some.
    scheduler.waiting.extendleft(reversed(forked))
    stats["forks"] += len(forked)
