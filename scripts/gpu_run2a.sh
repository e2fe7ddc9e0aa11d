#!/usr/bin/env bash
# Device run 2a: keep the first half of the SmolLM2 GGUF on the machine, rebuild, probe a crash.
set -uo pipefail
export CUDA_HOME=/usr/local/cuda PYTHONUNBUFFERED=1
mkdir -p /root/smol && cp .carry/smol1/part00 /root/smol/
python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; tail -1 $OUT/build.log
python3 -X faulthandler scripts/segv_repro.py 2>&1 | head -30
cuda-gdb -batch -ex run -ex bt --args python3 scripts/segv_repro.py 2>&1 | grep -E "^#|signal|Program" | head -40 > $OUT/bt.log; cat $OUT/bt.log
