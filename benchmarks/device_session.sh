#!/usr/bin/env bash
# One device call running several steps in order, each under its own time limit; logs to $OUT.
#   FLASHFUSE_GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_session.sh STEP[:SECONDS] ...
# Steps: tests, overhead, compile, sweep-small (N=512,1024,2048 bf16), sweep-large (N=4096,8192,16384 bf16),
#        sweep-fp16, sweep-dropout, sweep-fp16-rest, sweep-dropout-rest, sweep-fp16-dropout, sweep-context (mem-efficient, eager, Inductor), e2e-gpt2bert, e2e-vit, block-sparse, memory.
set -uo pipefail
# The device returns at most 8 files: everything is written under $W and packed into $OUT/run.tgz.
OUT=${OUT:-/tmp/flashfuse_out}; W=${W:-/tmp/flashfuse_work}; mkdir -p "$OUT" "$W"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$W/env.txt" 2>&1
IMPLS=flashfuse,flashfuse_op,sdpa_flash,sdpa_cudnn,flex
for spec in "$@"; do
    step=${spec%%:*}; secs=${spec#*:}; [[ $secs == "$spec" ]] && secs=300
    budget=$((secs - 20))
    echo "== $step (limit ${secs}s) $(date -u +%T)"
    case $step in
        tests) cmd=(env FLASHFUSE_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/gpu -rfE) ;;
        overhead) cmd=(python3 benchmarks/launch_overhead.py) ;;
        compile) cmd=(python3 benchmarks/compile_time.py --quick --settings ${COMPILE_SETTINGS:-threads-default,serial-default,serial-all,inductor} --cases ${COMPILE_CASES:-gpt2} --budget-s $budget --out "$W") ;;
        sweep-small) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0 --seqlens 512,1024,2048 --no-dbias --impls $IMPLS --budget-s $budget --out "$W") ;;
        sweep-large) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0 --seqlens 4096,8192,16384 --no-dbias --impls $IMPLS --budget-s $budget --out "$W") ;;
        sweep-fp16) cmd=(python3 benchmarks/kernel_sweep.py --dtypes fp16 --dropout 0 --seqlens 1024,4096,16384 --no-dbias --impls $IMPLS --budget-s $budget --out "$W") ;;
        sweep-fp16-rest) cmd=(python3 benchmarks/kernel_sweep.py --dtypes fp16 --dropout 0 --seqlens 512,2048,8192 --no-dbias --impls $IMPLS --budget-s $budget --out "$W") ;;
        sweep-dropout-rest) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0.1 --seqlens 512,2048,8192 --no-dbias --impls flashfuse,flashfuse_op,sdpa_flash,sdpa_cudnn --budget-s $budget --out "$W") ;;
        sweep-context) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0 --seqlens 512,1024,2048,4096,8192,16384 --no-dbias --impls sdpa_mem_efficient,eager,inductor --budget-s $budget --out "$W") ;;
        sweep-fp16-dropout) cmd=(python3 benchmarks/kernel_sweep.py --dtypes fp16 --dropout 0.1 --no-dbias --impls flashfuse,flashfuse_op,sdpa_flash,sdpa_cudnn,sdpa_mem_efficient --budget-s $budget --out "$W") ;;
        sweep-dropout) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0.1 --seqlens 1024,4096,16384 --impls flashfuse,flashfuse_op,sdpa_flash,sdpa_cudnn --budget-s $budget --out "$W") ;;
        e2e-gpt2bert) cmd=(python3 benchmarks/end_to_end.py --models gpt2,bert --budget-s $budget --out "$W") ;;
        e2e-vit) cmd=(python3 benchmarks/end_to_end.py --models vit --budget-s $budget --out "$W") ;;
        block-sparse) cmd=(python3 benchmarks/block_sparse.py --quick --budget-s $budget --out "$W") ;;
        memory) cmd=(python3 benchmarks/memory_scaling.py --quick --budget-s $budget --out "$W") ;;
        *) echo "unknown step $step"; continue ;;
    esac
    timeout -k 10 "$secs" "${cmd[@]}" > "$W/$step.log" 2>&1
    echo "   rc=$? $(date -u +%T)"; tail -25 "$W/$step.log"
done
tar czf "$OUT/run.tgz" -C "$W" .
