"""Noise schedules and time sampling (mdlm.schedules, mdlm.diffusion.sample_t).

Tolerances: schedule formulas are checked in float64 to 1e-12 relative (closed forms) and derivatives
against central finite differences (step 1e-6) to 1e-6 relative.
"""
import math

import pytest
import torch

from mdlm.diffusion import sample_t
from mdlm.schedules import SCHEDULES, get_noise, loss_weight, move_chance

T_GRID = torch.linspace(1e-3, 1 - 1e-3, 257, dtype=torch.float64)


def test_loglinear_weight_is_one_over_t_and_move_chance_linear():
    noise = get_noise("loglinear", eps=1e-3)
    sigma, dsigma = noise(T_GRID)
    torch.testing.assert_close(loss_weight(sigma, dsigma), 1 / T_GRID, rtol=1e-12, atol=0)
    torch.testing.assert_close(move_chance(sigma), (1 - 1e-3) * T_GRID, rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma, -torch.log1p(-(1 - 1e-3) * T_GRID), rtol=0, atol=0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_rate_is_derivative_of_total_noise(name):
    noise = get_noise(name)
    h = 1e-6
    t = T_GRID[1:-1]
    fd = (noise.total_noise(t + h) - noise.total_noise(t - h)) / (2 * h)
    torch.testing.assert_close(noise.rate_noise(t).to(torch.float64), fd.to(torch.float64), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_total_noise_increases_and_masks_more_over_time(name):
    sigma, dsigma = get_noise(name)(T_GRID)
    assert torch.all(sigma[1:] > sigma[:-1]) and torch.all(dsigma > 0)
    mc = move_chance(sigma)
    assert torch.all((mc >= 0) & (mc <= 1))


def test_linear_and_geometric_closed_forms():
    lin = get_noise("linear", sigma_min=0.5, sigma_max=7.0)
    torch.testing.assert_close(lin.total_noise(T_GRID), 0.5 + 6.5 * T_GRID)
    geo = get_noise("geometric", sigma_min=1e-3, sigma_max=2.0)
    torch.testing.assert_close(geo.total_noise(T_GRID), (1e-3 ** (1 - T_GRID)) * 2.0 ** T_GRID)


def test_importance_sampling_transform_is_monotone_onto_unit_interval():
    noise = get_noise("loglinear")
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    t = noise.importance_sampling_transformation(u)
    assert torch.all(t[1:] > t[:-1])
    assert t[0] >= 0 and abs(float(t[-1]) - 1.0) < 1e-6
    with pytest.raises(NotImplementedError):
        get_noise("cosine").importance_sampling_transformation(u)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_noise("sqrt")


@pytest.mark.parametrize("n", [1, 37, 1023])
def test_antithetic_t_has_one_draw_per_stratum(n):
    g = torch.Generator().manual_seed(n)
    eps = 1e-3
    t = sample_t(n, "cpu", sampling_eps=eps, antithetic=True, generator=g).double()
    assert torch.all((t >= eps) & (t <= 1))
    u = (t - eps) / (1 - eps)
    strata = torch.floor(u * n + 1e-6).clamp(max=n - 1).long()  # u_i in [i/n, (i+1)/n)
    assert torch.equal(torch.sort(strata).values, torch.arange(n))


def test_plain_t_is_uniform():
    g = torch.Generator().manual_seed(0)
    t = sample_t(200_000, "cpu", sampling_eps=1e-3, antithetic=False, generator=g).double()
    mean = (1 + 1e-3) / 2
    sd = (1 - 1e-3) / math.sqrt(12) / math.sqrt(t.numel())
    assert abs(float(t.mean()) - mean) < 5 * sd
