"""Backend options: what `torch.compile(..., backend="flashfuse", options={...})` accepts."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from flashfuse.ops import KERNELS

COMPILERS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass(frozen=True)
class Options:
    compiler: str = "inductor"   # inner compiler for the rewritten graph
    fusion: bool = True          # False: no rewrite, the graph goes to the inner compiler as is
    kernel: str = "auto"         # auto, triton or reference
    strict: bool = False         # True: a region that fails to lower raises instead of falling back


_CHOICES = {"compiler": COMPILERS, "kernel": KERNELS}
_FIELDS = {f.name: f for f in dataclasses.fields(Options)}


def _valid_list() -> str:
    parts = []
    for name, f in _FIELDS.items():
        choices = _CHOICES.get(name)
        parts.append(f"{name}: one of {', '.join(map(repr, choices))}" if choices else f"{name}: {f.type}")
    return "; ".join(parts)


def parse_options(options: Optional[Mapping[str, Any]]) -> Options:
    """Validate a user's options dict; every error names what is valid."""
    if options is None:
        return Options()
    if isinstance(options, Options):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"flashfuse: options must be a dict, got {type(options).__name__}. Valid options: {_valid_list()}")
    values = {}
    for key, value in options.items():
        if key not in _FIELDS:
            raise ValueError(f"flashfuse: unknown option {key!r}. Valid options: {_valid_list()}")
        if key in _CHOICES:
            if value not in _CHOICES[key]:
                raise ValueError(f"flashfuse: option {key!r} got {value!r}; valid: {', '.join(map(repr, _CHOICES[key]))}")
        elif not isinstance(value, bool):
            raise TypeError(f"flashfuse: option {key!r} must be a bool, got {value!r}")
        values[key] = value
    parsed = Options(**values)
    if not parsed.fusion and "kernel" in values:
        raise ValueError("flashfuse: option 'kernel' has no effect with fusion=False; drop one of them")
    return parsed
