"""Per-request logit processing and logprobs, batched on the device.

What a request asks for lives in device tables, one row per request that changes its logits
(written once, when the request enters the engine): its penalties, its logit_bias entries, the
tokens min_tokens holds back, and its token history (prompt, then each drawn token, appended on
the device right after the draw) with per-token output counts. A step then needs one integer
per processed row (its table row), gathered in the loop that already builds the step's sampling
columns: no per-request Python runs per step, and no host sync.

Order (vLLM's): min_tokens sets EOS and stop_token_ids to -inf while fewer than min_tokens
tokens exist; logit_bias adds; repetition_penalty divides positive logits (multiplies negative
ones) of tokens seen in the prompt or output; frequency_penalty * count and presence_penalty *
[count > 0] of output tokens are subtracted; then the sampler (temperature, top-k, top-p).
All of it touches only the listed tokens (O(history) per row, never O(vocabulary)): gathered
values are changed and scattered back; a token listed twice writes the same value twice.

Logprobs are log_softmax of the raw logits (before any of the above, vLLM's default): the
chosen token's logprob and rank (1 + tokens with a larger logit), and the k largest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


class ProcessorState:
    """The device tables (grown by doubling, never shrunk): per row, scalars [rep, freq, pres],
    min_tokens, the stop ids min_tokens suppresses, logit_bias (token, value) pairs, the token
    history [rows, max_len] and output counts [rows, vocab]."""

    def __init__(self, vocab: int, max_len: int, device):
        self.vocab, self.max_len, self.device = vocab, max_len, torch.device(device)
        self.free: list[int] = []
        self.rows = 0
        self._alloc(8, 1, 1)

    def _alloc(self, rows: int, ks: int, kb: int) -> None:
        dev, old = self.device, getattr(self, "scal", None)
        new = {"scal": torch.tensor([1.0, 0.0, 0.0], device=dev).repeat(rows, 1),
               "min_tokens": torch.zeros(rows, dtype=torch.int64, device=dev),
               "stop_n": torch.zeros(rows, dtype=torch.int64, device=dev),
               "stops": torch.zeros(rows, ks, dtype=torch.int64, device=dev),
               "bias_tok": torch.zeros(rows, kb, dtype=torch.int64, device=dev),
               "bias_val": torch.zeros(rows, kb, dtype=torch.float32, device=dev),
               "hist": torch.zeros(rows, self.max_len, dtype=torch.int32, device=dev),
               "counts": torch.zeros(rows, self.vocab, dtype=torch.int32, device=dev)}
        if old is not None:
            for name, t in new.items():
                src = getattr(self, name)
                t[tuple(slice(0, s) for s in src.shape)] = src
            # New stop columns repeat each row's first entry, as open() pads.
            new["stops"][:, self.stops.shape[1]:] = new["stops"][:, :1]
        for name, t in new.items():
            setattr(self, name, t)
        self.free.extend(range(rows - 1, self.rows - 1, -1))
        self.rows = rows

    def open(self, tokens: list[int], params, stop_ids: set[int]) -> int:
        """A row for a request (its prompt and any tokens it already has); returns it."""
        bias = sorted(params.logit_bias.items())
        stops = sorted(stop_ids) if params.min_tokens > 0 else []
        if not self.free or len(stops) > self.stops.shape[1] or len(bias) > \
                self.bias_tok.shape[1]:
            self._alloc(self.rows * 2 if not self.free else self.rows,
                        max(self.stops.shape[1], len(stops)), max(self.bias_tok.shape[1],
                                                                  len(bias)))
        row = self.free.pop()
        dev = self.device
        self.scal[row] = torch.tensor([params.repetition_penalty, params.frequency_penalty,
                                       params.presence_penalty], device=dev)
        self.min_tokens[row] = params.min_tokens
        # Padding repeats the first entry (so a scatter writes it twice with the same value),
        # or, with none, points at token 0 with nothing to do.
        ks, kb = self.stops.shape[1], self.bias_tok.shape[1]
        self.stop_n[row] = len(stops)
        self.stops[row] = torch.tensor((stops + stops[:1] * ks)[:ks] if stops else [0] * ks,
                                       device=dev)
        self.bias_tok[row] = torch.tensor([t for t, _ in bias] + [0] * (kb - len(bias)),
                                          device=dev)
        self.bias_val[row] = torch.tensor([float(v) for _, v in bias] + [0.0] * (kb - len(bias)),
                                          device=dev)
        self.hist[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int32, device=dev)
        self.counts[row].zero_()
        return row

    def count_outputs(self, row: int, outputs: list[int]) -> None:
        """Output tokens a request had before it got its row (a fork's copied prefix has none)."""
        if outputs:
            ids = torch.tensor(outputs, dtype=torch.int64, device=self.device)
            self.counts[row].index_put_((ids,), torch.ones_like(ids, dtype=torch.int32),
                                        accumulate=True)

    def close(self, row: int) -> None:
        self.free.append(row)


@dataclass
class StepExtras:
    """What a step needs beyond SamplingTensors (None on the step when nothing asks for it).
    Indices are rows of the step's sampled logits [R, V]; prompt rows follow them."""

    proc_rows: Tensor | None    # [P] int64 sampled rows whose logits are processed
    proc_slots: Tensor | None   # [P] int64 their ProcessorState rows
    proc_len: Tensor | None     # [P] int64 tokens so far (= where the drawn token goes)
    proc_pos: Tensor | None     # [P] int64 output tokens so far (min_tokens)
    any_penalty: bool
    any_bias: bool
    any_min: bool
    hist_width: int             # longest history among the processed rows
    lp_rows: Tensor | None      # [L] int64 sampled rows whose logprobs are wanted
    lp_k: int                   # the most top tokens any of them (or a prompt row) wants
    prompt_targets: Tensor | None  # [Q] int64: the prompt token each extra logits row predicts
    lp_index: list              # host: the sampled row of each lp row
    lp_owners: list             # host: the Request of each lp row
    prompt_owners: list         # host: (Request, count) of each run of prompt rows


def build_extras(sampled_reqs, prompt_runs, device) -> StepExtras | None:
    """sampled_reqs: the Request of each sampled row; prompt_runs: (Request, targets) for the
    prompt-logprob rows that follow them, in order."""
    proc, lp, k = [], [], 0
    flags = [False, False, False]
    width = 0
    for i, r in enumerate(sampled_reqs):
        if r.proc_slot is not None:
            n = r.num_tokens
            proc.append((i, r.proc_slot, n, n - r.prompt_len))
            p = r.params
            if p.penalized:
                flags[0] = True
                width = max(width, n)
            flags[1] = flags[1] or bool(p.logit_bias)
            flags[2] = flags[2] or (p.min_tokens > n - r.prompt_len)
        if r.want_logprobs:
            lp.append(i)
            k = max(k, r.params.logprobs or 0)
    targets = [t for _, ts in prompt_runs for t in ts]
    for r, _ in prompt_runs:
        k = max(k, r.params.prompt_logprobs or 0)
    if not proc and not lp and not targets:
        return None
    cols = [list(c) for c in zip(*proc)] if proc else [[], [], [], []]
    flat = torch.tensor([v for c in cols for v in c] + lp + targets, dtype=torch.int64)
    flat = flat.to(device, non_blocking=True) if torch.device(device).type == "cuda" \
        else flat.to(device)
    parts = flat.split([len(proc)] * 4 + [len(lp), len(targets)])
    some = (lambda t: t if t.numel() else None)
    return StepExtras(
        proc_rows=some(parts[0]), proc_slots=some(parts[1]), proc_len=some(parts[2]),
        proc_pos=some(parts[3]), any_penalty=flags[0], any_bias=flags[1], any_min=flags[2],
        hist_width=width, lp_rows=some(parts[4]), lp_k=k, prompt_targets=some(parts[5]),
        lp_index=lp, lp_owners=[sampled_reqs[i] for i in lp],
        prompt_owners=[(r, len(ts)) for r, ts in prompt_runs])


def apply(logits: Tensor, ex: StepExtras, st: ProcessorState) -> None:
    """Processes the listed rows of logits [R, V] (float32, contiguous) in place."""
    if ex.proc_rows is None:
        return
    v = logits.shape[1]
    flat = logits.view(-1)
    slots = ex.proc_slots
    base = (ex.proc_rows * v)[:, None]
    if ex.any_min:
        idx = base + st.stops[slots]
        on = (st.stop_n[slots] > 0) & (ex.proc_pos < st.min_tokens[slots])
        flat[idx] = torch.where(on[:, None], -math.inf, flat[idx])
    if ex.any_bias:
        idx = base + st.bias_tok[slots]
        flat.index_put_((idx.flatten(),), st.bias_val[slots].flatten(), accumulate=True)
    if ex.any_penalty:
        w = ex.hist_width
        h = st.hist[slots, :w].long()
        live = torch.arange(w, device=h.device)[None, :] < ex.proc_len[:, None]
        h = torch.where(live, h, h[:, :1])  # past the end: repeat the first token
        idx = base + h
        x = flat[idx]
        scal = st.scal[slots]
        rep, freq, pres = scal[:, 0:1], scal[:, 1:2], scal[:, 2:3]
        x = torch.where(x > 0, x / rep, x * rep)
        c = st.counts[slots[:, None], h].to(torch.float32)
        flat[idx] = x - freq * c - pres * (c > 0).to(torch.float32)


def record(ex: StepExtras | None, st: ProcessorState, tokens: Tensor) -> None:
    """Appends each processed row's drawn token to its history and output counts."""
    if ex is None or ex.proc_rows is None:
        return
    tok = tokens.index_select(0, ex.proc_rows)
    st.hist[ex.proc_slots, ex.proc_len] = tok.to(torch.int32)
    st.counts.index_put_((ex.proc_slots, tok), torch.ones_like(tok, dtype=torch.int32),
                         accumulate=True)


def logprob_table(raw: Tensor, targets: Tensor, k: int) -> Tensor:
    """raw logits [L, V], targets [L] -> [L, 2 + 2k] float64: the target's logprob, its rank,
    then the k largest logprobs and their token ids (ids are exact in float64)."""
    raw = raw.float()
    lse = torch.logsumexp(raw, -1, keepdim=True)
    chosen = raw.gather(1, targets[:, None])
    rank = (raw > chosen).sum(-1, keepdim=True) + 1
    cols = [(chosen - lse).double(), rank.double()]
    if k:
        tv, ti = raw.topk(min(k, raw.shape[1]), -1)
        cols += [(tv - lse).double(), ti.double()]
    return torch.cat(cols, 1)


def sample_step(sampler, st: ProcessorState, logits: Tensor, meta):
    """The step's draw: (tokens [R] on the device, logprob table or None). logits: [R + Q, V]
    float32, the sampled rows then the prompt-logprob rows."""
    r = len(meta.sampled)
    ex = meta.extras
    samp = logits[:r]
    if ex is None:
        return sampler(samp, meta.sampling, meta.any_sampled, meta.any_top_p), None
    raws, targets = [], []
    if ex.lp_rows is not None:  # raw: before processing (a copy only when something processes)
        every = ex.proc_rows is None and ex.lp_rows.numel() == r
        raws.append(samp if every else samp.index_select(0, ex.lp_rows))
    if r:
        apply(samp, ex, st)
        tokens = sampler(samp, meta.sampling, meta.any_sampled, meta.any_top_p)
        record(ex, st, tokens)
    else:
        tokens = torch.empty(0, dtype=torch.long, device=logits.device)
    if ex.lp_rows is not None:
        targets.append(tokens.index_select(0, ex.lp_rows))
    if ex.prompt_targets is not None:
        raws.append(logits[r:])
        targets.append(ex.prompt_targets)
    if not raws:
        return tokens, None
    raw = raws[0] if len(raws) == 1 else torch.cat(raws)
    tgt = targets[0] if len(targets) == 1 else torch.cat(targets)
    return tokens, logprob_table(raw, tgt, ex.lp_k)


def unpack(row: list[float], token_id: int, k: int):
    """One row of logprob_table (as a list) -> TokenLogprob with the owner's k top tokens."""
    from uora_rt.engine.request import TokenLogprob

    width = (len(row) - 2) // 2
    top = [(int(row[2 + width + j]), row[2 + j]) for j in range(min(k, width))]
    return TokenLogprob(token_id, row[0], int(row[1]), top)


def hand_out(ex: StepExtras, table: list[list[float]], tokens: list[int]) -> dict:
    """A step's logprob rows (as lists): prompt entries are appended to their requests; the
    sampled rows' entries are returned by sampled row."""
    entries = {}
    for row, i, req in zip(table, ex.lp_index, ex.lp_owners):
        entries[i] = unpack(row, tokens[i], req.params.logprobs or 0)
    pos = len(ex.lp_index)
    for req, count in ex.prompt_owners:
        done, k = len(req.prompt_logprobs), req.params.prompt_logprobs
        req.prompt_logprobs.extend(unpack(table[pos + q], req.tokens[done + q], k)
                                   for q in range(count))
        pos += count
    return entries
