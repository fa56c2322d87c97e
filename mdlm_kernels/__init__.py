"""mdlm-kernels: fused CUDA/C++ and Triton kernels for masked diffusion language models.

Imports without the compiled extension (``mdlm_kernels._C``) and without triton; ``available()``
reports what this process can use. Backends: see :mod:`mdlm_kernels.backend`. Imported from a source
checkout that has no built extension, it warns once and says how to build it (``_ext.warn_if_unbuilt_source_tree``);
on a CUDA device, automatic dispatch announces once per device when it cannot use the compiled kernels.
"""

from __future__ import annotations

from . import _ext, _triton, backend
from .backend import BACKENDS
from .errors import BackendUnavailableError, KernelError
from .ops.masking import MaskOutput, forward_mask, masked_rows_bound
from .ops.philox import philox4x32, philox_uniform
from .ops.linear_ce import LinearCEOutput, subs_linear_cross_entropy
from .ops.sampling import SampleOutput, sample_step
from .ops.adaln import adaln_modulate
from .ops.gated_residual import gated_residual_modulate
from .ops.rotary import rotary_qkv, rotary_tables
from .ops.gelu import bias_gelu

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "KernelError",
    "MaskOutput",
    "available",
    "backend",
    "forward_mask",
    "masked_rows_bound",
    "philox4x32",
    "philox_uniform",
    "LinearCEOutput",
    "subs_linear_cross_entropy",
    "adaln_modulate",
    "gated_residual_modulate",
    "rotary_qkv",
    "rotary_tables",
    "bias_gelu",
]

__version__ = "0.1.0"

_ext.warn_if_unbuilt_source_tree()


def available() -> dict:
    """What this process can run: compiled extension, CUDA, triton, interpreter mode."""
    import torch

    m = _ext.load()
    cuda_compiled = bool(m is not None and m.cuda_compiled())
    return {
        "extension": m is not None,
        "extension_error": _ext.error(),
        "cuda_compiled": cuda_compiled,
        "cuda_archs": m.cuda_archs() if m is not None else "",
        "cuda_runtime_devices": int(m.cuda_device_count()) if cuda_compiled else 0,
        "torch_cuda": bool(torch.cuda.is_available()),
        "triton": _triton.HAS_TRITON,
        "triton_interpret": _triton.interpret_env(),
    }
