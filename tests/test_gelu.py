"""Bias + GELU(tanh) (mdlm_kernels.bias_gelu) against the spec ``F.gelu(x + bias, approximate="tanh")`` (the
published MLP's nn.GELU(approximate="tanh") after its first Linear), on CPU: the Triton kernels under
TRITON_INTERPRET=1 (with the interpreter's tiles and with a GPU's) and the PyTorch reference backend. The
backward that recomputes the output (``bias_gelu_backward_recompute``, used by the fused MLP) must give the
forward's output bit for bit and the plain backward's dx and dbias bit for bit, on each backend.

Tolerances:
- fp32: y, dx, dbias: max abs error <= 2e-6 x (the largest entry) + 1e-6 (the kernel uses the cancellation-free
  form z * sigmoid(2u) of 0.5 z (1 + tanh u)).
- bf16: the error against the fp32 spec on upcast inputs must be at most 2x the error of the spec run in bf16
  (the published dtype flow: bf16 x + bf16 bias, GELU on bf16), plus 1e-3 x the quantity's scale.
- Interpreter with the GPU's tiles vs the interpreter's tiles: y and dx bit-equal; fp32 dbias within
  1e-5 x (the largest entry) + 1e-6 (the row blocks are summed in another order).
- GPU (cuda-marked, bf16, (4, 1024, 768) and the MLP width 3072): Triton vs the reference, same criterion; the
  recompute backward's output bit-equal to the forward's (FMA contraction must not differ between the kernels).
"""
import pytest
import torch
import torch.nn.functional as F

import mdlm_kernels as mk
from mdlm_kernels import backend as kb
from mdlm_kernels import launch
from mdlm_kernels.ops import gelu as gelu_mod
from mdlm_kernels.ops.gelu import bias_gelu_backward_recompute

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(
    kb.unavailable_reason("triton", "cpu") is not None, reason=str(kb.unavailable_reason("triton", "cpu")))),
    "reference"]
SHAPES = [(1, 37, 768), (2, 5, 100), (1, 1, 64), (1, 1, 1023), (3, 7, 37)]
needs_cpu_triton = pytest.mark.skipif(kb.unavailable_reason("triton", "cpu") is not None,
                                      reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def spec(x, b):
    return F.gelu(x + b, approximate="tanh")


def grads(fn, tensors, seed=3):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*ts)
    g = torch.Generator().manual_seed(seed)
    gs = torch.autograd.grad((out.float() * torch.randn(out.shape, generator=g)).sum(), ts)
    return [out.detach()] + list(gs)


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3
    b = torch.randn(shape[-1], generator=g)
    return x.to(dtype), b.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_spec(backend, shape):
    x, b = inputs(shape, torch.float32)
    out = grads(lambda x, b: mk.bias_gelu(x, b, backend=backend), (x, b))
    assert kb.last_used["bias_gelu"] == backend and kb.last_used["bias_gelu_backward"] == backend
    ref = grads(spec, (x, b))
    for name, a, r in zip(("y", "dx", "dbias"), out, ref):
        err, scale = (a - r).abs().max().item(), r.abs().max().item()
        assert err <= 2e-6 * scale + 1e-6, (name, err, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_within_twice_the_published_error(backend, shape):
    x, b = inputs(shape, torch.bfloat16, seed=1)
    out = grads(lambda x, b: mk.bias_gelu(x, b, backend=backend), (x, b))
    assert out[0].dtype == torch.bfloat16 and out[2].dtype == torch.bfloat16
    low = grads(spec, (x, b))
    exact = grads(spec, (x.float(), b.float()))
    for name, a, lo, ex in zip(("y", "dx", "dbias"), out, low, exact):
        err = (a.double() - ex.double()).abs().max().item()
        ref_err = (lo.double() - ex.double()).abs().max().item()
        scale = ex.double().abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * scale, (name, err, ref_err, scale)


@needs_cpu_triton
def test_fp32_bias_with_bf16_x():
    x, b = inputs((2, 5, 100), torch.float32)
    y = mk.bias_gelu(x.bfloat16(), b, backend="triton")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, spec(x.bfloat16().float(), b).bfloat16(), rtol=1e-2, atol=1e-2)


@needs_cpu_triton
def test_extreme_values():
    x = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 1e-8, 5.0, 30.0, 1e4]])
    b = torch.zeros(8)
    for backend in ("triton", "reference"):
        out = grads(lambda x, b: mk.bias_gelu(x, b, backend=backend), (x, b))
        ref = grads(spec, (x, b))
        assert all(torch.isfinite(o).all() for o in out)
        for a, r in zip(out, ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_recompute_backward_gives_the_forward_output_and_the_backward_bits(backend, dtype, shape):
    x, b = inputs(shape, dtype, seed=4)
    b = b.float()                                   # the MLP's fp32 bias with bf16 activations
    g = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    y = mk.bias_gelu(x, b, backend=backend)
    dx, db = torch.ops.mdlm.bias_gelu_backward(g, x, b, backend)
    gd = g.clone()
    db2, y2 = bias_gelu_backward_recompute(gd, x, b, backend=backend)
    assert kb.last_used["bias_gelu_backward"] == backend
    assert y2.dtype == dtype and db2.dtype == torch.float32
    assert torch.equal(y2, y)                       # the same bits as the forward
    assert torch.equal(gd, dx) and torch.equal(db2, db)   # g overwritten with dx


@needs_cpu_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tiles_under_the_interpreter(dtype, monkeypatch):
    """The GPU launch's tiles (512 columns, 8 rows) and grid (programs looping over row blocks: a 1-SM GPU
    gives 4 programs, so each loops) under the interpreter: y and dx bit-equal to the interpreter tiles', dbias
    equal up to fp32 summation order, with and without the recompute."""
    one_sm = launch.GPU("test GPU with 1 SM", (9, 0), 1)
    loops = 0
    for shape in SHAPES + [(2, 50, 1023)]:
        x, b = inputs(shape, dtype, seed=6)
        b = b.float()                               # dbias in fp32: only its summation order may differ
        g = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        res = []
        for plan in (None, one_sm):
            monkeypatch.setattr(gelu_mod, "_CPU_PLANS_AS", plan)
            gd = g.clone()
            res.append([mk.bias_gelu(x, b, backend="triton"),
                        *torch.ops.mdlm.bias_gelu_backward(g, x, b, "triton"),
                        *bias_gelu_backward_recompute(gd, x, b, backend="triton"), gd])
        M, n = x.numel() // shape[-1], shape[-1]
        bm, bn, _ = gelu_mod._cfg(M, n, one_sm)
        per_col = min(-(-M // bm), -(-gelu_mod._BWD_BLOCKS_PER_SM // -(-n // bn)))   # programs per column block
        loops += -(-M // per_col) > bm                               # a program loops over several row blocks
        (y, dx, db, db2, y2, gd), (y_, dx_, db_, db2_, y2_, gd_) = res
        for name, a, r in (("y", y_, y), ("dx", dx_, dx), ("y2", y2_, y2), ("dx2", gd_, gd)):
            assert torch.equal(a, r), (name, shape)
        for a in (db_, db2_):
            assert (a.float() - db.float()).abs().max() <= 1e-5 * db.float().abs().max() + 1e-6, shape
    assert loops >= 2


def test_gradcheck_reference_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: mk.bias_gelu(x, b, backend="reference"), (x, b))


@needs_cpu_triton
def test_bad_inputs_raise_clear_errors():
    x, b = inputs((2, 5, 16), torch.float32)
    with pytest.raises(ValueError, match="bias must be"):
        mk.bias_gelu(x, b[:8])
    with pytest.raises(TypeError, match="dtype"):
        mk.bias_gelu(x.int(), b)
    with pytest.raises(ValueError, match="is on meta"):
        mk.bias_gelu(x, b.to("meta"))
    with pytest.raises(mk.BackendUnavailableError, match="float64"):
        mk.bias_gelu(x.double(), b.double(), backend="triton")
    nc = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(mk.bias_gelu(nc, b, backend="reference"), mk.bias_gelu(x, b, backend="reference"))
    with pytest.raises(ValueError, match="overwritten with dx"):
        bias_gelu_backward_recompute(x.bfloat16(), x, b)
    with pytest.raises(ValueError, match="contiguous"):
        bias_gelu_backward_recompute(nc, x, b)


def test_torch_compile_fullgraph():
    x, b = inputs((2, 5, 16), torch.float32)
    W = torch.randn(16, 16)

    def mlp(x, b):
        return (mk.bias_gelu(x @ W, b, backend="reference") ** 2).sum()

    xa, ba = x.clone().requires_grad_(), b.clone().requires_grad_()
    out = torch.compile(mlp, fullgraph=True, backend="aot_eager")(xa, ba)
    out.backward()
    xb, bb = x.clone().requires_grad_(), b.clone().requires_grad_()
    ref = mlp(xb, bb)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ba.grad, bb.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4, 1024, 768), (4, 1024, 3072)])
def test_gpu_triton_matches_reference_bf16(shape):
    x, b = [t.cuda() for t in inputs(shape, torch.bfloat16)]
    out = grads(lambda x, b: mk.bias_gelu(x, b, backend="triton"), (x, b))
    assert kb.last_used["bias_gelu"] == "triton"
    low = grads(spec, (x, b))
    exact = grads(lambda x, b: mk.bias_gelu(x, b, backend="reference"), (x.float(), b.float()))
    for name, a, lo, ex in zip(("y", "dx", "dbias"), out, low, exact):
        err = (a.double() - ex.double()).abs().max().item()
        ref_err = (lo.double() - ex.double()).abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * ex.double().abs().max().item(), (name, err, ref_err)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_recompute_backward_gives_the_forward_bits(dtype):
    """On the GPU the two kernels are compiled separately (FMA contraction, approximate division): the recomputed
    activation must still equal the forward's bit for bit, and dx / dbias the plain backward's."""
    x, b = [t.cuda() for t in inputs((4, 1024, 3072), dtype, seed=8)]
    b = b.float()
    g = torch.randn(x.shape, device="cuda").to(dtype)
    y = mk.bias_gelu(x, b, backend="triton")
    dx, db = torch.ops.mdlm.bias_gelu_backward(g, x, b, "triton")
    db2, y2 = bias_gelu_backward_recompute(g, x, b, backend="triton")
    assert torch.equal(y2, y) and torch.equal(g, dx) and torch.equal(db2, db)
