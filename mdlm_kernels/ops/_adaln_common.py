"""Shared pieces of the two adaLN ops (:mod:`.adaln` = ``adaln_modulate``, :mod:`.gated_residual` =
``gated_residual_modulate``): Triton helpers (rounding, the Philox dropout mask, column blocks, LayerNorm
statistics), the tiling and grid sizing of their launchers, input checks, and the PyTorch reference helpers.

Tiling (:func:`tiling`; the same rules for every kernel of both ops)
---------------------------------------------------------------------
A row of d columns is walked as ``NUM_DB`` column blocks of ``BLOCK_D`` columns (a power of two), in tiles of
``BLOCK_R`` rows x ``BLOCK_D`` columns. Each thread holds E = 16 / (bytes of the widest stored tile element)
elements of every tile tensor: one 16-byte vector of what the kernel stores (E = 4 when it stores fp32 tiles,
8 when it stores only bf16 / fp16), so ``BLOCK_R * BLOCK_D = 32 * E * num_warps``; programs have 2 warps up to
d = 1024. ``BLOCK_D`` is the largest power of two dividing d, at most a whole tile row: d = 768 gives three
blocks of 256, no idle lane and no column mask (``EVEN_D``), so full tiles keep 16-byte accesses; with E = 4
a row's block is split over the two warps (``BLOCK_R`` = 1), with E = 8 each warp holds one row (2). If that
power of two is below 32 (d not a multiple of 32: 37, 100, ...), the row is covered by masked blocks of
``min(next_power_of_2(d), tile)`` columns.

Why E follows the stored dtype: Triton gives a global store at most 16 bytes per thread, and all the tensors of
a tile share one register layout only if they hold the same elements per thread; a kernel storing fp32 next
to bf16 tiles therefore reads / writes its bf16 tiles 8 bytes per thread (4 elements; a warp still covers whole
32-byte sectors, only the instruction count doubles). The alternative, 8 elements per thread (tried with 4
warps and 4-row tiles, read with compile_check): a layout conversion through shared memory, with barriers,
before each fp32 store (3 per row tile in the gated backward), and 242-255 registers per thread there (2
resident blocks).

Row statistics (mean / variance forward; c1 = mean(dxhat * xhat), c2 = mean(dxhat) backward) are summed
elementwise over the column blocks first, then reduced once per row tile (one exchange between the warps of
a row). The forward keeps the row tile's blocks in registers between the statistics and y; the backward
keeps xhat and dxhat of every block between its two walks over the row, so DRAM sees each element once and
nothing is re-read.

Backward grids (:func:`bwd_grid`): one program per (batch row, sequence chunk), so the adaLN vectors of a
program are those of one batch row and its per-column partial sums go to its own slot of a fp32 buffer
(B, n_chunks, kinds, d) that the host sums: deterministic, no atomics. The column sums accumulate
elementwise in registers (kinds x NUM_DB x E per thread; no exchange between threads in the row loop) and are
reduced once at the end. The number of chunks is chosen so that the programs fill whole waves of
``sm_count * blocks_per_sm`` resident programs, where ``blocks_per_sm`` is the occupancy the kernel has as
compiled for that arch (:data:`BWD_BLOCKS_PER_SM`; ``python -m mdlm_kernels.compile_check`` asserts it).

The Triton interpreter (CPU tensors) pays per operation, not per register: it uses one masked column block and
tiles of up to 16384 elements, unless a test asks for a GPU's tiling and grid with :func:`plan_for`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .. import launch as _launch
from .._triton import HAS_TRITON, INTERPRETED, tl, triton
from .philox import _M32, _from_i64, _philox_reference, _uniform_from_words

EPS = 1e-5
DTYPES = (torch.float32, torch.bfloat16, torch.float16)        # Triton backend
REF_DTYPES = DTYPES + (torch.float64,)                         # reference backend
ROUND_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 0}

# ---------------------------------------------------------------------------------------------
# Triton helpers
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
    def _keep_mask(rows, COL0: tl.constexpr, seed, off_lo, off_hi, p, BLOCK_D: tl.constexpr):
        """Dropout keep mask [R, BLOCK_D] for rows [R] (int64) x columns COL0 .. COL0 + BLOCK_D - 1 (COL0 a
        multiple of BLOCK_D; BLOCK_D >= 4, a power of 2): one Philox4x32-10 per group of 4 columns, ctr =
        (col // 4, row, off_lo, off_hi); column col keeps iff uniform24(word col % 4) >= p. The 4 words are
        interleaved back into column order."""
        grp = COL0 // 4 + tl.arange(0, BLOCK_D // 4)
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
    def _col_block(J: tl.constexpr, d, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
        """Columns [BLOCK_D] of column block J and their mask: constant true when the blocks tile d exactly
        (EVEN_D), so full tiles carry no column predicate and keep 16-byte accesses."""
        cols = J * BLOCK_D + tl.arange(0, BLOCK_D)
        if EVEN_D:
            cmask = tl.full([BLOCK_D], 1, tl.int1)
        else:
            cmask = cols < d
        return cols, cmask

    @triton.jit
    def _tuple_add(t, J: tl.constexpr, v):
        """The tuple t with t[J] + v in place of t[J] (per-column-block accumulators, J static)."""
        return t[:J] + (t[J] + v,) + t[J + 1:]

    @triton.jit
    def _add2(a0, a1, b0, b1):
        return a0 + b0, a1 + b1

    @triton.jit
    def _row_sums2(a, b):
        """(sum over columns of a, of b) [R] for two [R, BLOCK_D] tiles in one reduction (one exchange between
        warps when a row spans several)."""
        return tl.reduce((a, b), 1, _add2)

    @triton.jit
    def _bcast_load(ptr, cols, cmask, BLOCK_R: tl.constexpr):
        """A per-column vector ptr[cols] as fp32 [BLOCK_R, BLOCK_D] (every row the same), loaded in the tile's
        own layout (no layout conversion through shared memory; the repeated rows hit L1)."""
        ptrs = tl.broadcast_to((ptr + cols)[None, :], [BLOCK_R, cols.shape[0]])
        m = tl.broadcast_to(cmask[None, :], [BLOCK_R, cols.shape[0]])
        return tl.load(ptrs, mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _ln_stats(xs, d, eps, BLOCK_D: tl.constexpr, NUM_DB: tl.constexpr, EVEN_D: tl.constexpr):
        """Row mean and 1 / sqrt(var + eps) [R] of a row tile held as NUM_DB column blocks xs[j] [R, BLOCK_D]
        (fp32, 0 in masked rows / columns): two passes over the registers (sum, then centred squares), the
        blocks summed elementwise first so that each statistic is one reduction over the tile's columns."""
        s = xs[0]
        for j in tl.static_range(1, NUM_DB):
            s += xs[j]
        mean = tl.sum(s, 1) / d
        m2 = tl.zeros_like(xs[0])
        for j in tl.static_range(NUM_DB):
            _, cmask = _col_block(j, d, BLOCK_D, EVEN_D)
            xc = tl.where(cmask[None, :], xs[j] - mean[:, None], 0.0)
            m2 += xc * xc
        ss = tl.sum(m2, 1)
        rstd = 1.0 / tl.sqrt(ss / d + eps)
        # the row's sum of squares sum_j x_j^2 = ss + d mean^2 overflows fp32: its statistics are not representable
        # (F.layer_norm returns NaN or 0 there): NaN, never a finite wrong number (see ln_modulate_reference)
        rstd = tl.where(ss + d * mean * mean == float("inf"), float("nan"), rstd)
        return mean, rstd

    @triton.jit
    def _w_s1(w_ptr, sc_ptr, cols, cmask, BLOCK_R: tl.constexpr):
        """w * (1 + scale) as [BLOCK_R, BLOCK_D] fp32 over one column block; 1 + scale is rounded to scale's
        dtype (the published modulate's ``1 + scale`` in mod's dtype). sc_ptr: the batch row's scale slice."""
        w = _bcast_load(w_ptr, cols, cmask, BLOCK_R)
        sc = _bcast_load(sc_ptr, cols, cmask, BLOCK_R)
        return w * _cast(1.0 + sc, sc_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _ln_bwd_block(g, x, mean, rstd, ws, cmask):
        """xhat and dxhat = g * w * (1 + scale) of one column block (steps (3), (5) of the backward); g, x, ws
        [R, BLOCK_D] fp32 (0 in masked rows), mean / rstd [R] (0 in masked rows)."""
        xhat = tl.where(cmask[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
        return xhat, g * ws

    @triton.jit
    def _ln_bwd_walk(g_ptr, x_ptr, w_ptr, sc_ptr, mean_ptr, rstd_ptr, rows, rmask, d, acc_g, acc_gx,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DB: tl.constexpr, EVEN_D: tl.constexpr):
        """The first walk of the LayerNorm + modulate backward over a row tile's column blocks (the only DRAM
        reads of g and x): xhat and dxhat of every block, kept in registers for the second walk; the row sums
        c1 = mean_j(dxhat * xhat) and c2 = mean_j(dxhat) of step (6); the per-column partial sums of g and
        g * xhat added into acc_g / acc_gx (tuples of [BLOCK_R, BLOCK_D] per block). Returns
        (xs, dxs, c1, c2, rstd, acc_g, acc_gx)."""
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        p1 = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)     # dxhat * xhat, summed over the column blocks
        p2 = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)     # dxhat
        xs = ()
        dxs = ()
        for j in tl.static_range(NUM_DB):
            cols, cmask = _col_block(j, d, BLOCK_D, EVEN_D)
            m2 = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * d + cols[None, :]
            g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            xhat, dxhat = _ln_bwd_block(g, x, mean, rstd, _w_s1(w_ptr, sc_ptr, cols, cmask, BLOCK_R), cmask)
            p1 += dxhat * xhat
            p2 += dxhat
            acc_g = _tuple_add(acc_g, j, g)
            acc_gx = _tuple_add(acc_gx, j, g * xhat)
            xs = xs + (xhat,)
            dxs = dxs + (dxhat,)
        c1, c2 = _row_sums2(p1, p2)
        return xs, dxs, c1 / d, c2 / d, rstd, acc_g, acc_gx


# ---------------------------------------------------------------------------------------------
# Tiling and grids
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a launcher tiles rows of d columns (see the module docstring)."""
    block_r: int          # rows per tile
    block_d: int          # columns per block: a power of two >= 4
    num_db: int           # column blocks per row
    even_d: bool          # block_d * num_db == d: no column mask
    num_warps: int

    def constexprs(self) -> dict:
        return dict(BLOCK_R=self.block_r, BLOCK_D=self.block_d, NUM_DB=self.num_db, EVEN_D=self.even_d)


_MIN_BLOCK_D = 32        # column blocks below this width: one masked block instead
_INTERP_TILE = 16384     # elements per tile under the interpreter (per-op cost, no registers)

_PLAN_GPU: contextvars.ContextVar[Optional[_launch.GPU]] = contextvars.ContextVar("mdlm_adaln_plan_gpu",
                                                                                  default=None)


@contextlib.contextmanager
def plan_for(gpu: Optional[_launch.GPU]):
    """Within this context the launchers of both ops tile and size their grids for ``gpu`` also when they run
    the Triton interpreter on CPU tensors (tests: the GPU's loops and branches, on the CPU)."""
    token = _PLAN_GPU.set(gpu)
    try:
        yield
    finally:
        _PLAN_GPU.reset(token)


def gpu_for(device) -> Optional[_launch.GPU]:
    """The GPU a launcher plans for: the device's (CUDA, or meta inside ``launch.recording``), else the one set
    by :func:`plan_for`, else None (interpreter tiling)."""
    gpu = _launch.gpu_of(device)
    return gpu if gpu is not None else _PLAN_GPU.get()


def _pow2_divisor(d: int) -> int:
    return d & -d


def num_warps_for(d: int) -> int:
    """Warps per program: 2 up to d = 1024 (a program's per-column accumulators, kinds x d / (32 x warps)
    registers per thread, stay small), more for wider rows."""
    return 2 if d <= 1024 else 4 if d <= 2048 else 8


@functools.lru_cache(maxsize=None)
def tiling(d: int, gpu: Optional[_launch.GPU], store_bytes: int = 4) -> Tiling:
    """Tiling of rows of ``d`` columns on ``gpu`` (None: the interpreter's) for a kernel whose widest stored
    tile element has ``store_bytes`` bytes (4: fp32, 2: bf16 / fp16): E = 16 / store_bytes elements per thread
    and tile, BLOCK_R * BLOCK_D = 32 * E * num_warps (module docstring)."""
    if gpu is None:
        bd = max(4, triton.next_power_of_2(d))
        return Tiling(max(1, min(64, _INTERP_TILE // bd)), bd, 1, bd == d, num_warps_for(d))
    nw = num_warps_for(d)
    tile = (16 // store_bytes) * 32 * nw
    bd = min(_pow2_divisor(d), tile)
    if bd >= _MIN_BLOCK_D:
        nb = d // bd                                     # exact: no idle lane, no column mask
    else:
        bd = min(tile, max(4, triton.next_power_of_2(d)))
        nb = triton.cdiv(d, bd)
    return Tiling(max(1, tile // bd), bd, nb, bd * nb == d, nw)


# The backward kernels tile as if they stored fp32 (E = 4) whatever their dtypes: their per-thread state (the
# column sums and the xhat / dxhat of every block between the two walks) grows with E. With all tensors bf16,
# E = 8 measured 161-254 registers (4-6 resident blocks) where E = 4 keeps the occupancy of the table below;
# the bf16 tiles then move 8 bytes per thread (in the published flows the backward stores fp32 tiles anyway).
BWD_STORE_BYTES = 4

# Resident blocks per SM of the backward kernels as compiled (ptxas -v) at the tiling of d = 768 (2 warps per
# block), by (kernel, arch, flow, HAS_DR of the gated backward), where flow is that of the kernel's tile
# tensors (tile_flow): "fp32", "mixed" (fp32 and 16-bit: the published bf16 autocast flow) or "16bit" (all
# bf16 / fp16). The grids are sized for it; compile_check asserts it for the published flows (compiled >=
# this); the "16bit" entries were read the same way from an ad-hoc recording (bf16 residual stream), not by
# compile_check. Other widths (other warps per block): the same number of warps per SM is assumed.
BWD_BLOCKS_PER_SM = {
    **{("adaln", a, f, None): 12 for a in (80, 90) for f in ("fp32", "mixed", "16bit")},    # 80 registers
    ("gated", 80, "fp32", True): 7, ("gated", 80, "fp32", False): 7,        # 139 / 140 registers
    ("gated", 90, "fp32", True): 7, ("gated", 90, "fp32", False): 6,        # 138 / 152
    **{("gated", a, "mixed", dr): 8 for a in (80, 90) for dr in (True, False)},              # 128
    ("gated", 80, "16bit", True): 8, ("gated", 80, "16bit", False): 8,      # 128 / 128
    ("gated", 90, "16bit", True): 6, ("gated", 90, "16bit", False): 8,      # 152 / 128
}


def tile_flow(*tensors) -> str:
    """"fp32", "16bit" or "mixed": the element sizes of a kernel's tile tensors (None entries ignored)."""
    sizes = {t.element_size() for t in tensors if t is not None}
    return "fp32" if sizes == {4} else "16bit" if sizes == {2} else "mixed"


def blocks_per_sm(kernel: str, gpu: _launch.GPU, t: Tiling, flow: str, has_dr: Optional[bool] = None) -> int:
    """Occupancy a backward grid is sized for on ``gpu`` (an arch not in the table: the nearest lower one's,
    or sm_80's)."""
    archs = sorted({k[1] for k in BWD_BLOCKS_PER_SM if k[0] == kernel})
    arch = max([a for a in archs if a <= gpu.arch], default=archs[0])
    return max(1, BWD_BLOCKS_PER_SM[(kernel, arch, flow, has_dr)] * 2 // t.num_warps)


_PROGRAM_ROWS = 2        # cost of a backward program beyond its rows, in rows: its partial sums (kinds x d fp32,
                         # about one row's bytes) are written once and read back by the host's sum


@functools.lru_cache(maxsize=4096)
def bwd_grid(B: int, L: int, block_r: int, slots: Optional[int]) -> tuple[int, int]:
    """(n_chunks, rows_per_chunk) of a backward grid (B, n_chunks): each batch row's L rows split into chunks
    of rows_per_chunk rows (a multiple of block_r; the last chunk may be shorter).

    ``slots`` = sm_count * blocks_per_sm resident programs (None: the interpreter, one chunk per batch row).
    The kernel's time is modelled as waves x (rows of the longest program + _PROGRAM_ROWS); n_chunks
    maximises the useful fraction B*L / (waves * slots * (rows_per_chunk + _PROGRAM_ROWS)), the fewest chunks
    among equals. At the published shape (B = 64, L = 1024): one wave filling 97-99% of the slots, or two
    waves filling 97-100% (the gated backward on sm_80)."""
    n_tiles = triton.cdiv(L, block_r)
    if slots is None:
        return 1, n_tiles * block_r
    cands = {1, n_tiles} | {max(1, min(n_tiles, w * slots // B)) for w in range(1, 5)}
    best = None
    for n in sorted(cands):
        rows = triton.cdiv(n_tiles, n) * block_r
        nc = triton.cdiv(L, rows)
        waves = triton.cdiv(B * nc, slots)
        eff = B * L / (waves * slots * (rows + _PROGRAM_ROWS))
        if best is None or eff > best[0] + 1e-9:
            best = (eff, nc, rows)
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------
# Host helpers shared by the launchers
# ---------------------------------------------------------------------------------------------
def seed_words(seed: int, offset: int):
    """(seed as uint64, offset low word, offset high word) for the kernels' Philox counters."""
    return _from_i64(seed), offset & _M32, (_from_i64(offset) >> 32) & _M32


def drop_scale(p: float) -> float:
    """1 / (1 - p) rounded to fp32 (the value both backends multiply by); 0 for p = 1 (all dropped)."""
    return 0.0 if p >= 1.0 else float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def one_plus_scale(mod: torch.Tensor, scale_idx: int, d: int) -> torch.Tensor:
    """(B, d) fp32: 1 + scale rounded to mod's dtype, as the kernels use it."""
    return (1.0 + mod[:, scale_idx * d:(scale_idx + 1) * d].float()).to(mod.dtype).float()


def triton_supported(*ts):
    return _backend.dtype_predicate(DTYPES, *ts)


# ---------------------------------------------------------------------------------------------
# Reference helpers (plain PyTorch: the mdlm.nn spec)
# ---------------------------------------------------------------------------------------------
def cdt(*ts) -> torch.dtype:
    """Compute dtype of the reference: fp32 (the spec's x.float()), float64 when any input is float64."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def mod_slice(mod: torch.Tensor, idx: int, d: int) -> torch.Tensor:
    return mod[:, None, idx * d:(idx + 1) * d]        # (B, 1, d), as chunk(k) of mod[:, None]


def row_stats(xf: torch.Tensor):
    """(var, mean), each (..., 1) float64, of the rows of xf: the mean as sum / d (+inf for a row holding +inf, as
    the kernels; a running-mean update would give NaN), then the centred second moment, both accumulated in
    float64. The kernels sum in fp32; float64 makes the reference's statistics exact where the kernels' are
    (e.g. a constant row of -1e12 at d = 8: var = 0, where fp32 torch.mean rounds the mean and gives var ~ 4e9)."""
    x64 = xf.double()
    mean = x64.sum(dim=-1, keepdim=True) / xf.shape[-1]
    xc = x64 - mean
    return (xc * xc).mean(dim=-1, keepdim=True), mean


def overflow_rows(xf: torch.Tensor, var: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(..., 1) bool: rows whose sum of squares sum_j x_j^2 = d (var + mean^2) overflows xf's dtype (or is NaN).
    Their LayerNorm statistics are not representable (fp32 F.layer_norm returns NaN or 0 for such rows, e.g.
    x ~ 1e20): both backends return NaN there (the kernels test the same quantity, ``_ln_stats``), never a
    finite number."""
    d = xf.shape[-1]
    ss = var.double() * d + d * (mean.double() * mean.double())
    return ~(ss <= torch.finfo(xf.dtype).max)


def ln_modulate_reference(x, weight, mod, shift_idx, scale_idx, out_dtype, eps):
    """y = LN(x) * w * (1 + scale) + shift as mdlm.nn (LayerNorm on x.float(), modulate), with the row mean
    and rstd (fp32, (B*L,)) the kernels save. Rows whose sum of squares overflows (:func:`overflow_rows`): NaN."""
    B, L, d = x.shape
    xf = x.to(cdt(x, weight, mod))
    ln = F.layer_norm(xf, [d], eps=eps) * weight[None, None, :]                    # mdlm.nn.LayerNorm
    y = ln * (1 + mod_slice(mod, scale_idx, d)) + mod_slice(mod, shift_idx, d)       # mdlm.nn.modulate
    var, mean = row_stats(xf)
    rstd = torch.rsqrt(var + eps)
    bad = overflow_rows(xf, var, mean)
    y = torch.where(bad, float("nan"), y)
    rstd = torch.where(bad, float("nan"), rstd)
    return y.to(out_dtype), mean.reshape(-1).float(), rstd.reshape(-1).float()


def ln_modulate_bwd_reference(g, x, weight, mod, shift_idx, scale_idx, eps, dt, mean=None, rstd=None):
    """Backward steps (1)-(6) (:mod:`.adaln`) in PyTorch, in dtype dt: (dx, dw, dshift (B, d), dscale (B, d)).
    From the forward's saved statistics ``mean`` / ``rstd`` ((B*L,) fp32), as the kernels; recomputed (float64
    accumulation) when not given or when dt is float64 (gradcheck: fp32 statistics would limit its precision)."""
    B, L, d = x.shape
    g = g.to(dt)
    xf = x.to(dt)
    if mean is None or rstd is None or dt == torch.float64:
        var, mean = row_stats(xf)
        rstd = torch.where(overflow_rows(xf, var, mean), float("nan"), torch.rsqrt(var + eps))   # as the forward
        mean, rstd = mean.to(dt), rstd.to(dt)
    else:
        mean, rstd = mean.to(dt).view(B, L, 1), rstd.to(dt).view(B, L, 1)
    xhat = (xf - mean) * rstd
    w = weight.to(dt)
    s1 = (1 + mod_slice(mod, scale_idx, d)).to(dt)
    dsh = g.sum(1)                                                              # (1)
    gx = (g * xhat).sum(1)
    dsc = w * gx                                                                # (2): w * sum_l g * xhat
    dn = g * s1                                                                 # (3)
    dw = (s1[:, 0] * gx).sum(0)                                                 # (4): sum_b s1[b] * sum_l g * xhat
    dxhat = dn * w                                                              # (5)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdim=True))               # (6)
    return dx, dw, dsh, dsc


def keep_reference(B, L, d, p, seed, offset, device):
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


def dropout_reference(h, keep, p):
    """F.dropout(h, p) with the given mask: kept values times 1/(1-p) (fp32 math), rounded to h's dtype."""
    return torch.where(keep, h.to(cdt(h)) * drop_scale(p), 0.0).to(h.dtype)


# ---------------------------------------------------------------------------------------------
# Input checks (metadata only: shared by the public functions, the op bodies and their fake kernels)
# ---------------------------------------------------------------------------------------------
from . import _checks  # noqa: E402
from ._checks import fail  # noqa: E402,F401


def check_tensor(op, name, t, ndim=None):
    _checks.tensor(op, name, t, dtypes=REF_DTYPES, ndim=ndim)


def check_mod(op, name, mod, B, d, idxs):
    check_tensor(op, name, mod, 2)
    if mod.shape[0] != B:
        fail(op, f"{name} batch size {mod.shape[0]} != the activations' batch size {B} (conditioning batch "
                 f"mismatch: {name} must be (B, k*d) = ({B}, k*{d}))")
    if mod.shape[1] == 0 or mod.shape[1] % d:
        fail(op, f"{name} width {mod.shape[1]} is not a positive multiple of the hidden size {d}")
    k = mod.shape[1] // d
    for iname, i in idxs:
        if isinstance(i, bool) or not isinstance(i, int):
            fail(op, f"{iname} must be an int, got {type(i).__name__}", TypeError)
        if not 0 <= i < k:
            fail(op, f"{iname}={i} out of range: {name} holds k={k} slices of width {d} (index in [0, {k}))",
                 IndexError)


def check_weight(op, name, w, d):
    check_tensor(op, name, w, 1)
    if w.shape[0] != d:
        fail(op, f"{name} has {w.shape[0]} entries but the hidden size is {d} (wrong hidden size)")


def check_devices(op, **ts):
    _checks.same_device(op, **ts)


def check_eps(op, eps) -> float:
    """The LayerNorm epsilon: a finite float >= 0 (-1 or NaN would make rstd NaN or imaginary)."""
    return _checks.float_arg(op, "eps", eps, 0.0)


def check_stats(op, name, t, n):
    """Saved row statistics (mean or rstd): (n,) float32."""
    _checks.tensor(op, name, t, dtypes=(torch.float32,), shape=(n,))


def rows_contig(mod):
    """mod with unit column stride (the kernels take its row stride)."""
    return mod if mod.stride(-1) == 1 else mod.contiguous()


def resolve_out_dtype(op, out_dtype, device):
    if out_dtype is None:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32
    return check_out_dtype(op, out_dtype)


def check_out_dtype(op, out_dtype):
    return _checks.dtype_arg(op, "out_dtype", out_dtype, REF_DTYPES)
