"""Rotary embedding of q and k straight from the packed qkv projection, written in the layout
``F.scaled_dot_product_attention`` wants.

    q, k, v = rotary_qkv(qkv (B, L, 3, H, D), cos, sin)      each (B, H, L, D), last dim contiguous

q, k and v are written into three fresh (B, L, H, D) buffers (each token's H*D values stored contiguously) and
returned as their ``.transpose(1, 2)`` views, strides (L*H*D, D, H*D, 1). SDPA takes these (every backend needs
only the last dim contiguous: flash/cuDNN/memory-efficient run on the (B, L, H, D) layout natively, CPU and math
accept any strides) and returns its output in the query's layout for CPU, flash, cuDNN and memory-efficient, so
``attention(q, k, v).transpose(1, 2).reshape(B, L, H*D)`` is a view, not a copy.

Memory: v is copied out of qkv in the same pass (one more read and write of a third of qkv) so that nothing
returned aliases qkv: SDPA saves q, k and v for its backward, and a v that viewed qkv's slot 2 would keep all of
qkv alive next to the fresh q and k (5 (B, L, H*D) units saved where 3 suffice). qkv dies after this op.

q and k are rotated with the published non-interleaved halves (``mdlm.nn.apply_rotary_pos_emb``): with
x = (x1, x2) the two halves of the head dim and c/s the tables first rounded to qkv's dtype,
    out1 = x1 * c - x2 * s,   out2 = x2 * c + x1 * s       (fp32 math, stored in qkv's dtype)
which is ``x * cos + rotate_half(x) * sin`` with ``cos = cat(c, c)``; v is copied unchanged. The backward is the
inverse rotation (the transpose of the rotation matrix):
    dx1 = g1 * c + g2 * s,    dx2 = g2 * c - g1 * s
written back into dqkv (B, L, 3, H, D) slots 0/1, with dv copied into slot 2, in one pass (the gradients are read
through their strides, whatever layout SDPA's backward gives them, as long as the last dim is contiguous).

Kernel tiles: a program handles BLOCK_R token rows x BLOCK_H heads x one head-half (BLOCK_HALF columns) per load,
1024 elements over 4 warps on a GPU, i.e. 8 contiguous elements per thread: 16-byte loads and stores in bf16/fp16
(two per thread in fp32). All six half-tiles are loaded before the first store (the compiler may not move a load
across a store to a pointer it cannot prove distinct).

Tables: ``cos``/``sin`` are the (L, D/2) fp32 base tables cos/sin(l * inv_freq_j). From an ``mdlm.nn.Rotary``
module: ``rotary_tables(rotary.inv_freq, L)`` (the same ``outer(arange(L), inv_freq)`` the module computes),
or pass the module's cached ``(1, L, 3, 1, D)`` tensors directly (``rotary_qkv`` takes their q slot's first
half, ``cos[0, :, 0, 0, :D/2]``, which holds the same numbers). Tables with more than L rows are cut to L.

Backends: "triton" (fp32/bf16/fp16) and "reference" (plain PyTorch, also float64). Non-contiguous qkv is
copied to a contiguous tensor first.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend as _backend
from .. import launch as _launch
from .._triton import HAS_TRITON, tl, triton
from . import _checks
if HAS_TRITON:
    from ._adaln_common import _cast

OP = "rotary_qkv"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REF_DTYPES = _DTYPES + (torch.float64,)

if HAS_TRITON:

    @triton.jit
    def _rotary_fwd_kernel(
        qkv_ptr,     # (B, L, 3, H, D) packed projection, contiguous
        cos_ptr,     # (L, HALF) fp32 base table, contiguous
        sin_ptr,     # (L, HALF) fp32 base table, contiguous
        q_ptr,       # (B, L, H, D) out, contiguous, qkv's dtype
        k_ptr,       # (B, L, H, D) out
        v_ptr,       # (B, L, H, D) out
        n_rows, L, H, HALF,          # n_rows = B * L token rows
        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)   # b * L + l
        l = rows % L
        D = 2 * HALF
        hs = tl.arange(0, BLOCK_H).to(tl.int64)
        js = tl.arange(0, BLOCK_HALF)
        rm = rows < n_rows
        jm = js < HALF
        m = rm[:, None, None] & (hs < H)[None, :, None] & jm[None, None, :]         # (R, H, HALF)
        dt = qkv_ptr.dtype.element_ty
        toffs = l[:, None] * HALF + js[None, :]                                      # (R, HALF)
        tm = rm[:, None] & jm[None, :]
        c = _cast(tl.load(cos_ptr + toffs, mask=tm, other=0.0), dt).to(tl.float32)[:, None, :]
        s = _cast(tl.load(sin_ptr + toffs, mask=tm, other=0.0), dt).to(tl.float32)[:, None, :]
        src = qkv_ptr + rows[:, None, None] * 3 * H * D + hs[None, :, None] * D + js[None, None, :]  # q, 1st half
        dst = rows[:, None, None] * H * D + hs[None, :, None] * D + js[None, None, :]   # this token's H*D values
        # every load first: slots 0 (q), 1 (k), 2 (v), each as its two halves
        q1 = tl.load(src, mask=m, other=0.0)
        q2 = tl.load(src + HALF, mask=m, other=0.0)
        k1 = tl.load(src + H * D, mask=m, other=0.0)
        k2 = tl.load(src + H * D + HALF, mask=m, other=0.0)
        v1 = tl.load(src + 2 * H * D, mask=m, other=0.0)
        v2 = tl.load(src + 2 * H * D + HALF, mask=m, other=0.0)
        x1, x2 = q1.to(tl.float32), q2.to(tl.float32)
        tl.store(q_ptr + dst, _cast(x1 * c - x2 * s, dt), mask=m)
        tl.store(q_ptr + dst + HALF, _cast(x2 * c + x1 * s, dt), mask=m)
        x1, x2 = k1.to(tl.float32), k2.to(tl.float32)
        tl.store(k_ptr + dst, _cast(x1 * c - x2 * s, dt), mask=m)
        tl.store(k_ptr + dst + HALF, _cast(x2 * c + x1 * s, dt), mask=m)
        tl.store(v_ptr + dst, v1, mask=m)                 # v: copied unchanged (same dtype: no rounding)
        tl.store(v_ptr + dst + HALF, v2, mask=m)

    @triton.jit
    def _rotary_bwd_kernel(
        dq_ptr,      # (B, H, L, D) dL/dq, any strides with the last dim contiguous
        dk_ptr,      # (B, H, L, D) dL/dk
        dv_ptr,      # (B, H, L, D) dL/dv
        cos_ptr,     # (L, HALF) fp32
        sin_ptr,     # (L, HALF) fp32
        dqkv_ptr,    # (B, L, 3, H, D) out, qkv's dtype
        n_rows, L, H, HALF,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl,   # element strides of dq, dk, dv over (B, H, L)
        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        b = rows // L
        l = rows - b * L
        D = 2 * HALF
        hs = tl.arange(0, BLOCK_H).to(tl.int64)
        js = tl.arange(0, BLOCK_HALF)
        rm = rows < n_rows
        jm = js < HALF
        m = rm[:, None, None] & (hs < H)[None, :, None] & jm[None, None, :]
        dt = dqkv_ptr.dtype.element_ty
        toffs = l[:, None] * HALF + js[None, :]
        tm = rm[:, None] & jm[None, :]
        c = _cast(tl.load(cos_ptr + toffs, mask=tm, other=0.0), dt).to(tl.float32)[:, None, :]
        s = _cast(tl.load(sin_ptr + toffs, mask=tm, other=0.0), dt).to(tl.float32)[:, None, :]
        dst = dqkv_ptr + rows[:, None, None] * 3 * H * D + hs[None, :, None] * D + js[None, None, :]
        b3, l3, h3, j3 = b[:, None, None], l[:, None, None], hs[None, :, None], js[None, None, :]
        srcq = dq_ptr + b3 * sqb + l3 * sql + h3 * sqh + j3
        srck = dk_ptr + b3 * skb + l3 * skl + h3 * skh + j3
        srcv = dv_ptr + b3 * svb + l3 * svl + h3 * svh + j3
        q1 = tl.load(srcq, mask=m, other=0.0)
        q2 = tl.load(srcq + HALF, mask=m, other=0.0)
        k1 = tl.load(srck, mask=m, other=0.0)
        k2 = tl.load(srck + HALF, mask=m, other=0.0)
        v1 = tl.load(srcv, mask=m, other=0.0)
        v2 = tl.load(srcv + HALF, mask=m, other=0.0)
        g1, g2 = q1.to(tl.float32), q2.to(tl.float32)
        tl.store(dst, _cast(g1 * c + g2 * s, dt), mask=m)
        tl.store(dst + HALF, _cast(g2 * c - g1 * s, dt), mask=m)
        g1, g2 = k1.to(tl.float32), k2.to(tl.float32)
        tl.store(dst + H * D, _cast(g1 * c + g2 * s, dt), mask=m)
        tl.store(dst + H * D + HALF, _cast(g2 * c - g1 * s, dt), mask=m)
        tl.store(dst + 2 * H * D, _cast(v1.to(tl.float32), dt), mask=m)
        tl.store(dst + 2 * H * D + HALF, _cast(v2.to(tl.float32), dt), mask=m)


# Tests set this to a launch.GPU to run the interpreter (CPU tensors) with the tiles a GPU launch would use.
_CPU_PLANS_AS: Optional[_launch.GPU] = None
_GPU_TILE = 1024       # elements per half-tile on a GPU: 4 warps x 32 threads x 8 contiguous elements (16 B bf16)
_INTERP_TILE = 16384   # the interpreter pays per op, not per register: bigger tiles


def _plan_gpu(device):
    gpu = _launch.gpu_of(device)
    return _CPU_PLANS_AS if gpu is None and torch.device(device).type == "cpu" else gpu


def _cfg(H, half, gpu):
    """(BLOCK_R token rows, BLOCK_H, BLOCK_HALF, num_warps) of one program."""
    bh, bj = triton.next_power_of_2(H), triton.next_power_of_2(half)
    tile = _GPU_TILE if gpu is not None else _INTERP_TILE
    return max(1, tile // (bh * bj)), bh, bj, 4


def _qkv_buffers(qkv):
    """Three fresh (B, L, H, D) buffers (q, k, v), returned as their (B, H, L, D) transposed views."""
    B, L, _, H, D = qkv.shape
    return tuple(torch.empty((B, L, H, D), dtype=qkv.dtype, device=qkv.device).transpose(1, 2) for _ in range(3))


def _fwd_triton(qkv, cos, sin):
    B, L, _, H, D = qkv.shape
    q, k, v = _qkv_buffers(qkv)
    if B * L * H == 0:
        return q, k, v
    br, bh, bj, nw = _cfg(H, D // 2, _plan_gpu(qkv.device))
    _launch.launch(_launch.Plan(
        "rotary_qkv.fwd", _rotary_fwd_kernel, (triton.cdiv(B * L, br),), (qkv, cos, sin, q, k, v, B * L, L, H, D // 2),
        dict(BLOCK_R=br, BLOCK_H=bh, BLOCK_HALF=bj), num_warps=nw, vector_io=("ld", "st")), qkv.device)
    return q, k, v


def _last_dim_contiguous(g):
    return g if g.stride(-1) == 1 or g.shape[-1] <= 1 else g.contiguous()


def _bwd_triton(dq, dk, dv, cos, sin, dtype):
    B, H, L, D = dq.shape
    dqkv = torch.empty((B, L, 3, H, D), dtype=dtype, device=dq.device)
    if B * L * H == 0:
        return dqkv
    dq, dk, dv = (_last_dim_contiguous(g) for g in (dq, dk, dv))
    strides = [st for g in (dq, dk, dv) for st in g.stride()[:3]]
    br, bh, bj, nw = _cfg(H, D // 2, _plan_gpu(dq.device))
    _launch.launch(_launch.Plan(
        "rotary_qkv.bwd", _rotary_bwd_kernel, (triton.cdiv(B * L, br),),
        (dq, dk, dv, cos, sin, dqkv, B * L, L, H, D // 2, *strides),
        dict(BLOCK_R=br, BLOCK_H=bh, BLOCK_HALF=bj), num_warps=nw, vector_io=("ld", "st")), dq.device)
    return dqkv


def _full_tables(cos, sin, dtype, cdt):
    """(1, L, 1, D) tables as mdlm.nn.Rotary builds them (cat of the halves), rounded to dtype, in cdt."""
    c = torch.cat((cos, cos), dim=-1).to(dtype).to(cdt)[None, :, None, :]
    s = torch.cat((sin, sin), dim=-1).to(dtype).to(cdt)[None, :, None, :]
    return c, s


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _fwd_reference(qkv, cos, sin):
    """mdlm.nn.apply_rotary_pos_emb on q and k (v copied), in the layout of the Triton path: fresh (B, L, H, D)
    buffers returned as (B, H, L, D) views."""
    cdt = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    c, s = _full_tables(cos, sin, qkv.dtype, cdt)
    q, k, v = qkv.unbind(2)                                    # (B, L, H, D)
    out = _qkv_buffers(qkv)
    for o, x in zip(out, (q, k)):
        o.transpose(1, 2).copy_((x.to(cdt) * c + _rotate_half(x.to(cdt)) * s).to(qkv.dtype))
    out[2].transpose(1, 2).copy_(v)
    return out


def _bwd_reference(dq, dk, dv, cos, sin, dtype):
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    c, s = _full_tables(cos, sin, dtype, cdt)
    # transpose of x -> x*c + rotate_half(x)*s is g -> g*c - rotate_half(g)*s
    gs = [g.transpose(1, 2).to(cdt) for g in (dq, dk)]        # (B, L, H, D)
    dqk = [(g * c - _rotate_half(g) * s).to(dtype) for g in gs]
    return torch.stack((*dqk, dv.transpose(1, 2).to(dtype)), dim=2).contiguous()


def _triton_supported(*ts):
    return _backend.dtype_predicate(_DTYPES, *ts)


def _check_qkv(qkv) -> None:
    _checks.tensor(OP, "qkv", qkv, dtypes=_REF_DTYPES)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        _checks.fail(OP, f"qkv must be (B, L, 3, H, D), got shape {tuple(qkv.shape)}")
    D = qkv.shape[4]
    if D % 2 or D == 0:
        _checks.fail(OP, f"qkv: head dim D = {D} must be even and > 0 for rotary embeddings")


def _check_op_tables(cos, sin, L, half, device):
    """The op's tables: (L', D/2) floating point with L' >= L, on ``device`` (metadata only)."""
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.tensor(OP, name, t, dtypes=_checks.REF_FLOATS)
        if t.dim() != 2 or t.shape[1] != half:
            _checks.fail(OP, f"{name} must be (L, D/2) = (L, {half}), got {tuple(t.shape)}")
        if t.shape[0] < L:
            _checks.fail(OP, f"{name} has {t.shape[0]} positions, fewer than the sequence length {L}")
        _checks.on_device(OP, name, t, device, "qkv")


def _op_tables(cos, sin, L):
    """The first L rows of each table as dense fp32 (the kernels index (L, D/2) fp32 tables)."""
    return cos[:L].float().contiguous(), sin[:L].float().contiguous()


def _check_bwd(dq, dk, dv, cos, sin, dtype) -> None:
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        _checks.tensor(OP, name, g, dtypes=_REF_DTYPES, ndim=4)
        if g.shape != dq.shape:
            _checks.fail(OP, f"{name} has shape {tuple(g.shape)} but dq has {tuple(dq.shape)}")
        _checks.on_device(OP, name, g, dq.device, "dq")
    B, H, L, D = dq.shape
    if D % 2 or D == 0:
        _checks.fail(OP, f"dq: head dim D = {D} must be even and > 0")
    _checks.dtype_arg(OP, "dtype", dtype, _REF_DTYPES)
    _check_op_tables(cos, sin, L, D // 2, dq.device)


@torch.library.custom_op("mdlm::rotary_qkv", mutates_args=())
def _rotary_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: Optional[str] = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotated q, k and copied v: (B, H, L, D) views of fresh (B, L, H, D) buffers. qkv (B, L, 3, H, D) of any
    strides (made contiguous here), cos / sin (L', D/2) floating point with L' >= L (their first L rows are
    used, as fp32). Checked here (metadata only) before any pointer reaches a kernel."""
    _check_qkv(qkv)
    L, half = qkv.shape[1], qkv.shape[4] // 2
    _check_op_tables(cos, sin, L, half, qkv.device)
    qkv = qkv.contiguous()                        # the kernel indexes qkv as a dense (B, L, 3, H, D) array
    cos, sin = _op_tables(cos, sin, L)
    name = _backend.resolve(OP, backend, qkv.device, {"triton": _triton_supported(qkv), "reference": None})
    return (_fwd_triton if name == "triton" else _fwd_reference)(qkv, cos, sin)


@_rotary_op.register_fake
def _(qkv, cos, sin, backend=None):
    _check_qkv(qkv)
    _check_op_tables(cos, sin, qkv.shape[1], qkv.shape[4] // 2, qkv.device)
    return _qkv_buffers(qkv)  # strides (L*H*D, D, H*D, 1), as the real outputs


@torch.library.custom_op("mdlm::rotary_qkv_backward", mutates_args=())
def _rotary_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   dtype: torch.dtype, backend: Optional[str] = None) -> torch.Tensor:
    """dqkv (B, L, 3, H, D) in ``dtype`` from dq, dk, dv (B, H, L, D) (any strides; checked here)."""
    _check_bwd(dq, dk, dv, cos, sin, dtype)
    cos, sin = _op_tables(cos, sin, dq.shape[2])
    name = _backend.resolve(OP + "_backward", backend, dq.device,
                            {"triton": _triton_supported(dq, dk, dv, dq.new_empty(0, dtype=dtype)),
                             "reference": None})
    return (_bwd_triton if name == "triton" else _bwd_reference)(dq, dk, dv, cos, sin, dtype)


@_rotary_bwd_op.register_fake
def _(dq, dk, dv, cos, sin, dtype, backend=None):
    _check_bwd(dq, dk, dv, cos, sin, dtype)
    B, H, L, D = dq.shape
    return dq.new_empty((B, L, 3, H, D), dtype=dtype)


def _setup(ctx, inputs, output):
    qkv, cos, sin, backend = inputs
    ctx.save_for_backward(cos, sin)      # only the tables: the op is linear in qkv
    ctx.dtype = qkv.dtype
    ctx.shape = qkv.shape
    ctx.backend = backend


def _backward(ctx, dq, dk, dv):
    """dqkv (B, L, 3, H, D) from (dq, dk, dv), each (B, H, L, D) or None (no gradient: zeros), in one pass."""
    cos, sin = ctx.saved_tensors
    B, L, _, H, D = ctx.shape
    g = [torch.zeros((B, H, L, D), dtype=ctx.dtype, device=cos.device) if x is None else x for x in (dq, dk, dv)]
    return torch.ops.mdlm.rotary_qkv_backward(*g, cos, sin, ctx.dtype, ctx.backend), None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup)


def rotary_tables(inv_freq: torch.Tensor, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq_len, D/2) fp32: cos/sin(outer(arange(seq_len), inv_freq)), the numbers
    ``mdlm.nn.Rotary(D)`` caches (``rotary.inv_freq`` is its persistent buffer). inv_freq: (D/2,) floating point;
    seq_len: an int >= 0."""
    _checks.tensor("rotary_tables", "inv_freq", inv_freq, dtypes=_checks.REF_FLOATS, ndim=1)
    seq_len = _checks.int_arg("rotary_tables", "seq_len", seq_len, 0)
    inv_freq = inv_freq if device is None else inv_freq.to(device)
    t = torch.arange(seq_len, device=inv_freq.device).type_as(inv_freq)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().float().contiguous(), freqs.sin().float().contiguous()


def _table(name, t, L, half, device):
    if not torch.is_tensor(t):
        raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() == 5:  # the (1, L', 3, 1, D) cache of mdlm.nn.Rotary
        if t.shape[0] != 1 or t.shape[2] != 3 or t.shape[3] != 1 or t.shape[4] != 2 * half:
            raise ValueError(f"{OP}: {name} of shape {tuple(t.shape)} is not a (1, L, 3, 1, {2 * half}) "
                             f"mdlm.nn.Rotary table")
        t = t[0, :, 0, 0, :half]
    if t.dim() != 2 or t.shape[1] != half:
        raise ValueError(f"{OP}: {name} must be (L, D/2) = (L, {half}) (or the (1, L, 3, 1, D) Rotary cache), "
                         f"got {tuple(t.shape)}")
    if t.shape[0] < L:
        raise ValueError(f"{OP}: {name} has {t.shape[0]} positions, fewer than the sequence length {L}")
    if not t.is_floating_point():
        raise TypeError(f"{OP}: {name} must be floating point, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{OP}: {name} is on {t.device} but qkv is on {device}")
    return t[:L].float().contiguous()


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: Optional[str] = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (each (B, H, L, D), last dim contiguous) from the packed projection qkv (B, L, 3, H, D).

    q and k rotated exactly as ``mdlm.nn.apply_rotary_pos_emb`` (non-interleaved halves, fp32 math, tables
    rounded to qkv's dtype), v equal to ``qkv[:, :, 2].transpose(1, 2)``; each is the ``.transpose(1, 2)`` view of
    a fresh (B, L, H, D) buffer: nothing returned shares qkv's memory, so qkv can be freed once this returns.
    cos/sin: (L, D/2) fp32 base tables (``rotary_tables``) or the ``(1, L, 3, 1, D)`` tensors returned by
    ``mdlm.nn.Rotary``. D must be even. Differentiable w.r.t. qkv (the tables get no gradient).
    """
    _check_qkv(qkv)
    B, L, _, H, D = qkv.shape
    cos = _table("cos", cos, L, D // 2, qkv.device)
    sin = _table("sin", sin, L, D // 2, qkv.device)
    _checks.backend_arg(OP, backend)
    return torch.ops.mdlm.rotary_qkv(qkv.contiguous(), cos, sin, backend)
