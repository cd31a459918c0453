"""Backend options: what `torch.compile(..., backend="flashfuse", options={...})` accepts."""

from __future__ import annotations

import dataclasses
import difflib
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
        parts.append(f"{name}: one of {', '.join(map(repr, choices))}" if choices else f"{name}: a bool (True or False)")
    return "; ".join(parts)


def valid_options() -> str:
    """What `options=` accepts, for error messages."""
    return _valid_list()


def _did_you_mean(value: Any, choices) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_value(key: str, value: Any) -> None:
    if key in _CHOICES:
        valid = ", ".join(map(repr, _CHOICES[key]))
        if not isinstance(value, str):
            raise TypeError(f"flashfuse: option {key!r} must be a string, got {type(value).__name__} {value!r}; valid: {valid}")
        if value not in _CHOICES[key]:
            raise ValueError(f"flashfuse: option {key!r} got {value!r}{_did_you_mean(value, _CHOICES[key])}; valid: {valid}")
    elif not isinstance(value, bool):
        raise TypeError(f"flashfuse: option {key!r} must be a bool (True or False), got {type(value).__name__} {value!r}")


def _check_combination(parsed: Options, given) -> None:
    if not parsed.fusion:
        useless = [k for k in ("kernel", "strict") if k in given and getattr(parsed, k) != _FIELDS[k].default]
        if useless:
            raise ValueError(
                f"flashfuse: option {useless[0]!r} has no effect with fusion=False (nothing is fused); "
                f"drop it, or set fusion=True. Valid options: {_valid_list()}"
            )


def parse_options(options: Optional[Mapping[str, Any]]) -> Options:
    """Validate a user's options dict; every error names what is valid.

    Unknown keys, values of the wrong type, unknown choices and combinations that cannot mean
    anything (kernel or strict=True with fusion=False) raise. torch.compile calls the backend
    lazily, so these surface at the first call, wrapped by Dynamo in BackendCompilerFailed
    (whose message carries ours).
    """
    if options is None:
        return Options()
    if isinstance(options, Options):
        values = dataclasses.asdict(options)
        given = [k for k, v in values.items() if v != _FIELDS[k].default]
    elif isinstance(options, Mapping):
        values, given = dict(options), list(options)
    else:
        raise TypeError(f"flashfuse: options must be a dict, got {type(options).__name__}. Valid options: {_valid_list()}")
    for key, value in values.items():
        if not isinstance(key, str) or key not in _FIELDS:
            raise ValueError(f"flashfuse: unknown option {key!r}{_did_you_mean(key, _FIELDS)}. Valid options: {_valid_list()}")
        _check_value(key, value)
    parsed = options if isinstance(options, Options) else Options(**values)
    _check_combination(parsed, given)
    return parsed
