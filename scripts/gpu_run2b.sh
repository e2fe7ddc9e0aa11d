#!/usr/bin/env bash
# Device run 2b: assemble the GGUF, SmolLM2 on the GPU vs transformers + PEFT, GPU test sweep.
set -uo pipefail
export CUDA_HOME=/usr/local/cuda PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
cat /root/smol/part00 .carry/smol2/part01 > /root/smol/smollm2.gguf && sha256sum /root/smol/smollm2.gguf | cut -c1-16
export UORA_RT_SMOLLM2_GGUF=/root/smol/smollm2.gguf UORA_RT_CACHE=/root/uora_cache
ls build >/dev/null 2>&1 || python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_runtime.py -x 2>&1 | tail -8 | tee $OUT/gpu_runtime.log
OMP_NUM_THREADS=2 timeout 240 python3 -m pytest -q -n 8 --timeout 120 -p no:cacheprovider tests/test_cuda_ops.py tests/test_group_op.py tests/test_reinit.py tests/test_runtime.py tests/test_training.py tests/test_projections.py tests/test_convert_vera_draw.py tests/test_cuda_compile.py > $OUT/gpu_tests.log 2>&1; grep -E "passed|failed|Timeout|Error" $OUT/gpu_tests.log | tail -12
