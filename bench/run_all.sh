#!/usr/bin/env bash
# Every benchmark, one after the other (they must not share the 2 cores), refreshing bench/results/.
#
#   bash bench/run_all.sh            # ~100 min on this 2-core machine
#   bash bench/run_all.sh --quick    # each benchmark's quick mode, to try the scripts (~15 min)
#
# Needs ./.venv (bash setup.sh). The rollout benchmark (HF vs vLLM engine) runs when ./.venv-vllm
# exists (bash setup.sh --vllm) and is skipped otherwise, with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
run() { echo; echo "=== $* ($(date +%H:%M:%S))"; "$@"; }
if [ "$QUICK" = 1 ]; then
  run $PY bench/bench_losses.py --positions 1024 --vocab 8192 --out /tmp/protege_quick_losses.md
  run $PY bench/bench_server.py --duration 0.5 --out /tmp/protege_quick_server.md
  run $PY bench/bench_quality.py --quick --out /tmp/protege_quick_quality.md
  run $PY bench/bench_vs_trl.py --quick --out /tmp/protege_quick_vs_trl.md
  run $PY bench/bench_threads.py --layers 1 --tokens 8 --reps 1 --out /tmp/protege_quick_threads.md
  run $PY bench/bench_server_memory.py --requests 1 --out /tmp/protege_quick_server_memory.md
  run $PY bench/bench_optimizer.py --steps 1 --out /tmp/protege_quick_optimizer.md
  [ -x .venv-vllm/bin/python ] && run .venv-vllm/bin/python bench/bench_rollout.py --prompts 8 --new-tokens 32 \
    --out /tmp/protege_quick_rollout.md
  echo "quick mode: results in /tmp/protege_quick_*.md (bench/results/ untouched)"
  exit 0
fi
run $PY bench/bench_losses.py
run $PY bench/bench_server.py
run $PY bench/bench_quality.py
run $PY bench/bench_vs_trl.py
run $PY bench/bench_vs_trl.py --reps 1 --no-profile --budget-min 20 --out bench/results/vs_trl_memory.md \
  --extras "protege gc chunk128,protege gc chunk256,protege unfused"
run $PY bench/bench_threads.py
run $PY bench/bench_server_memory.py
run $PY bench/bench_optimizer.py
if [ -x .venv-vllm/bin/python ]; then
  run .venv-vllm/bin/python bench/bench_rollout.py --prompts 32 --new-tokens 64 --reps 2 --threads 1
else
  echo "skipped bench_rollout.py (HF vs vLLM engine): no .venv-vllm; make it with: bash setup.sh --vllm"
fi
ls -l bench/results/
