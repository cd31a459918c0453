"""Render the Jinja kernel templates (flashfuse/templates/*.py.jinja) to Triton source files.

Each rendering is a plain, readable Python module written to the kernel cache directory
(env FLASHFUSE_CACHE_DIR, default ~/.cache/flashfuse/kernels) under a name hashed from the
kind, the options and the template text, then imported from that file (Triton reads kernel
source from disk). Rendering runs nothing, so the compiler's explain report can name the
generated sources of a region without a GPU:

    opts = template_options(torch.bfloat16, 128, has_bias=False, has_mask=True, causal=True,
                            dropout=False, needs_dbias=False)
    render("fwd", opts)  ->  ~/.cache/flashfuse/kernels/attn_fwd_3f2a...py

Options specialize the rendering structurally (header, autotune reset of the dBias buffer);
the kernels themselves specialize on tl.constexpr values the launcher passes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import threading
from types import ModuleType
from typing import Dict, Optional

import torch

from flashfuse import envvars

TEMPLATE_DIR = pathlib.Path(__file__).resolve().parent.parent / "templates"
# kind -> (template file, kernel function name in the rendered module)
KINDS: Dict[str, tuple] = {
    "fwd": ("attn_fwd.py.jinja", "attn_fwd"),
    "bwd_preprocess": ("attn_bwd_preprocess.py.jinja", "attn_bwd_preprocess"),
    "bwd_dkdv": ("attn_bwd_dkdv.py.jinja", "attn_bwd_dkdv"),
    "bwd_dq": ("attn_bwd_dq.py.jinja", "attn_bwd_dq"),
}
# Bump when the rendering code (not the templates, which are hashed) changes its output.
RENDER_VERSION = 1

_lock = threading.Lock()
_modules: Dict[pathlib.Path, ModuleType] = {}


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FLASHFUSE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "flashfuse" / "kernels")


def block_dim(head_dim: int) -> int:
    """Head dim padded to the next power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, 1 << max(int(head_dim) - 1, 0).bit_length())


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def dot_precision(dtype) -> str:
    """tl.dot input precision: exact "ieee" for fp32 unless torch allows TF32 matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # the default; ignored for fp16/bf16 operands


def template_options(dtype, head_dim: int, has_bias: bool, has_mask: bool, causal: bool, dropout: bool,
                     needs_dbias: bool, head_dim_v: Optional[int] = None) -> dict:
    """The options one attention region renders with (JSON-able, stable key order)."""
    head_dim_v = int(head_dim if head_dim_v is None else head_dim_v)
    return {
        "dtype": _dtype_name(dtype),
        "head_dim": int(head_dim),
        "head_dim_v": head_dim_v,
        "block_d": block_dim(head_dim),
        "block_dv": block_dim(head_dim_v),
        "has_bias": bool(has_bias),
        "has_mask": bool(has_mask),
        "causal": bool(causal),
        "dropout": bool(dropout),
        "needs_dbias": bool(needs_dbias and has_bias),
        "input_precision": dot_precision(dtype),
        # the CPU interpreter renders a variant of the dot helper (see common.py.jinja)
        "interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def _summary(options: dict) -> str:
    parts = [options["dtype"], f"head_dim={options['head_dim']} (BLOCK_D={options['block_d']})"]
    if options["head_dim_v"] != options["head_dim"]:
        parts.append(f"head_dim_v={options['head_dim_v']} (BLOCK_DV={options['block_dv']})")
    for flag in ("causal", "has_bias", "has_mask", "dropout", "needs_dbias"):
        if options[flag]:
            parts.append(flag)
    parts.append(f"dot input_precision={options['input_precision']}")
    if options.get("interpret"):
        parts.append("TRITON_INTERPRET=1")
    return ", ".join(parts)


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"flashfuse: unknown kernel kind {kind!r}; valid: {', '.join(KINDS)}")


def _kind_options(kind: str, options: dict) -> dict:
    # only dK/dV writes dBias: the other kinds render (and hash) the same with or without it
    if kind != "bwd_dkdv" and options.get("needs_dbias"):
        return {**options, "needs_dbias": False}
    return options


def render_source(kind: str, options: dict) -> str:
    """The Triton source of one kernel kind for `options` (a template_options dict)."""
    _check_kind(kind)
    options = _kind_options(kind, options)
    template = _environment().get_template(KINDS[kind][0])
    return template.render(**options, summary=_summary(options))


@functools.lru_cache(maxsize=None)
def _templates_digest() -> str:
    # the templates are read once per process: edits made while it runs are not picked up
    h = hashlib.sha256()
    for path in sorted(TEMPLATE_DIR.glob("*.jinja")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _key(kind: str, options: dict) -> str:
    h = hashlib.sha256()
    h.update(f"{RENDER_VERSION}:{kind}:{_templates_digest()}:".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()[:20]


def render(kind: str, options: dict) -> pathlib.Path:
    """Render `kind` with `options` to the cache directory (if not already there); return its path."""
    _check_kind(kind)
    options = _kind_options(kind, options)
    path = cache_dir() / f"{KINDS[kind][1]}_{_key(kind, options)}.py"
    if not path.exists():
        source = render_source(kind, options)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # e.g. a read-only home: fall back to the temp dir
            path = pathlib.Path(tempfile.gettempdir()) / "flashfuse-kernels" / path.name
            if path.exists():
                return path
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)  # atomic: concurrent renderers write the same text
    return path


def sources_for(dtype, head_dim: int, has_bias: bool, has_mask: bool, causal: bool, dropout: bool,
                needs_dbias: bool, head_dim_v: Optional[int] = None) -> Dict[str, pathlib.Path]:
    """Paths of all four rendered kernels of one region: {kind: path}."""
    options = template_options(dtype, head_dim, has_bias, has_mask, causal, dropout, needs_dbias, head_dim_v)
    return {kind: render(kind, options) for kind in KINDS}


def load_module(kind: str, options: dict) -> ModuleType:
    """Render (if needed) and import the module of `kind`; cached per file for the process."""
    path = render(kind, options)
    with _lock:
        module = _modules.get(path)
        if module is None:
            name = f"flashfuse_generated_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            _modules[path] = module
    return module


_kernels: Dict[tuple, object] = {}


def kernel(kind: str, options: dict):
    """The (autotuned) Triton kernel of `kind` for `options`; memoized (the launchers call it per op)."""
    key = (kind, envvars.get("FLASHFUSE_CACHE_DIR"), tuple(sorted(options.items())))
    fn = _kernels.get(key)
    if fn is None:
        fn = _kernels[key] = getattr(load_module(kind, options), KINDS[kind][1])
    return fn
