"""Kernel sandbox for the multi-adapter expand: every version checked against reference.py, then
timed after the base GEMM it follows (the runtime's fused [W; A_cat] GEMM), cold (L2 flushed) and
in a CUDA graph over 8 layers (decode-like). Decides kFusedMaxRows and PDL (NOTES.md).

  v0  plain torch composition of docs/design.md §4 (gather tables, mix, GEMM, scale-add)
  v1  fused kernel (mix prologue, mma.sync over K = R, lambda_b + accumulate epilogue), PDL on
  v2  v1 without programmatic dependent launch
  v3  GEMM route: mix once into z, cuBLAS z B^T, epilogue kernel

python bench/kernels/expand_variants.py [OUT.json] [--quick]   (on the GPU machine)
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import gpu_bench as gb
from uora_rt.kernels import ops, reference

VERSIONS = {"v1": ("fused", True), "v2": ("fused", False), "v3": ("gemm", True)}


def v0_expand(y, u, b_cat, lambda_d, lambda_b, p, slot, modules, offs, y_offs, outs, with_q):
    r = lambda_d.shape[2]
    valid = (slot >= 0)[:, None]
    s = slot.long().clamp(min=0)
    for m, off, yo, out in zip(modules, offs, y_offs, outs):
        ld = lambda_d[s, m].to(u.dtype)
        if with_q:
            pp = p[s].to(u.dtype)
            h = ld * (pp * u[:, :r] + (1 - pp) * u[:, r:2 * r])
            z = torch.cat([pp * h, (1 - pp) * h], 1)
        else:
            z = ld * u[:, :r]
        v = F.linear(z, b_cat[:out, : z.shape[1]].to(u.dtype))
        y[:, yo:yo + out] += (lambda_b[s, off:off + out].to(u.dtype) * valid) * v


def check_versions():
    from conftest import TOL
    from test_group_op import make_case

    worst = {}
    for tokens, kind, with_q in [(1, "distinct", True), (7, "base_rows", False), (64, "zipf", True),
                                 (133, "segment", True)]:
        args = make_case(2049, (2049, 64), 64, 6, tokens, kind, with_q, torch.bfloat16, "cuda")
        want = reference.uora_group(*[a.cpu() if torch.is_tensor(a) else a for a in args])
        y, x, a_cat = args[:3]
        u = (x.float() @ a_cat[:, : x.shape[1]].float().T).to(torch.bfloat16)
        for name in ["v0", *VERSIONS]:
            yy = y.clone()
            if name == "v0":
                v0_expand(yy, u, args[3].to(torch.bfloat16), *args[4:])
            else:
                gb.set_impl(*VERSIONS[name])
                ops.uora_expand_(yy, u, args[3].to(torch.bfloat16), *args[4:])
            atol, rtol = TOL[torch.bfloat16]
            err = ((yy.cpu().float() - want.float()).abs()
                   / (atol + rtol * want.float().abs())).max()
            worst[name] = max(worst.get(name, 0.0), float(err))
    gb.set_impl(None)
    for name, err in worst.items():
        print(f"check {name}: max |err| / tol = {err:.3f} {'OK' if err <= 1 else 'FAIL'}")
    return worst


def run(shapes=((4096, 4096), (4096, 11008)), ranks=(64, 256, 1024),
        tokens=(1, 16, 32, 64, 128, 256, 1024, 4096)):
    rows = []
    for out, inp in shapes:
        for r in ranks:
            for T in tokens:
                L = gb.Layer(out, inp, r, T, True)
                n = L.out
                yext = torch.empty(T, n + L.R, device="cuda", dtype=torch.bfloat16)
                args = (L.b_cat, L.lambda_d, L.lambda_b, L.p, L.slot, [0], [0], [0], [n], True)

                def gemm(L=L, yext=yext, k=n + L.R):
                    torch.matmul(L.x, L.w_ext[:k].t(), out=yext)

                def mk(name, yext=yext, args=args, gemm=gemm, n=n):
                    def f():
                        gemm()
                        if name == "v0":
                            v0_expand(yext[:, :n], yext[:, n:], *args)
                        else:
                            ops.uora_expand_(yext[:, :n], yext[:, n:], *args)
                    return f

                rec = {"out": out, "in": inp, "r": r, "T": T, "gemm_cold": gb.time_cold(gemm)}
                if T >= 1024:  # the GEMM route's cuBLAS part alone: v3 - this = mix + epilogue
                    z = torch.randn(T, L.R, device="cuda", dtype=torch.bfloat16)
                    rec["mm_only_cold"] = gb.time_cold(lambda z=z, L=L: z @ L.b_cat[:, : L.R].t())
                layers = [L] + [copy.copy(L) for _ in range(7)]
                for extra in layers[1:]:
                    extra.w_ext = torch.randn_like(L.w_ext)
                if T <= 256:
                    rec["gemm_graph"] = gb.time_graph(
                        [lambda e=e, k=n + L.R, yext=yext:
                             torch.matmul(e.x, e.w_ext[:k].t(), out=yext)
                         for e in layers])
                for name in ["v0", *VERSIONS]:
                    if name != "v0":
                        gb.set_impl(*VERSIONS[name])
                    rec[f"{name}_cold"] = gb.time_cold(mk(name)) - rec["gemm_cold"]
                    if T <= 256:
                        fns = []
                        for e in layers:
                            def f(e=e, k=n + L.R, n=n, yext=yext, args=args, name=name):
                                torch.matmul(e.x, e.w_ext[:k].t(), out=yext)
                                if name == "v0":
                                    v0_expand(yext[:, :n], yext[:, n:], *args)
                                else:
                                    ops.uora_expand_(yext[:, :n], yext[:, n:], *args)
                            fns.append(f)
                        rec[f"{name}_graph"] = gb.time_graph(fns) - rec["gemm_graph"]
                    gb.set_impl(None)
                rows.append(rec)
                print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in rec.items()), flush=True)
    return rows


def main():
    worst = check_versions()
    if "--quick" in sys.argv:  # decode sizes only: where the fused kernel competes
        rows = run(shapes=((4096, 4096),), tokens=(1, 8, 16, 32, 64))
    else:
        rows = run()
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = Path(paths[0]) if paths else Path("expand_variants.json")
    out.write_text(json.dumps({"check": worst, "rows": rows}, indent=1))
    print("expand cost over the [W; A_cat] GEMM, µs (cold | graph):")
    for r in rows:
        line = f"{r['out']}x{r['in']} r={r['r']:4d} T={r['T']:5d} gemm {r['gemm_cold']:7.1f}"
        if "mm_only_cold" in r:
            line += f" (route-2 cuBLAS alone {r['mm_only_cold']:6.1f})"
        for name in ["v0", *VERSIONS]:
            g = r.get(f"{name}_graph")
            line += f" | {name} {r[name + '_cold']:7.1f}" + (f" {g:6.1f}" if g is not None else "")
        print(line)


if __name__ == "__main__":
    main()
