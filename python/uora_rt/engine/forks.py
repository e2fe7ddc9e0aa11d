"""n > 1: the sequences of one request share the prompt's prefill. The first sequence is
scheduled as any request; its siblings wait (Request.forks) until its prompt is computed, then
get a copy of the prompt's KV blocks but the last token's and compute only that last token (their
first draw, each with its own seed). The copy is a device-to-device copy of whole blocks, done
once; afterwards the sequences are independent (preempted, aborted or finished alone)."""

from __future__ import annotations

import torch

from uora_rt.engine.request import Request, Status


def fork(parent: Request, scheduler, allocator, kv, stats: dict) -> None:
    """Hands parent's prompt KV to its waiting siblings. A sibling that finds too few free
    blocks prefills its own prompt instead (counted in stats["fork_prefills"]), as does one of
    a one-token prompt (nothing to copy)."""
    kids = [k for k in parent.forks if k.status is not Status.FINISHED]
    parent.forks = []
    for kid in kids:  # one prompt, one list of prompt logprobs
        kid.prompt_logprobs = parent.prompt_logprobs
    keep = parent.prompt_len - 1
    nb = scheduler.blocks_for(keep)
    src, dst, forked = parent.blocks[:nb], [], []
    for kid in kids:
        if 0 < nb <= allocator.num_free:
            kid.blocks = allocator.allocate(nb)
            kid.computed = keep
            dst += kid.blocks
            forked.append(kid)
        else:
            scheduler.add(kid)
            stats["fork_prefills"] += 1
    if forked:
        index_src = torch.tensor(src * len(forked), device=kv.k.device)
        index_dst = torch.tensor(dst, device=kv.k.device)
        for cache in (kv.k, kv.v):
            cache[:, index_dst] = cache[:, index_src]
        # Next in line: they hold blocks, so they must not wait behind requests that need some.
        scheduler.waiting.extendleft(reversed(forked))
        stats["forks"] += len(forked)
