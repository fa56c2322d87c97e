"""Lazy access to the compiled extension ``mdlm_kernels._C``.

The package must import without it (source tree without a build, broken build): ``load()``
returns None and ``error()`` tells why. ``call()`` turns RuntimeErrors raised by the extension
(CUDA errors) into :class:`mdlm_kernels.KernelError`; ValueErrors (bad sizes) pass through.

``warn_if_unbuilt_source_tree()`` (called once by ``import mdlm_kernels``): when the package is imported
from a source checkout (``<checkout>/mdlm_kernels`` next to ``setup.py`` and ``csrc/``) that holds no built
extension -- e.g. Python started in the checkout after a non-editable ``pip install .``, which finds the
source folder before the installed package -- say so once (a RuntimeWarning) with how to fix it, instead of
every op silently running its Triton / PyTorch fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings

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


BUILD_HINT = ("build it in place with `pip install --no-build-isolation -e .` (or `python setup.py build_ext "
              "--inplace`) in the checkout, or run Python outside the checkout to use the installed package")
_warned_source_tree = False


def source_tree() -> str | None:
    """The checkout folder when this package is imported from a source tree (setup.py and csrc/ next to the
    package folder), else None (an installed package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return root
    return None


def warn_if_unbuilt_source_tree() -> bool:
    """Warn once (RuntimeWarning) if the package comes from a source tree without a built ``_C``; True if it
    warned now. Looks for the extension file only (``find_spec``: nothing is loaded)."""
    global _warned_source_tree
    if _warned_source_tree:
        return False
    root = source_tree()
    if root is None:
        return False
    try:
        found = importlib.util.find_spec("mdlm_kernels._C") is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return False
    _warned_source_tree = True
    warnings.warn(f"mdlm_kernels is imported from the source tree {root} without its compiled extension "
                  f"(mdlm_kernels._C is not built there): every op falls back to Triton or plain PyTorch. To fix: "
                  f"{BUILD_HINT}. (Said once.)", RuntimeWarning, stacklevel=3)
    return True
