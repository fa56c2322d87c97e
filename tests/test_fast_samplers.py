"""Fast samplers on the fused sampling step (mdlm.samplers): invariants, determinism, and agreement in
distribution with the published reference sampler.

Distribution checks: per-position token histograms of fused and reference samples from the same tiny model
are compared with a chi-square homogeneity test at each position at level 1e-4 / P (Bonferroni over the P
positions, valid whatever their dependence; classes seen < 10 times pooled); first hitting is tested for
goodness of fit against its exact joint law (every outcome and reveal order enumerated). The tiny model's LM
head is scaled down for these tests (``flat``) so p_theta is not nearly deterministic and the tests have
power (a fused sampler at temperature 0.9 fails the ddpm_cache comparison).
"""
import math
import statistics

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


def _model(seed=0, flat=None, **over):
    cfg = mdlm.preset("tiny", **{"model.dropout": 0.0, "model.n_blocks": 1, "model.hidden_size": 32,
                                  "model.n_heads": 2, "model.cond_dim": 16, "model.length": L, **over})
    torch.manual_seed(seed)
    m = MDLM(cfg, V)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        if flat:   # scale the LM head: 0.03 gives p_theta a perplexity ~5 of 12 (else ~1), so
            m.backbone.output_layer.linear.weight.mul_(flat)   # distribution tests have power
            m.backbone.output_layer.linear.bias.mul_(flat)
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
    out, left = _ancestral(m, x.clone(), given, torch.tensor([0.6, 0.3], dtype=torch.float64), 0.3, 7, opts,
                           {"model_calls": 0, "steps": 0}, False, [])
    assert torch.equal(left, (out == MASK).view(-1).nonzero().squeeze(1))  # the trajectory's masked set is x's

    def check(frac, p, n):
        assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5, (frac, p)

    assert torch.all(out[:, 0] == 5)
    check((out[:, 1:3] == MASK).double().mean().item(), 0.3, B * 2)
    check((out[:, 3:] == MASK).double().mean().item(), 0.18 / 0.6, B * (L - 3))


def test_remasking_rate_at_the_cap():
    """The step above never reaches the cap (s / (1 - t) = 0.75 > eta). Here t = 0.4 -> s = 0.2 with eta = 0.45:
    the cap s / (1 - t) = 1/3 binds, so decoded tokens are re-masked with probability exactly 1/3 (t and s
    swapped, t / (1 - s) = 0.5, would give min(eta, 0.5) = 0.45: 19 standard errors away at these counts), and
    the unmask target s' = s - sigma (1 - t) = 0: every masked token unmasks."""
    from mdlm.samplers import _ancestral, _remask_schedule
    grid = torch.tensor([0.4, 0.2], dtype=torch.float64)
    (t, s, sig, s_eff), = _remask_schedule(grid, 0.45)
    assert (t, s) == (0.4, 0.2) and sig == pytest.approx(1 / 3, rel=1e-12) and s_eff == pytest.approx(0, abs=1e-15)
    m = _model()
    B = 3000
    x = torch.full((B, L), MASK)
    x[:, :3] = 5
    given = torch.zeros(B, L, dtype=torch.bool)
    given[:, 0] = True
    opts = dict(mask_index=MASK, temperature=1.0, top_k=0, top_p=1.0, validate=False)
    out, _ = _ancestral(m, x.clone(), given, grid, 0.45, 11, opts, {"model_calls": 0, "steps": 0}, False, [])
    frac = (out[:, 1:3] == MASK).double().mean().item()
    n = B * 2
    assert abs(frac - 1 / 3) < 5 * ((1 / 3) * (2 / 3) / n) ** 0.5, frac
    assert torch.all(out[:, 0] == 5) and not torch.any(out[:, 3:] == MASK)


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


def test_confidence_k_per_step_has_no_host_read_in_the_loop_and_equals_the_synced_gather(monkeypatch):
    """k per step: per-row masked counts read once, then tracked on the host (nonzero_static): the same
    tokens as the per-call nonzero gather, and a host-read count that does not grow with the steps."""
    import mdlm.samplers as ms
    m = _model()
    x_init = torch.full((3, L), MASK)
    x_init[0, 1] = 4            # rows with different numbers of given tokens
    x_init[2, [0, 3, 5]] = 9
    for k in (1, 2, 4):
        a, st = fast_sample(m, 3, sampler="confidence", tokens_per_step=k, x_init=x_init, return_stats=True,
                            generator=torch.Generator().manual_seed(k))
        assert st["host_syncs"] == 2 and st["steps"] == math.ceil(L / k), st   # before and after the loop
        real = ms._confidence
        monkeypatch.setattr(ms, "_confidence", lambda *args, **kw: real(*args, static_gather=False, **kw))
        b, st_b = fast_sample(m, 3, sampler="confidence", tokens_per_step=k, x_init=x_init, return_stats=True,
                              generator=torch.Generator().manual_seed(k))
        monkeypatch.setattr(ms, "_confidence", real)
        assert torch.equal(a, b) and st_b["host_syncs"] > st["host_syncs"]
        assert torch.all(a[x_init != MASK] == x_init[x_init != MASK]) and not torch.any(a == MASK)


def test_ancestral_calls_the_model_only_where_a_token_unmasks(monkeypatch):
    """Every model call has >= 1 unmasking row and its LM head sees only those rows; the rows drawn over all
    calls are exactly the positions decoded in the loop."""
    import mdlm.samplers as ms
    m = _model()
    real = ms.masked_row_logits
    for eta in (0.0, 0.05):
        sizes = []
        monkeypatch.setattr(ms, "masked_row_logits", lambda *a: (sizes.append(a[3].numel()), real(*a))[1])
        a, st = fast_sample(m, 3, steps=200, sampler="ddpm_cache", noise_removal=False, remask_eta=eta,
                            return_stats=True, generator=torch.Generator().manual_seed(4))
        monkeypatch.setattr(ms, "masked_row_logits", real)
        assert len(sizes) == st["model_calls"] >= 1 and min(sizes) >= 1, sizes
        if eta == 0:
            assert sum(sizes) == int((a != MASK).sum()), (sizes, a)
            assert st["model_calls"] <= 3 * L and st["steps"] == 200


@pytest.mark.parametrize("kw", [{"sampler": "ddpm_cache"}, {"sampler": "ddpm"}, {"remask_eta": 0.05},
                                {"sampler": "ddpm", "time": True}, {"sampler": "first_hitting"},
                                {"sampler": "first_hitting", "time": True}])
def test_samplers_read_the_host_twice_whatever_the_step_count(kw):
    """One read before the loop (ddpm*: the masked-set trajectory's per-step counts; first hitting: the event
    count) and one after it (the invalid-row check); none per step, event or model call."""
    kw = dict(kw)
    m = _model(**({"time_conditioning": True} if kw.pop("time", False) else {}))
    for steps in (5, 200):
        _, st = fast_sample(m, 2, steps=steps, return_stats=True, generator=torch.Generator().manual_seed(steps),
                            **kw)
        assert st["host_syncs"] == 2 and st["model_calls"] >= 1, (steps, st)


def test_time_conditioned_ancestral_calls_the_model_at_the_time_of_its_step(monkeypatch):
    """With time conditioning each model call gets sigma(t_i) of the grid step i whose tokens it draws (the
    published ddpm and ddpm_cache both recompute every step then); i is read from the step's Philox offset
    (host offset + the device-side offset_tensor the kernel reads)."""
    import mdlm.samplers as ms
    m = _model(**{"time_conditioning": True})
    steps, eps = 30, 1e-3
    grid = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    log = []
    real_logits, real_step = ms.masked_row_logits, mk.sample_step
    monkeypatch.setattr(ms, "masked_row_logits", lambda *a: (log.append(("sigma", a[2].clone())), real_logits(*a))[1])
    def step(*a, **k):
        off = a[4] + (int(k["offset_tensor"]) if k.get("offset_tensor") is not None else 0)
        log.append(("offset", off))
        return real_step(*a, **k)

    monkeypatch.setattr(mk, "sample_step", step)
    fast_sample(m, 2, steps=steps, eps=eps, sampler="ddpm_cache", noise_removal=False,
                generator=torch.Generator().manual_seed(0))
    assert len(log) >= 2 and len(log) % 2 == 0
    for (k1, sigma), (k2, offset) in zip(log[::2], log[1::2]):
        assert k1 == "sigma" and k2 == "offset" and 1 <= offset <= steps
        want = m.noise(torch.full((2,), float(grid[offset - 1])))[0]
        assert torch.equal(sigma, want), (offset, sigma, want)


def _cheap_logits(monkeypatch):
    """Replace the model call by constant logits: the unmask times (hence the model-call count and which
    positions stay masked) do not depend on the logits."""
    import mdlm.samplers as S
    monkeypatch.setattr(S, "masked_row_logits", lambda model, x, sigma, idx: torch.zeros(idx.numel(), V))


def _expected_ancestral_calls(grid, n):
    """Exact E[model calls] of the fused ddpm / ddpm_cache from n masked rows (no noise removal): each row
    first unmasks at step k with probability p_k = grid[k] - grid[k + 1] (grid[0] = 1), independently, and the
    model is called once at each step where some row unmasks: sum_k 1 - (1 - p_k)^n."""
    g = grid.tolist()
    return sum(1 - (1 - (g[k] - g[k + 1])) ** n for k in range(len(g) - 1))


def test_ancestral_model_calls_match_their_exact_expectation(monkeypatch):
    """Model-call counts (a function of the unmask times only) match the exact expectation within 4.5
    standard errors, for the closed-form trajectory (eta = 0) and the step-by-step one (eta = 1e-9: sigma is
    negligible, so the same law)."""
    _cheap_logits(monkeypatch)
    m = _model()
    steps, eps, runs = 12, 0.05, 400
    grid = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    expected = _expected_ancestral_calls(grid, L)
    for eta in (0.0, 1e-9):
        calls = []
        for r in range(runs):
            _, st = fast_sample(m, 1, steps=steps, eps=eps, sampler="ddpm_cache", noise_removal=False,
                                remask_eta=eta, return_stats=True, generator=torch.Generator().manual_seed(r))
            calls.append(st["model_calls"])
        c = torch.tensor(calls, dtype=torch.float64)
        se = max(c.std().item(), 0.5) / runs ** 0.5
        assert abs(c.mean().item() - expected) < 4.5 * se, (eta, c.mean().item(), expected, se)


def _chi2_crit(dof, p=1e-4):
    """chi-square quantile at upper-tail probability p (Wilson-Hilferty approximation)."""
    z = statistics.NormalDist().inv_cdf(1 - p)
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _assert_same_law_per_position(a_ids: torch.Tensor, b_ids: torch.Tensor, p: float = 1e-4) -> int:
    """Chi-square homogeneity test of two samples (n_a, P) and (n_b, P) of token ids at every position
    separately, each at level p / P (Bonferroni: the family's false-alarm rate is <= p whatever the dependence
    between positions of one sequence); classes seen < 10 times in both samples together are pooled. Returns
    the total degrees of freedom tested (the caller checks the test had something to test)."""
    P = a_ids.shape[1]
    total = 0
    for pos in range(P):
        a = torch.bincount(a_ids[:, pos], minlength=V).double()
        b = torch.bincount(b_ids[:, pos], minlength=V).double()
        big = (a + b) >= 10
        a = torch.cat([a[big], a[~big].sum().view(1)])
        b = torch.cat([b[big], b[~big].sum().view(1)])
        keep = (a + b) > 0
        a, b = a[keep], b[keep]
        dof = int(keep.sum()) - 1
        if dof == 0:
            continue
        exp_a = (a + b) * a.sum() / (a.sum() + b.sum())
        exp_b = (a + b) * b.sum() / (a.sum() + b.sum())
        chi2 = float(((a - exp_a) ** 2 / exp_a + (b - exp_b) ** 2 / exp_b).sum())
        assert chi2 < _chi2_crit(dof, p / P), (pos, chi2, dof, _chi2_crit(dof, p / P))
        total += dof
    return total


def test_first_unmask_step_follows_the_ddpm_cache_schedule(monkeypatch):
    """From a model call at grid index i, a masked row first unmasks at step k >= i with probability
    (t_k - t_{k+1}) / t_i and never (within the grid) with probability t_steps / t_i: chi-square of the
    rows' unmask steps; end to end, the fraction of positions left masked (no noise removal) is eps."""
    from mdlm.samplers import _unmask_steps
    steps, eps, n = 10, 0.05, 200_000
    grid = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    u = mk.philox_uniform(1, n, 3, offset=0)[0]
    for i in (0, 4, steps - 1):
        j = _unmask_steps(u, float(grid[i]), -grid, i)
        assert int(j.min()) >= i and int(j.max()) <= steps
        counts = torch.bincount(j - i, minlength=steps + 1 - i).double()
        p = torch.cat([grid[i:steps] - grid[i + 1:], grid[steps:]]) / grid[i]
        chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
        assert chi2 < _chi2_crit(steps - i), (i, chi2)
    _cheap_logits(monkeypatch)
    B = 2000
    out = fast_sample(_model(), B, steps=steps, eps=0.3, sampler="ddpm_cache", noise_removal=False,
                      generator=torch.Generator().manual_seed(0))
    frac = (out == MASK).double().mean().item()
    assert abs(frac - 0.3) < 5 * (0.3 * 0.7 / (B * L)) ** 0.5, frac


@pytest.mark.parametrize("sampler,over,flat", [("ddpm_cache", {}, 0.03), ("ddpm", {"time_conditioning": True}, 0.1)])
def test_fused_ddpm_matches_the_reference_sampler_in_distribution(sampler, over, flat):
    """Per-position token histograms of 8000 fused vs 8000 published-sampler sequences (same model; with time
    conditioning the model's input time matters, so its plumbing is checked too)."""
    m = _model(flat=flat, **over)
    n = 8000
    fused = fast_sample(m, n, steps=10, sampler=sampler, generator=torch.Generator().manual_seed(1))
    ref = reference_sample(m, n, steps=10, sampler=sampler, generator=torch.Generator().manual_seed(2),
                           gumbel_dtype=torch.float64)
    assert _assert_same_law_per_position(fused, ref) >= 3 * L


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
    for eps in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            fast_sample(m, 1, eps=eps)
    with pytest.raises(ValueError, match="outside"):
        fast_sample(m, 1, x_init=torch.full((1, L), V))


def test_fused_semi_ar_windows_chain_and_length(monkeypatch):
    """Each window after the first starts from the previous window shifted left by the stride (given tokens),
    with the stride's positions masked; the output is the windows' emitted strides + the last window's rest."""
    import mdlm.samplers as ms
    m = _model()
    calls = []
    real = ms.fast_sample

    def spy(*a, **k):
        out, st = real(*a, **k)
        calls.append((k["x_init"].clone(), out.clone()))
        return out, st

    monkeypatch.setattr(ms, "fast_sample", spy)
    stride, n = 2, 3
    out, stats = ms.fast_semi_ar_sample(m, 4, stride_length=stride, num_strides=n, steps=5,
                                        generator=torch.Generator().manual_seed(0), return_stats=True)
    assert out.shape == (4, L + n * stride) and not torch.any(out == MASK)
    assert len(calls) == n + 1 and stats["windows"] == n + 1 and stats["model_calls"] >= n + 1
    assert torch.all(calls[0][0] == MASK)
    for (x_prev, out_prev), (x_next, _) in zip(calls, calls[1:]):
        assert torch.equal(x_next[:, :L - stride], out_prev[:, stride:])
        assert torch.all(x_next[:, L - stride:] == MASK)
    emitted = torch.cat([o[:, :stride] for _, o in calls] + [calls[-1][1][:, stride:]], dim=1)
    assert torch.equal(out, emitted)
    again = ms.fast_semi_ar_sample(m, 4, stride_length=stride, num_strides=n, steps=5,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert mdlm.sample(m, 2, steps=3, num_strides=1, stride_length=2).shape == (2, L + 2)
    assert mdlm.sample(m, 2, steps=3, num_strides=1, stride_length=2, impl="reference").shape == (2, L + 2)
    with pytest.raises(ValueError, match="stride_length"):
        ms.fast_semi_ar_sample(m, 1, stride_length=L + 1, num_strides=1)
    with pytest.raises(ValueError, match="num_strides"):
        ms.fast_semi_ar_sample(m, 1, stride_length=2, num_strides=-1)


def test_fused_semi_ar_matches_the_published_semi_ar_in_distribution():
    """Per-position histograms over the whole generated length (L + 2 strides), 4000 sequences each."""
    from mdlm.sampling import semi_ar_sample
    m = _model(flat=0.03)
    n, stride = 4000, 3
    fused = mdlm.samplers.fast_semi_ar_sample(m, n, stride_length=stride, num_strides=2, steps=8,
                                              generator=torch.Generator().manual_seed(1))
    ref = semi_ar_sample(m, n, stride_length=stride, num_strides=2, steps=8,
                         generator=torch.Generator().manual_seed(2), gumbel_dtype=torch.float64)
    assert fused.shape == ref.shape == (n, L + 2 * stride)
    assert _assert_same_law_per_position(fused, ref) >= 3 * (L + 2 * stride)


def test_cuda_graph_option_needs_a_cuda_model():
    m = _model()
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        fast_sample(m, 1, sampler="first_hitting", cuda_graph=True)
    for sampler in ("ddpm", "ddpm_cache"):
        with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
            fast_sample(m, 1, sampler=sampler, cuda_graph=True)
    with pytest.raises(ValueError, match="applies to the samplers"):
        fast_sample(m, 1, sampler="confidence", cuda_graph=True)


def _cuda_tiny_model(**over):
    torch.manual_seed(0)
    cfg = mdlm.preset("tiny", **{"model.dropout": 0.0, "model.length": 64, **over})
    m = MDLM(cfg, 50258).cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x_init = torch.full((4, 64), 50257, device="cuda")
    x_init[:, :8] = 11
    return m, x_init


@pytest.mark.cuda
@pytest.mark.parametrize("sampler,kw", [("ddpm_cache", {}), ("ddpm", {"top_p": 0.9}), ("first_hitting", {}),
                                        ("ddpm_cache", {"remask_eta": 0.05})])
def test_sampler_loops_never_synchronise(monkeypatch, sampler, kw):
    """GPU: every model call of the ddpm / ddpm_cache / first-hitting loops (the call, the sampling step and the
    bookkeeping issued with it, i.e. everything _issue runs) under torch.cuda.set_sync_debug_mode("error"): a host
    read, .item(), nonzero or a pageable copy in the loop raises. The deliberate reads before and after the loop
    (the step counts, the invalid flags) stay outside. The meta-device check of tests/test_no_host_traffic.py is
    the CPU stand-in of this one."""
    import mdlm.samplers as ms
    m, x_init = _cuda_tiny_model()
    real, calls = ms._issue, []

    def strict(*a):
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            real(*a)
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        calls.append(1)

    monkeypatch.setattr(ms, "_issue", strict)
    out = fast_sample(m, 4, steps=32, sampler=sampler, x_init=x_init, noise_removal=False,
                      generator=torch.Generator().manual_seed(1), **kw)
    assert len(calls) >= 4 and out.shape == x_init.shape


@pytest.mark.cuda
@pytest.mark.parametrize("over,kw", [({}, {}), ({"time_conditioning": True}, {"temperature": 0.8, "top_k": 40}),
                                     ({}, {"top_p": 0.9})])
def test_first_hitting_cuda_graph_replays_give_the_eager_tokens(over, kw):
    """GPU: the whole event (draws, model, sampling step, scatter; Philox offsets on the device) captured once
    and replayed per event gives bit-identical tokens to the eager loop, with no capture-failure warning;
    with time conditioning the in-graph event-time update feeds the model too."""
    import warnings
    m, x_init = _cuda_tiny_model(**over)
    a, st_a = fast_sample(m, 4, sampler="first_hitting", x_init=x_init, return_stats=True,
                          generator=torch.Generator().manual_seed(3), **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b, st_b = fast_sample(m, 4, sampler="first_hitting", x_init=x_init, return_stats=True, cuda_graph=True,
                              generator=torch.Generator().manual_seed(3), **kw)
    failed = [str(w.message) for w in caught if "CUDA-graph capture" in str(w.message)]
    assert not failed, failed   # a failed capture falls back to eager (same tokens): that must not pass unseen
    assert torch.equal(a, b)
    # two eager warm-up events, then every event (the capturing one included) is one replay of the graph
    assert st_b.get("graph_replays", 0) == st_b["model_calls"] - 2 and st_b["model_calls"] == st_a["model_calls"] == 56
    assert st_b["host_syncs"] == st_a["host_syncs"] + 1   # the capture's device synchronisation
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@pytest.mark.cuda
def test_first_hitting_failed_capture_warns_keeps_the_tokens_and_the_stream(monkeypatch):
    """GPU: a host read inside the event (here: a .item() slipped into the model call) makes capture fail:
    a warning, the eager tokens, and the caller's stream restored afterwards."""
    import mdlm.samplers as ms
    m, x_init = _cuda_tiny_model()
    a = fast_sample(m, 4, sampler="first_hitting", x_init=x_init, generator=torch.Generator().manual_seed(3))
    real = ms.masked_row_logits

    def with_host_read(model, x, sigma, idx):
        float(sigma.sum())   # not permitted while a stream is capturing
        return real(model, x, sigma, idx)

    monkeypatch.setattr(ms, "masked_row_logits", with_host_read)
    with pytest.warns(UserWarning, match="CUDA-graph capture of the sampling event failed"):
        b, st = fast_sample(m, 4, sampler="first_hitting", x_init=x_init, return_stats=True, cuda_graph=True,
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and st.get("graph_replays", 0) == 0
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda.synchronize()   # the device is usable after the failed capture


def _first_hitting_exact_law(m, x_init):
    """Exact joint law of first-hitting samples of a model without time conditioning: the masked positions
    are revealed in a uniformly random order, each from p_theta given the tokens revealed so far, so
    P(x) = mean over orders of prod_k p_theta(x_{o_k} | x revealed at o_1..o_{k-1}). Returns (outcomes
    (n, L) int64, probabilities (n,) float64) over every completion of x_init (MASK excluded)."""
    import itertools
    masked = (x_init == MASK).nonzero().squeeze(1).tolist()
    outcomes = torch.tensor(list(itertools.product(range(V - 1), repeat=len(masked))), dtype=torch.int64)
    full = x_init.repeat(outcomes.shape[0], 1)
    full[:, masked] = outcomes
    orders = list(itertools.permutations(masked))
    inputs, targets = [], []
    for order in orders:
        z = x_init.repeat(outcomes.shape[0], 1)
        for pos in order:
            inputs.append(z.clone())
            targets.append(pos)
            z[:, pos] = full[:, pos]
    z = torch.cat(inputs)
    from mdlm.samplers import masked_row_logits
    with torch.no_grad():   # the fp32 logits the sampler consumes; log-softmax over v != MASK in float64
        logits = masked_row_logits(m, z, torch.zeros(z.shape[0]), torch.arange(z.numel())).double()
    logits[:, MASK] = float("-inf")
    logp = torch.log_softmax(logits, dim=1).view(z.shape[0], z.shape[1], V)   # (orders * steps * n, L, V)
    n = outcomes.shape[0]
    pos = torch.tensor(targets).repeat_interleave(n)
    tok = full.repeat(len(targets), 1).gather(1, pos.view(-1, 1)).squeeze(1)
    lp = logp[torch.arange(z.shape[0]), pos, tok].view(len(orders), len(masked), n).sum(1)
    return full, lp.exp().mean(0)


@pytest.mark.parametrize("given", [None, 1])
def test_first_hitting_matches_its_exact_law(given):
    """Goodness of fit of 100k first-hitting sequences (L = 3, V - 1 = 12 tokens) to the exact joint law,
    enumerated over every outcome and reveal order (cells with expected count < 5 pooled); a one-step ddpm
    (all positions drawn at once, independently) fails the same test."""
    Ls = 3
    m = _model(flat=0.03, **{"model.length": Ls})
    x_init = torch.full((Ls,), MASK)
    if given is not None:
        x_init[given] = 4
    full, p = _first_hitting_exact_law(m, x_init)
    assert abs(float(p.sum()) - 1) < 1e-9
    n = 100_000
    base = 13 ** torch.arange(Ls - 1, -1, -1)
    cell = {int(c): i for i, c in enumerate((full * base).sum(1).tolist())}

    def chi2_of(sample):
        counts = torch.zeros(len(cell), dtype=torch.float64)
        ids = torch.tensor([cell[int(c)] for c in (sample * base).sum(1).tolist()])
        counts.index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))
        exp = n * p
        small = exp < 5
        o = torch.cat([counts[~small], counts[small].sum().view(1)])
        e = torch.cat([exp[~small], exp[small].sum().view(1)])
        return float(((o - e) ** 2 / e).sum()), int(o.numel()) - 1

    xi = x_init.repeat(n, 1)
    fh = fast_sample(m, n, sampler="first_hitting", x_init=xi, generator=torch.Generator().manual_seed(11))
    chi2, dof = chi2_of(fh)
    assert chi2 < _chi2_crit(dof) and dof >= 20, (chi2, dof)
    one_step = fast_sample(m, n, steps=1, eps=1e-12, sampler="ddpm", x_init=xi, noise_removal=False,
                           generator=torch.Generator().manual_seed(11))
    assert not torch.any(one_step == MASK)
    chi2_bad, dof_bad = chi2_of(one_step)
    assert chi2_bad > _chi2_crit(dof_bad), (chi2_bad, dof_bad)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read device data on the host (a scalar read, bool(), a data-sized nonzero) plus
    Tensor.tolist calls (which do not dispatch): an independent check of the samplers' own host_syncs count."""
    READS = ("aten._local_scalar_dense", "aten.nonzero.", "aten.is_nonzero", "aten.item", "aten.masked_select",
             "aten.unique", "aten._unique")

    def __init__(self, monkeypatch):
        super().__init__()
        self.n = 0
        real = torch.Tensor.tolist

        def tolist(t):
            self.n += 1
            return real(t)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.READS):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [{"sampler": "ddpm_cache"}, {"sampler": "ddpm", "remask_eta": 0.05},
                                {"sampler": "first_hitting"}, {"sampler": "confidence", "tokens_per_step": 1}])
def test_host_reads_do_not_grow_with_steps_or_events(monkeypatch, kw):
    """Counted at the dispatcher (not by the sampler itself): the same number of host reads for 5 and 60 steps
    (ddpm*), and for 1 and 6 masked positions per sequence (first hitting, confidence: 1 vs 6 events)."""
    m = _model()
    counts = []
    for size in (5, 60) if kw["sampler"].startswith("ddpm") else (1, L):
        x_init = torch.full((2, L), MASK)
        if not kw["sampler"].startswith("ddpm"):
            x_init[:, size:] = 3      # `size` masked positions per sequence
        with _HostReads(monkeypatch) as reads:
            out = fast_sample(m, 2, steps=size, x_init=x_init, generator=torch.Generator().manual_seed(0), **kw)
        monkeypatch.undo()
        assert not torch.any(out == MASK)
        counts.append(reads.n)
    assert counts[0] == counts[1] and counts[0] > 0, counts


@pytest.mark.parametrize("use_kernels", [False, True])
def test_first_hitting_event_has_no_data_dependent_host_read(use_kernels):
    """The captured unit of first hitting runs under FakeTensorMode (no data at all): any host read of device
    data (.item(), bool(), data-sized nonzero, a range check) would raise there — and does in the control."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
    from mdlm.samplers import _first_hitting_event
    m = _model()
    m.backbone.validate_inputs = False   # fast_sample does this (x is checked once before the loop)
    m.backbone.use_kernels = use_kernels  # True: the fused block path that CUDA captures (Triton interpreter)
    opts = dict(mask_index=MASK, temperature=0.9, top_k=0, top_p=1.0, validate=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.full((3, L), MASK)
        event, bad = _first_hitting_event(m, x, 5, opts)
        event()
        event()
        assert x.shape == (3, L) and bad.shape == ()
    m.backbone.validate_inputs = True    # the input range check reads the host: the control must raise
    with pytest.raises(DataDependentOutputException):
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.full((3, L), MASK)
            _first_hitting_event(m, x, 5, opts)[0]()


def _closure_tensors(fn, seen=None):
    """Every tensor a function closes over, through the closures of the functions it closes over."""
    seen = set() if seen is None else seen
    out = []
    for cell in fn.__closure__ or ():
        try:
            v = cell.cell_contents
        except ValueError:   # an empty cell
            continue
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif callable(v) and getattr(v, "__closure__", None):
            out += _closure_tensors(v, seen)
    return out


def _fake_cuda_graphs(monkeypatch, fail_capture=False):
    """CPU stand-ins for the torch.cuda pieces _EventGraph uses, with CUDA-graph semantics: capture records the
    event without changing any state (here: runs it under FakeTensorMode, so any host read would raise, and
    restores every tensor the event reaches through its closures afterwards: FakeTensorMode still runs
    in-place ops whose inputs are all real) and replay runs it for real on the live tensors. Returns a log:
    "captures" (the captured _EventGraph objects, in order), "pools" (the pool passed to each capture) and
    "streams" (the stream of each capture: stand-in streams are distinct objects)."""
    import contextlib
    from torch._subclasses.fake_tensor import FakeTensorMode
    import mdlm.samplers as ms

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    log = {"captures": [], "pools": [], "streams": []}
    capturing = []

    class EventGraph(ms._EventGraph):
        def _capture(self, stream):
            capturing.append(self)
            try:
                super()._capture(stream)
            finally:
                capturing.pop()

    class Graph:
        def __init__(self):
            self.owner = capturing[-1]

        def replay(self):
            self.owner.event()

    @contextlib.contextmanager
    def graph(g, stream=None, pool=None):
        owner = capturing[-1]
        saved = [(v, v.clone()) for v in _closure_tensors(owner.event)]
        log["captures"].append(owner)
        log["pools"].append(pool)
        log["streams"].append(stream)
        with FakeTensorMode(allow_non_fake_inputs=True):
            if fail_capture:
                raise RuntimeError("operation not permitted when stream is capturing")
            yield
        for live, snap in saved:
            live.copy_(snap)

    monkeypatch.setattr(ms, "_EventGraph", EventGraph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", id(log)))
    return log


@pytest.mark.parametrize("fail_capture", [False, True])
def test_event_graph_warms_up_captures_once_and_replays_the_eager_tokens(monkeypatch, fail_capture):
    """_EventGraph's control flow on CPU with stand-in CUDA graphs: two eager warm-up events, one capture that
    does not touch the state, then one replay per event — the same tokens as the eager loop; a failed capture
    warns and the rest runs eagerly, same tokens again."""
    from mdlm.samplers import _first_hitting
    m = _model()
    m.backbone.validate_inputs = False
    opts = dict(mask_index=MASK, temperature=1.0, top_k=0, top_p=1.0, validate=False)
    x_init = torch.full((3, L), MASK)
    x_init[1, :2] = 5
    st_a = {"model_calls": 0, "steps": 0}
    a = _first_hitting(m, x_init.clone(), 77, opts, st_a, False, [], cuda_graph=False)
    _fake_cuda_graphs(monkeypatch, fail_capture)
    st_b = {"model_calls": 0, "steps": 0}
    if fail_capture:
        with pytest.warns(UserWarning, match="CUDA-graph capture of the sampling event failed"):
            b = _first_hitting(m, x_init.clone(), 77, opts, st_b, False, [], cuda_graph=True)
    else:
        b = _first_hitting(m, x_init.clone(), 77, opts, st_b, False, [], cuda_graph=True)
    assert torch.equal(a, b) and not torch.any(b == MASK)
    assert st_b["model_calls"] == st_a["model_calls"] == L
    assert st_b.get("graph_replays", 0) == (0 if fail_capture else L - 2)
    assert st_b["host_syncs"] == st_a["host_syncs"] + 1   # the capture's device synchronisation


def _ancestral_run(m, x_init, steps, eta, seed, cuda_graph=False, pad=None, **kw):
    """One ddpm* loop (no noise removal) through _ancestral directly, so that the CPU can run the graphed path
    with stand-in graphs. Returns (tokens, masked positions left, stats, invalid flags)."""
    from mdlm.samplers import _ancestral
    opts = dict(mask_index=MASK, temperature=1.0, top_k=0, top_p=1.0, validate=False, **kw)
    stats = {"model_calls": 0, "steps": 0, "host_syncs": 0}
    invalid = []
    grid = torch.linspace(1, 1e-5, steps + 1, dtype=torch.float64)
    x, left = _ancestral(m, x_init.clone(), x_init != MASK, grid, eta, seed, opts, stats, False, invalid,
                         cuda_graph=cuda_graph, pad=pad)
    return x.clone(), left.clone(), stats, invalid


@pytest.mark.parametrize("eta,fail_capture", [(0.0, False), (0.05, False), (0.0, True)])
def test_ancestral_graphs_capture_once_per_bucket_and_replay_the_eager_tokens(monkeypatch, eta, fail_capture):
    """ddpm* with stand-in CUDA graphs on the CPU: each row bucket (here every power of two: _MIN_BUCKET = 1)
    gets two eager warm-up calls and one capture (all captures into one pool), then one replay per call; the
    tokens equal those of the eager loop with the same padding AND without padding (padding rows never reach
    x: their writes go to the spare slot). A failed capture warns, and every call of that bucket runs eagerly:
    same tokens, no replay."""
    import mdlm.samplers as ms
    m = _model()
    m.backbone.validate_inputs = False
    monkeypatch.setattr(ms, "_MIN_BUCKET", 1)
    B, steps = 16, 24
    x_init = torch.full((B, L), MASK)
    x_init[3, :4] = 2                     # some given tokens
    sizes = []
    real_bucket = ms._bucket_rows
    monkeypatch.setattr(ms, "_bucket_rows", lambda n, BL, pad: (sizes.append(real_bucket(n, BL, pad)), sizes[-1])[1])
    a, left_a, st_a, inv_a = _ancestral_run(m, x_init, steps, eta, 9, pad=True)
    buckets = list(sizes)        # the padded eager run's bucket per model call
    uses = {R: buckets.count(R) for R in set(buckets)}
    assert len(uses) >= 2 and sum(u >= 3 for u in uses.values()) >= 2, uses   # the test exercises >= 2 captures
    c, left_c, st_c, _ = _ancestral_run(m, x_init, steps, eta, 9, pad=False)
    log = _fake_cuda_graphs(monkeypatch, fail_capture)
    if fail_capture:
        with pytest.warns(UserWarning, match="CUDA-graph capture of the sampling event failed"):
            b, left_b, st_b, inv_b = _ancestral_run(m, x_init, steps, eta, 9, cuda_graph=True)
    else:
        b, left_b, st_b, inv_b = _ancestral_run(m, x_init, steps, eta, 9, cuda_graph=True)
    assert torch.equal(a, b) and torch.equal(a, c), (a, b, c)
    assert torch.equal(left_a, left_b) and torch.equal(left_a, left_c)
    assert torch.all(a[3, :4] == 2) and not bool(torch.stack(inv_a + inv_b).any())
    assert st_a["model_calls"] == st_b["model_calls"] == st_c["model_calls"] == len(buckets)
    captured = sum(u >= 3 for u in uses.values())
    assert len(log["captures"]) == len({id(g) for g in log["captures"]}) == captured   # once per bucket
    assert log["pools"] and all(p == log["pools"][0] and p is not None for p in log["pools"])   # one pool
    assert all(x is log["streams"][0] and x is not None for x in log["streams"])   # one capture stream for the pool
    want = 0 if fail_capture else sum(max(0, u - 2) for u in uses.values())
    assert st_b.get("graph_replays", 0) == want and (fail_capture or want > 0)
    assert st_b["host_syncs"] == st_a["host_syncs"] + captured == 1 + captured   # the counts read + captures


def test_bucket_rows_are_powers_of_two_from_the_minimum_up_to_all_rows():
    from mdlm.samplers import _MIN_BUCKET, _bucket_rows
    assert _MIN_BUCKET == 128
    assert [_bucket_rows(n, 16384, True) for n in (1, 16, 128, 129, 300, 8193, 16384)] == \
        [128, 128, 128, 256, 512, 16384, 16384]
    assert _bucket_rows(5, 24, True) == 24 and _bucket_rows(5, 24, False) == 5   # capped at B*L; unpadded: n


def test_timing_records_host_and_device_time_per_model_call_of_the_loop():
    m = _model()
    for sampler in ("ddpm_cache", "first_hitting", "confidence"):
        _, st = fast_sample(m, 2, steps=20, sampler=sampler, noise_removal=False, timing=True, return_stats=True,
                            generator=torch.Generator().manual_seed(0))
        assert len(st["host_s"]) == len(st["device_s"]) == st["model_calls"] >= 1, (sampler, st)
        assert all(h > 0 for h in st["host_s"]) and st["device_s"] == st["host_s"]   # CPU: nothing is async


@pytest.mark.cuda
@pytest.mark.parametrize("sampler,over,kw,min_bucket", [
    ("ddpm_cache", {}, {}, None),
    ("ddpm", {"time_conditioning": True}, {"temperature": 0.8, "top_k": 40}, None),
    ("ddpm_cache", {}, {"remask_eta": 0.05, "top_p": 0.9}, None),
    ("ddpm_cache", {}, {}, 1)])
def test_ancestral_cuda_graph_replays_give_the_eager_tokens(monkeypatch, sampler, over, kw, min_bucket):
    """GPU: ddpm* with cuda_graph gives bit-identical tokens to the eager loop (which pads to the same row
    buckets), no capture-failure warning, one capture per bucket (with _MIN_BUCKET = 1: several buckets, one
    memory pool), every later call of a bucket one replay, and the caller's stream restored."""
    import warnings
    import mdlm.samplers as ms
    if min_bucket is not None:
        monkeypatch.setattr(ms, "_MIN_BUCKET", min_bucket)
    m, x_init = _cuda_tiny_model(**over)
    run = dict(steps=64, sampler=sampler, x_init=x_init, noise_removal=False, return_stats=True, **kw)
    a, st_a = fast_sample(m, 4, generator=torch.Generator().manual_seed(3), **run)
    sizes = []
    real_bucket = ms._bucket_rows
    monkeypatch.setattr(ms, "_bucket_rows", lambda n, BL, pad: (sizes.append(real_bucket(n, BL, pad)), sizes[-1])[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b, st_b = fast_sample(m, 4, cuda_graph=True, generator=torch.Generator().manual_seed(3), **run)
    failed = [str(w.message) for w in caught if "CUDA-graph capture" in str(w.message)]
    assert not failed, failed
    assert torch.equal(a, b)
    uses = {R: sizes.count(R) for R in set(sizes)}
    captures = sum(u >= 3 for u in uses.values())
    assert st_b["model_calls"] == st_a["model_calls"] == len(sizes) and captures >= 1
    assert st_b.get("graph_replays", 0) == sum(max(0, u - 2) for u in uses.values())
    assert st_b["host_syncs"] == st_a["host_syncs"] + captures
    if min_bucket is not None:
        assert len(uses) >= 2, uses
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@pytest.mark.cuda
def test_ancestral_failed_capture_warns_keeps_the_tokens_and_the_stream(monkeypatch):
    """GPU: a host read slipped into the model call makes every capture fail: a warning, the eager tokens, no
    replay, the caller's stream restored, the device usable."""
    import mdlm.samplers as ms
    m, x_init = _cuda_tiny_model()
    run = dict(steps=32, sampler="ddpm_cache", x_init=x_init, noise_removal=False)
    a = fast_sample(m, 4, generator=torch.Generator().manual_seed(3), **run)
    real = ms.masked_row_logits

    def with_host_read(model, x, sigma, idx):
        float(sigma.sum())   # not permitted while a stream is capturing
        return real(model, x, sigma, idx)

    monkeypatch.setattr(ms, "masked_row_logits", with_host_read)
    with pytest.warns(UserWarning, match="CUDA-graph capture of the sampling event failed"):
        b, st = fast_sample(m, 4, cuda_graph=True, return_stats=True, generator=torch.Generator().manual_seed(3),
                            **run)
    assert torch.equal(a, b) and st.get("graph_replays", 0) == 0
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda.synchronize()
