"""The engine's OpenAI fields against independent references: logprobs (and prompt logprobs)
equal log_softmax of transformers' logits (+ PEFT VeRA for adapters); penalties, logit_bias and
min_tokens equal transformers' generate with its logits processors; n sequences each reproduce
alone with seed + i; stop_token_ids end a sequence; every test ends with the engine idle."""

import pytest
import torch
from conftest import MODEL_TOL
from engine_helpers import assert_idle, build, load, random_prompts, reference_greedy
from peft_ref import peft_vera_model
from uora_rt import Engine, SamplingParams
from uora_rt.engine import best_of


def ref_model(fn, path):
    return fn() if path is None else peft_vera_model(fn(), path)


def ref_logprobs(model, ids):
    """log_softmax of transformers' logits at every position of ids: [len(ids), V] float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)


def check_entry(entry, ref_row, token, k):
    atol, rtol = MODEL_TOL[torch.float32]
    assert entry.token_id == token
    assert abs(entry.logprob - ref_row[token].item()) <= atol + rtol * abs(entry.logprob)
    assert entry.rank == int((ref_row > ref_row[token]).sum()) + 1 or \
        abs(ref_row.sort(descending=True).values[entry.rank - 1] - ref_row[token]) < 1e-4
    want = ref_row.topk(k)
    assert len(entry.top) == k
    for (tid, lp), v in zip(entry.top, want.values.tolist()):
        assert abs(lp - v) <= atol + rtol * abs(v)
        assert abs(ref_row[tid].item() - lp) <= atol + rtol * abs(lp)  # that id has that value


@pytest.mark.parametrize("adapter", [None, "a1"])
def test_logprobs_and_prompt_logprobs_equal_transformers(tmp_path, adapter):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=2048, max_step_tokens=16)  # the prompt is chunked
    prompt = random_prompts(1, seed=4, lo=37, hi=37)[0]
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=5, logprobs=4,
                            prompt_logprobs=3, ignore_eos=True)
    rid = engine.add_request(prompt, adapter, params)
    out = engine.run_until_done()[rid]
    ids = prompt + out.token_ids
    ref = ref_logprobs(ref_model(fn, ads.get(adapter)), ids)
    assert len(out.logprobs) == len(out.token_ids) == 8
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        check_entry(entry, ref[len(prompt) + i - 1], tok, 4)
    assert out.cumulative_logprob == pytest.approx(sum(e.logprob for e in out.logprobs))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        check_entry(out.prompt_logprobs[j], ref[j - 1], prompt[j], 3)
    assert_idle(engine)


def hf_generate(fn, path, prompt, n, **kw):
    model = ref_model(fn, path)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, pad_token_id=0, **kw)[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    return out[:out.index(eos)] if eos in out else out


@pytest.mark.parametrize("adapter", [None, "a0"])
def test_repetition_penalty_logit_bias_and_min_tokens_equal_transformers(tmp_path, adapter):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=4096)
    prompts = random_prompts(3, seed=6, lo=5, hi=20)
    bias = {3: 4.0, 17: -2.5, 40: 3.0}
    cases = [(dict(repetition_penalty=1.8), dict(repetition_penalty=1.8)),
             (dict(repetition_penalty=0.7), dict(repetition_penalty=0.7)),
             (dict(logit_bias=bias), dict(sequence_bias={(t,): v for t, v in bias.items()})),
             (dict(logit_bias={2: 30.0}, min_tokens=6),  # EOS pushed up, held back 6 tokens
              dict(sequence_bias={(2,): 30.0}, min_new_tokens=6))]
    rids = []
    for ours, _ in cases:
        for p in prompts:
            rids.append(engine.add_request(p, adapter, SamplingParams(max_tokens=12, **ours)))
    plain = [engine.add_request(p, adapter, SamplingParams(max_tokens=12)) for p in prompts]
    done = engine.run_until_done()
    k = 0
    for _, theirs in cases:
        for p in prompts:
            assert done[rids[k]].token_ids == hf_generate(fn, ads.get(adapter), p, 12, **theirs)
            k += 1
    for p, r in zip(prompts, plain):  # the plain requests in the same batches are unchanged
        assert done[r].token_ids == reference_greedy(fn, ads.get(adapter), p, 12)
    min_outs = [done[r] for r in rids[-len(prompts):]]
    assert all(len(o.token_ids) == 6 and o.finish_reason == "stop" and o.stop_reason == 2
               for o in min_outs)
    assert_idle(engine)


def test_min_tokens_suppresses_eos_and_stop_token_ids_exactly_that_long(tmp_path):
    _, base, ads = build(tmp_path)
    engine = Engine(load(base, ads), kv_cache_tokens=2048)
    for m in (0, 1, 5, 9):
        for stop_ids in ([], [50, 51]):
            bias = {t: 100.0 for t in [2] + stop_ids}  # EOS / stop ids win every draw allowed
            rid = engine.add_request([1, 5, 9], None, SamplingParams(
                max_tokens=10, temperature=0.8, seed=m, min_tokens=m, logit_bias=bias,
                stop_token_ids=stop_ids))
            out = engine.run_until_done()[rid]
            assert len(out.token_ids) == m and out.finish_reason == "stop"
            assert out.stop_reason in [2] + stop_ids
            assert all(t not in [2] + stop_ids for t in out.token_ids)
    # stop_token_ids end a sequence even with ignore_eos; EOS then does not
    rid = engine.add_request([1, 5], None, SamplingParams(
        max_tokens=10, ignore_eos=True, stop_token_ids=[60], logit_bias={2: 40.0, 60: 50.0},
        min_tokens=3))
    out = engine.run_until_done()[rid]
    assert out.token_ids == [2, 2, 2] and out.stop_reason == 60
    assert_idle(engine)


def ref_penalized(logits, prompt, outputs, rep, freq, pres, bias, eos, min_tokens):
    """OpenAI's documented formula (frequency/presence over output tokens) after transformers'
    RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor and
    MinNewTokensLengthLogitsProcessor, in float64."""
    from transformers import (
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    x = logits.double()[None].clone()
    ids = torch.tensor([prompt + outputs])
    if min_tokens:
        x = MinNewTokensLengthLogitsProcessor(len(prompt), min_tokens, eos)(ids, x)
    if bias:
        x = SequenceBiasLogitsProcessor({(t,): v for t, v in bias.items()})(ids, x)
    x = RepetitionPenaltyLogitsProcessor(rep)(ids, x) if rep != 1 else x
    counts = torch.bincount(torch.tensor(outputs, dtype=torch.long), minlength=x.shape[1])
    return (x[0] - freq * counts - pres * (counts > 0)).float()


@pytest.mark.parametrize("path", ["cpp", "torch"])  # torch: the ops CUDA runs
def test_processors_on_the_same_logits_equal_transformers_and_openai_formula(path):
    from types import SimpleNamespace

    from uora_rt.engine.processors import ProcessorState, apply, build_extras, record

    torch.manual_seed(1)
    v = 300
    st = ProcessorState(v, 64, "cpu", path=path)
    rows = []
    for i in range(12):  # more rows than the tables start with: they grow
        prompt = torch.randint(0, v, (5 + i,)).tolist()
        outputs = torch.randint(0, 40, (i,)).tolist()  # repeats
        p = SamplingParams(max_tokens=40, repetition_penalty=[1.0, 1.3, 0.8][i % 3],
                           frequency_penalty=[0.0, 0.5, -1.0, 2.0][i % 4],
                           presence_penalty=[0.0, 1.5, -0.5][i % 3],
                           logit_bias={j * 7 % v: float(j - 3) for j in range(i % 5)},
                           min_tokens=[0, 4, 30][i % 3])
        eos = {2, 9} if i % 2 else set()
        req = SimpleNamespace(tokens=prompt + outputs, prompt_len=len(prompt), params=p,
                              want_logprobs=False, num_tokens=len(prompt) + len(outputs),
                              proc_slot=None)
        if p.processed:
            req.proc_slot = st.open(req.tokens, len(prompt), p, eos)
        rows.append((req, prompt, outputs, eos))
    logits = torch.randn(len(rows), v) * 3

    def check():
        """Processes the logits of every row; each must equal the reference. -> the extras."""
        ex = build_extras([r for r, *_ in rows], [], "cpu")
        got = logits.clone()
        apply(got, ex, st)
        for i, (req, prompt, outputs, eos) in enumerate(rows):
            p = req.params
            want = ref_penalized(logits[i], prompt, outputs, p.repetition_penalty,
                                 p.frequency_penalty, p.presence_penalty, p.logit_bias,
                                 list(eos), p.min_tokens)
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
        return ex

    ex = check()
    # a draw is appended to each processed row's history and output counts on the device:
    # the next step's processing sees it
    tokens = torch.tensor([r[2][0] if r[2] else 7 for r in rows])  # repeats an output token
    record(ex, st, tokens)
    for (req, _, outputs, _), t in zip(rows, tokens.tolist()):
        outputs.append(t)
        req.tokens.append(t)
        req.num_tokens += 1
    check()


def test_n_sequences_reproduce_alone_with_seed_plus_i_and_share_the_prefill(tmp_path):
    _, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=4096, max_step_tokens=32)
    prompt = random_prompts(1, seed=8, lo=45, hi=45)[0]
    params = dict(max_tokens=10, temperature=1.0, top_p=0.95, ignore_eos=True)
    seen = []
    rid = engine.add_request(prompt, "a2", SamplingParams(n=4, seed=77, logprobs=0, **params),
                             on_output=seen.append)
    done = {}
    while engine.has_unfinished():
        engine.step()
    finals = sorted((o for o in seen if o.finished), key=lambda o: o.index)
    assert [o.index for o in finals] == [0, 1, 2, 3] and {o.request_id for o in seen} == {rid}
    assert engine.stats["forks"] == 3 and engine.stats["fork_prefills"] == 0
    prefilled = engine.stats["prefill_tokens"]
    # the prompt once; each fork computed only its last prompt token
    assert prefilled == len(prompt) + 3
    for o in finals:
        alone = engine.add_request(prompt, "a2", SamplingParams(seed=77 + o.index, **params))
        done = engine.run_until_done()
        assert done[alone].token_ids == o.token_ids and o.seed == 77 + o.index
    assert len({tuple(o.token_ids) for o in finals}) > 1
    # best_of: 4 run, the 2 with the highest mean logprob are kept
    kept = best_of(finals, 2)
    means = [o.cumulative_logprob / len(o.logprobs) for o in finals]
    assert [o.index for o in kept] == sorted(sorted(range(4), key=lambda i: -means[i])[:2])
    assert_idle(engine)


def test_abort_and_tiny_kv_with_n_leave_nothing_behind(tmp_path):
    _, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=96, block_size=8, max_step_tokens=64)
    prompt = random_prompts(1, seed=9, lo=30, hi=30)[0]
    rid = engine.add_request(prompt, "a0", SamplingParams(n=3, max_tokens=20, temperature=1,
                                                          seed=1, ignore_eos=True,
                                                          presence_penalty=0.5))
    done = engine.run_until_done()  # forks that find no blocks prefill (or get preempted)
    assert rid in done
    gone = engine.add_request(prompt, "a0", SamplingParams(n=3, max_tokens=20))
    engine.step()
    engine.abort(gone)
    engine.run_until_done()
    assert_idle(engine)
    assert engine.runner.processors.rows - len(engine.runner.processors.free) == 0
