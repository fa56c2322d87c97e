"""Rotary on the packed qkv projection (mdlm_kernels.rotary_qkv) against the mdlm.nn spec
(``Rotary`` + ``apply_rotary_pos_emb`` + the (B, H, L, D) layout of ``mdlm.nn._attention``), on CPU: the Triton
kernels under TRITON_INTERPRET=1 (with the interpreter's tiles and with the tiles a GPU launch uses) and the
PyTorch reference backend. Layout: q, k and v are (B, H, L, D) views of fresh (B, L, H, D) buffers (nothing aliases
qkv, so SDPA saving them does not keep qkv alive); SDPA's output then transposes back to (B, L, H*D) without a copy.

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
from mdlm_kernels import launch
from mdlm_kernels.ops import rotary as rotary_mod

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(
    kb.unavailable_reason("triton", "cpu") is not None, reason=str(kb.unavailable_reason("triton", "cpu")))),
    "reference"]
SHAPES = [(1, 37, 12, 64), (2, 5, 2, 50), (1, 1, 12, 64), (1, 1023, 3, 6)]  # (B, L, H, D): H*D = 768, 100, 18
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
    assert all(o.shape == (B, H, L, D) for o in out[:3])
    ref = grads(lambda x: spec(x, cos, sin, torch.float32), qkv)
    for name, a, r in zip(("q", "k", "v", "dqkv"), out, ref):
        err, scale = (a - r).abs().max().item(), r.abs().max().item()
        assert err <= 1e-6 * scale + 1e-7, (name, err, scale)
    assert torch.equal(out[2], ref[2])  # v is qkv's slot 2


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
@pytest.mark.parametrize("used", [0, 1, 2])
def test_only_some_outputs_used(used):
    """A gradient for one of q, k, v only: the other slots of dqkv are zero (v's slot is dv itself)."""
    qkv, rot, cos, sin = setup(1, 4, 2, 8, torch.float32)
    ga = grads(lambda x: mk.rotary_qkv(x, cos, sin, backend="triton")[used:used + 1], qkv)[-1]
    gb = grads(lambda x: spec(x, cos, sin, torch.float32)[used:used + 1], qkv)[-1]
    torch.testing.assert_close(ga, gb)
    for slot in range(3):
        assert torch.all(ga[:, :, slot] == 0) == (slot != used), slot


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

    def layout(x):
        return tuple(t.stride() for t in mk.rotary_qkv(x, c, s, backend="reference"))

    assert torch.compile(layout, fullgraph=True, backend="aot_eager")(qkv) == layout(qkv)
    a = qkv.clone().requires_grad_()
    out = torch.compile(attn, fullgraph=True, backend="aot_eager")(a)
    out.backward()
    b = qkv.clone().requires_grad_()
    ref = attn(b)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_q_k_v_token_major_fresh_buffers_and_attention_output_reshapes_for_free(backend):
    B, L, H, D = 2, 5, 3, 8
    qkv, rot, cos, sin = setup(B, L, H, D, torch.float32)
    q, k, v = mk.rotary_qkv(qkv, cos, sin, backend=backend)
    ptrs = set()
    for x in (q, k, v):
        assert x.shape == (B, H, L, D) and x.stride() == (L * H * D, D, H * D, 1)
        assert x.transpose(1, 2).is_contiguous() and x.untyped_storage().nbytes() == B * L * H * D * 4
        ptrs.add(x.untyped_storage().data_ptr())
    assert len(ptrs) == 3 and qkv.untyped_storage().data_ptr() not in ptrs   # nothing aliases qkv
    assert torch.equal(v, qkv[:, :, 2].transpose(1, 2))                     # v is slot 2, copied exactly
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()      # SDPA (CPU) keeps the query's layout
    a = out.transpose(1, 2).reshape(B, L, H * D)
    assert a.data_ptr() == out.data_ptr() and a._base is not None  # a view, not a copy
    nc = qkv.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(mk.rotary_qkv(nc, cos, sin, backend=backend)[2], v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_on_rotary_outputs_saves_nothing_of_qkv(backend):
    """What autograd keeps for the backward of rotary + SDPA: q, k, v (3 units) and small tables / statistics,
    no storage of qkv (a v viewing qkv's slot 2 kept all of qkv: 5 units)."""
    B, L, H, D = 2, 6, 2, 8
    qkv, rot, cos, sin = setup(B, L, H, D, torch.float32)
    qkv.requires_grad_()
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q, k, v = mk.rotary_qkv(qkv, cos, sin, backend=backend)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert qkv.untyped_storage().data_ptr() not in saved
    unit = B * L * H * D * 4
    big = sorted(n for n in saved.values() if n >= unit)
    assert big == [unit] * 4, big          # q, k, v and the attention output (SDPA's CPU kernel saves it)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


@needs_cpu_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tiles_under_the_interpreter_give_the_same_bits(dtype, monkeypatch):
    """The GPU's tiles (BLOCK_R token rows per program, a partial last program) run under the interpreter give
    exactly the interpreter tiles' q, k, v and dqkv (which the tests above check against the spec)."""
    partial_multi = 0
    for B, L, H, D in SHAPES:
        qkv, rot, cos, sin = setup(B, L, H, D, dtype, seed=2)
        monkeypatch.setattr(rotary_mod, "_CPU_PLANS_AS", None)
        ref = grads(lambda x: mk.rotary_qkv(x, cos, sin, backend="triton"), qkv)
        monkeypatch.setattr(rotary_mod, "_CPU_PLANS_AS", launch.H100)
        rows = rotary_mod._cfg(H, D // 2, launch.H100)[0]
        partial_multi += B * L > rows and (B * L) % rows != 0   # several programs, the last one partial
        out = grads(lambda x: mk.rotary_qkv(x, cos, sin, backend="triton"), qkv)
        for name, a, b in zip(("q", "k", "v", "dqkv"), out, ref):
            assert torch.equal(a, b), (name, (B, L, H, D))
    assert partial_multi >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_reads_strided_gradients(backend):
    """dq/dk/dv in any layout (contiguous (B, H, L, D), the (B, L, H, D) transposed view, a slice) give the
    same dqkv as their contiguous copies."""
    B, L, H, D = 2, 5, 3, 8
    _, rot, _, _ = setup(B, L, H, D, torch.float32)
    c, s = mk.rotary_tables(rot.inv_freq, L)
    g = torch.Generator().manual_seed(3)
    dq = torch.randn(B, L, H, D, generator=g).transpose(1, 2)                 # SDPA/flash layout
    dk = torch.randn(B, H, L, D, generator=g)                                 # contiguous
    dv = torch.randn(B, L, 3, H, D, generator=g)[:, :, 1].transpose(1, 2)     # a slice of a bigger tensor
    got = torch.ops.mdlm.rotary_qkv_backward(dq, dk, dv, c, s, torch.float32, backend)
    ref = torch.ops.mdlm.rotary_qkv_backward(dq.contiguous(), dk, dv.contiguous(), c, s, torch.float32,
                                             "reference")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert torch.equal(got[:, :, 2], dv.transpose(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_op_is_differentiable_and_its_fake_has_the_real_strides(backend):
    """torch.ops.mdlm.rotary_qkv has its own autograd (dq, dk, dv -> dqkv in one op); its fake implementation
    gives the real strides (opcheck)."""
    B, L, H, D = 1, 4, 2, 8
    qkv, rot, cos, sin = setup(B, L, H, D, torch.float32)
    c, s = mk.rotary_tables(rot.inv_freq, L)
    ga = grads(lambda x: torch.ops.mdlm.rotary_qkv(x, c, s, backend), qkv)
    gb = grads(lambda x: spec(x, cos, sin, torch.float32), qkv)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.library.opcheck(torch.ops.mdlm.rotary_qkv.default, (qkv.requires_grad_(), c, s, backend))


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
