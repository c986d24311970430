#!/usr/bin/env bash
# GPU overhead benchmark + the CUDA tests, in under 5 minutes on one GPU.
#
#   benchmarks/gpu.sh            # writes benchmarks/overhead_results_cuda.md
#
# Runs `benchmarks/report.py --device cuda` (all models at batch 128, monitor ratios and
# torch.cuda.max_memory_allocated deltas) and then `pytest tests -k cuda` (tests/test_cuda.py:
# device placement, one host sync per monitored step plus one when its critics train, the
# budget's CUDA-event timing; skipped without a GPU). pytest's exit code 5 ("no tests ran") counts as
# success. The whole script is bounded by `timeout 300`. Python: $PYTHON, else .venv/bin/python, else python3.
set -u
cd "$(dirname "$0")/.."
export OPACUS_MI_BENCH_DEVICE=cuda
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

timeout 300 bash -c '
  PY="$1"
  "$PY" benchmarks/report.py --device cuda || exit $?
  "$PY" -m pytest tests -k cuda -q -p no:cacheprovider
  rc=$?
  if [ "$rc" -eq 5 ]; then echo "gpu.sh: no CUDA tests collected (pytest exit 5), treated as success"; rc=0; fi
  exit "$rc"
' gpu-bench "$PY"
rc=$?
if [ "$rc" -eq 124 ]; then echo "gpu.sh: timed out after 300 s" >&2; fi
exit "$rc"
