"""Parameterizations and losses (mdlm.diffusion): SUBS carry-over, the continuous-time NELBO against an
independent masked-rows cross-entropy, perfect denoisers, D3PM, SEDD and the AR baseline.

Tolerances (fp32 on CPU): loss vs independent recomputation rtol 1e-5, atol 1e-5; gradients of two
summation orders: max abs error <= 1e-5 x the largest entry of that gradient; "zero" losses of a
perfect denoiser below 1e-5 per token (the logit margin is 60 nats, exp(-60) ~ 1e-26).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mdlm
from mdlm.diffusion import MDLM, sample_t, score_entropy, subs_parameterization

V, MASK = 97, 96


def _model(seed=0, **over):
    cfg = mdlm.preset("tiny", **{"model.dropout": 0.0, "model.n_blocks": 1, "model.hidden_size": 32,
                                  "model.n_heads": 2, "model.cond_dim": 16, **over})
    torch.manual_seed(seed)
    m = MDLM(cfg, V)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


class Oracle(nn.Module):
    """A backbone that knows x0: logits = margin * one_hot(x0)."""

    def __init__(self, x0, margin=60.0):
        super().__init__()
        self.x0, self.margin = x0, margin
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, sigma):
        return self.margin * F.one_hot(self.x0, V).float()


@pytest.mark.parametrize("L", [1, 37])
def test_subs_parameterization_carry_over_and_zero_mask_probability(L):
    g = torch.Generator().manual_seed(L)
    logits = torch.randn(3, L, V, generator=g) * 5
    xt = torch.randint(0, V, (3, L), generator=g)
    xt[:, ::2] = MASK
    logp = subs_parameterization(logits, xt, MASK)
    masked = xt == MASK
    # masked rows: a distribution over the non-MASK tokens, MASK has (numerically) zero probability
    torch.testing.assert_close(logp[masked].exp().sum(-1), torch.ones(int(masked.sum())), rtol=1e-5, atol=1e-5)
    assert torch.all(logp[masked][:, MASK].exp() == 0)
    ref = torch.log_softmax(torch.cat([logits[..., :MASK], logits[..., MASK + 1:]], -1), -1)
    torch.testing.assert_close(torch.cat([logp[..., :MASK], logp[..., MASK + 1:]], -1)[masked], ref[masked],
                               rtol=1e-5, atol=1e-5)
    # unmasked rows: all mass on the observed token
    um = ~masked
    assert torch.all(logp[um].gather(-1, xt[um][:, None]) == 0)
    assert torch.all(logp[um].exp().sum(-1) == 1)


def test_continuous_subs_loss_equals_masked_rows_cross_entropy():
    """The NELBO = sum over MASKED positions of (1/t) * CE(logits without the MASK column, x0), over all tokens."""
    m = _model()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, MASK, (4, 37), generator=g)
    seed = 1234
    out = m.loss(x0, generator=torch.Generator().manual_seed(seed), impl="reference")
    # replay the same draws of t and x_t
    g2 = torch.Generator().manual_seed(seed)
    t = sample_t(4, "cpu", 1e-3, True, g2)
    move = (1 - 1e-3) * t
    xt = torch.where(torch.rand(4, 37, generator=g2) < (1 - torch.exp(torch.log1p(-move)))[:, None], MASK, x0)
    logits = m.backbone(xt, torch.zeros(4)).float()
    masked = xt == MASK
    assert masked.any() and (~masked).any()
    ce = F.cross_entropy(logits[..., :MASK][masked], x0[masked], reduction="none")
    w = (1 / t)[:, None].expand_as(x0)[masked]
    expected = (ce * w).sum() / x0.numel()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(out.nlls[~masked] == 0)  # carry-over: unmasked positions have exactly zero loss


def test_unmasked_positions_get_zero_gradient():
    m = _model()
    x0 = torch.randint(0, MASK, (2, 16))
    sigma = torch.zeros(2)
    xt = x0.clone()
    xt[:, 8:] = MASK
    xt_ = xt.clone()
    logits = m.backbone(xt, sigma)
    logits.retain_grad()
    logp = subs_parameterization(logits, xt_, MASK)
    loss = -logp.gather(-1, x0[..., None]).sum()
    loss.backward()
    assert torch.all(logits.grad[:, :8] == 0)
    assert torch.any(logits.grad[:, 8:] != 0)


@pytest.mark.parametrize("param, T", [("subs", 0), ("subs", 10), ("d3pm", 10)])
def test_perfect_denoiser_has_zero_loss(param, T):
    x0 = torch.randint(0, MASK, (8, 37))
    cfg = mdlm.preset("tiny", **{"parameterization": param, "T": T})
    m = MDLM(cfg, V, backbone=Oracle(x0))
    out = m.loss(x0, generator=torch.Generator().manual_seed(0))
    assert float(out.nlls.abs().max()) < 1e-5


def test_untrained_subs_loss_is_log_vocab(monkeypatch):
    """Zero logits: every masked token costs log(V-1)/t; E over antithetic t of 1{masked}/t = 1 - eps.
    Default (fused) loss path, PyTorch backends (8k rows are slow in the Triton interpreter)."""
    monkeypatch.setenv("MDLM_BACKEND", "reference")
    cfg = mdlm.preset("tiny")
    m = MDLM(cfg, V)  # zero-initialised output layer
    x0 = torch.randint(0, MASK, (256, 64))
    out = m.loss(x0, generator=torch.Generator().manual_seed(0))
    expected = torch.log(torch.tensor(V - 1.0)) * (1 - 1e-3)
    assert abs(out.loss.item() - float(expected)) < 0.05 * float(expected)


def test_attention_mask_excludes_padding():
    m = _model()
    x0 = torch.randint(0, MASK, (3, 20))
    am = torch.ones(3, 20)
    am[:, 15:] = 0
    out = m.loss(x0, am, generator=torch.Generator().manual_seed(5))
    assert torch.all(out.nlls[:, 15:] == 0)
    torch.testing.assert_close(out.loss, out.nlls.sum() / 45)


def test_sedd_score_entropy_nonnegative_and_zero_at_true_score():
    g = torch.Generator().manual_seed(0)
    B, L = 3, 11
    x0 = torch.randint(0, MASK, (B, L), generator=g)
    xt = x0.clone()
    xt[:, ::3] = MASK
    sigma = torch.rand(B, 1, generator=g) + 0.1
    log_score = torch.randn(B, L, V, generator=g)
    ent = score_entropy(log_score, sigma, xt, x0, MASK)
    assert torch.all(ent >= -1e-5) and torch.all(ent[xt != MASK] == 0)
    true = torch.full((B, L, V), -1e4)
    true.scatter_(-1, x0[..., None], (-torch.log(torch.expm1(sigma)))[:, :, None].expand(B, L, 1))
    ent0 = score_entropy(true, sigma, xt, x0, MASK)
    assert float(ent0.abs().max()) < 1e-4


def test_sedd_and_d3pm_losses_are_finite_and_train():
    for over in ({"parameterization": "sedd", "time_conditioning": True}, {"parameterization": "d3pm", "T": 20}):
        m = _model(**over)
        x0 = torch.randint(0, MASK, (4, 16))
        out = m.loss(x0, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out.loss) and out.loss.item() > 0
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def _hand_draws(m, x0, seed):
    """The t and x_t that ``m.loss(x0, generator=Generator().manual_seed(seed))`` draws (reference path: the
    published order, t then the masking uniforms, both from the generator), independently of the loss code."""
    g = torch.Generator().manual_seed(seed)
    t = m.sample_t(x0.shape[0], x0.device, g)
    if m.T > 0:
        t = (t * m.T).to(torch.int) / m.T + 1 / m.T
    sigma, dsigma = m.noise(t)
    xt = m.q_xt(x0, 1 - torch.exp(-sigma[:, None]), g)
    return t, sigma, dsigma, xt


def test_sedd_loss_value_for_zero_logits():
    """SEDD with zero logits (fresh model: zero-initialised output layer) has a closed form per masked token:
    log-score -log(expm1 sigma) - log(V - 1) off the input token, so score entropy = log(V - 1) / expm1(sigma) and
    the loss dsigma * log(V - 1) / expm1(sigma) (= log(V - 1) / t for loglinear); 0 at unmasked tokens. Checks the
    values (a loss without its dsigma weight, or with another weight, fails), not only finiteness."""
    torch.manual_seed(0)
    m = MDLM(mdlm.preset("tiny", **{"parameterization": "sedd", "time_conditioning": True, "model.dropout": 0.0,
                                    "model.n_blocks": 1, "model.hidden_size": 32, "model.n_heads": 2,
                                    "model.cond_dim": 16}), V)
    x0 = torch.randint(0, MASK, (6, 16), generator=torch.Generator().manual_seed(1))
    out = m.loss(x0, generator=torch.Generator().manual_seed(3))
    t, sigma, dsigma, xt = _hand_draws(m, x0, 3)
    masked = (xt == MASK).float()
    assert 0 < masked.sum() < masked.numel()
    want = masked * (dsigma * torch.log(torch.tensor(V - 1.0)) / torch.expm1(sigma))[:, None]
    torch.testing.assert_close(out.nlls, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, want.sum() / want.numel(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(want[masked > 0], (torch.log(torch.tensor(V - 1.0)) / t[:, None].expand_as(want))[
        masked > 0], rtol=1e-3, atol=0)      # loglinear: dsigma / expm1(sigma) = 1 / t


def test_d3pm_loss_value_for_zero_logits():
    """D3PM (T = 20) with zero logits: p_theta uniform over all V tokens, so per token the reconstruction term is
    log V (every position) and, at a masked position with t = k/T, s = t - 1/T,
        T [ (1/(T t)) (log(a_t / (V t) + 1) + log V) + (1 - 1/(T t)) (log(a_t / (V t) + 1) - log(a_s / (V s) + 1)) ]
    (the second term 0 at s = 0; a = 1 - time, t clamped to 1 - 1e-4). A loss without its reconstruction term (or
    with a wrong diffusion term) fails."""
    torch.manual_seed(0)
    T = 20
    m = MDLM(mdlm.preset("tiny", **{"parameterization": "d3pm", "T": T, "model.dropout": 0.0, "model.n_blocks": 1,
                                    "model.hidden_size": 32, "model.n_heads": 2, "model.cond_dim": 16}), V)
    x0 = torch.randint(0, MASK, (6, 16), generator=torch.Generator().manual_seed(1))
    out = m.loss(x0, generator=torch.Generator().manual_seed(3))
    t, _, _, xt = _hand_draws(m, x0, 3)
    masked = (xt == MASK).double()
    assert 0 < masked.sum() < masked.numel()
    tt = t.double().clamp(0.0, 1.0 - 1e-4)[:, None]
    dt, logV = 1.0 / T, torch.log(torch.tensor(float(V), dtype=torch.float64))
    nr = torch.log((1 - tt) / (V * tt) + 1)
    s = tt - dt
    term1 = dt / tt * (nr + logV)
    term2 = torch.where(s <= 0, 0.0, (1 - dt / tt) * (nr - torch.log((1 - s) / (V * s.clamp_min(1e-12)) + 1)))
    want = logV + masked * T * (term1 + term2)
    torch.testing.assert_close(out.nlls.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss.double(), want.mean(), rtol=1e-4, atol=1e-4)


def test_ar_loss_is_next_token_cross_entropy_without_mask():
    m = _model(parameterization="ar")
    x0 = torch.randint(0, MASK, (2, 13))
    out = m.loss(x0)
    logits = m.backbone.output_layer(_ar_hidden(m.backbone, x0[:, :-1])).float()
    ce = F.cross_entropy(logits[..., :MASK].reshape(-1, MASK), x0[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce, rtol=1e-5, atol=1e-5)


def _ar_hidden(ar, x):
    h = ar.vocab_embed(x)
    cs = ar.rotary_emb(h)
    for b in ar.blocks:
        h = b(h, cs)
    return h


@pytest.mark.parametrize("bad, match", [
    (torch.full((2, 5), V), "outside"),
    (torch.zeros(2, 5), "integer"),
    (torch.zeros(5, dtype=torch.long), "shape"),
])
def test_loss_rejects_bad_tokens(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _model().loss(bad)


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="parameterization"):
        MDLM(mdlm.preset("tiny", parameterization="foo"), V)
    with pytest.raises(ValueError, match="T > 0"):
        MDLM(mdlm.preset("tiny", parameterization="d3pm"), V)
    with pytest.raises(ValueError, match="cannot both"):
        MDLM(mdlm.preset("tiny", **{"training.importance_sampling": True, "training.change_of_variables": True}), V)
    with pytest.raises(ValueError, match="sedd"):
        MDLM(mdlm.preset("tiny", **{"parameterization": "sedd", "training.importance_sampling": True}), V)
    with pytest.raises(ValueError, match="subs_masking"):
        MDLM(mdlm.preset("tiny", subs_masking=True), V)
    with pytest.raises(ValueError, match="mask_index"):
        MDLM(mdlm.preset("tiny"), V, mask_index=V)
    with pytest.raises(KeyError, match="unknown config key"):
        mdlm.preset("tiny", **{"model.hidden": 3})


def test_discrete_time_first_step_is_finite():
    """t = 1/T means s = 0: the published formula is 0 * log(0/0 + 1) there; it must be 0, not NaN."""
    from mdlm.diffusion import d3pm_loss
    T = 10
    x0 = torch.randint(0, MASK, (2, 5))
    xt = torch.full_like(x0, MASK)
    logits = torch.randn(2, 5, V)
    logp = subs_parameterization(logits, xt, MASK)
    out = d3pm_loss(logp, xt, x0, torch.full((2,), 1 / T), T, MASK)
    assert torch.isfinite(out).all()
    # at t = 1/T only the first term remains: T * (dt/t) * (0 - log p(x0)) = -T log p(x0)
    torch.testing.assert_close(out, -T * logp.gather(-1, x0[..., None])[..., 0], rtol=1e-5, atol=1e-5)


def _loss_and_grads(m, fn):
    """fn() -> Loss or a scalar tensor; returns (that, the gradients of every parameter)."""
    m.zero_grad()
    out = fn()
    (out.loss if isinstance(out, tuple) else out).backward()
    return out, [p.grad.clone() for p in m.parameters()]


def _assert_grads_close(m, ga, gb):
    for (name, _), a, b in zip(m.named_parameters(), ga, gb):
        # fp32, different summation order: max error within 1e-5 of the gradient's largest entry
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= 1e-5 * scale + 1e-7, (name, err, scale)


@pytest.mark.parametrize("mask_index", [MASK, 0, 40])
def test_masked_rows_loss_equals_published_loss_and_gradients(mask_index):
    """Same torch draws: the masked-rows path gives the published value, nlls and gradients, for any MASK id."""
    m = _model()
    m.mask_index = mask_index
    x0 = torch.randint(0, V, (3, 37))
    x0[x0 == mask_index] = (mask_index + 1) % V
    am = torch.ones(3, 37)
    am[2, 30:] = 0
    ref, g_ref = _loss_and_grads(m, lambda: m.loss(x0, am, torch.Generator().manual_seed(9), impl="reference"))
    out, g_out = _loss_and_grads(m, lambda: m.loss(x0, am, torch.Generator().manual_seed(9), impl="masked"))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nlls, ref.nlls.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(m, g_out, g_ref)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.skipif(
    __import__("mdlm_kernels").backend.unavailable_reason("triton", "cpu") is not None,
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1")), "reference"])
def test_fused_training_step_equals_published_step_for_the_same_masking(backend, monkeypatch):
    """Whole loss step, identical weights, the same draws from the fused masking kernel: the fused
    linear-cross-entropy path gives the published loss and gradients."""
    monkeypatch.setenv("MDLM_BACKEND", backend if backend == "reference" else "auto")
    m = _model()
    x0 = torch.randint(0, MASK, (4, 37))
    am = torch.ones(4, 37)
    am[3, 20:] = 0
    t, sigma, weight, xt = m.draw_fused(x0, torch.Generator().manual_seed(3))
    assert (xt == MASK).any() and (xt != MASK).any()
    torch.testing.assert_close(weight, 1 / t, rtol=1e-6, atol=0)  # loglinear
    ref, g_ref = _loss_and_grads(m, lambda: m.subs_loss_given(x0, xt, sigma, weight, am, impl="reference"))
    out, g_out = _loss_and_grads(m, lambda: m.subs_loss_given(x0, xt, sigma, weight, am, impl="fused"))
    from mdlm_kernels.backend import last_used
    assert last_used["subs_linear_cross_entropy"] == backend
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nlls, ref.nlls.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(m, g_out, g_ref)


def test_default_loss_is_fused_for_continuous_subs_and_reference_otherwise():
    assert _model().default_loss_impl() == "fused"
    assert _model(T=5).default_loss_impl() == "reference"
    assert _model(loss_impl="reference").default_loss_impl() == "reference"
    x0 = torch.randint(0, MASK, (2, 9))
    for impl in ("masked", "fused"):
        with pytest.raises(ValueError, match="continuous-time SUBS"):
            _model(T=5).loss(x0, impl=impl)
    with pytest.raises(ValueError, match="unknown loss implementation"):
        _model().loss(x0, impl="magic")


def test_fused_loss_is_reproducible_from_the_torch_seed():
    m = _model()
    x0 = torch.randint(0, MASK, (2, 16))
    a = m.loss(x0, generator=torch.Generator().manual_seed(1)).loss
    b = m.loss(x0, generator=torch.Generator().manual_seed(1)).loss
    c = m.loss(x0, generator=torch.Generator().manual_seed(2)).loss
    assert a.item() == b.item() and a.item() != c.item()


def test_discrete_time_gradients_are_finite_at_the_first_step():
    """t = 1/T rows (always drawn when B >= T under antithetic sampling) must not put NaN in the gradient."""
    for param in ("subs", "d3pm"):
        m = _model(parameterization=param, T=4)
        x0 = torch.randint(0, MASK, (8, 12))
        out = m.loss(x0, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        assert torch.isfinite(out.loss)
        for name, p in m.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (param, name)


def test_time_conditioning_off_feeds_zeros_on_feeds_sigma():
    x = torch.randint(0, MASK, (2, 9))
    x[:, ::2] = MASK
    off = _model().eval()
    torch.testing.assert_close(off(x, torch.zeros(2)), off(x, torch.full((2, 1), 3.0)), rtol=0, atol=0)
    on = _model(time_conditioning=True).eval()
    assert not torch.allclose(on(x, torch.zeros(2)), on(x, torch.full((2, 1), 3.0)))


@pytest.mark.parametrize("impl", ["masked", "fused"])
def test_ar_baseline_loss_on_the_same_code_path(impl):
    """The AR baseline's next-token loss through the fused linear-cross-entropy (all rows, shifted targets,
    MASK excluded) equals the published log-softmax path, value and gradients, with padding."""
    m = _model(parameterization="ar")
    x0 = torch.randint(0, MASK, (3, 21))
    am = torch.ones(3, 21)
    am[1, 15:] = 0
    ref, g_ref = _loss_and_grads(m, lambda: m.loss(x0, am, impl="reference"))
    out, g_out = _loss_and_grads(m, lambda: m.loss(x0, am, impl=impl))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nlls, ref.nlls.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(m, g_out, g_ref)
    assert m.default_loss_impl() == "fused"


@pytest.mark.parametrize("impl", ["masked", "fused"])
def test_subs_loss_drop_in_module_equals_the_published_loss(impl):
    from mdlm.nn import SUBSLoss
    m = _model()
    x0 = torch.randint(0, MASK, (3, 16))
    t, sigma, weight, xt = m.draw_fused(x0, torch.Generator().manual_seed(0))
    ref, g_ref = _loss_and_grads(m, lambda: m.subs_loss_given(x0, xt, sigma, weight, impl="reference"))

    def drop_in():
        hidden, _ = m.backbone.hidden_states(xt, torch.zeros(3))
        lin = m.backbone.output_layer.linear
        return SUBSLoss(MASK, "loglinear", impl=impl)(hidden, lin.weight, lin.bias, x0, xt, t)

    out, g_out = _loss_and_grads(m, drop_in)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    _assert_grads_close(m, g_out, g_ref)


def test_whole_fused_step_compiles_fullgraph(monkeypatch):
    """torch.compile(fullgraph=True) traces masking kernel + DiT + gather + fused loss, forward and backward."""
    import torch._dynamo
    monkeypatch.setenv("MDLM_BACKEND", "reference")
    m = _model()
    m.validate_inputs = m.backbone.validate_inputs = False
    x0 = torch.randint(0, MASK, (2, 16))

    def step(x0, seed):
        return m.loss(x0, impl="fused", seed=seed).loss

    # no dynamic shapes: the masked-row gather is sized by a bound that is a constant of the shapes under compile
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss_c, g_c = _loss_and_grads(m, lambda: compiled(x0, 1234))
    loss_e, g_e = _loss_and_grads(m, lambda: step(x0, 1234))
    torch.testing.assert_close(loss_c, loss_e)
    _assert_grads_close(m, g_c, g_e)
