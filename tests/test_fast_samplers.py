"""Fast samplers on the fused sampling step (mdlm.samplers): invariants, determinism, and agreement in
distribution with the published reference sampler.

Distribution check: per-position token histograms of fused and reference ddpm_cache samples from the same
tiny model are compared with a chi-square homogeneity test; the bound is the chi-square quantile at
p = 1e-4 for the pooled degrees of freedom.
"""
import math

import pytest
import torch

import mdlm
import mdlm_kernels as mk
from mdlm.diffusion import MDLM
from mdlm.samplers import fast_sample, sample
from mdlm.sampling import sample as reference_sample

V, MASK, L = 13, 12, 6


@pytest.fixture(autouse=True)
def _torch_backends(monkeypatch):
    monkeypatch.setenv("MDLM_BACKEND", "auto")


def _model(seed=0, **over):
    cfg = mdlm.preset("tiny", **{"model.dropout": 0.0, "model.n_blocks": 1, "model.hidden_size": 32,
                                  "model.n_heads": 2, "model.cond_dim": 16, "model.length": L, **over})
    torch.manual_seed(seed)
    m = MDLM(cfg, V)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return m.eval()


@pytest.mark.parametrize("sampler,kw", [
    ("ddpm", {}), ("ddpm_cache", {}), ("first_hitting", {}), ("confidence", {"tokens_per_step": 2}),
    ("confidence", {"confidence_threshold": 0.3}), ("ddpm_cache", {"remask_eta": 0.05}),
    ("ddpm_cache", {"temperature": 0.7, "top_k": 4}), ("ddpm", {"top_p": 0.8})])
def test_given_tokens_kept_and_no_mask_left(sampler, kw):
    m = _model()
    x_init = torch.full((5, L), MASK)
    x_init[:, 0] = 3
    x_init[:, 4] = 7
    out = fast_sample(m, 5, steps=8, sampler=sampler, x_init=x_init, generator=torch.Generator().manual_seed(0), **kw)
    assert out.shape == (5, L) and out.dtype == torch.int64
    assert torch.all(out[:, 0] == 3) and torch.all(out[:, 4] == 7)
    assert not torch.any(out == MASK)


def test_same_seed_same_tokens():
    m = _model()
    for sampler in ("ddpm_cache", "first_hitting"):
        a = fast_sample(m, 3, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(5))
        b = fast_sample(m, 3, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(5))
        c = fast_sample(m, 3, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(6))
        assert torch.equal(a, b), sampler
        assert not torch.equal(a, c), sampler
    # confidence decoding commits argmax tokens: deterministic whatever the seed
    a = fast_sample(m, 3, sampler="confidence", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, fast_sample(m, 3, sampler="confidence", generator=torch.Generator().manual_seed(6)))


def test_first_hitting_unmasks_exactly_one_position_per_event(monkeypatch):
    import mdlm.samplers as S
    m = _model()
    B = 4
    x_init = torch.full((B, L), MASK)
    x_init[1, :3] = 1  # sequences with different numbers of masked positions
    counts = []
    real = S.masked_row_logits

    def spy(model, x, sigma, idx):
        counts.append((x == MASK).sum(1).clone())
        return real(model, x, sigma, idx)

    monkeypatch.setattr(S, "masked_row_logits", spy)
    out, stats = fast_sample(m, B, sampler="first_hitting", x_init=x_init, return_stats=True,
                             generator=torch.Generator().manual_seed(0))
    counts.append((out == MASK).sum(1))
    steps = torch.stack(counts)                         # (events + 1, B) masked counts
    drops = steps[:-1] - steps[1:]
    assert torch.equal(drops, (steps[:-1] > 0).long())  # exactly one per event while a sequence has masks
    assert stats["model_calls"] == L and not torch.any(out == MASK)


def test_remasking_rate_and_posterior():
    """One ReMDM step t = 0.6 -> s = 0.3 with eta = 0.3 from a state with given, decoded and masked tokens:
    sigma = min(eta, s / (1 - t)) = 0.3; decoded (non-given) tokens are re-masked with probability sigma,
    masked tokens stay masked with probability s' / t, s' = s - sigma (1 - t) = 0.18; given tokens are kept."""
    from mdlm.samplers import _ancestral
    m = _model()
    B = 3000
    x = torch.full((B, L), MASK)
    x[:, :3] = 5
    given = torch.zeros(B, L, dtype=torch.bool)
    given[:, 0] = True
    opts = dict(mask_index=MASK, temperature=1.0, top_k=0, top_p=1.0, validate=False)
    out = _ancestral(m, x.clone(), given, torch.tensor([0.6, 0.3], dtype=torch.float64), False, 0.3, 7, opts,
                     {"model_calls": 0, "steps": 0}, False, [])

    def check(frac, p, n):
        assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5, (frac, p)

    assert torch.all(out[:, 0] == 5)
    check((out[:, 1:3] == MASK).double().mean().item(), 0.3, B * 2)
    check((out[:, 3:] == MASK).double().mean().item(), 0.18 / 0.6, B * (L - 3))


def test_invalid_rows_stay_masked_and_raise_once(monkeypatch):
    m = _model()
    with torch.no_grad():
        m.backbone.output_layer.linear.bias[4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fast_sample(m, 2, steps=4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="NaN"):
        fast_sample(m, 2, sampler="first_hitting", generator=torch.Generator().manual_seed(0))


def test_confidence_decoding_takes_ceil_L_over_k_steps():
    m = _model()
    _, stats = fast_sample(m, 2, sampler="confidence", tokens_per_step=4, return_stats=True,
                           generator=torch.Generator().manual_seed(0))
    assert stats["steps"] == math.ceil(L / 4)


def test_ddpm_cache_skips_the_model_when_nothing_changed():
    m = _model()
    _, st_cache = fast_sample(m, 1, steps=200, sampler="ddpm_cache", return_stats=True,
                              generator=torch.Generator().manual_seed(0))
    _, st_plain = fast_sample(m, 1, steps=200, sampler="ddpm", return_stats=True,
                              generator=torch.Generator().manual_seed(0))
    assert st_cache["model_calls"] <= L + 1 < st_plain["model_calls"]


def test_fused_ddpm_cache_matches_the_reference_sampler_in_distribution():
    """Per-position token histograms of 3000 fused vs 3000 published-sampler sequences (same model)."""
    m = _model()
    n = 3000
    fused = fast_sample(m, n, steps=10, sampler="ddpm_cache", generator=torch.Generator().manual_seed(1))
    ref = reference_sample(m, n, steps=10, sampler="ddpm_cache", generator=torch.Generator().manual_seed(2),
                           gumbel_dtype=torch.float64)
    chi2, dof = 0.0, 0
    for pos in range(L):
        a = torch.bincount(fused[:, pos], minlength=V).double()
        b = torch.bincount(ref[:, pos], minlength=V).double()
        keep = (a + b) > 0
        a, b = a[keep], b[keep]
        exp_a = (a + b) * a.sum() / (a.sum() + b.sum())
        exp_b = (a + b) * b.sum() / (a.sum() + b.sum())
        chi2 += float(((a - exp_a) ** 2 / exp_a + (b - exp_b) ** 2 / exp_b).sum())
        dof += int(keep.sum()) - 1
    # chi-square quantile at p = 1e-4 (Wilson-Hilferty approximation)
    z = 3.719
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, (chi2, crit, dof)


def test_mdlm_sample_dispatches():
    m = _model()
    out = mdlm.sample(m, 2, steps=4, generator=torch.Generator().manual_seed(0))            # fused by default
    ref = mdlm.sample(m, 2, steps=4, impl="reference", generator=torch.Generator().manual_seed(0))
    assert out.shape == ref.shape == (2, L)
    with pytest.raises(ValueError, match="implementation"):
        sample(m, 1, impl="magic")


def test_bad_arguments():
    m = _model()
    with pytest.raises(ValueError, match="unknown fast sampler"):
        fast_sample(m, 1, sampler="analytic")
    with pytest.raises(ValueError, match="temperature"):
        fast_sample(m, 1, temperature=0.0)
    with pytest.raises(ValueError, match="tokens_per_step"):
        fast_sample(m, 1, sampler="confidence", tokens_per_step=0)
    with pytest.raises(ValueError, match="remask_eta"):
        fast_sample(m, 1, remask_eta=2.0)
    with pytest.raises(ValueError, match="outside"):
        fast_sample(m, 1, x_init=torch.full((1, L), V))
