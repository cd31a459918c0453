"""Time one flashfuse kernel under forced configs: milliseconds, registers, spills, shared memory.

    python benchmarks/config_probe.py --cell 65536,sliding,4096 --kind fwd \
        --configs 64,64,4,3 64,64,4,2 64,64,4,3,128 128,64,4,3
Each config is BLOCK_M,BLOCK_N,num_warps,num_stages[,maxnreg]. The cell is N,pattern,parameter
of the block-sparse suite (B=1, H=16, D=--d (64), bf16; `none` as the pattern: no mask). For each
config the op runs with that one config for `--kind` (the other kernels keep their autotuned
ones) and the script prints the CUDA time per call of that kernel (torch.profiler) and what the
compiled kernel uses. A diagnostic for choosing configs and template changes, not a suite.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402

import block_sparse as suite  # noqa: E402
import common  # noqa: E402
from profile_cells import kernel_times  # noqa: E402
from profile_sparse import compiled_kernels  # noqa: E402

KERNEL = {"fwd": "attn_fwd", "bwd_dkdv": "attn_bwd_dkdv", "bwd_dq": "attn_bwd_dq"}


def forced(kind: str, spec: str):
    """Make the op use one config for `kind` from now on (fresh kernels, fresh launch caches)."""
    from flashfuse.kernels import configs, launch, render, triton_attention

    parts = [int(x) for x in spec.split(",")]
    bm, bn, warps, stages = parts[:4]
    extra = {"maxnreg": parts[4]} if len(parts) > 4 else {}
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, **extra)
    original = getattr(configs, "_probe_original", configs.triton_configs)
    configs._probe_original = original
    configs.triton_configs = lambda k: [config] if k == kind else original(k)
    for cache in (render._modules, render._kernels, launch._chosen):
        cache.clear()
    launch.forget()
    triton_attention.reset()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cell", default="65536,sliding,4096")
    p.add_argument("--kind", default="fwd", choices=tuple(KERNEL))
    p.add_argument("--configs", nargs="+", default=["64,64,4,3"])
    p.add_argument("--d", type=int, default=64, help="head dim")
    args = p.parse_args()
    import flashfuse

    n, pattern, param = args.cell.split(",")
    n = int(n)
    cfg = common.AttnConfig(dtype="bf16", B=1, H=16, N=n, D=args.d, causal=False, dropout=0.0)
    q, k, v, do = common.make_inputs(cfg, "cuda")
    mask = None
    if pattern != "none":
        case = suite.MaskCase(pattern, int(param) if pattern != "causal" else None, n, 1, 16, "cuda")
        mask = case.mask4
        print(f"== N={n} D={args.d} {pattern} {param}: density {case.stats['density']:.4f}, partial blocks {case.n_partial}", flush=True)

    def fwdbwd():
        torch.autograd.grad(flashfuse.attention(q, k, v, mask=mask), (q, k, v), do)

    for spec in args.configs:
        forced(args.kind, spec)
        try:
            fwdbwd()
            us = dict(kernel_times(fwdbwd)).get(KERNEL[args.kind])
            _, regs, spills, _, shared, _ = next((k for k in compiled_kernels() if k[0] == KERNEL[args.kind]), (None, "?", "?", None, "?", None))
            print(f"  {args.kind} {spec:>16}: {us:9.1f} us  {regs} regs, {spills} spills, {shared} B shared", flush=True)
        except Exception as e:  # noqa: BLE001  (a config that does not fit is a line, not the end)
            print(f"  {args.kind} {spec:>16}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)


if __name__ == "__main__":
    main()
