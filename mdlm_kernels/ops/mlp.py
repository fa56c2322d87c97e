"""The DiT MLP (Linear -> GELU(tanh) -> Linear) with its activation recomputed in the backward, not stored.

    out = gelu_tanh(y W1^T + b1) W2^T + b2        y (..., d), W1 (n, d), b1 (n,), W2 (d_out, n), b2 (d_out,)

the published ``nn.Sequential(Linear(d, n), GELU(approximate="tanh"), Linear(n, d))`` (n = 4 d), computed as
the fused block path computed it before: a = y W1^T (GEMM without its bias), act = ``bias_gelu(a, b1)`` (bias
added in fp32 inside the elementwise kernel), out = act W2^T + b2.

Memory. Chained as three autograd nodes, the first Linear keeps y, bias_gelu keeps a and the second Linear keeps
act: two (M, n) tensors per block (M = number of tokens). This Function keeps y and a only; the backward
recomputes act inside the bias+GELU backward kernel, which reads a and dL/dact anyway
(:func:`mdlm_kernels.ops.gelu.bias_gelu_backward_recompute`: one more store per element, no extra pass, the
same bits as the forward's act), and writes dL/da over dL/dact in place. Per (M, n) unit: forward keeps 1
instead of 2; the backward holds at most 3 at once (a, dL/da, act) instead of 4 (a, act, dL/dact, dL/da).

Backward (g = dL/dout, (M, d_out), rows flattened; all GEMMs in the compute dtype, as autograd's):
  (1) g_act = g W2                                          (M, n)
  (2) one kernel pass over (g_act, a):  dz = g_act * gelu'(a + b1) written over g_act,
      act = gelu(a + b1) recomputed,   db1 = sum over rows of dz (fp32 partial sums)
  (3) dW2 = g^T act;   act is freed here                    (d_out, n)
  (4) db2 = sum over rows of g                              (fp32 accumulation)
  (5) dW1 = dz^T y                                          (n, d)
  (6) dy  = dz W1                                           (M, d)
Weight and bias gradients are returned in the parameters' dtypes (an autocast run gets bf16 GEMM results cast
to fp32, exactly as autograd's cast node gives them).

Dtypes follow F.linear: under autocast (enabled for y's device type) y, W1, W2 and b2 are cast to the autocast
dtype (b1 is added in fp32 by the kernel, as the fused path did); without autocast y, W1, W2 and b2 must share
one dtype (b1 may be fp32 with bf16/fp16 activations).

Backends: the GEMMs are torch's; the elementwise passes use ``bias_gelu``'s ("triton" or "reference", chosen
per call as that op chooses them; ``backend=`` forces one).
"""
from __future__ import annotations

from typing import Optional

import contextlib

import torch
import torch.nn.functional as F

from . import _checks
from . import gelu as _gelu

OP = "gelu_mlp"


class _GeluMLP(torch.autograd.Function):
    """y, a saved; act recomputed by the bias+GELU backward kernel (see the module docstring)."""

    @staticmethod
    def forward(ctx, y, w1, b1, w2, b2, cdt, backend):
        with _no_autocast(y.device):
            yc, w1c, w2c = y.to(cdt), w1.to(cdt), w2.to(cdt)
            b2c = None if b2 is None else b2.to(cdt)
            a = F.linear(yc, w1c)                                     # (..., n), b1 not added here
            act = torch.ops.mdlm.bias_gelu(a, b1, backend)            # (..., n), in cdt
            out = F.linear(act, w2c, b2c)                             # (..., d_out)
        ctx.save_for_backward(yc, a, w1c, b1, w2c)                    # not act
        ctx.dtypes = (y.dtype, w1.dtype, w2.dtype, None if b2 is None else b2.dtype)
        ctx.backend = backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        yc, a, w1c, b1, w2c = ctx.saved_tensors
        y_dt, w1_dt, w2_dt, b2_dt = ctx.dtypes
        need_y, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        n, d = w1c.shape
        with _no_autocast(yc.device):
            g2 = g.reshape(-1, g.shape[-1]).to(w2c.dtype)             # (M, d_out)
            if not (need_y or need_w1 or need_b1 or need_w2):
                return None, None, None, None, _db2(g2, b2_dt, need_b2), None, None
            g_act = g2.mm(w2c).view(a.shape)                         # (1): fresh, contiguous
            db1, act = _gelu.bias_gelu_backward_recompute(g_act, a, b1, backend=ctx.backend)   # (2)
            dz = g_act.view(-1, n)
            dw2 = g2.t().mm(act.view(-1, n)).to(w2_dt) if need_w2 else None                # (3)
            del act
            dw1 = dz.t().mm(yc.reshape(-1, d)).to(w1_dt) if need_w1 else None              # (5)
            dy = dz.mm(w1c).view(yc.shape).to(y_dt) if need_y else None                    # (6)
        return dy, dw1, db1 if need_b1 else None, dw2, _db2(g2, b2_dt, need_b2), None, None


def _no_autocast(device):
    """Autocast off inside the Function (its casts are explicit); CPU backward runs on the caller's thread and
    would otherwise see the caller's autocast state."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _db2(g2, dtype, need):
    return g2.sum(0, dtype=torch.float32).to(dtype) if need else None                      # (4)


def _compute_dtype(y, w1, b1, w2, b2):
    dev = y.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    bad = [(name, t.dtype) for name, t in (("w1", w1), ("w2", w2), ("b2", b2))
           if t is not None and t.dtype != y.dtype]
    if bad:
        raise TypeError(f"{OP}: without autocast y, w1, w2 and b2 must share one dtype (as F.linear); y is "
                        f"{y.dtype}, " + ", ".join(f"{n} is {dt}" for n, dt in bad))
    return y.dtype


def gelu_mlp(y: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: Optional[torch.Tensor],
             *, backend: Optional[str] = None) -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(y, w1, b1), approximate="tanh"), w2, b2)`` keeping only y and y w1^T for the
    backward (the activation is recomputed there; see the module docstring).

    y (..., d); w1 (n, d); b1 (n,); w2 (d_out, n); b2 (d_out,) or None -> (..., d_out) in the compute dtype
    (the autocast dtype under autocast, else y's dtype). bias + GELU use fp32 math (``bias_gelu``).
    Differentiable w.r.t. y and all four parameters (first order only).
    """
    ts = {"y": y, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    for name, t in ts.items():
        if t is None and name == "b2":
            continue
        if not torch.is_tensor(t):
            raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _checks.REF_FLOATS:
            raise TypeError(f"{OP}: {name} must be floating point (float32, bfloat16, float16 or float64), got "
                            f"{t.dtype}")
        if t.device != y.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but y is on {y.device}")
    if y.dim() < 1 or w1.dim() != 2 or w2.dim() != 2 or b1.dim() != 1:
        raise ValueError(f"{OP}: expected y (..., d), w1 (n, d), b1 (n,), w2 (d_out, n); got y {tuple(y.shape)}, "
                         f"w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}")
    n, d = w1.shape
    if y.shape[-1] != d or b1.shape[0] != n or w2.shape[1] != n or n == 0:
        raise ValueError(f"{OP}: shapes do not chain: y {tuple(y.shape)}, w1 {tuple(w1.shape)}, b1 "
                         f"{tuple(b1.shape)}, w2 {tuple(w2.shape)} (need y[-1] = w1[1], b1[0] = w1[0] = w2[1] > 0)")
    if b2 is not None and (b2.dim() != 1 or b2.shape[0] != w2.shape[0]):
        raise ValueError(f"{OP}: b2 must be (d_out,) = ({w2.shape[0]},), got {tuple(b2.shape)}")
    _checks.backend_arg(OP, backend)
    cdt = _compute_dtype(y, w1, b1, w2, b2)
    return _GeluMLP.apply(y, w1, b1.contiguous(), w2, b2, cdt, backend)
