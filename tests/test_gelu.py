"""Bias + GELU(tanh) (mdlm_kernels.bias_gelu) against the spec ``F.gelu(x + bias, approximate="tanh")`` (the
published MLP's nn.GELU(approximate="tanh") after its first Linear), on CPU: the Triton kernels under
TRITON_INTERPRET=1 and the PyTorch reference backend.

Tolerances:
- fp32: y, dx, dbias: max abs error <= 2e-6 x (the largest entry) + 1e-6 (the kernel uses the cancellation-free
  form z * sigmoid(2u) of 0.5 z (1 + tanh u)).
- bf16: the error against the fp32 spec on upcast inputs must be at most 2x the error of the spec run in bf16
  (the published dtype flow: bf16 x + bf16 bias, GELU on bf16), plus 1e-3 x the quantity's scale.
- GPU (cuda-marked, bf16, (4, 1024, 768) and the MLP width 3072): Triton vs the reference, same criterion.
"""
import pytest
import torch
import torch.nn.functional as F

import mdlm_kernels as mk
from mdlm_kernels import backend as kb

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(
    kb.unavailable_reason("triton", "cpu") is not None, reason=str(kb.unavailable_reason("triton", "cpu")))),
    "reference"]
SHAPES = [(1, 37, 768), (2, 5, 100), (1, 1, 64)]
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
