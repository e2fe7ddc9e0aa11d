"""Projection family build time on the CPU (issue goal: <= 1 s for r 256 at 11008 x 4096).

python bench/bench_projections.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from uora_rt import projections  # noqa: E402
from uora_rt.core.projections import clear_cache  # noqa: E402

FAMILIES = [(256, 4096, 4096), (256, 4096, 11008), (1024, 4096, 11008)]


def main():
    records = []
    for r, max_in, max_out in FAMILIES:
        times = []
        for rep in range(3):
            clear_cache()
            t = time.perf_counter()
            projections(rep, r, max_in, max_out)
            times.append(time.perf_counter() - t)
        best, med = min(times), sorted(times)[1]
        records.append({"r": r, "max_in": max_in, "max_out": max_out, "median_s": med,
                        "best_s": best})
        print(f"r {r:5d}  {max_out:5d} x {max_in:5d}   median {med:6.3f} s   best {best:6.3f} s")
    common.write("projections_cpu", records)


if __name__ == "__main__":
    main()
