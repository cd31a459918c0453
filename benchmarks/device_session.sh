#!/usr/bin/env bash
# One device call running several steps in order, each under its own time limit; logs to $OUT.
#   FLASHFUSE_GIT_COMMIT=<hash, written out where you launch it: the device's .git copy can be stale> bash benchmarks/device_session.sh STEP[:SECONDS] ...
# Steps: tests, overhead, compile, sweep-full (the whole grid, every impl), sweep-bf16 (bf16 p=0, every impl),
#        sparse-profile (benchmarks/profile_sparse.py on SPARSE_CELLS), tests-sparse (the GPU block-sparse tests),
#        probes (benchmarks/config_probe.py: forced configs on PROBE_CELL), probes-ranges (the same with row ranges on and off), sweep-small (N=512,1024,2048 bf16), sweep-large (N=4096,8192,16384 bf16),
#        sweep-fp16, sweep-dropout, sweep-fp16-rest, sweep-dropout-rest, sweep-fp16-dropout, sweep-context (mem-efficient, eager, Inductor), e2e-all (the three models), e2e-gpt2bert, e2e-vit, block-sparse (quick), block-sparse-d64 / -d128 (full grid, one head dim),
#        block-sparse-quick-d128 (quick grid at D=128, the op and Flex only), probes-dkdv-d128 (dK/dV configs on PROBE_CELL),
#        flex-sources (copy Inductor's generated Flex template kernels of this run), host-profile,
#        paired (benchmarks/paired_cells.py: op, op without the overlap and Flex timed in alternating rounds), memory.
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
        tests-sparse) cmd=(env FLASHFUSE_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/gpu -k sparse -rfE) ;;
        probes) cmd=(bash -c "python3 benchmarks/config_probe.py --cell ${PROBE_CELL:-65536,sliding,4096} --kind fwd --configs 64,64,4,3 64,64,4,2 64,64,4,3,128 64,64,4,2,128 128,64,4,3 128,64,8,3 128,128,8,3;
            python3 benchmarks/config_probe.py --cell ${PROBE_CELL:-65536,sliding,4096} --kind bwd_dq --configs 64,64,4,3 64,64,4,2 64,64,4,3,128 128,64,8,3;
            python3 benchmarks/config_probe.py --cell ${PROBE_CELL:-65536,sliding,4096} --kind bwd_dkdv --configs 32,128,4,3 32,128,4,2 64,64,4,3 64,64,4,3,128;
            python3 benchmarks/config_probe.py --cell 65536,none,0 --kind fwd --configs 64,64,4,3 128,64,4,3") ;;
        probes-ranges) cmd=(bash -c "for r in 1 0; do echo \"== FLASHFUSE_MASK_RANGES=\$r\"; export FLASHFUSE_MASK_RANGES=\$r;
            python3 benchmarks/config_probe.py --cell ${PROBE_CELL:-65536,sliding,4096} --kind fwd --configs 64,64,4,3 64,64,4,3,128 128,64,4,3 128,64,8,3;
            python3 benchmarks/config_probe.py --cell ${PROBE_CELL:-65536,sliding,4096} --kind bwd_dq --configs 64,64,4,3 64,64,4,3,128 128,64,8,3;
            python3 benchmarks/config_probe.py --cell ${PROBE_CELL:-65536,sliding,4096} --kind bwd_dkdv --configs 32,128,4,3 64,64,4,3 32,128,8,3; done") ;;
        probes-d128) cmd=(bash -c "for cell in 16384,document,2048 65536,sliding,4096; do
            python3 benchmarks/config_probe.py --d 128 --cell \$cell --kind bwd_dkdv --configs 32,128,8,3 64,128,8,2 64,128,8,3 64,64,4,3 32,64,4,3 64,64,8,3;
            python3 benchmarks/config_probe.py --d 128 --cell \$cell --kind bwd_dq --configs 128,64,8,3 64,64,4,3 128,64,8,2 128,32,8,3 64,32,4,3; done") ;;
        sweep-d128) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0 --head-dims 128 --seqlens 2048,8192,16384 --no-dbias --impls flashfuse,flashfuse_op,sdpa_flash,sdpa_cudnn,flex --prewarm ${PREWARM:-8} --budget-s $budget --out "$W") ;;
        sweep-full) cmd=(python3 benchmarks/kernel_sweep.py --budget-s $budget --out "$W") ;;
        sweep-bf16) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0 --no-dbias --prewarm ${PREWARM:-8} --budget-s $budget --out "$W") ;;
        sparse-profile) cmd=(python3 benchmarks/profile_sparse.py ${SPARSE_CELLS:-4096,document,512 4096,sliding,256 65536,document,8192 65536,sliding,4096}) ;;
        sweep-small) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0 --seqlens 512,1024,2048 --no-dbias --impls $IMPLS --budget-s $budget --out "$W") ;;
        sweep-large) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0 --seqlens 4096,8192,16384 --no-dbias --impls $IMPLS --budget-s $budget --out "$W") ;;
        sweep-fp16) cmd=(python3 benchmarks/kernel_sweep.py --dtypes fp16 --dropout 0 --seqlens 1024,4096,16384 --no-dbias --impls $IMPLS --budget-s $budget --out "$W") ;;
        sweep-fp16-rest) cmd=(python3 benchmarks/kernel_sweep.py --dtypes fp16 --dropout 0 --seqlens 512,2048,8192 --no-dbias --impls $IMPLS --budget-s $budget --out "$W") ;;
        sweep-dropout-rest) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0.1 --seqlens 512,2048,8192 --no-dbias --impls flashfuse,flashfuse_op,sdpa_flash,sdpa_cudnn --budget-s $budget --out "$W") ;;
        sweep-context) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0 --seqlens 512,1024,2048,4096,8192,16384 --no-dbias --impls sdpa_mem_efficient,eager,inductor --budget-s $budget --out "$W") ;;
        sweep-fp16-dropout) cmd=(python3 benchmarks/kernel_sweep.py --dtypes fp16 --dropout 0.1 --no-dbias --impls flashfuse,flashfuse_op,sdpa_flash,sdpa_cudnn,sdpa_mem_efficient --budget-s $budget --out "$W") ;;
        sweep-dropout) cmd=(python3 benchmarks/kernel_sweep.py --dtypes bf16 --dropout 0.1 --seqlens 1024,4096,16384 --impls flashfuse,flashfuse_op,sdpa_flash,sdpa_cudnn --budget-s $budget --out "$W") ;;
        e2e-all) cmd=(python3 benchmarks/end_to_end.py --budget-s $budget --out "$W") ;;
        e2e-gpt2bert) cmd=(python3 benchmarks/end_to_end.py --models gpt2,bert --budget-s $budget --out "$W") ;;
        e2e-vit) cmd=(python3 benchmarks/end_to_end.py --models vit --budget-s $budget --out "$W") ;;
        block-sparse) cmd=(python3 benchmarks/block_sparse.py --quick --budget-s $budget --out "$W") ;;
        block-sparse-d64) cmd=(python3 benchmarks/block_sparse.py --head-dims 64 --budget-s $budget --out "$W") ;;
        block-sparse-d128) cmd=(python3 benchmarks/block_sparse.py --head-dims 128 --budget-s $budget --out "$W") ;;
        block-sparse-quick-d128) cmd=(python3 benchmarks/block_sparse.py --quick --head-dims 128 --impls flashfuse_op,flex --budget-s $budget --out "$W") ;;
        probes-dkdv-d128) cmd=(python3 benchmarks/config_probe.py --d 128 --cell ${PROBE_CELL:-16384,document,2048} --kind bwd_dkdv --configs 64,128,8,2 64,128,8,3 32,128,8,3) ;;
        flex-sources) cmd=(bash -c "mkdir -p $W/flex_sources; grep -rl --include='*.py' -e 'flex_attention_backward' -e 'def triton_tem_fused' \${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_\$(whoami)} | head -40 | xargs -r cp -t $W/flex_sources; ls $W/flex_sources") ;;
        paired) cmd=(bash -c "python3 benchmarks/paired_cells.py --d 128; python3 benchmarks/paired_cells.py --d 64 --rounds 5 --cells 4096,sliding,1024 4096,document,2048 16384,sliding,256") ;;
        host-profile) cmd=(bash -c "python3 benchmarks/host_profile.py --n 4096 --pattern sliding --param 1024 --trace $W/traces; python3 benchmarks/host_profile.py --n 16384 --pattern document --param 512") ;;
        memory) cmd=(python3 benchmarks/memory_scaling.py --quick --budget-s $budget --out "$W") ;;
        *) echo "unknown step $step"; continue ;;
    esac
    timeout -k 10 "$secs" "${cmd[@]}" > "$W/$step.log" 2>&1
    echo "   rc=$? $(date -u +%T)"; tail -25 "$W/$step.log"
done
tar czf "$OUT/run.tgz" -C "$W" .
