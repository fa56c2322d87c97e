"""Fused SUBS linear-cross-entropy (mdlm_kernels.subs_linear_cross_entropy) against the spec
(mdlm.diffusion.subs_nelbo_masked_rows; plain cross-entropy for mask_index=None), on CPU: the Triton row
kernel under TRITON_INTERPRET=1 and the chunked PyTorch backend.

Tolerances:
- fp32 inputs: loss rtol 1e-5 (atol 1e-4 on sums of up to 1023 rows); each gradient: max abs error
  <= 1e-5 x (its largest entry) + 1e-7.
- bf16 inputs: the error of the fused result against the fp32 spec on upcast inputs must be at most
  2x the error of the same spec computed from bf16 logits (the published LM head in bf16), plus 1e-3 x
  the quantity's scale (flash-attention's criterion).
- GPU (cuda-marked): the fused result and the spec run in the input dtype are both compared with the spec
  in float64 on upcast inputs; the fused error must be at most 2x the spec's error plus 1e-6 (fp32) or
  1e-3 (bf16) x the quantity's scale.
"""
import pytest
import torch
import torch.nn.functional as F

import mdlm_kernels as mk
from mdlm.diffusion import subs_nelbo_masked_rows
from mdlm_kernels import backend as kb

# Triton runs CPU tensors only under TRITON_INTERPRET=1 (set by conftest.py on machines without a GPU)
BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(
    kb.unavailable_reason("triton", "cpu") is not None, reason=str(kb.unavailable_reason("triton", "cpu")))),
    "reference"]
CPU_TRITON = "triton" if kb.unavailable_reason("triton", "cpu") is None else "reference"

# (N, d, V, mask_index): awkward N, both widths, the tiny and the GPT-2+MASK vocabulary, MASK last/first/none
SHAPES = [
    (1, 64, 37, 36),
    (37, 64, 37, 0),
    (1023, 64, 37, None),
    (1, 768, 50258, 50257),
    (37, 768, 50258, 50257),
    (1023, 64, 50258, 17),
]


def _inputs(N, d, V, mask_index, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    W = torch.randn(V, d, generator=g) / d ** 0.5 * 2
    b = torch.randn(V, generator=g) * 0.5
    tgt = torch.randint(0, V, (N,), generator=g)
    tgt[0] = V - 1 if mask_index != V - 1 else V - 2     # the last id is a legal target unless it is MASK
    if mask_index is not None:
        tgt[tgt == mask_index] = (mask_index + 1) % V
    w = torch.rand(N, generator=g) * 10 + 1.0                # like 1/t
    return [x.to(dtype) for x in (h, W, b)] + [tgt, w]


def _spec(h, W, b, tgt, w, mask_index):
    """The spec on the given tensors (fp32 math on whatever precision the logits come in)."""
    if mask_index is None:
        z = F.linear(h, W, b).float()
        return F.cross_entropy(z, tgt, reduction="none") * w
    return subs_nelbo_masked_rows(h, W, b, tgt, w, mask_index)


def _grads(fn, tensors):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*ts)
    loss.backward()
    return loss.detach(), [t.grad for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,d,V,mask_index", SHAPES)
def test_fp32_matches_spec(backend, N, d, V, mask_index):
    h, W, b, tgt, w = _inputs(N, d, V, mask_index, torch.float32)
    chunk = 16 if N > 16 else None  # several chunks, including a ragged last one
    out_loss, out_g = _grads(lambda h, W, b: mk.subs_linear_cross_entropy(
        h, W, b, tgt, w, mask_index, chunk_rows=chunk, backend=backend).loss, (h, W, b))
    assert kb.last_used["subs_linear_cross_entropy"] == backend
    ref_loss, ref_g = _grads(lambda h, W, b: _spec(h, W, b, tgt, w, mask_index).sum(), (h, W, b))
    torch.testing.assert_close(out_loss, ref_loss, rtol=1e-5, atol=1e-4)
    for name, a, r in zip("hWb", out_g, ref_g):
        err, scale = (a - r).abs().max().item(), r.abs().max().item()
        assert err <= 1e-5 * scale + 1e-7, (name, err, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,d,V,mask_index", [s for s in SHAPES if s[0] * s[2] <= 37 * 50258])
def test_bf16_error_within_twice_the_bf16_reference(backend, N, d, V, mask_index):
    h, W, b, tgt, w = _inputs(N, d, V, mask_index, torch.bfloat16)
    exact_loss, exact_g = _grads(lambda h, W, b: _spec(h, W, b, tgt, w, mask_index).sum(),
                                 [x.float() for x in (h, W, b)])
    low_loss, low_g = _grads(lambda h, W, b: _spec(h, W, b, tgt, w, mask_index).sum(), (h, W, b))
    out = mk.subs_linear_cross_entropy(h.requires_grad_(), W.requires_grad_(), b.requires_grad_(), tgt, w,
                                       mask_index, backend=backend)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and W.grad.dtype == torch.bfloat16
    for name, a, lo, ex in [("loss", out.loss.detach(), low_loss, exact_loss)] + [
            (n, x.grad, lg, eg) for n, x, lg, eg in zip("hWb", (h, W, b), low_g, exact_g)]:
        err = (a.float() - ex).abs().max().item()
        ref_err = (lo.float() - ex).abs().max().item()
        scale = ex.abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * scale, (name, err, ref_err, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_losses_and_no_grad_mode(backend):
    h, W, b, tgt, w = _inputs(37, 64, 37, 36, torch.float32)
    with torch.no_grad():
        out = mk.subs_linear_cross_entropy(h, W, b, tgt, w, 36, backend=backend)
    torch.testing.assert_close(out.row_losses, _spec(h, W, b, tgt, w, 36), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, out.row_losses.sum(), rtol=1e-6, atol=1e-5)
    assert not out.loss.requires_grad


def test_mask_column_gets_no_gradient_and_no_bias():
    h, W, b, tgt, w = _inputs(37, 64, 37, 5, torch.float32)
    W.requires_grad_()
    mk.subs_linear_cross_entropy(h, W, None, tgt, w, 5, backend=CPU_TRITON).loss.backward()
    assert torch.all(W.grad[5] == 0) and torch.any(W.grad[6] != 0)
    ref = _grads(lambda W: _spec(h, W, None, tgt, w, 5).sum(), (W,))[1][0]
    assert (W.grad - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_scales_with_upstream_gradient_in_fp32(dtype, backend):
    """A non-representable upstream scale (1/3, like 1/token-count) scales every gradient -- hidden, weight and
    bias -- in fp32 and is never rounded to bf16. Weight and bias are fp32 master parameters (their gradients
    are fp32 results, so the scaled gradient is exactly 1/3 of the unscaled one in fp32); hidden is in dtype."""
    h, W, b, tgt, w = _inputs(5, 64, 37, 36, dtype)
    W, b = W.float(), b.float()
    grads = []
    for scale in (1 / 3, None):
        hh, WW, bb = (x.clone().requires_grad_() for x in (h, W, b))
        loss = mk.subs_linear_cross_entropy(hh, WW, bb, tgt, w, 36, backend=backend).loss
        (loss / 3 if scale else loss).backward()
        grads.append((hh.grad, WW.grad, bb.grad))
    (h1, W1, b1), (h2, W2, b2) = grads
    third = torch.tensor(1 / 3, dtype=torch.float32)  # the upstream gradient of loss / 3
    assert torch.equal(h1, (h2.float() * third).to(dtype))  # scaled in fp32, rounded once
    assert torch.equal(W1, W2 * third) and W1.abs().max() > 0
    assert torch.equal(b1, b2 * third) and b1.abs().max() > 0


def test_double_backward_is_refused():
    h, W, b, tgt, w = _inputs(5, 64, 37, 36, torch.float32)
    W.requires_grad_()
    loss = mk.subs_linear_cross_entropy(h, W, b, tgt, w, 36, backend="reference").loss
    (g,) = torch.autograd.grad(loss, W, create_graph=False)
    loss = mk.subs_linear_cross_entropy(h, W, b, tgt, w, 36, backend="reference").loss
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, W, create_graph=True)


def test_only_requested_gradients_are_computed():
    h, W, b, tgt, w = _inputs(7, 64, 37, 36, torch.float32)
    h.requires_grad_()
    mk.subs_linear_cross_entropy(h, W, b, tgt, w, 36, backend="reference").loss.backward()  # frozen head
    ref = _grads(lambda h: _spec(h, W, b, tgt, w, 36).sum(), (h,))[1][0]
    assert (h.grad - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-7
    assert W.grad is None


def test_empty_input():
    h, W, b, tgt, w = _inputs(1, 64, 37, 36, torch.float32)
    out = mk.subs_linear_cross_entropy(h[:0].requires_grad_(), W, b, tgt[:0], w[:0], 36, backend=CPU_TRITON)
    assert out.loss.item() == 0.0 and out.row_losses.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_targets_and_weights(backend):
    h, W, b, tgt, w = _inputs(8, 64, 37, 36, torch.float32)
    for bad, msg in [(37, "targets must be in"), (-1, "targets must be in"), (36, "mask id")]:
        t = tgt.clone()
        t[3] = bad
        with pytest.raises(ValueError, match=msg):
            mk.subs_linear_cross_entropy(h, W, b, t, w, 36, backend=backend)
        # without validation: NaN, never a silent number or a stray read
        out = mk.subs_linear_cross_entropy(h, W, b, t, w, 36, validate=False, backend=backend)
        assert torch.isnan(out.row_losses[3]) and torch.isfinite(out.row_losses[:3]).all()
    w2 = w.clone()
    w2[2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mk.subs_linear_cross_entropy(h, W, b, tgt, w2, 36, backend=backend)


def test_bad_shapes_dtypes_devices():
    h, W, b, tgt, w = _inputs(8, 64, 37, 36, torch.float32)
    f = mk.subs_linear_cross_entropy
    with pytest.raises(ValueError, match="width"):
        f(h[:, :32], W, b, tgt, w, 36)
    with pytest.raises(TypeError, match="hidden must be float32, bfloat16 or float16"):
        f(h.double(), W.double(), b.double(), tgt, w, 36)
    with pytest.raises(TypeError, match="targets must be"):
        f(h, W, b, tgt.float(), w, 36)
    with pytest.raises(ValueError, match="bias"):
        f(h, W, b[:5], tgt, w, 36)
    with pytest.raises(ValueError, match="mask_index"):
        f(h, W, b, tgt, w, 37)
    with pytest.raises(ValueError, match="one device"):
        f(h, W, b, tgt, w.to("meta"), 36)
    with pytest.raises(mk.BackendUnavailableError, match="no cpp implementation"):
        f(h, W, b, tgt, w, 36, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_master_weights_under_autocast(backend):
    """The production setup: fp32 hidden and fp32 master weights under bf16 autocast. The loss and the
    fp32 weight gradient match the spec under the same autocast within the bf16 criterion, and the weight
    gradient is fp32-accumulated (not bf16-rounded)."""
    h, W, b, tgt, w = _inputs(37, 64, 37, 36, torch.float32)
    params = [x.clone().requires_grad_() for x in (h, W, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mk.subs_linear_cross_entropy(*params, tgt, w, 36, backend=backend)
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in params)
    assert not torch.equal(params[1].grad, params[1].grad.bfloat16().float())  # not rounded through bf16
    exact_loss, exact_g = _grads(lambda h, W, b: _spec(h, W, b, tgt, w, 36).sum(), (h, W, b))

    def spec_autocast(h, W, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _spec(h, W, b, tgt, w, 36).sum()

    low_loss, low_g = _grads(spec_autocast, (h, W, b))
    for name, a, lo, ex in [("loss", out.loss.detach(), low_loss, exact_loss)] + list(
            zip("hWb", [p.grad for p in params], low_g, exact_g)):
        err, ref_err, scale = [(a - ex).abs().max().item(), (lo - ex).abs().max().item(), ex.abs().max().item()]
        assert err <= 2 * ref_err + 1e-3 * scale, (name, err, ref_err, scale)


def test_bf16_hidden_with_fp32_weight_without_autocast():
    h, W, b, tgt, w = _inputs(8, 64, 37, 36, torch.float32)
    Wp = W.clone().requires_grad_()
    out = mk.subs_linear_cross_entropy(h.bfloat16(), Wp, b, tgt, w, 36, backend="reference")
    out.loss.backward()
    assert Wp.grad.dtype == torch.float32
    ref = _spec(h.bfloat16(), W.bfloat16(), b.bfloat16(), tgt, w, 36).sum()
    torch.testing.assert_close(out.loss, ref, rtol=1e-2, atol=1e-2)


def test_torch_compile_fullgraph_traces_the_op():
    h, W, b, tgt, w = _inputs(8, 64, 37, 36, torch.float32)

    def step(h, W, b):
        return mk.subs_linear_cross_entropy(h, W, b, tgt, w, 36, validate=False, backend="reference").loss

    Wc = W.clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(h, Wc, b)
    loss.backward()
    We = W.clone().requires_grad_()
    step(h, We, b).backward()
    torch.testing.assert_close(loss, step(h, W, b))
    torch.testing.assert_close(Wc.grad, We.grad)


GPU_SHAPES = SHAPES + [(4099, 768, 50258, 50257)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,d,V,mask_index", GPU_SHAPES)
def test_gpu_triton_matches_spec(dtype, N, d, V, mask_index):
    h, W, b, tgt, w = [x.cuda() for x in _inputs(N, d, V, mask_index, dtype)]
    truth_loss, truth_g = _grads(lambda h, W, b: _spec(h, W, b, tgt, w.double(), mask_index).sum(),
                                 [x.double() for x in (h, W, b)])
    low_loss, low_g = _grads(lambda h, W, b: _spec(h, W, b, tgt, w, mask_index).sum(), (h, W, b))
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    for chunk in (None, 1000):
        out_loss, out_g = _grads(lambda h, W, b: mk.subs_linear_cross_entropy(
            h, W, b, tgt, w, mask_index, chunk_rows=chunk, backend="triton").loss, (h, W, b))
        assert kb.last_used["subs_linear_cross_entropy"] == "triton"
        for name, a, lo, ex in [("loss", out_loss, low_loss, truth_loss)] + list(zip("hWb", out_g, low_g, truth_g)):
            err = (a.double() - ex).abs().max().item()
            ref_err = (lo.double() - ex).abs().max().item()
            scale = ex.abs().max().item()
            assert err <= 2 * ref_err + slack * scale, (name, chunk, err, ref_err, scale)


@pytest.mark.cuda
def test_gpu_extra_memory_stays_bounded():
    """No (N, V) tensor: at N = 32768, V = 50258 (3.3 GB of bf16 logits) the op's extra peak memory is
    the (C, V) chunk plus the fp32 grad_W/grad_b, well under 1 GiB."""
    N, d, V = 32768, 768, 50258
    h, W, b, tgt, w = [x.cuda() for x in _inputs(N, d, V, V - 1, torch.bfloat16)]
    h.requires_grad_(), W.requires_grad_(), b.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = mk.subs_linear_cross_entropy(h, W, b, tgt, w, V - 1, validate=False)
    out.loss.backward()
    torch.cuda.synchronize()
    grads = sum(x.grad.numel() * x.grad.element_size() for x in (h, W, b))
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra < 2 ** 30, extra / 2 ** 30


@pytest.mark.cuda
def test_gpu_launches_on_the_current_stream():
    """Forward (no grad) captured into a CUDA graph: any launch on another stream breaks the capture."""
    h, W, b, tgt, w = [x.cuda() for x in _inputs(300, 64, 50258, 50257, torch.bfloat16)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        mk.subs_linear_cross_entropy(h, W, b, tgt, w, 50257, validate=False, chunk_rows=128)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = mk.subs_linear_cross_entropy(h, W, b, tgt, w, 50257, validate=False, chunk_rows=128)
    graph.replay()
    torch.cuda.synchronize()
    ref = _spec(h.float(), W.float(), b.float(), tgt, w, 50257)
    torch.testing.assert_close(out.row_losses, ref, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# The row kernel with the GPU's tiling (16 rows x 128 columns, pipelined V loop), run by the interpreter
# ---------------------------------------------------------------------------------------------
from mdlm_kernels import launch as _launch                       # noqa: E402
from mdlm_kernels.ops import linear_ce as _lce                    # noqa: E402

# (C, V, mask_index, bias dtype or None, z dtype): tail only; full tiles + tail with MASK in a full tile / the tail /
# the last column of a full tile; no tail; no MASK; ragged row blocks (C not a multiple of 16) throughout
ROW_CASES = [
    (1, 37, 36, torch.float32, torch.float32),
    (37, 300, 5, torch.float32, torch.bfloat16),
    (16, 256, 255, None, torch.float32),
    (20, 300, 290, torch.bfloat16, torch.float32),
    (33, 1000, -1, torch.float32, torch.bfloat16),
]


@pytest.mark.skipif(kb.unavailable_reason("triton", "cpu") is not None, reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("C,V,mask_index,bias_dtype,dtype", ROW_CASES)
def test_row_kernel_with_the_gpu_tiling_matches_the_reference(C, V, mask_index, bias_dtype, dtype):
    """`_rows_triton(..., gpu_plan=H100)` runs exactly the GPU's tile sizes and loops on the interpreter: per-row
    losses, dL/dz written in place, the column sums (grad_b); rows of the buffer past C stay untouched."""
    g = torch.Generator().manual_seed(C * V)
    buf = (torch.randn(C + 3, (V + 63) // 64 * 64, generator=g) * 3).to(dtype)
    z = buf[:C, :V]
    tgt = torch.randint(0, V, (C,), generator=g)
    if mask_index >= 0:
        tgt[tgt == mask_index] = (mask_index + 1) % V
    if C > 3:
        tgt[3] = mask_index if mask_index >= 0 else V    # an invalid target: that row's loss and grads are NaN
    w = torch.rand(C, generator=g) + 0.5
    bias = None if bias_dtype is None else torch.randn(V, generator=g).to(bias_dtype)
    z_ref = z.clone()
    rest = buf[C:].clone()
    loss, db = _lce._rows_triton(z, tgt, w, mask_index, bias, True, gpu_plan=_launch.H100)
    loss_r, db_r = _lce._rows_reference(z_ref, tgt, w, mask_index, bias, True)
    assert torch.equal(buf[C:], rest)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5, equal_nan=True)
    bf16 = dtype == torch.bfloat16
    # dL/dz is stored rounded to nearest even, as on the GPU (also under the interpreter): bf16 values agree bit
    # for bit except where the fp32 value sits within an ulp of a rounding boundary (numpy's exp vs torch's)
    torch.testing.assert_close(z.float(), z_ref.float(), rtol=2 ** -7 if bf16 else 1e-5, atol=1e-6, equal_nan=True)
    if bf16:
        same = (z.view(torch.int16) == z_ref.view(torch.int16)) | (torch.isnan(z) & torch.isnan(z_ref))
        assert same.float().mean() >= 0.999, same.float().mean()
    torch.testing.assert_close(db, db_r, rtol=1e-5, atol=1e-5, equal_nan=True)
    if C > 3:
        assert torch.isnan(loss[3]) and torch.isnan(z[3].float()).all() and torch.isnan(db).all()
    # the no-grad variant: same losses, z untouched
    zz = (torch.randn(C, V, generator=g) * 3).to(dtype)
    keep = zz.clone()
    loss_ng, _ = _lce._rows_triton(zz, tgt, w, mask_index, bias, False, gpu_plan=_launch.H100)
    loss_ng_r, _ = _lce._rows_reference(zz.clone(), tgt, w, mask_index, bias, False)
    assert torch.equal(zz, keep)
    torch.testing.assert_close(loss_ng, loss_ng_r, rtol=1e-5, atol=1e-5, equal_nan=True)
    # without the column sums (no bias, or no weight gradient): the same dL/dz and losses, no grad_b
    z3 = keep.clone()
    loss3, db3 = _lce._rows_triton(z3, tgt, w, mask_index, bias, True, False, gpu_plan=_launch.H100)
    z4 = keep.clone()
    loss4, _ = _lce._rows_triton(z4, tgt, w, mask_index, bias, True, True, gpu_plan=_launch.H100)
    assert db3.numel() == 0 and torch.equal(z3.nan_to_num(), z4.nan_to_num())
    assert torch.equal(loss3.nan_to_num(), loss4.nan_to_num())


def test_chunks_are_balanced_and_bounded():
    for N in (1, 37, 1023, 32768, 32769, 100000):
        for cap in (1, 16, 700, 10672):
            c = _lce.balanced_chunks(N, cap)
            n = -(-N // c)
            # as few chunks as the cap allows, all of one size c (the last one shorter by less than a multiple of 64)
            assert 1 <= c <= cap and n == -(-N // cap) and c - (-(-N // n)) < 64, (N, cap, c)
    # the published shape: ~32k masked rows of V = 50258 in bf16 -> 4 chunks of 8192 rows (1 GiB cap)
    assert _lce.chunk_rows_for(50258, torch.bfloat16) == 10672
    assert _lce.balanced_chunks(32768, 10672) == 8192


@pytest.mark.skipif(kb.unavailable_reason("triton", "cpu") is not None, reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("plan", [_launch.H100, None], ids=["gpu_tiling", "interpreter_tiling"])
def test_row_kernel_rows_whose_first_tiles_are_all_minus_inf(plan):
    """Logits that are -inf over whole leading tiles (e.g. a bias that bans a block of ids) but finite later: the
    online log-sum-exp must not turn exp(-inf - (-inf)) into NaN; losses, dL/dz and column sums equal the
    chunk reference (finite). A row that is -inf everywhere but MASK is NaN in both (as in the spec)."""
    C, V, mask_index = 19, 4200, 4199
    g = torch.Generator().manual_seed(1)
    z = torch.randn(C, V, generator=g) * 3
    bias = torch.zeros(V)
    bias[:4096] = float("-inf")          # one interpreter tile (4096 columns), 32 GPU tiles (128 columns)
    tgt = torch.randint(4096, V - 1, (C,), generator=g)
    w = torch.rand(C, generator=g) + 0.5
    z_ref = z.clone()
    loss, db = _lce._rows_triton(z, tgt, w, mask_index, bias, True, gpu_plan=plan)
    loss_r, db_r = _lce._rows_reference(z_ref, tgt, w, mask_index, bias, True)
    assert torch.isfinite(loss_r).all()
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db, db_r, rtol=1e-5, atol=1e-5)


def test_public_op_with_a_minus_inf_bias_block_matches_the_spec():
    N, d, V, mask_index = 3, 16, 5000, 4999
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g)
    b = torch.zeros(V)
    b[:4096] = float("-inf")
    tgt, w = torch.tensor([4100, 4500, 4998]), torch.ones(N)
    ref = subs_nelbo_masked_rows(h, W, b, tgt, w, mask_index)
    assert torch.isfinite(ref).all()
    out = mk.subs_linear_cross_entropy(h, W, b, tgt, w, mask_index, backend=CPU_TRITON)
    torch.testing.assert_close(out.row_losses, ref, rtol=1e-5, atol=1e-5)


def test_grad_w_accumulation_falls_back_once_when_addmm_rejects_an_fp32_accumulator(monkeypatch):
    """torch CUDA builds before pytorch#167931 reject ``addmm(acc_fp32, a_bf16, b_bf16, out_dtype=float32,
    out=acc)`` ("self and mat2 must have the same dtype"): the first call must warn once, leave acc untouched by the
    failed attempt, add through ``mm(out_dtype=float32)``, and never try addmm again. Simulated on CPU (a fake CUDA
    operand)."""
    import warnings

    class FakeCuda:                                        # what _mm_into_fp32 reads of its bf16 operand
        def __init__(self, t):
            self.t, self.dtype, self.is_cuda = t, t.dtype, True

        def float(self):
            return self.t.float()

    calls = {"addmm": 0, "mm": 0}

    def addmm(acc, a, b, *, out_dtype=None, out=None):
        calls["addmm"] += 1
        raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")

    def mm(a, b, *, out_dtype=None):
        calls["mm"] += 1
        assert out_dtype == torch.float32
        return a.float() @ b.float()

    monkeypatch.setattr(_lce, "_ADDMM_F32_OK", True)
    monkeypatch.setattr(_lce, "_MM_OUT_DTYPE_OK", True)
    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(torch, "mm", mm)
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(5, 3, generator=g)
    a, b = torch.randn(5, 4, generator=g).bfloat16(), torch.randn(4, 3, generator=g).bfloat16()
    expect = acc + 3 * (a.float() @ b.float())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            _lce._mm_into_fp32(acc, FakeCuda(a), b)
    assert calls == {"addmm": 1, "mm": 3}
    assert len(seen) == 1 and "addmm(out_dtype=float32)" in str(seen[0].message)
    torch.testing.assert_close(acc, expect, rtol=1e-6, atol=1e-6)
