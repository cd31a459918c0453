"""Registers, shared memory and stack (spills) of the op's Triton kernels, compiled for an H100
(sm_90) on any machine: no GPU needed.

    python benchmarks/kernel_resources.py --mask sliding:256 --configs 64,64,4,3 128,64,4,3
    python benchmarks/kernel_resources.py --kinds fwd,bwd_dq,bwd_dkdv --configs 64,64,4,3,128

A config is BLOCK_M,BLOCK_N,num_warps,num_stages[,maxnreg]. The script runs the op's launcher on
CPU tensors of the given shape with the launch intercepted, so it sees the exact arguments and
constexprs a GPU call would pass. From them it builds Triton's signature and specialization
(16-byte pointer alignment, ints divisible by 16, ints equal to 1 as constants). It then
compiles for GPUTarget("cuda", 90) and reads the cubin's resource usage with the cuobjdump
that Triton ships.

NB: 2026-11-22, this machine's Triton 3.9 against the H100's Triton 3.6 (benchmarks/results/NOTES.md).
The 64x64/4-warp/3-stage forward matched: 118 registers and 57344 B shared without a mask, and
157 / 65536 with a sliding-window mask (the GPU reported 156 / 65536). The backward kernels
differ by up to ~20 registers between the two versions (dQ with the mask: 168 here, 191 on the
GPU; dK/dV 244 vs 237), with the same shared memory. Use it to try template changes aimed at
registers or shared memory before spending GPU time; times still need the GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from typing import Optional

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU target, not the interpreter rendering

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
           torch.int64: "*i64", torch.bool: "*i1", torch.int8: "*i8"}


class _Captured(Exception):
    pass


def launch_args(kind: str, n: int, d: int, heads: int, mask, causal: bool, dtype, bias: bool = False,
                dropout_p: float = 0.0, ranges: bool = False) -> tuple:
    """(kernel, args, kwargs) that the op's launcher passes for `kind`, captured before launching.

    ranges: pass the mask as row ranges (MASK_RANGES; column ranges, COL_RANGES, to dK/dV), as
    eager calls do when every row (column) of the mask keeps one interval of keys (queries)."""
    from flashfuse.kernels import block_sparse, triton_attention

    seen = {}

    def capture(k, kernel, grid, *args, **kwargs):
        seen[k] = (kernel, args, kwargs)
        if k == kind:
            raise _Captured

    q, k, v, dout = (torch.randn(1, heads, n, d, dtype=dtype) for _ in range(4))
    b = torch.randn(1, heads, n, n, dtype=dtype) if bias else None
    seed = torch.tensor([7], dtype=torch.int64) if dropout_p > 0 else None
    real, real_mask = triton_attention._prepared, triton_attention._kernel_mask
    # the launchers build their launches through _prepared (one plan per call signature): make
    # each launch a capture, with no plan kept before or after
    triton_attention.reset()
    triton_attention._prepared = lambda k_, kernel, grid, static, kwargs: (lambda *t: capture(k_, kernel, grid, *t, *static, **kwargs))
    if ranges:
        row_ranges, is_ranges = block_sparse.row_ranges(block_sparse.row_stats(mask))
        col_ranges, is_col_ranges = block_sparse.row_ranges(block_sparse.row_stats(mask.transpose(-2, -1)))
        if not (bool(is_ranges) and bool(is_col_ranges)):
            raise SystemExit("--ranges: some row or column of this mask keeps more than one interval")
        triton_attention._kernel_mask = lambda mask_, lists, kv_walk=False: (col_ranges if kv_walk else row_ranges, True)
    try:
        if kind == "fwd":
            triton_attention.attention_forward(q, k, v, b, mask, d ** -0.5, causal, dropout_p, seed, 1, float("-inf"))
        else:
            out, stat = torch.empty_like(q), torch.zeros(1, heads, n)
            triton_attention.attention_backward(dout, q, k, v, b, mask, out, stat, stat, d ** -0.5, causal, dropout_p, seed, 1,
                                                float("-inf"), bias)
    except _Captured:
        pass
    finally:
        triton_attention._prepared, triton_attention._kernel_mask = real, real_mask
        triton_attention.reset()
    return seen[kind]


def resources(kernel, args: tuple, kwargs: dict, config: dict, waits: Optional[list] = None) -> tuple:
    """(registers, shared bytes, stack bytes) of `kernel` compiled for sm_90 with these arguments.
    waits: a list that gets `loop_waits` of the compiled TTGIR."""
    from flashfuse.kernels import launch

    jit, rules = launch._jit_of(kernel)
    meta = {k: config[k] for k in ("BLOCK_M", "BLOCK_N") if k in config}
    named = {**dict(zip(jit.arg_names, args)), **kwargs, **meta}
    for name, rule in rules.items():
        named[name] = rule(named)
    signature, constants, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(jit.arg_names, jit.params)):
        a = named[name]
        if param.is_constexpr or a is None or (isinstance(a, int) and not isinstance(a, bool) and a == 1):
            signature[name], constants[name] = "constexpr", a
        elif isinstance(a, torch.Tensor):
            signature[name], attrs[(i,)] = POINTER[a.dtype], [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            signature[name] = "i1"
        elif isinstance(a, int):
            signature[name] = "i32" if -(2 ** 31) <= a < 2 ** 31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            signature[name] = "fp32"
        else:
            signature[name], constants[name] = "constexpr", a
    options = {k: config[k] for k in ("num_warps", "num_stages", "maxnreg") if k in config}
    compiled = triton.compile(ASTSource(jit, signature, constants, attrs), target=GPUTarget("cuda", 90, 32), options=options)
    if waits is not None:
        waits.extend(loop_waits(compiled.asm["ttgir"]))
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)

    def field(key):
        found = re.search(key + r":(\d+)", usage)
        return int(found.group(1)) if found else None

    return field("REG"), compiled.metadata.shared, field("STACK")


def loop_waits(ttgir: str) -> list:
    """For each pipelined loop (scf.for) of a TTGIR module, in order, the `num` of the first
    ttg.async_wait inside it: how many groups of copies may stay in flight, num_stages - 1 per
    streamed tile set for a fully pipelined loop, 0 when a loop waits for every copy it issued."""
    found, in_loop = [], False
    for line in ttgir.splitlines():
        if "scf.for" in line:
            in_loop = True
        elif in_loop and "ttg.async_wait" in line:
            m = re.search(r"num = (\d+)", line)
            found.append(int(m.group(1)) if m else None)
            in_loop = False
    return found


def pruned_configs(kind: str, kernel, args: tuple, kwargs: dict, smem_limit: int) -> list:
    """The configs the op's pruning keeps for this call on a GPU with `smem_limit` bytes of shared
    memory per block, every tier included (FLASHFUSE_AUTOTUNE=all), as resource() configs."""
    from flashfuse.kernels import configs, launch

    jit, _ = launch._jit_of(kernel)
    named = {**dict(zip(jit.arg_names, args)), **kwargs}
    kept = configs.prune_for_call(kind, configs.CONFIGS[kind], named, smem_limit, "all")
    return [{k: c[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg") if k in c} for c in kept]


def build_mask(spec: str, n: int):
    from flashfuse import mask_patterns as mp

    if spec == "none":
        return None
    kind, value = spec.split(":")
    if kind == "sliding":
        return mp.sliding_window(n, n, int(value))[None, None]
    if kind == "document":
        size = int(value)
        return mp.document([size] * (n // size) + ([n % size] if n % size else []))[None, None]
    raise SystemExit(f"unknown mask {spec!r}: none, sliding:W or document:L")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--mask", default="none", help="none, sliding:W or document:L (a bool mask, as flashfuse.attention(mask=...))")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--bias", action="store_true", help="an additive [1, H, N, N] bias (and its gradient in the backward)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--ranges", action="store_true", help="the mask as row ranges (MASK_RANGES), as eager calls pass interval masks")
    p.add_argument("--kinds", default="fwd", help="comma list of fwd, bwd_dq, bwd_dkdv")
    p.add_argument("--configs", nargs="+", default=["64,64,4,3"], help="or `pruned`: every config the op's pruning keeps")
    p.add_argument("--loop-waits", action="store_true", help="also print each loop's first async_wait num (loop_waits)")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    mask = build_mask(args.mask, args.n)
    for kind in args.kinds.split(","):
        kernel, a, kw = launch_args(kind, args.n, args.d, args.heads, mask, args.causal, dtype, args.bias, args.dropout, args.ranges)
        if args.configs == ["pruned"]:
            from flashfuse.kernels import configs as ff_configs

            chosen = pruned_configs(kind, kernel, a, kw, ff_configs.DEFAULT_SHARED_MEMORY)
        else:
            keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg")
            chosen = [dict(zip(keys, (int(x) for x in spec.split(",")))) for spec in args.configs]
        for config in chosen:
            spec = ",".join(str(v) for v in config.values())
            waits: list = []
            regs, shared, stack = resources(kernel, a, kw, config, waits)
            print(f"{kind:9s} {spec:>16s}  mask={args.mask}{' (ranges)' if args.ranges else ''} causal={int(args.causal)} "
                  f"bias={int(args.bias)} p={args.dropout:g}  "
                  f"{regs} registers, {shared} B shared, {stack} B stack", flush=True)
            if args.loop_waits:
                print(f"  loop waits: {' '.join(map(str, waits))}", flush=True)


if __name__ == "__main__":
    main()
