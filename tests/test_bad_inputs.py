"""Every bad input a clear error, at every entry point (issue 15).

The generated suite (tests/bad_inputs.py: the mutation table, the oracle and the subprocess isolation are
documented there) runs every op's bad inputs on every CPU backend (cpp, Triton under the interpreter, reference),
through the public functions and directly through ``torch.ops.mdlm.*``. A trial passes with a clear exception (a
message naming the argument, the reference's exception type) or a result agreeing with the reference on dense
inputs; a crash, a hang, an unclear error or a silent difference fails. Default: a fixed sample of the cases
(``bad_inputs.DEFAULT_BUDGET`` per op and entry point); MDLM_BAD_INPUTS=all runs every case. The totals table is
printed.

Also here: the targeted regressions of the issue's examples (each a case of the suite too, checked directly so
that a failure names it), the C++ binding's buffer checks, and the isolation itself (a crashing and a hanging
case are reported, not fatal).
"""
import multiprocessing as mp
import os

import pytest
import torch

import bad_inputs as BI
import mdlm_kernels as mk
from mdlm_kernels import _ext
from mdlm_kernels import backend as kb
from mdlm_kernels.ops.philox import _buf

HAS_EXT = _ext.available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="the compiled extension is not built")
needs_cpu_triton = pytest.mark.skipif(kb.unavailable_reason("triton", "cpu") is not None,
                                      reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


# ------------------------------------------------------------------------------------------- the generated suite
def test_generated_bad_inputs(capsys):
    results, stats = BI.run()
    with capsys.disabled():
        print("\n" + BI.table(results, stats))
    fails = [f"{r.op}[{r.entry}] {r.backend}: {r.case}: {r.detail}" for r in results if r.verdict == "FAIL"]
    assert not fails, f"{len(fails)} failed trial(s):\n" + "\n".join(fails[:40])
    assert stats["cases"] - stats["valid"] >= 300 and stats["tried"] == stats["clear"] + stats["agreed"]
    backends = {r.backend for r in results}
    assert "reference" in backends
    assert ("cpp" in backends) == HAS_EXT
    assert ("triton" in backends) == (kb.unavailable_reason("triton", "cpu") is None)
    assert {r.entry for r in results} == {"public", "ops"}


def test_the_table_covers_every_op_and_mutation_kind():
    specs, case_lists = BI.all_specs_and_cases()
    ops = {s.op for s in specs}
    assert ops >= {"forward_mask", "philox_uniform", "sample_step", "subs_linear_cross_entropy", "adaln_modulate",
                   "adaln_modulate_backward", "gated_residual_modulate", "gated_residual_modulate_backward",
                   "rotary_qkv", "rotary_qkv_backward", "rotary_tables", "bias_gelu", "bias_gelu_backward",
                   "bias_gelu_backward_recompute", "gelu_mlp", "attention"}
    every = [c for cl in case_lists for c in cl]
    assert len(every) >= 2000
    kinds = {c.tensor[1] for c in every if c.tensor is not None}
    assert kinds == {"dtype", "rank+1", "rank-1", "dim", "strided", "transposed", "expand", "meta", "none", "list",
                     "poke", "scale", "fill"}
    # the default sample is fixed: the same cases every run
    assert BI.select(case_lists[0], BI.DEFAULT_BUDGET) == BI.select(case_lists[0], BI.DEFAULT_BUDGET)


# ------------------------------------------------------------------------------------- the judge itself can fail
def _spec(name, entry):
    specs, case_lists = BI.all_specs_and_cases()
    i = next(k for k, s in enumerate(specs) if s.op == name and s.entry == entry)
    return specs[i], case_lists[i]


def test_judge_flags_a_silent_difference_and_an_unclear_error(monkeypatch):
    """The oracle is not a formality: a backend that answers differently, or raises an error naming no argument,
    fails the trial."""
    spec, cl = _spec("bias_gelu", "ops")
    case = next(c for c in cl if c.name == "x: non-contiguous (strides x2)")
    assert BI.judge(spec, case, "reference")[0] == "agreed"
    real = spec.fn
    spec.fn = lambda x, b, backend: real(x.contiguous(), b, backend) + (1e-2 if backend != "reference" else 0.0)
    verdict, detail = BI.judge(spec, case, "triton")
    assert verdict == "FAIL" and "silent difference" in detail

    def unclear(x, b, backend):
        if backend != "reference":
            raise ValueError("something went wrong")
        raise ValueError("bias_gelu: x is bad")
    spec.fn = unclear
    verdict, detail = BI.judge(spec, case, "triton")
    assert verdict == "FAIL" and "unclear error" in detail
    bad = next(c for c in cl if c.name == "x: dtype bool")
    spec.fn = real
    assert BI.judge(spec, bad, "reference")[0] == "clear"
    spec.fn = lambda x, b, backend: real(x.float() if x.dtype == torch.bool else x, b, backend)   # accepts it
    verdict, detail = BI.judge(spec, bad, "reference")
    assert verdict == "FAIL" and "must be rejected" in detail


def _crash_child(i, conn):
    conn.send(("start", i))
    if i == 1:
        import faulthandler
        faulthandler.disable()          # pytest's handler would print the child's stack on SIGABRT
        os.abort()
    if i == 2:
        import time
        time.sleep(60)
    conn.send(("done", i, "agreed", "", 0.0))


def test_isolation_reports_a_crash_and_a_hang_and_resumes(monkeypatch):
    """A case that kills its subprocess or hangs is a failure naming the case; the other cases of the batch still
    run (in a new subprocess)."""
    def child(spec_index, backend, indices, conn):
        for i in indices:
            _crash_child(i, conn)
        conn.send(("end",))
    monkeypatch.setattr(BI, "_child", child)
    ctx = mp.get_context("fork")
    spec, cl = _spec("bias_gelu", "ops")
    res = BI._run_batch(ctx, 0, spec, "reference", [0, 1, 2, 3], cl, timeout=5.0)
    by = {r.case: r for r in res}
    assert len(res) == 4
    assert by[cl[0].name].verdict == "agreed" and by[cl[3].name].verdict == "agreed"
    assert by[cl[1].name].verdict == "FAIL" and "crash" in by[cl[1].name].detail
    assert by[cl[2].name].verdict == "FAIL" and "hang" in by[cl[2].name].detail


# ------------------------------------------------------------------------------- the issue's examples, directly
@needs_ext
def test_ops_forward_mask_rejects_a_short_t():
    with pytest.raises(ValueError, match="t must have shape \\(3,\\)"):
        torch.ops.mdlm.forward_mask(torch.zeros(3, 4, dtype=torch.int64), torch.full((2,), 0.5), 0, 0, 9,
                                    "loglinear", 1e-3, 0.0, 0.0, 1e-3, True, "cpp")


@needs_ext
@pytest.mark.parametrize("kw, match", [
    (dict(row_ids=torch.arange(3, dtype=torch.int32)), "row_ids must be int64"),
    (dict(t=torch.ones(3, dtype=torch.float64)), "t must be float32"),
])
def test_ops_sample_step_rejects_wrong_dtypes(kw, match):
    args = dict(logits=torch.randn(3, 5), t=torch.ones(3), s=torch.zeros(3), row_ids=None)
    args.update(kw)
    with pytest.raises(TypeError, match=match):
        torch.ops.mdlm.sample_step(args["logits"], args["t"], args["s"], args["row_ids"], 0, 0, 4, 1.0, 0, 1.0,
                                   False, "cpp")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ops_linear_ce_rejects_short_targets(backend):
    if backend == "triton" and kb.unavailable_reason("triton", "cpu"):
        pytest.skip("no Triton on CPU")
    with pytest.raises(ValueError, match="targets must have shape \\(5,\\)"):
        torch.ops.mdlm.subs_linear_cross_entropy(torch.randn(5, 8), torch.randn(7, 8), None,
                                                 torch.zeros(3, dtype=torch.int64), torch.ones(5), 6, False, False,
                                                 64, backend)


@needs_cpu_triton
@pytest.mark.parametrize("op", ["adaln", "rotary", "bias_gelu"])
def test_triton_launchers_read_strided_inputs_correctly(op):
    """torch.ops.mdlm.* with strided inputs (the wrappers' .contiguous() bypassed) equals the dense call."""
    g = torch.Generator().manual_seed(0)
    if op == "adaln":
        x = torch.randn(2, 8, 3, generator=g).transpose(1, 2)       # (2, 3, 8), non-contiguous
        args = (torch.rand(8, generator=g) + 0.5, torch.randn(2, 16, generator=g), 0, 1, torch.float32, 1e-5)
        f = lambda x, be: torch.ops.mdlm.adaln_modulate(x, *args, be)[0]  # noqa: E731
    elif op == "rotary":
        x = torch.randn(2, 3, 3, 4, 2, generator=g).transpose(3, 4)  # (2, 3, 3, 2, 4)
        cs = torch.rand(3, 2, generator=g)
        f = lambda x, be: torch.ops.mdlm.rotary_qkv(x, cs, cs.flip(0), be)[0]  # noqa: E731
    else:
        x = torch.randn(16, 6, generator=g).t()
        bias = torch.randn(16, generator=g)
        f = lambda x, be: torch.ops.mdlm.bias_gelu(x, bias, be)  # noqa: E731
    assert not x.is_contiguous()
    want = f(x.contiguous(), "reference")
    for be in ("triton", "reference"):
        torch.testing.assert_close(f(x, be), want, rtol=1e-5, atol=1e-6)


@needs_cpu_triton
def test_bias_gelu_backward_far_left_is_the_spec():
    """dy/dz = 0 at z = -1e12 and -1e13 (was -3.9 and -3864 in Triton: the e^-80 floor of s times z^3)."""
    x = torch.tensor([[-1e13, -1e12, -30.0, -5.0, -4.0, 0.5]])
    b = torch.zeros(6)
    for be in ("triton", "reference"):
        xx = x.clone().requires_grad_()
        y = mk.bias_gelu(xx, b, backend=be)
        y.sum().backward()
        assert torch.equal(y.detach()[0, :3], torch.zeros(3)), be
        assert torch.equal(xx.grad[0, :3], torch.zeros(3)), be
        spec = x.clone().requires_grad_()
        torch.nn.functional.gelu(spec, approximate="tanh").sum().backward()
        torch.testing.assert_close(xx.grad, spec.grad, rtol=1e-5, atol=1e-6)   # gradients of scale ~1


@needs_cpu_triton
@pytest.mark.parametrize("scale", [1e20, 3e19])
def test_adaln_variance_overflow_is_nan_not_garbage(scale):
    """Rows whose fp32 sum of squares overflows: NaN in both backends (Triton gave finite garbage), NaN gradients
    for those rows; the other rows exact."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=g)
    x[0, 1] *= scale
    w, mod = torch.rand(8, generator=g) + 0.5, torch.randn(2, 16, generator=g)
    out = {}
    for be in ("triton", "reference"):
        xx = x.clone().requires_grad_()
        y = mk.adaln_modulate(xx, w, mod, backend=be)
        y.sum().backward()
        assert torch.isnan(y[0, 1]).all() and torch.isfinite(y[1]).all() and torch.isfinite(y[0, 0]).all(), be
        assert torch.isnan(xx.grad[0, 1]).all() and torch.isfinite(xx.grad[1]).all(), be
        out[be] = y
    torch.testing.assert_close(out["triton"], out["reference"], rtol=1e-5, atol=1e-5, equal_nan=True)
    for be in ("triton", "reference"):      # the gated residual's norm of r = 0 + 1 * x: the same rows
        y = mk.gated_residual_modulate(torch.zeros(2, 3, 8), x, torch.ones(2, 48), 2, w, backend=be)[1]
        assert torch.isnan(y[0, 1]).all() and torch.isfinite(y[1]).all() and torch.isfinite(y[0, 0]).all(), be


@pytest.mark.parametrize("call, exc, match", [
    (lambda: mk.adaln_modulate(torch.randn(1, 2, 8), torch.ones(8), torch.zeros(1, 16), eps=-1.0), ValueError, "eps"),
    (lambda: mk.adaln_modulate(torch.randn(1, 2, 8), torch.ones(8), torch.zeros(1, 16), eps=float("nan")), ValueError,
     "eps"),
    (lambda: mk.gated_residual_modulate(torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.zeros(1, 48), 2, p=0.5,
                                        training="False"), TypeError, "training must be a bool"),
    (lambda: mk.forward_mask(torch.zeros(2, 3, dtype=torch.int64), 0, mask_index=9, schedule="linear",
                             sigma_min=0.0, sigma_max=0.0), ValueError, "sigma_min < sigma_max"),
    (lambda: mk.forward_mask(torch.zeros(2, 3, dtype=torch.int64), 0, mask_index=9, schedule="geometric",
                             sigma_min=2.0, sigma_max=1.0), ValueError, "0 < sigma_min < sigma_max"),
    (lambda: mk.rotary_tables(torch.ones(4), 2.5), TypeError, "seq_len must be an int"),
])
def test_issue_scalar_examples(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------- the C++ binding's bounds
@needs_ext
def test_binding_checks_every_buffer_against_its_size():
    C = _ext.load()
    # every tensor whose address is passed stays alive here: the binding trusts the (address, nbytes) it is given
    x0, xt = torch.zeros(3, 4, dtype=torch.int64), torch.empty(3, 4, dtype=torch.int64)
    rows = [torch.empty(3) for _ in range(4)]
    counts = torch.empty(3, dtype=torch.int32)
    short = torch.empty(2)
    args = [_buf(x0), _buf(xt), 4, (0, 0), *map(_buf, rows), _buf(counts), 3, 4, 0, 0, 9, 0, 1e-3, 0.0, 0.0, 1e-3,
            True]
    C.forward_mask_cpu(*args)
    for pos, name in ((0, "x0"), (1, "xt"), (4, "t_out"), (5, "sigma"), (6, "weight"), (7, "move_chance")):
        bad = list(args)
        bad[pos] = (bad[pos][0], bad[pos][1] - 4)
        with pytest.raises(ValueError, match=f"forward_mask_cpu: {name}: the buffer holds"):
            C.forward_mask_cpu(*bad)
    bad = list(args)
    bad[3] = _buf(short)                                          # t_in of 2 rows for 3
    with pytest.raises(ValueError, match="t_in: the buffer holds 8 bytes but the call accesses 12"):
        C.forward_mask_cpu(*bad)
    logits = torch.randn(3, 5)
    t, s = torch.ones(3), torch.zeros(3)
    tok, conf = torch.empty(3, dtype=torch.int64), torch.empty(3, 3)
    sargs = dict(logits=_buf(logits), dtype_code=0, t=_buf(t), s=_buf(s), row_ids=(0, 0), tokens=_buf(tok),
                 conf=_buf(conf), rows=3, vocab=5, seed=0, offset=0, mask_index=4, temperature=1.0, top_k=0,
                 top_p=1.0, greedy=False)
    C.sample_step_cpu(**sargs)
    short_ids, short_conf = torch.zeros(2, dtype=torch.int64), torch.empty(3, 2)
    for name, val in (("row_ids", _buf(short_ids)), ("logits", (logits.data_ptr(), 56)), ("conf", _buf(short_conf)),
                      ("tokens", _buf(short_ids))):
        with pytest.raises(ValueError, match=f"sample_step_cpu: {name}: the buffer holds"):
            C.sample_step_cpu(**dict(sargs, **{name: val}))
    one = torch.empty(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="loads: the buffer holds"):
        C.sample_step_cpu(**sargs, loads=_buf(one))
    a4, a3 = torch.ones(4, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="sample_math: out: the buffer holds"):
        C.sample_math(0, _buf(a4), _buf(a3), 4)
    with pytest.raises(ValueError, match="sample_threshold_cpu: keys: the buffer holds"):
        C.sample_threshold_cpu(_buf(logits), 0, _buf(short_ids), 3, 5, 4, 1.0, 0, 1.0)
    assert "PRIVATE" in C.__doc__


def test_rotary_tables_seq_len():
    assert mk.rotary_tables(torch.ones(2), 0)[0].shape == (0, 2)
    with pytest.raises(ValueError, match="seq_len must be >= 0"):
        mk.rotary_tables(torch.ones(2), -1)
