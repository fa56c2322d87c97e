"""Attention through ``torch.nn.functional.scaled_dot_product_attention`` with an explicit backend choice.

On CUDA the SDPA backends are tried in the order cuDNN -> flash -> memory-efficient -> math (on an
H200, B=64, 12 heads, L=1024, head dim 64, forward + backward: cuDNN 2.27 ms, flash 3.43 ms,
memory-efficient 7.07 ms; DESIGN.md). The first one that accepts a given signature (device, dtype,
shape, causal, grad, deterministic mode) is remembered and tried first from then on (re-probing if it
later refuses), so the backend that runs is known:
``mdlm_kernels.backend.last_used["attention"]`` records it. ``MDLM_SDPA_BACKENDS`` (comma-separated, e.g.
"flash,efficient") overrides the order. On CPU, SDPA picks its own CPU kernel ("cpu").
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import backend as _backend
from . import _checks

OP = "attention"

_ORDER = ("cudnn", "flash", "efficient", "math")
_CHOSEN: dict = {}


def _sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def _order():
    env = os.environ.get("MDLM_SDPA_BACKENDS", "").strip()
    if not env:
        return _ORDER
    names = tuple(n.strip().lower() for n in env.split(",") if n.strip())
    bad = [n for n in names if n not in _ORDER]
    if bad:
        raise ValueError(f"MDLM_SDPA_BACKENDS: unknown backend(s) {bad}; choose from {_ORDER}")
    return names


def _check(q, k, v, causal) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(OP, name, t, dtypes=_checks.REF_FLOATS, ndim=4)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _checks.fail(OP, f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}", TypeError)
    _checks.same_device(OP, q=q, k=k, v=v)
    B, H, L, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        _checks.fail(OP, f"k must be (B, H, Lk, D) = ({B}, {H}, Lk, {D}) like q {tuple(q.shape)}, got "
                         f"{tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        _checks.fail(OP, f"v must be (B, H, Lk, Dv) with (B, H, Lk) = {tuple(k.shape[:3])} of k, got "
                         f"{tuple(v.shape)}")
    _checks.bool_arg(OP, "causal", causal)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q, k, v (B, H, L, D) -> (B, H, L, D)."""
    _check(q, k, v, causal)
    if q.device.type != "cuda":
        _backend.last_used["attention"] = "cpu"
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from torch.nn.attention import sdpa_kernel
    key = (q.device, q.dtype, tuple(q.shape), causal, q.requires_grad or k.requires_grad or v.requires_grad,
           torch.are_deterministic_algorithms_enabled())
    names = _sdpa_backends()
    order = _order()
    chosen = _CHOSEN.get(key)
    if chosen is not None:  # the remembered backend first; if it now refuses, forget it and probe again
        order = (chosen,) + tuple(n for n in order if n != chosen)
    errors = []
    for name in order:
        try:
            with sdpa_kernel([names[name]]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        except (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError)):
            raise  # not a "backend does not support these inputs": never hide it behind a fallback
        except RuntimeError as e:  # this backend does not take these inputs on this device
            errors.append(f"{name}: {str(e).splitlines()[0][:120]}")
            _CHOSEN.pop(key, None)
            continue
        _CHOSEN[key] = name
        _backend.last_used["attention"] = name
        return out
    raise RuntimeError("no SDPA backend accepted these inputs: " + "; ".join(errors))
