#!/usr/bin/env bash
# Device run 2a: keep the first half of the SmolLM2 GGUF on the machine and build. The GGUF
# (98 MB) is over the 64 MiB a call may carry, so 2b must follow within the machine's warm window.
set -uo pipefail
export CUDA_HOME=/usr/local/cuda PYTHONUNBUFFERED=1
mkdir -p /root/smol && cp .carry/smol1/part00 /root/smol/
python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; tail -1 $OUT/build.log
