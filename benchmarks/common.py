"""Shared pieces of the flashfuse benchmark suites.

Environment info, time budget and per-cell time limits, error classification, timing
(triton.testing.do_bench on CUDA, a wall-clock loop on the CPU), FLOP counting, the
attention implementations compared (one function per impl name), the cell runner that turns
every failure into a row with an `error` key, and the JSON / markdown / PNG writers.

Every suite module (kernel_sweep, memory_scaling, end_to_end) exposes
    SUITE, add_args(parser), run(args, budget, sink) -> None,
    compute_goals(rows) -> list[dict], render_markdown(rows, goals, meta) -> str, plot(rows, path)
so that run_all.py and report.py can drive them in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
RESULTS_DIR = os.path.join(HERE, "results")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IMPLS = ("flashfuse", "flashfuse_op", "sdpa_flash", "sdpa_cudnn", "sdpa_mem_efficient", "flex", "eager", "inductor")
# Run order inside one config: references first (the output check compares against the first
# reference that ran), our two ways next, the slow O(N^2) ones last.
RUN_ORDER = ("sdpa_flash", "sdpa_cudnn", "sdpa_mem_efficient", "flashfuse_op", "flashfuse", "flex", "eager", "inductor")
REFERENCE_IMPLS = ("sdpa_flash", "sdpa_cudnn", "sdpa_mem_efficient", "eager")
ROW_KEYS = ("suite", "impl", "dtype", "B", "H", "N", "D", "causal", "dropout",
            "fwd_ms", "fwd_tflops", "fwdbwd_ms", "fwdbwd_tflops", "peak_mb")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FWD_BWD_FACTOR = 3.5          # fwd+bwd FLOPs = 3.5 x fwd FLOPs (2.5x for the backward's 5 matmuls)
TOKENS_PER_BATCH = 16384      # kernel sweep: B = 16384 // N
MODEL_WIDTH = 2048            # kernel sweep: H = 2048 // D


# --------------------------------------------------------------------------------------------
# environment

def git_commit() -> str:
    env = os.environ.get("FLASHFUSE_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except Exception:
        pass
    return "unknown"


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "unknown")
    except Exception:
        return None


def _dist_version(dist: str) -> Optional[str]:
    # from the package metadata: importing transformers/timm pulls in torchvision
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "gpu": None,
        "gpu_count": 0,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "flashfuse": _version("flashfuse"),
        "transformers": _dist_version("transformers"),  # model code decides what reaches the pass
        "timm": _dist_version("timm"),
        "argv": sys.argv,
        # settings that change what flashfuse runs (autotune tiers and timing, compile threads, caches)
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("FLASHFUSE_", "TRITON_", "TORCHINDUCTOR_"))},
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        try:
            info["cudnn"] = torch.backends.cudnn.version()
        except Exception:
            pass
    else:
        info["gpu"] = f"none (CPU: {platform.processor() or platform.machine()})"
    return info


def show_flashfuse_warnings() -> None:
    """Print the flashfuse logger's warnings (a kernel that fell back to the reference, say) to
    stderr: the package installs only a NullHandler, which would hide them from benchmark logs."""
    import logging

    log = logging.getLogger("flashfuse")
    if not any(isinstance(h, logging.StreamHandler) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s %(message)s"))
        log.addHandler(handler)


def configure_dynamo() -> None:
    """Many shapes are compiled per process: raise the recompile limits so that neither Dynamo
    nor FlexAttention silently falls back to eager (flex would then run an O(N^2) path)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 1024)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 8192)


# --------------------------------------------------------------------------------------------
# budget, time limits, errors

class Budget:
    """A wall-clock deadline shared by the cells of a run; `child` carves out a share."""

    def __init__(self, seconds: Optional[float]):
        self.start = time.monotonic()
        self.seconds = seconds if seconds and seconds > 0 else None
        self.deadline = self.start + self.seconds if self.seconds else math.inf

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self, need: float = 0.0) -> bool:
        return self.left() <= need

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def child(self, fraction: float, floor: float = 0.0) -> "Budget":
        if self.seconds is None:
            return Budget(None)
        return Budget(max(floor, self.left() * fraction))


class CellTimeout(BaseException):
    """A BaseException, so that no `except Exception` inside torch (autotuning, fallbacks) swallows it."""


class Unsupported(Exception):
    """A peer cannot run this config at all (the row says "unsupported: ...")."""


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise CellTimeout in the main thread after `seconds` (SIGALRM); a no-op elsewhere."""
    usable = (seconds is not None and math.isfinite(seconds) and hasattr(signal, "SIGALRM")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return
    seconds = max(1.0, float(seconds))

    def _raise(signum, frame):
        raise CellTimeout(f"timeout: cell stopped after {seconds:.0f}s (per-cell limit or time budget)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_BROKEN_MARKERS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                   "misaligned address", "illegal instruction", "cuda error: an illegal")


def describe_error(exc: BaseException, extra: str = "") -> str:
    """One line for the `error` key: "OOM: ...", "unsupported: ...", "timeout: ..." or "Type: msg"."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    low = text.lower()
    if isinstance(exc, CellTimeout):
        out = text
    elif isinstance(exc, Unsupported):
        out = f"unsupported: {text}"
    elif isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in low or "can't allocate memory" in low:
        out = f"OOM: {first[:200]}"
    elif "no available kernel" in low or "no viable backend" in low:
        out = f"unsupported: {first[:200]}"
    else:
        # Backend wrappers (BackendCompilerFailed, ...) put the real cause at the end.
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        tail = next((ln for ln in lines if "Error" in ln and ln != first), "")
        out = f"{type(exc).__name__}: {first[:300]}" + (f" | {tail[:200]}" if tail else "")
    if extra:
        extra = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", extra).strip()
        out += f" [{extra[:300]}]" if extra else ""
    out = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", out)
    return out


def record_failure(row: dict, exc: BaseException, stage: str, caught) -> None:
    """Fill a cell's row with its error: every failure is a row. `caught`: warnings seen."""
    hints = ""
    if stage in ("build", "fwd"):
        hints = "; ".join(sorted({str(w.message).splitlines()[0][:150] for w in caught if "kernel" in str(w.message).lower()}))
    msg = describe_error(exc, hints)
    row["error"] = msg if stage in ("build", "fwd") or msg.startswith(("OOM", "timeout")) else f"{stage}: {msg}"
    row["error_stage"] = stage


def error_kind(err: Optional[str]) -> str:
    """Short tag for tables."""
    if not err:
        return ""
    e = err.lower()
    if e.startswith("oom") or "out of memory" in e:
        return "OOM"
    if e.startswith("unsupported"):
        return "unsup."
    if e.startswith("skipped: time budget"):
        return "skipped"
    if e.startswith("skipped"):
        return "skipped"
    if e.startswith("timeout"):
        return "timeout"
    if e.startswith("fwdbwd"):
        return "bwd err"
    return "error"


def breaks_context(err: str) -> bool:
    low = err.lower()
    return any(m in low for m in _BROKEN_MARKERS)


def cleanup(device: str) -> None:
    gc.collect()  # after settle(), only the objects made since: cheap
    if device == "cuda" and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def settle(device: str) -> None:
    """Between configs: free everything, then freeze the survivors out of later collections.

    NB: a full gc.collect() in a process that has compiled a few graphs took 0.2 s here (460K
    objects); a sweep that collected two or three times per cell spent minutes in the collector.
    After gc.freeze() the per-cell cleanup() only walks objects made since.
    """
    gc.collect()
    gc.freeze()
    cleanup(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# timing, memory, flops

def bench_ms(fn: Callable[[], Any], device: str, warmup: float, rep: float) -> float:
    """Median ms. CUDA: triton.testing.do_bench (warmup/rep in ms). CPU: a wall-clock loop."""
    if device == "cuda":
        import triton.testing

        try:
            return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        except TypeError:  # older Triton without return_mode
            return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5]))
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < end:
        fn()
    times = []
    end = time.perf_counter() + max(rep / 1e3, 0.0)
    min_reps = 1 if first * 1e3 > rep else 3
    while len(times) < min_reps or (time.perf_counter() < end and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def time_fwdbwd(row: dict, fwdbwd: Callable[[], Any], fwd_flops: float, o) -> None:
    """First (compiling) call, then the median fwd+bwd time and its TFLOP/s, into `row`."""
    t0 = time.perf_counter()
    fwdbwd()
    sync(o.device)
    row["first_fwdbwd_s"] = round(time.perf_counter() - t0, 3)
    row["fwdbwd_ms"] = bench_ms(fwdbwd, o.device, o.warmup, o.rep)
    row["fwdbwd_tflops"] = tflops(fwd_flops * FWD_BWD_FACTOR, row["fwdbwd_ms"])


def host_us(fn: Callable[[], Any], device: str, n: int = 20, repeats: int = 1) -> float:
    """Host microseconds per call of fn: the wall time of n calls issued without waiting for the
    GPU (it catches up afterwards); the least of `repeats` such loops. A cell whose median GPU
    time is near this is host-bound."""
    best = float("inf")
    for _ in range(max(repeats, 1)):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        sync(device)
    return best


def cuda_profile(fn: Callable[[], Any], iters: int):
    """torch.profiler (CUDA activity) over `iters` calls of fn, after one warm call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return prof


def kernel_ms(fn: Callable[[], Any], iters: int = 3) -> Optional[float]:
    """GPU time per call of fn: how long the GPU was busy with the device events (kernels,
    memsets, copies) torch.profiler records over `iters` calls, divided by iters. Host time and
    the gaps between kernels are left out, so this is the work a call puts on the GPU. Events
    that overlap (flashfuse's dQ runs on a second stream beside dK/dV) count once: the union of
    their intervals, which is their summed durations when nothing overlaps."""
    from torch.autograd import DeviceType

    prof = cuda_profile(fn, iters)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    return busy_us(spans) / iters / 1e3 if spans else None


def busy_us(spans) -> float:
    """Total length of the union of sorted (start, end) intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in spans:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def peak_memory_mb(fn: Callable[[], Any], device: str) -> tuple[Optional[float], Optional[float]]:
    """(peak MB, peak minus what was allocated before the call) of one call, or (None, None) on CPU."""
    if device != "cuda":
        fn()
        return None, None
    cleanup(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - base) / 2**20


def attn_flops(B: int, H: int, N: int, D: int, causal: bool) -> float:
    """Forward FLOPs: 4*B*H*N^2*D (two matmuls), halved for causal."""
    f = 4.0 * B * H * N * N * D
    return f / 2 if causal else f


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    if not ms or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def geomean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    if not xs:
        return None
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


# --------------------------------------------------------------------------------------------
# attention implementations

@dataclasses.dataclass(frozen=True)
class AttnConfig:
    dtype: str
    B: int
    H: int
    N: int
    D: int
    causal: bool
    dropout: float

    def label(self) -> str:
        return f"{self.dtype} B={self.B} H={self.H} N={self.N} D={self.D} causal={int(self.causal)} p={self.dropout:g}"

    def family(self) -> tuple:
        """Everything but N (and B, H that follow from it)."""
        return (self.dtype, self.D, self.causal, self.dropout)


def plain_attention(q, k, v, causal: bool, dropout_p: float, bias=None):
    """Attention as users write it by hand: what the flashfuse backend detects and fuses.

    s = (q @ k^T) * scale [+ bias]; s = s.masked_fill(causal_mask, -inf)
    p = softmax(s.float()).to(q.dtype); p = dropout(p); out = p @ v
    """
    scale = q.shape[-1] ** -0.5
    s = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias
    if causal:
        n, m = q.shape[-2], k.shape[-2]
        causal_mask = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(causal_mask, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p, training=True)
    return p @ v


# Distinct top-level functions (distinct code objects) for each compiled impl, so that the
# Dynamo caches of flashfuse and Inductor never share entries. causal/dropout are closure
# constants, which Dynamo specializes on (the pass sees a constant dropout probability).
def _eager_entry(causal, dropout_p, with_bias):
    if with_bias:
        def eager_attention_bias(q, k, v, bias):
            return plain_attention(q, k, v, causal, dropout_p, bias)
        return eager_attention_bias

    def eager_attention(q, k, v):
        return plain_attention(q, k, v, causal, dropout_p)
    return eager_attention


def _inductor_entry(causal, dropout_p, with_bias):
    if with_bias:
        def inductor_attention_bias(q, k, v, bias):
            return plain_attention(q, k, v, causal, dropout_p, bias)
        return inductor_attention_bias

    def inductor_attention(q, k, v):
        return plain_attention(q, k, v, causal, dropout_p)
    return inductor_attention


def _flashfuse_entry(causal, dropout_p, with_bias):
    if with_bias:
        def flashfuse_attention_bias(q, k, v, bias):
            return plain_attention(q, k, v, causal, dropout_p, bias)
        return flashfuse_attention_bias

    def flashfuse_attention(q, k, v):
        return plain_attention(q, k, v, causal, dropout_p)
    return flashfuse_attention


_SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_mem_efficient": "EFFICIENT_ATTENTION"}
_flex_compiled = None


def _flex():
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def build_impl(impl: str, cfg: AttnConfig, device: str, kernel: str, with_bias: bool = False) -> Callable:
    """fn(q, k, v) (or fn(q, k, v, bias) with with_bias) for one impl and config.

    Raises Unsupported for configs a peer cannot run at all; everything else is left to fail
    at call time, where the cell runner records it.
    """
    causal, p = cfg.causal, cfg.dropout
    if impl == "eager":
        return _eager_entry(causal, p, with_bias)
    if impl == "inductor":
        return torch.compile(_inductor_entry(causal, p, with_bias), dynamic=False)
    if impl == "flashfuse":
        importlib.import_module("flashfuse")  # registers the backend

        return torch.compile(_flashfuse_entry(causal, p, with_bias), backend="flashfuse",
                             options={"compiler": "inductor", "kernel": kernel}, dynamic=False)
    if impl == "flashfuse_op":
        import flashfuse

        if with_bias:
            return lambda q, k, v, bias: flashfuse.attention(q, k, v, bias=bias, causal=causal, dropout_p=p, kernel=kernel)
        return lambda q, k, v: flashfuse.attention(q, k, v, causal=causal, dropout_p=p, kernel=kernel)
    if impl in _SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if device != "cuda" and impl != "sdpa_flash":
            raise Unsupported(f"{impl} is CUDA-only")

        backend = getattr(SDPBackend, _SDPA_BACKENDS[impl])
        if with_bias:
            if causal:
                raise Unsupported("bias + causal not combined in this test")

            def sdpa_bias(q, k, v, bias):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
            return sdpa_bias

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        return sdpa
    if impl == "flex":
        if p > 0:
            raise Unsupported("FlexAttention has no dropout")
        from torch.nn.attention.flex_attention import create_block_mask

        flex = _flex()
        block_mask = create_block_mask(_causal_mask_mod, B=None, H=None, Q_LEN=cfg.N, KV_LEN=cfg.N, device=device) if causal else None
        if with_bias:
            def flex_bias(q, k, v, bias):
                def score_mod(score, b, h, q_idx, kv_idx):
                    return score + bias[b, h, q_idx, kv_idx]
                return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
            return flex_bias
        return lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")


def make_inputs(cfg: AttnConfig, device: str, seed: int = 0):
    """q, k, v (requiring grad) and dout, [B, H, N, D], drawn on the device from a seeded generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[cfg.dtype]
    shape = (cfg.B, cfg.H, cfg.N, cfg.D)

    def t():
        return torch.randn(shape, generator=g, device=device, dtype=dt)

    q, k, v = (t().requires_grad_(True) for _ in range(3))
    return q, k, v, t()


def flashfuse_fused_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["flashfuse"]["fused"])


def flashfuse_refusals() -> dict:
    from torch._dynamo.utils import counters

    return {k: int(v) for k, v in counters["flashfuse"].items() if k != "fused"}


def base_row(suite: str, impl: str, cfg: Optional[AttnConfig] = None, **extra) -> dict:
    row = {k: None for k in ROW_KEYS}
    row["suite"], row["impl"] = suite, impl
    if cfg is not None:
        row.update(dtype=cfg.dtype, B=cfg.B, H=cfg.H, N=cfg.N, D=cfg.D, causal=cfg.causal, dropout=cfg.dropout)
    row.update(extra)
    return row


@dataclasses.dataclass
class CellOptions:
    device: str
    kernel: str
    warmup: float = 25.0
    rep: float = 100.0
    cell_timeout: float = 180.0
    measure_fwd: bool = True
    measure_fwdbwd: bool = True
    check_output: bool = True


class Runner:
    """Runs cells under the budget; every outcome is a row (errors included)."""

    def __init__(self, suite: str, sink: "ResultSink", budget: Budget, opts: CellOptions):
        self.suite, self.sink, self.budget, self.opts = suite, sink, budget, opts
        self.broken: Optional[str] = None
        self.oom_at: dict = {}   # (impl, family) -> smallest N that ran out of memory

    def skip_reason(self, impl: Optional[str] = None, cfg: Optional[AttnConfig] = None) -> Optional[str]:
        if self.broken:
            return f"skipped: the CUDA context broke earlier ({self.broken[:120]})"
        if self.budget.expired():
            return "skipped: time budget"
        if impl is not None and cfg is not None:
            n_oom = self.oom_at.get((impl, cfg.family()))
            if n_oom is not None and cfg.N > n_oom:
                return f"OOM: not run, it ran out of memory at N={n_oom}"
        return None

    def cell_limit(self) -> float:
        return max(1.0, min(self.opts.cell_timeout, self.budget.left() + 5.0))

    def note_error(self, row: dict, cfg: Optional[AttnConfig] = None) -> None:
        err = row.get("error")
        if not err:
            return
        if breaks_context(err) and self.opts.device == "cuda":
            self.broken = err
        if cfg is not None and error_kind(err) == "OOM" and not err.startswith(("OOM: not run", "OOM: fwd+bwd not run")):
            stage = row.get("error_stage", "fwd")
            key = (row["impl"], cfg.family()) if stage in ("build", "fwd") else (row["impl"], cfg.family(), "bwd")
            self.oom_at[key] = min(cfg.N, self.oom_at.get(key, cfg.N))

    def attention_cell(self, impl: str, cfg: AttnConfig, inputs, ref: Optional[dict] = None) -> dict:
        """Time one impl on one config: fwd (grad enabled), fwd+bwd, peak memory of fwd+bwd.

        `ref` is a dict shared across the impls of one config: the first reference impl to run
        stores its output there and later impls report their max abs difference to it.
        """
        o = self.opts
        row = base_row(self.suite, impl, cfg)
        cell_t0 = time.perf_counter()
        skip = self.skip_reason(impl, cfg)
        if skip:
            row["error"] = skip
            return self._emit(row, cfg)
        bwd_oom = self.oom_at.get((impl, cfg.family(), "bwd"))
        do_bwd = o.measure_fwdbwd and not (bwd_oom is not None and cfg.N > bwd_oom)
        q, k, v, dout = inputs
        fl = attn_flops(cfg.B, cfg.H, cfg.N, cfg.D, cfg.causal)
        fused0 = flashfuse_fused_count() if impl == "flashfuse" else 0
        caught: list = []
        stage, fn, out = "build", None, None
        try:
            with time_limit(self.cell_limit()):
                fn = build_impl(impl, cfg, o.device, o.kernel)
                stage = "fwd"
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = fn(q, k, v)
                    sync(o.device)
                row["first_call_s"] = round(time.perf_counter() - t0, 3)
                if impl == "flashfuse":
                    row["fused"] = flashfuse_fused_count() - fused0
                    if row["fused"] == 0:
                        row["note"] = "not fused: flashfuse left the graph to Inductor " + str(flashfuse_refusals())
                if o.check_output and ref is not None and cfg.dropout == 0:
                    if "out" not in ref and impl in REFERENCE_IMPLS:
                        ref["out"], ref["impl"] = out.detach(), impl
                    elif "out" in ref:
                        err = (out.detach().float() - ref["out"].float()).abs().max().item()
                        row["max_abs_err"], row["ref_impl"] = err, ref["impl"]
                        if not err <= (0.08 if cfg.dtype in ("bf16", "fp16") else 4e-3):
                            row["note"] = (row.get("note", "") + f" output differs from {ref['impl']} by {err:.3g}").strip()
                out = None
                if o.measure_fwd:
                    row["fwd_ms"] = bench_ms(lambda: fn(q, k, v), o.device, o.warmup, o.rep)
                    row["fwd_tflops"] = tflops(fl, row["fwd_ms"])
                if do_bwd:
                    stage = "fwdbwd"

                    def fwdbwd():
                        return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

                    time_fwdbwd(row, fwdbwd, fl, o)
                    stage = "peak"
                    row["peak_mb"], row["peak_delta_mb"] = peak_memory_mb(fwdbwd, o.device)
                elif o.measure_fwdbwd:
                    row["error"] = f"OOM: fwd+bwd not run, it ran out of memory at N={bwd_oom}"
                    row["error_stage"] = "fwdbwd"
        except (Exception, CellTimeout) as e:  # noqa: BLE001  (every failure is a row)
            record_failure(row, e, stage, caught)
        finally:
            fn = out = None  # noqa: F841
            cleanup(o.device)
        row["cell_s"] = round(time.perf_counter() - cell_t0, 3)  # wall time of the whole cell, compiles included
        return self._emit(row, cfg)

    def _emit(self, row: dict, cfg: Optional[AttnConfig] = None) -> dict:
        self.note_error(row, cfg)
        self.sink.add(row)
        return row


# --------------------------------------------------------------------------------------------
# output

def fmt(x, nd: int = 1) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{nd}f}"
    return str(x)


def md_table(headers, rows) -> str:
    def esc(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def stamp_now() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


WRITE_EVERY_S = 3.0


class ResultSink:
    """Collects rows; rewrites `<suite>_<stamp>.json` in every output dir at most every
    WRITE_EVERY_S seconds as rows come in (partial results survive a SIGKILL, minus the last
    few seconds' rows); `finish` writes everything and adds the goals, the markdown table and
    the PNG plot (run_suite turns SIGTERM into an interruption, so `timeout` gets them too)."""

    def __init__(self, suite: str, meta: dict, dirs: list, stamp: str, args: Optional[dict] = None, verbose: bool = True):
        self.suite, self.meta, self.stamp, self.args = suite, meta, stamp, args or {}
        self.dirs = [d for d in dict.fromkeys(dirs) if d]
        for d in self.dirs:
            os.makedirs(d, exist_ok=True)
        self.rows: list = []
        self.goals: list = []
        self.verbose = verbose
        self.started = time.time()
        self._written = 0.0

    def path(self, d: str, ext: str) -> str:
        return os.path.join(d, f"{self.suite}_{self.stamp}.{ext}")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.verbose:
            print(format_row(row), flush=True)
        # Rewriting the whole file after each of ~800 rows costs O(rows^2); every few seconds
        # is enough for a killed run to keep its rows.
        if time.time() - self._written >= WRITE_EVERY_S:
            self.write_json()

    def write_json(self) -> None:
        self._written = time.time()
        doc = {"suite": self.suite, "meta": self.meta, "args": self.args, "elapsed_s": round(time.time() - self.started, 1),
               "rows": self.rows, "goals": self.goals}
        text = json.dumps(_clean(doc), indent=1)
        for d in self.dirs:
            p = self.path(d, "json")
            tmp = p + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, p)

    def finish(self, module) -> list:
        """Goals, markdown and plot from the suite module's functions; returns the files written."""
        try:
            self.goals = module.compute_goals(self.rows)
        except Exception as e:  # noqa: BLE001
            self.goals = [{"goal": "computing goals failed", "error": describe_error(e)}]
        self.write_json()
        written = [self.path(d, "json") for d in self.dirs]
        try:
            md = module.render_markdown(self.rows, self.goals, self.meta)
        except Exception as e:  # noqa: BLE001
            md = f"# {self.suite}\n\nrendering the tables failed: {describe_error(e)}\n"
        for d in self.dirs:
            with open(self.path(d, "md"), "w") as f:
                f.write(md)
            written.append(self.path(d, "md"))
        png = self.path(self.dirs[0], "png") if self.dirs else None
        if png:
            try:
                module.plot(self.rows, png, self.meta)
                for d in self.dirs[1:]:
                    shutil.copyfile(png, self.path(d, "png"))
                written += [self.path(d, "png") for d in self.dirs]
            except Exception as e:  # noqa: BLE001
                print(f"[{self.suite}] plot failed: {describe_error(e)}", flush=True)
        return written


def format_row(row: dict) -> str:
    cfg = " ".join(f"{k}={row[k]}" for k in ("dtype", "B", "H", "N", "D") if row.get(k) is not None)
    extra = []
    if row.get("causal") is not None:
        extra.append(f"causal={int(bool(row['causal']))}")
    if row.get("dropout") is not None:
        extra.append(f"p={row['dropout']:g}")
    vals = []
    for k in ("fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops", "peak_mb", "step_ms", "tokens_per_s", "compile_s", "fused", "dbias"):
        if row.get(k) is not None:
            v = row[k]
            vals.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    name = row.get("variant") or row.get("impl")
    model = f"{row['model']} " if row.get("model") else ""
    err = f"  ERROR {row['error']}" if row.get("error") else ""
    return f"[{row['suite']}] {model}{name:<20} {cfg} {' '.join(extra)}  {' '.join(vals)}{err}"


# --------------------------------------------------------------------------------------------
# goals

def goal(name: str, target: str, op: str, threshold: float, values: dict, n: int = 0, worst: str = "", note: str = "") -> dict:
    """values: {impl: ratio or None}. met is judged on the first value ('flashfuse')."""
    main = next(iter(values.values()), None) if values else None
    if main is None:
        met = None
    else:
        met = main >= threshold if op == ">=" else main <= threshold
    return {"goal": name, "target": target, "op": op, "threshold": threshold, "values": values,
            "n": n, "worst": worst, "met": met, "note": note}


def goals_markdown(goals: list) -> str:
    if not goals:
        return "(no goals)"
    impls = []
    for g in goals:
        for k in (g.get("values") or {}):
            if k not in impls:
                impls.append(k)
    rows = []
    for g in goals:
        if "error" in g:
            rows.append([g.get("goal"), "", *["" for _ in impls], "", "", g["error"]])
            continue
        vals = [(f"{g['values'][k]:.2f}x" if g["values"].get(k) is not None else "no data") if k in g["values"] else "—" for k in impls]
        met = {True: "MET", False: "SHORT", None: "n/a"}[g["met"]]
        rows.append([g["goal"], g["target"], *vals, g.get("n", ""), met, " ".join(x for x in (g.get("worst", ""), g.get("note", "")) if x)])
    return md_table(["goal", "target", *impls, "n", "status", "worst / note"], rows)


# --------------------------------------------------------------------------------------------
# CLI

def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="the small subset (~2-3 min on an H100)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget in seconds (default 540, under the device's 10-minute command limit; 0 = none); "
                        "cells left after it become 'skipped: time budget' rows")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: exercises every code path")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available (cpu implies tiny sizes)")
    p.add_argument("--out", default=None, help="also write the results into this directory")
    p.add_argument("--results-dir", default=None, help=f"default {RESULTS_DIR} (a dry run writes only to --out unless this is given)")
    p.add_argument("--kernel", default=None, choices=("auto", "triton", "reference"), help="flashfuse kernel (default: auto on CUDA, reference on CPU)")
    p.add_argument("--impls", default=None, help="comma-separated subset of: " + ",".join(IMPLS))
    p.add_argument("--cell-timeout-s", type=float, default=None, help="per-cell wall-clock limit")
    p.add_argument("--stamp", default=None, help=argparse.SUPPRESS)


def resolve_common(args) -> None:
    if args.device is None:
        args.device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: running the CPU dry run instead", flush=True)
        args.device = "cpu"
    if args.device == "cpu":
        args.dry_run = True  # CPU means tiny sizes
    if args.kernel is None:
        args.kernel = "auto" if args.device == "cuda" else "reference"
    if args.impls:
        bad = [i for i in args.impls.split(",") if i not in IMPLS]
        if bad:
            raise SystemExit(f"unknown impls {bad}; valid: {', '.join(IMPLS)}")
        args.impl_list = [i for i in RUN_ORDER if i in args.impls.split(",")]
    else:
        args.impl_list = list(RUN_ORDER)
    if args.stamp is None:
        args.stamp = stamp_now()
    dirs = []
    if args.results_dir:
        dirs.append(args.results_dir)
    elif not args.dry_run:
        dirs.append(RESULTS_DIR)
    if args.out:
        dirs.append(args.out)
    if not dirs:
        dirs.append(os.path.join(os.environ.get("TMPDIR", "/tmp"), "flashfuse_bench_dryrun"))
    args.dirs = dirs
    configure_dynamo()
    show_flashfuse_warnings()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # tiny CPU work: more threads only add OpenMP stalls


def args_dict(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def run_suite(module, args, budget: Optional[Budget] = None, meta: Optional[dict] = None) -> "ResultSink":
    """Run one suite module end to end, writing JSON (incrementally), markdown and PNG."""
    budget = budget or Budget(540.0 if args.budget_s is None else args.budget_s)
    meta = dict(meta or env_info(args.device))
    meta["suite"] = module.SUITE
    meta["mode"] = "dry-run" if args.dry_run else ("quick" if args.quick else "full")
    meta["budget_s"] = budget.seconds
    sink = ResultSink(module.SUITE, meta, args.dirs, args.stamp, args_dict(args))
    t0 = time.time()
    print(f"== {module.SUITE} ({meta['mode']}, device={args.device}, gpu={meta.get('gpu')}, "
          f"budget={'%.0fs' % budget.seconds if budget.seconds else 'none'}) ==", flush=True)

    def _terminated(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        module.run(args, budget, sink)
    except KeyboardInterrupt as e:
        sink.add(base_row(module.SUITE, "-", error=f"interrupted {e}".strip()))
    except (Exception, CellTimeout) as e:  # noqa: BLE001  (a bug in a suite still leaves its results)
        import traceback

        traceback.print_exc()
        sink.add(base_row(module.SUITE, "-", error=f"suite crashed: {describe_error(e)}"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    gc.unfreeze()  # settle() froze objects; give them back to the collector (and to exit-time cleanup)
    files = sink.finish(module)
    print(f"== {module.SUITE}: {len(sink.rows)} rows in {time.time() - t0:.0f}s ==", flush=True)
    for f in files:
        print(f"   wrote {f}", flush=True)
    print("\n" + goals_markdown(sink.goals) + "\n", flush=True)
    return sink


def main_for(module, argv=None) -> int:
    p = argparse.ArgumentParser(description=module.__doc__.splitlines()[0] if module.__doc__ else module.SUITE)
    add_common_args(p)
    module.add_args(p)
    args = p.parse_args(argv)
    resolve_common(args)
    run_suite(module, args)
    return 0
