#!/usr/bin/env bash
# README command 2: install (if needed) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
${PYTHON:-python3} -m pytest -q "$@"
