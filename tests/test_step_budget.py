"""The step budget of a fused training step: no host read in the forward or backward, counted at the
dispatcher (mdlm.step_budget.StepBudget), and the statically sized masked-row gather that makes it possible.

The masked count of the fused masking kernel is a sum of independent Bernoullis given the rows' times t, which
the host draws itself (mdlm_kernels.masked_rows_bound); the gather takes that many rows (nonzero_static), pads
with weight-0 rows, and turns the loss and gradients into NaN if the bound is ever exceeded.

Tolerances (fp32, CPU): the statically sized gather against the host-sized one: loss rtol 1e-6, gradients
max abs error <= 1e-6 x the largest entry (only the padding rows differ, and they add exact zeros).
"""
import math

import pytest
import torch

import mdlm
import mdlm_kernels as mk
from mdlm.diffusion import MDLM, subs_loss_from_hidden
from mdlm.step_budget import StepBudget

V, MASK = 97, 96


def _model(seed=0, use_kernels=None, **over):
    cfg = mdlm.preset("tiny", **{"model.dropout": 0.1, "model.n_blocks": 2, "model.hidden_size": 32,
                                  "model.n_heads": 2, "model.cond_dim": 16, **over})
    torch.manual_seed(seed)
    m = MDLM(cfg, V)
    if use_kernels is not None:
        m.backbone.use_kernels = use_kernels
    m.validate_inputs = m.backbone.validate_inputs = False   # the trainer validates its data once, at load
    return m


# --------------------------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("B,L", [(1, 1), (3, 37), (64, 64)])
def test_bound_is_never_exceeded_and_close_to_the_mean(B, L):
    x0 = torch.zeros(B, L, dtype=torch.int64)
    over = []
    for seed in range(300):
        counts = int(mk.forward_mask(x0, seed, 0, mask_index=MASK).row_counts.sum())
        bound = mk.masked_rows_bound(B, L, seed)
        assert counts <= bound <= B * L, (seed, counts, bound)
        assert bound <= mk.masked_rows_bound(B, L, None)        # the every-seed bound covers each seed's
        over.append(bound - B * L * (1 - 1e-3) / 2)
    if B * L >= 4096:   # within 8 standard deviations (Bernstein at 1e-9: ~6.5) plus the rounding to 64 rows
        sigma = math.sqrt(B * L / 6)
        assert max(over) <= 8 * sigma + 64 + 2 * L, max(over)


def test_bound_tail_is_honest():
    """With a loose tail the bound is exceeded at most that often (Bernstein is conservative): a bound built
    on a wrong mean or variance (e.g. without the factor L) is exceeded far more often and fails here."""
    B, L, tail = 4, 16, 0.2
    x0 = torch.zeros(B, L, dtype=torch.int64)
    exceeded = sum(int(mk.forward_mask(x0, s, 0, mask_index=MASK).row_counts.sum())
                   > mk.masked_rows_bound(B, L, s, tail=tail, multiple=1) for s in range(2000))
    assert exceeded / 2000 <= tail
    # and it is not vacuous: the bound with a 50% tail sits near the mean, exceeded at a visible rate
    exceeded_half = sum(int(mk.forward_mask(x0, s, 0, mask_index=MASK).row_counts.sum())
                        > mk.masked_rows_bound(B, L, s, tail=0.5, multiple=1) - 3 for s in range(2000))
    assert exceeded_half > 0


def test_bound_at_the_published_shape():
    b_any = mk.masked_rows_bound(64, 1024, None)
    bs = [mk.masked_rows_bound(64, 1024, s) for s in range(20)]
    mean = 64 * 1024 * (1 - 1e-3) * 0.5
    assert all(b % 64 == 0 and mean < b < 1.03 * mean for b in bs), bs
    assert mean < b_any < 1.05 * mean and all(b <= b_any for b in bs)
    assert mk.masked_rows_bound(64, 1024, None, antithetic=False) == 64 * 1024   # no strata: no saving


# --------------------------------------------------------------------------------------------- the static gather
def _loss_and_grads(m, fn):
    m.zero_grad()
    out = fn()
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["fused", "masked"])
def test_static_gather_equals_the_host_sized_gather(impl):
    m = _model(**{"model.dropout": 0.0})
    x0 = torch.randint(0, MASK, (3, 37))
    _, sigma, weight, xt = m.draw_fused(x0, seed=5)
    n = int((xt == MASK).sum())
    ref, g_ref = _loss_and_grads(m, lambda: m.subs_loss_given(x0, xt, sigma, weight, impl=impl))
    for bound in (n, n + 1, n + 64, 3 * 37):
        out, g = _loss_and_grads(m, lambda: m.subs_loss_given(x0, xt, sigma, weight, impl=impl, row_bound=bound))
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(out.nlls, ref.nlls, rtol=1e-6, atol=1e-7)
        for k in g_ref:
            assert (g[k] - g_ref[k]).abs().max() <= 1e-6 * g_ref[k].abs().max() + 1e-12, (bound, k)


@pytest.mark.parametrize("impl", ["fused", "masked"])
def test_exceeding_the_bound_gives_nan_loss_and_gradients_not_a_truncated_loss(impl):
    m = _model(**{"model.dropout": 0.0})
    x0 = torch.randint(0, MASK, (3, 37))
    _, sigma, weight, xt = m.draw_fused(x0, seed=5)
    n = int((xt == MASK).sum())
    out, g = _loss_and_grads(m, lambda: m.subs_loss_given(x0, xt, sigma, weight, impl=impl, row_bound=n - 1))
    assert torch.isnan(out.loss) and torch.isnan(out.nlls).all()      # validation / eval read nlls
    assert g and all(torch.isnan(v).any() for v in g.values())   # (embedding rows of absent tokens stay 0)


def test_padding_rows_never_carry_the_mask_id_as_target():
    """The padded rows' target is a valid id even when MASK is 0 (an invalid target would make the row NaN)."""
    m = _model(**{"model.dropout": 0.0})
    x0 = torch.randint(1, V, (2, 9))
    xt = x0.clone()
    xt[:, ::3] = 0
    h = torch.randn(2, 9, 32)
    lin = m.backbone.output_layer.linear
    out = subs_loss_from_hidden(h, lin.weight, lin.bias, x0, xt, torch.ones(2), 0, row_bound=18)
    ref = subs_loss_from_hidden(h, lin.weight, lin.bias, x0, xt, torch.ones(2), 0)
    assert torch.isfinite(out.loss) and math.isclose(out.loss.item(), ref.loss.item(), rel_tol=1e-6)


# --------------------------------------------------------------------------------------------- host reads
@pytest.mark.parametrize("use_kernels", [False, True])
def test_fused_step_reads_nothing_back_in_forward_and_backward(use_kernels):
    m = _model(use_kernels=use_kernels)
    x0 = torch.randint(0, MASK, (4, 32))
    with StepBudget() as budget:
        budget.phase("forward")
        out = m.loss(x0, impl="fused", seed=11)
        budget.phase("backward")
        out.loss.backward()
    s = budget.summary()
    assert s["host_reads"] == 0, s["host_reads_by_op"]
    assert s["launches_by_phase"]["forward"] > 0 and s["launches_by_phase"]["backward"] > 0
    assert budget.saved_bytes > 0
    # the counter sees the host-sized gather (control: the counter can fail)
    _, sigma, weight, xt = m.draw_fused(x0, seed=11)
    with StepBudget() as control:
        m.subs_loss_given(x0, xt, sigma, weight, impl="fused").loss.backward()
    assert control.host_reads == 1 and "aten.nonzero.default" in control.read_ops


def test_counter_counts_every_kind_of_host_read():
    t = torch.arange(6.0)
    with StepBudget() as b:
        t.sum().item()
        float(t[0])
        bool(t[1] > 0)
        t.tolist()
        t.nonzero()
        torch.nonzero_static(t, size=3)       # statically sized: not a read
        t.view(2, 3).t().contiguous()         # a view, then one copy
    assert b.host_reads == 5, b.read_ops
    assert b.launches >= 2


# --------------------------------------------------------------------------------------------- the trainer
def test_trainer_step_reads_the_host_once_and_only_after_the_optimizer(tmp_path):
    """A whole training step of the trainer (fused loss, fused block path, gradient accumulation 2): 0 host
    reads in the forward and backward of both micro-batches, exactly 1 (the flags) in the optimizer phase."""
    from mdlm.train import Trainer
    cfg = mdlm.preset("tiny", **{"model.hidden_size": 32, "model.n_blocks": 2, "model.n_heads": 2,
                                 "model.cond_dim": 16, "model.length": 32, "loader.global_batch_size": 4,
                                 "loader.batch_size": 2, "trainer.max_steps": 3, "trainer.val_every": 0,
                                 "trainer.save_every": 0, "trainer.num_samples": 0, "trainer.progress": False,
                                 "trainer.out_dir": str(tmp_path / "run")})
    g = torch.Generator().manual_seed(0)
    train, val = torch.randint(0, MASK, (16, 32), generator=g), torch.randint(0, MASK, (4, 32), generator=g)
    model = MDLM(cfg, V)
    model.backbone.use_kernels = True                 # the fused block kernels (Triton interpreter / reference)
    t = Trainer(cfg, train, val, model=model, resume="never", log=lambda m: None)
    t.train_step()                                    # the optimizer state exists: a steady-state step
    real_opt = t._optimizer_step
    budget = StepBudget()

    def opt_step(*a, **k):
        budget.phase("optimizer")
        return real_opt(*a, **k)

    t._optimizer_step = opt_step
    from mdlm_kernels import backend as kb
    kb.last_used.clear()
    with budget:
        budget.phase("forward_backward")
        t.train_step()
    s = budget.summary()
    assert s["host_reads_by_phase"] == {"optimizer": 1}, s["host_reads_by_op"]
    assert s["host_reads_by_op"] == {"Tensor.tolist": 1}
    assert {"forward_mask", "subs_linear_cross_entropy", "adaln_modulate"} <= set(kb.last_used)  # the fused path ran
