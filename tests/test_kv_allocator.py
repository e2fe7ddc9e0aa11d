"""The block allocator and the scheduler's prefix caching, without a model: random traces
(requests sharing prefixes under a few identities, tiny KV budgets, aborts) against a
simulated KV cache that records, per slot, what was written there. After every step: every
position a running request has computed (what attention reads) holds exactly what that
request would have computed itself; reference counts equal the block tables' references; no
block is both free and held; nothing leaks; the capacity is never exceeded."""

import random

import pytest

from uora_rt.engine.kv_cache import BlockAllocator, block_keys
from uora_rt.engine.request import Request, SamplingParams, Status
from uora_rt.engine.scheduler import Scheduler


class NoAdapters:
    def pin(self, lease):
        return True

    def unpin(self, lease):
        pass


def _request(rid, prompt, identity, max_tokens):
    return Request(rid, prompt, identity, None, SamplingParams(max_tokens=max_tokens,
                                                               ignore_eos=True),
                   0, None, set())


def _check(alloc, sched, kv, bs):
    held = {}
    for r in sched.running:
        assert len(set(r.blocks)) == len(r.blocks), "a block twice in one table"
        assert len(r.blocks) * bs >= r.computed
        for b in r.blocks:
            held[b] = held.get(b, 0) + 1
        for p in range(r.computed):  # what this request's attention reads
            slot = r.blocks[p // bs] * bs + p % bs
            assert kv.get(slot) == (r.adapter, tuple(r.tokens[:p + 1])), (r.request_id, p)
    for r in sched.waiting:
        assert r.blocks == [] and r.computed == 0 and r.status is Status.WAITING
    alloc.check(held)
    assert alloc.num_free + len(held) == alloc.capacity


def simulate(seed: int, caching: bool):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 8])
    alloc = BlockAllocator(rng.randint(4, 40), caching=caching)
    sched = Scheduler(alloc, bs, max_num_seqs=rng.randint(1, 6),
                      max_step_tokens=rng.randint(1, 24), adapters=NoAdapters(),
                      cache_root=(lambda r: str(r.adapter).encode()) if caching else None)
    limit = alloc.capacity * bs + 1  # what the engine's check_length allows per request
    prefixes = [[rng.randrange(5) for _ in range(rng.randint(1, 3 * bs + 3))]
                for _ in range(3)]
    kv, live, ids = {}, [], 0
    steps = rng.randint(10, 80)
    for step in range(10_000):
        if step < steps:
            for _ in range(rng.choice([0, 0, 1, 2])):
                shared = rng.choice(prefixes)[:rng.randint(0, 3 * bs + 3)]
                prompt = (shared + [rng.randrange(5) for _ in range(rng.randint(1, 6))])
                prompt = prompt[:limit - 1]
                n = rng.randint(1, min(8, limit - len(prompt)))
                req = _request(f"r{ids}", prompt, rng.choice(["x", "y", None]), n)
                ids += 1
                sched.add(req)
                live.append(req)
            if live and rng.random() < 0.08:  # abort, wherever it is
                req = live.pop(rng.randrange(len(live)))
                sched.finish(req)
        elif not live:
            break
        scheduled = sched.schedule()
        _check(alloc, sched, kv, bs)  # the context each chunk reads
        for s in scheduled:
            r = s.req
            for p in range(s.start, s.start + s.count):
                kv[r.blocks[p // bs] * bs + p % bs] = (r.adapter, tuple(r.tokens[:p + 1]))
        for s in scheduled:
            r = s.req
            r.computed += s.count
            sched.register(r)
            if s.sample:
                r.tokens.append(rng.randrange(5))
                if r.num_tokens - r.prompt_len >= r.params.max_tokens:
                    sched.finish(r)
                    live.remove(r)
        _check(alloc, sched, kv, bs)
    else:
        pytest.fail(f"seed {seed}: requests never finished ({len(live)} left)")
    assert sched.num_running == sched.num_waiting == 0
    alloc.check({})
    assert alloc.num_free == alloc.capacity
    return alloc, sched


@pytest.mark.parametrize("caching", [True, False])
def test_random_traces_keep_the_invariants(caching):
    hits = 0
    for seed in range(150):
        alloc, sched = simulate(seed, caching)
        hits += sum(sched.cache_hits.values())
        if not caching:
            assert alloc.num_cached == 0 and hits == 0
    if caching:
        assert hits > 0  # the traces do share prefixes


def test_release_and_register_errors():
    alloc = BlockAllocator(4, caching=True)
    a = alloc.allocate(2)
    assert a == [1, 2] and alloc.num_free == 1
    alloc.release([a[0]])
    with pytest.raises(RuntimeError, match="release of block 1, which is not held"):
        alloc.release([a[0]])  # double free
    with pytest.raises(RuntimeError, match="release of block 0"):
        alloc.release([0])
    with pytest.raises(RuntimeError, match="allocate\\(3\\) with 2 free blocks"):
        alloc.allocate(3)
    with pytest.raises(RuntimeError, match="register of block 1, which is not held"):
        alloc.register(1, b"k")
    alloc.check({2: 1})


def test_cached_blocks_are_reused_last_and_least_recent_first():
    alloc = BlockAllocator(6, caching=True)  # blocks 1..5
    keys = block_keys([], b"root", list(range(8)), 2)  # 4 full blocks of 2 tokens
    seq = alloc.allocate(4)
    for b, k in zip(seq, keys):
        assert alloc.register(b, k)
    assert not alloc.register(seq[0], keys[0])  # already keyed
    other = alloc.allocate(1)
    assert not alloc.register(other[0], keys[1])  # another block holds that key
    alloc.release(seq)
    alloc.release(other)
    assert alloc.lookup(keys) == seq and alloc.evictable(seq) == 4
    # the unkeyed block goes first, then the sequence's tail before its head
    assert alloc.allocate(1) == other
    assert alloc.allocate(1) == [seq[3]]
    assert alloc.lookup(keys) == seq[:3] and alloc.evicted == 1
    alloc.touch(seq[:2])  # shared: two references once the tail is held again
    alloc.touch(seq[:1])
    assert alloc.ref[seq[0]] == 2 and alloc.num_free == 1
    alloc.check({other[0]: 1, seq[3]: 1, seq[0]: 2, seq[1]: 1})


def test_keys_chain_every_token_before_and_the_root():
    a = block_keys([], b"x", [1, 2, 3, 4, 5], 2)
    assert len(a) == 2  # the partial block has no key
    assert block_keys([], b"y", [1, 2, 3, 4], 2)[0] != a[0]
    b = block_keys([], b"x", [9, 2, 3, 4], 2)
    assert b[1] != a[1]  # same tokens in block 1, different before
    assert block_keys(a[:1], b"x", [1, 2, 3, 4, 5, 6], 2)[:2] == a  # extends in place
