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

Memory traffic per chunk of C rows (compute dtype, 2 bytes in bf16): one GEMM writes z = h W^T (C, V) once, into
a buffer whose rows are padded to 64 elements (16-byte aligned rows); the row kernel reads z twice (online
log-sum-exp, then softmax), adding the bias in fp32 as it reads (so the GEMM needs no bias epilogue and no
broadcast copy of the bias into its output), and overwrites z with G = dL/dz in place; the grad_h and grad_W GEMMs
read G; grad_W accumulates in fp32 inside its GEMM (beta = 1, fp32 output) where torch supports it; grad_b comes
from the row kernel's column sums (one fp32 row of V per 16 rows) instead of another pass over G. Chunks are as
large as CHUNK_BYTES allows (1 GiB: ~10k rows at V = 50258) and of equal size, so at B = 64 x L = 1024 (~32k
masked rows) the loop runs 4 chunks of ~8k rows. Extra memory: the logits chunk, the fp32 grad_W (V, d) and
grad_b (V,), the row kernel's column sums ((C/16, V) fp32), and the weight cast to the compute dtype (under
autocast, as F.linear does).

Backends: "triton" (the row kernel in Triton; GEMMs by cuBLAS) and "reference" (the same chunked
algorithm in PyTorch, for CPUs). The plain-PyTorch spec is ``mdlm.diffusion.subs_nelbo_masked_rows``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import backend as _backend
from .. import launch as _launch
from .._triton import HAS_TRITON, tl, triton
from . import _checks

OP = "subs_linear_cross_entropy"
CHUNK_BYTES = 2 ** 30  # the most bytes of one (C, V) logits chunk
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per block of ROWS rows of the chunk
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._adaln_common import _cast   # fp32 -> bf16 rounded to nearest even also under the interpreter

    @triton.jit
    def _ce_tile(z_row, b_ptr, offs, mask_index, HAS_BIAS: tl.constexpr, FULL: tl.constexpr, V):
        """Logits tile [ROWS, BLOCK_V] in fp32 (+ bias), -inf on the MASK column (and past V unless FULL).

        The rows of a ragged last row block are clamped to a valid row by the caller, so rows need no mask;
        FULL tiles load without any mask: 16-byte vectors. The MASK column is removed with a select, which keeps
        the load uniform over each vector."""
        if FULL:
            x = tl.load(z_row + offs[None, :]).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(b_ptr + offs).to(tl.float32)[None, :]
        else:
            inb = offs < V
            x = tl.load(z_row + offs[None, :], mask=inb[None, :], other=float("-inf")).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(b_ptr + offs, mask=inb, other=0.0).to(tl.float32)[None, :]
        return tl.where(offs[None, :] == mask_index, float("-inf"), x)

    @triton.jit
    def _lse_step(m, s, x):
        """One online log-sum-exp update of (running max m, running sum s) [ROWS] by a tile x [ROWS, BLOCK_V].

        Shifts by m_new, or by 0 while a row has seen only -inf (m_new = -inf): exp(m - m_new) would be
        exp(-inf + inf) = NaN there and poison s for good, although a later tile may hold finite logits (the
        spec gives a finite loss). With the 0 shift such a row keeps s = 0, and a row that is -inf everywhere ends
        with lse = -inf + log(0) = -inf, as torch.logsumexp."""
        m_new = tl.maximum(m, tl.max(x, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
        return m_new, s

    @triton.jit
    def _ce_grad_tile(x, offs, lse, tgt, w_row, rows_ok, mask_index):
        """dL/dz = w (softmax - onehot) on a logits tile; 0 on the MASK column (x = -inf there: exp gives 0) and
        on the clamped duplicate rows of a ragged block (so they add nothing to the column sums)."""
        g = tl.exp(x - lse[:, None]) - tl.where(offs[None, :] == tgt[:, None], 1.0, 0.0)
        g = tl.where(offs[None, :] == mask_index, 0.0, g) * w_row[:, None]
        return tl.where(rows_ok[:, None], g, 0.0)

    @triton.jit
    def _subs_ce_rows_kernel(
        z_ptr,          # (C, V) logits chunk (h W^T, without the bias), compute dtype, row stride z_stride;
                        # overwritten with dL/dz if WRITE_GRAD
        z_stride,
        b_ptr,          # (V,) bias, any float dtype (read only if HAS_BIAS)
        tgt_ptr,        # (C,) int64 target ids
        w_ptr,          # (C,) fp32 row weights
        loss_ptr,       # (C,) fp32 out: per-row weighted loss
        db_ptr,         # (n_programs, V) fp32 out: this program's column sums of dL/dz (written if WRITE_DB)
        C, V,
        mask_index,     # column excluded from the softmax (-1: none)
        ROWS: tl.constexpr, BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_GRAD: tl.constexpr,
        WRITE_DB: tl.constexpr,     # the column sums (grad_b); only with WRITE_GRAD
        NUM_STAGES: tl.constexpr,   # software pipelining depth of the loops over V (1: none)
    ):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        rows_ok = rows < C
        rows = tl.minimum(rows, C - 1).to(tl.int64)          # a ragged last block re-reads row C-1 (never writes it)
        z_row = z_ptr + rows[:, None] * z_stride              # [ROWS, 1] row starts
        tgt = tl.load(tgt_ptr + rows)
        w = tl.load(w_ptr + rows)
        v_full = (V // BLOCK_V) * BLOCK_V
        # pass 1: online log-sum-exp over v != MASK, in fp32 (full tiles unmasked, then the ragged tail)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS], tl.float32)
        for start in tl.range(0, v_full, BLOCK_V, num_stages=NUM_STAGES):
            x = _ce_tile(z_row, b_ptr, start + tl.arange(0, BLOCK_V), mask_index, HAS_BIAS, True, V)
            m, s = _lse_step(m, s, x)
        if v_full < V:
            x = _ce_tile(z_row, b_ptr, v_full + tl.arange(0, BLOCK_V), mask_index, HAS_BIAS, False, V)
            m, s = _lse_step(m, s, x)
        lse = m + tl.log(s)
        ok = (tgt >= 0) & (tgt < V) & (tgt != mask_index)  # an invalid target gives NaN, never a stray read
        z_t = tl.load(z_ptr + rows * z_stride + tgt, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z_t += tl.load(b_ptr + tgt, mask=ok, other=0.0).to(tl.float32)
        tl.store(loss_ptr + rows, tl.where(ok, w * (lse - z_t), float("nan")), mask=rows_ok)
        # pass 2: dL/dz = w (softmax - onehot), 0 on the MASK column, written in place; column sums -> dL/db
        if WRITE_GRAD:
            w_row = tl.where(ok, w, float("nan"))              # an invalid target poisons its row (NaN)
            db_row = db_ptr + pid.to(tl.int64) * V
            for start in tl.range(0, v_full, BLOCK_V, num_stages=NUM_STAGES):
                offs = start + tl.arange(0, BLOCK_V)
                x = _ce_tile(z_row, b_ptr, offs, mask_index, HAS_BIAS, True, V)
                g = _ce_grad_tile(x, offs, lse, tgt, w_row, rows_ok, mask_index)
                tl.store(z_row + offs[None, :], _cast(g, z_ptr.dtype.element_ty), mask=rows_ok[:, None])
                if WRITE_DB:
                    tl.store(db_row + offs, tl.sum(g, 0))
            if v_full < V:
                offs = v_full + tl.arange(0, BLOCK_V)
                x = _ce_tile(z_row, b_ptr, offs, mask_index, HAS_BIAS, False, V)
                g = tl.where((offs < V)[None, :], _ce_grad_tile(x, offs, lse, tgt, w_row, rows_ok, mask_index), 0.0)
                tl.store(z_row + offs[None, :], _cast(g, z_ptr.dtype.element_ty),
                         mask=rows_ok[:, None] & (offs < V)[None, :])
                if WRITE_DB:
                    tl.store(db_row + offs, tl.sum(g, 0), mask=offs < V)


def rows_plan_cfg(C: int, V: int, gpu) -> tuple:
    """(ROWS rows per program, BLOCK_V, num_warps, NUM_STAGES) of the row kernel.

    GPU: tiles of 16 rows x 128 columns over 4 warps (16 values per thread, loaded as two 16-byte vectors of 8
    bf16), the V loop software-pipelined 3 deep (cp.async: two tiles in flight while one is reduced), so a chunk
    of C rows is C/16 programs; at C = 8192 that is 512 programs: one wave on sm_90 (5 resident blocks x 132
    SMs, compile_check), 1.2 waves on sm_80 (4 x 108). Each program reads its rows twice and writes dL/dz once
    (3 x 16 x V x 2 bytes), reads the bias once per 16 rows, and, when grad_b is wanted, writes its V column sums
    of dL/dz in fp32 (V x 4 bytes, 1/12 of its logits traffic in bf16). The interpreter (gpu None) pays per tile: wider tiles, no pipelining."""
    if gpu is not None:
        return 16, 128, 4, 3
    return 16, min(4096, triton.next_power_of_2(V)), 4, 1


def _rows_triton(z: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor, mask_index: int, bias: Optional[torch.Tensor],
                 write_grad: bool = True, write_db: Optional[bool] = None, gpu_plan=None):
    """Per-row loss (C,) fp32 and, if write_db (default: write_grad), the column sums of dL/dz (V,) fp32 (else an
    empty tensor).

    z (C, V) holds h W^T without the bias (row stride may exceed V); it is overwritten with dL/dz if write_grad.
    ``gpu_plan`` (a launch.GPU) makes the launcher use that GPU's tiling (tests run the GPU tiling on CPU)."""
    C, V = z.shape
    loss = torch.empty(C, dtype=torch.float32, device=z.device)
    write_db = write_grad if write_db is None else (write_db and write_grad)
    if C == 0:
        return loss, torch.zeros(V if write_db else 0, dtype=torch.float32, device=z.device)
    rows, block, nw, stages = rows_plan_cfg(C, V, gpu_plan or _launch.gpu_of(z.device))
    n_prog = triton.cdiv(C, rows)
    db = torch.empty((n_prog, V) if write_db else (0,), dtype=torch.float32, device=z.device)
    _launch.launch(_launch.Plan(
        "subs_linear_cross_entropy.rows", _subs_ce_rows_kernel, (n_prog,),
        (z, z.stride(0), bias if bias is not None else w, tgt, w, loss, db if write_db else loss, C, V, mask_index),
        dict(ROWS=rows, BLOCK_V=block, HAS_BIAS=bias is not None, WRITE_GRAD=write_grad, WRITE_DB=write_db,
             NUM_STAGES=stages),
        num_warps=nw, vector_io=("ld", "st") if write_grad else ("ld",)), z.device)
    return loss, (db.sum(0) if write_db else db)


def _rows_reference(z: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor, mask_index: int,
                    bias: Optional[torch.Tensor], write_grad: bool = True, write_db: Optional[bool] = None,
                    gpu_plan=None):
    """The row kernel in PyTorch (fp32 math on one chunk): same contract as ``_rows_triton``."""
    C, V = z.shape
    zf = z.float()
    if bias is not None:
        zf = zf + bias.float()
    if mask_index >= 0:
        zf[:, mask_index] = float("-inf")
    lse = torch.logsumexp(zf, dim=-1)
    # a row with a +inf logit: torch.logsumexp gives +inf, the kernel's online log-sum-exp inf - inf = NaN; its
    # softmax is 0 / 0 at the +inf columns either way: NaN for the row's loss and gradient in both backends
    lse = torch.where(lse == float("inf"), float("nan"), lse)
    ok = (tgt >= 0) & (tgt < V) & (tgt != mask_index)
    safe = torch.where(ok, tgt, 0)
    z_t = zf.gather(1, safe[:, None])[:, 0]
    loss = torch.where(ok, w * (lse - z_t), float("nan"))
    if not write_grad:
        return loss, torch.zeros(0, dtype=torch.float32, device=z.device)
    g = torch.exp(zf - lse[:, None])  # exp(-inf) = 0 on the MASK column
    g[torch.arange(C, device=z.device), safe] -= ok.to(g.dtype)
    if mask_index >= 0:
        g[:, mask_index] = 0.0        # (1): 0 on the MASK column also where lse is NaN, times w as in the kernel
    g = g * torch.where(ok, w, float("nan"))[:, None]     # an invalid target poisons its whole row
    z.copy_(g)
    write_db = write_grad if write_db is None else write_db
    return loss, (g.sum(0) if write_db else torch.zeros(0, dtype=torch.float32, device=z.device))


_ROWS = {"triton": _rows_triton, "reference": _rows_reference}
_SUPPORTED = {"triton": None, "reference": None}


# ---------------------------------------------------------------------------------------------
# Host side: chunked GEMMs around the row kernel
# ---------------------------------------------------------------------------------------------
_ADDMM_F32_OK = True   # torch.addmm(acc, a, b, out_dtype=float32, out=acc): bf16/fp16 GEMM accumulating into fp32
_MM_OUT_DTYPE_OK = True  # torch.mm(..., out_dtype=float32) for bf16/fp16 CUDA inputs (newer torch)


def _warn_once(msg):
    import warnings
    warnings.warn(f"{OP}: {msg}")


def _mm_into_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation and no low-precision rounding of the partial sum.

    Preferred: one cuBLAS GEMM with beta = 1 that reads and writes the fp32 accumulator in its epilogue
    (``addmm(..., out_dtype=float32)``, bf16/fp16 operands). Fallbacks, each announced once: an fp32 GEMM
    result added into acc (one extra (V, d) fp32 write + read per chunk), then an fp32 GEMM on upcast operands."""
    global _ADDMM_F32_OK, _MM_OUT_DTYPE_OK
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_F32_OK:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as e:
            _ADDMM_F32_OK = False
            _warn_once(f"addmm(out_dtype=float32) into the fp32 accumulator unavailable ({e}); grad_W accumulates "
                       "through an fp32 GEMM result per chunk (correct, one extra pass over (V, d) per chunk)")
    if a.is_cuda and _MM_OUT_DTYPE_OK:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))  # bf16/fp16 GEMM, fp32 output (cuBLAS)
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as e:
            _MM_OUT_DTYPE_OK = False
            _warn_once(f"torch.mm(out_dtype=float32) unavailable ({e}); accumulating grad_W with an fp32 GEMM on "
                       "upcast operands (correct, slower)")
    acc.addmm_(a.float(), b.float())


def chunk_rows_for(V: int, dtype: torch.dtype) -> int:
    """The most rows of one (C, V) logits chunk: CHUNK_BYTES of logits (rows padded to 64 elements)."""
    v_pad = (V + 63) // 64 * 64
    return max(1, CHUNK_BYTES // (v_pad * torch.empty((), dtype=dtype).element_size()))


def balanced_chunks(N: int, chunk_rows: int) -> int:
    """Rows per chunk: N split into ceil(N / chunk_rows) chunks of equal size (the last one at most as long),
    rounded up to a multiple of 64 rows when that stays within chunk_rows (GEMM tiles of 64/128 rows)."""
    n = -(-N // chunk_rows)
    c = -(-N // n)
    c64 = -(-c // 64) * 64
    return c64 if c64 <= chunk_rows else c


def _forward_and_grads(h, W, b, tgt, w, mask_index: int, rows_impl: str, grad_h: bool, grad_w: bool,
                       chunk_rows: int):
    """Per-row losses (N,) fp32; grad_h (N, d) in h's dtype if ``grad_h``; grad_W (V, d) and grad_b (V,) fp32
    if ``grad_w`` (grad_b empty when b is None). h and W are in the compute dtype; b in any float dtype (it is
    added in fp32 inside the row kernel)."""
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
    # One logits buffer for all chunks, rows padded to a multiple of 64 elements: a row stride of V = 50258
    # elements is only 4-byte aligned, which keeps cuBLAS off its fastest kernels and the row kernel off 16-byte
    # accesses (Triton specialises the stride on divisibility by 16).
    v_pad = (V + 63) // 64 * 64
    chunk = balanced_chunks(N, chunk_rows)
    buf = torch.empty(min(N, chunk), v_pad, dtype=h.dtype, device=dev)
    Wt = W.t()
    write = grad_h or grad_w
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        hc = h[s:e]
        z = buf[: e - s, :V]                                           # (C, V), row stride v_pad
        torch.mm(hc, Wt, out=z)                                        # no bias: the row kernel adds it in fp32
        losses[s:e], db = rows(z, tgt[s:e], w[s:e], mask_index, b, write, grad_w and b is not None)  # z: dL/dz
        if grad_h:
            torch.mm(z, W, out=gh[s:e])                                # (2)
        if grad_w:
            _mm_into_fp32(gW, z.t(), hc)                               # (3)
            if b is not None:
                gb += db                                               # (4), from the row kernel's column sums
    return losses, gh, gW, gb


# ---------------------------------------------------------------------------------------------
# torch.library registration + autograd
# ---------------------------------------------------------------------------------------------
def _check_op(h, W, b, tgt, w, mask_index, grad_h, grad_w, chunk_rows) -> None:
    """The op's inputs, from metadata only (no value is read): shared by its body and its fake kernel. The op
    takes targets as int64 and row weights as float32 (the public function converts them)."""
    _checks.tensor(OP, "hidden", h, dtypes=_DTYPES, ndim=2)
    N, d = h.shape
    _checks.tensor(OP, "weight", W, dtypes=_DTYPES, ndim=2)
    V = W.shape[0]
    if W.shape[1] != d:
        _checks.fail(OP, f"weight: hidden width {d} != weight width {W.shape[1]} (weight must be (V, d) = (V, {d}))")
    if V < 2:
        _checks.fail(OP, f"weight: need a vocabulary of at least 2 rows, got V={V}")
    _checks.tensor(OP, "bias", b, dtypes=_DTYPES, shape=(V,), optional=True)
    _checks.tensor(OP, "targets", tgt, dtypes=(torch.int64,), shape=(N,))
    _checks.tensor(OP, "row_weights", w, dtypes=(torch.float32,), shape=(N,))
    _checks.same_device(OP, hidden=h, weight=W, bias=b, targets=tgt, row_weights=w)
    _checks.int_arg(OP, "mask_index", mask_index, -1, V - 1)
    _checks.bool_arg(OP, "grad_h", grad_h)
    _checks.bool_arg(OP, "grad_w", grad_w)
    _checks.int_arg(OP, "chunk_rows", chunk_rows, 1)


@torch.library.custom_op("mdlm::subs_linear_cross_entropy", mutates_args=())
def _linear_ce_op(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], tgt: torch.Tensor,
                  w: torch.Tensor, mask_index: int, grad_h: bool, grad_w: bool, chunk_rows: int,
                  backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor]:
    """h (N, d), W (V, d), b (V,) or None (fp32 / bf16 / fp16), tgt (N,) int64, w (N,) float32, mask_index in
    [-1, V) (-1: none). Returns (loss, row losses, grad_h, grad_W, grad_b) (the gradients empty unless asked for).
    Checked here (metadata only) before any pointer reaches a kernel; any strides (made contiguous here)."""
    _check_op(h, W, b, tgt, w, mask_index, grad_h, grad_w, chunk_rows)
    name = _backend.resolve(OP, backend, h.device, _SUPPORTED)
    # the kernels index rows and the bias, targets and weights as dense arrays
    h, W, tgt, w = h.contiguous(), W.contiguous(), tgt.contiguous(), w.contiguous()
    b = None if b is None else b.contiguous()
    # the GEMMs run in h's dtype (the compute dtype); W/b keep their own dtype as parameters, so an fp32
    # master weight receives its fp32-accumulated gradient without a round trip through bf16; the bias is added
    # in fp32 by the row kernel in its own dtype (one rounding fewer than a bf16 GEMM epilogue)
    Wc = W if W.dtype == h.dtype else W.to(h.dtype)
    losses, gh, gW, gb = _forward_and_grads(h, Wc, b, tgt, w, mask_index, name, grad_h, grad_w, chunk_rows)
    return losses.sum(), losses, gh, gW, gb


@_linear_ce_op.register_fake
def _(h, W, b, tgt, w, mask_index, grad_h, grad_w, chunk_rows, backend=None):
    _check_op(h, W, b, tgt, w, mask_index, grad_h, grad_w, chunk_rows)
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


def _check(hidden, weight, bias, targets, row_weights, mask_index, validate, chunk_rows):
    """The public function's inputs (targets may be int32, row weights any float dtype: converted for the op)."""
    _checks.tensor(OP, "hidden", hidden, dtypes=_DTYPES, ndim=2)
    _checks.tensor(OP, "weight", weight, dtypes=_DTYPES, ndim=2)
    N, d = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != d:
        _checks.fail(OP, f"weight: hidden width {d} != weight width {weight.shape[1]} (weight must be (V, d) = "
                         f"(V, {d}))")
    if V < 2:
        _checks.fail(OP, f"weight: need a vocabulary of at least 2 rows, got V={V}")
    _checks.tensor(OP, "bias", bias, dtypes=_DTYPES, shape=(V,), optional=True)
    _checks.tensor(OP, "targets", targets, dtypes=(torch.int64, torch.int32), shape=(N,))
    _checks.tensor(OP, "row_weights", row_weights, dtypes=_checks.REF_FLOATS, shape=(N,), optional=True)
    _checks.same_device(OP, hidden=hidden, weight=weight, bias=bias, targets=targets, row_weights=row_weights)
    if mask_index is not None:
        _checks.int_arg(OP, "mask_index", mask_index, 0, V - 1)
    _checks.bool_arg(OP, "validate", validate)
    if chunk_rows is not None:
        _checks.int_arg(OP, "chunk_rows", chunk_rows, 1)


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
    _check(hidden, weight, bias, targets, row_weights, mask_index, validate, chunk_rows)
    _checks.backend_arg(OP, backend)
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
    chunk = int(chunk_rows) if chunk_rows is not None else chunk_rows_for(V, hidden.dtype)
    loss, rows, *_ = torch.ops.mdlm.subs_linear_cross_entropy(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), tgt.contiguous(),
        w.contiguous(), mi, grad_h, grad_w, chunk, backend)
    return LinearCEOutput(loss, rows.detach())
