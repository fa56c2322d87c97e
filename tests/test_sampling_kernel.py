"""Fused categorical sampling step (mdlm_kernels.sample_step): cpp (CPU twin) vs the float64 reference,
the header transcendentals, determinism and keying, the distribution of >= 1,000,000 draws, confidences,
top-k / top-p kept sets, errors, torch.compile, and (marked `cuda`) GPU vs CPU twin bit identity plus the
full-scale tail tests.

Tolerances and bounds:
- cpp vs reference tokens: EXACT (every row, every option). The kernel's approximations are the class weights
  (weight32 per element: <= 2^-22 relative to exp of a float32 d, itself within |d| 2^-23; 1 / T rounded to
  float32), float32 sums within 512-column chunks (< 2^-20.8 relative; the row maximum's chunk in float64) and
  float64 sums over chunks: a token can differ from the float64 reference only where u2 Z lands within ~2^-19 Z
  of a class boundary (never on the tested seeds); the MASK decision (u1 < s / t) is the reference's float64
  compare.
- confidences vs the float64 reference / the exact softmax: |cpp - ref| <= CONF_ATOL + CONF_RTOL |ref|
  with CONF_RTOL = 1e-5, CONF_ATOL = 4e-6 (float32 outputs of float64 sums over chunks of float32 chunk sums).
- exp_weight vs math.exp: relative error <= 2^-22 on d in [-708, 0]; weight32 (2^d, base-2 exponents) vs 2^d
  of the same float32 d: <= 2^-22 on [-126, 0], exactly 0 below -126.5.
- logits read per row (the CPU twin's load counter; the CUDA kernel reads the same columns): V - 1 + 2 x 512
  with no filter (one pass, then the 512-column chunk of the row maximum and the chosen chunk), + 3 (V - 1) with
  top-k, + 4 (V - 1) with top-p (row maximum + 3 radix passes), + 6 (V - 1) with both; V - 1 + 512 when greedy
  or when MASK is drawn (fewer where a chunk is the short last one or holds MASK).
- header log64 / exp64 / expf32 vs the C library (Python's math.log / math.exp, correctly rounded
  float32 exp for expf32): at most 1 ulp (measured maximum: 1 ulp for each).
- distribution: chi-square goodness of fit over the non-zero cells, critical value = the chi-square
  quantile at p = 1e-6 for the cell count - 1 (38.26 for 6 degrees of freedom, 40.52 for 7, 33.38 for 4);
  probability-0 cells (filtered by top-k / top-p, MASK when s = 0) must have count 0 exactly.
- tail rows: observed count within the Poisson 5-sigma bound |obs - mu| <= 5 sqrt(mu) (+1 for mu small).
  On CPU the tail classes have probability e^-13.8 ~ 1e-6 relative to the top class (expected ~60
  tail draws): 1e-9 needs >= 2e10 element draws, which the GPU tests below do (expected >= 20 draws at
  1e-9, and >= 100 draws of a class at ~1e-8 relative, which 32-bit Gumbel noise could never draw).
- GPU vs CPU twin: tokens and confidences bit-identical (torch.equal, NaN-aware for invalid rows).
"""

import math

import pytest
import torch

import mdlm_kernels as mk
from mdlm_kernels import _ext
from mdlm_kernels import backend as B
from mdlm_kernels.ops.philox import _buf

HAS_EXT = _ext.available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"extension not built: {_ext.error()}")

CONF_RTOL, CONF_ATOL = 1e-5, 4e-6
SHAPES = [(1023, 37), (37, 50258), (1, 50258)]
SEEDS = [(2**63 + 5, 2**32 - 1), (12345, 0), (2**64 - 1, 2**64 - 1)]
OPTIONS = [dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.9), dict(top_k=5, top_p=0.9, temperature=0.7),
           dict(greedy=True), dict(greedy=True, top_k=5, temperature=0.7)]


def _chi2_sf(x: float, k: int) -> float:
    """Chi-square survival function (series of the regularised lower incomplete gamma)."""
    a, z = k / 2.0, x / 2.0
    term = s = 1.0 / a
    n = 1
    while term > 1e-17 * s:
        term *= z / (a + n)
        s += term
        n += 1
    return 1.0 - math.exp(a * math.log(z) - z - math.lgamma(a)) * s


def _chi2_crit(k: int, p: float = 1e-6) -> float:
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _chi2_sf(mid, k) > p else (lo, mid)
    return lo


def _inputs(N, V, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g) * scale).to(dtype)
    t = torch.rand(N, generator=g) * 0.9 + 0.1
    s = t * torch.rand(N, generator=g)
    s[::5] = 0.0  # some rows with s = 0
    return x, t, s


def _conf_close(a, b):
    return bool(((a.double() - b.double()).abs() <= CONF_ATOL + CONF_RTOL * b.double().abs()).all())


def _eq_nan(a, b):
    return torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)) and torch.equal(a.isnan(), b.isnan())


# ---------------------------------------------------------------------------------------------
# (0) header transcendentals vs the C library
# ---------------------------------------------------------------------------------------------
def _math(fn, xs):
    a = torch.tensor(xs, dtype=torch.float64)
    out = torch.empty_like(a)
    _ext.load().sample_math(fn, _buf(a), _buf(out), a.numel())
    return out


def _ulps64(a, b):
    return (a.view(torch.int64) - b.view(torch.int64)).abs()


@needs_ext
def test_header_log_exp_accuracy():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.exp(torch.empty(50000, dtype=torch.float64).uniform_(-740, 709, generator=g)),
                   1 - torch.rand(20000, dtype=torch.float64, generator=g) * 1e-3,
                   1 + torch.rand(20000, dtype=torch.float64, generator=g) * 1e-3,
                   torch.tensor([1.0, 2.0**-1074, 2.0**-1022, 2.0**-54, 1 - 2.0**-53, 0.5, 2.0, 1e308], dtype=torch.float64)])
    ref = torch.tensor([math.log(v) for v in x.tolist()], dtype=torch.float64)
    assert int(_ulps64(_math(0, x.tolist()), ref).max()) <= 1
    y = torch.cat([torch.empty(50000, dtype=torch.float64).uniform_(-708, 0, generator=g),
                   torch.empty(20000, dtype=torch.float64).uniform_(-1, 1, generator=g),
                   torch.empty(5000, dtype=torch.float64).uniform_(0, 709, generator=g),
                   torch.tensor([0.0, -0.0, -1e-300, -708.0, 709.7], dtype=torch.float64)])
    ref = torch.tensor([math.exp(v) for v in y.tolist()], dtype=torch.float64)
    assert int(_ulps64(_math(1, y.tolist()), ref).max()) <= 1
    z = torch.cat([torch.empty(50000, dtype=torch.float32).uniform_(-87, 0, generator=g),
                   torch.empty(20000, dtype=torch.float32).uniform_(-1, 0, generator=g), torch.tensor([0.0, -87.0])])
    got = _math(2, z.double().tolist()).float()
    ref = torch.exp(z.double()).float()  # correctly rounded float32 exp (double rounding negligible here)
    assert int((got.view(torch.int32).long() - ref.view(torch.int32).long()).abs().max()) <= 1
    # edges: log of 0 / negatives / inf, exp underflow flush, Gumbel range without truncation
    e = _math(0, [0.0, -1.0, float("inf")])
    assert e[0] == float("-inf") and math.isnan(e[1]) and e[2] == float("inf")
    assert _math(1, [-800.0, float("-inf")]).tolist() == [0.0, 0.0]
    u_max = 1 - 2.0**-53
    g_max = -_math(0, [-float(_math(0, [u_max])[0])])[0]
    assert abs(float(g_max) - (-math.log(-math.log(u_max)))) < 1e-13 and float(g_max) > 36.7


# ---------------------------------------------------------------------------------------------
# (1) cpp == reference
# ---------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_matches_reference(shape, dtype):
    N, V = shape
    x, t, s = _inputs(N, V, dtype, seed=N + V)
    opts = OPTIONS if V < 1000 else OPTIONS[:5] + OPTIONS[5:6]
    for i, kw in enumerate(opts):
        seed, offset = SEEDS[i % len(SEEDS)]
        for mask_index in ((V - 1, 0) if i == 0 else (V - 1,)):
            c = mk.sample_step(x, t, s, seed, offset, mask_index=mask_index, backend="cpp", **kw)
            assert B.last_used["sample_step"] == "cpp"
            r = mk.sample_step(x, t, s, seed, offset, mask_index=mask_index, backend="reference", **kw)
            assert B.last_used["sample_step"] == "reference"
            ctx = (shape, dtype, kw, mask_index)
            assert c.tokens.dtype == torch.int64 and c.tokens.shape == (N,), ctx
            assert c.confidence.dtype == torch.float32 and c.confidence.shape == (N, 3), ctx
            assert torch.equal(c.tokens, r.tokens), ctx
            assert _conf_close(c.confidence, r.confidence), ctx
            assert bool(((c.tokens >= 0) & (c.tokens < V)).all())
            if kw.get("greedy"):
                assert not bool((c.tokens == mask_index).any())
            assert not bool((c.tokens[s == 0] == mask_index).any()), ctx


@needs_ext
def test_cpp_matches_reference_row_ids_and_edge_rows():
    V = 37
    x, t, s = _inputs(64, V, torch.float32, seed=5)
    x[3] = 0.0  # all ties: greedy -> lowest index, uniform p
    x[4, :] = float("-inf")
    x[4, 7] = 1.0  # one finite class: always drawn (or MASK)
    x[5, 10:20] = float("-inf")
    x[6] = -0.0
    x[7, V - 1] = float("nan")  # the MASK column is never read
    rid = torch.randint(0, 2**32, (64,), generator=torch.Generator().manual_seed(1))
    for kw in (dict(), dict(greedy=True), dict(top_k=3), dict(top_p=0.5, temperature=2.0)):
        c = mk.sample_step(x, t, s, 9, 10, mask_index=V - 1, row_ids=rid, backend="cpp", **kw)
        r = mk.sample_step(x, t, s, 9, 10, mask_index=V - 1, row_ids=rid, backend="reference", **kw)
        assert torch.equal(c.tokens, r.tokens), kw
        assert _conf_close(c.confidence, r.confidence), kw
    g = mk.sample_step(x, t, s, 9, 10, mask_index=V - 1, greedy=True)
    assert int(g.tokens[3]) == 0 and int(g.tokens[4]) == 7 and int(g.tokens[6]) == 0
    assert float(g.confidence[4, 0]) == 1.0 and float(g.confidence[4, 2]) == 0.0
    assert abs(float(g.confidence[3, 0]) - 1 / (V - 1)) < 1e-7 and float(g.confidence[3, 1]) == 0.0
    assert abs(float(g.confidence[3, 2]) - math.log(V - 1)) < 1e-5


# ---------------------------------------------------------------------------------------------
# (2) determinism and keying
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_deterministic_offsets_and_row_ids(backend):
    if backend == "cpp" and not HAS_EXT:
        pytest.skip("extension not built")
    V = 50
    x = torch.zeros(4000, V)  # uniform rows: draws are easy to compare
    t = torch.ones(4000)
    s = torch.zeros(4000)
    a = mk.sample_step(x, t, s, 77, 5, mask_index=V - 1, backend=backend).tokens
    b = mk.sample_step(x, t, s, 77, 5, mask_index=V - 1, backend=backend).tokens
    assert torch.equal(a, b)
    c = mk.sample_step(x, t, s, 77, 6, mask_index=V - 1, backend=backend).tokens
    d = mk.sample_step(x, t, s, 78, 5, mask_index=V - 1, backend=backend).tokens
    # independent uniform draws over 49 classes agree with probability 1/49
    for other in (c, d):
        frac = float((a == other).double().mean())
        assert abs(frac - 1 / 49) < 5 * math.sqrt((1 / 49) * (48 / 49) / 4000), frac
    rid = torch.tensor([17, 3999, 0, 17])
    e = mk.sample_step(x[:4], t[:4], s[:4], 77, 5, mask_index=V - 1, row_ids=rid, backend=backend).tokens
    assert torch.equal(e, a[rid])


# ---------------------------------------------------------------------------------------------
# (2b) device-side offset (offset_tensor): (offset + uint64(offset_tensor[0])) mod 2^64, read by the
#      kernel when it runs (the CUDA graph use case; the GPU half is in (8))
# ---------------------------------------------------------------------------------------------
# (host offset o, tensor value k as int64) -> effective offset (o + k) mod 2^64
OFFSET_TENSOR_CASES = [(0, 5), (2**64 - 3, 7), (10, -1), (0, 2**40 + 3), (2**32 - 1, 1)]


def _eff(o, k):
    return (o + k) % 2**64


def _same(a, b):
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.confidence, b.confidence)


def _offset_case(dtype):
    N, V = 37, 50
    x, t, s = _inputs(N, V, dtype, seed=123)
    rid = torch.randint(0, 2**32, (N,), generator=torch.Generator().manual_seed(9))
    return x, t, s, dict(mask_index=V - 1, row_ids=rid)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_ext), "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("o,k", OFFSET_TENSOR_CASES)
def test_offset_tensor_equals_host_offset(backend, dtype, o, k):
    x, t, s, kw = _offset_case(dtype)
    seed = 2**63 + 5
    want = mk.sample_step(x, t, s, seed, _eff(o, k), backend=backend, **kw)
    for off in (torch.tensor([k], dtype=torch.int64), torch.tensor(k, dtype=torch.int64)):  # (1,) and ()
        got = mk.sample_step(x, t, s, seed, o, backend=backend, offset_tensor=off, **kw)
        assert B.last_used["sample_step"] == backend
        assert _same(got, want), (backend, dtype, o, k, tuple(off.shape))
    # the offset matters (the case is not degenerate) and top-k / top-p / temperature paths agree too
    assert not torch.equal(want.tokens, mk.sample_step(x, t, s, seed, _eff(o, k + 1), backend=backend, **kw).tokens)
    opts = dict(top_k=7, top_p=0.9, temperature=0.7)
    assert _same(mk.sample_step(x, t, s, seed, o, backend=backend, offset_tensor=torch.tensor([k]), **opts, **kw),
                 mk.sample_step(x, t, s, seed, _eff(o, k), backend=backend, **opts, **kw))


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_ext), "reference"])
def test_offset_tensor_read_at_call_time(backend):
    """The graph use case on CPU: one tensor, changed in place between calls, moves the draws exactly as
    the host offset would; a (1,) view into a larger buffer reads the viewed element."""
    x, t, s, kw = _offset_case(torch.float32)
    off = torch.zeros(1, dtype=torch.int64)
    o = 2**64 - 2
    outs = []
    for _ in range(4):
        outs.append(mk.sample_step(x, t, s, 77, o, backend=backend, offset_tensor=off, **kw))
        off += 1
    assert int(off) == 4
    for i, got in enumerate(outs):
        assert _same(got, mk.sample_step(x, t, s, 77, _eff(o, i), backend=backend, **kw)), i
    assert not torch.equal(outs[0].tokens, outs[1].tokens)
    buf = torch.arange(-3, 5, dtype=torch.int64)
    assert _same(mk.sample_step(x, t, s, 77, 100, backend=backend, offset_tensor=buf[1:2], **kw),
                 mk.sample_step(x, t, s, 77, 98, backend=backend, **kw))
    # greedy draws nothing: the offset tensor is accepted and changes nothing
    g = mk.sample_step(x, None, None, 77, 0, greedy=True, backend=backend, offset_tensor=off, **kw)
    assert _same(g, mk.sample_step(x, None, None, 77, 0, greedy=True, backend=backend, **kw))


@pytest.mark.parametrize(
    "off,exc,match",
    [
        (torch.tensor([1.0]), TypeError, "sample_step: offset_tensor must be torch.int64, got torch.float32"),
        (torch.tensor([1], dtype=torch.int32), TypeError, "sample_step: offset_tensor must be torch.int64"),
        (torch.tensor([1, 2]), ValueError, "sample_step: offset_tensor must have shape \\(1,\\) or \\(\\)"),
        (torch.zeros(0, dtype=torch.int64), ValueError, "sample_step: offset_tensor must have shape"),
        (torch.zeros(1, dtype=torch.int64, device="meta"), ValueError,
         "sample_step: offset_tensor is on meta but the op runs on cpu"),
        (3, TypeError, "sample_step: offset_tensor must be a torch.Tensor"),
        (None, None, None),  # None: the host offset only (the default)
    ],
)
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_ext), "reference"])
def test_offset_tensor_errors(off, exc, match, backend):
    kw = _ok()
    args = (kw.pop("logits"), kw.pop("t"), kw.pop("s"), kw.pop("seed"))
    if exc is None:
        mk.sample_step(*args, backend=backend, offset_tensor=off, **kw)
        return
    with pytest.raises(exc, match=match):
        mk.sample_step(*args, backend=backend, offset_tensor=off, **kw)
    if isinstance(off, torch.Tensor):  # the op (and its fake) check too: the kernels dereference the pointer
        with pytest.raises(exc, match=match):
            torch.ops.mdlm.sample_step(args[0], args[1], args[2], None, 0, 0, 4, 1.0, 0, 1.0, False, backend, off)


@needs_ext
def test_binding_offset_ptr():
    C = _ext.load()
    x = torch.randn(3, 5)
    t, s = torch.ones(3), torch.full((3,), 0.25)
    tokens = torch.empty(3, dtype=torch.int64)
    conf = torch.empty(3, 3)
    off = torch.tensor([-2], dtype=torch.int64)
    args = dict(logits=_buf(x), dtype_code=0, t=_buf(t), s=_buf(s), row_ids=(0, 0), tokens=_buf(tokens),
                conf=_buf(conf), rows=3, vocab=5, seed=4, offset=9, mask_index=4, temperature=1.0, top_k=0,
                top_p=1.0, greedy=False)
    C.sample_step_cpu(**args, offset_buf=_buf(off))
    want = mk.sample_step(x, t, s, 4, 7, mask_index=4, backend="reference")
    assert torch.equal(tokens, want.tokens)
    with pytest.raises(ValueError, match="sample_step_cpu: offset_buf must be the 8-byte aligned"):
        C.sample_step_cpu(**args, offset_buf=(off.data_ptr() + 2, 8))
    with pytest.raises(ValueError, match="sample_step_cuda: offset_buf must be the 8-byte aligned"):
        C.sample_step_cuda(**args, stream=0, offset_buf=(4, 8))
    with pytest.raises(ValueError, match="sample_step_cpu: offset_buf: the buffer holds 4 bytes but the call "
                                         "accesses 8 bytes"):
        C.sample_step_cpu(**args, offset_buf=(off.data_ptr(), 4))


# ---------------------------------------------------------------------------------------------
# (3) distribution
# ---------------------------------------------------------------------------------------------
def _counts(logits_row, n, t, s, V, mask_index, seed, offset=0, **kw):
    x = logits_row.view(1, V).expand(n, V).contiguous()
    tt = torch.full((n,), t)
    ss = torch.full((n,), s)
    tok = mk.sample_step(x, tt, ss, seed, offset, mask_index=mask_index, row_ids=torch.arange(n), backend="cpp",
                         **kw).tokens
    return torch.bincount(tok, minlength=V).double()


def _exact_probs(row, t, s, mask_index, temperature=1.0, top_k=0, top_p=1.0):
    """The definition, from a full sort (float64; rows with distinct logits)."""
    V = row.numel()
    x = row.double()
    idx = [v for v in range(V) if v != mask_index]
    keep = torch.zeros(V, dtype=torch.bool)
    keep[idx] = True
    if 0 < top_k < V - 1:
        kth = torch.sort(x[idx], descending=True).values[top_k - 1]
        keep &= x >= kth
    a = x / temperature
    if top_p < 1:
        w = torch.where(keep, torch.exp(a - a[keep].max()), torch.zeros(()))
        w = w / w.sum()
        order = torch.argsort(torch.where(keep, x, torch.full((), -math.inf, dtype=torch.float64)), descending=True)
        ws = w[order]
        above = torch.empty(V, dtype=torch.float64)
        above[order] = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ws, 0)[:-1]])  # distinct logits
        keep &= above < top_p
    p = torch.where(keep, torch.exp(a - a[keep].max()), torch.zeros((), dtype=torch.float64))
    p = p / p.sum() * (t - s) / t
    p[mask_index] = s / t
    return p, keep


def _chi2(counts, probs):
    n = counts.sum()
    nz = probs > 0
    assert float(counts[~nz].sum()) == 0.0, "a probability-0 class was drawn"
    e = probs[nz] * n
    stat = float(((counts[nz] - e) ** 2 / e).sum())
    return stat, int(nz.sum()) - 1


@needs_ext
def test_distribution_chi_square_million_draws():
    V, mask = 8, 7
    row = torch.tensor([0.5, -1.0, 2.0, 0.3, -3.0, 1.0, 0.0, 0.0])
    t, s = 0.8, 0.3
    counts = _counts(row, 1_000_000, t, s, V, mask, seed=2024, offset=3)
    p, _ = _exact_probs(row, t, s, mask)
    stat, df = _chi2(counts, p)
    assert df == 7 and stat < _chi2_crit(df), (stat, _chi2_crit(df))
    assert abs(float(counts[mask]) / 1e6 - s / t) < 5 * math.sqrt((s / t) * (1 - s / t) / 1e6)


@needs_ext
def test_distribution_filtered_temperature_and_s_zero():
    V, mask = 8, 3
    row = torch.tensor([0.5, -1.0, 2.0, 9.0, 1.7, 1.0, 0.0, -0.4])
    kw = dict(temperature=0.7, top_k=5, top_p=0.9)
    p, keep = _exact_probs(row, 0.6, 0.0, mask, **kw)
    assert p[mask] == 0 and int(keep.sum()) == 3  # top-k keeps 5, top-p 3 of them; MASK never (s = 0)
    counts = _counts(row, 1_000_000, 0.6, 0.0, V, mask, seed=7, offset=2**40, **kw)
    stat, df = _chi2(counts, p)
    assert df == 2 and stat < _chi2_crit(df), (stat, _chi2_crit(df))


@needs_ext
def test_distribution_tail_classes_cpu_scale():
    """Tail classes at probability e^-13.8 relative to the top class (see the header: 1e-9 runs on GPU)."""
    K, n = 255, 250_000
    V = K + 2
    row = torch.full((V,), -13.8)
    row[0] = 0.0
    row[V - 1] = 0.0  # MASK column (ignored)
    counts = _counts(row, n, 1.0, 0.0, V, V - 1, seed=31337)
    r = math.exp(-13.8)
    mu = n * K * r / (1 + K * r)
    obs = float(counts[1:V - 1].sum())
    assert abs(obs - mu) <= 5 * math.sqrt(mu) + 1, (obs, mu)
    assert counts[V - 1] == 0


# ---------------------------------------------------------------------------------------------
# (4) confidence values
# ---------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confidence_exact(dtype):
    x, t, s = _inputs(50, 301, dtype, seed=3, scale=4.0)
    x[0, 5] = 40.0  # a peaked row: entropy near 0
    for kw in (dict(), dict(temperature=0.5), dict(top_k=7)):
        out = mk.sample_step(x, t, s, 1, 2, mask_index=300, backend="cpp", **kw)
        for i in range(50):
            p, _ = _exact_probs(x[i].float(), 1.0, 0.0, 300, **kw)
            p[300] = 0.0
            top = torch.topk(p, 2).values
            nz = p > 0
            ent = float(-(p[nz] * torch.log(p[nz])).sum())
            want = torch.tensor([float(top[0]), float(top[0] - top[1]), ent])
            assert _conf_close(out.confidence[i], want), (i, kw, out.confidence[i], want)


# ---------------------------------------------------------------------------------------------
# (5) top-k / top-p kept sets vs a full sort
# ---------------------------------------------------------------------------------------------
def _kept_by_kernel(x, mask_index, temperature, top_k, top_p):
    N, V = x.shape
    keys = torch.empty(N, dtype=torch.int64)
    x = x.contiguous()
    _ext.load().sample_threshold_cpu(_buf(x), 0 if x.dtype == torch.float32 else 1, _buf(keys), N, V,
                                     mask_index, temperature, top_k, top_p)
    b = x.float().view(torch.int32).long() & 0xFFFFFFFF
    b = torch.where((b & 0x7FFFFFFF) == 0, torch.zeros_like(b), b)
    key = torch.where(b >= 2**31, (~b) & 0xFFFFFFFF, b | 2**31)
    kept = key >= keys.view(N, 1)
    kept[:, mask_index] = False
    return kept


@needs_ext
@pytest.mark.parametrize("V", [37, 5003])
def test_top_k_top_p_kept_sets(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(24, V, generator=g) * 2.5  # distinct logits
    mask = V // 2
    for top_k, top_p, temp in ((1, 1.0, 1.0), (5, 1.0, 1.0), (V - 2, 1.0, 1.0), (0, 0.9, 1.0), (0, 0.5, 0.7),
                               (0, 1e-9, 1.0), (20, 0.8, 1.3)):
        kept = _kept_by_kernel(x, mask, temp, top_k, top_p)
        for i in range(x.shape[0]):
            _, want = _exact_probs(x[i], 1.0, 0.0, mask, temperature=temp, top_k=top_k, top_p=top_p)
            assert torch.equal(kept[i], want), (V, top_k, top_p, temp, i)
            if top_k and top_p == 1.0:
                assert int(kept[i].sum()) == top_k
    # ties at the threshold are kept: three logits tie for the 2nd place
    row = torch.tensor([[5.0, 1.0, 1.0, 1.0, 0.0, -2.0]])
    assert _kept_by_kernel(row, 5, 1.0, 2, 1.0)[0].tolist() == [True, True, True, True, False, False]


# ---------------------------------------------------------------------------------------------
# (6) errors, invalid rows and dispatch
# ---------------------------------------------------------------------------------------------
def _ok(**over):
    kw = dict(logits=torch.zeros(2, 5), t=torch.ones(2), s=torch.zeros(2), seed=0, mask_index=4)
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(logits=torch.zeros(5)), ValueError, "rank 2"),
        (dict(logits=torch.zeros(2, 5, 1)), ValueError, "rank 2"),
        (dict(logits=torch.zeros(2, 5, dtype=torch.float64)), TypeError, "float32 or bfloat16"),
        (dict(logits=torch.zeros(2, 5, dtype=torch.float16)), TypeError, "float32 or bfloat16"),
        (dict(logits=[[0.0]]), TypeError, "must be a torch.Tensor"),
        (dict(logits=torch.zeros(2, 1), mask_index=0), ValueError, "V >= 2"),
        (dict(mask_index=5), ValueError, "mask_index must be in"),
        (dict(mask_index=-1), ValueError, "mask_index must be in"),
        (dict(mask_index=1.0), TypeError, "mask_index must be an int"),
        (dict(t=torch.ones(3)), ValueError, "t must have shape"),
        (dict(s=torch.zeros(2, 1)), ValueError, "s must have shape"),
        (dict(t=torch.ones(2, dtype=torch.float64)), TypeError, "t must be float32"),
        (dict(t=None), TypeError, "None only with greedy"),
        (dict(s=torch.zeros(2, device="meta")), ValueError, "same device"),
        (dict(row_ids=torch.zeros(3, dtype=torch.int64)), ValueError, "row_ids must have shape"),
        (dict(row_ids=torch.zeros(2, dtype=torch.int32)), TypeError, "row_ids must be int64"),
        (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
        (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
        (dict(temperature=1e-40), ValueError, "use greedy=True"),
        (dict(temperature=1e31), ValueError, "temperature must be <= 1e\\+30"),
        (dict(top_p=0.0), ValueError, "top_p must be in \\(0, 1\\]"),
        (dict(top_p=1.5), ValueError, "top_p must be in"),
        (dict(top_p=float("nan")), ValueError, "top_p must be in"),
        (dict(top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(top_k=2.0), TypeError, "top_k must be an int"),
        (dict(seed=-1), ValueError, "sample_step: seed must be in"),
        (dict(offset=2**64), ValueError, "offset must be in"),
        (dict(greedy=1), TypeError, "greedy must be a bool"),
        (dict(backend="cudnn"), ValueError, "unknown backend"),
        # value checks on the data (CPU eager): t <= s, NaN logits, bad row ids
        (dict(t=torch.tensor([0.5, 0.3]), s=torch.tensor([0.1, 0.3])), ValueError, "row 1: t=0.3.*violate"),
        (dict(t=torch.tensor([1.5, 0.3]), s=torch.tensor([0.1, 0.1])), ValueError, "row 0: t=1.5"),
        (dict(s=torch.tensor([-0.1, 0.0])), ValueError, "violate 0 <= s < t <= 1"),
        (dict(logits=torch.tensor([[0.0, 1, 2, 3, 4], [0, float("nan"), 0, 0, 0]])), ValueError, "row 1: NaN logits"),
        (dict(logits=torch.tensor([[0.0, float("inf"), 2, 3, 4], [0, 0, 0, 0, 0]])), ValueError, "row 0: \\+inf"),
        (dict(logits=torch.full((2, 5), float("-inf"))), ValueError, "no class with probability > 0"),
        (dict(row_ids=torch.tensor([0, -3])), ValueError, "row id -3 outside"),
        (dict(row_ids=torch.tensor([2**32, 0])), ValueError, "outside \\[0, 2\\^32\\)"),
    ],
)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_input_errors(kwargs, exc, match, backend):
    if backend == "cpp" and not HAS_EXT:
        pytest.skip("extension not built")
    kw = _ok(**kwargs)
    with pytest.raises(exc, match=match):
        mk.sample_step(kw.pop("logits"), kw.pop("t"), kw.pop("s"), kw.pop("seed"), **dict(dict(backend=backend), **kw))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_invalid_rows_without_validate(backend):
    if backend == "cpp" and not HAS_EXT:
        pytest.skip("extension not built")
    x = torch.randn(5, 9)
    x[1, 3] = float("nan")
    x[2, 8] = float("nan")  # MASK column: ignored
    t = torch.tensor([0.9, 0.9, 0.9, 0.4, 0.9])
    s = torch.tensor([0.2, 0.2, 0.2, 0.4, 0.2])  # row 3: s == t
    out = mk.sample_step(x, t, s, 1, mask_index=8, validate=False, backend=backend)
    assert out.tokens[[1, 3]].tolist() == [-1, -1]
    assert bool((out.tokens[[0, 2, 4]] >= 0).all())
    assert bool(out.confidence[[1, 3]].isnan().all()) and not bool(out.confidence[[0, 2, 4]].isnan().any())
    g = mk.sample_step(x, t, s, 1, mask_index=8, greedy=True, validate=False, backend=backend)
    assert g.tokens.tolist()[1] == -1 and g.tokens.tolist()[3] >= 0  # greedy ignores t, s


def test_zero_rows_and_greedy_without_times():
    out = mk.sample_step(torch.zeros(0, 7), torch.zeros(0), torch.zeros(0), 1, mask_index=6)
    assert out.tokens.shape == (0,) and out.confidence.shape == (0, 3)
    g = mk.sample_step(torch.tensor([[0.0, 3.0, 3.0, -1.0]]), None, None, 0, mask_index=1, greedy=True)
    assert g.tokens.tolist() == [2]  # column 1 is MASK: excluded


def test_forced_triton_unavailable(monkeypatch):
    kw = _ok()
    args = (kw.pop("logits"), kw.pop("t"), kw.pop("s"), kw.pop("seed"))
    with pytest.raises(mk.BackendUnavailableError, match="requested for sample_step"):
        mk.sample_step(*args, backend="triton", **kw)
    monkeypatch.setattr(B, "unavailable_reason", lambda b, d: None)
    with pytest.raises(mk.BackendUnavailableError, match="sample_step has no Triton implementation"):
        mk.sample_step(*args, backend="triton", **kw)


@needs_ext
def test_binding_validates():
    C = _ext.load()
    args = dict(logits=(0, 0), dtype_code=0, t=(0, 0), s=(0, 0), row_ids=(0, 0), tokens=(0, 0), conf=(0, 0), rows=0,
                vocab=5, seed=0, offset=0, mask_index=4, temperature=1.0, top_k=0, top_p=1.0, greedy=False)
    C.sample_step_cpu(**args)  # empty: fine
    for change, match in ((dict(dtype_code=3), "unsupported dtype code 3"), (dict(vocab=1), "vocab must be in"),
                          (dict(mask_index=5), "mask_index must be in"), (dict(temperature=0.0), "temperature"),
                          (dict(top_p=0.0), "top_p must be in"), (dict(top_k=-2), "top_k must be >= 0"),
                          (dict(rows=-1), "rows must be >= 0"), (dict(rows=1), "null data pointer")):
        with pytest.raises(ValueError, match=match):
            C.sample_step_cpu(**dict(args, **change))


# ---------------------------------------------------------------------------------------------
# (7) torch.compile / fake
# ---------------------------------------------------------------------------------------------
def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 11, dtype=torch.bfloat16)
        tok, conf = torch.ops.mdlm.sample_step(x, torch.empty(3), torch.empty(3), None, 1, 0, 10, 1.0, 0, 1.0,
                                               False, None)
    assert tok.shape == (3,) and tok.dtype == torch.int64
    assert conf.shape == (3, 3) and conf.dtype == torch.float32


def test_torch_compile_fullgraph():
    def f(x, t, s, rid):
        out = mk.sample_step(x, t, s, 11, 3, mask_index=x.shape[1] - 1, row_ids=rid, top_k=4)
        return out.tokens + 1, out.confidence * 2.0

    x, t, s = _inputs(6, 33, torch.float32, seed=2)
    rid = torch.arange(6) * 7
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    try:
        got = compiled(x, t, s, rid)
    except RuntimeError as e:  # pragma: no cover - broken compiler toolchain, not our op
        if "compile" in str(e).lower() and "mdlm" not in str(e):
            pytest.skip(f"torch.compile unusable here: {e}")
        raise
    for a, b in zip(got, f(x, t, s, rid)):
        assert torch.equal(a, b)


def test_fake_impl_shapes_offset_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 11)
        tok, conf = torch.ops.mdlm.sample_step(x, torch.empty(3), torch.empty(3), None, 1, 0, 10, 1.0, 0, 1.0,
                                               False, None, torch.zeros(1, dtype=torch.int64))
    assert tok.shape == (3,) and tok.dtype == torch.int64
    assert conf.shape == (3, 3) and conf.dtype == torch.float32


def test_offset_tensor_through_op_and_torch_compile():
    """The torch.library op takes the tensor (schema: ..., backend, offset_tensor); under
    torch.compile(fullgraph=True) the op reads its value when the graph runs, and an in-place advance
    inside the compiled function is ordered after the draw (what a graph-captured loop does)."""
    x, t, s = _inputs(6, 33, torch.float32, seed=2)
    rid = torch.arange(6) * 7
    M = 32
    off = torch.tensor([5], dtype=torch.int64)
    tok, conf = torch.ops.mdlm.sample_step(x, t, s, rid, 11, 3, M, 1.0, 4, 1.0, False, None, off)
    want = mk.sample_step(x, t, s, 11, 8, mask_index=M, row_ids=rid, top_k=4)
    assert torch.equal(tok, want.tokens) and torch.equal(conf, want.confidence)

    def f(x, t, s, rid, off):
        out = mk.sample_step(x, t, s, 11, 2**64 - 1, mask_index=M, row_ids=rid, top_k=4, offset_tensor=off)
        off.add_(1)
        return out.tokens + 1, out.confidence * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    off = torch.tensor([-1], dtype=torch.int64)
    try:
        first = compiled(x, t, s, rid, off)
    except RuntimeError as e:  # pragma: no cover - broken compiler toolchain, not our op
        if "compile" in str(e).lower() and "mdlm" not in str(e):
            pytest.skip(f"torch.compile unusable here: {e}")
        raise
    second = compiled(x, t, s, rid, off)
    assert int(off) == 1
    for got, host_off in ((first, 2**64 - 2), (second, 2**64 - 1)):
        want = mk.sample_step(x, t, s, 11, host_off, mask_index=M, row_ids=rid, top_k=4)
        assert torch.equal(got[0], want.tokens + 1) and torch.equal(got[1], want.confidence * 2.0), host_off


# ---------------------------------------------------------------------------------------------
# (8) GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES + [(4099, 64), (3, 300_001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_cpu_twin(shape, dtype):
    N, V = shape
    x, t, s = _inputs(N, V, dtype, seed=N)
    x[0, 1] = float("nan")  # an invalid row
    if N > 2:
        t[2] = s[2]  # s >= t: invalid
    rid = torch.randint(0, 2**32, (N,), generator=torch.Generator().manual_seed(4))
    for i, kw in enumerate(OPTIONS + [dict(top_p=0.3, temperature=1.7), dict(top_k=1)]):
        seed, offset = SEEDS[i % len(SEEDS)]
        for row_ids, entropy in ((None, True), (rid, True), (rid, False)):   # entropy=False: the other kernel
            common = dict(mask_index=V - 1, row_ids=row_ids, validate=False, entropy=entropy, **kw)
            cpu = mk.sample_step(x, t, s, seed, offset, backend="cpp", **common)
            gpu = mk.sample_step(x.cuda(), t.cuda(), s.cuda(), seed, offset, backend="cpp",
                                 **dict(common, row_ids=None if row_ids is None else row_ids.cuda()))
            assert gpu.tokens.is_cuda
            assert torch.equal(gpu.tokens.cpu(), cpu.tokens), (shape, dtype, kw)
            assert _eq_nan(gpu.confidence.cpu(), cpu.confidence), (shape, dtype, kw)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 1023), (5, 50258)])
def test_entropy_off_changes_nothing_else(shape, dtype):
    """entropy=False (what the samplers pass) skips the entropy's per-element term: confidence[:, 2] is NaN on both
    backends, and the tokens, max prob and margin are the same bits as with entropy=True (the weights and the
    chunk sums do not depend on it), for every option, invalid rows included."""
    N, V = shape
    x, t, s = _inputs(N, V, dtype, seed=V)
    x[0, 3] = float("nan")                                    # an invalid row: NaN confidences either way
    for i, kw in enumerate(OPTIONS):
        seed, offset = SEEDS[i % len(SEEDS)]
        common = dict(mask_index=V // 2, validate=False, **kw)
        on = mk.sample_step(x, t, s, seed, offset, backend="cpp", **common)
        off = mk.sample_step(x, t, s, seed, offset, backend="cpp", entropy=False, **common)
        ref = mk.sample_step(x, t, s, seed, offset, backend="reference", entropy=False, **common)
        assert torch.equal(on.tokens, off.tokens) and torch.equal(ref.tokens, off.tokens), kw
        assert _eq_nan(on.confidence[:, :2], off.confidence[:, :2]), kw
        assert bool(off.confidence[:, 2].isnan().all()) and bool(ref.confidence[:, 2].isnan().all()), kw
        assert bool(on.confidence[1:, 2].isfinite().all()), kw     # on: the entropy of every valid row


def test_samplers_do_not_ask_for_the_entropy(monkeypatch):
    """The fused samplers never read confidence[:, 2], so they pass entropy=False (the faster kernel)."""
    import mdlm
    from mdlm.samplers import fast_sample
    seen = []
    real = mk.sample_step

    def spy(*a, **k):
        seen.append(k.get("entropy", True))
        return real(*a, **k)

    monkeypatch.setattr(mk, "sample_step", spy)
    cfg = mdlm.preset("tiny", **{"model.length": 8})
    model = mdlm.MDLM(cfg, 50)
    for sampler in ("ddpm_cache", "first_hitting", "confidence"):
        fast_sample(model, 2, steps=4, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert seen and not any(seen)


@pytest.mark.cuda
def test_gpu_uses_current_stream():
    x, t, s = _inputs(512, 5000, torch.bfloat16, seed=1)
    xc, tc, sc = x.cuda(), t.cuda(), s.cuda()
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        out = mk.sample_step(xc, tc, sc, 3, 4, mask_index=4999, top_p=0.9, validate=False)
    st.synchronize()
    ref = mk.sample_step(x, t, s, 3, 4, mask_index=4999, top_p=0.9, backend="cpp")
    assert torch.equal(out.tokens.cpu(), ref.tokens) and torch.equal(out.confidence.cpu(), ref.confidence)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_graph_offset_tensor(dtype):
    """sample_step with a device-side offset captured in a CUDA graph together with `off += 1`: three
    replays draw at offsets o, o + 1, o + 2 (wrapping past 2^64), bit-identical to eager calls with
    those host offsets and to the CPU twin."""
    N, V = 37, 50
    x, t, s = _inputs(N, V, dtype, seed=17)
    rid = torch.randint(0, 2**32, (N,), generator=torch.Generator().manual_seed(4))
    xc, tc, sc, rc = x.cuda(), t.cuda(), s.cuda(), rid.cuda()
    o = 2**64 - 2
    kw = dict(mask_index=V - 1, top_k=9, temperature=0.8)
    off = torch.zeros(1, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        mk.sample_step(xc, tc, sc, 5, o, row_ids=rc, validate=False, backend="cpp", offset_tensor=off, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mk.sample_step(xc, tc, sc, 5, o, row_ids=rc, validate=False, backend="cpp", offset_tensor=off, **kw)
        off += 1
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append((out.tokens.clone(), out.confidence.clone()))
    torch.cuda.synchronize()
    assert int(off) == 3
    for i, (tok, conf) in enumerate(replays):
        host_off = _eff(o, i)
        eager = mk.sample_step(xc, tc, sc, 5, host_off, row_ids=rc, validate=False, backend="cpp", **kw)
        assert torch.equal(tok, eager.tokens) and _eq_nan(conf, eager.confidence), i
        eager_t = mk.sample_step(xc, tc, sc, 5, o, row_ids=rc, validate=False, backend="cpp",
                                 offset_tensor=torch.tensor([i], device="cuda"), **kw)
        assert torch.equal(tok, eager_t.tokens) and _eq_nan(conf, eager_t.confidence), i
        cpu = mk.sample_step(x, t, s, 5, host_off, row_ids=rid, validate=False, backend="cpp", **kw)
        assert torch.equal(tok.cpu(), cpu.tokens) and _eq_nan(conf.cpu(), cpu.confidence), i
    assert not torch.equal(replays[0][0], replays[1][0])
    with pytest.raises(ValueError, match="offset_tensor is on cpu but the op runs on cuda"):
        mk.sample_step(xc, tc, sc, 5, o, row_ids=rc, offset_tensor=torch.zeros(1, dtype=torch.int64), **kw)


def _gpu_tail_count(gap, K, n, seed):
    V = K + 2
    row = torch.full((V,), -gap)
    row[0] = 0.0
    row[V - 1] = 0.0
    total = 0
    chunk = max(1, min(n, (1 << 28) // V))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = row.cuda().view(1, V).expand(m, V).contiguous()
        tok = mk.sample_step(x, torch.ones(m, device="cuda"), torch.zeros(m, device="cuda"), seed, 0,
                             mask_index=V - 1, row_ids=torch.arange(start, start + m, device="cuda"),
                             validate=False).tokens
        total += int(((tok >= 1) & (tok < V - 1)).sum())
    r = math.exp(-gap)
    return total, n * K * r / (1 + K * r)


@pytest.mark.cuda
def test_gpu_tail_classes_1e9():
    """Tail classes at probability ~1e-9 relative to the top class (gap 20.7), >= 20 expected draws."""
    obs, mu = _gpu_tail_count(20.7, 4095, 6_000_000, seed=99)
    assert mu >= 20 and abs(obs - mu) <= 5 * math.sqrt(mu) + 1, (obs, mu)


@pytest.mark.cuda
def test_gpu_row_where_32bit_gumbel_is_biased():
    """A class at ~1e-8 relative (gap 18.9): 32-bit Gumbel noise (u <= 1 - 2^-24, G <= 16.6) would draw it far
    below its rate; the inverse CDF with a 53-bit uniform draws it at its rate."""
    obs, mu = _gpu_tail_count(18.9, 4095, 6_000_000, seed=5)
    assert mu >= 100 and abs(obs - mu) <= 5 * math.sqrt(mu) + 1, (obs, mu)


# ---------------------------------------------------------------------------------------------
# (9) the weights, the passes over the logits, extreme logits
# ---------------------------------------------------------------------------------------------
@needs_ext
def test_exp_weight_accuracy():
    g = torch.Generator().manual_seed(9)
    d = torch.cat([torch.empty(60000, dtype=torch.float64).uniform_(-708, 0, generator=g),
                   torch.empty(20000, dtype=torch.float64).uniform_(-2, 0, generator=g),
                   -torch.rand(5000, dtype=torch.float64, generator=g) * 1e-6,
                   torch.tensor([0.0, -0.0, -1e-300, -0.34657359, -0.34657360, -708.0], dtype=torch.float64)])
    got = _math(3, d.tolist())
    ref = torch.tensor([math.exp(v) for v in d.tolist()], dtype=torch.float64)
    rel = ((got - ref).abs() / ref).max()
    assert float(rel) <= 2.0 ** -22, float(rel)
    assert float(got[-6]) == 1.0 and float(got[-5]) == 1.0                    # exp(0) is exactly 1
    assert _math(3, [-709.0, -1e6, float("-inf")]).tolist() == [0.0, 0.0, 0.0]  # flushed, never NaN
    assert math.isnan(float(_math(3, [float("nan")])[0]))


def _cpu_loads(x, t, s, mask, **kw):
    from mdlm_kernels._dtypes import dtype_code
    N, V = x.shape
    tok, conf = torch.empty(N, dtype=torch.int64), torch.empty(N, 3)
    loads = torch.zeros(N, dtype=torch.int64)
    x, t, s = x.contiguous(), t.contiguous(), s.contiguous()
    _ext.load().sample_step_cpu(_buf(x), dtype_code(x.dtype), _buf(t), _buf(s), (0, 0), _buf(tok), _buf(conf), N, V,
                                1, 2, mask, kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0),
                                kw.get("greedy", False), (0, 0), _buf(loads))
    return loads, tok


@needs_ext
def test_weight32_accuracy():
    """The per-element weight of pass 1 / pass 2, w = 2^d for the float32 d = (x - m) * float32(log2(e) / T)
    (magic-number rounding, exact r = d - k, degree-6 minimax polynomial of 2^r, 2^k in the exponent bits):
    relative error <= 2^-22 against 2^d over [-126, 0] (subnormal results near -126 included); exactly 1 at
    d = +-0; exactly 0 below -126.5 (the scale 2^-127 is +0), at -inf and for NaN (which flags the row elsewhere)."""
    g = torch.Generator().manual_seed(11)
    d = torch.cat([torch.empty(100000, dtype=torch.float64).uniform_(-126, 0, generator=g),
                   torch.empty(50000, dtype=torch.float64).uniform_(-1, 0, generator=g),
                   -torch.rand(5000, dtype=torch.float64, generator=g) * 1e-6,
                   torch.tensor([-0.5, -0.49999997, -0.50000006, -125.5, -126.0, -1e-30], dtype=torch.float64)])
    d = d.float().double()                                       # the kernel's d is a float32
    got = _math(4, d.tolist())
    ref = torch.tensor([2.0 ** v for v in d.tolist()], dtype=torch.float64)
    rel = ((got - ref).abs() / ref).max()
    assert float(rel) <= 2.0 ** -22, float(rel)
    assert _math(4, [0.0, -0.0]).tolist() == [1.0, 1.0]
    assert _math(4, [-126.50001, -127.0, -1e30, float("-inf"), float("nan")]).tolist() == [0.0] * 5


@needs_ext
@pytest.mark.parametrize("V", [511, 512, 513, 1025, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_matches_reference_chunk_edges(V, dtype):
    """Chunk edges of the 512-column chunks: V one short of / at / past a multiple of 512, MASK first, last, at a
    chunk's first and last column; full chunks (no per-element checks) holding -0, -inf runs and ties at the
    maximum in several chunks (the argmax is the lowest index; the second largest counts ties)."""
    N = 24
    x, t, s = _inputs(N, V, dtype, seed=V)
    x[0, :] = -0.0                                               # a full chunk of -0: ties everywhere
    x[1, 3:500] = float("-inf")
    x[2, ::7] = float("-inf")
    x[3, :] = 1.0
    x[3, [5, 600 % V, V - 2]] = 4.0                              # ties at the maximum in different chunks
    x[4, :] = -30.0
    x[4, V - 2] = 0.0                                            # the maximum in the last chunk
    x[5, 0] = 40.0                                               # one class takes (almost) all
    for mask_index in sorted({0, V - 1, 511 % V, min(512, V - 1)}):
        for kw in (dict(), dict(greedy=True), dict(temperature=0.3), dict(top_k=7), dict(top_p=0.8)):
            c = mk.sample_step(x, t, s, 21, 3, mask_index=mask_index, backend="cpp", **kw)
            r = mk.sample_step(x, t, s, 21, 3, mask_index=mask_index, backend="reference", **kw)
            ctx = (V, dtype, mask_index, kw)
            assert torch.equal(c.tokens, r.tokens), ctx
            assert _conf_close(c.confidence, r.confidence), ctx
            assert not bool((c.tokens[s == 0] == mask_index).any()), ctx
            if kw.get("greedy"):
                assert int(c.tokens[3]) == (5 if mask_index != 5 else min(600 % V, V - 2)), ctx


def _chunk_cols(c, V, mask, chunk=512):
    """Columns of chunk c (tensor) that exist and are not MASK."""
    return torch.clamp(V - chunk * c, max=chunk) - (c == mask // chunk).long()


@needs_ext
@pytest.mark.parametrize("V", [300, 50258])
def test_logits_are_read_once_plus_two_chunks(V):
    """The sampling step reads each row's logits once, plus the 512 columns of the chunk holding the row maximum
    (pass 1b: the top two and the argmax) and those of the chunk its draw falls in (pass 2): the issue's bound of
    two reads; top-k / top-p add a fixed number of passes (no bisection)."""
    N, mask = 6, V - 1
    x, t, s = _inputs(N, V, torch.float32, seed=V)
    s[:3] = 0.0                                                  # never MASK: these rows re-read a chunk
    xm = x.clone()
    xm[:, mask] = float("-inf")
    cmax = xm.argmax(1) // 512                                   # the first chunk holding the maximum
    passes = {(): 1, ("top_k",): 4, ("top_p",): 5, ("top_k", "top_p"): 7, ("greedy",): 1}
    for kw in (dict(), dict(top_k=20), dict(top_p=0.9), dict(top_k=20, top_p=0.9), dict(greedy=True)):
        loads, tok = _cpu_loads(x, t, s, mask, **kw)
        want = passes[tuple(sorted(kw))] * (V - 1) + _chunk_cols(cmax, V, mask)
        reread = (tok != mask) & (not kw.get("greedy", False))
        cols = _chunk_cols(tok // 512, V, mask)                  # the chunk of the drawn class
        assert torch.equal(loads, want + torch.where(reread, cols, 0)), (kw, loads, tok)
        assert bool((loads <= passes[tuple(sorted(kw))] * (V - 1) + 1024).all())
        assert kw.get("greedy", False) or bool(reread[:3].all())


@needs_ext
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_extreme_logits_entropy_and_law(backend):
    """Logits near -FLT_MAX with temperature < 1: the scaled gap is float64, so a weight is 0 and its entropy
    term 0, never 0 * inf (the earlier kernel returned entropy 0 for [10, -FLT_MAX, 5, MASK] at T = 0.9)."""
    fmax = torch.finfo(torch.float32).max
    x = torch.tensor([[10.0, -fmax, 5.0, 0.0], [-fmax, -fmax, -fmax, 0.0], [fmax, 0.0, -fmax, 0.0]])
    t, s = torch.full((3,), 0.8), torch.full((3,), 0.0)
    out = mk.sample_step(x, t, s, 5, 0, mask_index=3, temperature=0.9, backend=backend)
    a = torch.tensor([10.0, 5.0], dtype=torch.float64) / 0.9
    p = torch.softmax(a, 0)
    ent = float(-(p * torch.log(p)).sum())
    assert abs(ent - 0.0252531) < 1e-6
    assert abs(float(out.confidence[0, 2]) - ent) <= 1e-6 * ent + 1e-9, out.confidence
    assert abs(float(out.confidence[0, 0]) - float(p[0])) <= 1e-6
    # all three classes at -FLT_MAX: equal weights (uniform), entropy log 3; +FLT_MAX: one class
    assert abs(float(out.confidence[1, 2]) - math.log(3)) <= 1e-6 and abs(float(out.confidence[1, 0]) - 1 / 3) < 1e-6
    assert float(out.confidence[2, 0]) == 1.0 and float(out.confidence[2, 2]) == 0.0 and int(out.tokens[2]) == 0
    assert int(out.tokens[0]) in (0, 2) and int(out.tokens[1]) in (0, 1, 2)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_matches_reference_diverse_scales(dtype):
    """Thousands of rows whose logit spreads range from 1e-3 (near-uniform) to 300 (one class takes all),
    row offsets, dominant classes and ties: tokens identical to the float64 spec."""
    N, V = 1500, 389
    g = torch.Generator().manual_seed(77)
    scale = torch.pow(10.0, torch.empty(N, 1).uniform_(-3.0, 2.5, generator=g))
    x = torch.randn(N, V, generator=g) * scale + torch.empty(N, 1).uniform_(-50, 50, generator=g)
    x[::11, 5] += 25.0  # a dominant class
    x[3::13] = torch.round(x[3::13])  # ties
    x = x.to(dtype)
    t = torch.rand(N, generator=g) * 0.9 + 0.1
    s = t * torch.rand(N, generator=g)
    s[::3] = 0.0
    rid = torch.randint(0, 2**32, (N,), generator=g)
    for temperature in (0.3, 1.0, 3.0):
        for filt in (dict(), dict(top_k=17), dict(top_p=0.85), dict(top_k=60, top_p=0.6)):
            kw = dict(mask_index=V // 3, row_ids=rid, temperature=temperature, **filt)
            c = mk.sample_step(x, t, s, 2**40 + 3, 9, backend="cpp", **kw)
            r = mk.sample_step(x, t, s, 2**40 + 3, 9, backend="reference", **kw)
            assert torch.equal(c.tokens, r.tokens), (temperature, filt)
            assert _conf_close(c.confidence, r.confidence), (temperature, filt)
    # full vocabulary rows
    x2, t2, s2 = _inputs(6, 50258, dtype, seed=8, scale=6.0)
    for kw in (dict(temperature=0.3), dict(temperature=3.0, top_p=0.95)):
        c = mk.sample_step(x2, t2, s2, 5, 6, mask_index=50257, backend="cpp", **kw)
        r = mk.sample_step(x2, t2, s2, 5, 6, mask_index=50257, backend="reference", **kw)
        assert torch.equal(c.tokens, r.tokens), kw
        assert _conf_close(c.confidence, r.confidence), kw


# ---------------------------------------------------------------------------------------------
# (10) the chunk choice (pick_chunk): rounded chunk prefixes are not monotone; the drawn chunk must be live
# ---------------------------------------------------------------------------------------------
def _hs_scan(x):
    """The header's inclusive Hillis-Steele scan over 32 lanes (Python floats: IEEE float64, as dadd)."""
    x = list(x)
    o = 1
    while o < 32:
        x = [x[l] + x[l - o] if l >= o else x[l] for l in range(32)]
        o <<= 1
    return x


def _pick(G, S, M, m, target, inv_t=1.0):
    g = torch.tensor(G, dtype=torch.float64)
    s = torch.tensor(S, dtype=torch.float64)
    mm = torch.tensor(M, dtype=torch.float32)
    return _ext.load().sample_pick_chunk(_buf(g), _buf(s), _buf(mm), len(G) - 1, len(M), m, inv_t, target)


@needs_ext
def test_drawn_chunk_is_live_where_rounded_prefixes_are_not_monotone():
    """A row whose chunk maxima are [0, x1, x1, -inf, -inf] (V = 640: one class in each of chunks 0-2, chunks 3-4
    empty) with exp(x1) = 0.6 * 2^-52: the chunks' scaled sums are S = [1, a, a, 0, 0], a = 0.6 ulp(1), and the
    header's Hillis-Steele scan rounds them to P = [1, 1+u, 1+u, 1+2u, 1+u] (u = 2^-52): the EMPTY chunk 3 has the
    first prefix above a target in [1+u, 1+2u), which the two largest uniforms (u2 = 1 - 2^-53, 1 - 2^-52) give.
    The earlier walk drew chunk 3 there, whose pass 2 finds no kept column: token -1 for a valid row (and the
    samplers' "invalid logits" error). The choice must be a live chunk."""
    u = 2.0 ** -52
    x1 = float(torch.tensor(math.log(0.6 * u), dtype=torch.float32))
    a = float(_math(3, [x1])[0])                               # exp_weight(scaled_gap(x1, 0, 1)): the chunk scale
    assert 0.5 * u < a < 0.75 * u
    M = [0.0, x1, x1, float("-inf"), float("-inf")]
    scan = _hs_scan([1.0, a, a] + [0.0] * 29)
    G = [0.0, 0.0 + scan[31]]
    assert [0.0 + p for p in scan[:5]] == [1.0, 1 + u, 1 + u, 1 + 2 * u, 1 + u]   # not monotone: the trap
    Z = G[1]
    for k in range(1, 65):                                     # the 64 largest uniform53 values, then the rest
        target = (1.0 - k * 2.0 ** -53) * Z
        c, tau = _pick(G, scan, M, 0.0, target)
        assert c in (0, 1, 2), (k, target, c)
        assert math.isfinite(tau) or c == 2                    # no live prefix above: the last live chunk
    assert _pick(G, scan, M, 0.0, 0.5)[0] == 0 and _pick(G, scan, M, 0.0, Z)[0] == 2   # >= Z: the last live chunk


@needs_ext
def test_pick_chunk_random_tables_choose_live_chunks():
    """Random chunk tables with empty chunks (and dead ones: finite maxima whose scale underflows to 0), scanned
    in the header's order: every target in [0, Z] picks a live chunk; the first live chunk whose prefix exceeds the
    target, else the last live chunk with tau = +inf."""
    g = torch.Generator().manual_seed(4)
    for trial in range(300):
        nc = int(torch.randint(1, 100, (1,), generator=g))
        ng = (nc + 31) // 32
        live = torch.rand(nc, generator=g) < 0.5
        live[int(torch.randint(0, nc, (1,), generator=g))] = True
        M = torch.where(live, -torch.rand(nc, generator=g) * 40, torch.tensor(float("-inf"))).tolist()
        dead = [c for c in range(nc) if not live[c] and bool(torch.rand(1, generator=g) < 0.3)]
        for c in dead:
            M[c] = -800.0                                       # finite, but exp_weight(-800) = 0: S_c = 0
        e = _math(3, [m if m != float("-inf") else -1e9 for m in M]).tolist()
        S = [e[c] if live[c] else 0.0 for c in range(nc)] + [0.0] * (ng * 32 - nc)
        scan, G = [], [0.0]
        for gi in range(ng):
            sc = _hs_scan(S[32 * gi:32 * gi + 32])
            scan += sc
            G.append(G[-1] + sc[31])
        Z = G[-1]
        targets = torch.rand(50, dtype=torch.float64, generator=g).mul(Z).tolist() + [0.0, Z, Z * (1 - 2.0 ** -53)]
        last_live = max(c for c in range(nc) if live[c])
        for target in targets:
            c, tau = _pick(G, scan[:ng * 32], M, 0.0, target)
            assert 0 <= c < nc and live[c], (trial, target, c)
            first = [d for d in range(nc) if live[d] and G[d // 32] + scan[d] > target]
            if first:
                assert c == first[0], (trial, target, c, first[0])
            else:
                assert c == last_live and tau == float("inf")
