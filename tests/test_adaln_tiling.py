"""adaLN / gated residual kernels with a GPU's tiling, run by the Triton interpreter on CPU tensors; the plans the
launchers record for the published shape.

On a GPU the launchers tile rows into column blocks that divide d (d = 768: 3 x 256), one or two rows per tile,
2-warp programs, and size the backward grids (batch row, sequence chunk) to whole waves of the compiled
occupancy; under the interpreter they use one masked column block and big tiles. ``plan_for(gpu)`` makes the
launchers use a GPU's tiling and grid on CPU tensors, so the loops and branches the GPU runs are run here:
several column blocks (d = 96: 3 x 32; d = 768: 3 x 256), masked blocks (d = 1, 37; d = 300: 2 x 256, the
second one ragged), several row tiles per program, several programs per batch row, a ragged last chunk and
tile, dropout on / off, with and without dL/dr (HAS_DR) and with and without the next norm (HAS_DY).

Tolerances (as tests/test_adaln.py):
- fp32 inputs: every output and gradient: max abs error <= 1e-5 x (its largest entry) + 1e-6, against the
  fp32 spec.
- bf16 (published dtype flow: fp32 residual stream and LayerNorm weight, bf16 mod / branch output / y): the
  error against the fp32 spec on upcast inputs <= 2x the error of the spec run on the bf16 tensors (the
  published computation), plus 1e-3 x the quantity's scale.
- r alone (no norm) with dropout: bitwise equal to the reference backend (elementwise; the same Philox mask).
"""
import math

import pytest
import torch

import mdlm_kernels as mk
from mdlm_kernels import backend as kb
from mdlm_kernels import compile_check, launch
from mdlm_kernels.ops import _adaln_common as C
from mdlm_kernels.ops import adaln as adaln_mod
from mdlm_kernels.ops import gated_residual as gated_mod
from test_adaln import assert_2x, assert_fp32, gated_inputs, inputs, keep_mask, spec_adaln, spec_gated

pytestmark = pytest.mark.skipif(kb.unavailable_reason("triton", "cpu") is not None,
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

TINY = launch.GPU("test GPU: 1 SM, sm_90", (9, 0), 1)    # few programs: several row tiles each
H100, A100 = launch.H100, launch.A100                      # many programs: several per batch row
P, SEED, OFFSET = 0.25, 77, 2 ** 33 + 5
OPS = ("adaln_modulate", "gated_residual_modulate")


@pytest.fixture
def plans(monkeypatch):
    """The plans launched (the launchers' launch() calls), in order."""
    seen = []
    real = launch.launch

    def spy(plan, device):
        seen.append(plan)
        return real(plan, device)

    monkeypatch.setattr(launch, "launch", spy)
    return seen


def _grads(fn, tensors, weights, seed=123):
    """Outputs of fn and the gradients of sum_i weights[i] * sum(out_i * G_i) (fixed random G_i; weight 0
    leaves out_i out of the loss, so its gradient reaches the op as None)."""
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    outs = [o for o in fn(*ts) if o is not None]
    g = torch.Generator().manual_seed(seed)
    loss = sum(wt * (o.float() * torch.randn(o.shape, generator=g)).sum() for o, wt in zip(outs, weights) if wt)
    gs = torch.autograd.grad(loss, ts, allow_unused=True)
    return [o.detach() for o in outs], list(gs)


def _check(names, got, low, exact, bf16):
    for n, a, lo, ex in zip(names, got, low, exact):
        if ex is None:
            assert a is None or torch.all(a == 0), n
            continue
        assert a is not None, n
        if bf16:
            assert_2x(n, a, lo, ex)
        else:
            assert_fp32(n, a, ex)


# ------------------------------------------------------------------------------------------ tiling, grids
def test_tiling_of_the_published_width_has_no_idle_lane():
    for store_bytes, rows in ((4, 1), (2, 2)):
        t = C.tiling(768, H100, store_bytes)
        assert (t.block_d, t.num_db, t.even_d, t.block_r, t.num_warps) == (256, 3, True, rows, 2)
        # one 16-byte vector of the stored tiles per thread and tile
        assert t.block_r * t.block_d == (16 // store_bytes) * 32 * t.num_warps


@pytest.mark.parametrize("d, block_d, num_db, even", [(96, 32, 3, True), (1024, 256, 4, True), (37, 64, 1, False),
                                                      (1, 4, 1, False), (300, 256, 2, False), (2048, 512, 4, True)])
def test_tiling_rules(d, block_d, num_db, even):
    t = C.tiling(d, H100, 4)
    assert (t.block_d, t.num_db, t.even_d) == (block_d, num_db, even)
    assert t.block_d * t.num_db >= d and t.block_d * (t.num_db - 1) < d and t.block_d >= 4
    interp = C.tiling(d, None, 4)
    assert interp.num_db == 1 and interp.block_d >= d


@pytest.mark.parametrize("B, L, block_r, slots", [(64, 1024, 1, 1584), (64, 1024, 1, 1056), (64, 1024, 2, 924),
                                                  (2, 37, 1, 8), (2, 37, 8, 12), (1000, 50, 1, 132), (1, 5, 1, 1584)])
def test_bwd_grid_whole_waves(B, L, block_r, slots):
    nc, rows = C.bwd_grid(B, L, block_r, slots)
    assert rows % block_r == 0 and nc == math.ceil(L / rows) and (nc - 1) * rows < L
    def eff(rows):       # the model: useful rows / (waves x slots x (rows per program + its fixed cost))
        waves = math.ceil(B * math.ceil(L / rows) / slots)
        return B * L / (waves * slots * (rows + C._PROGRAM_ROWS))

    # never worse than one chunk per batch row or one tile per program
    for n in (1, math.ceil(L / block_r)):
        assert eff(rows) >= eff(math.ceil(math.ceil(L / block_r) / n) * block_r) - 1e-9
    if B * L >= 16 * slots * block_r:      # enough rows: at least 85% of the slots' time is useful rows
        assert eff(rows) >= 0.85, (nc, rows, eff(rows))


def test_bwd_grid_published_shape_fills_whole_waves():
    for gpu in (H100, A100):
        for bps in (12, 8, 7, 6):
            slots = gpu.sm_count * bps
            nc, rows = C.bwd_grid(64, 1024, 1, slots)
            waves = math.ceil(64 * nc / slots)
            assert waves <= 2 and 64 * nc >= 0.9 * waves * slots, (gpu.name, bps, nc)


@pytest.mark.parametrize("flow", ["bf16", "fp32"])
@pytest.mark.parametrize("gpu", [H100, A100], ids=["sm90", "sm80"])
def test_recorded_plans_assume_what_the_launchers_assume(flow, gpu):
    """The adaLN / gated plans of compile_check.step_plans (the published shape) carry the launchers' tiling,
    occupancy table and grid: the numbers compile_check compiles and checks."""
    s = compile_check.PUBLISHED_SMALL
    B, L, d = s["B"], s["L"], s["d"]
    ps = [p for p in compile_check.step_plans(flow, gpu) if p.name.split(".")[0] in OPS]
    names = sorted({p.name for p in ps})
    assert names == ["adaln_modulate.bwd", "adaln_modulate.fwd", "gated_residual_modulate.bwd",
                     "gated_residual_modulate.fwd"]
    tflow = "mixed" if flow == "bf16" else "fp32"        # the tile tensors: fp32 residual stream, bf16 rest
    for p in ps:
        cx = p.constexprs
        assert cx["BLOCK_D"] * cx["NUM_DB"] == d and cx["EVEN_D"], (p.name, cx)      # no idle lane, no mask
        assert p.vector_io == ("ld", "st")
        store = 2 if (p.name == "adaln_modulate.fwd" and flow == "bf16") else 4      # y bf16; else fp32 tiles
        assert C.tiling(d, gpu, store).constexprs() == {k: cx[k] for k in ("BLOCK_R", "BLOCK_D", "NUM_DB",
                                                                           "EVEN_D")}
        assert p.num_warps == C.tiling(d, gpu, store).num_warps
        if p.name.endswith(".fwd"):
            assert p.grid == (math.ceil(B * L / cx["BLOCK_R"]),) and p.blocks_per_sm == 1
            continue
        kernel = "adaln" if p.name.startswith("adaln") else "gated"
        t = C.tiling(d, gpu, 4)
        has_dr = p.constexprs["HAS_DR"] if kernel == "gated" else None
        assert p.blocks_per_sm == C.BWD_BLOCKS_PER_SM[(kernel, gpu.arch, tflow, has_dr)] * 2 // t.num_warps
        slots = gpu.sm_count * p.blocks_per_sm
        assert p.grid == (B, C.bwd_grid(B, L, cx["BLOCK_R"], slots)[0])
        waves = math.ceil(B * p.grid[1] / slots)
        assert waves <= 2 and B * p.grid[1] >= 0.9 * waves * slots     # whole waves, no long tail
        part = p.args[11] if kernel == "gated" else p.args[7]
        assert tuple(part.shape) == (B, p.grid[1], 3 if kernel == "gated" else 2, d)



# ------------------------------------------------------------------------------------------ adaln_modulate
ADALN_CASES = [  # (B, L, d, gpu): tiling on that GPU
    (3, 37, 96, TINY),    # 3 column blocks of 32, 8-row tiles: 2 per program, a ragged last chunk and tile
    (2, 21, 768, TINY),   # the published width: 3 x 256, 1-row tiles (2 when y is bf16), 4 per program
    (2, 5, 768, H100),    # several programs per batch row
    (2, 5, 37, TINY),     # one masked block
    (3, 4, 1, H100),      # d = 1: a 4-column block, 3 columns masked
    (1, 9, 300, TINY),    # 2 blocks of 256, the second masked
]


@pytest.mark.parametrize("case, dtype", [(c, dt) for c in range(len(ADALN_CASES)) for dt in ("fp32", "bf16")]
                         + [(0, "bf16x"), (1, "bf16x")])     # bf16x: x bf16 as well (all tiles 16-bit)
def test_adaln_gpu_tiling_matches_spec(case, dtype, plans):
    B, L, d, gpu = ADALN_CASES[case]
    x, w, mod = inputs(B, L, d, 6, seed=case)
    bf16 = dtype != "fp32"
    if bf16:
        mod = mod.bfloat16()
    if dtype == "bf16x":
        x = x.bfloat16()
    out_dtype = torch.bfloat16 if bf16 else torch.float32
    with C.plan_for(gpu):
        got, g = _grads(lambda x, w, m: (mk.adaln_modulate(x, w, m, 3, 4, out_dtype, backend="triton"),),
                        (x, w, mod), [1])
    low, lg = _grads(lambda x, w, m: (spec_adaln(x, w, m, 3, 4).to(out_dtype),), (x, w, mod), [1])
    exact, eg = _grads(lambda x, w, m: (spec_adaln(x, w, m, 3, 4),), (x, w, mod.float()), [1])
    _check(["y", "dx", "dw", "dmod"], got + g, low + lg, exact + eg, bf16)
    assert got[0].dtype == out_dtype and g[2].dtype == mod.dtype and g[0].dtype == x.dtype
    # the GPU's tiling and grid ran
    fwd = [p for p in plans if p.name == "adaln_modulate.fwd"]
    bwd = [p for p in plans if p.name == "adaln_modulate.bwd"]
    assert len(fwd) == 1 and len(bwd) == 1
    assert fwd[0].constexprs["NUM_DB"] == C.tiling(d, gpu, 2 if bf16 else 4).num_db
    t = C.tiling(d, gpu, C.BWD_STORE_BYTES)          # the backward tiles as for fp32 stores, whatever x is
    assert {k: bwd[0].constexprs[k] for k in t.constexprs()} == t.constexprs()
    flow = {"fp32": "fp32", "bf16": "mixed", "bf16x": "16bit"}[dtype]
    assert bwd[0].blocks_per_sm == C.blocks_per_sm("adaln", gpu, t, flow)
    slots = gpu.sm_count * bwd[0].blocks_per_sm
    assert bwd[0].grid == (B, C.bwd_grid(B, L, t.block_r, slots)[0])


def test_adaln_gpu_tiling_loops():
    """The cases above reach: several column blocks, several row tiles per program, several programs per batch
    row, a ragged last chunk."""
    multi_block = multi_tile = multi_prog = ragged = False
    for B, L, d, gpu in ADALN_CASES:
        t = C.tiling(d, gpu, 4)
        nc, rows = C.bwd_grid(B, L, t.block_r, gpu.sm_count * C.blocks_per_sm("adaln", gpu, t, "fp32"))
        multi_block |= t.num_db > 1
        multi_tile |= rows > t.block_r
        multi_prog |= nc > 1
        ragged |= nc * rows > L
    assert multi_block and multi_tile and multi_prog and ragged


# ------------------------------------------------------------------------------------------ gated residual
GATED_CASES = [  # (B, L, d, gpu, dtype, dropout, use_r (HAS_DR), norm (HAS_DY), separate mod_next)
    (3, 37, 96, TINY, "fp32", True, True, True, True),      # 3 blocks of 32; 8-row tiles, several per program
    (3, 37, 96, TINY, "bf16", True, True, True, False),
    (2, 21, 768, TINY, "bf16", True, False, True, True),    # the last block: r unused, dr = None
    (2, 5, 768, H100, "fp32", False, True, True, False),
    (2, 5, 37, TINY, "fp32", True, True, False, False),      # r only: no norm
    (2, 5, 37, TINY, "bf16", True, False, True, False),
    (3, 4, 1, H100, "fp32", True, True, True, True),
    (1, 9, 300, TINY, "bf16", True, True, True, True),
    (1, 9, 300, TINY, "fp32", False, False, True, False),
]


@pytest.mark.parametrize("case", range(len(GATED_CASES)))
def test_gated_gpu_tiling_matches_spec(case, plans):
    B, L, d, gpu, dtype, dropout, use_r, norm, sep = GATED_CASES[case]
    bf16 = dtype == "bf16"
    low_dt = torch.bfloat16 if bf16 else torch.float32
    res, h, mod, w, modn = gated_inputs(B, L, d, low_dt, low_dt, seed=case)
    p = P if dropout else 0.0
    keep = keep_mask(B, L, d, p, SEED, OFFSET) if dropout else None
    si, ci = (0, 1) if sep else (3, 4)

    def op(res, h, mod, w, modn):
        return mk.gated_residual_modulate(res, h, mod, 2, w if norm else None, si, ci, p=p, seed=SEED,
                                          offset=OFFSET, out_dtype=low_dt, mod_next=modn if sep else None,
                                          backend="triton")

    def spec(res, h, mod, w, modn, low):
        r = spec_gated(res, h, mod, 2, keep, p)
        y = spec_adaln(r, w, modn if sep else mod, si, ci) if norm else None
        return r, (y.to(low_dt) if (low and y is not None) else y)

    weights = [1 if use_r else 0] + ([1] if norm else [])
    tensors = (res, h, mod, w, modn)
    with C.plan_for(gpu):
        got, g = _grads(op, tensors, weights)
    low, lg = _grads(lambda *t: spec(*t, True), tensors, weights)
    exact, eg = _grads(lambda *t: spec(*t, False), [t.float() for t in tensors], weights)
    names = ["r", "y"][:len(got)] + ["dres", "dh", "dmod", "dw", "dmodn"]
    _check(names, got + g, low + lg, exact + eg, bf16)
    assert got[0].dtype == torch.float32
    bwd = [pl for pl in plans if pl.name == "gated_residual_modulate.bwd"]
    assert len(bwd) == 1
    cx = bwd[0].constexprs
    assert (cx["HAS_DR"], cx["HAS_DY"], cx["DROPOUT"]) == (use_r, norm, dropout)
    t = C.tiling(d, gpu, 4)
    assert (cx["BLOCK_D"], cx["NUM_DB"], cx["BLOCK_R"]) == (t.block_d, t.num_db, t.block_r)


def test_gated_gpu_tiling_covers_every_variant():
    """The cases above reach: dropout on / off, HAS_DR and HAS_DY true / false, several column blocks, several
    row tiles per program, several programs per batch row, a ragged last chunk."""
    flags = {(c[5], c[6], c[7]) for c in GATED_CASES}
    for i in range(3):
        assert {f[i] for f in flags} == {True, False}
    reach = set()
    for B, L, d, gpu, dtype, dropout, use_r, *_ in GATED_CASES:
        t = C.tiling(d, gpu, 4)
        flow = "mixed" if dtype == "bf16" else "fp32"
        nc, rows = C.bwd_grid(B, L, t.block_r, gpu.sm_count * C.blocks_per_sm("gated", gpu, t, flow, use_r))
        reach |= {"blocks"} if t.num_db > 1 else set()
        reach |= {"tiles"} if rows > t.block_r else set()
        reach |= {"programs"} if nc > 1 else set()
        reach |= {"ragged"} if nc * rows > L else set()
    assert reach == {"blocks", "tiles", "programs", "ragged"}


@pytest.mark.parametrize("d", [96, 768, 300])
def test_gated_gpu_tiling_dropout_bitwise_equals_reference(d):
    """r = residual + gate * dropout(h): elementwise, so the Triton kernel with the GPU's column blocks (the
    Philox counters of block j start at column j * BLOCK_D) equals the reference backend bit for bit."""
    g = torch.Generator().manual_seed(d)
    B, L = 2, 5
    res, h = torch.randn(B, L, d, generator=g), torch.randn(B, L, d, generator=g).bfloat16()
    mod = torch.randn(B, 6 * d, generator=g).bfloat16()
    with C.plan_for(TINY):
        a = mk.gated_residual_modulate(res, h, mod, 1, p=0.3, seed=SEED, offset=OFFSET, backend="triton")[0]
    b = mk.gated_residual_modulate(res, h, mod, 1, p=0.3, seed=SEED, offset=OFFSET, backend="reference")[0]
    assert torch.equal(a, b)


def test_tile_flow():
    f32, b16 = torch.empty(1), torch.empty(1, dtype=torch.bfloat16)
    assert C.tile_flow(f32, None, f32) == "fp32" and C.tile_flow(b16, b16) == "16bit"
    assert C.tile_flow(f32, b16, None) == "mixed" and C.tile_flow(torch.empty(1, dtype=torch.float16)) == "16bit"


def test_plan_for_only_affects_cpu_tiling():
    """plan_for sets the tiling of CPU launches; without it the interpreter's single-block tiling is used."""
    assert C.gpu_for(torch.device("cpu")) is None
    with C.plan_for(TINY):
        assert C.gpu_for(torch.device("cpu")) is TINY
        with launch.recording(H100):
            assert C.gpu_for(torch.device("meta")) is H100   # recording wins for meta tensors
    assert C.gpu_for(torch.device("cpu")) is None


def test_modules_hold_one_op_each():
    assert mk.adaln_modulate is adaln_mod.adaln_modulate
    assert mk.gated_residual_modulate is gated_mod.gated_residual_modulate
    assert not hasattr(adaln_mod, "gated_residual_modulate") and not hasattr(gated_mod, "adaln_modulate")
