#!/usr/bin/env bash
# GPU check: the tests that need CUDA (16-mixed with the CUDA grad scaler, bf16-mixed, FSDP2 on one GPU,
# FSDP1 refused, the fused foreach fast path, torchvision's resnet18 trained with the coupled group lasso and
# shrunk: tests/gpu/test_resnet18_shrink.py, which needs torchvision and torch-pruning) and the benchmark's table on a
# CUDA transformer: the default Regularizer per optimizer (Adam, SGD with momentum) with the fused prox kernels
# compiled for CUDA, next to the hand-written penalty and the floor.
# Under 10 minutes on one GPU. Usage: scripts/gpu_check.sh [output dir]   (default: gpu_check_out)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
export WANDB_MODE=offline WANDB_SILENT=true

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PY; nothing to check" >&2
    exit 2
fi
"$PY" -c 'import torch, lightning; print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; lightning {lightning.__version__}")' | tee "$OUT/summary.txt"
# torchvision (for resnet18) matches only a CUDA torch build; without it that one test is skipped, and says so.
"$PY" -c 'import torchvision, torch_pruning' 2>/dev/null || echo "note: torchvision or torch-pruning missing: the resnet18 shrink check will be skipped (pip install torchvision 'lightreg[prune]')" | tee -a "$OUT/summary.txt"

start=$SECONDS
timeout 210 "$PY" -m pytest tests -m gpu -q -rfEs -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tests_s=$((SECONDS - start))

start=$SECONDS
# The same table as on CPU (defaults first), on the full-size transformer; compiling the kernels takes a minute.
timeout 360 "$PY" scripts/bench.py --models transformer --device cuda --cycles 15 --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
bench_rc=$?
bench_s=$((SECONDS - start))

{
    echo "== GPU tests (pytest -m gpu): exit $tests_rc in ${tests_s}s (124 = timed out)"
    grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
    tail -n 1 "$OUT/gpu_tests.log"
    echo "== benchmark (scripts/bench.py --models transformer --device cuda): exit $bench_rc in ${bench_s}s"
    awk '/^### Defaults/{p=1; next} /^### /{p=0} p' "$OUT/bench.log" | head -n 20
    sed -n '/^| target | met/,$p' "$OUT/bench.log"
} | tee -a "$OUT/summary.txt"

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
