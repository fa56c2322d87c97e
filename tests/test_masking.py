"""Forward masking q(x_t | x_0) (mdlm.diffusion.q_xt): rate equals the move chance, unmasked tokens kept.

Statistical bound: the observed rate of each row is within 5 binomial standard deviations.
"""
import math

import pytest
import torch

from mdlm.diffusion import q_xt

MASK = 50257


@pytest.mark.parametrize("L", [1, 37, 1023])
def test_unmasked_tokens_are_kept_and_masked_are_mask(L):
    g = torch.Generator().manual_seed(L)
    x0 = torch.randint(0, MASK, (5, L), generator=g)
    mc = torch.rand(5, 1, generator=g)
    xt = q_xt(x0, mc, MASK, generator=g)
    keep = xt != MASK
    assert torch.equal(xt[keep], x0[keep])
    assert torch.all((xt == MASK) | (xt == x0))


def test_mask_rate_matches_move_chance():
    g = torch.Generator().manual_seed(1)
    L = 100_000
    mc = torch.tensor([[0.0], [1e-3], [0.25], [0.5], [0.999], [1.0]])
    x0 = torch.randint(0, MASK, (mc.shape[0], L), generator=g)
    rate = (q_xt(x0, mc, MASK, generator=g) == MASK).double().mean(1)
    for p, r in zip(mc[:, 0].double().tolist(), rate.tolist()):
        sd = math.sqrt(max(p * (1 - p), 1e-12) / L)
        assert abs(r - p) <= 5 * sd + 1e-12, (p, r)
