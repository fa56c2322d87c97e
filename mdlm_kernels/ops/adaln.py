"""adaLN LayerNorm + modulate: ``y = LN(x) * w * (1 + scale[b]) + shift[b]`` in one memory-bound pass.

The first memory-bound pass of a published ``DDiTBlock`` (``mdlm.nn``: ``modulate(norm1(x), shift, scale)``);
the others, a gated residual fused with the next norm, are :mod:`mdlm_kernels.ops.gated_residual`.

LN is ``F.layer_norm(x.float(), [d])`` (eps 1e-5, no affine) times the fp32 weight, as ``mdlm.nn.LayerNorm``;
``shift``/``scale`` are d-wide column slices of the adaLN output ``mod`` (B, k*d) (k = 6 in a block, 2 in the
final layer), read in place at column offset ``idx * d``: no ``chunk`` copies.

Rounding follows the published dtype flow exactly (so a bf16 run equals the published one up to fp32
summation order): ``1 + scale`` is rounded to mod's dtype; the published y is fp32 and is cast by the next
Linear, so the kernel writes y directly in ``out_dtype``.

Backward (numbered derivation, per row; g = dL/dy, n = xhat * w, s1 = 1 + scale, xhat = (x - mean) * rstd):
  (1) dshift[b] = sum_l g                                   (fp32 reduction over the sequence)
  (2) dscale[b] = sum_l g * n = w * sum_l g * xhat         (d(1+scale)/dscale = 1; the rounding of 1 + scale
                                                            is ignored)
  (3) dn        = g * s1
  (4) dw        = sum_{b,l} dn * xhat = sum_b s1[b] * sum_l g * xhat          (fp32 reduction over all rows)
  (5) dxhat     = dn * w = g * (w * s1)
  (6) dx        = rstd * (dxhat - mean_j(dxhat) - xhat * mean_j(dxhat * xhat))
      (from xhat_j = (x_j - mu) rstd: dxhat_i/dx_j = rstd (delta_ij - 1/d - xhat_i xhat_j / d))
s1 is constant over a batch row, so (2) and (4) share one per-column sum: each backward program (one batch
row b, one sequence chunk) accumulates two fp32 partial sums per column, G = sum g and GX = sum g * xhat, into
its own slot of a (B, n_chunks, 2, d) buffer; the host sums the chunks and forms dshift = G, dscale = w * GX
and dw = sum_b s1[b] * GX[b] (deterministic, no atomics).

Kernels and memory traffic per row of d columns (bf16 flow: x fp32, mod / y / dL/dy bf16), with the tiling of
:mod:`._adaln_common` (d = 768: three 256-column blocks, no idle lane, 2-warp programs):
  forward:  one program per row tile (2 rows when y is bf16, else 1). Reads x (4d B) once: its column blocks
            stay in registers for the mean, the centred variance (one reduction each over the row) and y;
            writes y (2d B) and mean / rstd (8 B). shift and 1 + scale: 2 x 2d B per row from the (B, k*d)
            mod, which stays in L2; w (4d B) from L1.
  backward: one program per (batch row, sequence chunk), looping over the chunk's rows. First walk over a
            row's column blocks: reads g (2d B) and x (4d B) from DRAM, keeps xhat and dxhat of every block in
            registers, sums dxhat * xhat and dxhat elementwise over the blocks (one reduction over the row, one
            exchange between the two warps), adds g and g * xhat to the column sums G, GX (registers, no
            exchange between threads in the loop); second walk: dx (4d B) from the registers, nothing re-read.
            DRAM: 10d + 8 B per row, plus each program's partial sums (2 x d x 4 B, written once and read once by
            the host's sum; at the published shape on an H100: 1536 programs, 9.4 MB, 1.9% of the kernel's
            503 MB). w and 1 + scale: 6d B per row from L1.

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

if HAS_TRITON:
    from ._adaln_common import _bcast_load, _cast, _col_block, _ln_bwd_walk, _ln_stats

OP = "adaln_modulate"
_KINDS = 2     # per-column partial sums of the backward: G = sum g, GX = sum g * xhat

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _adaln_fwd_kernel(
        x_ptr,       # (N, d) rows of x (N = B*L), fp32/bf16/fp16, contiguous
        w_ptr,       # (d,) LayerNorm weight
        mod_ptr,     # (B, k*d) adaLN modulation, unit column stride, row stride mod_stride
        y_ptr,       # (N, d) out, out_dtype
        mean_ptr,    # (N,) fp32 out: row mean of x
        rstd_ptr,    # (N,) fp32 out: 1 / sqrt(var + eps)
        N, L, d, mod_stride, shift_off, scale_off, eps,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DB: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        """One row tile (BLOCK_R rows, all NUM_DB column blocks) per program."""
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < N
        xs = ()                                      # the row tile, one [BLOCK_R, BLOCK_D] fp32 block per j
        for j in tl.static_range(NUM_DB):
            cols, cmask = _col_block(j, d, BLOCK_D, EVEN_D)
            m2 = rmask[:, None] & cmask[None, :]
            xs = xs + (tl.load(x_ptr + rows[:, None] * d + cols[None, :], mask=m2, other=0.0).to(tl.float32),)
        mean, rstd = _ln_stats(xs, d, eps, BLOCK_D, NUM_DB, EVEN_D)
        moff = (rows // L)[:, None] * mod_stride     # batch row of each token row
        for j in tl.static_range(NUM_DB):
            cols, cmask = _col_block(j, d, BLOCK_D, EVEN_D)
            m2 = rmask[:, None] & cmask[None, :]
            w = _bcast_load(w_ptr, cols, cmask, BLOCK_R)
            sh = tl.load(mod_ptr + moff + shift_off + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            sc = tl.load(mod_ptr + moff + scale_off + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            s1 = _cast(1.0 + sc, mod_ptr.dtype.element_ty).to(tl.float32)  # 1 + scale in mod's dtype
            xc = tl.where(cmask[None, :], xs[j] - mean[:, None], 0.0)
            n = (xc * rstd[:, None]) * w              # LayerNorm(x) * weight (fp32)
            y = n * s1 + sh                          # modulate
            tl.store(y_ptr + rows[:, None] * d + cols[None, :], _cast(y, y_ptr.dtype.element_ty), mask=m2)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit(do_not_specialize=["rows_per_chunk"])   # one binary whatever the chunk length
    def _adaln_bwd_kernel(
        gy_ptr,      # (N, d) dL/dy
        x_ptr,       # (N, d) forward input
        w_ptr,       # (d,) LayerNorm weight
        mod_ptr,     # (B, k*d) modulation, row stride mod_stride
        mean_ptr,    # (N,) fp32 saved mean
        rstd_ptr,    # (N,) fp32 saved rstd
        dx_ptr,      # (N, d) out, x's dtype
        part_ptr,    # (B, n_chunks, 2, d) fp32 out: this program's column sums G = sum g, GX = sum g * xhat
        L, d, mod_stride, scale_off, rows_per_chunk,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DB: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        """Program (b, c): rows [c * rows_per_chunk, (c + 1) * rows_per_chunk) of batch row b, BLOCK_R at a time.
        The column sums accumulate elementwise per column block ([BLOCK_R, BLOCK_D] each: no exchange between
        threads inside the loop) and are reduced over the tile rows once, at the end."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        n_chunks = tl.num_programs(1)
        sc_ptr = mod_ptr + b * mod_stride + scale_off
        acc_g = (tl.zeros([BLOCK_R, BLOCK_D], tl.float32),) * NUM_DB
        acc_gx = (tl.zeros([BLOCK_R, BLOCK_D], tl.float32),) * NUM_DB
        for r0 in range(0, rows_per_chunk, BLOCK_R):
            ls = c * rows_per_chunk + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = ls < L
            rows = b * L + ls
            # first walk (DRAM reads): row sums of (6), the column partial sums (1), (2), (4); xhat / dxhat kept
            xs, dxs, c1, c2, rstd, acc_g, acc_gx = _ln_bwd_walk(gy_ptr, x_ptr, w_ptr, sc_ptr, mean_ptr, rstd_ptr,
                                                                rows, rmask, d, acc_g, acc_gx,
                                                                BLOCK_R, BLOCK_D, NUM_DB, EVEN_D)
            # second walk (registers only): dx
            for j in tl.static_range(NUM_DB):
                cols, cmask = _col_block(j, d, BLOCK_D, EVEN_D)
                m2 = rmask[:, None] & cmask[None, :]
                offs = rows[:, None] * d + cols[None, :]
                dx = (dxs[j] - (xs[j] * c1[:, None] + c2[:, None])) * rstd[:, None]   # (6)
                tl.store(dx_ptr + offs, _cast(dx, dx_ptr.dtype.element_ty), mask=m2)
        base = part_ptr + (b * n_chunks + c) * 2 * d
        for j in tl.static_range(NUM_DB):
            cols, cmask = _col_block(j, d, BLOCK_D, EVEN_D)
            tl.store(base + cols, tl.sum(acc_g[j], 0), mask=cmask)
            tl.store(base + d + cols, tl.sum(acc_gx[j], 0), mask=cmask)


# ---------------------------------------------------------------------------------------------
# Host launchers (Triton)
# ---------------------------------------------------------------------------------------------
def _adaln_fwd_triton(x, weight, mod, shift_idx, scale_idx, out_dtype, eps):
    B, L, d = x.shape
    N = B * L
    y = torch.empty((B, L, d), dtype=out_dtype, device=x.device)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, mean, rstd
    t = C.tiling(d, C.gpu_for(x.device), y.element_size())
    _launch.launch(_launch.Plan(
        "adaln_modulate.fwd", _adaln_fwd_kernel, (triton.cdiv(N, t.block_r),),
        (x, weight, mod, y, mean, rstd, N, L, d, mod.stride(0), shift_idx * d, scale_idx * d, eps),
        t.constexprs(), num_warps=t.num_warps, vector_io=("ld", "st")), x.device)
    return y, mean, rstd


def _adaln_bwd_triton(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx, eps):
    B, L, d = x.shape
    dx = torch.empty_like(x)
    dmod = torch.zeros(mod.shape, dtype=mod.dtype, device=mod.device)
    if B * L == 0:
        return dx, torch.zeros_like(weight), dmod
    gpu = C.gpu_for(x.device)
    t = C.tiling(d, gpu, C.BWD_STORE_BYTES)
    bps = C.blocks_per_sm("adaln", gpu, t, C.tile_flow(gy, x, dx)) if gpu is not None else 1
    nc, rows = C.bwd_grid(B, L, t.block_r, gpu.sm_count * bps if gpu is not None else None)
    part = torch.empty((B, nc, _KINDS, d), dtype=torch.float32, device=x.device)
    _launch.launch(_launch.Plan(
        "adaln_modulate.bwd", _adaln_bwd_kernel, (B, nc),
        (gy, x, weight, mod, mean, rstd, dx, part, L, d, mod.stride(0), scale_idx * d, rows),
        t.constexprs(), num_warps=t.num_warps, blocks_per_sm=bps, vector_io=("ld", "st")), x.device)
    s = part.sum(1)                                  # (B, 2, d) fp32: G, GX per batch row
    gx = s[:, 1]
    dw = (gx * C.one_plus_scale(mod, scale_idx, d)).sum(0).to(weight.dtype)        # (4)
    dmod[:, shift_idx * d:(shift_idx + 1) * d] += s[:, 0].to(mod.dtype)             # (1)
    dmod[:, scale_idx * d:(scale_idx + 1) * d] += (gx * weight.float()).to(mod.dtype)   # (2)
    return dx, dw, dmod


# ---------------------------------------------------------------------------------------------
# Reference (plain PyTorch): the mdlm.nn spec op for op; backward written out (steps (1)-(6))
# ---------------------------------------------------------------------------------------------
def _adaln_fwd_reference(x, weight, mod, shift_idx, scale_idx, out_dtype, eps):
    return C.ln_modulate_reference(x, weight, mod, shift_idx, scale_idx, out_dtype, eps)


def _adaln_bwd_reference(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx, eps):
    d = x.shape[-1]
    dt = C.cdt(x, weight, mod, gy)
    dx, dw, dsh, dsc = C.ln_modulate_bwd_reference(gy, x, weight, mod, shift_idx, scale_idx, eps, dt, mean, rstd)
    dmod = torch.zeros(mod.shape, dtype=dt, device=mod.device)
    dmod[:, shift_idx * d:(shift_idx + 1) * d] += dsh
    dmod[:, scale_idx * d:(scale_idx + 1) * d] += dsc
    return dx.to(x.dtype), dw.to(weight.dtype), dmod.to(mod.dtype)


# ---------------------------------------------------------------------------------------------
# torch.library registration + autograd
# ---------------------------------------------------------------------------------------------
def _check_fwd(x, weight, mod, shift_idx, scale_idx, out_dtype, eps) -> None:
    """The forward's inputs, from metadata only: shared by the public function, the op body and its fake."""
    C.check_tensor(OP, "x", x, 3)
    B, L, d = x.shape
    if d == 0:
        C.fail(OP, "x: hidden size d must be > 0")
    C.check_weight(OP, "weight", weight, d)
    C.check_mod(OP, "mod", mod, B, d, [("shift_idx", shift_idx), ("scale_idx", scale_idx)])
    C.check_devices(OP, x=x, weight=weight, mod=mod)
    if shift_idx == scale_idx:
        C.fail(OP, f"shift_idx and scale_idx must differ, got {shift_idx} for both")
    if out_dtype is not None:
        C.check_out_dtype(OP, out_dtype)
    C.check_eps(OP, eps)


def _check_bwd(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx, eps) -> None:
    _check_fwd(x, weight, mod, shift_idx, scale_idx, None, eps)
    C.check_tensor(OP, "gy", gy, 3)
    if gy.shape != x.shape:
        C.fail(OP, f"gy (dL/dy) has shape {tuple(gy.shape)} but x has {tuple(x.shape)}")
    n = x.shape[0] * x.shape[1]
    C.check_stats(OP, "mean", mean, n)
    C.check_stats(OP, "rstd", rstd, n)
    C.check_devices(OP, gy=gy, x=x, mean=mean, rstd=rstd)


@torch.library.custom_op("mdlm::adaln_modulate", mutates_args=())
def _adaln_op(x: torch.Tensor, weight: torch.Tensor, mod: torch.Tensor, shift_idx: int, scale_idx: int,
              out_dtype: torch.dtype, eps: float, backend: Optional[str] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd). Checked here (metadata only) before any pointer reaches a kernel; x and weight of any
    strides (made contiguous here), mod of any strides (unit column stride made here)."""
    _check_fwd(x, weight, mod, shift_idx, scale_idx, out_dtype, eps)
    x, weight, mod = x.contiguous(), weight.contiguous(), C.rows_contig(mod)   # the kernels index dense rows
    name = _backend.resolve(OP, backend, x.device, {"triton": C.triton_supported(x, weight, mod, x.new_empty(
        0, dtype=out_dtype)), "reference": None})
    impl = _adaln_fwd_triton if name == "triton" else _adaln_fwd_reference
    return impl(x, weight, mod, shift_idx, scale_idx, out_dtype, eps)


@_adaln_op.register_fake
def _(x, weight, mod, shift_idx, scale_idx, out_dtype, eps, backend=None):
    _check_fwd(x, weight, mod, shift_idx, scale_idx, out_dtype, eps)
    B, L, d = x.shape
    return (x.new_empty((B, L, d), dtype=out_dtype), x.new_empty((B * L,), dtype=torch.float32),
            x.new_empty((B * L,), dtype=torch.float32))


@torch.library.custom_op("mdlm::adaln_modulate_backward", mutates_args=())
def _adaln_bwd_op(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mod: torch.Tensor, mean: torch.Tensor,
                  rstd: torch.Tensor, shift_idx: int, scale_idx: int, eps: float, backend: Optional[str] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dmod) from dL/dy and the forward's inputs and saved statistics (checked here)."""
    _check_bwd(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx, eps)
    gy, x, weight, mean, rstd = (t.contiguous() for t in (gy, x, weight, mean, rstd))
    mod = C.rows_contig(mod)
    name = _backend.resolve(OP + "_backward", backend, x.device,
                            {"triton": C.triton_supported(gy, x, weight, mod), "reference": None})
    impl = _adaln_bwd_triton if name == "triton" else _adaln_bwd_reference
    return impl(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx, eps)


@_adaln_bwd_op.register_fake
def _(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx, eps, backend=None):
    _check_bwd(gy, x, weight, mod, mean, rstd, shift_idx, scale_idx, eps)
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


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
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
    _check_fwd(x, weight, mod, shift_idx, scale_idx, out_dtype, eps)
    out_dtype = C.resolve_out_dtype(OP, out_dtype, x.device)
    _checks.backend_arg(OP, backend)
    y, _, _ = torch.ops.mdlm.adaln_modulate(x.contiguous(), weight.contiguous(), C.rows_contig(mod),
                                            int(shift_idx), int(scale_idx), out_dtype, float(eps), backend)
    return y
