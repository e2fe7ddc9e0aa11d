#!/usr/bin/env bash
# The quality study on one GPU machine whose calls last at most ~10 minutes each and carry at
# most ~64 MB each: assets arrive over several calls and are kept outside the work tree, runs
# go on in the background between calls, runs already done are skipped.
#
#   bash bench/quality/gpu_grid.sh stash       # keep this call's carried assets (every call)
#   bash bench/quality/gpu_grid.sh start       # build, then the GLUE grid (pilot, confirm, main,
#                                              # ablation: SST-2 and CoLA in one queue, MRPC and
#                                              # STS-B in another; then the rank sweep)
#   bash bench/quality/gpu_grid.sh start-rest  # the same, once pilot and confirm are done: the
#                                              # main, ablation and rank runs left, all at once
#   bash bench/quality/gpu_grid.sh start-e2e   # the E2E pilot and runs on SmolLM2
#   bash bench/quality/gpu_grid.sh wait 540    # sleep until the queues end (at most 540 s), then
#                                              # pack the results so far into $OUT
#
# Assets (CARRY, default .gpucarry, as carried by the call) are copied into ASSETS (default
# /tmp/uora-assets), which later calls find whatever they carry; a folder named merge-* is merged
# into ASSETS' root (so a file too large for one call can come in parts over two calls).
#   minilm/        all-MiniLM-L6-v2 as a Hugging Face folder (float16 weights are enough)
#   data/glue/, data/e2e/   the data folder's tasks
#   wheels/        pyzmq and msgspec; e2e-wheels/: rouge-score and what it needs
#   smollm2.gguf.part-00, -01 and smollm2.gguf.sha256: SmolLM2-135M-Instruct's GGUF in two parts
# Runs already done under RESULTS, or carried in SEED_RESULTS from an earlier machine, are skipped.
set -euo pipefail
CARRY=${GPU_ASSETS:-.gpucarry}
ASSETS=${ASSETS:-/tmp/uora-assets}
RESULTS=${RESULTS:-/tmp/quality}
SEED_RESULTS=${SEED_RESULTS:-bench/results/quality}
OUT=${OUT:-/tmp/quality-out}
DEVICE=${DEVICE:-cuda} BUDGET=${BUDGET:-gpu}  # (cpu and tiny: to try the script on a laptop)
export UORA_RT_MINILM_DIR="$ASSETS/minilm" TOKENIZERS_PARALLELISM=false

stash() {
  mkdir -p "$ASSETS"
  [ -d "$CARRY" ] || return 0
  for d in "$CARRY"/*; do
    case "$(basename "$d")" in
      merge-*) cp -rn "$d"/. "$ASSETS"/ ;;
      *) cp -rn "$d" "$ASSETS"/ ;;
    esac
  done
  local g="$ASSETS/smollm2.gguf"
  if [ ! -f "$g" ] && [ -f "$g.part-00" ] && [ -f "$g.part-01" ] && [ -f "$g.sha256" ]; then
    cat "$g.part-00" "$g.part-01" > "$g.tmp"
    if [ "$(sha256sum "$g.tmp" | cut -d' ' -f1)" = "$(cat "$g.sha256")" ]; then
      mv "$g.tmp" "$g" && echo "SmolLM2's GGUF joined and checked"
    else
      rm -f "$g.tmp"; echo "SmolLM2's GGUF parts do not match its checksum" >&2; exit 1
    fi
  fi
}

grid() {  # grid LOG STAGES ONLY JOBS [more run_grid.py arguments]
  local log=$1 stages=$2 only=$3 jobs=$4; shift 4
  python3 bench/quality/run_grid.py --device "$DEVICE" --budget "$BUDGET" --data "$ASSETS/data" \
    --results "$RESULTS" --stages "$stages" --only "$only" --jobs "$jobs" "$@" \
    >> "$RESULTS/$log" 2>&1 || true
}

prepare() {  # result folders, seeded with the runs done on earlier machines
  mkdir -p "$RESULTS" "$OUT"
  if [ -d "$SEED_RESULTS/$BUDGET" ]; then cp -rn "$SEED_RESULTS/$BUDGET" "$RESULTS/" || true; fi
}

background() {  # background NAME SCRIPT: runs SCRIPT in its own session; RESULTS/running-NAME
  touch "$RESULTS/running-$1"  # lives while it runs
  export -f grid; export ASSETS RESULTS DEVICE BUDGET
  setsid nohup bash -c "$2; rm -f '$RESULTS/running-$1'" > "$RESULTS/driver-$1.log" 2>&1 \
    < /dev/null &
}

case "${1:?stash|start|start-rest|start-e2e|wait}" in
  stash) stash ;;
  start|start-rest)
    stash
    prepare
    bash bench/gpu_round.sh build > "$OUT/build.txt" 2>&1
    if [ "$1" = start ]; then
      background glue '
        grid first.log pilot,confirm,main,ablation "task=sst2,cola" 8 --no-e2e &
        grid others.log pilot,confirm,main,ablation "task=stsb,mrpc" 7 --no-e2e
        wait
        grid rank.log rank "task=sst2,cola" 15 --no-e2e'
    else  # the pilot and confirm stages done: every later GLUE stage's runs at once
      background glue '
        grid main.log main "task=sst2,cola,stsb,mrpc" 4 --no-e2e &
        grid ablation.log ablation "task=sst2,cola,stsb,mrpc" 6 --no-e2e &
        grid rank.log rank "task=sst2,cola" 12 --no-e2e
        wait'
    fi
    echo "GLUE ($1) started; results under $RESULTS" ;;
  start-e2e)
    stash
    [ -f "$ASSETS/smollm2.gguf" ] || { echo "no $ASSETS/smollm2.gguf: carry its parts" >&2; exit 2; }
    prepare
    if ! python3 -c 'import rouge_score' 2>/dev/null; then
      python3 -m pip install -q --no-deps --no-index --target /tmp/e2e-site "$ASSETS"/e2e-wheels/*.whl
    fi
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/e2e-site
    export UORA_RT_SMOLLM2_GGUF="$ASSETS/smollm2.gguf" UORA_RT_CACHE=/tmp/uora-cache
    # the float32 copy of the GGUF once, before the runs that would each make it
    python3 -c 'from uora_rt.models.gguf_import import default_base; print(default_base())'
    background e2e 'grid e2e.log pilot,e2e "task=e2e" 10'
    echo "E2E started; results under $RESULTS" ;;
  wait)
    end=$((SECONDS + ${2:-540}))
    while [ $SECONDS -lt $end ] && compgen -G "$RESULTS/running-*" > /dev/null; do sleep 5; done
    mkdir -p "$OUT"
    # one file: $OUT keeps no deep folders
    tar czf "$OUT/quality_$BUDGET.tgz" -C "$RESULTS" "$BUDGET" || true
    tail -n 25 "$RESULTS"/*.log > "$OUT/grid_tail.txt" 2>/dev/null || true
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> "$OUT/grid_tail.txt" || true
    ls "$RESULTS" | grep '^running-' || echo "all queues ended"
    find "$RESULTS/$BUDGET" -name '*.json' | wc -l ;;
  *) echo "unknown part: $1" >&2; exit 2 ;;
esac
