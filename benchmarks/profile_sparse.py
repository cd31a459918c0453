"""Where does a block-sparse cell's time go? flashfuse (mask and layout APIs) vs FlexAttention.

    python benchmarks/profile_sparse.py 4096,document,512 65536,sliding,4096 16384,causal,0 16384,document,2048,128
Each cell is N,pattern,parameter[,D] with the block-sparse suite's shapes (B=1, H=16, D=64 unless given, bf16;
patterns from benchmarks/block_sparse.py). For each impl it prints the do_bench medians of the
forward and forward+backward, the host time to issue one forward+backward, the CUDA time per
call of each kernel (torch.profiler), and for flashfuse the chosen config, registers and spills
of every compiled kernel that ran (from the launch module's direct-launch entries).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton.testing  # noqa: E402

import block_sparse as suite  # noqa: E402
import common  # noqa: E402
from profile_cells import chosen_configs, issue_us, kernel_times  # noqa: E402


def compiled_kernels() -> list:
    """(name, registers, spills, warps, shared bytes, grid meta-parameters) of every kernel the launch module remembers."""
    from flashfuse.kernels import launch

    out = []
    for entry in launch._direct.values():
        c = entry.compiled
        meta = c.metadata
        out.append((getattr(meta, "name", "?"), getattr(c, "n_regs", None), getattr(c, "n_spills", None),
                    getattr(meta, "num_warps", None), getattr(meta, "shared", None), str(entry.meta)))
    return sorted(set(out), key=str)


def main() -> None:
    from flashfuse.kernels import launch

    cells = sys.argv[1:] or ["4096,document,512", "65536,document,8192"]
    for cell in cells:
        n, pattern, param, *d = cell.split(",")
        n, param, d = int(n), (int(param) if pattern != "causal" else None), int(d[0]) if d else 64
        cfg = common.AttnConfig(dtype="bf16", B=1, H=16, N=n, D=d, causal=False, dropout=0.0)
        q, k, v, do = common.make_inputs(cfg, "cuda")
        case = suite.MaskCase(pattern, param, n, cfg.B, cfg.H, "cuda")
        print(f"== N={n} D={d} {pattern} {param}: density {case.stats['density']:.4f}, partial blocks {case.n_partial}", flush=True)
        for impl in ("flashfuse_op", "flashfuse_layout", "flex", "flashfuse_dense"):
            try:
                fn, _, _ = suite.build_fn(impl, case, n, "cuda", "auto")
            except common.Unsupported as e:
                print(f"  {impl:17s} unsupported: {str(e)[:80]}")
                continue
            launch.forget()
            before = dict(launch.stats)

            def fwd(fn=fn):
                return fn(q, k, v)

            def fwdbwd(fn=fn):
                torch.autograd.grad(fn(q, k, v), (q, k, v), do)

            fwdbwd()
            t_f = triton.testing.do_bench(fwd, warmup=10, rep=50, return_mode="median")
            t_fb = triton.testing.do_bench(fwdbwd, warmup=10, rep=50, return_mode="median")
            paths = {k: launch.stats[k] - before.get(k, 0) for k in launch.stats}
            print(f"  {impl:17s} fwd {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms  host: fwd+bwd {issue_us(fwdbwd):.0f} us, "
                  f"fwd {issue_us(fwd):.0f} us  launch paths {paths}", flush=True)
            for kname, us in kernel_times(fwdbwd):
                print(f"      {us:9.1f} us  {kname}")
            if impl.startswith("flashfuse"):
                for name, regs, spills, warps, shared, meta in compiled_kernels():
                    print(f"      kernel {name} {meta}: {regs} regs, {spills} spills, {warps} warps, {shared} B shared")
        for line in chosen_configs():
            print("   ", line)
        case.free()
        del q, k, v, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
