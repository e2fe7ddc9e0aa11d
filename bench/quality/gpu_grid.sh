#!/usr/bin/env bash
# The GLUE grid on one GPU machine whose calls last at most ~10 minutes: `start` builds the
# extension and starts the grid in its own process session (it runs on between calls), `wait`
# waits and copies what has finished so far; runs already done (under RESULTS, or carried in
# SEED_RESULTS from an earlier machine) are skipped.
#
#   bash bench/quality/gpu_grid.sh start       # build, then start (pilot, confirm, main, ablation):
#                                              # SST-2 and CoLA in one queue,
#                                              # MRPC and STS-B in another, then the rank sweep
#   bash bench/quality/gpu_grid.sh wait 540    # sleep, then copy results so far to $OUT
#
# Every call must carry the same asset folders: a call that carries none removes them from the
# machine, and the runs still going fail on missing files.
# Needs GPU_ASSETS (default .gpucarry) with minilm/ (all-MiniLM-L6-v2, a Hugging Face folder) and
# data/glue/ (the GLUE task folders); no network, no E2E (SmolLM2's weights are not there).
set -euo pipefail
ASSETS=$(realpath "${GPU_ASSETS:-.gpucarry}")
RESULTS=${RESULTS:-/tmp/quality}
SEED_RESULTS=${SEED_RESULTS:-bench/results/quality}
OUT=${OUT:-/tmp/quality-out}
export UORA_RT_MINILM_DIR="$ASSETS/minilm" TOKENIZERS_PARALLELISM=false

grid() {  # grid LOG STAGES ONLY JOBS
  python3 bench/quality/run_grid.py --device cuda --budget gpu --no-e2e --data "$ASSETS/data" \
    --results "$RESULTS" --stages "$2" --only "$3" --jobs "$4" >> "$RESULTS/$1" 2>&1 || true
}

case "${1:?start|wait}" in
  start)
    mkdir -p "$RESULTS" "$OUT"
    [ -d "$SEED_RESULTS/gpu" ] && cp -rn "$SEED_RESULTS/gpu" "$RESULTS/"
    bash bench/gpu_round.sh build > "$OUT/build.txt" 2>&1
    export -f grid; export ASSETS RESULTS
    setsid nohup bash -c '
      grid first.log pilot,confirm,main,ablation "task=sst2,cola" 8 &
      grid others.log pilot,confirm,main,ablation "task=stsb,mrpc" 7
      wait
      grid rank.log rank "task=sst2,cola" 15
      echo done > "$RESULTS/finished"' > "$RESULTS/driver.log" 2>&1 < /dev/null &
    echo "started; results under $RESULTS" ;;
  wait)
    end=$((SECONDS + ${2:-540}))
    while [ $SECONDS -lt $end ] && [ ! -f "$RESULTS/finished" ]; do sleep 5; done
    mkdir -p "$OUT"
    tar czf "$OUT/quality_gpu.tgz" -C "$RESULTS" gpu || true  # one file: $OUT keeps no deep folders
    tail -n 25 "$RESULTS"/*.log > "$OUT/grid_tail.txt" 2>/dev/null || true
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> "$OUT/grid_tail.txt"
    find "$RESULTS/gpu" -name '*.json' | wc -l ;;
  *) echo "unknown part: $1" >&2; exit 2 ;;
esac
