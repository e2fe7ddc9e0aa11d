"""Per-request logit processing and logprobs, batched on the device.

What a request asks for lives in device tables, one row per request that changes its logits
(written once, when the request enters the engine): its penalties, its logit_bias entries, the
tokens min_tokens holds back, and its token history (prompt, then each drawn token, appended on
the device right after the draw). A step then needs one integer per processed row (its table
row), gathered in the loop that already builds the step's sampling columns: no per-request
Python runs per step, and no host sync. Beside each history entry the tables keep what
frequency and presence penalties subtract for its token (frequency * its count among the output
tokens + presence, updated with each draw by one comparison over the history), so nothing of
vocabulary size is kept or read per request. History rows are padded with their first token,
so entries past a row's end duplicate a live one.

Order (vLLM's): min_tokens sets EOS and stop_token_ids to -inf while fewer than min_tokens
tokens exist; logit_bias adds; repetition_penalty divides positive logits (multiplies negative
ones) of tokens seen in the prompt or output; frequency_penalty * count and presence_penalty *
[count > 0] of output tokens are subtracted; then the sampler (temperature, top-k, top-p).
All of it touches only the listed tokens (O(history) per row, never O(vocabulary)): values are
taken from the flat logits, changed and put back; a token listed twice writes the same value
twice. (take/put_ rather than advanced indexing: on the CPU the latter is 10-100x slower here.)

Two paths run these steps: on the CPU one C++ op per step for the processing and one for the
history (uora::process_logits_ and uora::record_tokens_: a pass per row over its listed
tokens, where the torch ops below cost a dispatch and a temporary each, a dozen per step); on
CUDA, and on the CPU when asked for, the torch ops below. Both compute the same values
(kernels/reference.py states them); which one runs is said once in the log.

Logprobs are log_softmax of the raw logits (before any of the above, vLLM's default): the
chosen token's logprob and rank (1 + tokens with a larger logit), and the k largest.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from uora_rt.kernels import ops

log = logging.getLogger(__name__)


def choose_path(device: torch.device, path: str | None = None) -> str:
    """"cpp" (the CPU default: one C++ op per step) or "torch" (CUDA), said once in the log."""
    cpp = device.type == "cpu" and hasattr(ops, "process_logits_")
    if path not in (None, "cpp", "torch"):
        raise ValueError(f"logit processor path: expected None, 'cpp' or 'torch', got {path!r}")
    if path == "cpp" and not cpp:
        raise ValueError(f"the cpp logit processor path does not run on {device.type}")
    chosen = path or ("cpp" if cpp else "torch")
    log.info("logit processors on %s: %s", device.type,
             "uora::process_logits_ (C++, one pass per row)" if chosen == "cpp" else
             "torch gather/scatter ops")
    return chosen


class ProcessorState:
    """The device tables (grown by doubling, never shrunk): per row, scalars [rep, freq, pres],
    min_tokens (0 when nothing is held back), the stop ids it holds back, logit_bias (token,
    value) pairs, the token history [rows, max_len] and, per entry, what frequency and presence
    penalties subtract for its token."""

    def __init__(self, vocab: int, max_len: int, device, path: str | None = None):
        self.vocab, self.max_len, self.device = vocab, max_len, torch.device(device)
        self.path = choose_path(self.device, path)
        self.free: list[int] = []
        self.rows = 0
        self._alloc(8, 1, 1)

    def _alloc(self, rows: int, ks: int, kb: int) -> None:
        dev, old = self.device, getattr(self, "scal", None)
        new = {"scal": torch.tensor([1.0, 0.0, 0.0], device=dev).repeat(rows, 1),
               "min_tokens": torch.zeros(rows, dtype=torch.int64, device=dev),
               "stops": torch.zeros(rows, ks, dtype=torch.int64, device=dev),
               "bias_tok": torch.zeros(rows, kb, dtype=torch.int64, device=dev),
               "bias_val": torch.zeros(rows, kb, dtype=torch.float32, device=dev),
               "hist": torch.zeros(rows, self.max_len, dtype=torch.int64, device=dev),
               "pen": torch.zeros(rows, self.max_len, dtype=torch.float32, device=dev)}
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

    def open(self, tokens: list[int], prompt_len: int, params, stop_ids: set[int]) -> int:
        """A row for a request: its tokens (the prompt, then any output it already has)."""
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
        self.min_tokens[row] = params.min_tokens if stops else 0
        # Padding repeats the first entry (so a scatter writes it twice with the same value),
        # or, with none, points at token 0 with nothing to do.
        ks, kb = self.stops.shape[1], self.bias_tok.shape[1]
        self.stops[row] = torch.tensor((stops + stops[:1] * ks)[:ks] if stops else [0] * ks,
                                       device=dev)
        self.bias_tok[row] = torch.tensor([t for t, _ in bias] + [0] * (kb - len(bias)),
                                          device=dev)
        self.bias_val[row] = torch.tensor([float(v) for _, v in bias] + [0.0] * (kb - len(bias)),
                                          device=dev)
        self.hist[row] = tokens[0]
        self.hist[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64, device=dev)
        counts = Counter(tokens[prompt_len:])
        pen = [params.frequency_penalty * counts[t] + params.presence_penalty * (counts[t] > 0)
               for t in tokens]
        self.pen[row] = pen[0]
        self.pen[row, :len(tokens)] = torch.tensor(pen, dtype=torch.float32, device=dev)
        return row

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
    any_penalty: bool           # some row has a penalty (needs the history)
    any_rep: bool               # some row has repetition_penalty != 1
    any_count: bool             # some row has frequency or presence penalty
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
    rep = count = False
    width = 0
    for i, r in enumerate(sampled_reqs):
        if r.proc_slot is not None:
            n = r.num_tokens
            proc.append((i, r.proc_slot, n, n - r.prompt_len))
            p = r.params
            if p.penalized:
                flags[0] = True
                width = max(width, n)
                rep = rep or p.repetition_penalty != 1
                count = count or p.frequency_penalty != 0 or p.presence_penalty != 0
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
        proc_pos=some(parts[3]), any_penalty=flags[0], any_rep=rep, any_count=count,
        any_bias=flags[1], any_min=flags[2],
        hist_width=width, lp_rows=some(parts[4]), lp_k=k, prompt_targets=some(parts[5]),
        lp_index=lp, lp_owners=[sampled_reqs[i] for i in lp],
        prompt_owners=[(r, len(ts)) for r, ts in prompt_runs])


def apply(logits: Tensor, ex: StepExtras, st: ProcessorState) -> None:
    """Processes the listed rows of logits [R, V] (float32, contiguous) in place."""
    if ex.proc_rows is None:
        return
    if st.path == "cpp":
        ops.process_logits_(logits, ex.proc_rows, ex.proc_slots, ex.proc_len, ex.proc_pos,
                            st.scal, st.min_tokens, st.stops, st.bias_tok, st.bias_val, st.hist,
                            st.pen)
        return
    v = logits.shape[1]
    flat = logits.view(-1)
    slots = ex.proc_slots
    base = (ex.proc_rows * v)[:, None]
    if ex.any_min:
        idx = base + st.stops.index_select(0, slots)
        on = ex.proc_pos < st.min_tokens.index_select(0, slots)
        flat.put_(idx, torch.where(on[:, None], -math.inf, flat.take(idx)))
    if ex.any_bias:
        flat.put_(base + st.bias_tok.index_select(0, slots), st.bias_val.index_select(0, slots),
                  accumulate=True)
    if ex.any_penalty:
        w = ex.hist_width
        idx = st.hist[:, :w].index_select(0, slots).add_(base)
        x = flat.take(idx)
        if ex.any_rep:
            rep = st.scal.index_select(0, slots)[:, 0:1]
            x = torch.where(x > 0, x / rep, x * rep)
        if ex.any_count:  # entries past a row's end take its first entry's (current) value
            pen = st.pen[:, :w].index_select(0, slots)
            live = torch.arange(w, device=pen.device)[None, :] < ex.proc_len[:, None]
            x = x - torch.where(live, pen, pen[:, :1])
        flat.put_(idx, x)


def record(ex: StepExtras | None, st: ProcessorState, tokens: Tensor) -> None:
    """Appends each processed row's drawn token to its history; for rows with frequency or
    presence penalties, every entry of that token gets its new penalty."""
    if ex is None or ex.proc_rows is None:
        return
    if st.path == "cpp":
        ops.record_tokens_(st.hist, st.pen, tokens, ex.proc_rows, ex.proc_slots, ex.proc_len,
                           ex.proc_pos, st.scal)
        return
    tok = tokens.index_select(0, ex.proc_rows)
    slots, end = ex.proc_slots, ex.proc_len
    st.hist[slots, end] = tok
    if not ex.any_count:
        return
    w = min(ex.hist_width + 1, st.max_len)  # rows past it have no penalty
    h = st.hist[:, :w].index_select(0, slots)
    col = torch.arange(w, device=h.device)[None, :]
    same = h == tok[:, None]
    prompt = (end - ex.proc_pos)[:, None]
    n = (same & (col >= prompt) & (col <= end[:, None])).sum(1, keepdim=True)  # >= 1: itself
    scal = st.scal.index_select(0, slots)
    p = st.pen[:, :w]
    p.index_copy_(0, slots, torch.where(same, scal[:, 1:2] * n + scal[:, 2:3],
                                        p.index_select(0, slots)))


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
    """The step's draw: (tokens [R] on the host, logprob table or None). logits: [R + Q, V]
    float32, the sampled rows then the prompt-logprob rows."""
    r = len(meta.sampled)
    ex = meta.extras
    samp = logits[:r]
    if ex is None:
        drawn = sampler.draw(samp, meta.sampling, meta.any_sampled, meta.any_top_p)
        return sampler.finish(samp, drawn, meta.sampling), None
    raws, targets = [], []
    if ex.lp_rows is not None:  # raw: before processing (a copy only when something processes)
        every = ex.proc_rows is None and ex.lp_rows.numel() == r
        raws.append(samp if every else samp.index_select(0, ex.lp_rows))
    if r:
        apply(samp, ex, st)
        drawn = sampler.draw(samp, meta.sampling, meta.any_sampled, meta.any_top_p)
        host = sampler.finish(samp, drawn, meta.sampling)
        tokens = host.to(logits.device)  # the exact draw: histories and targets read it
        record(ex, st, tokens)
    else:
        host = torch.empty(0, dtype=torch.long)
        tokens = host.to(logits.device)
    if ex.lp_rows is not None:
        targets.append(tokens.index_select(0, ex.lp_rows))
    if ex.prompt_targets is not None:
        raws.append(logits[r:])
        targets.append(ex.prompt_targets)
    if not raws:
        return host, None
    raw = raws[0] if len(raws) == 1 else torch.cat(raws)
    tgt = targets[0] if len(targets) == 1 else torch.cat(targets)
    return host, logprob_table(raw, tgt, ex.lp_k)


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
