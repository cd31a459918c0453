#!/usr/bin/env bash
# One device call: GPU tests, then a benchmark suite. Logs and results go under $OUT.
#   bash benchmarks/device_check.sh [tests|bench|all] [extra args for kernel_sweep.py]
set -uo pipefail
OUT=${OUT:-/tmp/flashfuse_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
if [[ $what == tests || $what == all ]]; then
    FLASHFUSE_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu tests/gpu -x -rfE 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $what == bench || $what == all ]]; then
    python3 benchmarks/kernel_sweep.py --out "$OUT" "$@" 2>&1 | tee "$OUT/kernel_sweep.log" | tail -40
fi
