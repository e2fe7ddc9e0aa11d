"""Typed wrappers over the registered ops (torch.ops.uora.*), with fake kernels for torch.compile.

Each wrapper's `Semantics:` block states the op in PyTorch pseudocode; reference.py is the
executable version and the tests hold every device to it.
"""

from __future__ import annotations

import torch

from uora_rt._native import ops as _ops


def projection_factor(seed: int, stream: int, n: int, r: int, transposed: bool) -> torch.Tensor:
    """One float32 CPU factor of a projection family.

    Semantics:
        g = philox_normals(seed, stream, n * r).reshape(n, r)      # float64
        q = householder_thin_q(g)                                   # [n, r], diag(R) > 0
        return (q.T if transposed else q).float()                   # [r, n] or [n, r]
    """
    return _ops.projection_factor(seed, stream, n, r, transposed)


def reinit_(lambda_d, counts, p, a, b, a0, qa, b0, qb, tau: float, k: int, alpha: float):
    """One vectorized reinitialization step on the tensors' device, with no host synchronization.

    Semantics (lambda_d [L, r] f32; counts [L, r] i32; p [r] f32; a, a0, qa [r, max_in] f32;
    b, b0, qb [max_out, r] f32):
        below = lambda_d.abs() < tau
        counts += below
        fire = below & (counts % k == 0)
        fires = fire.sum(0).int()                                   # [r]
        p = max(p * alpha, 2**-64)   (`fires` times, float32; see kReinitFloor in reinit.h)
        rows = fires > 0
        a[rows] = p[rows, None] * a0[rows] + (1 - p[rows, None]) * qa[rows]
        b[:, rows] = p[rows] * b0[:, rows] + (1 - p[rows]) * qb[:, rows]
        return fires
    """
    return _ops.reinit_(lambda_d, counts, p, a, b, a0, qa, b0, qb, tau, k, alpha)


def mix_projections(a0, qa, b0, qb, p):
    """A, B of a reinit record p, with exactly the rounding of reinit_.

    Semantics (a0, qa [r, max_in] f32; b0, qb [max_out, r] f32; p [r] f32):
        return p[:, None] * a0 + (1 - p[:, None]) * qa, p * b0 + (1 - p) * qb
    """
    return _ops.mix_projections(a0, qa, b0, qb, p)


def vera_kaiming_factors(seed: int, r: int, max_in: int, max_out: int):
    """PEFT VeRA's projections (algorithm peft-vera-kaiming-mt19937), bit for bit, float32 CPU.

    Semantics (seed: int64, only its low 32 bits are used, as torch.Generator.manual_seed does):
        gen = mt19937(seed & 0xFFFFFFFF)                            # init_genrand
        def kaiming(shape):                                         # row-major, one output each
            bound = sqrt(3) * (sqrt(2) / sqrt(shape[1]))            # float64
            lo, hi = float32(-bound), float32(bound)
            x = (gen.next_u32() & 0xFFFFFF) * 2**-24                # exact
            return float32(x * (hi - lo) + lo)                      # one rounding (fma/float64)
        A = kaiming([r, max_in])                                    # drawn first
        B = kaiming([max_out, r])                                   # then B, same stream
        return A, B                                                 # [r, max_in], [max_out, r]
    """
    return _ops.vera_kaiming_factors(seed, r, max_in, max_out)


def _register_fakes() -> None:
    @torch.library.register_fake("uora::projection_factor")
    def _(seed, stream, n, r, transposed):
        return torch.empty((r, n) if transposed else (n, r), dtype=torch.float32)

    @torch.library.register_fake("uora::reinit_")
    def _(lambda_d, counts, p, a, b, a0, qa, b0, qb, tau, k, alpha):
        return lambda_d.new_empty((lambda_d.shape[-1],), dtype=torch.int32)

    @torch.library.register_fake("uora::mix_projections")
    def _(a0, qa, b0, qb, p):
        return torch.empty_like(a0), torch.empty_like(b0)

    @torch.library.register_fake("uora::vera_kaiming_factors")
    def _(seed, r, max_in, max_out):
        return (torch.empty((r, max_in), dtype=torch.float32),
                torch.empty((max_out, r), dtype=torch.float32))


_register_fakes()


def uora_group_(y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules, lambda_b_offsets,
                y_offsets, outs, with_q: bool) -> None:
    """Adds the multi-adapter UORA delta of one input group to its fused base output, in place.

    Semantics (y [T, n_out] and x [T, in] of one float dtype; a_cat [2r or r, max_in] f32 holds
    [A0; QA]; b_cat [max_out, 2r or r] f32 holds [B0 | QB]; lambda_d [S, M, r] f32; lambda_b
    [S, NB] f32, module j's vector at [:, lambda_b_offsets[j] : + outs[j]]; p [S, r] f32;
    slot [T] int32, -1 = no adapter):
        for t with slot[t] = s >= 0, for each module j (id m = modules[j], out = outs[j]):
            A = p[s, :, None] * a_cat[:r, :in] + (1 - p[s, :, None]) * a_cat[r:, :in]  # with_q
            B = p[s] * b_cat[:out, :r] + (1 - p[s]) * b_cat[:out, r:]                    # with_q
            (A, B = a_cat[:r, :in], b_cat[:out, :r] when not with_q)
            d = lambda_b[s, off_j : off_j + out] * (B @ (lambda_d[s, m] * (A @ x[t])))
            y[t, y_off_j : y_off_j + out] = (y[t, y_off_j : ...].float() + d).to(y.dtype)
    computed through the identity of docs/design.md §4: one shrink u = A_cat x per row, no
    per-adapter
    GEMM. Rows with slot -1 cost nothing. The modules' column ranges of y must not overlap (CUDA
    accumulates modules in parallel; checked on every device). On CUDA a slot outside [0, S) is
    treated as -1 (it cannot be checked without a host sync), and no op synchronizes with the host
    or allocates by data, so calls can be captured in CUDA graphs.
    """
    _ops.uora_group_(y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, list(modules),
                     list(lambda_b_offsets), list(y_offsets), list(outs), with_q)


@torch.library.register_fake("uora::uora_group_")
def _(y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules, lambda_b_offsets, y_offsets, outs,
      with_q):
    return None


def uora_expand_(y, u, b_cat, lambda_d, lambda_b, p, slot, modules, lambda_b_offsets, y_offsets,
                 outs, with_q: bool) -> None:
    """uora_group_ when the shrink is already done: u [T, >= R] = x @ a_cat[:R, :in].T.

    Semantics: as uora_group_, with A x replaced by p * u[:, :r] + (1 - p) * u[:, r:2r] (with_q)
    or u[:, :r]. u may be float32 or y's dtype (on the GPU it comes out of the base GEMM, whose
    weight carries a_cat's rows, so the shrink costs no extra pass over x).
    """
    _ops.uora_expand_(y, u, b_cat, lambda_d, lambda_b, p, slot, list(modules),
                      list(lambda_b_offsets), list(y_offsets), list(outs), with_q)


@torch.library.register_fake("uora::uora_expand_")
def _(y, u, b_cat, lambda_d, lambda_b, p, slot, modules, lambda_b_offsets, y_offsets, outs, with_q):
    return None


def paged_attention_(out, q, k_cache, v_cache, block_tables, seq_lens, query_start,
                     scale: float) -> None:
    """Causal GQA attention of a packed batch over one layer's paged KV cache, into out.

    Semantics (q, out [T, nH, hd] and k_cache, v_cache [num_blocks, block_size, nKV, hd] of one
    dtype: float32, bfloat16 or float16; block_tables [B, max_blocks], seq_lens [B],
    query_start [B + 1] int32; nH % nKV == 0):
        for b in range(B):
            rows = range(query_start[b], query_start[b + 1])        # this step's q_len tokens
            ctx = seq_lens[b]                                       # context incl. those tokens
            k = stack([k_cache[block_tables[b, p // block_size], p % block_size] for p < ctx])
            v = ...same for v_cache...                              # [ctx, nKV, hd]
            for j, t in enumerate(rows), for h in range(nH):
                pos = ctx - q_len + j                               # absolute position
                s = scale * k[:pos + 1, h // (nH // nKV)].float() @ q[t, h].float()
                out[t, h] = (s.softmax(0) @ v[:pos + 1, h // (nH // nKV)].float()).to(q.dtype)
        out[query_start[B]:] = 0                                    # padding rows
    The step's own K/V must already be written into the cache. Needs q_len <= seq_len, so every
    query row sees at least key 0; q_len == 0 sequences cost nothing. q and out may be views with
    any token/head strides (unit stride along hd); the caches and tables must be contiguous. The
    CPU checks the table values (query_start monotone from 0, q_len <= seq_len, page ids in
    range); a device kernel cannot without a host sync. Float32 accumulation; the result
    differs from reference.paged_attention by summation order and FMA contraction only.
    """
    _ops.paged_attention_(out, q, k_cache, v_cache, block_tables, seq_lens, query_start,
                          float(scale))


@torch.library.register_fake("uora::paged_attention_")
def _(out, q, k_cache, v_cache, block_tables, seq_lens, query_start, scale):
    return None


def process_logits_(logits, rows, slots, lens, pos, scal, min_tokens, stops, bias_tok, bias_val,
                    hist, pen) -> None:
    """The OpenAI logit processors of one step, in place (CPU only; engine.processors runs the
    same steps as torch ops on CUDA).

    Semantics (logits [R, V] float32; rows, slots, lens, pos [P] int64; per table row s:
    scal [S, 3] float32 = (repetition, frequency, presence), min_tokens [S] int64, stops [S, ks]
    and bias_tok [S, kb] int64, bias_val [S, kb] float32, hist [S, L] int64, pen [S, L] float32):
        for p in range(P):
            x, s, n = logits[rows[p]], slots[p], lens[p]            # n tokens so far, n >= 1
            if pos[p] < min_tokens[s]:
                x[stops[s]] = -inf
            for t, b in zip(bias_tok[s], bias_val[s]):
                x[t] += b                                           # float32, in order
            rep, freq, pres = scal[s]
            if (rep, freq, pres) != (1, 0, 0):
                ids = hist[s, :n]
                v = x[ids]                                          # all read, then written
                x[ids] = where(v > 0, v / rep, v * rep) - pen[s, :n]
    rows and slots hold no value twice. Every index is checked before anything is written (an
    error leaves the logits unchanged). The rows are processed last first (cache reuse).
    """
    # .default: the one overload, without the lookup (this runs every step)
    _ops.process_logits_.default(logits, rows, slots, lens, pos, scal, min_tokens, stops,
                                 bias_tok, bias_val, hist, pen)


@torch.library.register_fake("uora::process_logits_")
def _(logits, rows, slots, lens, pos, scal, min_tokens, stops, bias_tok, bias_val, hist, pen):
    return None


def record_tokens_(hist, pen, tokens, rows, slots, lens, pos, scal) -> None:
    """After a step's draw: each processed row's token joins its history (CPU only).

    Semantics (tokens [R] int64, the step's draw; the rest as in process_logits_):
        for p in range(P):
            s, end, t = slots[p], lens[p], tokens[rows[p]]          # end < L
            hist[s, end] = t
            rep, freq, pres = scal[s]
            if freq != 0 or pres != 0:
                c = (hist[s, end - pos[p]:end + 1] == t).sum()      # output count, t included
                pen[s, :end + 1][hist[s, :end + 1] == t] = freq * float32(c) + pres
    rows and slots hold no value twice; every index is checked before anything is written.
    """
    _ops.record_tokens_.default(hist, pen, tokens, rows, slots, lens, pos, scal)


@torch.library.register_fake("uora::record_tokens_")
def _(hist, pen, tokens, rows, slots, lens, pos, scal):
    return None
