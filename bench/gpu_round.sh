#!/usr/bin/env bash
# One GPU measurement round, in parts that each fit a 10-minute call:
#
#   bash bench/gpu_round.sh build     # the extension (CUDA), then nothing else
#   bash bench/gpu_round.sh tests     # the whole test suite on the GPU machine
#   bash bench/gpu_round.sh engine    # engine.step vs graph replay, sampled vs greedy, traces
#   bash bench/gpu_round.sh serving   # HTTP server vs offline engine, 64 adapters vs none
#   bash bench/gpu_round.sh extras    # prefix cache, one adapted linear at small T, training
#
# Results go to $OUT (default bench/results/gpu_round). Models without weights on the machine are
# random-weight shapes (7B/8B); training needs GPU_ASSETS (default .gpucarry) holding
#   minilm/       all-MiniLM-L6-v2 as a Hugging Face folder (float16 weights are enough)
#   smol/         SmolLM2-135M-Instruct's config.json and tokenizer files (random weights)
#   data/glue/SST-2/  GLUE SST-2 (train_full.tsv, dev.tsv)
#   wheels/       pyzmq and msgspec wheels, when the machine has no package index
#   server-wheels/  fastapi, uvicorn, openai and what they need (server tests and HTTP benchmarks)
set -euo pipefail
OUT=${OUT:-bench/results/gpu_round}
# what gpu_grid.sh stashed from earlier calls, else what this call carried
ASSETS=${GPU_ASSETS:-$([ -d /tmp/uora-assets ] && echo /tmp/uora-assets || echo .gpucarry)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/server-site

build() {
  if ! $PY -c 'import zmq, msgspec' 2>/dev/null && [ -d "$ASSETS/wheels" ]; then
    $PY -m pip install -q --no-deps --no-index "$ASSETS"/wheels/*.whl  # no network there
  fi
  if ! $PY -c 'import fastapi, uvicorn, openai' 2>/dev/null && [ -d "$ASSETS/server-wheels" ]; then
    # the server stack, beside the image's packages (--target: nothing of the image is replaced)
    $PY -m pip install -q --no-deps --no-index --target /tmp/server-site \
      "$ASSETS"/server-wheels/*.whl
  fi
  if ! $PY -c 'import uora_rt; assert uora_rt.build_info()["cuda"]' 2>/dev/null; then
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} $PY -m pip install -q --no-build-isolation \
      --no-deps -e . > "$OUT/build.log" 2>&1
  fi
  $PY -c 'import uora_rt, json; print(json.dumps(uora_rt.build_info()))' | tee "$OUT/build.json"
}

case "${1:?part: build|tests|engine|serving|extras}" in
  build) build ;;
  tests)
    build
    $PY -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tail -n 40 | tee "$OUT/tests.txt" ;;
  engine)
    build
    $PY bench/bench_engine_gpu.py --budget-s "${BUDGET_S:-480}" --requests 1000 \
      --name engine_gpu_round 2>&1 | tee "$OUT/engine.log"
    cp bench/results/engine_gpu_round*.json "$OUT/" ;;
  serving)
    build
    $PY bench/bench_serving.py gpu --num-requests 300 --input-len 512 --output-len 128 \
      --vocab-size 32000 --rates 10,25,inf --setups base,uniform \
      --name serving_http_gpu_round 2>&1 | tail -n 60 | tee "$OUT/serving.log"
    cp bench/results/serving_http_gpu_round.json "$OUT/" ;;
  extras)
    build
    $PY bench/bench_prefix_cache.py --model llama2-7b --convs 4 --name prefix_cache_gpu 2>&1 \
      | tail -n 30 | tee "$OUT/prefix.log"
    cp bench/results/prefix_cache_gpu.json "$OUT/"
    $PY bench/bench_layer_gpu.py --ranks 256 --tokens 1,16,64 --out "$OUT/layer" 2>&1 \
      | tail -n 20 | tee "$OUT/layer.log"
    # training: a decoder (SmolLM2's shape and tokenizer, random weights) and one GLUE cell
    $PY - "$ASSETS/smol" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
folder = Path(sys.argv[1])
if not (folder / "model.safetensors").exists():  # random weights under transformers' names
    hf = LlamaForCausalLM(LlamaConfig(**json.loads((folder / "config.json").read_text())))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
EOF
    for dev in cuda cpu; do
      $PY -m uora_rt train "$ASSETS/smol" --data bench/train_style/telegram.jsonl \
        --output "$OUT/train-$dev.uora" --max-steps 20 --device $dev --no-plot --quiet 2>&1 \
        | tail -n 3 | tee "$OUT/train-$dev.log"
    done
    if [ ! -d "$ASSETS/data/glue/SST-2" ] || [ ! -d "$ASSETS/minilm" ]; then
      echo "no SST-2 or MiniLM under $ASSETS: the GLUE cell is skipped"; exit 0
    fi
    UORA_RT_MINILM_DIR="$ASSETS/minilm" UORA_STUDY_DATA="$ASSETS/data" $PY \
      bench/quality/run_chunk.py '{"stage": "main", "task": "sst2", "method": "uora", "r": 256,
      "seed": 0, "lr": 0.03, "head_lr": 0.001, "budget": "cpu", "device": "cuda"}' \
      --out "$OUT/quality_sst2_uora_s0.json" 2>&1 | tail -n 5 ;;
  *) echo "unknown part: $1" >&2; exit 2 ;;
esac
