"""Input checks shared by the public functions, the registered op bodies and their fake (meta) kernels.

Every check here reads metadata only (type, dtype, rank, shape, strides, device, Python scalars): no tensor
value is read, so the checks cost no host synchronisation and run unchanged on fake tensors under
``torch.compile``. Each op calls the same check function from its public wrapper (before tracing), from the
body of its ``torch.library`` op (so ``torch.ops.mdlm.*`` called directly, by ``torch.compile`` or by another
library, is checked before any pointer reaches a kernel) and from its fake kernel (so a traced graph rejects
the same inputs). The checks run before backend selection: every backend rejects the same inputs with the same
exception type.

Exception types: TypeError for a wrong Python type or tensor dtype, ValueError for a wrong shape, device, size or
scalar value, IndexError for a slice index outside its tensor (the adaLN ``*_idx`` arguments). Every message
starts with ``"<op>: <argument name>"`` so the caller sees which argument is wrong.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)       # what the Triton kernels take
REF_FLOATS = FLOATS + (torch.float64,)                           # the reference backends also take float64


def fail(op: str, msg: str, exc=ValueError):
    raise exc(f"{op}: {msg}")


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _shape_str(shape) -> str:
    items = ["*" if s is None else str(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def tensor(op: str, name: str, t, *, dtypes: Optional[Sequence[torch.dtype]] = None, ndim: Optional[int] = None,
           shape: Optional[Sequence[Optional[int]]] = None, optional: bool = False) -> Optional[torch.Tensor]:
    """``t`` is a tensor (or None when ``optional``) with a dtype in ``dtypes``, ``ndim`` dimensions and the
    given ``shape`` (None entries: any size). Returns t."""
    if t is None:
        if optional:
            return None
        fail(op, f"{name} must be a torch.Tensor, got None", TypeError)
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, f"{name} must be {_dtype_names(dtypes)} (got dtype {t.dtype})", TypeError)
    if shape is not None:
        if t.dim() != len(shape) or any(w is not None and g != w for g, w in zip(t.shape, shape)):
            fail(op, f"{name} must have shape {_shape_str(shape)}, got {_shape_str(tuple(t.shape))}")
    elif ndim is not None and t.dim() != ndim:
        fail(op, f"{name} must have rank {ndim} ({ndim} dimensions), got shape {_shape_str(tuple(t.shape))}")
    return t


def same_device(op: str, **ts) -> None:
    """All given tensors (None entries ignored) live on one device."""
    devs = {n: t.device for n, t in ts.items() if t is not None}
    if len(set(devs.values())) > 1:
        first = next(iter(devs.values()))
        bad = [n for n, d in devs.items() if d != first]
        fail(op, f"{bad[0]} is on {devs[bad[0]]} but " + ", ".join(f"{n} is on {d}" for n, d in devs.items()
                                                                   if d == first)
             + "; all tensors must be on one device (the same device)")


def on_device(op: str, name: str, t: Optional[torch.Tensor], device: torch.device, other: str) -> None:
    if t is not None and t.device != device:
        fail(op, f"{name} is on {t.device} but {other} is on {device}; all tensors must be on one device (the same "
                 "device)")


def int_arg(op: str, name: str, v, lo: Optional[int] = None, hi: Optional[int] = None, exc=ValueError) -> int:
    """v is an int (not a bool) in [lo, hi] (bounds optional). numpy integers are accepted."""
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        try:
            import numpy as np
            if isinstance(v, np.integer) and not isinstance(v, np.bool_):
                v = int(v)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        fail(op, f"{name} must be an int, got {type(v).__name__}", TypeError)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        want = (f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None
                else f"<= {hi}")
        fail(op, f"{name} must be {want}, got {v}", exc)
    return v


def float_arg(op: str, name: str, v, lo: Optional[float] = None, hi: Optional[float] = None,
              lo_open: bool = False, hi_open: bool = False) -> float:
    """v is a real number (int or float, not a bool), finite, in the interval given by lo / hi (closed unless
    ``lo_open`` / ``hi_open``). Returns float(v)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            import numpy as np
            if isinstance(v, (np.floating, np.integer)) and not isinstance(v, np.bool_):
                v = float(v)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        fail(op, f"{name} must be a float, got {type(v).__name__}", TypeError)
    rng = None
    if lo is not None or hi is not None:
        rng = (("(" if lo_open or lo is None else "[") + (f"{lo:g}" if lo is not None else "-inf") + ", "
               + (f"{hi:g}" if hi is not None else "inf") + (")" if hi_open or hi is None else "]"))
    try:
        v = float(v)
    except OverflowError:
        fail(op, f"{name} must be finite{' and in ' + rng if rng else ''}, got an int too large for a float")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if not math.isfinite(v) or bad_lo or bad_hi:
        fail(op, f"{name} must be {'in ' + rng + ' (finite)' if rng else 'finite'}, got {v}")
    return v


def bool_arg(op: str, name: str, v) -> bool:
    """v is a bool (a string such as "False" or an int is refused: bool("False") is True)."""
    if not isinstance(v, bool):
        try:
            import numpy as np
            if isinstance(v, np.bool_):
                return bool(v)
        except ImportError:  # pragma: no cover
            pass
        fail(op, f"{name} must be a bool, got {type(v).__name__} {v!r}", TypeError)
    return v


def dtype_arg(op: str, name: str, v, allowed: Sequence[torch.dtype]) -> torch.dtype:
    if not isinstance(v, torch.dtype):
        fail(op, f"{name} must be a torch.dtype, got {type(v).__name__}", TypeError)
    if v not in allowed:
        fail(op, f"{name} must be one of {_dtype_names(allowed)}, got {v}", TypeError)
    return v


def backend_arg(op: str, v) -> None:
    """The per-call backend name: None or a string (its value is checked by backend.normalize)."""
    if v is not None and not isinstance(v, str):
        fail(op, f"backend must be None or a string, got {type(v).__name__}", TypeError)
    if v is not None:
        from .. import backend as _backend
        try:
            _backend.normalize(v)
        except ValueError as e:
            fail(op, f"backend: {e}")
