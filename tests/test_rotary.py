"""Rotary on the packed qkv projection (mdlm_kernels.rotary_qkv) against the mdlm.nn spec
(``Rotary`` + ``apply_rotary_pos_emb`` + the (B, H, L, D) layout of ``mdlm.nn._attention``), on CPU: the Triton
kernels under TRITON_INTERPRET=1 and the PyTorch reference backend.

Tolerances:
- fp32: q, k, v and dqkv: max abs error <= 1e-6 x (the largest entry) + 1e-7 (the math is the spec's, op for op).
- bf16: the error against the fp32 spec on upcast inputs (tables rounded to bf16, as the published code does)
  must be at most 2x the error of the spec run in bf16, plus 1e-3 x the quantity's scale.
- GPU (cuda-marked, bf16, B=4, L=1024, 12 x 64): Triton vs the reference backend, same 2x criterion.
"""
import pytest
import torch

import mdlm_kernels as mk
from mdlm.nn import Rotary, apply_rotary_pos_emb
from mdlm_kernels import backend as kb

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(
    kb.unavailable_reason("triton", "cpu") is not None, reason=str(kb.unavailable_reason("triton", "cpu")))),
    "reference"]
SHAPES = [(1, 37, 12, 64), (2, 5, 2, 50), (1, 1, 12, 64)]  # (B, L, H, D): H*D = 768 and 100
needs_cpu_triton = pytest.mark.skipif(kb.unavailable_reason("triton", "cpu") is not None,
                                      reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def spec(qkv, cos, sin, table_dtype):
    """mdlm.nn.DDiTBlock: apply_rotary_pos_emb with tables cast to the activation dtype, then the SDPA layout."""
    out = apply_rotary_pos_emb(qkv, cos.to(table_dtype), sin.to(table_dtype))
    return tuple(out.permute(2, 0, 3, 1, 4).unbind(0))  # q, k, v (B, H, L, D)


def grads(fn, x, seed=5):
    x = x.detach().clone().requires_grad_()
    outs = fn(x)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    (dx,) = torch.autograd.grad(loss, (x,))
    return [o.detach() for o in outs] + [dx]


def setup(B, L, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, L, 3, H, D, generator=g) * 2).to(dtype)
    rot = Rotary(D)
    cos, sin = rot(qkv)
    return qkv, rot, cos, sin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,L,H,D", SHAPES)
def test_fp32_matches_spec(backend, B, L, H, D):
    qkv, rot, cos, sin = setup(B, L, H, D, torch.float32)
    c, s = mk.rotary_tables(rot.inv_freq, L)
    assert c.shape == (L, D // 2) and c.dtype == torch.float32
    out = grads(lambda x: mk.rotary_qkv(x, c, s, backend=backend), qkv)
    assert kb.last_used["rotary_qkv"] == backend and kb.last_used["rotary_qkv_backward"] == backend
    assert all(o.shape == (B, H, L, D) and o.is_contiguous() for o in out[:3])
    ref = grads(lambda x: spec(x, cos, sin, torch.float32), qkv)
    for name, a, r in zip(("q", "k", "v", "dqkv"), out, ref):
        err, scale = (a - r).abs().max().item(), r.abs().max().item()
        assert err <= 1e-6 * scale + 1e-7, (name, err, scale)
    assert torch.equal(out[2], ref[2])  # v is a copy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,L,H,D", SHAPES)
def test_bf16_within_twice_the_published_error(backend, B, L, H, D):
    qkv, rot, cos, sin = setup(B, L, H, D, torch.bfloat16, seed=1)
    out = grads(lambda x: mk.rotary_qkv(x, cos, sin, backend=backend), qkv)  # the (1, L, 3, 1, D) cache directly
    assert all(o.dtype == torch.bfloat16 for o in out)
    low = grads(lambda x: spec(x, cos, sin, torch.bfloat16), qkv)
    # fp32 spec on upcast inputs, with the tables rounded to bf16 as the published code rounds them
    exact = grads(lambda x: spec(x, cos.bfloat16().float(), sin.bfloat16().float(), torch.float32), qkv.float())
    for name, a, lo, ex in zip(("q", "k", "v", "dqkv"), out, low, exact):
        err = (a.double() - ex.double()).abs().max().item()
        ref_err = (lo.double() - ex.double()).abs().max().item()
        scale = ex.double().abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * scale, (name, err, ref_err, scale)


def test_tables_from_the_rotary_cache_equal_rotary_tables():
    qkv, rot, cos, sin = setup(2, 5, 2, 50, torch.float32)
    c, s = mk.rotary_tables(rot.inv_freq, 5)
    torch.testing.assert_close(cos[0, :, 0, 0, :25], c, rtol=0, atol=1e-7)
    a = mk.rotary_qkv(qkv, cos, sin, backend="reference")
    b = mk.rotary_qkv(qkv, c, s, backend="reference")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    # longer tables are cut to L
    c9, s9 = mk.rotary_tables(rot.inv_freq, 9)
    for x, y in zip(mk.rotary_qkv(qkv, c9, s9, backend="reference"), b):
        assert torch.equal(x, y)


def test_gradcheck_reference_float64():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3, 3, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    c, s = mk.rotary_tables(Rotary(8).inv_freq, 3)
    assert torch.autograd.gradcheck(lambda x: mk.rotary_qkv(x, c, s, backend="reference"), (qkv,))


@needs_cpu_triton
def test_only_some_outputs_used():
    qkv, rot, cos, sin = setup(1, 4, 2, 8, torch.float32)
    ga = grads(lambda x: mk.rotary_qkv(x, cos, sin, backend="triton")[1:2], qkv)[-1]
    gb = grads(lambda x: spec(x, cos, sin, torch.float32)[1:2], qkv)[-1]
    torch.testing.assert_close(ga, gb)
    assert torch.all(ga[:, :, 0] == 0) and torch.all(ga[:, :, 2] == 0)


@needs_cpu_triton
def test_bad_inputs_raise_clear_errors():
    qkv, rot, cos, sin = setup(1, 4, 2, 8, torch.float32)
    c, s = mk.rotary_tables(rot.inv_freq, 4)
    f = mk.rotary_qkv
    with pytest.raises(ValueError, match=r"\(B, L, 3, H, D\)"):
        f(qkv[:, :, :2], c, s)
    with pytest.raises(ValueError, match="must be even"):
        f(torch.randn(1, 4, 3, 2, 7), c, s)
    with pytest.raises(ValueError, match=r"\(L, D/2\)"):
        f(qkv, c[:, :3], s)
    with pytest.raises(ValueError, match="fewer than the sequence length"):
        f(qkv, c[:2], s[:2])
    with pytest.raises(TypeError, match="dtype"):
        f(qkv.int(), c, s)
    with pytest.raises(ValueError, match="is on meta"):
        f(qkv, c.to("meta"), s)
    with pytest.raises(mk.BackendUnavailableError, match="float64"):
        f(qkv.double(), c, s, backend="triton")
    # non-contiguous qkv is accepted (copied)
    nc = qkv.transpose(0, 1).contiguous().transpose(0, 1)
    for a, b in zip(f(nc, c, s, backend="reference"), f(qkv, c, s, backend="reference")):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    qkv, rot, cos, sin = setup(2, 5, 2, 8, torch.float32)
    c, s = mk.rotary_tables(rot.inv_freq, 5)

    def attn(x):
        q, k, v = mk.rotary_qkv(x, c, s, backend="reference")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).sum()

    a = qkv.clone().requires_grad_()
    out = torch.compile(attn, fullgraph=True, backend="aot_eager")(a)
    out.backward()
    b = qkv.clone().requires_grad_()
    ref = attn(b)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.cuda
def test_gpu_triton_matches_reference_bf16():
    B, L, H, D = 4, 1024, 12, 64
    qkv, rot, cos, sin = setup(B, L, H, D, torch.bfloat16)
    qkv = qkv.cuda()
    c, s = mk.rotary_tables(rot.inv_freq, L, device="cuda")
    out = grads(lambda x: mk.rotary_qkv(x, c, s, backend="triton"), qkv)
    assert kb.last_used["rotary_qkv"] == "triton"
    low = grads(lambda x: mk.rotary_qkv(x, c, s, backend="reference"), qkv)
    exact = grads(lambda x: mk.rotary_qkv(x, c.bfloat16().float(), s.bfloat16().float(), backend="reference"),
                  qkv.float())
    for name, a, lo, ex in zip(("q", "k", "v", "dqkv"), out, low, exact):
        err = (a.double() - ex.double()).abs().max().item()
        ref_err = (lo.double() - ex.double()).abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * ex.double().abs().max().item(), (name, err, ref_err)
        assert (a.float() - lo.float()).abs().max().item() <= 1e-2 * ex.abs().max().item(), name
