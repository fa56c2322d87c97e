"""Gated residual with dropout from Philox, fused with the next adaLN norm, in one memory-bound pass:

    r = residual + gate[b] * dropout(h)
    y = LN(r) * w_next * (1 + scale_next[b]) + shift_next[b]        (optional: weight_next given)

The second and third memory-bound passes of a published ``DDiTBlock`` (``mdlm.nn.bias_dropout_add_scale``
followed by the next ``modulate(norm(.))``: norm2 inside a block, the next block's norm1, or the final layer's
norm); the first is :mod:`mdlm_kernels.ops.adaln`. ``gate`` / ``shift`` / ``scale`` are d-wide column slices of
the adaLN outputs ``mod`` / ``mod_next`` (B, k*d), read in place; LN as in :mod:`.adaln`.

Rounding follows the published dtype flow exactly: ``dropout(h)`` is rounded to h's dtype, ``gate *
dropout(h)`` to ``promote(gate, h)``; r = residual + that, computed in fp32, stored in the residual's dtype
(fp32 in the published model: the embedding is fp32); the norm reads r as stored; ``1 + scale`` is rounded to
mod_next's dtype and y is written in ``out_dtype``.

Dropout: element (row = b*L + l, col = j) is kept iff uniform24(w_{j % 4}) >= p, where (w0, w1, w2, w3) =
Philox4x32-10(key = seed, ctr = (j // 4, row, offset_lo, offset_hi)): one Philox block serves 4 consecutive
columns (uniform24 as in :mod:`mdlm_kernels.ops.philox`; the mask is therefore not
``philox_uniform(B*L, d) >= p``, which keys ctr = (j, row, ...) and uses word 0 only). Kept values
are scaled by 1/(1-p) (F.dropout semantics). No mask is stored: the backward regenerates it. With
``p == 0`` or ``training=False`` the kernel is compiled without the dropout code (exactly the eval path).

Backward, with dr = dL/dr from the later use of r, g = dL/dy and dx_y = steps (1)-(6) of :mod:`.adaln` applied
to the norm of r (its column sums G = sum g, GX = sum g * rhat give dshift_next, dscale_next, dw_next):
  (7) dr_total  = dr + dx_y;   dresidual = dr_total
  (8) dgate[b]  = sum_l dr_total * dropout(h)
  (9) dh        = dr_total * gate * keep / (1 - p)
Each backward program (one batch row b, one sequence chunk) writes its fp32 column sums (DG = (8), G, GX) to
its own slot of a (B, n_chunks, 3, d) buffer, summed on the host (deterministic, no atomics).

Kernels and memory traffic per row of d columns (bf16 flow: residual / r / dr / dresidual fp32; h, mod, y,
dL/dy, dh bf16), with the tiling of :mod:`._adaln_common` (d = 768: three 256-column blocks, 1-row tiles,
2-warp programs; the fp32 stores set 4 elements per thread, so bf16 tiles move 8 bytes per thread):
  forward:  one program per row. Reads residual (4d B) and h (2d B), writes r (4d B); r stays in registers
            (one fp32 block per column block) for the norm; writes y (2d B) and mean / rstd (8 B). gate,
            shift, 1 + scale: 3 x 2d B per row from L2 (the (B, k*d) tensors), w from L1. One Philox4x32-10
            per 4 columns.
  backward: one program per (batch row, sequence chunk), looping over its rows. First walk over a row's
            column blocks: reads dL/dy (2d B) and r (4d B) from DRAM, keeps rhat and dxhat of every block in
            registers, the row sums c1, c2 (one reduction over the row) and the column sums G, GX; second
            walk: reads dr (4d B) and h (2d B), regenerates the mask, writes dresidual (4d B) and dh (2d B),
            adds dr_total * dropout(h) to DG. DRAM: 18d + 8 B per row, plus each program's partial sums
            (3 x d x 4 B, written once and read once by the host's sum; at the published shape on an H100:
            1024 programs, 9.4 MB, 1.0% of the kernel's 906 MB).

Gradients of ``mod`` are returned as a full (B, k*d) tensor in mod's dtype, zero outside the slices the op
read (autograd sums the three per-block contributions; they are B x 6d, negligible).

Backends: "triton" (fp32/bf16/fp16) and "reference" (plain PyTorch; also float64, used by gradcheck).
Non-contiguous inputs are copied to contiguous ones (one extra copy); ``mod`` only needs unit column stride
and is passed with its row stride.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend as _backend
from .. import launch as _launch
from .._triton import HAS_TRITON, tl, triton
from . import _adaln_common as C
from . import _checks
from ._adaln_common import EPS
from .adaln import _adaln_fwd_reference
from .philox import _check_u64, _to_i64

if HAS_TRITON:
    from ._adaln_common import (_bcast_load, _cast, _col_block, _keep_mask, _ln_bwd_walk, _ln_stats, _round_to,
                                _tuple_add)

OP = "gated_residual_modulate"

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

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
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DB: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        """One row tile (BLOCK_R rows, all NUM_DB column blocks) per program; r stays in registers for the
        norm."""
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < N
        bidx = (rows // L)[:, None]                  # batch row of each token row
        rs = ()                                      # r of the row tile, one fp32 block per j (HAS_NORM)
        for j in tl.static_range(NUM_DB):
            cols, cmask = _col_block(j, d, BLOCK_D, EVEN_D)
            m2 = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * d + cols[None, :]
            res = tl.load(res_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            hv = tl.load(h_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            gate = tl.load(mod_ptr + bidx * mod_stride + gate_off + cols[None, :], mask=m2, other=0.0
                           ).to(tl.float32)
            if DROPOUT:
                keep = _keep_mask(rows, j * BLOCK_D, seed, off_lo, off_hi, p, BLOCK_D)
                hv = _cast(tl.where(keep, hv * drop_scale, 0.0), h_ptr.dtype.element_ty).to(tl.float32)
            t = _round_to(gate * hv, PROD_CODE)
            r = _cast(res + t, r_ptr.dtype.element_ty)
            tl.store(r_ptr + offs, r, mask=m2)
            if HAS_NORM:
                rs = rs + (tl.where(m2, r.to(tl.float32), 0.0),)
        if HAS_NORM:
            mean, rstd = _ln_stats(rs, d, eps, BLOCK_D, NUM_DB, EVEN_D)
            moff = bidx * modn_stride
            for j in tl.static_range(NUM_DB):
                cols, cmask = _col_block(j, d, BLOCK_D, EVEN_D)
                m2 = rmask[:, None] & cmask[None, :]
                w = _bcast_load(w_ptr, cols, cmask, BLOCK_R)
                sh = tl.load(modn_ptr + moff + shift_off + cols[None, :], mask=m2, other=0.0).to(tl.float32)
                sc = tl.load(modn_ptr + moff + scale_off + cols[None, :], mask=m2, other=0.0).to(tl.float32)
                s1 = _cast(1.0 + sc, modn_ptr.dtype.element_ty).to(tl.float32)
                xc = tl.where(cmask[None, :], rs[j] - mean[:, None], 0.0)
                y = ((xc * rstd[:, None]) * w) * s1 + sh
                tl.store(y_ptr + rows[:, None] * d + cols[None, :], _cast(y, y_ptr.dtype.element_ty), mask=m2)
            tl.store(mean_ptr + rows, mean, mask=rmask)
            tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit(do_not_specialize=["seed", "off_lo", "off_hi", "rows_per_chunk"])
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
        part_ptr,    # (B, n_chunks, 3 if HAS_DY else 1, d) fp32 out: column sums DG, G, GX of this program
        L, d, mod_stride, gate_off, modn_stride, scale_off, rows_per_chunk,
        seed, off_lo, off_hi, p, drop_scale,
        DROPOUT: tl.constexpr, HAS_DR: tl.constexpr, HAS_DY: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DB: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        """Program (b, c): rows [c * rows_per_chunk, (c + 1) * rows_per_chunk) of batch row b, BLOCK_R at a time;
        column sums accumulate elementwise per column block (no exchange between threads inside the loop) and
        are reduced over the tile rows once, at the end."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        n_chunks = tl.num_programs(1)
        gate_ptr = mod_ptr + b * mod_stride + gate_off
        sc_ptr = modn_ptr + b * modn_stride + scale_off
        acc_dg = (tl.zeros([BLOCK_R, BLOCK_D], tl.float32),) * NUM_DB
        if HAS_DY:
            acc_g = (tl.zeros([BLOCK_R, BLOCK_D], tl.float32),) * NUM_DB
            acc_gx = (tl.zeros([BLOCK_R, BLOCK_D], tl.float32),) * NUM_DB
        for r0 in range(0, rows_per_chunk, BLOCK_R):
            ls = c * rows_per_chunk + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = ls < L
            rows = b * L + ls
            if HAS_DY:
                # first walk (DRAM reads): row sums of (6) for the norm of r, its column sums; rhat, dxhat kept
                xs, dxs, c1, c2, rstd, acc_g, acc_gx = _ln_bwd_walk(dy_ptr, r_ptr, w_ptr, sc_ptr, mean_ptr, rstd_ptr,
                                                                    rows, rmask, d, acc_g, acc_gx,
                                                                    BLOCK_R, BLOCK_D, NUM_DB, EVEN_D)
            # second walk: dr_total (registers + dr), dresidual, dh, dgate
            for j in tl.static_range(NUM_DB):
                cols, cmask = _col_block(j, d, BLOCK_D, EVEN_D)
                m2 = rmask[:, None] & cmask[None, :]
                offs = rows[:, None] * d + cols[None, :]
                drt = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
                if HAS_DR:
                    drt += tl.load(dr_ptr + offs, mask=m2, other=0.0).to(tl.float32)
                if HAS_DY:
                    drt += (dxs[j] - (xs[j] * c1[:, None] + c2[:, None])) * rstd[:, None]   # (6), (7)
                tl.store(dres_ptr + offs, _cast(drt, dres_ptr.dtype.element_ty), mask=m2)
                hv = tl.load(h_ptr + offs, mask=m2, other=0.0).to(tl.float32)
                dh = drt * _bcast_load(gate_ptr, cols, cmask, BLOCK_R)
                if DROPOUT:
                    keep = _keep_mask(rows, j * BLOCK_D, seed, off_lo, off_hi, p, BLOCK_D)
                    hv = _cast(tl.where(keep, hv * drop_scale, 0.0), h_ptr.dtype.element_ty).to(tl.float32)
                    dh = tl.where(keep, dh * drop_scale, 0.0)                  # (9)
                acc_dg = _tuple_add(acc_dg, j, drt * hv)                       # (8)
                tl.store(dh_ptr + offs, _cast(dh, dh_ptr.dtype.element_ty), mask=m2)
        base = part_ptr + (b * n_chunks + c) * (3 if HAS_DY else 1) * d
        for j in tl.static_range(NUM_DB):
            cols, cmask = _col_block(j, d, BLOCK_D, EVEN_D)
            tl.store(base + cols, tl.sum(acc_dg[j], 0), mask=cmask)
            if HAS_DY:
                tl.store(base + d + cols, tl.sum(acc_g[j], 0), mask=cmask)
                tl.store(base + 2 * d + cols, tl.sum(acc_gx[j], 0), mask=cmask)


# ---------------------------------------------------------------------------------------------
# Host launchers (Triton)
# ---------------------------------------------------------------------------------------------
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
    t = C.tiling(d, C.gpu_for(residual.device), max(r.element_size(), y.element_size()))
    s, olo, ohi = C.seed_words(seed, offset)
    prod = C.ROUND_CODE[torch.promote_types(mod.dtype, h.dtype)]
    _launch.launch(_launch.Plan(
        "gated_residual_modulate.fwd", _gated_fwd_kernel, (triton.cdiv(N, t.block_r),),
        (residual, h, mod, modn, weight if has_norm else residual, r, y if has_norm else r,
         mean if has_norm else r, rstd if has_norm else r,
         N, L, d, mod.stride(0), gate_idx * d, modn.stride(0), shift_idx * d, scale_idx * d, eps,
         s, olo, ohi, float(p), C.drop_scale(p)),
        dict(PROD_CODE=prod, DROPOUT=bool(dropout), HAS_NORM=has_norm, **t.constexprs()),
        num_warps=t.num_warps, vector_io=("ld", "st")), residual.device)
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
        gpu = C.gpu_for(r.device)
        t = C.tiling(d, gpu, C.BWD_STORE_BYTES)
        flow = C.tile_flow(dr, dy if has_dy else None, r, h)
        bps = C.blocks_per_sm("gated", gpu, t, flow, dr is not None) if gpu is not None else 1
        nc, rows = C.bwd_grid(B, L, t.block_r, gpu.sm_count * bps if gpu is not None else None)
        part = torch.empty((B, nc, 3 if has_dy else 1, d), dtype=torch.float32, device=r.device)
        s, olo, ohi = C.seed_words(seed, offset)
        _launch.launch(_launch.Plan(
            "gated_residual_modulate.bwd", _gated_bwd_kernel, (B, nc),
            (dr if dr is not None else r, dy if has_dy else r, r, h, mod, modn,
             weight if weight is not None else r, mean if has_dy else r, rstd if has_dy else r,
             dres, dh, part, L, d, mod.stride(0), gate_idx * d, modn.stride(0), scale_idx * d, rows,
             s, olo, ohi, float(p), C.drop_scale(p)),
            dict(DROPOUT=bool(dropout), HAS_DR=dr is not None, HAS_DY=has_dy, **t.constexprs()),
            num_warps=t.num_warps, blocks_per_sm=bps, vector_io=("ld", "st")), r.device)
        sums = part.sum(1)                           # (B, kinds, d) fp32: DG (, G, GX) per batch row
        dmod[:, gate_idx * d:(gate_idx + 1) * d] += sums[:, 0].to(mod.dtype)                # (8)
        if has_dy:
            gx = sums[:, 2]
            dw = (gx * C.one_plus_scale(modn, scale_idx, d)).sum(0).to(weight.dtype)      # adaln (4)
            tgt = dmod if dmodn is None else dmodn
            tgt[:, shift_idx * d:(shift_idx + 1) * d] += sums[:, 1].to(tgt.dtype)         # adaln (1)
            tgt[:, scale_idx * d:(scale_idx + 1) * d] += (gx * weight.float()).to(tgt.dtype)   # adaln (2)
    return dres, dh, dmod, dw, dmodn


# ---------------------------------------------------------------------------------------------
# Reference (plain PyTorch): the mdlm.nn spec op for op; backward written out (steps (1)-(9))
# ---------------------------------------------------------------------------------------------
def _gated_fwd_reference(residual, h, mod, gate_idx, weight, mod_next, shift_idx, scale_idx, p, seed, offset,
                         dropout, out_dtype, eps):
    B, L, d = residual.shape
    hd = h
    if dropout:
        hd = C.dropout_reference(h, C.keep_reference(B, L, d, p, seed, offset, h.device), p)
    r = (residual + C.mod_slice(mod, gate_idx, d) * hd).to(residual.dtype)   # mdlm.nn.bias_dropout_add_scale
    if weight is None:
        return (r, residual.new_empty(0, dtype=out_dtype), residual.new_empty(0, dtype=torch.float32),
                residual.new_empty(0, dtype=torch.float32))
    y, mean, rstd = _adaln_fwd_reference(r, weight, mod if mod_next is None else mod_next, shift_idx,
                                         scale_idx, out_dtype, eps)
    return r, y, mean, rstd


def _gated_bwd_reference(dr, dy, r, h, mod, gate_idx, weight, mod_next, shift_idx, scale_idx, mean, rstd,
                         p, seed, offset, dropout, eps):
    B, L, d = r.shape
    dt = C.cdt(r, h, mod, mod_next, weight, dr, dy)
    drt = dr.to(dt, copy=True) if dr is not None else torch.zeros(r.shape, dtype=dt, device=r.device)
    dmod = torch.zeros(mod.shape, dtype=dt, device=mod.device)
    dmodn = torch.zeros(mod_next.shape, dtype=dt, device=mod.device) if mod_next is not None else None
    dw = torch.zeros_like(weight) if weight is not None else None
    if dy is not None and weight is not None:
        modn = mod if mod_next is None else mod_next
        dx, dw, dsh, dsc = C.ln_modulate_bwd_reference(dy, r, weight, modn, shift_idx, scale_idx, eps, dt, mean,
                                                       rstd)
        drt = drt + dx                                                          # (7)
        dw = dw.to(weight.dtype)
        tgt = dmod if dmodn is None else dmodn
        tgt[:, shift_idx * d:(shift_idx + 1) * d] += dsh
        tgt[:, scale_idx * d:(scale_idx + 1) * d] += dsc
    gate = C.mod_slice(mod, gate_idx, d).to(dt)
    hd = h
    dh = drt * gate
    if dropout:
        keep = C.keep_reference(B, L, d, p, seed, offset, h.device)
        hd = C.dropout_reference(h, keep, p)
        dh = torch.where(keep, dh * C.drop_scale(p), 0.0)                       # (9)
    dmod[:, gate_idx * d:(gate_idx + 1) * d] += (drt * hd.to(dt)).sum(1)       # (8)
    return (drt.to(r.dtype), dh.to(h.dtype), dmod.to(mod.dtype), dw,
            dmodn.to(mod_next.dtype) if dmodn is not None else None)


# ---------------------------------------------------------------------------------------------
# torch.library registration + autograd
# ---------------------------------------------------------------------------------------------
def _check_fwd(residual, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, p, dropout, out_dtype,
               eps, res: str = "residual") -> None:
    """The forward's inputs, from metadata only: shared by the public function, the op body and its fake (and by
    the backward, whose ``r`` takes the residual's place: ``res`` names it)."""
    C.check_tensor(OP, res, residual, 3)
    C.check_tensor(OP, "h", h, 3)
    if h.shape != residual.shape:
        C.fail(OP, f"h shape {tuple(h.shape)} != {res} shape {tuple(residual.shape)}")
    B, L, d = residual.shape
    if d == 0:
        C.fail(OP, f"{res}: hidden size d must be > 0")
    C.check_mod(OP, "mod", mod, B, d, [("gate_idx", gate_idx)])
    if weight_next is not None:
        C.check_weight(OP, "weight_next", weight_next, d)
        modn = mod if mod_next is None else mod_next
        C.check_mod(OP, "mod_next" if mod_next is not None else "mod", modn, B, d,
                    [("shift_idx", shift_idx), ("scale_idx", scale_idx)])
        if shift_idx == scale_idx:
            C.fail(OP, f"shift_idx and scale_idx must differ, got {shift_idx} for both")
    elif mod_next is not None:
        C.check_mod(OP, "mod_next", mod_next, B, d, [])
    C.check_devices(OP, **{res: residual}, h=h, mod=mod, weight_next=weight_next, mod_next=mod_next)
    if B * L >= 2 ** 32:
        C.fail(OP, f"{res}: B*L = {B * L} rows exceed the 32-bit Philox row counter")
    _checks.float_arg(OP, "p (the dropout probability)", p, 0.0, 1.0)
    _checks.bool_arg(OP, "dropout", dropout)
    if out_dtype is not None:
        C.check_out_dtype(OP, out_dtype)
    C.check_eps(OP, eps)


def _check_bwd(dr, dy, r, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, mean, rstd, p, dropout,
               eps) -> None:
    _check_fwd(r, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, p, dropout, None, eps, res="r")
    for name, g in (("dr", dr), ("dy", dy)):
        if g is not None:
            C.check_tensor(OP, name, g, 3)
            if g.shape != r.shape:
                C.fail(OP, f"{name} has shape {tuple(g.shape)} but r has {tuple(r.shape)}")
    n = r.shape[0] * r.shape[1] if (weight_next is not None and dy is not None) else None
    for name, t in (("mean", mean), ("rstd", rstd)):
        if n is not None:
            C.check_stats(OP, name, t, n)
        else:                                    # not read
            _checks.tensor(OP, name, t, dtypes=(torch.float32,), ndim=1)
    C.check_devices(OP, r=r, dr=dr, dy=dy, mean=mean, rstd=rstd)


def _dense(t):
    return None if t is None else t.contiguous()


@torch.library.custom_op("mdlm::gated_residual_modulate", mutates_args=())
def _gated_op(residual: torch.Tensor, h: torch.Tensor, mod: torch.Tensor, gate_idx: int,
              weight_next: Optional[torch.Tensor], mod_next: Optional[torch.Tensor], shift_idx: int,
              scale_idx: int, p: float, seed: int, offset: int, dropout: bool, out_dtype: torch.dtype,
              eps: float, backend: Optional[str] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r, y, mean, rstd) (y, mean, rstd empty without weight_next). Checked here (metadata only) before any
    pointer reaches a kernel; tensors of any strides (made dense here)."""
    _check_fwd(residual, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, p, dropout, out_dtype, eps)
    residual, h, weight_next = _dense(residual), _dense(h), _dense(weight_next)
    mod = C.rows_contig(mod)
    mod_next = None if mod_next is None else C.rows_contig(mod_next)
    name = _backend.resolve(OP, backend, residual.device, {"triton": C.triton_supported(
        residual, h, mod, weight_next, mod_next, h.new_empty(0, dtype=out_dtype)), "reference": None})
    impl = _gated_fwd_triton if name == "triton" else _gated_fwd_reference
    return impl(residual, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, p, seed, offset,
                dropout, out_dtype, eps)


@_gated_op.register_fake
def _(residual, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, p, seed, offset, dropout,
      out_dtype, eps, backend=None):
    _check_fwd(residual, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, p, dropout, out_dtype, eps)
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
    """(dresidual, dh, dmod, dweight_next, dmod_next) (the last two empty when absent); checked here."""
    _check_bwd(dr, dy, r, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, mean, rstd, p, dropout,
               eps)
    dr, dy, r, h, weight_next, mean, rstd = (_dense(t) for t in (dr, dy, r, h, weight_next, mean, rstd))
    mod = C.rows_contig(mod)
    mod_next = None if mod_next is None else C.rows_contig(mod_next)
    name = _backend.resolve(OP + "_backward", backend, r.device, {"triton": C.triton_supported(
        dr, dy, r, h, mod, weight_next, mod_next), "reference": None})
    impl = _gated_bwd_triton if name == "triton" else _gated_bwd_reference
    dres, dh, dmod, dw, dmodn = impl(dr, dy, r, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, mean,
                                     rstd, p, seed, offset, dropout, eps)
    return (dres, dh, dmod, r.new_empty(0) if dw is None else dw,     # fresh empties: outputs must not alias
            r.new_empty(0) if dmodn is None else dmodn)


@_gated_bwd_op.register_fake
def _(dr, dy, r, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, mean, rstd, p, seed, offset,
      dropout, eps, backend=None):
    _check_bwd(dr, dy, r, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, mean, rstd, p, dropout,
               eps)
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
# Public function
# ---------------------------------------------------------------------------------------------
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
    :func:`mdlm_kernels.adaln_modulate`. Differentiable w.r.t. residual, h, mod, weight_next, mod_next; the
    backward regenerates the dropout mask.
    """
    if weight_next is None:
        mod_next = None                          # no next norm: its modulation is not read
    training = _checks.bool_arg(OP, "training", training)
    p = _checks.float_arg(OP, "p (the dropout probability)", p, 0.0, 1.0)
    _check_fwd(residual, h, mod, gate_idx, weight_next, mod_next, shift_idx, scale_idx, p, training, out_dtype, eps)
    dropout = training and p > 0.0
    if dropout and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    seed = _check_u64("seed", 0 if seed is None else seed, OP)
    offset = _check_u64("offset", offset, OP)
    out_dtype = C.resolve_out_dtype(OP, out_dtype, residual.device)
    _checks.backend_arg(OP, backend)
    r, y, _, _ = torch.ops.mdlm.gated_residual_modulate(
        residual.contiguous(), h.contiguous(), C.rows_contig(mod),
        int(gate_idx), None if weight_next is None else weight_next.contiguous(),
        None if mod_next is None else C.rows_contig(mod_next), int(shift_idx), int(scale_idx),
        p if dropout else 0.0, _to_i64(seed), _to_i64(offset), dropout, out_dtype, float(eps), backend)
    return r, (y if weight_next is not None else None)
