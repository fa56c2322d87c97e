"""Reference samplers (mdlm.sampling): invariants, determinism and the categorical draw's distribution.

Distribution test: chi-square over the categories with a critical value at p = 1e-4.
"""
import pytest
import torch

import mdlm
from mdlm.diffusion import MDLM
from mdlm.sampling import sample, sample_categorical, semi_ar_sample

V, MASK = 61, 60


def _model(**over):
    cfg = mdlm.preset("tiny", **{"model.dropout": 0.0, "model.n_blocks": 1, "model.hidden_size": 32,
                                  "model.n_heads": 2, "model.cond_dim": 16, "model.length": 24, **over})
    torch.manual_seed(0)
    m = MDLM(cfg, V)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache", "analytic"])
def test_given_tokens_never_change_and_no_mask_remains(sampler):
    over = {"parameterization": "sedd", "time_conditioning": True} if sampler == "analytic" else {}
    m = _model(**over)
    x_init = torch.full((3, 24), MASK)
    x_init[:, :5] = torch.arange(5)          # prefix
    x_init[:, 20] = 7                         # infill anchor
    out = sample(m, 3, steps=12, sampler=sampler, x_init=x_init, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 24) and out.dtype == torch.int64
    assert torch.equal(out[:, :5], x_init[:, :5]) and torch.all(out[:, 20] == 7)
    assert not torch.any(out == MASK)


def test_unmasked_tokens_are_never_remasked_along_the_trajectory():
    from mdlm.sampling import ddpm_caching_update
    m = _model()
    x = torch.full((4, 24), MASK)
    g = torch.Generator().manual_seed(1)
    steps = 16
    ts = torch.linspace(1, 1e-5, steps + 1)
    for i in range(steps):
        _, x_next = ddpm_caching_update(m, x, ts[i] * torch.ones(4, 1), (1 - 1e-5) / steps, None, g)
        assert torch.equal(x_next[x != MASK], x[x != MASK])
        x = x_next


def test_same_seed_same_tokens_different_seed_different_tokens():
    m = _model()
    a = sample(m, 2, steps=10, generator=torch.Generator().manual_seed(7))
    b = sample(m, 2, steps=10, generator=torch.Generator().manual_seed(7))
    c = sample(m, 2, steps=10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noise_removal_step_clears_the_remaining_masks():
    m = _model()
    # one step from t = 1 to s = 0.5: each token stays masked with probability s/t = 1/2
    out = sample(m, 4, steps=1, eps=0.5, noise_removal=False, generator=torch.Generator().manual_seed(0))
    frac = float((out == MASK).double().mean())
    assert 0.25 < frac < 0.75
    out = sample(m, 4, steps=1, eps=0.5, noise_removal=True, generator=torch.Generator().manual_seed(0))
    assert not torch.any(out == MASK)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_categorical_distribution(dtype):
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    n = 400_000
    g = torch.Generator().manual_seed(0)
    draws = sample_categorical(probs.expand(n, -1), generator=g, gumbel_dtype=dtype)
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[5] == 0  # zero probability is never drawn
    exp = probs[:5].double() * n
    chi2 = float(((counts[:5] - exp) ** 2 / exp).sum())
    assert chi2 < 23.51  # chi-square, 4 dof, p = 1e-4


def test_semi_ar_generates_beyond_the_context():
    m = _model()
    out, nfe = semi_ar_sample(m, 2, stride_length=8, num_strides=3, steps=6,
                              generator=torch.Generator().manual_seed(0), return_nfe=True)
    assert out.shape == (2, 24 + 3 * 8) and not torch.any(out == MASK)
    assert 4 <= nfe <= 4 * 7  # at least one model call per window, at most one per step


def test_samplers_run_in_eval_mode_and_restore_the_mode():
    m = _model(**{"model.dropout": 0.5})
    m.train()
    a = sample(m, 2, steps=4, generator=torch.Generator().manual_seed(0))
    b = sample(m, 2, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and m.training  # no dropout noise inside, train mode restored


def test_bad_sampler_arguments():
    m = _model()
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(m, 1, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        sample(m, 1, steps=0)
    with pytest.raises(ValueError, match="outside"):
        sample(m, 1, x_init=torch.full((1, 24), V))
    with pytest.raises(ValueError, match="stride_length"):
        semi_ar_sample(m, 1, stride_length=0, num_strides=1)
