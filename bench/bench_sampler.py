"""The engine's sampler on the CPU: median time per call at batch 1 / 16 / 64, vocabulary 49152.

Setups: greedy (any_sampled=False), temperature 0.7, top-k 50, top-p 0.9 (T 0.7 and T 1.0: the
larger temperature needs larger top-k windows), mixed rows (greedy / T 0.7 / top-k 50 / top-p 0.9
/ top-k 40 + top-p 0.95, cycling), top-p 0.9 through the full-sort path (what the CPU avoids),
and SamplingTensors.from_lists. Ratios are against logits.argmax(-1) in the same run; goal: a few
ms at most next to a 50-150 ms CPU decode step at batch 16-64.

Logits: SmolLM2-135M-Instruct's next-token logits at every position of a short English passage
(real next-token distributions; top-p 0.9 at T 1.0 keeps 1 to ~800 tokens there), or with
--synthetic (or without the model) random normal logits with SmolLM2's spread (std 3.5);
--save-logits FILE keeps them, --logits FILE reads them back (machines without the model).
--device cuda times the CUDA path instead (synchronized; eager, plus the mixed rows replayed
from a CUDA graph; results in sampler_cuda.json).

The OpenAI fields (engine/processors.py), per batch, for greedy, temperature 0.7 and top-k 50
rows, each as a ratio to the sampler alone on the same rows in the same run: "step, no fields"
(the engine's step path when no request uses them: must cost the same), "+ fields" (every row
with repetition/frequency/presence penalties, 8 logit_bias entries, min_tokens holding back EOS
and 2 stop_token_ids, and a 512-token history: goal <= 1.10x), "+ logprobs 5" and "+ fields +
logprobs 5" (log_softmax over the vocabulary, a rank and a top-5: a full extra pass over the
logits, reported as measured); on the CPU also "+ fields, torch ops" (the same processing
through the torch ops that CUDA runs, in place of the C++ op). Penalties act in place on the
same logits call after call, so the logits drift; the setups timed here (greedy,
temperature-only, top-k) cost the same whatever the values. "host: extras of 64 plain rows" is the
step-building cost added for
requests without fields.

python bench/bench_sampler.py [--repeats 21] [--threads N] [--synthetic | --logits FILE]
    [--fields-only]

--compare times the device path (a top-k window of the candidates, exact fallback for rows it
cannot decide) against the full sort it replaced, on the same tensors, round-robin: vocabularies
49,152 and 128,256, batch 1 / 64 / 256; greedy, temperature only, top-p 0.9, top-k 50, mixed,
top-k 2000 (the 4096 window) and flat logits at top-p 0.99 (every row falls back: the worst
case). Each call is what the engine pays per step: draw, then finish (the device-to-host copy
of the tokens and any fallback); on CUDA also with draw replayed from a CUDA graph, as decode
steps run it. Synthetic logits (random normal, std 3.5; std 0.3 for the flat rows). On the CPU
the "cpu" path is timed too; the device path's CPU numbers are indicative only (its torch.topk
and sorts are other kernels there). Results in sampler_paths_{cpu,cuda}.json.

python bench/bench_sampler.py --compare [--device cuda] [--repeats 5 on the CPU, 21 on CUDA]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402

from types import SimpleNamespace  # noqa: E402

from uora_rt.engine.processors import ProcessorState, build_extras, sample_step  # noqa: E402
from uora_rt.engine.request import SamplingParams  # noqa: E402
from uora_rt.engine.sampler import REDO, Sampler, SamplingTensors  # noqa: E402

V, BATCHES = 49152, (1, 16, 64)
CMP_VOCABS, CMP_BATCHES = (49152, 128256), (1, 64, 256)
PASSAGE = ("The old lighthouse keeper climbed the spiral stairs every evening, counting each of "
           "the one hundred and twelve steps as his father had taught him. At the top, he wiped "
           "the salt from the great lens, trimmed the wick, and watched the ships pass along the "
           "rocky coast. Some nights the fog rolled in so thick that he could not see his own "
           "hands, and on those nights he rang the bell until morning. Villagers said he never "
           "slept, but the truth was simpler: he loved the sea more than sleep, and the sea, in "
           "its own cold way, seemed to love him back.")


def real_logits(rows: int) -> torch.Tensor | None:
    try:
        from tokenizers import Tokenizer

        import uora_rt
        from uora_rt.models.gguf_import import default_base

        folder = default_base("float32")
        rt = uora_rt.load(folder)
        ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PASSAGE).ids
        with torch.no_grad():
            out = rt.forward(torch.tensor([ids]))
        logits = getattr(out, "logits", out)[0].float()  # [T, V]
    except Exception as e:  # no model on this machine: say so and fall back
        print(f"SmolLM2 logits unavailable ({type(e).__name__}: {e}); using synthetic logits")
        return None
    logits = logits[4:]  # skip the first few positions (almost no context)
    reps = -(-rows // logits.shape[0])
    return logits.repeat(reps, 1)[:rows].contiguous()


def setups(b: int):
    """label -> per-row (temperature, top_k, top_p) and the any_sampled / any_top_p hints."""
    mixed = [(0.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 50, 1.0), (0.7, 0, 0.9), (1.0, 40, 0.95)]
    rows = {"greedy": [(0.0, 0, 1.0)] * b, "temperature 0.7": [(0.7, 0, 1.0)] * b,
            "top_k 50": [(0.7, 50, 1.0)] * b, "top_p 0.9": [(0.7, 0, 0.9)] * b,
            "top_p 0.9, T 1.0": [(1.0, 0, 0.9)] * b,
            "mixed": [mixed[i % len(mixed)] for i in range(b)]}
    for label, r in rows.items():
        yield label, r, label != "greedy", any(p < 1 for _, _, p in r)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def captured(fn):
    """fn captured in a CUDA graph (warm-up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


FIELD_SETUPS = {"greedy": (0.0, 0, 1.0), "temperature 0.7": (0.7, 0, 1.0),
                "top_k 50": (0.7, 50, 1.0)}
HISTORY = 512


def _requests(b, v, state, fields: bool, logprobs: int | None):
    """b fake engine requests (what build_extras reads) with tables opened for processed ones."""
    g = torch.Generator().manual_seed(1)
    reqs = []
    for i in range(b):
        params = SamplingParams(max_tokens=400, logprobs=logprobs, **(dict(
            repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2,
            logit_bias={(97 * j + i) % v: -0.1 for j in range(8)}, min_tokens=300,
            stop_token_ids=[5, 6]) if fields else {}))
        tokens = torch.randint(0, v, (HISTORY,), generator=g).tolist()
        r = SimpleNamespace(params=params, tokens=tokens, prompt_len=400, num_tokens=HISTORY,
                            proc_slot=None, want_logprobs=logprobs is not None,
                            prompt_logprobs=None)
        if params.processed:
            r.proc_slot = state.open(tokens, 400, params, {2} | set(params.stop_token_ids))
        reqs.append(r)
    return reqs


def field_runs(logits, dev, sync, repeats, records, where, source):
    """The OpenAI fields against the sampler alone, per batch and sampling setup."""
    b, v = logits.shape
    sampler = Sampler(dev)
    state = ProcessorState(v, 1024, dev)
    states = {state.path: state}
    if state.path == "cpp":  # the torch ops (what CUDA runs) timed beside the C++ op
        states["torch"] = ProcessorState(v, 1024, dev, path="torch")
    for label, (t, k, p) in FIELD_SETUPS.items():
        st = SamplingTensors.from_lists([t] * b, [k] * b, [p] * b, range(7, 7 + b), [112] * b,
                                        dev)
        sampled = t > 0
        metas = {}
        setups = [("step, no fields", False, None, state), ("+ fields", True, None, state),
                  ("+ logprobs 5", False, 5, state), ("+ fields + logprobs 5", True, 5, state)]
        if "torch" in states and state.path != "torch":
            setups.append(("+ fields, torch ops", True, None, states["torch"]))
        for name, fields, lp, sto in setups:
            reqs = _requests(b, v, sto, fields, lp)
            metas[name] = (sto, SimpleNamespace(sampled=reqs, sampling=st, any_sampled=sampled,
                                                any_top_p=False,
                                                extras=build_extras(reqs, [], dev)))
        runs = {"sampler alone": lambda: sampler(logits, st, sampled, False)}
        for name, (sto, meta) in metas.items():
            runs[name] = lambda sto=sto, meta=meta: sample_step(sampler, sto, logits, meta)
        runs = {n: (lambda fn=fn: (fn(), sync())) for n, fn in runs.items()}
        times = common.interleaved_medians(runs, repeats=repeats, warmup=2)
        base = times["sampler alone"]
        for name, sec in times.items():
            records.append({"batch": b, "vocab": v, "setup": f"{label}: {name}", "seconds": sec,
                            "vs_sampler": sec / base, "logits": source, "device": where})
            print(f"{b:5d}  {label + ': ' + name:40} {sec * 1e3:8.3f} {sec / base:9.2f}x")
    plain = _requests(64, v, state, False, None)
    host = common.interleaved_medians({"x": lambda: build_extras(plain, [], dev)},
                                      repeats=repeats, warmup=2)["x"]
    records.append({"batch": 64, "vocab": v, "setup": "host: extras of 64 plain rows",
                    "seconds": host, "logits": source, "device": where})
    print(f"   64  {'host: extras of 64 plain rows':40} {host * 1e6:8.1f} us")
def compare_setups(b: int):
    """label -> (per-row (temperature, top_k, top_p), flat logits?)."""
    mixed = [(0.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 50, 1.0), (0.7, 0, 0.9), (1.0, 40, 0.95)]
    one = {"greedy": (0.0, 0, 1.0), "temperature 0.7": (0.7, 0, 1.0), "top_p 0.9": (0.7, 0, 0.9),
           "top_k 50": (0.7, 50, 1.0), "top_k 2000": (0.7, 2000, 1.0)}
    out = {label: ([row] * b, False) for label, row in one.items()}
    out["mixed"] = ([mixed[i % len(mixed)] for i in range(b)], False)
    out["flat, top_p 0.99"] = ([(1.0, 0, 0.99)] * b, True)
    return out


def graph_call(s: Sampler, x, st, any_sampled: bool, pool):
    """draw captured in a CUDA graph; the returned fn replays it and runs finish, as the engine's
    decode steps do."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        s.draw(x, st, any_sampled)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = s.draw(x, st, any_sampled)
    return lambda: (graph.replay(), s.finish(x, out, st))


def compare(args, dev) -> None:
    repeats = args.repeats or (21 if dev.type == "cuda" else 5)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    paths = ("full_sort", "device") + (("cpu",) if dev.type == "cpu" else ())
    samplers = {p: Sampler(dev, path=p) for p in paths}
    where = f"{cpu_model()}, {torch.get_num_threads()} threads" if dev.type == "cpu" else \
        torch.cuda.get_device_name()
    print(f"sampler paths, {where}, synthetic logits, median of {repeats} (round-robin)")
    print(f"{'V':>6} {'batch':>5}  {'setup':18} {'path':15} {'ms':>9} {'vs full sort':>12} "
          f"{'fallback rows':>13}")
    records = []
    for v in CMP_VOCABS:
        gen = torch.Generator().manual_seed(v)
        peaked = (torch.randn(max(CMP_BATCHES), v, generator=gen) * 3.5).to(dev)
        flat = (torch.randn(max(CMP_BATCHES), v, generator=gen) * 0.3).to(dev)
        for b in CMP_BATCHES:
            pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
            runs, redo = {("argmax", "-"): lambda x=peaked[:b]: x.argmax(-1)}, {}
            for label, (rows, is_flat) in compare_setups(b).items():
                x = (flat if is_flat else peaked)[:b].contiguous()
                t, k, p = zip(*rows)
                st = SamplingTensors.from_lists(t, k, p, range(7, 7 + b), [3] * b, dev)
                sampled = label != "greedy"
                for name, s in samplers.items():
                    runs[label, name] = (lambda s=s, x=x, st=st, a=sampled:
                                         s.finish(x, s.draw(x, st, a), st))
                    redo[label, name] = int((s.draw(x, st, sampled) == REDO).sum())
                    if dev.type == "cuda":
                        runs[label, f"{name}, graph"] = graph_call(s, x, st, sampled, pool)
                        redo[label, f"{name}, graph"] = redo[label, name]
            runs = {key: (lambda fn=fn: (fn(), sync())) for key, fn in runs.items()}
            times = common.interleaved_medians(runs, repeats=repeats, warmup=1)
            for (label, name), sec in times.items():
                base_key = (label, "full_sort, graph" if name.endswith("graph") else "full_sort")
                ratio = sec / times[base_key] if base_key in times else None
                rec = {"vocab": v, "batch": b, "setup": label, "path": name, "seconds": sec,
                       "vs_full_sort": ratio, "fallback_rows": redo.get((label, name), 0),
                       "logits": "synthetic", "device": where}
                records.append(rec)
                r = f"{ratio:11.3f}x" if ratio is not None else f"{'':12}"
                print(f"{v:6d} {b:5d}  {label:18} {name:15} {sec * 1e3:9.3f} {r} "
                      f"{rec['fallback_rows']:13d}")
            del runs, pool
    common.write(f"sampler_paths_{dev.type}", records)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, help="default 21 (--compare on the CPU: 5)")
    ap.add_argument("--compare", action="store_true",
                    help="the device path's window against the full sort (see the docstring)")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--logits", help="a saved [B, V] float32 tensor (torch.save)")
    ap.add_argument("--save-logits", help="save the logits used here to this file")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--fields-only", action="store_true",
                    help="only the OpenAI-field setups (results in sampler_fields_DEVICE.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        return compare(args, torch.device(args.device))
    args.repeats = args.repeats or 21
    if args.logits:
        all_logits, source = torch.load(args.logits).float(), f"file {Path(args.logits).name}"
    else:
        all_logits = None if args.synthetic else real_logits(max(BATCHES))
        source = "smollm2" if all_logits is not None else "synthetic"
    if all_logits is None:
        all_logits = torch.randn(max(BATCHES), V, generator=torch.Generator().manual_seed(0)) * 3.5
    if args.save_logits:
        torch.save(all_logits, args.save_logits)
    dev = torch.device(args.device)
    all_logits = all_logits.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    windowed, full_sort = Sampler(dev), Sampler(dev, path="full_sort")
    records = []
    where = f"{cpu_model()}, {torch.get_num_threads()} threads" if dev.type == "cpu" else \
        torch.cuda.get_device_name()
    print(f"sampler, {where}, V={all_logits.shape[1]}, logits: {source}")
    if args.fields_only:
        records = []
        print(f"{'batch':>5}  {'setup':40} {'ms':>8} {'vs sampler alone':>10}")
        for b in BATCHES:
            field_runs(all_logits[:b].contiguous(), dev, sync, args.repeats, records, where,
                       source)
        common.write(f"sampler_fields_{dev.type}", records)
        return
    print(f"{'batch':>5}  {'setup':24} {'ms':>8} {'vs argmax':>10}")
    for b in BATCHES:
        logits = all_logits[:b].contiguous()
        runs = {"argmax": lambda: logits.argmax(-1)}
        for label, rows, any_sampled, any_top_p in setups(b):
            t, k, p = zip(*rows)
            st = SamplingTensors.from_lists(t, k, p, range(7, 7 + b), [3] * b, dev)
            runs[label] = lambda st=st, a=any_sampled, q=any_top_p: windowed(logits, st, a, q)
            if label == "top_p 0.9" and dev.type == "cpu":
                runs["top_p 0.9, full sort"] = lambda st=st: full_sort(logits, st)
            if label == "mixed" and dev.type == "cuda":
                runs["mixed, CUDA graph replay"] = captured(lambda st=st: windowed.draw(logits, st))
        cols = [[0.7] * b, [0] * b, [0.9] * b, list(range(b)), [5] * b]
        runs["from_lists"] = lambda cols=cols: SamplingTensors.from_lists(*cols, device=dev)
        runs = {label: (lambda fn=fn: (fn(), sync())) for label, fn in runs.items()}
        times = common.interleaved_medians(runs, repeats=args.repeats, warmup=2)
        base = times["argmax"]
        for label, sec in times.items():
            records.append({"batch": b, "vocab": logits.shape[1], "setup": label,
                            "seconds": sec, "vs_argmax": sec / base, "logits": source,
                            "device": where})
            print(f"{b:5d}  {label:24} {sec * 1e3:8.3f} {sec / base:9.2f}x")
    common.write(f"sampler_{dev.type}", records)


if __name__ == "__main__":
    main()
