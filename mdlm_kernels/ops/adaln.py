"""adaLN LayerNorm + modulate, and the gated residual (dropout from Philox) fused with the next norm.

The two memory-bound passes of every published ``DDiTBlock`` branch (``mdlm.nn``), one Triton pass each:

    adaln_modulate:           y = LN(x) * w * (1 + scale[b]) + shift[b]
    gated_residual_modulate:  r = residual + gate[b] * dropout(h)
                              y = LN(r) * w_next * (1 + scale_next[b]) + shift_next[b]   (optional)

LN is ``F.layer_norm(x.float(), [d])`` (eps 1e-5, no affine) times the fp32 weight, as ``mdlm.nn.LayerNorm``;
``shift``/``scale``/``gate`` are d-wide column slices of the adaLN output ``mod`` (B, k*d) (k = 6 in a
block, 2 in the final layer), read in place at column offset ``idx * d``: no ``chunk`` copies.

Rounding follows the published dtype flow exactly (so a bf16 run equals the published one up to fp32
summation order): ``1 + scale`` is rounded to mod's dtype; the published y is fp32 and is cast by the
next Linear, so the kernel writes y directly in ``out_dtype``; ``dropout(h)`` is rounded to h's dtype,
``gate * dropout(h)`` to ``promote(gate, h)``; r = residual + that, computed in fp32, stored in the
residual's dtype (fp32 in the published model: the embedding is fp32).

Dropout: element (row = b*L + l, col = j) is kept iff uniform24(w_{j % 4}) >= p, where (w0, w1, w2, w3) =
Philox4x32-10(key = seed, ctr = (j // 4, row, offset_lo, offset_hi)): one Philox block serves 4 consecutive
columns (uniform24 as in :mod:`mdlm_kernels.ops.philox`; the mask is therefore not
``philox_uniform(B*L, d) >= p``, which keys ctr = (j, row, ...) and uses word 0 only). Kept values
are scaled by 1/(1-p) (F.dropout semantics). No mask is stored: the backward regenerates it. With
``p == 0`` or ``training=False`` the kernel is compiled without the dropout code (exactly the eval path).

Backward (numbered derivation, per row; g = dL/dy, n = xhat * w, s1 = 1 + scale, xhat = (x - mean) * rstd):
  (1) dshift[b] = sum_l g                                   (fp32 reduction over the sequence)
  (2) dscale[b] = sum_l g * n          (d(1+scale)/dscale = 1; the rounding of 1 + scale is ignored)
  (3) dn        = g * s1
  (4) dw        = sum_{b,l} dn * xhat                       (fp32 reduction over all rows)
  (5) dxhat     = dn * w
  (6) dx        = rstd * (dxhat - mean_j(dxhat) - xhat * mean_j(dxhat * xhat))
      (from xhat_j = (x_j - mu) rstd: dxhat_i/dx_j = rstd (delta_ij - 1/d - xhat_i xhat_j / d))
Gated residual, with dr = dL/dr from the later use of r and dx_y = (6) applied to the r-norm:
  (7) dr_total  = dr + dx_y;   dresidual = dr_total
  (8) dgate[b]  = sum_l dr_total * dropout(h)
  (9) dh        = dr_total * gate * keep / (1 - p)
Reductions over rows go to fp32 partial sums per (batch row, sequence chunk) program, summed on the host
side (deterministic, no atomics).

Gradients of ``mod`` are returned as a full (B, k*d) tensor in mod's dtype, zero outside the slices the op
read (autograd sums the three per-block contributions; they are B x 6d, negligible).

Backends: "triton" (fp32/bf16/fp16) and "reference" (plain PyTorch; also float64, used by gradcheck).
Non-contiguous inputs are copied to contiguous ones (one extra copy); ``mod`` only needs unit column stride
and is passed with its row stride.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .. import launch as _launch
from .._triton import HAS_TRITON, INTERPRETED, tl, triton
from .philox import _M32, _check_u64, _from_i64, _to_i64
from .philox import _philox_reference, _uniform_from_words

OP_MOD = "adaln_modulate"
OP_RES = "gated_residual_modulate"
EPS = 1e-5
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REF_DTYPES = _DTYPES + (torch.float64,)
_ROUND_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 0}

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    # The interpreter (triton 3.6) truncates fp32 -> bf16 instead of rounding to nearest even (GPUs round);
    # _cast rounds explicitly under TRITON_INTERPRET so CPU runs see the GPU's (and torch's) bf16 values.
    _INTERP = tl.constexpr(bool(INTERPRETED))

    @triton.jit
    def _cast(x, DT: tl.constexpr):
        """fp32 x -> dtype DT with round-to-nearest-even (also under the interpreter)."""
        if _INTERP:
            if DT == tl.bfloat16:
                b = x.to(tl.uint32, bitcast=True)
                rounded = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
                x = tl.where(x != x, x, rounded)  # NaN stays NaN (its bit pattern would carry into the sign)
        return x.to(DT)

    @triton.jit
    def _round_to(x, CODE: tl.constexpr):
        """Round fp32 x to fp32 (0) / bf16 (1) / fp16 (2) and back: emulates a low-precision store."""
        y = x
        if CODE == 1:
            y = _cast(x, tl.bfloat16).to(tl.float32)
        if CODE == 2:
            y = x.to(tl.float16).to(tl.float32)
        return y

    @triton.jit
    def _uniform24(w):
        """uint32 Philox word -> float32 uniform in (0, 1) (mdlm_kernels.ops.philox's uniform24)."""
        yf = (w >> 8).to(tl.float32)
        return tl.where(yf < 8388608.0, yf + 0.5, yf) * 5.960464477539063e-08  # 2^23, 2^-24

    @triton.jit
    def _keep_mask(rows, seed, off_lo, off_hi, p, BLOCK_D: tl.constexpr):
        """Dropout keep mask [R, BLOCK_D] for rows [R] (int64) x columns 0..BLOCK_D-1 (BLOCK_D >= 4, a power
        of 2): one Philox4x32-10 per group of 4 columns, ctr = (col // 4, row, off_lo, off_hi); column col
        keeps iff uniform24(word col % 4) >= p. The 4 words are interleaved back into column order."""
        grp = tl.arange(0, BLOCK_D // 4)
        zero = rows[:, None] * 0 + grp[None, :].to(tl.int64) * 0
        c0 = (zero + grp[None, :]).to(tl.uint32)
        c1 = (zero + rows[:, None]).to(tl.uint32)
        c2 = (zero + off_lo).to(tl.uint32)
        c3 = (zero + off_hi).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=10)
        k0 = _uniform24(w0) >= p
        k1 = _uniform24(w1) >= p
        k2 = _uniform24(w2) >= p
        k3 = _uniform24(w3) >= p
        # interleave(interleave(k0, k2), interleave(k1, k3)) = [k0[g], k1[g], k2[g], k3[g] for g in groups]
        return tl.interleave(tl.interleave(k0, k2), tl.interleave(k1, k3))

    @triton.jit
    def _ln_modulate(x, cmask, w, sh, s1, d, eps):
        """x [R, D] fp32 (0 in masked columns), w [D], sh/s1 [R, D] -> y [R, D], mean [R], rstd [R]."""
        mean = tl.sum(x, 1) / d
        xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, 1) / d
        rstd = 1.0 / tl.sqrt(var + eps)
        n = (xc * rstd[:, None]) * w[None, :]       # LayerNorm(x) * weight (fp32)
        y = n * s1 + sh                              # modulate
        return y, mean, rstd

    @triton.jit
    def _ln_modulate_bwd(g, x, cmask, w, s1, mean, rstd, d):
        """Steps (1)-(6) for one tile: returns dx [R, D] and the per-column partial sums of dw, dshift,
        dscale over the tile's rows. g, x [R, D] fp32 (0 in masked rows/columns); s1 [D] or [R, D]."""
        xhat = tl.where(cmask[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
        n = xhat * w[None, :]
        p_dsh = tl.sum(g, 0)                         # (1)
        p_dsc = tl.sum(g * n, 0)                     # (2)
        dn = g * s1                                  # (3)
        p_dw = tl.sum(dn * xhat, 0)                  # (4)
        dxhat = dn * w[None, :]                      # (5)
        c1 = tl.sum(dxhat * xhat, 1) / d
        c2 = tl.sum(dxhat, 1) / d
        dx = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]   # (6)
        return dx, p_dw, p_dsh, p_dsc

    @triton.jit
    def _adaln_fwd_kernel(
        x_ptr,       # (N, d) rows of x (N = B*L), fp32/bf16/fp16, contiguous
        w_ptr,       # (d,) LayerNorm weight
        mod_ptr,     # (B, k*d) adaLN modulation, unit column stride, row stride mod_stride
        y_ptr,       # (N, d) out, out_dtype
        mean_ptr,    # (N,) fp32 out: row mean of x
        rstd_ptr,    # (N,) fp32 out: 1 / sqrt(var + eps)
        N, L, d, mod_stride, shift_off, scale_off, eps,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < N
        cmask = cols < d
        m2 = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * d + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        moff = (rows // L)[:, None] * mod_stride + cols[None, :]     # batch row of each token row
        sh = tl.load(mod_ptr + moff + shift_off, mask=m2, other=0.0).to(tl.float32)
        sc = tl.load(mod_ptr + moff + scale_off, mask=m2, other=0.0).to(tl.float32)
        s1 = _cast(1.0 + sc, mod_ptr.dtype.element_ty).to(tl.float32)  # 1 + scale in mod's dtype
        y, mean, rstd = _ln_modulate(x, cmask, w, sh, s1, d, eps)
        tl.store(y_ptr + offs, _cast(y, y_ptr.dtype.element_ty), mask=m2)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _adaln_bwd_kernel(
        gy_ptr,      # (N, d) dL/dy
        x_ptr,       # (N, d) forward input
        w_ptr,       # (d,) LayerNorm weight
        mod_ptr,     # (B, k*d) modulation, row stride mod_stride
        mean_ptr,    # (N,) fp32 saved mean
        rstd_ptr,    # (N,) fp32 saved rstd
        dx_ptr,      # (N, d) out, x's dtype
        part_ptr,    # (B, n_chunks, 3, d) fp32 out: this program's partial sums of dw, dshift, dscale
        L, d, mod_stride, shift_off, scale_off, rows_per_chunk,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)            # batch row
        c = tl.program_id(1).to(tl.int64)            # sequence chunk
        n_chunks = tl.num_programs(1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < d
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        sc = tl.load(mod_ptr + b * mod_stride + scale_off + cols, mask=cmask, other=0.0).to(tl.float32)
        s1 = _cast(1.0 + sc, mod_ptr.dtype.element_ty).to(tl.float32)
        acc_dw = tl.zeros([BLOCK_D], tl.float32)
        acc_dsh = tl.zeros([BLOCK_D], tl.float32)
        acc_dsc = tl.zeros([BLOCK_D], tl.float32)
        for r0 in range(0, rows_per_chunk, BLOCK_R):
            ls = c * rows_per_chunk + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = ls < L
            rows = b * L + ls
            m2 = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * d + cols[None, :]
            g = tl.load(gy_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            dx, p_dw, p_dsh, p_dsc = _ln_modulate_bwd(g, x, cmask, w, s1[None, :], mean, rstd, d)
            tl.store(dx_ptr + offs, _cast(dx, dx_ptr.dtype.element_ty), mask=m2)
            acc_dw += p_dw
            acc_dsh += p_dsh
            acc_dsc += p_dsc
        base = part_ptr + ((b * n_chunks + c) * 3) * d + cols
        tl.store(base, acc_dw, mask=cmask)
        tl.store(base + d, acc_dsh, mask=cmask)
        tl.store(base + 2 * d, acc_dsc, mask=cmask)

    @triton.jit(do_not_specialize=["seed", "off_lo", "off_hi"])
    def _gated_fwd_kernel(
        res_ptr,     # (N, d) residual stream, residual dtype (fp32 in the published model)
        h_ptr,       # (N, d) branch output (attn_out / MLP output), h dtype
        mod_ptr,     # (B, k*d) gate source, row stride mod_stride
        modn_ptr,    # (B, k2*d) shift/scale source of the next norm (may be mod), row stride modn_stride
        w_ptr,       # (d,) next LayerNorm weight (read only if HAS_NORM)
        r_ptr,       # (N, d) out: residual + gate * dropout(h), residual dtype
        y_ptr,       # (N, d) out: LN(r) * w * (1 + scale) + shift, out_dtype (written only if HAS_NORM)
        mean_ptr,    # (N,) fp32 out (HAS_NORM)
        rstd_ptr,    # (N,) fp32 out (HAS_NORM)
        N, L, d, mod_stride, gate_off, modn_stride, shift_off, scale_off, eps,
        seed, off_lo, off_hi, p, drop_scale,
        PROD_CODE: tl.constexpr,   # rounding of gate * dropout(h): promote(gate, h) (0 fp32, 1 bf16, 2 fp16)
        DROPOUT: tl.constexpr, HAS_NORM: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < N
        cmask = cols < d
        m2 = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * d + cols[None, :]
        bidx = (rows // L)[:, None]
        res = tl.load(res_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        hv = tl.load(h_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        gate = tl.load(mod_ptr + bidx * mod_stride + gate_off + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = _keep_mask(rows, seed, off_lo, off_hi, p, BLOCK_D)
            hv = _cast(tl.where(keep, hv * drop_scale, 0.0), h_ptr.dtype.element_ty).to(tl.float32)
        t = _round_to(gate * hv, PROD_CODE)
        r = _cast(res + t, r_ptr.dtype.element_ty)
        tl.store(r_ptr + offs, r, mask=m2)
        if HAS_NORM:
            rf = tl.where(m2, r.to(tl.float32), 0.0)
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            moff = bidx * modn_stride + cols[None, :]
            sh = tl.load(modn_ptr + moff + shift_off, mask=m2, other=0.0).to(tl.float32)
            sc = tl.load(modn_ptr + moff + scale_off, mask=m2, other=0.0).to(tl.float32)
            s1 = _cast(1.0 + sc, modn_ptr.dtype.element_ty).to(tl.float32)
            y, mean, rstd = _ln_modulate(rf, cmask, w, sh, s1, d, eps)
            tl.store(y_ptr + offs, _cast(y, y_ptr.dtype.element_ty), mask=m2)
            tl.store(mean_ptr + rows, mean, mask=rmask)
            tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit(do_not_specialize=["seed", "off_lo", "off_hi"])
    def _gated_bwd_kernel(
        dr_ptr,      # (N, d) dL/dr from the later use of r (read only if HAS_DR)
        dy_ptr,      # (N, d) dL/dy (read only if HAS_DY)
        r_ptr,       # (N, d) forward output r (input of the next norm)
        h_ptr,       # (N, d) branch output
        mod_ptr,     # (B, k*d) gate source
        modn_ptr,    # (B, k2*d) shift/scale source
        w_ptr,       # (d,) next LayerNorm weight
        mean_ptr,    # (N,) fp32 saved mean of r
        rstd_ptr,    # (N,) fp32 saved rstd of r
        dres_ptr,    # (N, d) out: dL/dresidual, residual dtype
        dh_ptr,      # (N, d) out: dL/dh, h dtype
        part_ptr,    # (B, n_chunks, 4, d) fp32 out: partial sums of dw, dshift, dscale, dgate
        L, d, mod_stride, gate_off, modn_stride, shift_off, scale_off, rows_per_chunk,
        seed, off_lo, off_hi, p, drop_scale,
        DROPOUT: tl.constexpr, HAS_DR: tl.constexpr, HAS_DY: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        n_chunks = tl.num_programs(1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < d
        gate = tl.load(mod_ptr + b * mod_stride + gate_off + cols, mask=cmask, other=0.0).to(tl.float32)
        w = tl.zeros([BLOCK_D], tl.float32)
        s1 = tl.zeros([BLOCK_D], tl.float32)
        if HAS_DY:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            sc = tl.load(modn_ptr + b * modn_stride + scale_off + cols, mask=cmask, other=0.0).to(tl.float32)
            s1 = _cast(1.0 + sc, modn_ptr.dtype.element_ty).to(tl.float32)
        acc_dw = tl.zeros([BLOCK_D], tl.float32)
        acc_dsh = tl.zeros([BLOCK_D], tl.float32)
        acc_dsc = tl.zeros([BLOCK_D], tl.float32)
        acc_dg = tl.zeros([BLOCK_D], tl.float32)
        for r0 in range(0, rows_per_chunk, BLOCK_R):
            ls = c * rows_per_chunk + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = ls < L
            rows = b * L + ls
            m2 = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * d + cols[None, :]
            drt = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            if HAS_DR:
                drt += tl.load(dr_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            if HAS_DY:
                g = tl.load(dy_ptr + offs, mask=m2, other=0.0).to(tl.float32)
                rv = tl.load(r_ptr + offs, mask=m2, other=0.0).to(tl.float32)
                mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
                rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
                dx, p_dw, p_dsh, p_dsc = _ln_modulate_bwd(g, rv, cmask, w, s1[None, :], mean, rstd, d)
                drt += dx                                                   # (7)
                acc_dw += p_dw
                acc_dsh += p_dsh
                acc_dsc += p_dsc
            tl.store(dres_ptr + offs, _cast(drt, dres_ptr.dtype.element_ty), mask=m2)
            hv = tl.load(h_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            dh = drt * gate[None, :]
            if DROPOUT:
                keep = _keep_mask(rows, seed, off_lo, off_hi, p, BLOCK_D)
                hv = _cast(tl.where(keep, hv * drop_scale, 0.0), h_ptr.dtype.element_ty).to(tl.float32)
                dh = tl.where(keep, dh * drop_scale, 0.0)                   # (9)
            acc_dg += tl.sum(drt * hv, 0)                                   # (8)
            tl.store(dh_ptr + offs, _cast(dh, dh_ptr.dtype.element_ty), mask=m2)
        base = part_ptr + ((b * n_chunks + c) * 4) * d + cols
        tl.store(base, acc_dw, mask=cmask)
        tl.store(base + d, acc_dsh, mask=cmask)
        tl.store(base + 2 * d, acc_dsc, mask=cmask)
        tl.store(base + 3 * d, acc_dg, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Host launchers (Triton)
# ---------------------------------------------------------------------------------------------
def _launch_cfg(d: int, gpu):
    """(BLOCK_R rows per tile, BLOCK_D, num_warps). The interpreter (gpu None) pays per op, the GPU per
    register: bigger tiles under TRITON_INTERPRET."""
    block_d = max(4, triton.next_power_of_2(d))  # >= 4: the dropout mask draws one Philox per 4 columns
    tile = 4096 if gpu is not None else 16384
    block_r = max(1, min(64, tile // block_d))
    # 8 warps for the 4096-element tile: with 4 (32 elements per thread) the training backward needs 255
    # registers and spills on sm_90 (checked with ptxas); with 8 it fits without spilling.
    return block_r, block_d, 8


_BWD_BLOCKS_PER_SM = 4


def _chunks(B: int, L: int, block_r: int, gpu):
    """Split each batch row's L rows into n_chunks programs (multiples of block_r rows): about 4 programs
    per SM on a GPU, one per batch row on the interpreter."""
    if gpu is not None:
        n = max(1, min(triton.cdiv(L, block_r), triton.cdiv(_BWD_BLOCKS_PER_SM * gpu.sm_count, B)))
    else:
        n = 1
    rows = triton.cdiv(triton.cdiv(L, n), block_r) * block_r
    return triton.cdiv(L, rows), rows


def _adaln_fwd_triton(x, weight, mod, shift_idx, scale_idx, out_dtype, eps):
    B, L, d = x.shape
    N = B * L
    y = torch.empty((B, L, d), dtype=out_dtype, device=x.device)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, mean, rstd
    br, bd, nw = _launch_cfg(d, _launch.gpu_of(x.device))
    _launch.launch(_launch.Plan(
        "adaln_modulate.fwd", _adaln_fwd_kernel, (triton.cdiv(N, br),),
        (x, weight, mod, y, mean, rstd, N, L, d, mod.stride(0), shift_idx * d, scale_idx * d, eps),
        dict(BLOCK_R=br, BLOCK_D=bd), num_warps=nw, vector_io=("ld", "st")), x.device)
    return y, mean, rstd


def _adaln_bwd_triton(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx, eps):
    B, L, d = x.shape
    dx = torch.empty_like(x)
    dmod = torch.zeros(mod.shape, dtype=mod.dtype, device=mod.device)
    if B * L == 0:
        return dx, torch.zeros_like(weight), dmod
    gpu = _launch.gpu_of(x.device)
    br, bd, nw = _launch_cfg(d, gpu)
    nc, rows = _chunks(B, L, br, gpu)
    part = torch.empty((B, nc, 3, d), dtype=torch.float32, device=x.device)
    _launch.launch(_launch.Plan(
        "adaln_modulate.bwd", _adaln_bwd_kernel, (B, nc),
        (gy, x, weight, mod, mean, rstd, dx, part, L, d, mod.stride(0), shift_idx * d, scale_idx * d, rows),
        dict(BLOCK_R=br, BLOCK_D=bd), num_warps=nw, blocks_per_sm=_BWD_BLOCKS_PER_SM, vector_io=("ld", "st")), x.device)
    s = part.sum(1)                                  # (B, 3, d) fp32
    dw = s[:, 0].sum(0).to(weight.dtype)
    dmod[:, shift_idx * d:(shift_idx + 1) * d] += s[:, 1].to(mod.dtype)
    dmod[:, scale_idx * d:(scale_idx + 1) * d] += s[:, 2].to(mod.dtype)
    return dx, dw, dmod


def _seed_words(seed: int, offset: int):
    return _from_i64(seed), offset & _M32, (_from_i64(offset) >> 32) & _M32


def _drop_scale(p: float) -> float:
    """1 / (1 - p) rounded to fp32 (the value both backends multiply by); 0 for p = 1 (all dropped)."""
    return 0.0 if p >= 1.0 else float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def _gated_fwd_triton(residual, h, mod, gate_idx, weight, mod_next, shift_idx, scale_idx, p, seed, offset,
                      dropout, out_dtype, eps):
    B, L, d = residual.shape
    N = B * L
    has_norm = weight is not None
    modn = mod if mod_next is None else mod_next
    r = torch.empty_like(residual)
    y = torch.empty((B, L, d) if has_norm else (0,), dtype=out_dtype, device=residual.device)
    mean = torch.empty(N if has_norm else 0, dtype=torch.float32, device=residual.device)
    rstd = torch.empty_like(mean)
    if N == 0:
        return r, y, mean, rstd
    br, bd, nw = _launch_cfg(d, _launch.gpu_of(residual.device))
    s, olo, ohi = _seed_words(seed, offset)
    prod = _ROUND_CODE[torch.promote_types(mod.dtype, h.dtype)]
    _launch.launch(_launch.Plan(
        "gated_residual_modulate.fwd", _gated_fwd_kernel, (triton.cdiv(N, br),),
        (residual, h, mod, modn, weight if has_norm else residual, r, y if has_norm else r,
         mean if has_norm else r, rstd if has_norm else r,
         N, L, d, mod.stride(0), gate_idx * d, modn.stride(0), shift_idx * d, scale_idx * d, eps,
         s, olo, ohi, float(p), _drop_scale(p)),
        dict(PROD_CODE=prod, DROPOUT=bool(dropout), HAS_NORM=has_norm, BLOCK_R=br, BLOCK_D=bd),
        num_warps=nw, vector_io=("ld", "st")), residual.device)
    return r, y, mean, rstd


def _gated_bwd_triton(dr, dy, r, h, mod, gate_idx, weight, mod_next, shift_idx, scale_idx, mean, rstd,
                      p, seed, offset, dropout, eps):
    B, L, d = r.shape
    has_dy = dy is not None and weight is not None
    modn = mod if mod_next is None else mod_next
    dres = torch.empty_like(r)
    dh = torch.empty_like(h)
    dmod = torch.zeros(mod.shape, dtype=mod.dtype, device=mod.device)
    dmodn = torch.zeros(mod_next.shape, dtype=mod_next.dtype, device=mod.device) if mod_next is not None else None
    dw = torch.zeros_like(weight) if weight is not None else None
    if B * L > 0:
        gpu = _launch.gpu_of(r.device)
        br, bd, nw = _launch_cfg(d, gpu)
        nc, rows = _chunks(B, L, br, gpu)
        part = torch.empty((B, nc, 4, d), dtype=torch.float32, device=r.device)
        s, olo, ohi = _seed_words(seed, offset)
        _launch.launch(_launch.Plan(
            "gated_residual_modulate.bwd", _gated_bwd_kernel, (B, nc),
            (dr if dr is not None else r, dy if has_dy else r, r, h, mod, modn,
             weight if weight is not None else r, mean if has_dy else r, rstd if has_dy else r,
             dres, dh, part, L, d, mod.stride(0), gate_idx * d, modn.stride(0), shift_idx * d,
             scale_idx * d, rows, s, olo, ohi, float(p), _drop_scale(p)),
            dict(DROPOUT=bool(dropout), HAS_DR=dr is not None, HAS_DY=has_dy, BLOCK_R=br, BLOCK_D=bd),
            num_warps=nw, blocks_per_sm=_BWD_BLOCKS_PER_SM, vector_io=("ld", "st")), r.device)
        sums = part.sum(1)                           # (B, 4, d) fp32
        dmod[:, gate_idx * d:(gate_idx + 1) * d] += sums[:, 3].to(mod.dtype)
        if has_dy:
            dw = sums[:, 0].sum(0).to(weight.dtype)
            tgt = dmod if dmodn is None else dmodn
            tgt[:, shift_idx * d:(shift_idx + 1) * d] += sums[:, 1].to(tgt.dtype)
            tgt[:, scale_idx * d:(scale_idx + 1) * d] += sums[:, 2].to(tgt.dtype)
    return dres, dh, dmod, dw, dmodn


# ---------------------------------------------------------------------------------------------
# Reference (plain PyTorch): the mdlm.nn spec op for op; backward written out (steps (1)-(9))
# ---------------------------------------------------------------------------------------------
def _cdt(*ts) -> torch.dtype:
    """Compute dtype of the reference: fp32 (the spec's x.float()), float64 when any input is float64."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _slice(mod: torch.Tensor, idx: int, d: int) -> torch.Tensor:
    return mod[:, None, idx * d:(idx + 1) * d]        # (B, 1, d), as chunk(k) of mod[:, None]


def _adaln_fwd_reference(x, weight, mod, shift_idx, scale_idx, out_dtype, eps):
    B, L, d = x.shape
    cdt = _cdt(x, weight, mod)
    xf = x.to(cdt)
    ln = F.layer_norm(xf, [d], eps=eps) * weight[None, None, :]                # mdlm.nn.LayerNorm
    y = ln * (1 + _slice(mod, scale_idx, d)) + _slice(mod, shift_idx, d)        # mdlm.nn.modulate
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    return y.to(out_dtype), mean.reshape(-1).float(), rstd.reshape(-1).float()


def _ln_modulate_bwd_reference(g, x, weight, mod, shift_idx, scale_idx, eps, cdt):
    """Steps (1)-(6) in PyTorch, in cdt: (dx, dw, dshift (B, d), dscale (B, d)). Statistics recomputed."""
    d = x.shape[-1]
    g = g.to(cdt)
    xf = x.to(cdt)
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - mean) * rstd
    w = weight.to(cdt)
    s1 = (1 + _slice(mod, scale_idx, d)).to(cdt)
    n = xhat * w
    dsh = g.sum(1)                                                              # (1)
    dsc = (g * n).sum(1)                                                        # (2)
    dn = g * s1                                                                 # (3)
    dw = (dn * xhat).sum((0, 1))                                                # (4)
    dxhat = dn * w                                                              # (5)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdim=True))               # (6)
    return dx, dw, dsh, dsc


def _adaln_bwd_reference(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx, eps):
    d = x.shape[-1]
    cdt = _cdt(x, weight, mod, gy)
    dx, dw, dsh, dsc = _ln_modulate_bwd_reference(gy, x, weight, mod, shift_idx, scale_idx, eps, cdt)
    dmod = torch.zeros(mod.shape, dtype=cdt, device=mod.device)
    dmod[:, shift_idx * d:(shift_idx + 1) * d] += dsh
    dmod[:, scale_idx * d:(scale_idx + 1) * d] += dsc
    return dx.to(x.dtype), dw.to(weight.dtype), dmod.to(mod.dtype)


def _keep_reference(B, L, d, p, seed, offset, device):
    """(B, L, d) bool keep mask: element (row, col) keeps iff uniform24(word col % 4 of Philox4x32-10(seed,
    ctr = (col // 4, row, offset_lo, offset_hi))) >= p."""
    seed, offset = _from_i64(seed), _from_i64(offset)
    rows, groups = B * L, (d + 3) // 4
    row = torch.arange(rows, dtype=torch.int64, device=device).view(rows, 1).expand(rows, groups)
    grp = torch.arange(groups, dtype=torch.int64, device=device).view(1, groups).expand(rows, groups)
    c2 = torch.full((rows, groups), offset & _M32, dtype=torch.int64, device=device)
    c3 = torch.full((rows, groups), offset >> 32, dtype=torch.int64, device=device)
    words = _philox_reference(grp, row, c2, c3, seed & _M32, seed >> 32)
    w = torch.stack(words, dim=-1).reshape(rows, 4 * groups)[:, :d]   # column col -> word col % 4 of group col // 4
    u = _uniform_from_words(w, None, torch.float32)
    return (u >= torch.tensor(p, dtype=torch.float32, device=device)).view(B, L, d)


def _dropout_reference(h, keep, p):
    """F.dropout(h, p) with the given mask: kept values times 1/(1-p) (fp32 math), rounded to h's dtype."""
    cdt = _cdt(h)
    return torch.where(keep, h.to(cdt) * _drop_scale(p), 0.0).to(h.dtype)


def _gated_fwd_reference(residual, h, mod, gate_idx, weight, mod_next, shift_idx, scale_idx, p, seed, offset,
                         dropout, out_dtype, eps):
    B, L, d = residual.shape
    hd = h
    if dropout:
        hd = _dropout_reference(h, _keep_reference(B, L, d, p, seed, offset, h.device), p)
    r = (residual + _slice(mod, gate_idx, d) * hd).to(residual.dtype)         # mdlm.nn.bias_dropout_add_scale
    if weight is None:
        return (r, residual.new_empty(0, dtype=out_dtype), residual.new_empty(0, dtype=torch.float32),
                residual.new_empty(0, dtype=torch.float32))
    y, mean, rstd = _adaln_fwd_reference(r, weight, mod if mod_next is None else mod_next, shift_idx,
                                         scale_idx, out_dtype, eps)
    return r, y, mean, rstd


def _gated_bwd_reference(dr, dy, r, h, mod, gate_idx, weight, mod_next, shift_idx, scale_idx, mean, rstd,
                         p, seed, offset, dropout, eps):
    B, L, d = r.shape
    cdt = _cdt(r, h, mod, mod_next, weight, dr, dy)
    drt = dr.to(cdt, copy=True) if dr is not None else torch.zeros(r.shape, dtype=cdt, device=r.device)
    dmod = torch.zeros(mod.shape, dtype=cdt, device=mod.device)
    dmodn = torch.zeros(mod_next.shape, dtype=cdt, device=mod.device) if mod_next is not None else None
    dw = torch.zeros_like(weight) if weight is not None else None
    if dy is not None and weight is not None:
        modn = mod if mod_next is None else mod_next
        dx, dw, dsh, dsc = _ln_modulate_bwd_reference(dy, r, weight, modn, shift_idx, scale_idx, eps, cdt)
        drt = drt + dx                                                          # (7)
        dw = dw.to(weight.dtype)
        tgt = dmod if dmodn is None else dmodn
        tgt[:, shift_idx * d:(shift_idx + 1) * d] += dsh
        tgt[:, scale_idx * d:(scale_idx + 1) * d] += dsc
    gate = _slice(mod, gate_idx, d).to(cdt)
    hd = h
    dh = drt * gate
    if dropout:
        keep = _keep_reference(B, L, d, p, seed, offset, h.device)
        hd = _dropout_reference(h, keep, p)
        dh = torch.where(keep, dh * _drop_scale(p), 0.0)                        # (9)
    dmod[:, gate_idx * d:(gate_idx + 1) * d] += (drt * hd.to(cdt)).sum(1)      # (8)
    return (drt.to(r.dtype), dh.to(h.dtype), dmod.to(mod.dtype), dw,
            dmodn.to(mod_next.dtype) if dmodn is not None else None)


def _triton_supported(*ts):
    return _backend.dtype_predicate(_DTYPES, *ts)


# ---------------------------------------------------------------------------------------------
# torch.library registration + autograd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mdlm::adaln_modulate", mutates_args=())
def _adaln_op(x: torch.Tensor, weight: torch.Tensor, mod: torch.Tensor, shift_idx: int, scale_idx: int,
              out_dtype: torch.dtype, eps: float, backend: Optional[str] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = _backend.resolve(OP_MOD, backend, x.device, {"triton": _triton_supported(x, weight, mod, x.new_empty(
        0, dtype=out_dtype)), "reference": None})
    impl = _adaln_fwd_triton if name == "triton" else _adaln_fwd_reference
    return impl(x, weight, mod, shift_idx, scale_idx, out_dtype, eps)


@_adaln_op.register_fake
def _(x, weight, mod, shift_idx, scale_idx, out_dtype, eps, backend=None):
    B, L, d = x.shape
    return (x.new_empty((B, L, d), dtype=out_dtype), x.new_empty((B * L,), dtype=torch.float32),
            x.new_empty((B * L,), dtype=torch.float32))


@torch.library.custom_op("mdlm::adaln_modulate_backward", mutates_args=())
def _adaln_bwd_op(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mod: torch.Tensor, mean: torch.Tensor,
                  rstd: torch.Tensor, shift_idx: int, scale_idx: int, eps: float, backend: Optional[str] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = _backend.resolve(OP_MOD + "_backward", backend, x.device,
                            {"triton": _triton_supported(gy, x, weight, mod), "reference": None})
    impl = _adaln_bwd_triton if name == "triton" else _adaln_bwd_reference
    return impl(gy.contiguous(), x, weight, mod, mean, rstd, shift_idx, scale_idx, eps)


@_adaln_bwd_op.register_fake
def _(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx, eps, backend=None):
    return torch.empty_like(x), torch.empty_like(weight), mod.new_empty(mod.shape)


def _adaln_setup(ctx, inputs, output):
    x, weight, mod, shift_idx, scale_idx, out_dtype, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mod, mean, rstd)
    ctx.args = (shift_idx, scale_idx, eps, backend)


def _adaln_backward(ctx, gy, g_mean, g_rstd):
    x, weight, mod, mean, rstd = ctx.saved_tensors
    shift_idx, scale_idx, eps, backend = ctx.args
    dx, dw, dmod = torch.ops.mdlm.adaln_modulate_backward(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx,
                                                          eps, backend)
    return dx, dw, dmod, None, None, None, None, None


_adaln_op.register_autograd(_adaln_backward, setup_context=_adaln_setup)


@torch.library.custom_op("mdlm::gated_residual_modulate", mutates_args=())
def _gated_op(residual: torch.Tensor, h: torch.Tensor, mod: torch.Tensor, gate_idx: int,
              weight_next: Optional[torch.Tensor], mod_next: Optional[torch.Tensor], shift_idx: int,
              scale_idx: int, p: float, seed: int, offset: int, dropout: bool, out_dtype: torch.dtype,
              eps: float, backend: Optional[str] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    name = _backend.resolve(OP_RES, backend, residual.device, {"triton": _triton_supported(
        residual, h, mod, weight_next, mod_next, h.new_empty(0, dtype=out_dtype)), "reference": None})
    impl = _gated_fwd_triton if name == "triton" else _gated_fwd_reference
    return impl(residual, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, p, seed, offset,
                dropout, out_dtype, eps)


@_gated_op.register_fake
def _(residual, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, p, seed, offset, dropout,
      out_dtype, eps, backend=None):
    B, L, d = residual.shape
    n = B * L if weight_next is not None else 0
    y = residual.new_empty((B, L, d) if weight_next is not None else (0,), dtype=out_dtype)
    return (torch.empty_like(residual), y, residual.new_empty((n,), dtype=torch.float32),
            residual.new_empty((n,), dtype=torch.float32))


@torch.library.custom_op("mdlm::gated_residual_modulate_backward", mutates_args=())
def _gated_bwd_op(dr: Optional[torch.Tensor], dy: Optional[torch.Tensor], r: torch.Tensor, h: torch.Tensor,
                  mod: torch.Tensor, gate_idx: int, weight_next: Optional[torch.Tensor],
                  mod_next: Optional[torch.Tensor], shift_idx: int, scale_idx: int, mean: torch.Tensor,
                  rstd: torch.Tensor, p: float, seed: int, offset: int, dropout: bool, eps: float,
                  backend: Optional[str] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    name = _backend.resolve(OP_RES + "_backward", backend, r.device, {"triton": _triton_supported(
        dr, dy, r, h, mod, weight_next, mod_next), "reference": None})
    impl = _gated_bwd_triton if name == "triton" else _gated_bwd_reference
    dres, dh, dmod, dw, dmodn = impl(None if dr is None else dr.contiguous(), None if dy is None else dy.contiguous(),
                                     r, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, mean, rstd,
                                     p, seed, offset, dropout, eps)
    return (dres, dh, dmod, r.new_empty(0) if dw is None else dw,     # fresh empties: outputs must not alias
            r.new_empty(0) if dmodn is None else dmodn)


@_gated_bwd_op.register_fake
def _(dr, dy, r, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, mean, rstd, p, seed, offset,
      dropout, eps, backend=None):
    return (torch.empty_like(r), torch.empty_like(h), mod.new_empty(mod.shape),
            r.new_empty(0) if weight_next is None else torch.empty_like(weight_next),
            r.new_empty(0) if mod_next is None else mod_next.new_empty(mod_next.shape))


def _gated_setup(ctx, inputs, output):
    (residual, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, p, seed, offset, dropout,
     out_dtype, eps, backend) = inputs
    r, _, mean, rstd = output
    ctx.save_for_backward(r, h, mod, weight_next, mod_next, mean, rstd)
    ctx.set_materialize_grads(False)  # an unused r (the last block's) must not cost a zero-filled gradient
    ctx.args = (gate_idx, shift_idx, scale_idx, p, seed, offset, dropout, eps, backend)


def _gated_backward(ctx, dr, dy, g_mean, g_rstd):
    r, h, mod, weight_next, mod_next, mean, rstd = ctx.saved_tensors
    gate_idx, shift_idx, scale_idx, p, seed, offset, dropout, eps, backend = ctx.args
    if weight_next is None:
        dy = None
    dres, dh, dmod, dw, dmodn = torch.ops.mdlm.gated_residual_modulate_backward(
        dr, dy, r, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, mean, rstd, p, seed, offset,
        dropout, eps, backend)
    return (dres, dh, dmod, None, dw if weight_next is not None else None,
            dmodn if mod_next is not None else None) + (None,) * 9


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def _fail(op, msg, exc=ValueError):
    raise exc(f"{op}: {msg}")


def _check_tensor(op, name, t, ndim=None):
    if not torch.is_tensor(t):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.dtype not in _REF_DTYPES:
        _fail(op, f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16 "
                  f"(float64 with the reference backend only)", TypeError)
    if ndim is not None and t.dim() != ndim:
        _fail(op, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_mod(op, name, mod, B, d, idxs):
    _check_tensor(op, name, mod, 2)
    if mod.shape[0] != B:
        _fail(op, f"{name} batch size {mod.shape[0]} != the activations' batch size {B} (conditioning batch "
                  f"mismatch: {name} must be (B, k*d) = ({B}, k*{d}))")
    if mod.shape[1] == 0 or mod.shape[1] % d:
        _fail(op, f"{name} width {mod.shape[1]} is not a positive multiple of the hidden size {d}")
    k = mod.shape[1] // d
    for iname, i in idxs:
        if isinstance(i, bool) or not isinstance(i, int):
            _fail(op, f"{iname} must be an int, got {type(i).__name__}", TypeError)
        if not 0 <= i < k:
            _fail(op, f"{iname}={i} out of range: {name} holds k={k} slices of width {d} (index in [0, {k}))",
                  IndexError)


def _check_weight(op, name, w, d):
    _check_tensor(op, name, w, 1)
    if w.shape[0] != d:
        _fail(op, f"{name} has {w.shape[0]} entries but the hidden size is {d} (wrong hidden size)")


def _check_devices(op, **ts):
    devs = {n: t.device for n, t in ts.items() if t is not None}
    if len(set(devs.values())) > 1:
        _fail(op, "all tensors must be on one device, got " + ", ".join(f"{n} on {v}" for n, v in devs.items()))


def _rows_contig(mod):
    """mod with unit column stride (the kernels take its row stride)."""
    return mod if mod.stride(-1) == 1 else mod.contiguous()


def _resolve_out_dtype(op, out_dtype, device):
    if out_dtype is None:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32
    if out_dtype not in _REF_DTYPES:
        _fail(op, f"out_dtype must be one of float32, bfloat16, float16, got {out_dtype}", TypeError)
    return out_dtype


def adaln_modulate(x: torch.Tensor, weight: torch.Tensor, mod: torch.Tensor, shift_idx: int = 0,
                   scale_idx: int = 1, out_dtype: Optional[torch.dtype] = None, *, eps: float = EPS,
                   backend: Optional[str] = None) -> torch.Tensor:
    """y = LayerNorm(x) * weight * (1 + scale[b]) + shift[b]: ``modulate(norm(x), shift, scale)`` of mdlm.nn.

    x (B, L, d); weight (d,) (the fp32 ``LayerNorm.weight``); mod (B, k*d), the adaLN output (k = 6 in a
    block, 2 in the final layer); shift = mod[:, shift_idx*d:(shift_idx+1)*d], likewise scale (read in place).
    Returns y (B, L, d) in ``out_dtype`` (default: the autocast dtype when autocast is on for x's device,
    else float32, which is the published y). Differentiable w.r.t. x, weight and mod (dmod is zero outside
    the two slices). Statistics and reductions in fp32. Non-contiguous x is copied.
    """
    op = OP_MOD
    _check_tensor(op, "x", x, 3)
    B, L, d = x.shape
    if d == 0:
        _fail(op, "hidden size d must be > 0")
    _check_weight(op, "weight", weight, d)
    _check_mod(op, "mod", mod, B, d, [("shift_idx", shift_idx), ("scale_idx", scale_idx)])
    _check_devices(op, x=x, weight=weight, mod=mod)
    if shift_idx == scale_idx:
        _fail(op, f"shift_idx and scale_idx must differ, got {shift_idx} for both")
    out_dtype = _resolve_out_dtype(op, out_dtype, x.device)
    if backend is not None:
        _backend.normalize(backend)
    y, _, _ = torch.ops.mdlm.adaln_modulate(x.contiguous(), weight.contiguous(), _rows_contig(mod), int(shift_idx),
                                            int(scale_idx), out_dtype, float(eps), backend)
    return y


def gated_residual_modulate(residual: torch.Tensor, h: torch.Tensor, mod: torch.Tensor, gate_idx: int,
                            weight_next: Optional[torch.Tensor] = None, shift_idx: int = 3, scale_idx: int = 4,
                            p: float = 0.0, seed: Optional[int] = None, offset: int = 0, training: bool = True,
                            out_dtype: Optional[torch.dtype] = None, *, mod_next: Optional[torch.Tensor] = None,
                            eps: float = EPS, backend: Optional[str] = None):
    """r = residual + gate[b] * dropout(h) and, in the same pass, y = LN(r) * weight_next * (1 + scale[b]) + shift[b].

    residual (B, L, d) (the fp32 residual stream), h (B, L, d) (attn_out / MLP output), mod (B, k*d): gate =
    mod[:, gate_idx*d:(gate_idx+1)*d]. The next norm's shift/scale are slices ``shift_idx``/``scale_idx`` of
    ``mod_next`` (default: ``mod``, i.e. norm2 inside a block with 3/4); pass the next block's (or the final
    layer's) adaLN output as ``mod_next`` to fuse across blocks. ``weight_next=None``: r only (y is None).

    Dropout: active iff ``training and p > 0``; keep iff uniform24(word col % 4 of Philox(seed, (col // 4, row,
    offset))) >= p (one Philox block per 4 columns; see the module docstring), kept values times 1/(1-p).
    ``seed``/``offset``: ints in [0, 2^64); seed=None draws one from torch's default CPU generator (pass it
    explicitly under torch.compile). Each dropout site of a step needs its own (seed, offset) pair. Returns
    (r (B, L, d) in residual's dtype, y (B, L, d) in ``out_dtype`` or None); out_dtype defaults as in
    :func:`adaln_modulate`. Differentiable w.r.t. residual, h, mod, weight_next, mod_next; the backward
    regenerates the dropout mask.
    """
    op = OP_RES
    _check_tensor(op, "residual", residual, 3)
    _check_tensor(op, "h", h, 3)
    if h.shape != residual.shape:
        _fail(op, f"h shape {tuple(h.shape)} != residual shape {tuple(residual.shape)}")
    B, L, d = residual.shape
    if d == 0:
        _fail(op, "hidden size d must be > 0")
    _check_mod(op, "mod", mod, B, d, [("gate_idx", gate_idx)])
    if weight_next is not None:
        _check_weight(op, "weight_next", weight_next, d)
        modn = mod if mod_next is None else mod_next
        _check_mod(op, "mod_next" if mod_next is not None else "mod", modn, B, d,
                   [("shift_idx", shift_idx), ("scale_idx", scale_idx)])
        if shift_idx == scale_idx:
            _fail(op, f"shift_idx and scale_idx must differ, got {shift_idx} for both")
    else:
        mod_next = None
    _check_devices(op, residual=residual, h=h, mod=mod, weight_next=weight_next, mod_next=mod_next)
    if B * L >= 2 ** 32:
        _fail(op, f"B*L = {B * L} rows exceed the 32-bit Philox row counter")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        _fail(op, f"dropout probability p must be in [0, 1], got {p}")
    dropout = bool(training) and p > 0.0
    if dropout and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    seed = _check_u64("seed", 0 if seed is None else seed, op)
    offset = _check_u64("offset", offset, op)
    out_dtype = _resolve_out_dtype(op, out_dtype, residual.device)
    if backend is not None:
        _backend.normalize(backend)
    r, y, _, _ = torch.ops.mdlm.gated_residual_modulate(
        residual.contiguous(), h.contiguous(), _rows_contig(mod),
        int(gate_idx), None if weight_next is None else weight_next.contiguous(),
        None if mod_next is None else _rows_contig(mod_next), int(shift_idx), int(scale_idx), p if dropout else 0.0,
        _to_i64(seed), _to_i64(offset), dropout, out_dtype, float(eps), backend)
    return r, (y if weight_next is not None else None)
