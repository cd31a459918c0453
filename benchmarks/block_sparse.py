"""Block-sparse attention: time vs block density for sliding-window and document masks.

B=1, H=16, bf16, D=64 (and 128 in the full run), N = 4K..64K. Patterns: causal sliding window
(windows 256, 1024, 4096), packed documents of equal length L (512, 2048, 8192; bidirectional
inside a document) and dense causal as a reference point. A window or document length >= N is
left out (it would repeat the causal / dense point).

impls (rows' `impl`):
    flashfuse_op      flashfuse.attention(q, k, v, mask=keep[None, None]): block skipping from the
                      mask's 128x128 block summary (cached per mask tensor, so outside the timing);
                      masks whose every row keeps one interval of keys (all these patterns) reach
                      the kernels as row ranges, computed per tile instead of loaded
    flashfuse_op_tiles  the same with FLASHFUSE_MASK_RANGES=0: PARTIAL tiles of the mask are loaded
    flashfuse_layout  flashfuse.block_sparse_attention(q, k, v, layout) with the 128-block layout of
                      the mask; a layout block is computed in full, so only masks whose non-empty
                      blocks are all full (documents with L % 128 == 0) run: others are "unsupported"
    flashfuse_dense   flashfuse.attention(q, k, v) with no mask, not causal: the dense baseline
    flex              torch.compile(flex_attention) with create_block_mask(mask_mod) built outside
                      the timed region (its build time is `setup_ms`)
    sdpa_mask         F.scaled_dot_product_attention(q, k, v, attn_mask=keep); SDPA picks its
                      backend (`sdpa_backend`). It computes every block whatever the mask, so above
                      --sdpa-once-above (default 16384) it runs on one pattern per N only.

Host-bound cells (fwd+bwd under 5 ms): once flashfuse_op, _tiles, _layout and flex have run on a
mask, they are timed again in 5 rounds, each once per round in turn (paired_rounds); the medians
are their fwd_ms / fwdbwd_ms, the single pass stays in fwd_ms_single / fwdbwd_ms_single. A
single pass times the impls seconds apart, and the host's load moves in between. sdpa_mask
(a later pass) and flashfuse_dense (once per N) keep single passes.

density = fraction of non-empty 128x128 blocks (flashfuse.kernels.block_sparse.summarize),
elem_density = fraction of kept elements. gpu_fwdbwd_ms (flashfuse_op, flex; CUDA) = the GPU's
kernel time per fwd+bwd from torch.profiler, without the host's share. FLOPs = 4*B*H*D*kept_elements (fwd+bwd 3.5x), so
TFLOP/s count only useful work. Goals: flashfuse_op >= 1.0x Flex at the same config (geomean),
and near-linear scaling: fit ms = c * nonempty_blocks^b over the flashfuse_op rows, b in [0.85, 1.15]
(on wall-clock fwd+bwd and fwd ms; reported as well on gpu_fwdbwd_ms, the kernel time).

    python benchmarks/block_sparse.py --quick --out $OUT     # ~3 min on an H100
    python benchmarks/block_sparse.py --out $OUT             # D=64,128, N=4K..64K (past the default budget: split by --head-dims)
    python benchmarks/block_sparse.py --dry-run --out /tmp/bs

--impls takes this suite's names: flashfuse_op,flashfuse_op_tiles,flashfuse_layout,flashfuse_dense,flex,sdpa_mask.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from common import (AttnConfig, Budget, CellOptions, CellTimeout, Runner, Unsupported, base_row, bench_ms,  # noqa: E402
                    cleanup, describe_error, error_kind, geomean, goals_markdown, make_inputs, md_table, sync,
                    time_limit, tflops)

SUITE = "block_sparse"
IMPLS = ("flashfuse_op", "flashfuse_op_tiles", "flashfuse_layout", "flex", "flashfuse_dense", "sdpa_mask")
PASS1 = ("flashfuse_op", "flashfuse_op_tiles", "flashfuse_layout", "flex", "flashfuse_dense")  # goals first; SDPA (dense O(N^2)) after
OURS = ("flashfuse_op", "flashfuse_layout")
BLOCK = 128
FLEX_EAGER_MASK_MAX_N = 16384   # above this, create_block_mask runs compiled (eager materializes N^2 int64 temporaries)
LINEAR_LO, LINEAR_HI = 0.85, 1.15
OUT_TOL = 0.08                  # bf16/fp16 max abs difference accepted between impls
HOST_CHECK_BELOW_MS = 5.0       # host time per fwd+bwd is measured for cells faster than this (slower ones are GPU-bound)
KERNEL_TIME_IMPLS = ("flashfuse_op", "flex")  # gpu_fwdbwd_ms (torch.profiler device time) for these
# Host-bound cells (fwd+bwd under HOST_CHECK_BELOW_MS) of these impls (the first pass's, but for
# the dense baseline, which runs once per N) are timed again in PAIRED_ROUNDS alternating rounds
# once all have run on a mask (paired_rounds). SDPA runs in a later pass: its rows stay single.
# NB: single-pass wall clock of one host-bound cell moved 0.37-1.6 ms between the runs of one
# code on the H100 host (N=4K documents of 512 at D=128, 2026-11-22 runs), and op / Flex ratios of
# those cells ranged 0.5-2.6x; in alternating rounds (benchmarks/paired_cells.py, 19:43) the
# per-round ratios of one cell stayed within about +-15%.
PAIRED = ("flashfuse_op", "flashfuse_op_tiles", "flashfuse_layout", "flex")
PAIRED_ROUNDS = 5


# --------------------------------------------------------------------------------------------
# arguments, configs

def add_args(p) -> None:
    p.add_argument("--head-dims", default=None, help="comma list (default 64 quick, 64,128 full)")
    p.add_argument("--seqlens", default=None, help="comma list (default 4096,16384,65536 quick; 4096..65536 full)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", default="bf16", choices=tuple(common.DTYPES))
    p.add_argument("--windows", default=None, help="sliding windows, comma list (default 256,1024,4096)")
    p.add_argument("--doc-lens", default=None, help="document lengths, comma list (default 512,2048,8192)")
    p.add_argument("--no-causal", action="store_true", help="leave out the dense causal reference pattern")
    p.add_argument("--sdpa-once-above", type=int, default=None,
                   help="above this N, sdpa_mask runs on one pattern per N (default 16384; 0 = on every pattern)")
    p.add_argument("--no-strict", action="store_true",
                   help="let a failing Triton kernel fall back to flashfuse's reference kernel (default: an error row)")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)


def _csv(s, cast=int):
    return [cast(x) for x in s.split(",") if x.strip()] if s else None


def _impl_list(args) -> list:
    if getattr(args, "impls", None):
        want = [i.strip() for i in args.impls.split(",") if i.strip()]
        return [i for i in IMPLS if i in want]
    return list(IMPLS)


def plan(args) -> tuple:
    """(head dims, seqlens, heads, windows, doc lengths)."""
    if args.dry_run:
        dims, seqs, h, wins, docs = [32], [256, 512], 2, [128, 256], [128, 256]
    elif args.quick:
        dims, seqs, h, wins, docs = [64], [4096, 16384, 65536], args.heads, [256, 1024, 4096], [512, 2048, 8192]
    else:
        dims, seqs, h = [64, 128], [4096, 8192, 16384, 32768, 65536], args.heads
        wins, docs = [256, 1024, 4096], [512, 2048, 8192]
    dims = _csv(args.head_dims) or dims
    seqs = _csv(args.seqlens) or seqs
    wins = _csv(args.windows) or wins
    docs = _csv(args.doc_lens) or docs
    return dims, seqs, h, wins, docs


def patterns(n: int, wins, docs, with_causal: bool = True) -> list:
    """[(pattern, window_or_doclen)] for sequence length n, sparsest first within each kind."""
    out = [("sliding", w) for w in sorted(wins) if w < n]
    out += [("document", L) for L in sorted(docs) if L < n]
    if with_causal:
        out.append(("causal", None))
    return out


def is_causal(pattern: str) -> bool:
    return pattern in ("sliding", "causal")


def build_keep(pattern: str, param, n: int, device: str) -> torch.Tensor:
    """Bool keep-mask [N, N] (True = attend), from flashfuse.mask_patterns."""
    from flashfuse import mask_patterns as mp

    if pattern == "sliding":
        return mp.sliding_window(n, n, int(param), device=device)
    if pattern == "document":
        lengths = [int(param)] * (n // int(param)) + ([n % int(param)] if n % int(param) else [])
        return mp.document(lengths, device=device)
    if pattern == "causal":
        return mp.causal(n, n, device=device)
    raise ValueError(pattern)


def _sdpa_backend(q, k, v, mask) -> str | None:
    try:
        from torch.nn.attention import SDPBackend

        choice = int(torch._fused_sdp_choice(q, k, v, mask, 0.0, False))
        return {int(v_): name for name, v_ in SDPBackend.__members__.items()}.get(choice, str(choice))
    except Exception:  # noqa: BLE001  (private API; a missing name is no reason to fail a cell)
        return None


# --------------------------------------------------------------------------------------------
# flex: mask_mods whose parameters are tensors, so one compile serves every window (or every
# document length) at a given N; Dynamo guards a closure on its code, and a captured tensor on
# its metadata only.

def _window_mod(win: torch.Tensor):
    def window_mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < win)
    return window_mask_mod


def _document_mod(doc_ids: torch.Tensor):
    def document_mask_mod(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]
    return document_mask_mod


def flex_mask_mod(pattern: str, param, n: int, device: str):
    if pattern == "document":
        return _document_mod(torch.arange(n, device=device, dtype=torch.int32) // int(param))
    win = n if pattern == "causal" else int(param)   # causal = a window as long as the sequence
    return _window_mod(torch.tensor(win, device=device, dtype=torch.int32))


_cbm_compiled = None


def flex_block_mask(mask_mod, n: int, device: str):
    """create_block_mask(mask_mod, None, None, n, n): (block_mask, build ms of a warm call, first call s, note)."""
    global _cbm_compiled
    from torch.nn.attention.flex_attention import create_block_mask

    build, note = create_block_mask, ""
    if device == "cuda" and n > FLEX_EAGER_MASK_MAX_N:
        if _cbm_compiled is None:
            _cbm_compiled = torch.compile(create_block_mask, dynamic=False)
        build, note = _cbm_compiled, "create_block_mask compiled"

    def make():
        return build(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)

    t0 = time.perf_counter()
    try:
        bm = make()
    except Exception as e:  # noqa: BLE001
        if build is create_block_mask or isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        build, note = create_block_mask, f"compiled create_block_mask failed ({type(e).__name__}); eager"
        bm = make()
    sync(device)
    first_s = time.perf_counter() - t0
    bm = None
    cleanup(device)
    t0 = time.perf_counter()
    bm = make()
    sync(device)
    return bm, (time.perf_counter() - t0) * 1e3, first_s, note


# --------------------------------------------------------------------------------------------
# one mask: its statistics and the impls' callables

class MaskCase:
    """One (N, pattern, parameter): the keep mask, its block summary and statistics."""

    def __init__(self, pattern: str, param, n: int, B: int, H: int, device: str):
        from flashfuse.kernels import block_sparse as bs

        self.pattern, self.param, self.n, self.device = pattern, param, n, device
        self.keep = build_keep(pattern, param, n, device)
        self.mask4 = self.keep[None, None]  # one object: flashfuse caches the summary per tensor object
        summary = bs.summarize(self.mask4, BLOCK, BLOCK)
        sync(device)
        t0 = time.perf_counter()
        summary = bs.summarize(self.mask4, BLOCK, BLOCK)  # timed warm: the op's one-time setup
        sync(device)
        self.summary_ms = (time.perf_counter() - t0) * 1e3
        self.summary = summary[0, 0]
        nonempty = int((self.summary != bs.EMPTY).sum())
        self.n_partial = int((self.summary == bs.PARTIAL).sum())
        blocks = self.summary.numel()
        self.kept = int(self.keep.sum())
        self.stats = {
            "pattern": pattern,
            "window_or_doclen": param,
            "density": nonempty / blocks,
            "elem_density": self.kept / (n * n),
            "nonempty_blocks": nonempty * B * H,
            "partial_blocks": self.n_partial * B * H,
            "kept_elements": self.kept * B * H,
        }

    def layout(self):
        from flashfuse.kernels import block_sparse as bs

        if self.n_partial:
            raise Unsupported(f"{self.n_partial} partially masked 128x128 blocks: a layout block is computed "
                              f"in full, so {self.pattern} needs the mask (flashfuse_op)")
        t0 = time.perf_counter()
        lay = (self.summary != bs.EMPTY).contiguous()
        sync(self.device)
        return lay, self.summary_ms + (time.perf_counter() - t0) * 1e3

    def free(self):
        self.keep = self.mask4 = self.summary = None


def build_fn(impl: str, case: MaskCase | None, n: int, device: str, kernel: str):
    """(fn(q, k, v), setup_ms, extra row fields). Raises Unsupported for cells that cannot run."""
    import flashfuse

    if impl == "flashfuse_dense":
        return (lambda q, k, v: flashfuse.attention(q, k, v, kernel=kernel)), None, {}
    if impl in ("flashfuse_op", "flashfuse_op_tiles"):  # _tiles: run under mask_ranges(False) by cell()
        mask4 = case.mask4
        return (lambda q, k, v: flashfuse.attention(q, k, v, mask=mask4, kernel=kernel)), case.summary_ms, {}
    if impl == "flashfuse_layout":
        lay, setup = case.layout()
        return (lambda q, k, v: flashfuse.block_sparse_attention(q, k, v, lay, kernel=kernel)), setup, {}
    if impl == "sdpa_mask":
        keep = case.keep
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)), None, {}
    if impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        bm, setup, first_s, note = flex_block_mask(flex_mask_mod(case.pattern, case.param, n, device), n, device)
        extra = {"setup_first_s": round(first_s, 3)}
        if note:
            extra["setup_note"] = note
        if device == "cuda":
            flex = common._flex()
            return (lambda q, k, v: flex(q, k, v, block_mask=bm)), setup, extra
        # CPU (dry run): eager flex, forward only (FlexAttention has no CPU backward)
        extra["cpu_forward_only"] = True

        def flex_cpu(q, k, v):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return flex_attention(q.detach(), k.detach(), v.detach(), block_mask=bm)
        return flex_cpu, setup, extra
    raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")


@contextlib.contextmanager
def _env(name: str, value):
    """Environment variable `name` set to `value` inside the block (None: left as it is)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def mask_ranges(on: bool):
    """FLASHFUSE_MASK_RANGES=0 while off: the kernels load an interval mask's tiles instead of computing them."""
    from flashfuse.kernels import block_sparse

    return _env(block_sparse.RANGES_ENV, "1" if on else "0")


def strict_kernels(on: bool):
    """FLASHFUSE_STRICT=1: a Triton failure raises (an error row) instead of timing the reference kernel."""
    from flashfuse import ops

    return _env(ops.STRICT_ENV, "1" if on else None)


def _launch_choices() -> list:
    from flashfuse.kernels import launch

    return launch.choices


def _fallbacks() -> int:
    from torch._dynamo.utils import counters

    return int(counters["flashfuse"]["kernel_fallback"])


# --------------------------------------------------------------------------------------------
# the cell

def _row(impl: str, cfg: AttnConfig, pattern: str, window_or_doclen, **extra) -> dict:
    """base_row plus the mask's keys; `variant` = impl:pattern[:param] makes rows of different masks
    distinct for report.py's merge (whose key has no pattern) and names them in the log lines."""
    variant = f"{impl}:{pattern}" + ("" if window_or_doclen is None else f":{window_or_doclen}")
    return base_row(SUITE, impl, cfg, variant=variant, pattern=pattern, window_or_doclen=window_or_doclen, **extra)


def cell(args, runner: Runner, impl: str, cfg: AttnConfig, case: MaskCase | None, inputs, ref: dict, skip: str | None = None,
         keep: dict | None = None) -> dict:
    """Time one impl on one mask: fwd (inputs requiring grad), fwd+bwd, peak memory of fwd+bwd.

    keep: for the PAIRED impls of a host-bound cell, (row, fwd, fwd+bwd callables) go here for
    paired_rounds.
    """
    o = runner.opts
    stats = case.stats if case is not None else {"pattern": "dense", "window_or_doclen": None, "density": 1.0,
                                                 "elem_density": 1.0, "nonempty_blocks": None, "partial_blocks": 0,
                                                 "kept_elements": cfg.B * cfg.H * cfg.N * cfg.N}
    if case is None:
        mb = -(-cfg.N // BLOCK)
        stats["nonempty_blocks"] = mb * mb * cfg.B * cfg.H
    row = _row(impl, cfg, **stats, setup_ms=None)
    skip = skip or runner.skip_reason(impl, cfg)
    if skip:
        row["error"] = skip
        return runner._emit(row, cfg)
    q, k, v, dout = inputs
    fl = 4.0 * cfg.D * stats["kept_elements"]
    ours = impl.startswith("flashfuse")
    fb0 = _fallbacks() if ours else 0
    choices0 = len(_launch_choices())
    caught: list = []
    stage, fn, out = "build", None, None
    try:
        with time_limit(runner.cell_limit()), strict_kernels(ours and o.device == "cuda" and not args.no_strict), \
                mask_ranges(impl != "flashfuse_op_tiles"):
            fn, setup, extra = build_fn(impl, case, cfg.N, o.device, o.kernel)
            cpu_fwd_only = extra.pop("cpu_forward_only", False)
            row.update(extra)
            row["setup_ms"] = setup
            if impl == "sdpa_mask":
                row["sdpa_backend"] = _sdpa_backend(q, k, v, case.keep)
            stage = "fwd"
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = fn(q, k, v)
                sync(o.device)
            row["first_call_s"] = round(time.perf_counter() - t0, 3)
            if case is not None:  # flashfuse_dense computes another function: nothing to compare
                got = out.detach()[:, : min(2, cfg.H)].float().cpu()  # kept on the host: out of every peak
                if "out" not in ref:
                    ref["out"], ref["impl"] = got, impl
                else:
                    err = (got - ref["out"]).abs().max().item()
                    row["max_abs_err"], row["ref_impl"] = err, ref["impl"]
                    if not err <= (OUT_TOL if cfg.dtype in ("bf16", "fp16") else 4e-3):
                        row["note"] = (row.get("note", "") + f" output differs from {ref['impl']} by {err:.3g}").strip()
            out = got = None
            row["fwd_ms"] = bench_ms(lambda: fn(q, k, v), o.device, o.warmup, o.rep)
            row["fwd_tflops"] = tflops(fl, row["fwd_ms"])
            stage = "fwdbwd"
            if cpu_fwd_only:
                raise Unsupported("FlexAttention has no CPU backward")

            def fwdbwd(fn=fn):  # bound now: `fn` is dropped when the cell ends, the callable may be kept
                return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

            common.time_fwdbwd(row, fwdbwd, fl, o)
            if row.get("fwdbwd_ms") is not None and row["fwdbwd_ms"] < HOST_CHECK_BELOW_MS:
                # NB: single 20-call loops of one cell read 660-3348 us on the H100 host (2026-11-22
                # 11:26); the least of five loops is what host_profile.py reports too
                row["host_fwdbwd_us"] = round(common.host_us(fwdbwd, o.device, n=20, repeats=5), 1)
            if o.device == "cuda" and impl in KERNEL_TIME_IMPLS and row.get("fwdbwd_ms") is not None:
                # the GPU work of one fwd+bwd without the host's share: what the scaling-on-kernel-time fit reads
                try:
                    row["gpu_fwdbwd_ms"] = common.kernel_ms(fwdbwd)
                except Exception as e:  # noqa: BLE001  (a profiler failure costs this field, not the row)
                    row["gpu_fwdbwd_error"] = describe_error(e)
            stage = "peak"
            row["peak_mb"], row["peak_delta_mb"] = common.peak_memory_mb(fwdbwd, o.device)
            if keep is not None and impl in PAIRED and row.get("fwdbwd_ms") is not None and row["fwdbwd_ms"] < HOST_CHECK_BELOW_MS:
                # the rounds re-enter this cell's switches (strict kernels, row ranges)
                switches = (ours and o.device == "cuda" and not args.no_strict, impl != "flashfuse_op_tiles")
                keep[impl] = (row, (lambda fn=fn: fn(q, k, v)), fwdbwd, fl, switches)
    except (Exception, CellTimeout) as e:  # noqa: BLE001  (every failure is a row)
        common.record_failure(row, e, stage, caught)
    finally:
        fn = out = None  # noqa: F841
        cleanup(o.device)
    if ours and len(_launch_choices()) > choices0:  # configs the autotuner chose in this cell
        row["autotune_choices"] = [f"{n} {k} -> {c}" for n, k, c in _launch_choices()[choices0:]]
    if ours and _fallbacks() > fb0:
        row["kernel_fallback"] = _fallbacks() - fb0
        row["note"] = (row.get("note", "") + " Triton kernel failed: flashfuse's reference kernel ran").strip()
    return runner._emit(row, cfg)


def paired_rounds(runner: Runner, keep: dict) -> None:
    """Time the kept host-bound cells again in PAIRED_ROUNDS rounds, each impl once per round in
    turn (the order flips every round), and make the medians their fwd_ms / fwdbwd_ms. The
    single-pass values stay in fwd_ms_single / fwdbwd_ms_single. Both impls then see the same
    stretch of the host's load, which a single pass measures seconds apart."""
    o = runner.opts
    rep = max(o.rep / 2, 10.0)
    impls = [i for i in PAIRED if i in keep]
    got = {i: {"fwd_ms": [], "fwdbwd_ms": []} for i in impls}
    fb0 = _fallbacks()
    try:
        with time_limit(runner.cell_limit()):
            for r in range(PAIRED_ROUNDS):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    _, fwd, fwdbwd, _, (strict, ranges) = keep[impl]
                    with strict_kernels(strict), mask_ranges(ranges):
                        got[impl]["fwd_ms"].append(bench_ms(fwd, o.device, o.warmup, rep))
                        got[impl]["fwdbwd_ms"].append(bench_ms(fwdbwd, o.device, o.warmup, rep))
        if _fallbacks() > fb0:
            raise RuntimeError("a Triton kernel fell back to flashfuse's reference kernel")
    except (Exception, CellTimeout) as e:  # noqa: BLE001  (the single-pass values stand)
        for impl in impls:
            row = keep[impl][0]
            row["note"] = (row.get("note", "") + f" paired rounds failed: {describe_error(e)}").strip()
        return
    for impl in impls:
        row, _, _, fl, _ = keep[impl]
        for field, factor in (("fwd_ms", 1.0), ("fwdbwd_ms", common.FWD_BWD_FACTOR)):
            row[field + "_single"] = row[field]
            row[field] = sorted(got[impl][field])[PAIRED_ROUNDS // 2]
            row[field.replace("_ms", "_tflops")] = tflops(fl * factor, row[field])
        row["paired_rounds"] = PAIRED_ROUNDS
        print(f"   paired {impl:14s} {row['variant']}: fwd {row['fwd_ms_single']:.3f} -> {row['fwd_ms']:.3f} ms, fwd+bwd "
              f"{row['fwdbwd_ms_single']:.3f} -> {row['fwdbwd_ms']:.3f} ms (rounds: "
              f"{', '.join(f'{t:.3f}' for t in got[impl]['fwdbwd_ms'])})", flush=True)


# --------------------------------------------------------------------------------------------
# run

def _bench_opts(args):
    if args.dry_run:
        w, r = 1.0, 5.0
    elif args.quick:
        w, r = 5.0, 20.0
    else:
        w, r = 10.0, 50.0
    return (args.warmup_ms if args.warmup_ms is not None else w), (args.rep_ms if args.rep_ms is not None else r)


def run(args, budget: Budget, sink) -> None:
    warmup, rep = _bench_opts(args)
    opts = CellOptions(device=args.device, kernel=args.kernel, warmup=warmup, rep=rep, check_output=True,
                       cell_timeout=args.cell_timeout_s or (60.0 if args.dry_run else 150.0))
    runner = Runner(SUITE, sink, budget, opts)
    impls = _impl_list(args)
    dims, seqs, h, wins, docs = plan(args)
    # the dry run's 256 exercises the "one pattern per N" path at N=512
    once_above = args.sdpa_once_above if args.sdpa_once_above is not None else (256 if args.dry_run else 16384)
    refs: dict = {}
    # Pass 1: ours and Flex over every config; pass 2: SDPA with the mask (dense O(N^2) work), so a
    # short budget costs context, not the goals.
    for pass_impls in ([i for i in impls if i in PASS1], [i for i in impls if i not in PASS1]):
        if not pass_impls:
            continue
        for d in dims:
            for n in seqs:
                run_group(args, runner, d, n, h, wins, docs, pass_impls, once_above, refs)


def run_group(args, runner: Runner, d: int, n: int, h: int, wins, docs, impls: list, once_above: int, refs: dict) -> None:
    """Every pattern at one (D, N): the inputs are shared, Dynamo is reset once."""
    dev = args.device
    torch._dynamo.reset()
    cfg0 = AttnConfig(args.dtype, 1, h, n, d, False, 0.0)
    inputs = None
    try:
        if runner.skip_reason() is None:
            inputs = make_inputs(cfg0, dev)
    except Exception as e:  # noqa: BLE001
        for pat, param in patterns(n, wins, docs, not args.no_causal):
            for impl in [i for i in impls if i != "flashfuse_dense"]:
                cfg = AttnConfig(args.dtype, 1, h, n, d, is_causal(pat), 0.0)
                runner._emit(_row(impl, cfg, pattern=pat, window_or_doclen=param, error=describe_error(e)), cfg)
        cleanup(dev)
        return
    sdpa_done = False
    for pat, param in patterns(n, wins, docs, not args.no_causal):
        cfg = AttnConfig(args.dtype, 1, h, n, d, is_causal(pat), 0.0)
        todo = [i for i in impls if i != "flashfuse_dense"]
        if not todo:
            continue
        if inputs is None or runner.skip_reason() is not None:
            for impl in todo:
                runner._emit(_row(impl, cfg, pattern=pat, window_or_doclen=param,
                                      error=runner.skip_reason() or "skipped"), cfg)
            continue
        case = None
        try:
            case = MaskCase(pat, param, n, cfg.B, cfg.H, dev)
        except (Exception, CellTimeout) as e:  # noqa: BLE001
            for impl in todo:
                runner._emit(_row(impl, cfg, pattern=pat, window_or_doclen=param,
                                      error=f"mask: {describe_error(e)}"), cfg)
            cleanup(dev)
            continue
        s = case.stats
        print(f"-- {pat} {param if param is not None else ''} N={n} D={d}: block density {s['density']:.4f}, "
              f"elements {s['elem_density']:.4f}, mask summary {case.summary_ms:.1f} ms", flush=True)
        ref = refs.setdefault((d, n, pat, param), {})
        keep: dict = {}
        for impl in todo:
            skip = None
            if impl == "sdpa_mask" and once_above and n > once_above:
                if sdpa_done:
                    skip = (f"skipped: sdpa_mask runs on one pattern per N above {once_above} (it computes every block "
                            f"whatever the mask; --sdpa-once-above 0 runs all)")
                else:
                    sdpa_done = True
            if impl == "flashfuse_layout" and case.n_partial:
                skip = (f"unsupported: {pat} has {case.n_partial} partially masked 128x128 blocks; a layout block is "
                        f"computed in full (use the mask: flashfuse_op)")
            cell(args, runner, impl, cfg, case, inputs, ref, skip, keep)
        if "flex" in keep and len(keep) > 1:
            paired_rounds(runner, keep)
        keep.clear()
        case.free()
        case = None
        cleanup(dev)
    if "flashfuse_dense" in impls:
        cell(args, runner, "flashfuse_dense", cfg0, None, inputs, {})
    inputs = None
    cleanup(dev)


# --------------------------------------------------------------------------------------------
# goals

def _ckey(r):
    return (r.get("dtype"), r.get("B"), r.get("H"), r.get("N"), r.get("D"), r.get("pattern"), r.get("window_or_doclen"))


def _label(k):
    dt, b, h, n, d, pat, param = k
    return f"N={n} D={d} {pat}{'' if param is None else f' {param}'}"


def _rows(rows):
    return [r for r in rows if r.get("suite") == SUITE and r.get("N")]


def _speedups(rows, ours, peer, field, single: bool = False):
    """{config: peer ms / ours ms}; single: the single-pass times where rows were paired (paired_rounds)."""
    def ms(r):
        return r.get(field + "_single", r.get(field)) if single else r.get(field)

    by = {(r["impl"], _ckey(r)): ms(r) for r in _rows(rows) if ms(r) is not None and r.get("pattern") != "dense"}
    return {k: by[(peer, k)] / t for (impl, k), t in by.items() if impl == ours and (peer, k) in by}


def loglog_fit(points):
    """Least squares log(y) = a + b log(x): (b, R^2, n) or None with fewer than 3 points / one x."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x and y and x > 0 and y > 0]
    if len(pts) < 3:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    syy = sum((p[1] - my) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    if sxx <= 0:
        return None
    b = sxy / sxx
    r2 = (sxy * sxy) / (sxx * syy) if syy > 0 else 1.0
    return b, r2, len(pts)


def _scaling_points(rows, impl, d, field, n=None):
    return [(r["nonempty_blocks"], r[field]) for r in _rows(rows)
            if r["impl"] == impl and r.get("D") == d and r.get("pattern") not in (None, "dense")
            and r.get(field) is not None and r.get("nonempty_blocks") and (n is None or r["N"] == n)]


def _scaling_goal(rows, d: int, field: str, impls, name: str, at_largest_n: bool = False) -> dict:
    """The goal row of a log-log fit of `field` against non-empty blocks (flashfuse_op decides met)."""
    vals, notes, n, met = {}, [], 0, None
    for impl in impls:
        fit = loglog_fit(_scaling_points(rows, impl, d, field))
        vals[impl] = fit[0] if fit else None
        if fit:
            notes.append(f"{impl}: b={fit[0]:.3f} R2={fit[1]:.3f} n={fit[2]}")
        if impl == "flashfuse_op":
            n = fit[2] if fit else 0
            met = None if fit is None else bool(LINEAR_LO <= fit[0] <= LINEAR_HI)
            if at_largest_n:
                big = max((r["N"] for r in _rows(rows) if r["impl"] == impl and r.get("D") == d and r.get(field) is not None
                           and r.get("pattern") not in (None, "dense")), default=None)
                fit_big = loglog_fit(_scaling_points(rows, impl, d, field, big)) if big else None
                if fit_big:
                    notes.append(f"at N={big} only: b={fit_big[0]:.3f} R2={fit_big[1]:.3f}")
    return {"goal": name, "target": f"b in [{LINEAR_LO}, {LINEAR_HI}]", "op": "in", "threshold": [LINEAR_LO, LINEAR_HI],
            "values": vals, "n": n, "worst": "", "met": met, "note": "; ".join(notes)}


def compute_goals(rows) -> list:
    goals = []
    for peer in ("flex", "sdpa_mask"):
        for fname, field in (("fwd", "fwd_ms"), ("fwd+bwd", "fwdbwd_ms")):
            vals, n, worst = {}, 0, ""
            for ours in OURS:
                ratios = _speedups(rows, ours, peer, field)
                vals[ours] = geomean(ratios.values())
                if ours == "flashfuse_op":
                    n = len(ratios)
                    if ratios:
                        k = min(ratios, key=ratios.get)
                        worst = f"min {ratios[k]:.2f}x at {_label(k)}"
            note = "(flashfuse_layout: document masks only)" if vals.get("flashfuse_layout") is not None else ""
            paired = sum(1 for r in _rows(rows) if r.get("impl") == "flashfuse_op" and r.get("paired_rounds"))
            single = geomean(_speedups(rows, "flashfuse_op", peer, field, single=True).values()) if paired else None
            if single is not None:
                against = "alternating with flex" if peer == "flex" else f"against single passes of {peer}"
                note = (note + f" flashfuse_op: {paired} host-bound configs timed in {PAIRED_ROUNDS} rounds {against} "
                        f"(paired_rounds); single-pass geomean {single:.3f}x").strip()
            goals.append(common.goal(f"block-sparse {fname} vs {peer}, same mask (speedup, geomean)", ">= 1.0x", ">=", 1.0,
                                     vals, n, worst, note))
    for d in sorted({r["D"] for r in _rows(rows) if r.get("D")}):
        for fname, field in (("fwd+bwd", "fwdbwd_ms"), ("fwd", "fwd_ms")):
            goals.append(_scaling_goal(rows, d, field, ("flashfuse_op", "flex"),
                                       f"scaling {fname} D={d}: exponent b of ms ~ nonempty_blocks^b (log-log fit, all N and patterns)",
                                       at_largest_n=True))
        # The same fit on GPU kernel time (gpu_fwdbwd_ms): the wall-clock fits above include each
        # call's fixed host time, which flattens the small cells; this one shows how the work scales.
        goal = _scaling_goal(rows, d, "gpu_fwdbwd_ms", KERNEL_TIME_IMPLS,
                             f"scaling fwd+bwd D={d}, GPU kernel time (torch.profiler): exponent b of ms ~ nonempty_blocks^b "
                             "(all N and patterns)")
        if goal["n"]:
            goals.append(goal)
    return goals


# --------------------------------------------------------------------------------------------
# markdown, plot

def _cell(r, field_ms, field_tf=None):
    if r is None:
        return ""
    if r.get(field_ms) is not None:
        s = f"{r[field_ms]:.3g}"
        if field_tf and r.get(field_tf) is not None:
            s += f" ({r[field_tf]:.0f})" if r[field_tf] >= 1 else f" ({r[field_tf]:.2g})"
        return s
    return error_kind(r.get("error")) or "?"


def render_markdown(rows, goals, meta) -> str:
    main = _rows(rows)
    impls = [i for i in IMPLS if any(r["impl"] == i for r in main)]
    by = {(r["impl"], _ckey(r)): r for r in main}
    keys = list(dict.fromkeys(_ckey(r) for r in main if r.get("pattern") not in (None, "dense")))
    dense = {(r["dtype"], r["B"], r["H"], r["N"], r["D"]): r for r in main if r["impl"] == "flashfuse_dense"}
    out = [f"# Block-sparse attention ({meta.get('mode')})", "",
           f"GPU: {meta.get('gpu')} | torch {meta.get('torch')} | triton {meta.get('triton')} | commit {meta.get('git_commit')} | {meta.get('date')}", "",
           "Cells: ms (TFLOP/s on kept elements: FLOPs = 4*B*H*D*kept, fwd+bwd 3.5x). Median of triton.testing.do_bench. "
           "density = non-empty 128x128 blocks / all blocks; elem = kept elements / N^2. "
           "`flashfuse_dense` = flashfuse with no mask (every block), the same in every row of one N and D. "
           "flex/op = Flex ms / flashfuse_op ms (> 1: flashfuse faster).", ""]
    dims = list(dict.fromkeys(k[4] for k in keys))
    for d in dims:
        dk = [k for k in keys if k[4] == d]
        for title, fms, ftf in (("fwd+bwd", "fwdbwd_ms", "fwdbwd_tflops"), ("fwd", "fwd_ms", "fwd_tflops")):
            table = []
            for k in dk:
                dt, b, h, n, _, pat, param = k
                any_r = next((by[(i, k)] for i in impls if (i, k) in by), {})
                cells = []
                for i in impls:
                    r = dense.get((dt, b, h, n, d)) if i == "flashfuse_dense" else by.get((i, k))
                    cells.append(_cell(r, fms, ftf))
                op, fx = by.get(("flashfuse_op", k)), by.get(("flex", k))
                ratio = f"{fx[fms] / op[fms]:.2f}" if op and fx and op.get(fms) and fx.get(fms) else ""
                table.append([n, pat, "" if param is None else param, f"{100 * any_r.get('density', 0):.2f}%",
                              f"{100 * any_r.get('elem_density', 0):.2f}%", *cells, ratio])
            out += [f"## D={d}: {title} ms (TFLOP/s)", "",
                    md_table(["N", "pattern", "window / doc len", "density", "elem", *impls, "flex/op"], table), ""]
        table = []
        for k in dk:
            dt, b, h, n, _, pat, param = k
            cells = []
            for i in ("flashfuse_op", "flashfuse_layout", "flex"):
                r = by.get((i, k))
                cells.append(common.fmt(r.get("setup_ms"), 2) if r else "")
            for i in ("flashfuse_op", "flex"):
                r = by.get((i, k))
                cells.append(common.fmt(r.get("host_fwdbwd_us"), 0) if r else "")
            for i in impls:
                r = by.get((i, k)) if i != "flashfuse_dense" else dense.get((dt, b, h, n, d))
                cells.append("" if r is None else (f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else (error_kind(r.get("error")) or "")))
            table.append([n, pat, "" if param is None else param, *cells])
        out += [f"## D={d}: setup ms, host us and peak MB of fwd+bwd", "",
                "setup: flashfuse_op = block summary of the mask (computed on the first call, then cached per mask tensor); "
                "flashfuse_layout = the same plus the layout; flex = create_block_mask (a warm call; compiled above "
                f"N={FLEX_EAGER_MASK_MAX_N}). host: microseconds of host time per fwd+bwd (the least of five loops of 20 calls issued without "
                "waiting for the GPU); a fwd+bwd time near it is host-bound. Peak includes q, k, v, dout, grads and the "
                "N x N bool mask (built for every impl).", "",
                md_table(["N", "pattern", "window / doc len", "setup op", "setup layout", "setup flex", "host op", "host flex",
                          *[f"peak {i}" for i in impls]], table), ""]
    sd = [r for r in main if r["impl"] == "sdpa_mask" and r.get("sdpa_backend")]
    if sd:
        out += ["SDPA backend chosen with the mask: " + ", ".join(sorted({r["sdpa_backend"] for r in sd})), ""]
    out += ["Not listed below: `flashfuse_layout` on sliding-window and causal masks is `unsup.` (their diagonal "
            "blocks are partial, and a layout block is computed in full); `sdpa_mask` is `skipped` on all but one "
            "pattern per N above --sdpa-once-above (its time does not depend on the mask).", ""]
    quiet = ("skipped: sdpa_mask runs on one", "unsupported: sliding has", "unsupported: causal has")
    errs = [r for r in main if r.get("error") and not str(r["error"]).startswith(quiet)]
    notes = [r for r in main if r.get("note")]
    if errs or notes:
        out += ["## Errors and notes", "", md_table(["impl", "config", "error / note"],
                [[r["impl"], _label(_ckey(r)), ((r.get("error") or "") + (" " + r["note"] if r.get("note") else "")).strip()[:300]]
                 for r in errs + notes]), ""]
    out += ["## Goals", "",
            "Speedups: peer ms / flashfuse ms over configs both ran (masked patterns). Scaling: exponent b of a "
            "least-squares fit of log ms on log non-empty blocks (values are b, not speedups); near-linear = "
            f"b in [{LINEAR_LO}, {LINEAR_HI}].", "", goals_markdown(goals), ""]
    return "\n".join(out)


def plot(rows, path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in _rows(rows) if r.get("fwdbwd_ms") is not None]
    panels = []
    for d in sorted({r["D"] for r in main}):
        for fam in ("sliding", "document"):
            ns = [r["N"] for r in main if r["D"] == d and r.get("pattern") == fam]
            if ns:
                panels.append((d, fam, max(ns)))
    if not panels:
        return
    ncol = min(2, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 4.4 * nrow), squeeze=False)
    colors = {i: plt.cm.tab10(j) for j, i in enumerate(IMPLS)}
    for ax, (d, fam, n) in zip(axes.flat, panels):
        at = [r for r in main if r["D"] == d and r["N"] == n]
        for i in IMPLS:
            pts = sorted((r["density"], r["fwdbwd_ms"]) for r in at if r["impl"] == i and r.get("pattern") == fam)
            style = dict(color=colors[i], lw=2.2 if i.startswith("flashfuse") else 1.3, ls="-" if i.startswith("flashfuse") else "--")
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=4, label=i, **style)
            causal = [(r["density"], r["fwdbwd_ms"]) for r in at if r["impl"] == i and r.get("pattern") == "causal"]
            if causal:
                ax.plot([causal[0][0]], [causal[0][1]], marker="*", ms=11, ls="none", color=colors[i],
                        label=None if pts else i)
            if i == "flashfuse_dense":
                dn = [r["fwdbwd_ms"] for r in at if r["impl"] == i]
                if dn:
                    ax.axhline(dn[0], color=colors[i], ls=":", lw=1.5, label="flashfuse_dense (no mask)")
        op = sorted((r["density"], r["fwdbwd_ms"]) for r in at if r["impl"] == "flashfuse_op" and r.get("pattern") in (fam, "causal"))
        if len(op) >= 2:
            x0, y0 = op[0]
            x1 = op[-1][0]
            ax.plot([x0, x1], [y0, y0 * x1 / x0], color="gray", ls=(0, (1, 3)), lw=1, label="linear in blocks")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("block density (non-empty 128x128 blocks); * = dense causal")
        ax.set_ylabel("fwd+bwd ms")
        what = "window" if fam == "sliding" else "document length"
        ax.set_title(f"{fam} ({what} varies), N={n}, D={d}, B={at[0]['B']}, H={at[0]['H']}, {at[0]['dtype']}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"flashfuse block-sparse attention — {meta.get('gpu')} — torch {meta.get('torch')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI: like common.main_for, but --impls takes this suite's impl names

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    add_args(p)
    args = p.parse_args(argv)
    impls, args.impls = args.impls, None  # common validates against the kernel sweep's names
    common.resolve_common(args)
    args.impls = impls
    if impls:
        names = [i.strip() for i in impls.split(",") if i.strip()]
        bad = [i for i in names if i not in IMPLS and i not in common.IMPLS]
        if bad:
            raise SystemExit(f"unknown impls {bad}; valid here: {', '.join(IMPLS)}")
        other = [i for i in names if i not in IMPLS]  # kernel-sweep names (run_all --isolate passes them on)
        if other:
            print(f"block_sparse: ignoring impls of other suites: {', '.join(other)}", flush=True)
    common.run_suite(sys.modules[__name__], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
