#!/usr/bin/env bash
# README command 2: install (if needed) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The import layers of pyproject.toml ([tool.importlinter]) before the tests.
${PYTHON:-python3} -c 'from importlinter.cli import lint_imports_command as c; c(["--no-cache"])' \
  | tail -n 3
${PYTHON:-python3} -m pytest -q "$@"
