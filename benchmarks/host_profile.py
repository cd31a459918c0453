"""Where an eager flashfuse.attention call with a mask spends host time (a diagnostic, not a suite).

    python benchmarks/host_profile.py [--n 4096] [--pattern sliding] [--param 1024]
    python benchmarks/host_profile.py --stub [--n 256 --param 64]     # CPU proxy, no GPU needed
Prints host microseconds per call (calls issued without waiting for the GPU) of the op's pieces
for one block-sparse cell (B=1, H=16, D=64, bf16), FlexAttention's fwd and fwd+bwd on the same
mask, an empty autograd.Function with as many inputs (the autograd floor), and a cProfile of the
op's fwd+bwd. On CPU (no GPU) it runs the interpreter path, unless --stub: then every Triton
launch of the attention kernels is replaced by what a remembered direct launch costs in Python
(launch._direct entries whose `run` does nothing), so the figures are the Python host time of
the op on the launch path a GPU takes after its first calls. Compare stub figures only with
stub figures from the same machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

STUB = "--stub" in sys.argv
if not torch.cuda.is_available() and not STUB:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the launchers' Triton path on the CPU

import block_sparse as suite  # noqa: E402
import common  # noqa: E402


class _Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, *rest):
        ctx.save_for_backward(q, k, v)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) + (None,) * 10


def _traces(folder: str, fns, device: str) -> None:
    """CPU-side self time per op, both threads (the autograd engine runs CUDA backward functions on
    its own device thread), and a chrome trace per fn: where a fwd+bwd's host time goes."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(folder, exist_ok=True)
    for name, fn in fns:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(20):
                fn()
            common.sync(device)
        print(f"--- torch.profiler, 20 x {name}: CPU self time ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        prof.export_chrome_trace(os.path.join(folder, name.replace(" ", "_").replace("+", "") + ".json"))


class _StubEntry:
    """A direct-launch entry whose launcher does nothing (--stub)."""

    function = metadata = None
    tail = ()

    def __init__(self, meta):
        self.meta = meta

    def run(self, *args):
        return None


def _stub_launches() -> None:
    """--stub: a first launch only remembers a do-nothing direct entry, as a real one would;
    later launches of the same plan run that entry (flashfuse.kernels.launch.Prepared)."""
    from flashfuse import ops
    from flashfuse.kernels import launch

    def remember(kind, kernel, grid, *args, **kwargs):
        launch._direct[(id(kernel), launch._arg_key(args, kwargs))] = _StubEntry({"BLOCK_M": 64, "BLOCK_N": 64, **kwargs})

    launch.launch = remember
    launch._direct_enabled = lambda: True
    launch._stream = lambda: None
    ops.resolve_kernel = lambda kernel, device: "triton"  # CPU tensors, Triton launchers


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--pattern", default="sliding")
    p.add_argument("--param", type=int, default=1024)
    p.add_argument("--trace", default=None, help="also write torch.profiler chrome traces of 20 fwd+bwd calls (op, flex) to this folder")
    p.add_argument("--stub", action="store_true", help="CPU only: Triton launches replaced by the direct path's Python (see above)")
    args = p.parse_args()
    if args.stub:
        if torch.cuda.is_available():
            raise SystemExit("--stub is the CPU proxy; on a GPU run without it")
        _stub_launches()
    import flashfuse
    from flashfuse.kernels import block_sparse, triton_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = common.AttnConfig(dtype="bf16", B=1, H=16, N=args.n, D=64, causal=False, dropout=0.0)
    q, k, v, do = common.make_inputs(cfg, device)
    case = suite.MaskCase(args.pattern, args.param, args.n, 1, 16, device)
    mask = case.mask4

    def op_fwd():
        return flashfuse.attention(q, k, v, mask=mask)

    def op_fwdbwd():
        return torch.autograd.grad(op_fwd(), (q, k, v), do)

    out = op_fwd()
    m_stat = log_l = torch.zeros(1, 16, args.n, device=device)
    lists_args = (None, mask, None, triton_attention.SPARSE_BLOCK, args.n, args.n, False)

    def lists():
        with block_sparse.eager_call():
            return block_sparse.kernel_lists(*lists_args, finite_fill=False)

    def launcher_fwd():
        with block_sparse.eager_call():
            return triton_attention.attention_forward(q, k, v, None, mask, 0.125, False, 0.0, None, 1, float("-inf"))

    def launcher_bwd():
        with block_sparse.eager_call():
            return triton_attention.attention_backward(do, q, k, v, None, mask, out.detach(), m_stat, log_l, 0.125, False, 0.0, None, 1,
                                                       float("-inf"), False)

    def empty_fwdbwd():
        return torch.autograd.grad(_Empty.apply(q, k, v, None, mask, 0.125, False, 0.0, None, 1, float("-inf"), "auto", None),
                                   (q, k, v), do)

    rows = [("op fwd", op_fwd), ("op fwd+bwd", op_fwdbwd), ("kernel_lists (cached)", lists),
            ("launcher fwd", launcher_fwd), ("launcher bwd", launcher_bwd), ("empty autograd.Function fwd+bwd", empty_fwdbwd)]
    if device == "cuda":
        bm = suite.flex_block_mask(suite.flex_mask_mod(args.pattern, args.param, args.n, device), args.n, device)[0]
        flex = common._flex()
        rows += [("flex fwd", lambda: flex(q, k, v, block_mask=bm)),
                 ("flex fwd+bwd", lambda: torch.autograd.grad(flex(q, k, v, block_mask=bm), (q, k, v), do))]
    print(f"== host us per call, N={args.n} {args.pattern} {args.param} ({device})")
    for name, fn in rows:
        for _ in range(3):
            fn()
        best = common.host_us(fn, device, n=50, repeats=5)
        print(f"  {name:34s} {best:8.1f}", flush=True)
    if args.trace:
        _traces(args.trace, [(name, fn) for name, fn in rows if name in ("op fwd+bwd", "flex fwd+bwd")], device)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        op_fwdbwd()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    print(s.getvalue())


if __name__ == "__main__":
    main()
