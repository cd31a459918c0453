"""Every config the op may autotune compiles for an H100 (sm_90), checked without a GPU.

The CPU tests run the kernels in Triton's interpreter, which never runs the real compiler. Here
benchmarks/kernel_resources.py compiles each kernel kind, with every config the op's pruning
keeps for a 227 KB shared-memory GPU, through Triton's NVIDIA backend. It then reads the
cubin's resource usage. The test fails if a template does not compile for the GPU. It also
fails if a config that pruning admits needs more shared memory than the GPU has: the
autotuner would then run out of resources at launch, as on the H200 before the estimate
included the bias and mask tiles.
"""

import os
import re
import subprocess
import sys

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
LINE = re.compile(r"^(fwd|bwd_dq|bwd_dkdv)\s+(\S+)\s.*?(\d+) registers, (\d+) B shared, (\d+) B stack$")

pytestmark = pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this Triton has no NVIDIA backend tools")

CASES = {
    # the kernel sweep's path: dense causal, D=128
    "dense-causal-d128": ["--d", "128", "--causal"],
    # the heaviest variant: padded head dim (80 -> 128), bias with its gradient, mask, dropout, causal
    "d80-bias-mask-dropout-causal": ["--d", "80", "--bias", "--mask", "sliding:100", "--dropout", "0.1", "--causal"],
    # an interval mask as eager calls pass it: row ranges (MASK_RANGES), with the register-capped configs
    "d64-mask-ranges": ["--d", "64", "--mask", "sliding:100", "--ranges"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_pruned_config_compiles_for_sm90_within_shared_memory(case):
    from flashfuse.kernels import configs

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_resources.py"), "--n", "256", "--heads", "2",
                           "--kinds", "fwd,bwd_dq,bwd_dkdv", "--configs", "pruned", *CASES[case]],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [m.groups() for m in map(LINE.match, proc.stdout.splitlines()) if m]
    kinds = {r[0] for r in rows}
    assert kinds == {"fwd", "bwd_dq", "bwd_dkdv"} and len(rows) >= 6, proc.stdout
    for kind, config, regs, shared, stack in rows:
        assert 0 < int(regs) <= 255, (kind, config, regs)
        assert int(shared) <= configs.DEFAULT_SHARED_MEMORY, (kind, config, shared)


# The block-sparse kernels walk three loops per program: listed partial blocks, listed full
# blocks, then the tail. Each step reads its block from the list. When that index fed only
# addresses, Triton's pipeliner copied it through shared memory with the tiles and then waited
# for every copy at the top of each step (`async_wait {num = 0}`): the full-block loop, where
# most of the work is, ran 2-deep instead of num_stages-deep (Triton 3.6 on the H100 and 3.9
# here). The kernels now load the index one step ahead into a register.
PIPELINE_CASES = {
    "fwd": ("128,64,8,3", 2),       # K, V: one commit group each, num_stages - 1 = 2 in flight
    "bwd_dq": ("128,64,8,3", 2),
    "bwd_dkdv": ("64,128,8,3", 4),  # Q^T, dO and the row statistics
}


@pytest.mark.parametrize("kind", sorted(PIPELINE_CASES))
def test_sparse_loops_keep_the_configured_pipeline_depth(kind):
    config, depth = PIPELINE_CASES[kind]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_resources.py"), "--n", "512", "--heads", "2",
                           "--d", "128", "--mask", "document:128", "--ranges", "--kinds", kind, "--configs", config, "--loop-waits"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    waits = [line.split(":", 1)[1].split() for line in proc.stdout.splitlines() if line.strip().startswith("loop waits:")]
    assert len(waits) == 1 and len(waits[0]) == 3, proc.stdout  # partial, full and tail loops
    assert [int(w) for w in waits[0]] == [depth] * 3, proc.stdout
