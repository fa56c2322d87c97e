"""Bias + GELU(tanh): the elementwise pass between the MLP's two GEMMs.

    y = gelu_tanh(x + bias),   gelu_tanh(z) = 0.5 z (1 + tanh(u)),  u = sqrt(2/pi) (z + 0.044715 z^3)

F.gelu(approximate="tanh") semantics with fp32 math, y in x's dtype. x (..., n) is the first MLP GEMM's
output computed without its bias (``F.linear(h, W1)``), bias (n,) the Linear's bias (added in fp32; the
published GEMM adds it before rounding its output, a difference below the output rounding).

Kernel form (no cancellation for negative z): 1 + tanh(u) = 2 sigma(2u), so
  (1) y     = z * s,   s = 1 / (1 + exp(-2u))
  (2) dy/dz = s + 2 z s (1 - s) du/dz,   du/dz = sqrt(2/pi) (1 + 3 * 0.044715 z^2)
  (3) dx    = g * dy/dz;   dbias = sum over rows of dx  (fp32 partial sums per row chunk, then summed)

Recomputing y in the backward (``mdlm::bias_gelu_backward_recompute``, used by :mod:`mdlm_kernels.ops.mlp`, whose
second GEMM needs y for its weight gradient): the backward kernel already has z and s in registers for (2), so it
also stores (1) -- the same instructions as the forward kernel on the same loaded values, hence the same bits
after rounding to x's dtype -- at the cost of one store of y per element (no extra pass over x, no y kept from
the forward). That op writes dx over g in place (each element is read before it is written, by the program that
writes it): the MLP backward then holds x, dx and y, three (M, n) tensors, where the unfused one holds four.

Backends: "triton" (fp32/bf16/fp16) and "reference" (plain PyTorch ``F.gelu``; also float64). Non-contiguous x
is copied.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .. import launch as _launch
from .._triton import HAS_TRITON, tl, triton
from . import _checks
if HAS_TRITON:
    from ._adaln_common import _cast

OP = "bias_gelu"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REF_DTYPES = _DTYPES + (torch.float64,)
_K0 = 0.7978845608028654  # sqrt(2 / pi)
_K1 = 0.044715

if HAS_TRITON:

    @triton.jit
    def _gelu_s(z):
        """s = sigma(2u) = 1 / (1 + exp(-2u)), and s = 0 exactly where the spec's 1 + tanh(u) is 0 in fp32
        (tanh(u) rounds to -1 for u < -9.0109, i.e. z < -5.1578; there sigma(2u) < 1.5e-8): y = z s = -0 and
        dy/dz = s + 2 z s (1 - s) du/dz = 0 as the spec's while z^2 stays finite, NaN once 3 z^2 overflows (the
        spec's 0 * inf). Exact zeros matter when y meets an infinity later (the next GEMM: -inf * -0 = NaN in
        the spec). No floor on s: a floor (exp clamped at e^80, s >= 2e-35) times the z^3 growth of 2 z du/dz gave
        dy/dz = -3.9 at z = -1e12 and -3864 at -1e13, where the spec gives 0. The test is on z (live anyway), not
        on -2u, which keeps the backward at 128 registers (4 resident blocks, compile_check); the clamp only keeps
        the discarded branch from overflowing."""
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return tl.where(z < -5.1578, 0.0, 1.0 / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0))))

    @triton.jit
    def _bias_gelu_fwd_kernel(
        x_ptr,       # (M, n) input rows, contiguous
        b_ptr,       # (n,) bias
        y_ptr,       # (M, n) out, x's dtype
        M, n,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < n
        m2 = (rows < M)[:, None] & cm[None, :]
        offs = rows[:, None] * n + cols[None, :]
        z = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32) \
            + tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        y = z * _gelu_s(z)                                                       # (1)
        tl.store(y_ptr + offs, _cast(y, y_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _bias_gelu_bwd_kernel(
        g_ptr,       # (M, n) dL/dy
        x_ptr,       # (M, n) forward input
        b_ptr,       # (n,) bias
        dx_ptr,      # (M, n) out, x's dtype; may be g_ptr itself (elementwise: read before written, same program)
        y_ptr,       # (M, n) out (WRITE_Y only): the forward output recomputed, x's dtype
        part_ptr,    # (n_chunks, n) fp32 out: partial dbias of this program's rows
        M, n, rows_per_chunk,
        WRITE_Y: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        chunk = tl.program_id(1).to(tl.int64)
        cm = cols < n
        bias = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        acc = tl.zeros([BLOCK_N], tl.float32)
        for r0 in range(0, rows_per_chunk, BLOCK_M):
            rows = chunk * rows_per_chunk + r0 + tl.arange(0, BLOCK_M).to(tl.int64)
            m2 = (rows < M)[:, None] & cm[None, :]
            offs = rows[:, None] * n + cols[None, :]
            z = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32) + bias
            g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            s = _gelu_s(z)
            if WRITE_Y:  # (1) exactly as the forward kernel computes it: the same bits in x's dtype
                tl.store(y_ptr + offs, _cast(z * s, y_ptr.dtype.element_ty), mask=m2)
            du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
            dz = g * (s + 2.0 * z * s * (1.0 - s) * du)                          # (2), (3)
            tl.store(dx_ptr + offs, _cast(dz, dx_ptr.dtype.element_ty), mask=m2)
            acc += tl.sum(dz, 0)
        tl.store(part_ptr + chunk * n + cols, acc, mask=cm)


# Tests set this to a launch.GPU to run the interpreter (CPU tensors) with the tiles and grid a GPU launch would
# use (a small sm_count makes each backward program loop over several row blocks, as on the GPU).
_CPU_PLANS_AS: Optional[_launch.GPU] = None


def _plan_gpu(device):
    gpu = _launch.gpu_of(device)
    return _CPU_PLANS_AS if gpu is None and torch.device(device).type == "cpu" else gpu


def _cfg(M, n, gpu):
    """(BLOCK_M, BLOCK_N, num_warps); the interpreter (gpu None) gets wider tiles (it pays per op)."""
    bn = min(triton.next_power_of_2(n), 512 if gpu is not None else 4096)
    bm = max(1, min(32 if gpu is not None else 256, (4096 if gpu is not None else 16384) // bn))
    return bm, bn, 4


_BWD_BLOCKS_PER_SM = 4


def _fwd_triton(x2, bias):
    M, n = x2.shape
    y = torch.empty_like(x2)
    if M == 0:
        return y
    bm, bn, nw = _cfg(M, n, _plan_gpu(x2.device))
    _launch.launch(_launch.Plan(
        "bias_gelu.fwd", _bias_gelu_fwd_kernel, (triton.cdiv(M, bm), triton.cdiv(n, bn)), (x2, bias, y, M, n),
        dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=nw, vector_io=("ld", "st")), x2.device)
    return y


def _bwd_triton(g2, x2, bias, recompute=False):
    """(dx, dbias) or, with ``recompute``, (dbias, y) with dx written over g2 (which must then be contiguous and
    of x's dtype)."""
    M, n = x2.shape
    dx = g2 if recompute else torch.empty_like(x2)
    y = torch.empty_like(x2) if recompute else None
    if M == 0:
        db = torch.zeros_like(bias)
        return (db, y) if recompute else (dx, db)
    gpu = _plan_gpu(x2.device)
    bm, bn, nw = _cfg(M, n, gpu)
    ncol = triton.cdiv(n, bn)
    if gpu is not None:  # about 4 programs per SM, each looping over its rows
        nch = max(1, min(triton.cdiv(M, bm), triton.cdiv(_BWD_BLOCKS_PER_SM * gpu.sm_count, ncol)))
    else:
        nch = 1
    rows = triton.cdiv(triton.cdiv(M, nch), bm) * bm
    nch = triton.cdiv(M, rows)
    part = torch.empty((nch, n), dtype=torch.float32, device=x2.device)
    _launch.launch(_launch.Plan(
        "bias_gelu.bwd" + ("_recompute" if recompute else ""), _bias_gelu_bwd_kernel, (ncol, nch),
        (g2, x2, bias, dx, dx if y is None else y, part, M, n, rows),
        dict(WRITE_Y=recompute, BLOCK_M=bm, BLOCK_N=bn), num_warps=nw, blocks_per_sm=_BWD_BLOCKS_PER_SM,
        vector_io=("ld", "st")), x2.device)
    db = part.sum(0).to(bias.dtype)
    return (db, y) if recompute else (dx, db)


def _cdt(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fwd_reference(x2, bias):
    cdt = _cdt(x2)
    return F.gelu(x2.to(cdt) + bias.to(cdt), approximate="tanh").to(x2.dtype)


def _bwd_reference(g2, x2, bias, recompute=False):
    cdt = _cdt(x2)
    z = x2.to(cdt) + bias.to(cdt)
    t = torch.tanh(_K0 * (z + _K1 * z ** 3))
    dz = g2.to(cdt) * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _K0 * (1 + 3 * _K1 * z * z))
    db = dz.sum(0).to(bias.dtype)
    if not recompute:
        return dz.to(x2.dtype), db
    g2.copy_(dz)
    return db, _fwd_reference(x2, bias)   # the forward's own function: the same values


def _triton_supported(*ts):
    return _backend.dtype_predicate(_DTYPES, *ts)


def _check_op(x, bias) -> None:
    """x (..., n) and bias (n,), n > 0, float dtypes, one device (metadata only): the public functions, the op
    bodies and their fakes."""
    _checks.tensor(OP, "x", x, dtypes=_REF_DTYPES)
    _checks.tensor(OP, "bias", bias, dtypes=_REF_DTYPES)
    if x.dim() < 1 or bias.dim() != 1 or bias.shape[0] != x.shape[-1] or bias.shape[0] == 0:
        _checks.fail(OP, f"bias must be (n,) with n = x.shape[-1] > 0; got x {tuple(x.shape)}, "
                         f"bias {tuple(bias.shape)}")
    _checks.on_device(OP, "bias", bias, x.device, "x")


def _check_grad(g, x, bias) -> None:
    _check_op(x, bias)
    _checks.tensor(OP, "g", g, dtypes=_REF_DTYPES)
    if g.shape != x.shape:
        _checks.fail(OP, f"g (dL/dy) has shape {tuple(g.shape)} but x has {tuple(x.shape)}")
    _checks.on_device(OP, "g", g, x.device, "x")


def _check_recompute(g, x, bias) -> None:
    """g is overwritten with dx: x's shape, dtype and device, and contiguous, like x."""
    _check_op(x, bias)
    if not torch.is_tensor(g) or g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
        _checks.fail(OP, f"g must be a tensor of x's shape, dtype and device (it is overwritten with dx); got "
                         f"{getattr(g, 'shape', None)} {getattr(g, 'dtype', None)} vs x {tuple(x.shape)} {x.dtype}")
    if not g.is_contiguous() or not x.is_contiguous():
        _checks.fail(OP, "g and x must be contiguous (g is overwritten in place)")


@torch.library.custom_op("mdlm::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """gelu_tanh(x + bias) in x's dtype; x (..., n) of any strides (made contiguous here), bias (n,). Checked here
    (metadata only) before any pointer reaches a kernel."""
    _check_op(x, bias)
    x, bias = x.contiguous(), bias.contiguous()          # the kernels index dense rows
    name = _backend.resolve(OP, backend, x.device, {"triton": _triton_supported(x, bias), "reference": None})
    x2 = x.view(-1, x.shape[-1])
    return (_fwd_triton if name == "triton" else _fwd_reference)(x2, bias).view(x.shape)


@_bias_gelu_op.register_fake
def _(x, bias, backend=None):
    _check_op(x, bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("mdlm::bias_gelu_backward", mutates_args=())
def _bias_gelu_bwd_op(g: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, backend: Optional[str] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dbias in bias's dtype) from g = dL/dy (x's shape, any float dtype and strides)."""
    _check_grad(g, x, bias)
    g, x, bias = g.contiguous(), x.contiguous(), bias.contiguous()
    name = _backend.resolve(OP + "_backward", backend, x.device,
                            {"triton": _triton_supported(g, x, bias), "reference": None})
    n = x.shape[-1]
    dx, db = (_bwd_triton if name == "triton" else _bwd_reference)(g.view(-1, n), x.view(-1, n), bias)
    return dx.view(x.shape), db


@_bias_gelu_bwd_op.register_fake
def _(g, x, bias, backend=None):
    _check_grad(g, x, bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(bias)


@torch.library.custom_op("mdlm::bias_gelu_backward_recompute", mutates_args=("g",))
def _bias_gelu_bwd_recompute_op(g: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, backend: Optional[str] = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrites g (contiguous, x's dtype and shape) with dx and returns (dbias, y = gelu_tanh(x + bias)), y
    bit-equal to the forward op's output on the same backend. Checked here (g and x must be contiguous)."""
    _check_recompute(g, x, bias)
    bias = bias.contiguous()
    name = _backend.resolve(OP + "_backward", backend, x.device,
                            {"triton": _triton_supported(g, x, bias), "reference": None})
    n = x.shape[-1]
    db, y = (_bwd_triton if name == "triton" else _bwd_reference)(g.view(-1, n), x.view(-1, n), bias, True)
    return db, y.view(x.shape)


@_bias_gelu_bwd_recompute_op.register_fake
def _(g, x, bias, backend=None):
    _check_recompute(g, x, bias)
    return torch.empty_like(bias), torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, bias, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.backend = backend


def _backward(ctx, g):
    x, bias = ctx.saved_tensors
    dx, db = torch.ops.mdlm.bias_gelu_backward(g, x, bias, ctx.backend)
    return dx, db, None


_bias_gelu_op.register_autograd(_backward, setup_context=_setup)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """gelu_tanh(x + bias): x (..., n), bias (n,) -> (..., n) in x's dtype (fp32 math).

    Equal to ``F.gelu(x.float() + bias.float(), approximate="tanh").to(x.dtype)``. Differentiable w.r.t. x and
    bias (dbias reduced in fp32, returned in bias's dtype). Non-contiguous x is copied.
    """
    _check_op(x, bias)
    _checks.backend_arg(OP, backend)
    return torch.ops.mdlm.bias_gelu(x.contiguous(), bias.contiguous(), backend)


def bias_gelu_backward_recompute(g: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, *,
                                 backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of ``bias_gelu`` that also recomputes its output, in one pass over x and g.

    g (..., n) dL/dy, contiguous, x's dtype, overwritten with dL/dx; x (..., n) and bias (n,) the forward's
    inputs. Returns (dbias (n,) in bias's dtype, reduced in fp32; y (..., n) = gelu_tanh(x + bias) in x's
    dtype, bit-equal to ``bias_gelu(x, bias)`` on the same backend). Not differentiable.
    """
    _check_recompute(g, x, bias)
    _checks.backend_arg(OP, backend)
    return torch.ops.mdlm.bias_gelu_backward_recompute(g, x, bias.contiguous(), backend)
