"""Optional Triton import. ``HAS_TRITON`` is False (and ``triton``/``tl`` are None) when triton
is missing or broken; ``ERROR`` says why.

Triton decides at *decoration* time whether a kernel is interpreted (TRITON_INTERPRET=1), so
``INTERPRETED`` records the mode in force when mdlm_kernels defined its kernels; Triton on CPU
tensors needs it.
"""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    ERROR: str | None = None
except Exception as e:  # ImportError or a broken install
    triton = None
    tl = None
    HAS_TRITON = False
    ERROR = f"{type(e).__name__}: {e}"


def interpret_env() -> bool:
    """TRITON_INTERPRET as triton parses it (truthy: 1/true/yes/on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


INTERPRETED = HAS_TRITON and interpret_env()
