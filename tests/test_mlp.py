"""The fused MLP (mdlm_kernels.ops.mlp.gelu_mlp: Linear -> bias+GELU(tanh) -> Linear, the activation recomputed in
the backward) against the spec ``F.linear(F.gelu(F.linear(y, W1, b1), approximate="tanh"), W2, b2)`` (the published
``DDiTBlock.mlp``) and against the unfused chain the DiT's fused path ran before
(``F.linear(bias_gelu(F.linear(y, W1), b1), W2, b2)``), on CPU: bias+GELU by the Triton kernels under
TRITON_INTERPRET=1 and by the PyTorch reference backend; the GEMMs are torch's.

Tolerances:
- fp32: out, dy, dW1, db1, dW2, db2: max abs error <= 1e-5 x (the largest entry) + 1e-6 against the spec and
  against the unfused chain.
- bf16 autocast (CPU): against the fp32 spec on the same inputs, at most 2x the error of the spec run under the same
  autocast, plus 1e-3 x the quantity's scale; the forward output is bit-equal to the unfused chain's (same GEMMs,
  same kernel) and the gradients are within 1e-2 x scale of it (bf16 GEMM results, summation order).
- float64 (reference backend): torch.autograd.gradcheck.
Memory: the Function keeps y and the first GEMM's output only, one (M, n) tensor where the unfused chain keeps two.
"""
import pytest
import torch
import torch.nn.functional as F

import mdlm_kernels as mk
from mdlm_kernels import backend as kb
from mdlm_kernels.ops.mlp import gelu_mlp

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(
    kb.unavailable_reason("triton", "cpu") is not None, reason=str(kb.unavailable_reason("triton", "cpu")))),
    "reference"]
# (B, L, d, n): n = 4 d in the model; odd widths, one row, 1023 columns
SHAPES = [(1, 1, 16, 37), (2, 5, 16, 1023), (1, 37, 24, 96)]
NAMES = ("out", "dy", "dW1", "db1", "dW2", "db2")


def spec(y, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(y, w1, b1), approximate="tanh"), w2, b2)


def unfused(backend):
    return lambda y, w1, b1, w2, b2: F.linear(mk.bias_gelu(F.linear(y, w1), b1, backend=backend), w2, b2)


def fused(backend):
    return lambda y, w1, b1, w2, b2: gelu_mlp(y, w1, b1, w2, b2, backend=backend)


def inputs(B, L, d, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, k=1.0: (torch.randn(*s, generator=g) * k).to(dtype)  # noqa: E731
    return [r(B, L, d), r(n, d, k=d ** -0.5 * 2), r(n), r(d, n, k=n ** -0.5), r(d)]


def run(fn, ts, autocast=False, seed=1):
    ts = [t.detach().clone().requires_grad_() for t in ts]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*ts)
    g = torch.Generator().manual_seed(seed)
    out.float().mul(torch.randn(out.shape, generator=g)).sum().backward()
    return [out.detach()] + [t.grad for t in ts]


def close(a, b, name, rel=1e-5, abs_=1e-6):
    err, scale = (a.double() - b.double()).abs().max().item(), b.double().abs().max().item()
    assert err <= rel * scale + abs_, (name, err, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,L,d,n", SHAPES)
def test_fp32_matches_spec_and_the_unfused_chain(backend, B, L, d, n):
    ts = inputs(B, L, d, n)
    out = run(fused(backend), ts)
    assert kb.last_used["bias_gelu"] == backend and kb.last_used["bias_gelu_backward"] == backend
    assert out[0].shape == (B, L, d) and all(g.shape == t.shape for g, t in zip(out[1:], ts))
    for ref in (run(spec, ts), run(unfused(backend), ts)):
        for name, a, r in zip(NAMES, out, ref):
            close(a, r, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,L,d,n", SHAPES)
def test_bf16_autocast_within_twice_the_published_error(backend, B, L, d, n):
    ts = inputs(B, L, d, n, seed=3)
    out = run(fused(backend), ts, autocast=True)
    assert out[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in out[1:])
    low = run(spec, ts, autocast=True)           # the published dtype flow
    exact = run(spec, [t.double() for t in ts])
    for name, a, lo, ex in zip(NAMES, out, low, exact):
        err = (a.double() - ex).abs().max().item()
        ref_err = (lo.double() - ex).abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * ex.abs().max().item(), (name, err, ref_err)
    old = run(unfused(backend), ts, autocast=True)
    assert torch.equal(out[0], old[0])           # same GEMMs and the same bias+GELU kernel in the forward
    for name, a, r in zip(NAMES[1:], out[1:], old[1:]):
        close(a, r, name, rel=1e-2, abs_=0)


def _saved(fn, ts):
    """Sizes (bytes) of the distinct storages autograd saves for fn's backward, inputs excluded."""
    ts = [t.detach().clone().requires_grad_() for t in ts]
    inputs_ = {t.untyped_storage().data_ptr() for t in ts[1:]}   # the weights; y is counted
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs_:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*ts)
    return sorted(saved.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeps_one_hidden_sized_tensor_instead_of_two(backend):
    B, L, d, n = 2, 5, 16, 64
    ts = inputs(B, L, d, n)
    M = B * L
    assert _saved(fused(backend), ts) == [M * d * 4, M * n * 4]                 # y and y W1^T
    assert _saved(unfused(backend), ts) == [M * d * 4, M * n * 4, M * n * 4]    # ... and the activation


def test_only_some_inputs_need_gradients():
    ts = inputs(2, 3, 8, 20)
    ref = run(spec, ts)
    for need in ([4], [0], [1, 3], [2]):
        xs = [t.detach().clone().requires_grad_(i in need) for i, t in enumerate(ts)]
        gelu_mlp(*xs, backend="reference").mul(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))) \
            .sum().backward()
        for i, x in enumerate(xs):
            if i in need:
                close(x.grad, ref[1 + i], NAMES[1 + i])
            else:
                assert x.grad is None
    out = gelu_mlp(*[t.detach() for t in ts])                                    # no grad at all
    close(out, ref[0], "out")
    assert not out.requires_grad


def test_no_output_bias():
    ts = inputs(2, 3, 8, 20)[:4]
    a = run(lambda *t: gelu_mlp(*t, None, backend="reference"), ts)
    b = run(lambda *t: spec(*t, None), ts)
    for name, x, r in zip(NAMES, a, b):
        close(x, r, name)


def test_gradcheck_reference_float64():
    ts = [t.double().requires_grad_() for t in inputs(2, 3, 4, 7, seed=5)]
    assert torch.autograd.gradcheck(lambda *t: gelu_mlp(*t, backend="reference"), ts)


def test_bad_inputs_raise_clear_errors():
    y, w1, b1, w2, b2 = inputs(2, 3, 8, 20)
    with pytest.raises(ValueError, match="do not chain"):
        gelu_mlp(y, w1[:, :4], b1, w2, b2)
    with pytest.raises(ValueError, match="do not chain"):
        gelu_mlp(y, w1, b1[:5], w2, b2)
    with pytest.raises(ValueError, match="b2 must be"):
        gelu_mlp(y, w1, b1, w2, b2[:3])
    with pytest.raises(TypeError, match="share one dtype"):
        gelu_mlp(y.bfloat16(), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="floating point"):
        gelu_mlp(y.long(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="is on meta"):
        gelu_mlp(y, w1.to("meta"), b1, w2, b2)
    with pytest.raises(mk.BackendUnavailableError, match="float64"):
        gelu_mlp(*[t.double() for t in (y, w1, b1, w2, b2)], backend="triton")


def test_torch_compile_fullgraph():
    ts = inputs(2, 3, 8, 20)
    out = run(torch.compile(fused("reference"), fullgraph=True, backend="aot_eager"), ts)
    ref = run(fused("reference"), ts)
    for name, a, r in zip(NAMES, out, ref):
        torch.testing.assert_close(a, r, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gpu_bf16_autocast_matches_spec(backend):
    """The DiT small MLP (768 -> 3072 -> 768) on 4 x 1024 tokens under bf16 autocast: the 2x criterion against the
    fp32 spec, and the forward bit-equal to the unfused chain."""
    ts = [t.cuda() for t in inputs(4, 1024, 768, 3072)]
    out = _cuda_run(fused(backend), ts)
    low = _cuda_run(spec, ts)
    exact = _cuda_run(spec, ts, autocast=False)
    for name, a, lo, ex in zip(NAMES, out, low, exact):
        err = (a.double() - ex.double()).abs().max().item()
        ref_err = (lo.double() - ex.double()).abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * ex.double().abs().max().item(), (name, err, ref_err)
    assert torch.equal(out[0], _cuda_run(unfused(backend), ts)[0])


def _cuda_run(fn, ts, autocast=True):
    ts = [t.detach().clone().requires_grad_() for t in ts]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*ts)
    g = torch.Generator(device="cuda").manual_seed(1)
    out.float().mul(torch.randn(out.shape, generator=g, device="cuda")).sum().backward()
    return [out.detach()] + [t.grad for t in ts]
