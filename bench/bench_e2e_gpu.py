"""End-to-end GPU benchmark (issue 5 §5b, §5c) on a Llama-2-7B-shaped model with random weights.

  decode step (CUDA graph, KV context 512) at batch 1/16/64/256 with 1/16/64/batch distinct
  UORA adapters (r=256 on q/v) vs no adapters vs the byte floor; transformers base and PEFT LoRA
  r=16 mixed batches (`adapter_names`) with the same shapes; prefill of 8 x 512 tokens;
  scale: decode throughput with 10 / 1,000 / 100,000 registered adapters, and the time from an
  adapter file to servable.

python bench/bench_e2e_gpu.py [--quick]     (needs a CUDA GPU; ~5 min on an H200)
"""

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402

import uora_rt  # noqa: E402
from uora_rt import format as fmt  # noqa: E402
from uora_rt.projections import ALGORITHM, ProjectionSpec  # noqa: E402

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
              hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
CTX, R = 512, 256


def cuda_time(fn, iters):
    """Median ms per call over `iters` calls, CUDA events, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def ceilings():
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x), 10)
    bw = 2 * x.numel() / (ms / 1e3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms_mm = cuda_time(lambda: a @ a, 10)
    return bw, 2 * 8192**3 / (ms_mm / 1e3)


def random_adapter(seed, r=R, targets=("q_proj", "v_proj"), layers=32, hidden=4096):
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.self_attn.{t}" for i in range(layers) for t in targets]
    return fmt.Adapter(
        projection=ProjectionSpec(ALGORITHM, 0, r, hidden, hidden), targets=names,
        lambda_b={n: torch.randn(hidden, generator=g) * 0.01 for n in names},
        lambda_d={n: torch.randn(r, generator=g) * 0.1 for n in names},
        p=torch.ones(r), count=torch.zeros(r, dtype=torch.int32),
        base={"architecture": "LlamaForCausalLM", "modules": {n: [hidden, hidden] for n in names}})


def decode_ms(rt, batch, names, steps=20):
    """Median device ms of one graph-replayed decode step after a CTX-token prefill."""
    dev = rt.device
    ids = torch.randint(0, 32000, (batch, CTX), device=dev)
    valid = torch.ones(batch, CTX, dtype=torch.bool, device=dev)
    hook = rt.pool.batch(names, valid) if any(n is not None for n in names) else None
    try:
        dec = rt.decoders.get(rt, batch, CTX + steps + 8, hook, graph=True)
        dec.cache.length = 0
        pos = torch.arange(CTX, device=dev)[None].expand(batch, -1)
        logits = rt.model(ids, pos, valid, dec.cache, hook, last_only=True)[:, -1]
        dec.start(valid, pos[:, -1], hook)
        nxt = logits.argmax(-1)
        return cuda_time(lambda: dec.step(nxt), steps), dec.capacity
    finally:
        if hook is not None:
            hook.close()


def prefill_ms(fn):
    return cuda_time(fn, 5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes (smoke run)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw, flops = ceilings()
    print(f"ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    records = [{"kind": "ceilings", "copy_TBps": bw / 1e12, "bf16_TFLOPs": flops / 1e12}]
    batches = (1, 64) if args.quick else (1, 16, 64, 256)

    rt = uora_rt.Runtime.random(CONFIG, device="cuda", dtype=torch.bfloat16, slots=256)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in rt.model.named_parameters()
                       if not n.startswith("embed"))
    for i in range(64):
        rt.add_adapter(random_adapter(i), name=f"a{i}")
    print(f"\n{'batch':>5} {'distinct':>8} {'step ms':>8} {'tok/s':>9} {'vs none':>8} {'floor ms':>8}")
    for b in batches:
        base_ms, cap = decode_ms(rt, b, [None] * b)
        kv_bytes = b * 32 * 2 * 4096 * (CTX + 10) * 2  # the context actually attended (mid-run)
        floor = (weight_bytes + kv_bytes) / bw * 1e3
        records.append({"kind": "decode", "impl": "uora_rt", "batch": b, "distinct": 0,
                        "step_ms": base_ms, "tokens_per_s": b / base_ms * 1e3,
                        "floor_ms": floor, "kv_capacity": cap})
        print(f"{b:5d} {0:8d} {base_ms:8.2f} {b / base_ms * 1e3:9.0f} {1:8.3f} {floor:8.2f}")
        for d in sorted({1, 16, 64, b}):
            if d > b or d > 64:
                continue
            ms, _ = decode_ms(rt, b, [f"a{i % d}" for i in range(b)])
            records.append({"kind": "decode", "impl": "uora_rt", "batch": b, "distinct": d,
                            "step_ms": ms, "tokens_per_s": b / ms * 1e3, "vs_none": ms / base_ms,
                            "floor_ms": floor})
            print(f"{b:5d} {d:8d} {ms:8.2f} {b / ms * 1e3:9.0f} {ms / base_ms:8.3f} {floor:8.2f}")
        rt.decoders.items.clear()
        torch.cuda.empty_cache()
        common.write("e2e_gpu", records)  # partial results survive a later failure

    ids = torch.randint(0, 32000, (8, CTX), device="cuda")
    valid = torch.ones(8, CTX, dtype=torch.bool, device="cuda")
    pos = torch.arange(CTX, device="cuda")[None].expand(8, -1)

    def ours_prefill(names):
        hook = rt.pool.batch(names, valid)
        try:
            rt.model(ids, pos, valid, rt.model.new_cache(8, CTX), hook, last_only=True)
        finally:
            if hook is not None:
                hook.close()

    for label, names in (("uora_rt, no adapters", [None] * 8),
                         ("uora_rt, 8 distinct adapters", [f"a{i}" for i in range(8)])):
        ms = prefill_ms(lambda names=names: ours_prefill(names))
        records.append({"kind": "prefill", "impl": label, "batch": 8, "length": CTX, "ms": ms})
        print(f"prefill 8x{CTX}: {label:32} {ms:8.2f} ms")

    # --- scale: registered adapters ------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.uora"
        fmt.save(random_adapter(999), path)
        times = []
        for k in range(20):
            t = time.perf_counter()
            rt.add_adapter(path, name=f"file{k}")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        load_ms = sorted(times)[10] * 1e3
    records.append({"kind": "file_to_servable", "ms": load_ms, "bytes": path.stat().st_size
                    if path.exists() else None})
    print(f"adapter file (7B q/v, r={R}) to servable: {load_ms:.2f} ms (median of 20)")
    rt = None  # free the 7B model before the scale runs allocate theirs
    gc.collect()
    torch.cuda.empty_cache()
    for registered in (10, 1000) if args.quick else (10, 1000, 100_000):
        rs = uora_rt.Runtime.random(CONFIG, device="cuda", dtype=torch.bfloat16,
                                    slots=registered + 8)
        distinct = [random_adapter(i, targets=("q_proj",)) for i in range(min(registered, 64))]
        t = time.perf_counter()
        for i in range(registered):
            rs.add_adapter(distinct[i % len(distinct)], name=f"s{i}")
        reg_s = time.perf_counter() - t
        ms, _ = decode_ms(rs, 64, [f"s{(i * 7919) % registered}" for i in range(64)])
        records.append({"kind": "scale", "registered": registered, "step_ms": ms,
                        "tokens_per_s": 64 / ms * 1e3, "register_s": reg_s})
        print(f"{registered:7d} registered: decode b64 {ms:.2f} ms/step ({64 / ms * 1e3:.0f} tok/s); "
              f"registering took {reg_s:.1f} s")
        del rs
        gc.collect()
        torch.cuda.empty_cache()
        common.write("e2e_gpu", records)

    baselines(records, batches, ids)
    common.write("e2e_gpu", records)


def baselines(records, batches, prefill_ids):
    """transformers base and PEFT LoRA r=16 mixed batches on the same shapes (random weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "architectures"})
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    lcfg = dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(model, LoraConfig(**lcfg), adapter_name="l0")
    for i in range(1, 64):
        peft.add_adapter(f"l{i}", LoraConfig(**lcfg))
    peft.eval()

    def gen_ms(b, names, new):
        ids = torch.randint(0, 32000, (b, CTX), device="cuda")
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  attention_mask=torch.ones_like(ids))
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            if names is None:
                with peft.disable_adapter():
                    peft.generate(input_ids=ids, **kw)
            else:
                peft.generate(input_ids=ids, adapter_names=names, **kw)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    for b in batches:
        for label, names in (("transformers base", None),
                             ("PEFT LoRA r16, 64 distinct" if b >= 64 else f"PEFT LoRA r16, {b} distinct",
                              [f"l{i % 64}" for i in range(b)])):
            steps = 8 if names is None else 4
            try:
                gen_ms(b, names, 2)  # warm-up
                ms = (gen_ms(b, names, steps + 1) - gen_ms(b, names, 1)) / steps
            except torch.OutOfMemoryError:
                print(f"{label} batch {b}: out of memory")
                continue
            records.append({"kind": "decode", "impl": label, "batch": b, "step_ms": ms,
                            "tokens_per_s": b / ms * 1e3})
            print(f"{label:28} batch {b:3d}: {ms:8.2f} ms/step ({b / ms * 1e3:7.0f} tok/s)")
            torch.cuda.empty_cache()
    for label, names in (("transformers base", None), ("PEFT LoRA r16, 8 distinct",
                                                        [f"l{i}" for i in range(8)])):
        def run(names=names):
            with torch.no_grad():
                if names is None:
                    with peft.disable_adapter():
                        peft(input_ids=prefill_ids)
                else:
                    peft(input_ids=prefill_ids, adapter_names=names)
        ms = prefill_ms(run)
        records.append({"kind": "prefill", "impl": label, "batch": 8, "length": CTX, "ms": ms})
        print(f"prefill 8x{CTX}: {label:32} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
