"""adaLN LayerNorm + modulate and the gated residual (+ next norm) against the mdlm.nn spec, on CPU: the Triton
kernels under TRITON_INTERPRET=1 and the PyTorch reference backend.

Spec: ``mdlm.nn.LayerNorm.forward`` / ``modulate`` / ``bias_dropout_add_scale`` on upcast fp32 inputs (dropout
with the op's documented Philox mask: element (row, col) keeps iff uniform24(word col % 4 of
Philox4x32-10(seed, ctr = (col // 4, row, offset_lo, offset_hi))) >= p, built here from the Philox block function
itself, independently of the op's code).

Tolerances:
- fp32 inputs: every output and gradient: max abs error <= 1e-5 x (its largest entry) + 1e-6.
- bf16 (published dtype flow: fp32 residual stream and LayerNorm weight, bf16 mod / branch output, bf16 y):
  the error against the fp32 spec on upcast inputs must be at most 2x the error of the spec run on the bf16
  tensors (the published computation), plus 1e-3 x the quantity's scale.
- Dropout: keep rate within 5 binomial sigmas of 1 - p over 1e5 elements; p = 0 / training=False bitwise equal
  to the no-dropout path.
- GPU (cuda-marked, bf16, (4, 1024, 768)): Triton vs the reference backend, 2x criterion as above against the
  fp32 spec.
"""
import types

import pytest
import torch

import mdlm_kernels as mk
from mdlm.nn import LayerNorm, bias_dropout_add_scale, modulate
from mdlm_kernels import backend as kb
from mdlm_kernels.ops.philox import _philox_reference

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(
    kb.unavailable_reason("triton", "cpu") is not None, reason=str(kb.unavailable_reason("triton", "cpu")))),
    "reference"]
SHAPES = [(1, 37, 768), (2, 5, 100), (1, 1, 64)]
needs_cpu_triton = pytest.mark.skipif(kb.unavailable_reason("triton", "cpu") is not None,
                                      reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


# ------------------------------------------------------------------------------------------ spec
def spec_norm(x, w):
    """mdlm.nn.LayerNorm.forward with weight w."""
    return LayerNorm.forward(types.SimpleNamespace(weight=w, dim=x.shape[-1]), x)


def chunk(mod, idx, d):
    return mod[:, None].chunk(mod.shape[1] // d, dim=2)[idx]


def spec_adaln(x, w, mod, si, ci):
    d = x.shape[-1]
    return modulate(spec_norm(x, w), chunk(mod, si, d), chunk(mod, ci, d))


def uniform24(w):
    """float32 uniform of one uint32 Philox word (int64 tensor), as mdlm_kernels.philox_uniform's float32."""
    y = w >> 8
    return torch.where(y < 2 ** 23, y.to(torch.float32) + 0.5, y.to(torch.float32)) * 2.0 ** -24


def keep_mask(B, L, d, p, seed, offset):
    """The documented keying, from the Philox4x32-10 block function: one block per (row, 4-column group),
    ctr = (col // 4, row, offset_lo, offset_hi); column col uses word col % 4."""
    rows, groups = B * L, (d + 3) // 4
    row = torch.arange(rows).view(rows, 1).expand(rows, groups)
    grp = torch.arange(groups).view(1, groups).expand(rows, groups)
    lo, hi = torch.full_like(row, offset & 0xFFFFFFFF), torch.full_like(row, offset >> 32)
    words = _philox_reference(grp, row, lo, hi, seed & 0xFFFFFFFF, seed >> 32)
    w = torch.stack(words, -1).reshape(rows, 4 * groups)[:, :d]
    return (uniform24(w) >= torch.tensor(p, dtype=torch.float32)).view(B, L, d)


def spec_gated(res, h, mod, gi, keep, p):
    """bias_dropout_add_scale with F.dropout's semantics on the given mask (None: no dropout)."""
    if keep is not None:
        h = (h.float() * keep * (1.0 / (1.0 - p))).to(h.dtype)
    return bias_dropout_add_scale(h, None, chunk(mod, gi, res.shape[-1]), res, 0.0, False)


def grads(fn, tensors, seed=123):
    """Outputs of fn and the gradients of sum(out_i * G_i) w.r.t. tensors (fixed random G_i)."""
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*ts)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs if o is not None)
    gs = torch.autograd.grad(loss, ts, allow_unused=True)
    return [o.detach() for o in outs if o is not None], list(gs)


def assert_fp32(name, a, r):
    err, scale = (a.float() - r.float()).abs().max().item(), r.float().abs().max().item()
    assert err <= 1e-5 * scale + 1e-6, (name, err, scale)


def assert_2x(name, a, low, exact):
    err = (a.double() - exact.double()).abs().max().item()
    ref_err = (low.double() - exact.double()).abs().max().item()
    scale = exact.double().abs().max().item()
    assert err <= 2 * ref_err + 1e-3 * scale, (name, err, ref_err, scale)


def inputs(B, L, d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, d, generator=g) * 2 + 0.5
    w = 1 + 0.3 * torch.randn(d, generator=g)
    mod = 0.5 * torch.randn(B, k * d, generator=g)
    return x, w, mod


# ------------------------------------------------------------------------------------------ adaln_modulate
ADALN_CASES = [(k, si, ci) for k, si, ci in [(6, 3, 4), (2, 0, 1), (6, 0, 1)]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(3))
def test_adaln_fp32_matches_spec(backend, case):
    (B, L, d), (k, si, ci) = SHAPES[case], ADALN_CASES[case]
    x, w, mod = inputs(B, L, d, k)
    out, g = grads(lambda x, w, m: mk.adaln_modulate(x, w, m, si, ci, backend=backend), (x, w, mod))
    assert kb.last_used["adaln_modulate"] == backend and kb.last_used["adaln_modulate_backward"] == backend
    ref, rg = grads(lambda x, w, m: spec_adaln(x, w, m, si, ci), (x, w, mod))
    assert out[0].dtype == torch.float32 and out[0].shape == (B, L, d)
    assert_fp32("y", out[0], ref[0])
    for name, a, r in zip(("dx", "dw", "dmod"), g, rg):
        assert_fp32(name, a, r)
    other = [j for j in range(k) if j not in (si, ci)]
    for j in other:
        assert torch.all(g[2][:, j * d:(j + 1) * d] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(3))
def test_adaln_bf16_within_twice_the_published_error(backend, case):
    (B, L, d), (k, si, ci) = SHAPES[case], ADALN_CASES[case]
    x, w, mod = inputs(B, L, d, k, seed=1)
    mod = mod.bfloat16()  # published: x fp32 residual stream, w fp32, mod bf16 (autocast Linear), y -> bf16
    out, g = grads(lambda x, w, m: mk.adaln_modulate(x, w, m, si, ci, out_dtype=torch.bfloat16, backend=backend),
                   (x, w, mod))
    assert out[0].dtype == torch.bfloat16 and g[2].dtype == torch.bfloat16 and g[1].dtype == torch.float32
    low, lg = grads(lambda x, w, m: spec_adaln(x, w, m, si, ci).bfloat16(), (x, w, mod))
    exact, eg = grads(lambda x, w, m: spec_adaln(x, w, m, si, ci), (x, w, mod.float()))
    for name, a, lo, ex in zip(("y", "dx", "dw", "dmod"), out + g, low + lg, exact + eg):
        assert_2x(name, a, lo, ex)


@needs_cpu_triton
def test_adaln_bf16_x_and_autocast_default_dtype():
    x, w, mod = inputs(2, 5, 100, 6)
    y = mk.adaln_modulate(x.bfloat16(), w, mod.bfloat16(), 0, 1, out_dtype=torch.bfloat16, backend="triton")
    yr = mk.adaln_modulate(x.bfloat16(), w, mod.bfloat16(), 0, 1, out_dtype=torch.bfloat16, backend="reference")
    assert (y.float() - yr.float()).abs().max().item() <= 1e-2 * yr.float().abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mk.adaln_modulate(x, w, mod, 0, 1, backend="reference").dtype == torch.bfloat16
    assert mk.adaln_modulate(x, w, mod, 0, 1, backend="reference").dtype == torch.float32


# ------------------------------------------------------------------------------------------ gated residual
# (shape, weight_next?, separate mod_next?, gate_idx, shift_idx, scale_idx)
GATED_CASES = [(SHAPES[0], True, True, 5, 0, 1), (SHAPES[1], True, False, 2, 3, 4), (SHAPES[2], False, False, 5, 3, 4)]
P, SEED, OFFSET = 0.25, 1234, 7


def gated_inputs(B, L, d, dtype_h=torch.float32, dtype_mod=torch.float32, seed=0):
    x, w, mod = inputs(B, L, d, 6, seed)
    g = torch.Generator().manual_seed(seed + 100)
    h = torch.randn(B, L, d, generator=g).to(dtype_h)
    modn = (0.5 * torch.randn(B, 6 * d, generator=g)).to(dtype_mod)
    return x, h, mod.to(dtype_mod), w, modn


def run_gated(case, backend, dtype_h, dtype_mod, out_dtype, p=P, training=True):
    (B, L, d), has_w, sep, gi, si, ci = GATED_CASES[case]
    res, h, mod, w, modn = gated_inputs(B, L, d, dtype_h, dtype_mod)

    def op(res, h, mod, w, modn):
        return mk.gated_residual_modulate(res, h, mod, gi, w if has_w else None, si, ci, p=p, seed=SEED,
                                          offset=OFFSET, training=training, out_dtype=out_dtype,
                                          mod_next=modn if sep else None, backend=backend)

    keep = keep_mask(B, L, d, p, SEED, OFFSET) if (training and p > 0) else None

    def spec(res, h, mod, w, modn, low):
        r = spec_gated(res, h, mod, gi, keep, p)
        if not has_w:
            return (r,)
        y = spec_adaln(r, w, modn if sep else mod, si, ci)
        return r, (y.to(out_dtype) if low else y)

    tensors = (res, h, mod, w, modn)
    out, g = grads(op, tensors)
    low, lg = grads(lambda *t: spec(*t, True), tensors)
    exact, eg = grads(lambda *t: spec(*t, False), [t.float() for t in tensors])
    names = ["r", "y"][:len(out)] + ["dres", "dh", "dmod", "dw", "dmodn"]
    return names, out + g, low + lg, exact + eg, (has_w, sep)


def _pairs(names, a, lo, ex, flags):
    has_w, sep = flags
    for n, x, y, z in zip(names, a, lo, ex):
        if (n == "dw" and not has_w) or (n == "dmodn" and not (has_w and sep)):
            assert x is None or torch.all(x == 0), n
            continue
        yield n, x, y, z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(3))
def test_gated_fp32_matches_spec(backend, case):
    names, a, lo, ex, flags = run_gated(case, backend, torch.float32, torch.float32, torch.float32)
    assert kb.last_used["gated_residual_modulate"] == backend
    assert kb.last_used["gated_residual_modulate_backward"] == backend
    for n, x, _, z in _pairs(names, a, lo, ex, flags):
        assert_fp32(n, x, z)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(3))
def test_gated_bf16_within_twice_the_published_error(backend, case):
    names, a, lo, ex, flags = run_gated(case, backend, torch.bfloat16, torch.bfloat16, torch.bfloat16)
    assert a[0].dtype == torch.float32  # r keeps the residual's dtype (fp32 residual stream)
    for n, x, y, z in _pairs(names, a, lo, ex, flags):
        assert_2x(n, x, y, z)


@needs_cpu_triton
def test_gated_triton_backward_equals_reference_with_same_seed():
    """Finite-difference-free check of the Triton path: same seed -> same mask -> same gradients as the
    reference backend (which gradcheck validates below)."""
    _, at, _, _, _ = run_gated(1, "triton", torch.float32, torch.float32, torch.float32)
    _, ar, _, _, _ = run_gated(1, "reference", torch.float32, torch.float32, torch.float32)
    for x, y in zip(at, ar):
        if x is None or y is None:  # mod_next unused in this case: no gradient from either backend
            assert x is None and y is None
            continue
        assert_fp32("triton-vs-reference", x, y)


# ------------------------------------------------------------------------------------------ dropout
def _r_only(h, p, seed, offset, backend, training=True, res=None, gate=1.0):
    B, L, d = h.shape
    res = torch.zeros_like(h) if res is None else res
    mod = torch.full((B, d), gate)
    return mk.gated_residual_modulate(res, h, mod, 0, p=p, seed=seed, offset=offset, training=training,
                                      backend=backend)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_keyed_by_seed_and_offset(backend):
    h = torch.ones(2, 37, 100)
    p = 0.3
    r1 = _r_only(h, p, 42, 5, backend)
    keep = r1 != 0
    assert torch.equal(keep, keep_mask(2, 37, 100, p, 42, 5))           # the documented Philox keying
    assert torch.all(r1[keep] == torch.tensor(1 / (1 - p), dtype=torch.float32))
    assert torch.equal(r1, _r_only(h, p, 42, 5, backend))                 # same seed/offset -> same mask
    assert not torch.equal(keep, _r_only(h, p, 42, 6, backend) != 0)     # other offset -> other mask
    assert not torch.equal(keep, _r_only(h, p, 43, 5, backend) != 0)     # other seed -> other mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [10, 3, 1])
def test_dropout_mask_uses_one_philox_block_per_four_columns(backend, d):
    """Element by element from mk.philox4x32 (small shape; d not a multiple of 4, and d < 4): element (row, col)
    keeps iff uniform24(philox4x32(ctr = (col // 4, row, off_lo, off_hi), key = seed)[col % 4]) >= p."""
    B, L, p, seed, offset = 2, 3, 0.4, 2 ** 63 + 17, 2 ** 40 + 9
    r = _r_only(torch.ones(B, L, d), p, seed, offset, backend).view(B * L, d)
    key = (seed & 0xFFFFFFFF, seed >> 32)
    pf = torch.tensor(p, dtype=torch.float32)
    expected = torch.zeros(B * L, d, dtype=torch.bool)
    for row in range(B * L):
        for g in range((d + 3) // 4):
            words = mk.philox4x32((g, row, offset & 0xFFFFFFFF, offset >> 32), key, backend="reference")
            for j in range(4 * g, min(4 * g + 4, d)):
                expected[row, j] = bool(uniform24(torch.tensor(words[j % 4])) >= pf)
    assert torch.equal(r != 0, expected)
    assert torch.equal(expected.view(B, L, d), keep_mask(B, L, d, p, seed, offset))


@needs_cpu_triton
def test_dropout_triton_equals_reference_bitwise():
    g = torch.Generator().manual_seed(0)
    h, res = torch.randn(2, 5, 100, generator=g), torch.randn(2, 5, 100, generator=g)
    a = _r_only(h, 0.2, 9, 2 ** 40 + 3, "triton", res=res, gate=0.7)
    b = _r_only(h, 0.2, 9, 2 ** 40 + 3, "reference", res=res, gate=0.7)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate(backend):
    p, n = 0.1, 100_000
    h = torch.ones(2, 50, 1000)
    kept = (_r_only(h, p, 2024, 1, backend) != 0).sum().item()
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(kept - n * (1 - p)) <= 5 * sigma, (kept, n * (1 - p), sigma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p0_and_eval_equal_the_no_dropout_path_bitwise(backend):
    B, L, d = 2, 5, 100
    res, h, mod, w, modn = gated_inputs(B, L, d, torch.bfloat16, torch.bfloat16)
    f = lambda **kw: mk.gated_residual_modulate(res, h, mod, 2, w, 3, 4, out_dtype=torch.bfloat16,
                                               backend=backend, **kw)
    base_r, base_y = f()                                       # p = 0 default: the no-dropout path
    for kw in ({"p": 0.0, "seed": 5, "training": True}, {"p": 0.5, "seed": 5, "training": False},
               {"p": 0.5, "training": False}):
        r, y = f(**kw)
        assert torch.equal(r, base_r) and torch.equal(y, base_y), kw
    # and the no-dropout path is the spec, bit for bit, on the reference backend
    if backend == "reference":
        spec_r = bias_dropout_add_scale(h, None, chunk(mod, 2, d), res, 0.5, False)
        assert torch.equal(base_r, spec_r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p1_drops_everything(backend):
    res = torch.randn(1, 3, 64)
    r = _r_only(torch.randn(1, 3, 64), 1.0, 1, 0, backend, res=res)
    assert torch.equal(r, res)


# ------------------------------------------------------------------------------------------ gradcheck (float64)
def test_gradcheck_reference_float64():
    g = torch.Generator().manual_seed(0)
    B, L, d = 2, 3, 8
    x = torch.randn(B, L, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)).requires_grad_()
    mod = (0.5 * torch.randn(B, 6 * d, generator=g, dtype=torch.float64)).requires_grad_()
    modn = (0.5 * torch.randn(B, 2 * d, generator=g, dtype=torch.float64)).requires_grad_()
    h = torch.randn(B, L, d, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, m: mk.adaln_modulate(x, w, m, 3, 4, out_dtype=torch.float64,
                                                                     backend="reference"), (x, w, mod))
    for kw in ({"mod_next": modn, "shift_idx": 0, "scale_idx": 1}, {}):
        f = lambda x, h, m, w, mn: mk.gated_residual_modulate(
            x, h, m, 2, w, p=0.3, seed=11, offset=3, out_dtype=torch.float64, backend="reference",
            **({**kw, "mod_next": mn} if kw else kw))
        assert torch.autograd.gradcheck(f, (x, h, mod, w, modn))
    f = lambda x, h, m: mk.gated_residual_modulate(x, h, m, 5, None, p=0.3, seed=11, offset=3,
                                                   backend="reference")[0]
    assert torch.autograd.gradcheck(f, (x, h, mod))


# ------------------------------------------------------------------------------------------ bad input
@needs_cpu_triton
def test_bad_inputs_raise_clear_errors():
    x, w, mod = inputs(2, 5, 16, 6)
    f = mk.adaln_modulate
    with pytest.raises(ValueError, match="wrong hidden size"):
        f(x, w[:8], mod)
    with pytest.raises(ValueError, match="conditioning batch mismatch"):
        f(x, w, mod[:1])
    with pytest.raises(ValueError, match="multiple of the hidden size"):
        f(x, w, mod[:, :40])
    with pytest.raises(IndexError, match="out of range"):
        f(x, w, mod, 0, 6)
    with pytest.raises(TypeError, match="dtype"):
        f(x.int(), w, mod)
    with pytest.raises(ValueError, match="3 dimensions"):
        f(x[0], w, mod)
    with pytest.raises(ValueError, match="one device"):
        f(x, w.to("meta"), mod)
    with pytest.raises(ValueError, match="must differ"):
        f(x, w, mod, 1, 1)
    with pytest.raises(mk.BackendUnavailableError, match="float64"):
        f(x.double(), w, mod, backend="triton")
    with pytest.raises(mk.BackendUnavailableError, match="no cpp implementation"):
        f(x, w, mod, backend="cpp")
    g = mk.gated_residual_modulate
    with pytest.raises(ValueError, match="h shape"):
        g(x, x[:, :3], mod, 2)
    with pytest.raises(ValueError, match="conditioning batch mismatch"):
        g(x, x, mod, 2, w, mod_next=mod[:1])
    with pytest.raises(IndexError, match="gate_idx"):
        g(x, x, mod, 6)
    with pytest.raises(ValueError, match="dropout probability"):
        g(x, x, mod, 2, p=1.5)
    with pytest.raises(ValueError, match="seed"):
        g(x, x, mod, 2, p=0.1, seed=-1)
    # non-contiguous inputs are accepted (copied)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    torch.testing.assert_close(f(xt, w, mod, backend="reference"), f(x, w, mod, backend="reference"))


# ------------------------------------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph():
    x, w, mod = inputs(2, 5, 16, 6)
    h = torch.randn(2, 5, 16)

    def block(x, w, mod, h):
        y = mk.adaln_modulate(x, w, mod, 0, 1, backend="reference")
        r, y2 = mk.gated_residual_modulate(x, h * y, mod, 2, w, 3, 4, p=0.1, seed=3, offset=1,
                                           backend="reference")
        return (r * 2).sum() + y2.sum()

    args = [t.clone().requires_grad_() for t in (x, w, mod, h)]
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
    out.backward()
    args2 = [t.clone().requires_grad_() for t in (x, w, mod, h)]
    ref = block(*args2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(args, args2):
        torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------ block composition
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_sequence_equals_published_blocks(backend):
    """Two DDiTBlocks + the final layer's modulated hidden state, through the four fused ops (the sequence the
    drop-in model uses: the next norm fused into each gated residual), equal mdlm.nn in eval mode."""
    import torch.nn.functional as F
    from mdlm.nn import DDiTBlock, DDitFinalLayer, Rotary
    torch.manual_seed(0)
    B, L, d, H, cond = 2, 5, 64, 2, 16
    blocks = [DDiTBlock(d, H, cond).eval() for _ in range(2)]
    final = DDitFinalLayer(d, 11, cond).eval()
    with torch.no_grad():
        for m in blocks + [final]:
            m.adaLN_modulation.weight.normal_(0, 0.2)
            m.adaLN_modulation.bias.normal_(0, 0.2)
            m.norm_final.weight.normal_(1, 0.2) if m is final else m.norm1.weight.normal_(1, 0.2)
    x, c = torch.randn(B, L, d), torch.randn(B, cond)
    rot = Rotary(d // H)
    cos_sin = rot(x)
    with torch.no_grad():
        ref = x
        for blk in blocks:
            ref = blk(ref, cos_sin, c)
        ref = final.hidden(ref, c)

        cos, sin = mk.rotary_tables(rot.inv_freq, L)
        mods = [blk.adaLN_modulation(c) for blk in blocks]          # (B, 6d) each, once per block
        final_mod = final.adaLN_modulation(c)                        # (B, 2d)
        resid = x
        y = mk.adaln_modulate(x, blocks[0].norm1.weight, mods[0], 0, 1, backend=backend)
        for i, blk in enumerate(blocks):
            last = i == len(blocks) - 1
            q, k, v = mk.rotary_qkv(blk.attn_qkv(y).view(B, L, 3, H, d // H), cos, sin, backend=backend)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, d)
            r1, y2 = mk.gated_residual_modulate(resid, blk.attn_out(a), mods[i], 2, blk.norm2.weight, 3, 4,
                                                p=blk.dropout, seed=1, offset=2 * i, training=blk.training,
                                                backend=backend)
            hmid = mk.bias_gelu(F.linear(y2, blk.mlp[0].weight), blk.mlp[0].bias, backend=backend)
            w_next = final.norm_final.weight if last else blocks[i + 1].norm1.weight
            resid, y = mk.gated_residual_modulate(r1, blk.mlp[2](hmid), mods[i], 5, w_next, 0, 1, p=blk.dropout,
                                                  seed=1, offset=2 * i + 1, training=blk.training,
                                                  mod_next=final_mod if last else mods[i + 1], backend=backend)
    err, scale = (y - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-5 * scale + 1e-6, (err, scale)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dropout", [False, True])
def test_gpu_triton_matches_reference_bf16(dropout):
    B, L, d = 4, 1024, 768
    res, h, mod, w, modn = [t.cuda() for t in gated_inputs(B, L, d, torch.bfloat16, torch.bfloat16)]
    p = 0.1 if dropout else 0.0

    def run(backend, dtype):
        cast = lambda t: t.to(dtype) if t.dtype == torch.bfloat16 else t
        def op(res, h, mod, w, modn):
            y0 = mk.adaln_modulate(res, w, mod, 0, 1, out_dtype=torch.bfloat16, backend=backend)
            r, y = mk.gated_residual_modulate(res, h * (1 + y0), mod, 2, w, 0, 1, p=p, seed=5, offset=9,
                                              out_dtype=torch.bfloat16, mod_next=modn, backend=backend)
            return y0, r, y
        return grads(op, [cast(t) for t in (res, h, mod, w, modn)])

    out, g = run("triton", torch.bfloat16)
    assert kb.last_used["gated_residual_modulate"] == "triton"
    low, lg = run("reference", torch.bfloat16)
    exact, eg = run("reference", torch.float32)
    for name, a, lo, ex in zip(("y0", "r", "y", "dres", "dh", "dmod", "dw", "dmodn"), out + g, low + lg, exact + eg):
        assert_2x(name, a, lo, ex)
