"""Launching the autotuned Triton kernels with little host time.

A launch goes one of three ways (`launch`):

1. **Direct.** Once a kernel has run for a given set of non-tensor arguments (sizes, strides,
   flags) and tensor dtypes and 16-byte alignments, the compiled kernel, its constexpr tail
   and the meta-parameters its grid reads are remembered, and later launches call the compiled
   kernel's launcher (`CompiledKernel.run`) themselves. That skips Triton's per-call work:
   argument binding and specialization, the cache-key hash, the autotuner's bookkeeping and
   the heuristics. The key compares every int, bool and string by type and value and every tensor by
   (dtype, data_ptr % 16 == 0, device), so it is at least as fine as Triton's own
   specialization (ints equal to 1, ints divisible by 16, i32 / i64 ranges, pointer
   alignment): a hit always launches the binary Triton would have picked. Floats are runtime
   fp32 arguments and are not part of the key. The grid is evaluated on every launch (it may
   depend on sizes that are not kernel arguments, such as the batch). Not re-checked per
   launch, unlike Triton's path: changes to Triton's runtime knobs (TRITON_DEBUG,
   instrumentation) made after a kernel's first launches.
2. **Chosen.** The autotuner has chosen a config for this autotune key: run that config
   through Triton's `JITFunction.run` (which compiles on a new specialization), and remember
   the direct entry.
3. **Autotune.** The first launch of an autotune key goes through `Autotuner.run`. A config
   that runs out of resources is banned for the kernel variant (`configs.ban`) and the next
   one runs.

Callers that know a launch's non-tensor arguments in advance build a `Prepared` launch (the
attention launchers' per-signature plans): it takes these paths on its first calls and then
runs its remembered direct entry without even building the argument key.

NB: on an H100 (triton 3.6, torch 2.11) the backward launcher cost 434 us of host time for
its three launches and the forward 129 us (benchmarks/launch_overhead.py, 2026-11-22), while
the N=1024 causal kernels take 230 us (forward) and 730 us (backward): small attention calls
were host-bound; after this module: 97 us and 170 us. The direct path is off under
TRITON_INTERPRET=1, with FLASHFUSE_DIRECT_LAUNCH=0, and when Triton launch hooks are
installed (profilers): then every launch takes path 2 or 3.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from triton.runtime import driver
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.errors import OutOfResources

from flashfuse import envvars
from flashfuse.kernels import configs

log = logging.getLogger(__name__)

# statistics, read by tests and benchmarks: how many launches took each path
stats: Dict[str, int] = {"direct": 0, "chosen": 0, "autotune": 0, "precompiled": 0}

# (kernel, autotune key) -> the config the autotuner chose
_chosen: Dict[tuple, Any] = {}
# (kernel name, autotune key values, config) of every choice, in order: benchmarks print it
choices: list = []
_key_index: Dict[int, tuple] = {}
# (kernel, argument key) -> _Direct
_direct: Dict[tuple, "_Direct"] = {}
_MAX_DIRECT = 4096
_autotune_lock = threading.RLock()
# Bumped whenever remembered direct entries are dropped (`forget`): a `Prepared` launch holding
# one then takes the checked path again.
_generation = [0]


class _Direct:
    """One remembered launch: the compiled kernel, its trailing constexpr values and the meta-
    parameters the grid function reads.

    The grid itself is not remembered: launchers compute it from values that need not be
    kernel arguments (the batch size, say: a contiguous q has the same strides for any batch),
    so each launch evaluates the caller's grid function again.
    """

    __slots__ = ("compiled", "run", "function", "metadata", "meta", "tail")

    def __init__(self, compiled, meta, tail):
        self.compiled = compiled  # newer Triton unloads a kernel's module when this object is freed
        self.run = compiled.run
        self.function = compiled.function
        self.metadata = getattr(compiled, "packed_metadata", None) or compiled.metadata
        self.meta = meta
        self.tail = tail


def _grid3(grid, meta) -> tuple:
    g = grid(meta) if callable(grid) else grid
    return tuple(g) + (1,) * (3 - len(g))


_FLOAT_KEY = (float,)


def _arg_key(args: tuple, kwargs: dict) -> tuple:
    # see the module docstring: at least as fine as Triton's specialization of each argument.
    # Non-tensors carry their type: True == 1 and False == 0 hash alike, but Triton compiles a
    # bool, the constant 1 and an int divisible by 16 differently; a float (a runtime fp32) and
    # None (a constant) must not match either. Plain loop with exact type tests first: this runs
    # on every launch (~40 arguments), and isinstance / .device cost more than they look.
    key = []
    for a in args:
        kind = type(a)
        if kind is float:
            key.append(_FLOAT_KEY)
        elif kind is int or kind is bool or a is None:
            key.append((kind, a))
        elif isinstance(a, Tensor):
            key.append((a.dtype, a.data_ptr() & 15 == 0, a.get_device()))
        else:
            key.append((kind, a))
    return tuple(key), tuple([(k, type(a), a) for k, a in kwargs.items()])


def _tune_key(kernel, args, kwargs) -> tuple:
    # The caches key kernels by id(): each entry here holds its kernel, so no id is reused for
    # another kernel while _chosen or _direct may still hold one of its keys (kernels defined in
    # tests come and go; the op's are kept for the process anyway).
    held = _key_index.get(id(kernel))
    if held is None:
        names = kernel.arg_names
        held = _key_index[id(kernel)] = (kernel, tuple((k, names.index(k) if k in names and names.index(k) < len(args) else None)
                                                       for k in kernel.keys))
    index = held[1]
    key = tuple(args[i] if i is not None else kwargs.get(k) for k, i in index)
    return (id(kernel), key, tuple(str(a.dtype) for a in args if isinstance(a, Tensor)))


_stream_fns: list = []
# Tests turn this on (tests/conftest.py): every call of a `Prepared` launch then checks that its
# arguments have the launch key of its first call, the guarantee its callers give.
audit = False


def _stream():
    """The current stream of the current device, as Triton's own launches get it."""
    if not _stream_fns:  # driver.active is a lazy proxy: resolve its two bound methods once
        _stream_fns[:] = [driver.active.get_current_stream, driver.active.get_current_device]
    return _stream_fns[0](_stream_fns[1]())


def forget(kernel=None) -> None:
    """Drop the remembered direct launches (all, or those of one kernel); `Prepared` launches re-check."""
    if kernel is None:
        _direct.clear()
    else:
        for key_ in [key_ for key_ in _direct if key_[0] == id(kernel)]:
            del _direct[key_]
    _generation[0] += 1


def _hook_set(hook) -> bool:
    # a plain callable (older Triton) or a HookChain (newer: always present, set when it has calls)
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return True if calls is None else bool(calls)


try:
    from triton import knobs as _knobs
except ImportError:  # older Triton: no knobs, keep Triton's own launch path
    _knobs = None


def _hooks_installed() -> bool:
    if _knobs is None:
        return True
    return _hook_set(_knobs.runtime.launch_enter_hook) or _hook_set(_knobs.runtime.launch_exit_hook)


def _direct_enabled() -> bool:
    return not configs.interpreting() and envvars.get("FLASHFUSE_DIRECT_LAUNCH", "1") != "0" and not _hooks_installed()


def _jit_of(kernel):
    """(the jit function, heuristics rules) under an Autotuner: Autotuner -> [Heuristics ->] JITFunction."""
    obj, rules = kernel.fn, {}
    while isinstance(obj, (Autotuner, Heuristics)):
        if isinstance(obj, Heuristics):
            rules = {**obj.values, **rules}
        obj = obj.fn
    return obj, rules


def _direct_entry(kernel, compiled, config, grid, args: tuple, kwargs: dict) -> Optional[_Direct]:
    """The direct entry for a launch that Triton just made with `config`, or None if its layout is unknown."""
    if compiled is None or not all(hasattr(compiled, a) for a in ("run", "function")):
        return None
    jit, rules = _jit_of(kernel)
    names = list(jit.arg_names)
    named = {**dict(zip(names, args)), **kwargs, **config.kwargs}
    for name, rule in rules.items():
        named[name] = rule(named)
    if set(names[: len(args)]) & (set(kwargs) | set(config.kwargs)) or any(n not in named for n in names):
        return None  # an argument layout this module does not know: keep Triton's path
    _grid3(grid, named)  # a grid function that cannot read these meta-parameters fails here, not later
    meta = {n: a for n, a in named.items() if not isinstance(a, Tensor)}  # holds no tensor of this call
    return _Direct(compiled, meta, tuple(named[n] for n in names[len(args):]))


def _remember(dkey, kernel, compiled, config, grid, args: tuple, kwargs: dict) -> None:
    # The launch has already happened: a failure to build the entry only costs speed.
    try:
        entry = _direct_entry(kernel, compiled, config, grid, args, kwargs)
    except Exception as e:  # noqa: BLE001
        log.debug("flashfuse: no direct launch for %s: %s: %s", getattr(kernel, "base_fn", kernel), type(e).__name__, e)
        return
    if entry is None:
        return
    if len(_direct) >= _MAX_DIRECT:  # e.g. many distinct shapes: start over rather than grow
        forget()
    _direct[dkey] = entry


def launch(kind: str, kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs) by the cheapest way that launches the same binary (module docstring)."""
    tuned = isinstance(kernel, Autotuner)
    direct_ok = tuned and _direct_enabled()
    if direct_ok:
        dkey = (id(kernel), _arg_key(args, kwargs))
        entry = _direct.get(dkey)
        if entry is not None:
            stats["direct"] += 1
            g = _grid3(grid, entry.meta)
            return entry.run(g[0], g[1], g[2], _stream(), entry.function, entry.metadata, None, None, None, *args, *entry.tail)
    key = _tune_key(kernel, args, kwargs) if tuned else None
    config = _chosen.get(key) if tuned else None
    if config is not None:
        stats["chosen"] += 1
        compiled = kernel.fn.run(*args, grid=grid, warmup=False, **kwargs, **config.all_kwargs())
        if direct_ok:
            _remember(dkey, kernel, compiled, config, grid, args, kwargs)
        return compiled
    stats["autotune"] += 1
    with _autotune_lock:  # the config read back from kernel.best_config must be this launch's
        return _autotune(kind, kernel, grid, key, args, kwargs)


def _autotune(kind: str, kernel, grid, key, args: tuple, kwargs: dict):
    """The first launch of an autotune key; a config that runs out of resources is banned and the next one runs.

    The ban is kept per kernel variant (configs.variant_key) for the process; the autotuner's
    cached choices of that config are forgotten, so the next launch prunes again without it.
    """
    tuned = key is not None
    tried = set()
    if tuned:
        precompile(kind, kernel, grid, args, kwargs)
    while True:
        try:
            ret = kernel[grid](*args, **kwargs)
            if tuned and getattr(kernel, "best_config", None) is not None and kernel.best_config.pre_hook is None:
                _chosen[key] = kernel.best_config
                name = getattr(getattr(kernel, "base_fn", None), "__name__", "?")
                choices.append((name, dict(zip(kernel.keys, key[1])), str(kernel.best_config)))
            return ret
        except OutOfResources:
            failed = getattr(kernel, "best_config", None)
            if failed is None or not hasattr(kernel, "configs") or id(failed) in tried:
                raise
            tried.add(id(failed))
            named = {**dict(zip(kernel.arg_names, args)), **kwargs}
            if not configs.ban(kind, named, failed, kernel.configs):
                raise
            cache = getattr(kernel, "cache", {})
            for key_ in [key_ for key_, cfg in cache.items() if cfg is failed]:
                del cache[key_]
            for key_ in [key_ for key_, cfg in _chosen.items() if cfg is failed]:
                del _chosen[key_]
            forget(kernel)


def _compile_threads() -> int:
    """FLASHFUSE_COMPILE_THREADS: threads that compile an autotune key's configs before it is
    benchmarked (0 or 1: none; the autotuner then compiles each config as it reaches it)."""
    default = min(8, os.cpu_count() or 1)
    value = os.environ.get("FLASHFUSE_COMPILE_THREADS")
    if value is None:
        return default
    try:
        return max(int(value), 0)
    except ValueError:
        configs.env_choice("FLASHFUSE_COMPILE_THREADS", value, "an integer")
        return default


def precompile(kind: str, kernel, grid, args: tuple, kwargs: dict) -> int:
    """Compile the configs the autotuner is about to benchmark, in threads; how many were submitted.

    Triton compiles a config on its first launch, so an autotuner with k configs compiles them
    one after another. Here they compile concurrently first (Triton's MLIR passes and ptxas
    release the GIL for much of the work), and the benchmark loop then finds them in Triton's
    in-memory cache. Same binaries either way: `warmup` goes through the same specialization
    and cache key as a launch. A config that fails to compile here is left to the autotuner,
    which reports or bans it exactly as before.
    """
    threads = _compile_threads()
    if threads <= 1 or configs.interpreting() or not isinstance(kernel, Autotuner):
        return 0
    prune = getattr(kernel, "early_config_prune", None)
    candidates = prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs) if prune else kernel.configs
    if len(candidates) <= 1:
        return 0
    ref = next((a for a in args if isinstance(a, Tensor)), None)
    index = ref.device.index if ref is not None and ref.device.type == "cuda" else None

    def compile_one(config):
        try:
            if index is not None:
                torch.cuda.set_device(index)  # Triton caches compiled kernels per current device
            kernel.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())
        except Exception as e:  # noqa: BLE001  (the autotuner's own launch reports it)
            log.debug("flashfuse: precompiling %s %s failed: %s: %s", kind, config, type(e).__name__, e)

    # Triton creates a JITFunction's per-device cache on first use (a defaultdict); create it
    # here, so the workers all fill the same one instead of racing to create it.
    try:
        caches = getattr(_jit_of(kernel)[0], "device_caches", None)
        if caches is not None:
            caches[driver.active.get_current_device()]
    except Exception:  # noqa: BLE001  (a Triton without this layout: the race only costs a recompile)
        pass
    with ThreadPoolExecutor(max_workers=min(threads, len(candidates)), thread_name_prefix="flashfuse-compile") as pool:
        list(pool.map(compile_one, candidates))
    stats["precompiled"] += len(candidates)
    return len(candidates)


class Prepared:
    """One kernel launch whose non-tensor arguments are fixed: `prepared(*tensors)` launches
    `kernel[grid](*tensors, *static, **kwargs)`.

    The attention launchers build these once per call signature (`triton_attention`'s plans),
    so a repeated call skips rebuilding ~50 arguments and `launch`'s argument key. The first
    call goes through `launch` and keeps the direct entry it left; later calls run it at once.
    The caller guarantees that every later call's tensors match the first call's in dtype,
    device and 16-byte alignment (the plan key holds them, or the tensors are fresh
    allocations), so the entry is the one `launch` would find. Still checked on every call:
    launch hooks (a profiler may install them at any time) and `forget` (bans, cache resets).
    """

    __slots__ = ("kind", "kernel", "grid", "static", "kwargs", "entry", "generation", "grid3", "first_key")

    def __init__(self, kind: str, kernel, grid, static: tuple, kwargs: dict):
        self.kind, self.kernel, self.grid, self.static, self.kwargs = kind, kernel, grid, tuple(static), kwargs
        self.entry, self.generation, self.grid3, self.first_key = None, -1, None, None

    def __call__(self, *tensors):
        if audit:
            self._audit(tensors)
        entry = self.entry
        if entry is not None and self.generation == _generation[0] and not _hooks_installed():
            stats["direct"] += 1
            g = self.grid3
            return entry.run(g[0], g[1], g[2], _stream(), entry.function, entry.metadata, None, None, None, *tensors, *self.static,
                             *entry.tail)
        args = tensors + self.static
        ret = launch(self.kind, self.kernel, self.grid, *args, **self.kwargs)
        if isinstance(self.kernel, Autotuner) and _direct_enabled():
            generation = _generation[0]
            found = _direct.get((id(self.kernel), _arg_key(args, self.kwargs)))
            if found is not None:
                self.entry, self.generation, self.grid3 = found, generation, _grid3(self.grid, found.meta)
        return ret

    def _audit(self, tensors: tuple) -> None:
        key = _arg_key(tensors + self.static, self.kwargs)
        if self.first_key is None:
            self.first_key = key
        elif key != self.first_key:
            diff = [i for i, (a, b) in enumerate(zip(key[0], self.first_key[0])) if a != b]
            raise AssertionError(f"flashfuse: a prepared {self.kind} launch was called with arguments of another launch key "
                                 f"(positions {diff}): its plan's key misses something its arguments depend on")
