"""Where does one kernel-sweep cell's time go? GPU kernel time vs wall time, and the chosen configs.

    python benchmarks/profile_cells.py bf16,64,1024,1,0 bf16,128,4096,0,0.1
Each cell is dtype,D,N,causal,dropout with the sweep's shapes (B = 16384 // N, H = 2048 // D).
For flashfuse through torch.compile, the op called directly and SDPA flash it prints: do_bench
median of the forward and of forward+backward, the host time to issue one forward+backward
(wall time of 20 calls without waiting for the GPU), the per-call CUDA time of each kernel
(torch.profiler), and the autotuner's chosen config of each flashfuse kernel. When do_bench's
time is near the issue time and well above the summed kernel time, the cell is host-bound.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

import common  # noqa: E402


def kernel_times(fn, iters: int = 10) -> list:
    """[(kernel name, us per call)] of fn under torch.profiler, largest first."""
    prof = common.cuda_profile(fn, iters)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.count:
            rows.append((e.key[:60], t / iters))
    return sorted(rows, key=lambda r: -r[1])[:8]


def issue_us(fn, n: int = 20) -> float:
    """Host microseconds per call, with the GPU left to catch up afterwards (common.host_us)."""
    return common.host_us(fn, "cuda", n)


def chosen_configs() -> list:
    from flashfuse.kernels import render

    out = []
    for (kind, _, opts), fn in render._kernels.items():
        best = getattr(fn, "best_config", None)
        if best is not None:
            flags = ",".join(k for k in ("causal", "has_bias", "has_mask", "dropout") if dict(opts).get(k))
            out.append(f"{kind}[{flags}] {best}")
    return out


def main() -> None:
    import flashfuse

    cells = sys.argv[1:] or ["bf16,64,1024,1,0"]
    for cell in cells:
        dt, d, n, causal, p = cell.split(",")
        d, n, causal, p = int(d), int(n), bool(int(causal)), float(p)
        cfg = common.AttnConfig(dtype=dt, B=max(1, 16384 // n), H=2048 // d, N=n, D=d, causal=causal, dropout=p)
        q, k, v, do = common.make_inputs(cfg, "cuda")
        flops = common.attn_flops(cfg.B, cfg.H, n, d, causal)
        torch._dynamo.reset()
        compiled = common.build_impl("flashfuse", cfg, "cuda", "auto")
        impls = {
            "flashfuse": lambda: compiled(q, k, v),
            "flashfuse_op": lambda: flashfuse.attention(q, k, v, causal=causal, dropout_p=p),
            "sdpa_flash": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p),
        }
        print(f"== {cfg.label()}", flush=True)
        for name, fwd in impls.items():
            ctx = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION) if name == "sdpa_flash" else None
            with ctx if ctx is not None else torch.enable_grad():

                def fwdbwd(fwd=fwd):
                    torch.autograd.grad(fwd(), (q, k, v), do)

                fwdbwd()
                t_f = triton.testing.do_bench(fwd, warmup=10, rep=50, return_mode="median")
                t_fb = triton.testing.do_bench(fwdbwd, warmup=10, rep=50, return_mode="median")
                print(f"  {name:13s} fwd {t_f:.3f} ms ({flops / t_f / 1e9:.0f} TFLOP/s)  fwd+bwd {t_fb:.3f} ms "
                      f"({3.5 * flops / t_fb / 1e9:.0f} TFLOP/s)  host: fwd+bwd {issue_us(fwdbwd):.0f} us, fwd {issue_us(fwd):.0f} us")
                for kname, us in kernel_times(fwdbwd):
                    print(f"      {us:9.1f} us  {kname}")
        for line in chosen_configs():
            print("   ", line)
        del q, k, v, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
