"""Lazy access to the compiled extension ``mdlm_kernels._C``.

The package must import without it (source tree without a build, broken build): ``load()``
returns None and ``error()`` tells why. ``call()`` turns RuntimeErrors raised by the extension
(CUDA errors) into :class:`mdlm_kernels.KernelError`; ValueErrors (bad sizes) pass through.
"""

from __future__ import annotations

import importlib
import threading

from .errors import KernelError

_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False


def load():
    """The ``mdlm_kernels._C`` module, or None when it cannot be imported."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                _module = importlib.import_module("mdlm_kernels._C")
                _error = None
            except Exception as e:  # ImportError, undefined symbols, blocked by sys.modules[...] = None
                _module = None
                _error = f"{type(e).__name__}: {e}"
            _tried = True
    return _module


def error() -> str | None:
    """Why the extension could not be imported (None if it imported)."""
    load()
    return _error


def available() -> bool:
    return load() is not None


def cuda_compiled() -> bool:
    m = load()
    return bool(m is not None and m.cuda_compiled())


def call(fn_name: str, *args):
    """Call ``_C.<fn_name>(*args)``; RuntimeError from the extension -> KernelError."""
    m = load()
    if m is None:
        raise KernelError(f"mdlm_kernels._C is not available ({_error})")
    try:
        return getattr(m, fn_name)(*args)
    except RuntimeError as e:
        raise KernelError(str(e)) from e
