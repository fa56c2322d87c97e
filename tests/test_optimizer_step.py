"""The trainer's optimizer step on the device (mdlm.train: DeviceAdamW, EMA.update(found_inf=...),
global_grad_norm, clip_scale, optimizer_step_on_device) against the published sequence, and the host reads of
``Trainer.train_step`` counted at the dispatcher.

Reference: the previous trainer's step (fp64 global norm, clip by multiplying the gradients with
c = fp32(min(1, max_norm / (norm + 1e-6))), torch.optim.AdamW, the published EMA decay), on the same inputs.

Tolerances (fp32 parameters, the only dtype the optimizer holds; autocast does not touch them):
- clip inactive (norm <= max_norm): bitwise equal (the divisor is exactly 1, g / 1 = g; same fused kernel).
- clip active: the folded clip feeds AdamW fp32(g / s), s = fp32(1 / c_exact), instead of fp32(g * c);
  each is g c_exact (1 + e1)(1 + e2), |e| <= 2^-24, so they differ by at most CLIP_GRAD_RTOL = 2^-22
  relative (measured: at most 1 ulp). Propagated through STEPS AdamW steps (per element, g_k the clipped
  gradients, G = max_k |g_k|):
  1. m = sum_k (1-b1) b1^(t-k) g_k with weights summing to < 1 can cancel, so its change is bounded in
     absolute terms: |dm| <= 2^-22 G from the gradients, plus each side's own rounding of its t updates
     (<= 2^-24 |m| + 2^-24 (1-b1) G per step): |dm| <= M_GRAD_TOL * G + STEPS * 2^-23 |m|, M_GRAD_TOL = 2^-21.
  2. v = sum_k (1-b2) b2^(t-k) g_k^2 has no cancellation: relative change <= 2 * 2^-22 + STEPS roundings
     of 2^-24: V_RTOL = 2^-20.
  3. The update lr m^/(sqrt(v^) + eps) with sqrt(v^) >= G / sqrt(t) (bias-corrected weights ~ 1/t each for
     t << 1/(1-b2)) changes by <= lr (|dm| sqrt(t) / G + |m^| dv / (2 v^)) <= lr 2^-20 per step: parameters
     (and the EMA of them) agree within PARAM_ATOL = STEPS * lr * 2^-20 plus 1 ulp of the value.
"""
import copy
import math

import pytest
import torch

import mdlm
from mdlm.step_budget import StepBudget
from mdlm.train import EMA, DeviceAdamW, Trainer, clip_scale, global_grad_norm, optimizer_step_on_device

CLIP_GRAD_RTOL = 2.0 ** -22
STEPS = 5
LR = 1e-2
M_GRAD_TOL = 2.0 ** -21
V_RTOL = 2.0 ** -20
PARAM_ATOL = STEPS * LR * 2.0 ** -20
SHAPES = [(1,), (37,), (1023,), (37, 29)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def _grads(step, scale):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(*s, generator=g) * scale for s in SHAPES]


def _published_step(params, opt, ema, grads, max_norm):
    """The previous trainer: fp64 norm, gradients multiplied by the clip factor, AdamW, EMA (host-known).
    Returns the clipped gradients AdamW used."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    with torch.no_grad():
        norm = torch.stack(torch._foreach_norm([p.grad for p in params], 2, dtype=torch.float64)).square().sum().sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
        torch._foreach_mul_([p.grad for p in params], coef)
    used = [p.grad.clone() for p in params]
    opt.step()
    ema.update()
    return used


def _device_step(params, opt, ema, grads, max_norm, loss=1.0):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = global_grad_norm(params)
    checked = torch.stack([torch.tensor(loss, dtype=torch.float64), norm])
    found_inf = optimizer_step_on_device(opt, ema, norm, checked, max_norm)
    if found_inf.item() == 0.0:       # the host's part after its one read
        ema.num_updates += 1
    return found_inf


def _state(opt, params):
    return [(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], opt.state[p]["step"]) for p in params]


def _bits(t):
    return t.detach().contiguous().view(torch.int32)


def _run_both(grad_scale_of_inputs, max_norm, reference_opt="fused"):
    pa, pb = _params(), _params()
    kw = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ref_kw = {"fused": True} if reference_opt == "fused" else {"foreach": True}
    oa = torch.optim.AdamW(pa, **kw, **ref_kw)
    ob = DeviceAdamW(pb, **kw)
    ea, eb = EMA(pa, 0.9999), EMA(pb, 0.9999)
    gmax = [torch.zeros(s) for s in SHAPES]
    for s in range(STEPS):
        gr = _grads(s, grad_scale_of_inputs)
        used = _published_step(pa, oa, ea, gr, max_norm)
        gmax = [torch.maximum(m, u.abs()) for m, u in zip(gmax, used)]
        _device_step(pb, ob, eb, gr, max_norm)
    return (pa, oa, ea), (pb, ob, eb), gmax


# --------------------------------------------------------------------------------------------- clip rounding
@pytest.mark.parametrize("n", [1, 37, 1023, 1 << 16])
def test_folded_clip_differs_from_the_multiply_by_at_most_the_rounding_bound(n):
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 5 + 0.1
    p = torch.nn.Parameter(torch.zeros(n))
    p.grad = g.clone()
    norm = global_grad_norm([p])
    assert float(norm) > 1.0                                     # the clip is active
    ref = g * (1.0 / (norm + 1e-6)).clamp(max=1.0).float()       # the published multiply
    DeviceAdamW([p], lr=LR).step(grad_scale=clip_scale(norm, 1.0), found_inf=torch.zeros(()))
    got = p.grad                                                 # the fused kernel writes g / s back
    assert torch.all((got - ref).abs() <= CLIP_GRAD_RTOL * ref.abs()), (got - ref).abs().div(ref.abs()).max()
    assert not torch.equal(got, g)                               # it did divide
    ulps = (_bits(got).long() - _bits(ref).long()).abs()
    assert int(ulps.max()) <= 1                                  # measured bound (2 roundings each side)


def test_clip_scale_is_one_below_the_threshold_and_off_for_nonpositive_max_norm():
    norm = torch.tensor(0.5, dtype=torch.float64)
    assert clip_scale(norm, 1.0).item() == 1.0 and clip_scale(norm, 1.0).dtype == torch.float32
    assert clip_scale(torch.tensor(3.0, dtype=torch.float64), 1.0).item() == pytest.approx(3.0 + 1e-6)
    assert clip_scale(torch.tensor(3.0, dtype=torch.float64), 0.0).item() == 1.0
    assert math.isnan(clip_scale(torch.tensor(float("nan"), dtype=torch.float64), 1.0).item())


# ------------------------------------------------------------------------------- vs the published sequence
def test_device_step_is_bitwise_the_published_step_when_the_clip_is_inactive():
    (pa, oa, ea), (pb, ob, eb), _ = _run_both(1e-3, max_norm=1e6)
    for a, b in zip(pa, pb):
        assert torch.equal(_bits(a), _bits(b))
    for (ma, va, sa), (mb, vb, sb) in zip(_state(oa, pa), _state(ob, pb)):
        assert torch.equal(ma, mb) and torch.equal(va, vb) and sa.item() == sb.item() == STEPS
    for a, b in zip(ea.shadow, eb.shadow):
        assert torch.equal(_bits(a), _bits(b))
    assert ea.num_updates == eb.num_updates == STEPS


def test_device_step_matches_the_published_step_within_the_clip_rounding_when_the_clip_is_active():
    (pa, oa, ea), (pb, ob, eb), gmax = _run_both(10.0, max_norm=1.0)
    for (ma, va, _), (mb, vb, sb), G in zip(_state(oa, pa), _state(ob, pb), gmax):
        dm = (mb - ma).abs()
        assert torch.all(dm <= M_GRAD_TOL * G + STEPS * 2.0 ** -23 * ma.abs()), (dm / G).max()
        torch.testing.assert_close(vb, va, rtol=V_RTOL, atol=0.0)
        assert sb.item() == STEPS
    assert not all(torch.equal(_bits(a), _bits(b)) for a, b in zip(pa, pb))   # the rounding is there
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b, a, rtol=2.0 ** -23, atol=PARAM_ATOL)
    for a, b in zip(ea.shadow, eb.shadow):
        torch.testing.assert_close(b, a, rtol=2.0 ** -23, atol=PARAM_ATOL)


def test_device_adamw_is_bitwise_torch_fused_adamw_with_gradscaler_tensors():
    """The same kernel through torch's own GradScaler hook (optimizer.grad_scale / found_inf attributes):
    state initialisation, step counting (torch adds 1 then subtracts found_inf; we add 1 - found_inf) and the
    skip agree bit for bit."""
    pa, pb = _params(), _params()
    oa = torch.optim.AdamW(pa, lr=LR, weight_decay=0.1, fused=True)
    ob = DeviceAdamW(pb, lr=LR, weight_decay=0.1)
    for s, (scale, inf) in enumerate([(1.0, 0.0), (3.5, 0.0), (float("nan"), 1.0), (1.25, 0.0)]):
        gr = _grads(s, 2.0)
        for pa_, pb_, g in zip(pa, pb, gr):
            pa_.grad, pb_.grad = g.clone(), g.clone()
        oa.grad_scale, oa.found_inf = torch.tensor(scale), torch.tensor(inf)
        oa.step()
        ob.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(inf))
        for a, b in zip(pa + [p.grad for p in pa], pb + [p.grad for p in pb]):
            assert torch.equal(_bits(a), _bits(b))
        for (ma, va, sa), (mb, vb, sb) in zip(_state(oa, pa), _state(ob, pb)):
            assert torch.equal(ma, mb) and torch.equal(va, vb) and sa.item() == sb.item()
    assert all(ob.state[p]["step"].item() == 3 for p in pb)      # 4 calls, one skipped


@pytest.mark.parametrize("bad", ["loss_nan", "loss_inf", "norm_inf", "grad_nan"])
def test_a_skipped_step_leaves_params_grads_state_counters_and_ema_untouched(bad):
    params = _params()
    opt = DeviceAdamW(params, lr=LR)
    ema = EMA(params, 0.9999)
    ref_params = _params()
    ref_opt = DeviceAdamW(ref_params, lr=LR)
    ref_ema = EMA(ref_params, 0.9999)
    for s in range(2):
        _device_step(params, opt, ema, _grads(s, 10.0), 1.0)
        _device_step(ref_params, ref_opt, ref_ema, _grads(s, 10.0), 1.0)
    before = ([p.detach().clone() for p in params], [[t.clone() for t in st] for st in _state(opt, params)],
              [s.clone() for s in ema.shadow], ema.num_updates)
    gr = _grads(7, 10.0)
    loss = {"loss_nan": float("nan"), "loss_inf": float("inf")}.get(bad, 1.0)
    if bad == "norm_inf":
        gr[1][3] = float("inf")
    if bad == "grad_nan":
        gr[2][0] = float("nan")
    found_inf = _device_step(params, opt, ema, gr, 1.0, loss=loss)
    assert found_inf.item() == 1.0
    for p, q in zip(params, before[0]):
        assert torch.equal(_bits(p), _bits(q))
    for p, g in zip(params, gr):                                # not even the gradients were rescaled
        assert torch.equal(_bits(p.grad), _bits(g))
    for now, was in zip(_state(opt, params), before[1]):
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(now, was))
    for s, q in zip(ema.shadow, before[2]):
        assert torch.equal(s, q)                                 # values (a -0.0 may become +0.0)
    assert ema.num_updates == before[3] == 2
    # and the run goes on exactly as one that never saw the bad step (step counts, bias corrections, EMA n)
    _device_step(params, opt, ema, _grads(2, 10.0), 1.0)
    _device_step(ref_params, ref_opt, ref_ema, _grads(2, 10.0), 1.0)
    for a, b in zip(params + ema.shadow, ref_params + ref_ema.shadow):
        assert torch.equal(_bits(a), _bits(b))


def test_ema_update_with_found_inf_is_the_host_update_or_nothing():
    params = _params()
    a, b = EMA(params, 0.9999), EMA(params, 0.9999)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    a.update()
    b.update(found_inf=torch.zeros(()))
    assert b.num_updates == 0                     # the caller counts it after its read
    b.num_updates += 1
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a.shadow, b.shadow))
    kept = [s.clone() for s in b.shadow]
    b.update(found_inf=torch.ones(()))
    assert all(torch.equal(x, y) for x, y in zip(b.shadow, kept))


def test_device_adamw_errors():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    opt = DeviceAdamW([p])
    with pytest.raises(ValueError, match="grad_scale must be a 0-dim float32"):
        opt.step(grad_scale=torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="found_inf must be a 0-dim float32"):
        opt.step(found_inf=torch.zeros(1))
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)


def test_old_foreach_optimizer_state_loads_and_steps_on():
    """A checkpoint of the earlier trainer on CPU holds torch.optim.AdamW(foreach=True) state (flags foreach,
    step tensors on the host): it loads into DeviceAdamW unchanged and the run continues like foreach AdamW."""
    pa, pb = _params(), _params()
    old = torch.optim.AdamW(pa, lr=LR, foreach=True)
    for s in range(2):
        for p, g in zip(pa, _grads(s, 1.0)):
            p.grad = g
        old.step()
    sd = copy.deepcopy(old.state_dict())         # as read from a file: no tensor shared with `old`
    assert sd["param_groups"][0]["foreach"] is True
    with torch.no_grad():
        for a, b in zip(pa, pb):
            b.copy_(a)
    new = DeviceAdamW(pb, lr=LR)
    new.load_state_dict(sd)
    g0 = new.param_groups[0]
    assert g0["fused"] is True and g0["foreach"] is False
    for (ma, va, sa), (mb, vb, sb) in zip(_state(old, pa), _state(new, pb)):
        assert torch.equal(ma, mb) and torch.equal(va, vb) and sb.item() == sa.item() == 2
        assert sb.dtype == torch.float32
    for p, q, g in zip(pa, pb, _grads(2, 1.0)):
        p.grad, q.grad = g.clone(), g.clone()
    old.step()
    new.step()
    for a, b in zip(pa, pb):          # fused vs foreach: the same formula, rounded in another order
        torch.testing.assert_close(b, a, rtol=2.0 ** -21, atol=LR * 2.0 ** -20)


# ----------------------------------------------------------------------- host reads of Trainer.train_step
V = 51


def _tiny_trainer(tmp_path, **over):
    base = {"model.length": 16, "model.hidden_size": 32, "model.n_heads": 2, "model.cond_dim": 16,
            "model.n_blocks": 1, "loader.global_batch_size": 4, "loader.batch_size": 2, "trainer.max_steps": 4,
            "trainer.val_every": 0, "trainer.save_every": 0, "trainer.out_dir": str(tmp_path),
            "trainer.num_samples": 0, "trainer.progress": False}
    base.update(over)
    cfg = mdlm.preset("tiny", **base)
    g = torch.Generator().manual_seed(0)
    train, val = torch.randint(0, V - 1, (40, 16), generator=g), torch.randint(0, V - 1, (6, 16), generator=g)
    torch.manual_seed(0)
    return Trainer(cfg, train, val, model=mdlm.MDLM(cfg, V), resume="never", log=lambda m: None)


class _Ordered(StepBudget):
    """StepBudget that also keeps the order of (phase, op) events, Tensor.tolist included."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.events.append((self._phase, str(func)))
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("nan", [False, True])
def test_train_step_reads_the_host_once_after_the_optimizer_and_ema_are_enqueued(tmp_path, nan):
    t = _tiny_trainer(tmp_path / str(nan))
    t.train_step()                                   # optimizer state exists: a steady-state step is counted
    budget = _Ordered()
    real_opt_step = t._optimizer_step

    def opt_step(*a, **k):                           # everything after the last backward: phase "optimizer"
        budget.phase("optimizer")
        return real_opt_step(*a, **k)

    t._optimizer_step = opt_step
    if nan:
        real_loss = t.model.loss

        def nan_loss(*a, **k):
            out = real_loss(*a, **k)
            return out._replace(loss=out.loss * float("nan"))

        t.model.loss = nan_loss
    with budget:
        inner = torch.Tensor.tolist

        def tolist(x):
            budget.events.append((budget._phase, "Tensor.tolist"))
            return inner(x)

        torch.Tensor.tolist = tolist
        try:
            budget.phase("forward_backward")
            rec = t.train_step()
        finally:
            torch.Tensor.tolist = inner
    assert ("skipped" in rec) == nan and t.state.optimizer_steps == 1 + (not nan)
    assert budget.reads["optimizer"] == 1, budget.summary()
    assert dict(budget.read_ops).get("Tensor.tolist") == 1
    opt_events = [name for phase, name in budget.events if phase == "optimizer"]
    read_at = opt_events.index("Tensor.tolist")
    issued = opt_events[:read_at]
    # the optimizer (fused AdamW on g / s, step counters), and the EMA are all enqueued before the read,
    # whether or not the step turns out skipped
    for op in ("aten._fused_adamw_.default", "aten._foreach_lerp_.List", "aten._foreach_add_.Tensor",
               "aten._foreach_norm.Scalar"):
        assert op in issued, (op, issued)
    assert not any(n.startswith("aten._fused_adamw_") or "lerp" in n for n in opt_events[read_at + 1:])
    assert not any("_foreach_mul_" in n for n in opt_events), "the clip is folded into AdamW's grad_scale"


# ------------------------------------------------------------------------------------- on a GPU (owed here)
@pytest.mark.cuda
def test_device_step_on_cuda_never_synchronises_and_matches_the_cpu_step():
    """On CUDA the whole step (norm, decision, fused AdamW with grad_scale / found_inf, step counters, EMA) is
    enqueued with torch's sync debug mode set to raise; a skipped step leaves the CUDA state bit for bit; the
    result agrees with the CPU fused kernels within PARAM_ATOL (the same formula: pow and FMA contraction
    differ between the two builds, a few ulp of the update per step)."""
    dev = torch.device("cuda")
    pc = _params()
    pg = [torch.nn.Parameter(p.detach().to(dev)) for p in _params()]
    oc, og = DeviceAdamW(pc, lr=LR), DeviceAdamW(pg, lr=LR)
    ec, eg = EMA(pc, 0.9999), EMA(pg, 0.9999)
    for s, loss in enumerate([1.0, 1.0, float("nan"), 1.0, 1.0]):
        grads = _grads(s, 10.0)
        _device_step(pc, oc, ec, grads, 1.0, loss=loss)
        for p, g in zip(pg, grads):
            p.grad = g.to(dev)
        loss_t = torch.full((), loss, dtype=torch.float64, device=dev)
        before = [t.detach().clone() for t in pg + eg.shadow]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            norm = global_grad_norm(pg)
            found_inf = optimizer_step_on_device(og, eg, norm, torch.stack([loss_t, norm]), 1.0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        skipped = found_inf.item() == 1.0
        assert skipped == (loss != loss)
        if skipped:
            assert all(torch.equal(a, b) for a, b in zip(pg + eg.shadow, before))
        else:
            eg.num_updates += 1
    assert all(og.state[p]["step"].item() == 4 for p in pg)
    for a, b in zip(pc + ec.shadow, pg + eg.shadow):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=2.0 ** -21, atol=PARAM_ATOL)


@pytest.mark.cuda
@pytest.mark.parametrize("nan", [False, True])
def test_trainer_optimizer_phase_on_cuda_never_synchronises_before_its_read(tmp_path, nan):
    t = _tiny_trainer(tmp_path / str(nan))
    assert t.device.type == "cuda"
    t.train_step()
    real = t._optimizer_step

    def guarded(loss_sum):       # everything after the last backward up to the read must not synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(loss_sum)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    t._optimizer_step = guarded
    if nan:
        real_loss = t.model.loss

        def nan_loss(*a, **k):
            out = real_loss(*a, **k)
            return out._replace(loss=out.loss * float("nan"))

        t.model.loss = nan_loss
    rec = t.train_step()
    assert ("skipped" in rec) == nan and t.state.optimizer_steps == 1 + (not nan)
