#!/usr/bin/env bash
# Device run 1: build on the H200, GPU tests, end-to-end benchmark. Outputs under $OUT.
set -uo pipefail
export CUDA_HOME=/usr/local/cuda PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
mkdir -p /root/smol && cp .carry/smol1/part00 /root/smol/ 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
{ time python3 -m pip install --no-build-isolation --no-deps -e . ; } > $OUT/build.log 2>&1
grep -E "uora_rt:|Successfully|error|real" $OUT/build.log | head
python3 -c "import uora_rt, torch; print(uora_rt.build_info(), torch.__version__)"
OMP_NUM_THREADS=2 timeout 300 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_cuda_ops.py tests/test_gpu_runtime.py tests/test_group_op.py tests/test_reinit.py tests/test_runtime.py tests/test_training.py tests/test_projections.py tests/test_convert_vera_draw.py tests/test_cuda_compile.py > $OUT/gpu_tests.log 2>&1; tail -15 $OUT/gpu_tests.log
timeout 330 python3 bench/bench_e2e_gpu.py > $OUT/e2e.log 2>&1; tail -40 $OUT/e2e.log
cp bench/results/e2e_gpu.json $OUT/ 2>/dev/null; true
