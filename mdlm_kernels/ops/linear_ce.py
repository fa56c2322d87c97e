"""Fused SUBS linear-cross-entropy: loss and gradients of the LM head + SUBS NELBO on masked rows,
without ever holding an (N, V) tensor.

    loss = sum_i w_i * (logsumexp_{v != MASK} z_iv - z_i,x0_i),   z = h W^T + b

h (N, d) are the final hidden states of the masked positions, W (V, d) / b (V,) the output Linear, x0
their clean tokens, w_i the per-row NELBO weight dsigma/expm1(sigma) (1/t for loglinear). The MASK
column is excluded exactly (it gets neither probability nor gradient). With ``mask_index=None`` it is
plain cross-entropy over all V columns; the AR baseline calls it with the MASK id excluded, as the
published AR model does (its MASK logit is set to -1e6).

Gradient (per row i, with p_i = softmax over v != MASK of z_i):
  (1) dL/dz_iv = w_i (p_iv - [v = x0_i])   for v != MASK;   dL/dz_i,MASK = 0
  (2) dL/dh_i  = sum_v dL/dz_iv W_v           -> grad_h = G W        (G = dL/dz, a row chunk)
  (3) dL/dW_v  = sum_i dL/dz_iv h_i           -> grad_W += G^T h     (fp32 accumulator)
  (4) dL/db_v  = sum_i dL/dz_iv               -> grad_b += G^T 1     (fp32)
The loss is a sum, so its gradients are computed during the forward pass, chunk by chunk, and the
backward only scales them by the incoming scalar gradient.

Memory traffic per chunk of C rows: the GEMM writes z (C, V) once in the compute dtype; the row kernel
reads it twice (online log-sum-exp, then softmax) and overwrites it with G in place; two GEMMs read G.
Extra memory: one (C, V) logits chunk (C sized to ~256 MiB; rows padded to 64 elements), the fp32 grad_W
(V, d) and grad_b (V,), one fp32 (V, d) GEMM result per chunk while it is added into grad_W, and the
weight cast to the compute dtype (under autocast, as F.linear does).

Backends: "triton" (the row kernel in Triton; GEMMs by cuBLAS) and "reference" (the same chunked
algorithm in PyTorch, for CPUs). The plain-PyTorch spec is ``mdlm.diffusion.subs_nelbo_masked_rows``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import backend as _backend
from .. import launch as _launch
from .._triton import HAS_TRITON, tl, triton

OP = "subs_linear_cross_entropy"
CHUNK_BYTES = 256 * 2 ** 20  # target size of one (C, V) logits chunk
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per row of the chunk
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _subs_ce_rows_kernel(
        z_ptr,          # (C, V) logits chunk, compute dtype, row stride `z_stride`; overwritten with dL/dz
        z_stride,
        tgt_ptr,        # (C,) int64 target ids
        w_ptr,          # (C,) fp32 row weights
        loss_ptr,       # (C,) fp32 out: per-row weighted loss
        V,
        mask_index,     # column excluded from the softmax (-1: none)
        BLOCK_V: tl.constexpr,
        WRITE_GRAD: tl.constexpr,  # False in no-grad mode: pass 2 is skipped
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * z_stride
        tgt = tl.load(tgt_ptr + row)
        w = tl.load(w_ptr + row)
        # pass 1: online log-sum-exp over v != MASK, in fp32
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            keep = (offs < V) & (offs != mask_index)
            x = tl.load(z_row + offs, mask=keep, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        ok = (tgt >= 0) & (tgt < V) & (tgt != mask_index)  # an invalid target gives NaN, never a stray read
        z_t = tl.load(z_row + tgt, mask=ok, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(ok, w * (lse - z_t), float("nan")))
        # pass 2: dL/dz = w (softmax - onehot), 0 on the MASK column; written in place
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                inb = offs < V
                x = tl.load(z_row + offs, mask=inb, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(offs == tgt, 1.0, 0.0)
                g = tl.where(offs == mask_index, 0.0, g) * w
                g = tl.where(ok, g, float("nan"))
                tl.store(z_row + offs, g.to(z_ptr.dtype.element_ty), mask=inb)


def _rows_triton(z: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor, mask_index: int,
                 write_grad: bool = True) -> torch.Tensor:
    """Per-row loss (C,) fp32; overwrites z (C, V) (row stride may exceed V) with dL/dz if write_grad."""
    C, V = z.shape
    loss = torch.empty(C, dtype=torch.float32, device=z.device)
    if C == 0:
        return loss
    gpu = _launch.gpu_of(z.device)
    # The interpreter's cost is per block iteration, the GPU's per register: wider blocks under TRITON_INTERPRET.
    block = min(4096 if gpu is not None else 16384, triton.next_power_of_2(V))
    _launch.launch(_launch.Plan(
        "subs_linear_cross_entropy.rows", _subs_ce_rows_kernel, (C,),
        (z, z.stride(0), tgt, w, loss, V, mask_index), dict(BLOCK_V=block, WRITE_GRAD=write_grad),
        num_warps=8, vector_io=("ld", "st")), z.device)
    return loss


def _rows_reference(z: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor, mask_index: int,
                    write_grad: bool = True) -> torch.Tensor:
    """The row kernel in PyTorch (fp32 math on one chunk): same contract as ``_rows_triton``."""
    C, V = z.shape
    zf = z.float()
    if mask_index >= 0:
        zf[:, mask_index] = float("-inf")
    lse = torch.logsumexp(zf, dim=-1)
    ok = (tgt >= 0) & (tgt < V) & (tgt != mask_index)
    safe = torch.where(ok, tgt, 0)
    z_t = zf.gather(1, safe[:, None])[:, 0]
    loss = torch.where(ok, w * (lse - z_t), float("nan"))
    if not write_grad:
        return loss
    g = torch.exp(zf - lse[:, None])  # exp(-inf) = 0 on the MASK column
    g[torch.arange(C, device=z.device), safe] -= ok.to(g.dtype)
    g = g * torch.where(ok, w, float("nan"))[:, None]
    z.copy_(g)
    return loss


_ROWS = {"triton": _rows_triton, "reference": _rows_reference}
_SUPPORTED = {"triton": None, "reference": None}


# ---------------------------------------------------------------------------------------------
# Host side: chunked GEMMs around the row kernel
# ---------------------------------------------------------------------------------------------
_MM_OUT_DTYPE_OK = True  # torch.mm(..., out_dtype=float32) for bf16/fp16 CUDA inputs (newer torch)


def _mm_into_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation and no low-precision rounding of the partial sum."""
    global _MM_OUT_DTYPE_OK
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _MM_OUT_DTYPE_OK:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))  # bf16/fp16 GEMM, fp32 output (cuBLAS)
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as e:
            _MM_OUT_DTYPE_OK = False
            import warnings
            warnings.warn(f"{OP}: torch.mm(out_dtype=float32) unavailable ({e}); accumulating grad_W with an "
                          "fp32 GEMM on upcast operands (correct, slower)")
    acc.addmm_(a.float(), b.float())


def chunk_rows_for(V: int, dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // (V * torch.empty((), dtype=dtype).element_size()))


def _forward_and_grads(h, W, b, tgt, w, mask_index: int, rows_impl: str, grad_h: bool, grad_w: bool,
                       chunk_rows: int):
    """Per-row losses (N,) fp32; grad_h (N, d) in h's dtype if ``grad_h``; grad_W (V, d) and grad_b (V,) fp32
    if ``grad_w`` (grad_b empty when b is None). h, W, b are in the compute dtype."""
    N, d = h.shape
    V = W.shape[0]
    rows = _ROWS[rows_impl]
    dev = h.device
    losses = torch.empty(N, dtype=torch.float32, device=dev)
    gh = torch.empty_like(h) if grad_h else h.new_empty(0)
    gW = torch.zeros(V, d, dtype=torch.float32, device=dev) if grad_w else h.new_empty(0, dtype=torch.float32)
    gb = (torch.zeros(V, dtype=torch.float32, device=dev) if (grad_w and b is not None)
          else h.new_empty(0, dtype=torch.float32))
    if N == 0:
        return losses, gh, gW, gb
    # One logits buffer for all chunks, rows padded to a multiple of 64 elements: V = 50258 rows would be
    # only 4-byte aligned, which keeps cuBLAS off its fastest kernels and Triton off wide loads.
    v_pad = (V + 63) // 64 * 64
    buf = torch.empty(min(N, chunk_rows), v_pad, dtype=h.dtype, device=dev)
    Wt = W.t()
    for s in range(0, N, chunk_rows):
        e = min(N, s + chunk_rows)
        hc = h[s:e]
        z = buf[: e - s, :V]                                           # (C, V), row stride v_pad
        if b is not None:
            torch.addmm(b, hc, Wt, out=z)
        else:
            torch.mm(hc, Wt, out=z)
        losses[s:e] = rows(z, tgt[s:e], w[s:e], mask_index, grad_h or grad_w)  # z now holds dL/dz
        if grad_h:
            torch.mm(z, W, out=gh[s:e])                                # (2)
        if grad_w:
            _mm_into_fp32(gW, z.t(), hc)                               # (3)
            if b is not None:
                gb += z.sum(0, dtype=torch.float32)                    # (4)
    return losses, gh, gW, gb


# ---------------------------------------------------------------------------------------------
# torch.library registration + autograd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mdlm::subs_linear_cross_entropy", mutates_args=())
def _linear_ce_op(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], tgt: torch.Tensor,
                  w: torch.Tensor, mask_index: int, grad_h: bool, grad_w: bool, chunk_rows: int,
                  backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor]:
    name = _backend.resolve(OP, backend, h.device, _SUPPORTED)
    # the GEMMs run in h's dtype (the compute dtype); W/b keep their own dtype as parameters, so an fp32
    # master weight receives its fp32-accumulated gradient without a round trip through bf16
    Wc = W if W.dtype == h.dtype else W.to(h.dtype)
    bc = b if (b is None or b.dtype == h.dtype) else b.to(h.dtype)
    losses, gh, gW, gb = _forward_and_grads(h, Wc, bc, tgt, w, mask_index, name, grad_h, grad_w, chunk_rows)
    return losses.sum(), losses, gh, gW, gb


@_linear_ce_op.register_fake
def _(h, W, b, tgt, w, mask_index, grad_h, grad_w, chunk_rows, backend=None):
    N, d = h.shape
    V = W.shape[0]
    f32 = torch.float32
    gh = h.new_empty((N, d)) if grad_h else h.new_empty(0)
    gW = h.new_empty((V, d), dtype=f32) if grad_w else h.new_empty(0, dtype=f32)
    gb = h.new_empty((V,), dtype=f32) if (grad_w and b is not None) else h.new_empty(0, dtype=f32)
    return h.new_empty((), dtype=f32), h.new_empty((N,), dtype=f32), gh, gW, gb


def _setup_context(ctx, inputs, output):
    h, W, b, *_ = inputs
    _, _, gh, gW, gb = output
    ctx.save_for_backward(gh, gW, gb)
    ctx.grad_h, ctx.grad_w = inputs[6], inputs[7]
    ctx.has_bias = b is not None
    ctx.W_dtype = W.dtype
    ctx.b_dtype = b.dtype if b is not None else None


def _backward(ctx, g_loss, g_rows, g_gh, g_gW, g_gb):
    if torch.is_grad_enabled():
        raise NotImplementedError("subs_linear_cross_entropy: double backward (create_graph=True) is not "
                                  "supported; its gradients are computed in the forward pass")
    gh, gW, gb = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if (need_h and not ctx.grad_h) or ((need_w or need_b) and not ctx.grad_w):
        raise RuntimeError("subs_linear_cross_entropy: a gradient was not computed in forward (the input did "
                           "not require grad, or grad mode was off)")
    g = g_loss.float()  # the upstream scale (e.g. 1 / token count) stays in fp32
    dh = (gh.float() * g).to(gh.dtype) if need_h else None
    dW = (gW * g).to(ctx.W_dtype) if need_w else None
    db = (gb * g).to(ctx.b_dtype) if (ctx.has_bias and need_b) else None
    return dh, dW, db, None, None, None, None, None, None, None


_linear_ce_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
class LinearCEOutput(NamedTuple):
    loss: torch.Tensor        # () fp32: sum_i w_i * CE_i, differentiable w.r.t. hidden, weight, bias
    row_losses: torch.Tensor  # (N,) fp32: w_i * CE_i, for logging (no gradient flows through it)


def _check(hidden, weight, bias, targets, row_weights, mask_index):
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not torch.is_tensor(t):
            raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{OP}: hidden must be (N, d) and weight (V, d), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    N, d = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"{OP}: hidden width {d} != weight width {weight.shape[1]}")
    if V < 2:
        raise ValueError(f"{OP}: need a vocabulary of at least 2, got V={V}")
    if hidden.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise TypeError(f"{OP}: hidden and weight must be one of {_DTYPES}, got {hidden.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != (V,) or bias.dtype not in _DTYPES):
        raise ValueError(f"{OP}: bias must be ({V},) of one of {_DTYPES}, got {tuple(bias.shape)} {bias.dtype}")
    if targets.shape != (N,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{OP}: targets must be ({N},) int64/int32, got {tuple(targets.shape)} {targets.dtype}")
    if row_weights is not None and (row_weights.shape != (N,) or not row_weights.is_floating_point()):
        raise ValueError(f"{OP}: row_weights must be ({N},) floating point, got {tuple(row_weights.shape)} "
                         f"{row_weights.dtype}")
    devices = {t.device for t in (hidden, weight, bias, targets, row_weights) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{OP}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if mask_index is not None and not 0 <= mask_index < V:
        raise ValueError(f"{OP}: mask_index {mask_index} outside [0, {V})")


def subs_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              targets: torch.Tensor, row_weights: Optional[torch.Tensor] = None,
                              mask_index: Optional[int] = None, *, validate: bool = True,
                              chunk_rows: Optional[int] = None, backend: Optional[str] = None) -> LinearCEOutput:
    """sum_i w_i * (logsumexp_{v != mask_index}(h_i W^T + b) - (h_i W^T + b)[targets_i]) without (N, V) logits.

    hidden (N, d), weight (V, d), bias (V,) or None (fp32/bf16/fp16; the GEMMs run in the autocast dtype
    under autocast, else in hidden's dtype; weight/bias gradients are accumulated in fp32 and returned in
    their own dtype); targets (N,) int; row_weights (N,) (default 1); mask_index: the column excluded
    exactly (None: plain cross-entropy). Log-sum-exp in fp32. Double backward is not supported.

    ``validate`` checks target ids and weights (one host synchronisation); with ``validate=False`` an
    invalid target or a NaN weight yields a NaN loss (never an out-of-bounds read or a silent number).
    """
    _check(hidden, weight, bias, targets, row_weights, mask_index)
    N = hidden.shape[0]
    V = weight.shape[0]
    device = hidden.device
    # Compute dtype: the autocast dtype under autocast (like F.linear), else hidden's. Hidden is cast here
    # (autograd returns its gradient in its own dtype); weight and bias are cast inside the op so their
    # gradients are accumulated in fp32 and returned in their own dtype.
    if torch.is_autocast_enabled(device.type):
        hidden = hidden.to(torch.get_autocast_dtype(device.type))
    mi = -1 if mask_index is None else int(mask_index)
    w = (torch.ones(N, dtype=torch.float32, device=device) if row_weights is None
         else row_weights.detach().to(torch.float32))
    tgt = targets.to(torch.int64)
    if validate and N > 0:
        bad_t = ((tgt < 0) | (tgt >= V) | (tgt == mi)).any()
        bad_w = ~torch.isfinite(w).all()
        bt, bw = torch.stack([bad_t, bad_w]).tolist()  # one host sync
        if bt:
            lo, hi = int(tgt.min()), int(tgt.max())
            raise ValueError(f"{OP}: targets must be in [0, {V}) and != mask_index {mask_index} "
                             f"(got min {lo}, max {hi}{', and the mask id' if (tgt == mi).any() else ''})")
        if bw:
            raise ValueError(f"{OP}: row_weights contain NaN or inf")
    grad_on = torch.is_grad_enabled()
    grad_h = grad_on and hidden.requires_grad
    grad_w = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    chunk = int(chunk_rows) if chunk_rows else chunk_rows_for(V, hidden.dtype)
    if chunk < 1:
        raise ValueError(f"{OP}: chunk_rows must be >= 1, got {chunk_rows}")
    if backend is not None:
        _backend.normalize(backend)
    loss, rows, *_ = torch.ops.mdlm.subs_linear_cross_entropy(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), tgt.contiguous(),
        w.contiguous(), mi, grad_h, grad_w, chunk, backend)
    return LinearCEOutput(loss, rows.detach())
