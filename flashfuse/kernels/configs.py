"""Autotune configurations for the Triton attention kernels, as data, and their pruning.

Each kernel kind has a list of candidate configs in order of preference: the first one that
survives pruning (and is not marked "extra") is what runs when autotuning is off
(FLASHFUSE_AUTOTUNE=0). Pruning drops configs whose tiles cannot fit the head
dim, the dtype or the device's shared memory (estimated from every tile a kernel variant
stages: K/V/Q/dO, the bias and mask tiles, times the pipeline depth). Configs that a launch
still found out of resources are banned for that kernel variant (`ban`, called by the
launchers) and pruned from then on. Under TRITON_INTERPRET=1 (CPU tests) each kind has one
small config, so the interpreter runs few, cheap programs and never benchmarks.

Every BLOCK_M and BLOCK_N divides 128, the block-sparse granularity
(triton_attention.SPARSE_BLOCK), and every BLOCK_N is a multiple of 8 (one Philox call
feeds 8 keys of dropout).

Block relations the kernels assert (tl.static_assert):
    fwd:  BLOCK_M % BLOCK_N == 0  (the causal diagonal is whole key blocks)
    dkdv: BLOCK_N % BLOCK_M == 0  (BLOCK_N keys per program, stepping BLOCK_M queries)
    dq:   BLOCK_M % BLOCK_N == 0
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, List, Optional

import torch

from flashfuse import envvars

try:  # configs are plain data; triton is only needed to turn them into triton.Config
    import triton
except ImportError:  # pragma: no cover - the launcher never gets here without triton
    triton = None

log = logging.getLogger(__name__)

KINDS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")

# Candidates in order of preference. BLOCK_M is always the query tile, BLOCK_N the key tile.
# "max_block_d" bounds the padded head dim (max of BLOCK_D, BLOCK_DV) a config may run: past
# it the fp32 accumulators no longer fit in registers. "fp32" marks the configs for fp32
# inputs (exact "ieee" dots run on FMA units with much larger register tiles); the others are
# for fp16/bf16. The bounds come from compiling the configs for sm_90 with triton 3.9 (no GPU
# needed) and reading ptxas's register/spill report for the plain causal kernels: within its
# bound each config compiles without spills, except the D=256 backward ones (under 200 bytes).
# Bias, mask and dropout variants use more registers.
#
# "extra": benchmarked only with FLASHFUSE_AUTOTUNE=all (or when nothing else fits);
# "extra_below_d": extra for padded head dims under that bound (the D=256 fallbacks). NB: on an
# H100 (bf16, D=64/128, N=512..16K, causal or not; kernel sweeps of 2026-11-22 04:08 and 07:16
# with every config) the autotuner never chose one of them; the winners were fwd 64x64/4 warps,
# 128x64/8 and 128x128/8, dK/dV 32x128/4 or 8 and 64x64/4, dQ 128x64/8 and 64x64/4. Compiling
# every candidate made the first GPT-2-shaped call take 44.8 s (26 configs) against Inductor's
# 4.3 s for the same function (benchmarks/results/compile_time_20261122-071445.md).
# "mask_tier": not extra when the kernel loads a mask (those sweeps had none).
CONFIGS: Dict[str, List[Dict[str, Any]]] = {
    "fwd": [
        # NB: extra for dense calls, default when the kernel loads a mask: H100, N=64K sliding
        # window 4096 (992 partial blocks), forward 2.99 ms against 3.57 ms for the 64 x 64
        # config the default tier chose (benchmarks/config_probe.py, 2026-11-22).
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "max_block_d": 64, "extra": True, "mask_tier": True},
        # NB: a mask, loaded or computed from row ranges, takes the 64 x 64 forward from 118
        # registers to 147-157 (sm_90 compiles, benchmarks/kernel_resources.py, 2026-11-22):
        # 3 CTAs per SM instead of 4. Capped at 128 it keeps 4 (16 B of stack).
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "maxnreg": 128, "max_block_d": 64, "extra": True, "mask_tier": True},
        {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "max_block_d": 128},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "max_block_d": 128},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "max_block_d": 64, "extra": True},
        {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4, "max_block_d": 128, "extra": True},
        {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "max_block_d": 64, "extra": True},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "max_block_d": 256, "extra": True},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "max_block_d": 256},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "max_block_d": 256, "extra_below_d": 256},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "max_block_d": 64, "fp32": True},
        {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "max_block_d": 64, "fp32": True},
        {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "max_block_d": 128, "fp32": True},
        {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2, "max_block_d": 256, "fp32": True},
    ],
    "bwd_preprocess": [
        {"BLOCK_M": 128, "num_warps": 4, "num_stages": 1, "max_block_d": 128},
        {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1, "max_block_d": 256},
        {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1, "max_block_d": 256, "fp32": True},
    ],
    "bwd_dkdv": [
        {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "max_block_d": 64},
        # NB: D=128 on an H100 (config_probe.py, 2026-11-22 16:17, dP^T issued before P^T): N=16K
        # causal 3687 us against 3771 us for the 2-stage config below; documents of 2048 1093 vs
        # 1083 us, sliding window 4096 1717 vs 1716 us. So the autotuner times both at D=128.
        {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "max_block_d": 128, "extra_below_d": 128},
        {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "max_block_d": 128, "extra": True},
        {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "max_block_d": 128},
        # NB: D=128 on an H100 (benchmarks/config_probe.py --d 128, 2026-11-22 11:58): 1.19 vs 1.63 ms
        # for the 32 x 128 / 8-warp config at N=16K (documents of 2048), 8.35 vs 10.58 ms at N=64K
        # (sliding window 4096); 131840 B of shared memory, as estimated. Not below 128: 64 x 128 /
        # 8 warps / 3 stages stays the extra one there.
        {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "max_block_d": 128, "extra_below_d": 128},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "max_block_d": 64},
        {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "max_block_d": 64, "extra": True},
        {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "max_block_d": 128, "extra": True},
        {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "max_block_d": 256, "extra_below_d": 256},
        {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "max_block_d": 256, "extra_below_d": 256},
        {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "max_block_d": 64, "fp32": True},
        {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "max_block_d": 128, "fp32": True},
        {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2, "max_block_d": 256, "fp32": True},
    ],
    "bwd_dq": [
        {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "max_block_d": 64, "extra": True},
        # a mask: 148-168 registers at 64 x 64 / 4 warps, 128 capped (40 B of stack); see the forward's
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "maxnreg": 128, "max_block_d": 64, "extra": True, "mask_tier": True},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "max_block_d": 128},
        # NB: D=128 on an H100 (benchmarks/config_probe.py --d 128, 2026-11-22 14:05): documents of
        # 512 at N=16K 274 us against 340 us for 128 x 64 (128 regs, no spills); at N=64K causal
        # 67.5 against 47.6 ms, so it joins the tier the autotuner times, at D=128 only.
        {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3, "max_block_d": 128, "extra_below_d": 128},
        {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "max_block_d": 256, "extra_below_d": 256},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "max_block_d": 128},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "max_block_d": 128, "extra": True},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "max_block_d": 256, "extra_below_d": 256},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "max_block_d": 128, "fp32": True},
        {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "max_block_d": 256, "fp32": True},
        {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2, "max_block_d": 256, "fp32": True},
    ],
}

# One small config per kind for the CPU interpreter: blocks of 16/32 so the tests' odd
# lengths (17, 100, 129) cross several blocks and end in partial ones.
INTERPRET_CONFIGS: Dict[str, Dict[str, Any]] = {
    "fwd": {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    "bwd_preprocess": {"BLOCK_M": 32, "num_warps": 4, "num_stages": 1},
    "bwd_dkdv": {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    "bwd_dq": {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
}

# Shared memory assumed when the device cannot be asked (H100/H200 opt-in limit per block).
DEFAULT_SHARED_MEMORY = 227 * 1024


def interpreting() -> bool:
    return envvars.get("TRITON_INTERPRET") == "1"


AUTOTUNE_MODES = {"0": "first", "1": "default", "all": "all"}
_warned_env: set = set()


def env_choice(name: str, value: Optional[str], valid: str) -> None:
    """Warn once about an environment value flashfuse does not know (it then uses its default).

    Not an error: these are read inside kernel launches, where an exception would send every
    call to the slow reference kernel instead of failing loudly once.
    """
    if (name, value) not in _warned_env:
        _warned_env.add((name, value))
        log.warning("flashfuse: ignoring %s=%r (valid: %s); using the default", name, value, valid)


def autotune_mode() -> str:
    """FLASHFUSE_AUTOTUNE: "1" (default) benchmarks the configs not marked "extra"; "all" every
    config (to re-derive the list on a new GPU); "0" runs the first default-tier config, no
    benchmark. Any other value warns once and means "1"."""
    value = os.environ.get("FLASHFUSE_AUTOTUNE", "1")
    mode = AUTOTUNE_MODES.get(value.strip().lower())
    if mode is None:
        env_choice("FLASHFUSE_AUTOTUNE", value, ", ".join(AUTOTUNE_MODES))
        return "default"
    return mode


AUTOTUNE_REP_MS = 100.0  # triton.testing.do_bench's default, which Triton's autotuner uses


def autotune_rep_ms() -> float:
    """FLASHFUSE_AUTOTUNE_REP_MS: milliseconds the autotuner times each candidate config for
    (warm-up a quarter of that). Default 100, Triton's own. Invalid values warn once."""
    value = os.environ.get("FLASHFUSE_AUTOTUNE_REP_MS")
    if value is None:
        return AUTOTUNE_REP_MS
    try:
        rep = float(value)
    except ValueError:
        rep = -1.0
    if not rep > 0 or rep == float("inf"):
        env_choice("FLASHFUSE_AUTOTUNE_REP_MS", value, "a positive number of milliseconds")
        return AUTOTUNE_REP_MS
    return rep


def autotune_bench(fn, quantiles=None, **_):
    """The autotuner's timer (the templates' `do_bench=`): Triton's do_bench, for as long as
    FLASHFUSE_AUTOTUNE_REP_MS says. A shorter time makes the first call of a shape cheaper, at
    the price of noisier choices between configs that run within a few percent of each other."""
    import triton.testing

    rep = autotune_rep_ms()
    return triton.testing.do_bench(fn, warmup=max(rep / 4, 1.0), rep=rep, quantiles=quantiles)


def config_dicts(kind: str) -> List[Dict[str, Any]]:
    """The candidate configs of one kernel kind as plain dicts (the interpreter's one config under TRITON_INTERPRET=1)."""
    if kind not in KINDS:
        raise ValueError(f"flashfuse: unknown kernel kind {kind!r}; valid: {', '.join(KINDS)}")
    if interpreting():
        return [dict(INTERPRET_CONFIGS[kind])]
    return [dict(c) for c in CONFIGS[kind]]


def _to_triton(c: Dict[str, Any]):
    # The data bounds ("max_block_d", "fp32", the tiers) ride on the Config object itself, where
    # prune reads them back. (They were kept by id(config) before: a freed Config's id, reused by
    # a new one, then carried stale bounds into the prune.)
    meta = {k: v for k, v in c.items() if k not in _META and k != "maxnreg"}
    config = triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"], maxnreg=c.get("maxnreg"))
    config.flashfuse_bounds = {k: c[k] for k in _META[2:] if k in c}
    return config


def triton_configs(kind: str) -> list:
    """triton.Config objects for @triton.autotune."""
    return [_to_triton(c) for c in config_dicts(kind)]


@functools.lru_cache(maxsize=None)
def _device_shared_memory(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if smem:
        return int(smem)
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # pragma: no cover - depends on the driver
        return DEFAULT_SHARED_MEMORY


def shared_memory_limit(device=None) -> int:
    """Shared memory per block on `device` (a torch.device or index); a default off CUDA."""
    if interpreting() or not torch.cuda.is_available():
        return DEFAULT_SHARED_MEMORY
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        device = torch.device(device)
        if device.type != "cuda":
            return DEFAULT_SHARED_MEMORY
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_shared_memory(index)


def shared_memory_estimate(kind: str, c: Dict[str, Any], block_d: int, block_dv: int, elem_bytes: int,
                           bias_bytes: int = 0, has_mask: bool = False) -> int:
    """A conservative estimate of a config's shared memory in bytes.

    Tiles loaded inside the pipelined loop are buffered num_stages - 1 times (the forward's K
    and V num_stages times when there is no bias); tiles that stay for the whole program (Q in the forward, K/V in
    dK/dV, Q/dO in dQ) and the tiles that round-trip between dots (P^T, dS^T) once. bias_bytes
    is the bias element size (0: no bias), has_mask adds the 1-byte mask tile. The head dims
    are the padded BLOCK_D/BLOCK_DV.
    NB: the H200 failure this replaced (bf16, D=80 -> BLOCK_D=128, bias and mask, fwd config
    128x128 with 3 stages: "Required: 262144") is 2 x (K + V + bias + mask) + Q. The forward's
    K and V take num_stages buffers: 57344 B for the bf16 D=64 64x64/3-stage forward on the
    H100 (Triton 3.6), and exactly this estimate for every forward config compiled for sm_90
    by benchmarks/kernel_resources.py (Triton 3.9, 2026-11-22): e.g. D=128 128x128/3 stages
    with a mask 262144 B, D=256 64x64/3 with a mask 237568 B, both over 227 KB and admitted
    (to fail at launch) by the num_stages - 1 count this used before. With a bias the H200
    figure above (Triton 3.6) fits num_stages - 1 buffers, so that count stays for bias calls.
    """
    stages = max(c.get("num_stages", 1), 1)
    buffers = max(stages - 1, 1)
    bm, bn = c["BLOCK_M"], c.get("BLOCK_N", 0)
    tile = bm * bn * (bias_bytes + (1 if has_mask else 0))  # one bias + mask tile, any orientation
    if kind == "fwd":
        # K and V are buffered num_stages times (num_stages - 1 with a bias), the bias / mask
        # tiles num_stages - 1; Q stays.
        kv_buffers = buffers if bias_bytes else stages
        return kv_buffers * elem_bytes * bn * (block_d + block_dv) + buffers * tile + elem_bytes * bm * block_d
    if kind == "bwd_dkdv":
        # K and V stay; Q^T and dO (and the bias / mask tiles) stream; P^T and dS^T round-trip.
        resident = elem_bytes * (bn * (block_d + block_dv) + 2 * bm * bn)
        return resident + buffers * (elem_bytes * bm * (block_d + block_dv) + tile + 3 * 4 * bm)
    if kind == "bwd_dq":
        # Q and dO stay; K^T and V^T (and the bias / mask tiles) stream; dS round-trips.
        resident = elem_bytes * (bm * (block_d + block_dv) + bm * bn)
        return resident + buffers * (elem_bytes * bn * (block_d + block_dv) + tile)
    return 0


def _is_extra(c: Dict[str, Any], block: int, has_mask: bool = False) -> bool:
    if has_mask and c.get("mask_tier"):
        return False
    return bool(c.get("extra")) or block < c.get("extra_below_d", 0)


def _fits(c: Dict[str, Any], block_d: int, block_dv: int, elem_bytes: int) -> bool:
    """Whether a config's data bounds admit this head dim and dtype."""
    if bool(c.get("fp32", False)) != (elem_bytes == 4):
        return False
    return max(block_d, block_dv) <= c.get("max_block_d", 256)


_META = ("num_warps", "num_stages", "max_block_d", "fp32", "extra", "extra_below_d", "mask_tier")


def _as_dict(c) -> Dict[str, Any]:
    if isinstance(c, dict):
        return c
    regs = {"maxnreg": c.maxnreg} if getattr(c, "maxnreg", None) else {}
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages, **regs, **getattr(c, "flashfuse_bounds", {})}


def _signature(c) -> tuple:
    d = _as_dict(c)
    return tuple(sorted((k, v) for k, v in d.items() if k not in _META[2:]))


# Configs that ran out of resources at launch, per kernel variant: {variant_key: {signature}}.
_BANNED: Dict[tuple, set] = {}
_VARIANT_ARGS = ("HEAD_DIM", "HEAD_DIM_V", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_BIAS", "HAS_MASK", "MASK_RANGES", "COL_RANGES", "DROPOUT",
                 "LOG2_DOMAIN", "DOT_PRECISION", "BIAS_GRAD", "DBIAS_ATOMIC", "BIAS_ROW_BCAST", "HAS_SPARSE", "SPARSE_BLOCK")


def _dtype_of(t):
    return str(t.dtype) if hasattr(t, "dtype") else None


def variant_key(kind: str, args: Dict[str, Any]) -> tuple:
    """What a kernel variant's resources depend on, from its launch arguments (named args and constexprs)."""
    ref = args.get("Q", args.get("DO"))
    device = str(ref.device) if hasattr(ref, "device") else None
    return (kind, device, _dtype_of(ref), _dtype_of(args.get("Bias")), _dtype_of(args.get("Mask")),
            *(args.get(name) for name in _VARIANT_ARGS))


def banned(key: tuple) -> set:
    return _BANNED.get(key, set())


def ban(kind: str, args: Dict[str, Any], config, candidates) -> bool:
    """Ban `config` for the variant of `args`; whether any candidate config is left to try."""
    key = variant_key(kind, args)
    gone = _BANNED.setdefault(key, set())
    gone.add(_signature(config))
    return any(_signature(c) not in gone for c in candidates)


def prune(kind: str, configs: list, block_d: int, block_dv: int, elem_bytes: int, smem_limit: int, autotune: str = "default",
          bias_bytes: int = 0, has_mask: bool = False, exclude: Optional[set] = None, mask_tile: Optional[bool] = None) -> list:
    """Configs that fit the head dim, dtype and shared memory; never empty.

    Works on triton.Config objects (from triton_configs) or plain dicts. has_mask: a mask reaches
    the kernel (the mask tier); mask_tile (default has_mask): it loads mask tiles. exclude: signatures
    of banned configs, dropped first. When nothing fits, the remaining config with the
    smallest shared-memory estimate is kept. autotune (an `autotune_mode`): "default" drops the configs marked "extra" unless they are all
    that fits, "all" keeps them, "first" keeps only the first config that fits, so nothing
    is benchmarked.
    """
    if len(configs) <= 1:
        return list(configs)
    if exclude:
        allowed = [c for c in configs if _signature(c) not in exclude]
        configs = allowed or list(configs)
    dicts = [_as_dict(c) for c in configs]
    mask_tile = has_mask if mask_tile is None else mask_tile
    est = [shared_memory_estimate(kind, d, block_d, block_dv, elem_bytes, bias_bytes, mask_tile) for d in dicts]
    kept = [c for c, d, e in zip(configs, dicts, est) if e <= smem_limit and _fits(d, block_d, block_dv, elem_bytes)]
    if not kept:
        kept = [min(zip(configs, est), key=lambda ce: ce[1])[0]]
    if autotune != "all":
        block = max(block_d, block_dv)
        # "first" keeps its one config independent of the mask tier (the GPU tests run that way)
        kept = [c for c in kept if not _is_extra(_as_dict(c), block, has_mask and autotune == "default")] or kept
    if autotune == "first":
        kept = kept[:1]
    return kept


def prune_for_call(kind: str, configs: list, args: Dict[str, Any], smem_limit: int, autotune: str,
                   exclude: Optional[set] = None) -> list:
    """`prune` with the head dims, dtype, bias and mask read from one launch's named arguments and constexprs."""
    block_dv = int(args["BLOCK_DV"])
    block_d = int(args.get("BLOCK_D", block_dv))
    ref = args.get("Q", args.get("DO"))
    elem_bytes = ref.element_size() if hasattr(ref, "element_size") else 2
    bias = args.get("Bias")
    bias_bytes = bias.element_size() if hasattr(bias, "element_size") else 0
    has_mask = hasattr(args.get("Mask"), "element_size")
    # row / column ranges (MASK_RANGES, COL_RANGES) keep the mask tier but load no mask tile
    return prune(kind, configs, block_d, block_dv, elem_bytes, smem_limit, autotune, bias_bytes=bias_bytes, has_mask=has_mask,
                 exclude=exclude, mask_tile=has_mask and not (args.get("MASK_RANGES") or args.get("COL_RANGES")))


def _pruner(kind: str):
    def early_config_prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        ref = args.get("Q", args.get("DO"))
        device = ref.device if hasattr(ref, "device") else None
        return prune_for_call(kind, configs, args, shared_memory_limit(device), autotune_mode(), exclude=banned(variant_key(kind, args)))

    early_config_prune.__name__ = f"prune_{kind}"
    return early_config_prune


prune_fwd = _pruner("fwd")
prune_bwd_preprocess = _pruner("bwd_preprocess")
prune_bwd_dkdv = _pruner("bwd_dkdv")
prune_bwd_dq = _pruner("bwd_dq")
