"""Exceptions raised by mdlm_kernels."""


class KernelError(RuntimeError):
    """A compiled kernel failed (e.g. a CUDA launch error reported by the extension)."""


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``backend=`` or ``MDLM_BACKEND``) but cannot run this call."""
