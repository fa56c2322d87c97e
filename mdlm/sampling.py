"""Reference samplers of the published MDLM code: ``ddpm``, ``ddpm_cache``, ``analytic`` (SEDD), the final
noise-removal step and semi-autoregressive generation of arbitrary length.

These are the spec for the fused sampling step. Like the published code they draw categoricals with
Gumbel-max over ``probs / (-log u)``; with ``gumbel_dtype=torch.float32`` (published) the noise is
truncated (Zheng et al. 2024), ``torch.float64`` makes the draw exact to double precision.

All functions take an ``MDLM`` (``mdlm.diffusion``) and return token ids (B, L) int64.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .config import cfg_get, check_int
from .nn import check_token_ids

__all__ = ["sample", "semi_ar_sample", "sample_categorical", "ddpm_update", "ddpm_caching_update",
           "analytic_update", "denoiser_update", "get_score", "SAMPLERS", "INVALID_LOGITS"]

SAMPLERS = ("ddpm", "ddpm_cache", "analytic")

# The error of every sampler (published and fused) when a masked position had no valid distribution to draw from.
INVALID_LOGITS = ("the model produced logits with NaN/inf (or nothing left after top-k/top-p) for some masked "
                  "positions; those positions were left masked")


# --- argument checks shared by the published samplers here and the fused ones (mdlm.samplers) -----------------

# check_int (value as an int >= minimum, else a ValueError naming the argument) lives in mdlm.config


def check_real(value, name: str, lo: float, hi: float, what: str = "") -> float:
    """value as a float in [lo, hi] (NaN refused), else a ValueError naming the argument."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and lo <= value <= hi
    if not ok:
        raise ValueError(f"{name}{what} must be in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def check_eps(eps) -> float:
    """The last time of the grid 1 -> eps: a number in [0, 1]."""
    return check_real(eps, "eps", 0.0, 1.0, " (the last time of the grid 1 -> eps)")


def check_bool(value, name: str) -> bool:
    """value as a bool (True / False, numpy's, 0 / 1): anything else (a string such as "no" is truthy) is a
    ValueError naming the argument."""
    import numpy as np
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def check_generator(generator) -> None:
    """None or a ``torch.Generator`` (a seed must be wrapped: ``torch.Generator().manual_seed(seed)``)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} "
                        "(use torch.Generator().manual_seed(seed))")


def resolve_steps(model, steps) -> int:
    """``steps`` (an integer >= 1), or config.sampling.steps when None (checked the same way)."""
    if steps is None:
        return check_int(model.config.sampling.steps, "steps (config.sampling.steps)")
    return check_int(steps, "steps")


def initial_tokens(model, batch_size, length, x_init, device) -> torch.Tensor:
    """The start state x (B, L) int64 on ``device``: ``x_init`` (checked: integer ids in [0, V), rank 2, batch
    ``batch_size``, width ``length`` when given) or all MASK with L = ``length`` (default
    config.model.length). batch_size and length must be integers >= 1 (0 is not "the default")."""
    B = check_int(batch_size, "batch_size")
    if x_init is None:
        L = (check_int(length, "length") if length is not None else
             check_int(model.config.model.length, "length (config.model.length)"))
        return torch.full((B, L), model.mask_index, dtype=torch.int64, device=device)
    check_token_ids(x_init, model.vocab_size, "x_init")   # one host read (the id range)
    if x_init.shape[0] != B:
        raise ValueError(f"x_init has batch {x_init.shape[0]}, expected batch_size = {B}")
    if length is not None and check_int(length, "length") != x_init.shape[1]:
        raise ValueError(f"x_init has length {x_init.shape[1]}, but length = {length} was asked for")
    if x_init.shape[1] < 1:
        raise ValueError(f"x_init must have length >= 1, got shape {tuple(x_init.shape)}")
    return x_init.to(device=device, dtype=torch.int64).clone()


def _invalid_rows(probs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: the rows of the unnormalised probabilities probs (B, L, V) with no valid categorical (a NaN
    or inf entry, or no positive mass), among ``rows`` (B, L) bool (default every row); what the fused kernel
    calls invalid logits."""
    bad = ~torch.isfinite(probs).all(-1) | ~(probs.sum(-1) > 0)
    return bad if rows is None else bad & rows


def _raise_if_invalid(invalid: list) -> None:
    """One host read after the loop: raise INVALID_LOGITS if any step flagged an invalid row."""
    if invalid and bool(torch.stack(invalid).any()):
        raise ValueError(INVALID_LOGITS)


def sample_categorical(probs: torch.Tensor, generator=None, gumbel_dtype=torch.float32) -> torch.Tensor:
    """argmax(probs / E) with E = -log(u) ~ Exp(1): an exact draw from probs / probs.sum(-1) up to the
    resolution of u (published form: ``1e-10 - log(u + 1e-10)``). probs (..., V) >= 0 -> ids (...)."""
    u = torch.rand(probs.shape, device=probs.device, dtype=gumbel_dtype, generator=generator)
    gumbel_norm = 1e-10 - (u + 1e-10).log()
    return (probs.to(gumbel_dtype) / gumbel_norm).argmax(dim=-1)


def _times(x: torch.Tensor, t: float) -> torch.Tensor:
    return t * torch.ones(x.shape[0], 1, device=x.device)


def ddpm_caching_update(model, x, t, dt, p_x0=None, generator=None, gumbel_dtype=torch.float32, invalid=None):
    """One ancestral step t -> t - dt (loglinear: move chance = t). Returns (p_x0 (B, L, V), x_next (B, L)).

    Unmasked tokens are copied; a masked token stays masked with prob s/t, else becomes v with prob
    p_theta(v) (t - s)/t (the published q_xs, unnormalised by t). ``invalid`` (a list, optional; the
    samplers of this module pass one): a masked row whose q_xs has a NaN / inf entry or no mass (NaN logits)
    stays masked and a () bool "some row was invalid" is appended (read once after the loop). Without it the
    published behaviour: such a row becomes token 0 (argmax over NaN).
    """
    sigma_t, _ = model.noise(t)
    if t.ndim > 1:
        t = t.squeeze(-1)
    move_chance_t = t[:, None, None]
    move_chance_s = (t - dt)[:, None, None]
    if p_x0 is None:
        p_x0 = model.forward(x, sigma_t).exp()
    q_xs = p_x0 * (move_chance_t - move_chance_s)
    q_xs[:, :, model.mask_index] = move_chance_s[:, :, 0]
    _x = _keep_invalid(sample_categorical(q_xs, generator, gumbel_dtype), q_xs, x, model.mask_index, invalid)
    copy_flag = (x != model.mask_index).to(x.dtype)
    return p_x0, copy_flag * x + (1 - copy_flag) * _x


def _keep_invalid(drawn, probs, x, mask_index, invalid, rows=None):
    """drawn (B, L) with the invalid rows (``_invalid_rows`` among ``rows``, default the masked ones) reset to
    x, the flag appended to ``invalid``; drawn unchanged when ``invalid`` is None (published)."""
    if invalid is None:
        return drawn
    bad = _invalid_rows(probs, x == mask_index if rows is None else rows)
    invalid.append(bad.any())
    return torch.where(bad, x, drawn)


def ddpm_update(model, x, t, dt, generator=None, gumbel_dtype=torch.float32, invalid=None):
    """One ancestral step for any schedule: move chances 1 - exp(-sigma) at t and s = t - dt. ``invalid``:
    as in ``ddpm_caching_update``."""
    sigma_t, _ = model.noise(t)
    sigma_s, _ = model.noise(t - dt)
    sigma_t, sigma_s = sigma_t.reshape(-1), sigma_s.reshape(-1)
    move_chance_t = (1 - torch.exp(-sigma_t))[:, None, None]
    move_chance_s = (1 - torch.exp(-sigma_s))[:, None, None]
    log_p_x0 = model.forward(x, sigma_t)
    q_xs = log_p_x0.exp() * (move_chance_t - move_chance_s)
    q_xs[:, :, model.mask_index] = move_chance_s[:, :, 0]
    _x = _keep_invalid(sample_categorical(q_xs, generator, gumbel_dtype), q_xs, x, model.mask_index, invalid)
    copy_flag = (x != model.mask_index).to(x.dtype)
    return copy_flag * x + (1 - copy_flag) * _x


def get_score(model, x, sigma):
    """exp(log-score) (B, L, V) of the concrete score p_t(y)/p_t(x) implied by the model (SUBS or SEDD)."""
    model_output = model.forward(x, sigma)
    if model.parameterization == "subs":
        # x masked: log score to unmasked y is log p_theta(y) + log k, k = e^-sigma / (1 - e^-sigma); to MASK 0.
        # x unmasked: 0 to itself, -log k to MASK, -inf elsewhere.
        log_k = -torch.log(torch.expm1(sigma)).reshape(-1)
        masked_score = model_output + log_k[:, None, None]
        masked_score[:, :, model.mask_index] = 0
        unmasked_score = model.neg_infinity * torch.ones_like(model_output)
        unmasked_score = torch.scatter(unmasked_score, -1, x[..., None], torch.zeros_like(unmasked_score[..., :1]))
        unmasked_score[:, :, model.mask_index] = -(log_k[:, None] * torch.ones_like(x))
        masked = (x == model.mask_index).to(model_output.dtype)[:, :, None]
        model_output = masked_score * masked + unmasked_score * (1 - masked)
    return model_output.exp()


def _staggered_score(model, score, dsigma):
    score = score.clone()
    extra_const = (1 - dsigma.exp()) * score.sum(dim=-1)
    score *= dsigma.exp()[:, None]
    score[..., model.mask_index] += extra_const
    return score


def _transp_transition(model, i, sigma):
    sigma = sigma.reshape(-1, 1, 1)
    edge = torch.exp(-sigma) * F.one_hot(i, num_classes=model.vocab_size)
    edge += torch.where(i == model.mask_index, 1 - torch.exp(-sigma).squeeze(-1), 0)[..., None]
    return edge


def analytic_update(model, x, t, step_size, generator=None, gumbel_dtype=torch.float32, invalid=None):
    """SEDD's analytic (Tweedie tau-leaping) step t -> t - step_size. Every position is drawn (a NaN score
    mixes into the unmasked rows too), so with ``invalid`` (see ``ddpm_caching_update``) any invalid row keeps
    its token and is flagged."""
    curr_sigma, _ = model.noise(t)
    next_sigma, _ = model.noise(t - step_size)
    dsigma = curr_sigma - next_sigma
    score = get_score(model, x, curr_sigma)
    probs = _staggered_score(model, score, dsigma) * _transp_transition(model, x, dsigma)
    return _keep_invalid(sample_categorical(probs, generator, gumbel_dtype), probs, x, model.mask_index, invalid,
                         rows=torch.ones_like(x, dtype=torch.bool))


def denoiser_update(model, x, t, generator=None, gumbel_dtype=torch.float32, invalid=None):
    """SEDD's final denoising step (MASK gets probability 0). ``invalid``: as in ``analytic_update``."""
    sigma, _ = model.noise(t)
    score = get_score(model, x, sigma)
    probs = _staggered_score(model, score, sigma) * _transp_transition(model, x, sigma)
    probs[..., model.mask_index] = 0
    return _keep_invalid(sample_categorical(probs, generator, gumbel_dtype), probs, x, model.mask_index, invalid,
                         rows=torch.ones_like(x, dtype=torch.bool))


def _argmax_step(model, x, sigma, invalid):
    """Noise removal: the masked positions of x take the argmax of p_theta at sigma (unmasked ones are carried
    over by the parameterization); a masked row whose p_theta is invalid stays masked and is flagged."""
    log_p = model.forward(x, sigma)
    return _keep_invalid(log_p.argmax(dim=-1), log_p.exp(), x, model.mask_index, invalid)


@torch.no_grad()
def sample(model, batch_size: int = 1, length: int | None = None, steps: int | None = None,
           sampler: str | None = None, eps: float | None = None, noise_removal: bool | None = None,
           x_init: torch.Tensor | None = None, generator: torch.Generator | None = None,
           gumbel_dtype=torch.float32, progress: bool = False) -> torch.Tensor:
    """Generate (B, length) token ids with the published reverse process.

    t goes 1 -> eps over ``steps`` uniform steps; ``noise_removal`` ends with one argmax (or SEDD
    denoiser) step so no MASK remains. ``x_init`` (B, L) may hold given tokens (prefix / infill
    conditioning): non-MASK tokens are never changed by the samplers. Defaults come from
    ``model.config.sampling`` and ``model.config.model.length``.

    Checked as the fused samplers check them (shared functions, same ValueErrors naming the argument):
    batch_size, steps and length integers >= 1, eps in [0, 1] (> 0 for analytic with noise removal),
    x_init integer ids in [0, V) of shape (batch_size, length), noise_removal a bool, generator a
    ``torch.Generator`` or None; gumbel_dtype float32 or float64. Invalid logits (NaN / inf: no distribution to
    draw from) leave their positions masked and raise ``INVALID_LOGITS`` after the loop (one host read), as
    the fused samplers do; the published code would emit token 0 there.
    """
    cfg = model.config.sampling
    sampler = sampler or cfg.predictor
    if sampler not in SAMPLERS:
        from .samplers import FAST_SAMPLERS   # the message lists every name mdlm.sample takes
        names = tuple(dict.fromkeys(FAST_SAMPLERS + SAMPLERS))
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {names} (analytic: reference samplers only; "
                         "first_hitting, confidence: fused samplers only)")
    if model.parameterization == "ar":
        raise ValueError("use an autoregressive decoder for parameterization 'ar' (not part of the reference)")
    if sampler == "ddpm_cache" and model.noise.name != "loglinear":
        raise ValueError("the 'ddpm_cache' sampler assumes the loglinear schedule (published); use 'ddpm'")
    steps = resolve_steps(model, steps)
    eps = check_eps(cfg_get(cfg, "eps", 1e-5) if eps is None else eps)
    noise_removal = check_bool(cfg.noise_removal if noise_removal is None else noise_removal, "noise_removal")
    check_generator(generator)
    if gumbel_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gumbel_dtype must be torch.float32 (published) or torch.float64, got {gumbel_dtype}")
    if sampler == "analytic" and noise_removal and eps == 0:
        raise ValueError("eps must be > 0 for the analytic sampler with noise removal (its denoising step at "
                         "t = eps divides by expm1(sigma(eps)) = 0)")
    device = next(model.parameters()).device
    x = initial_tokens(model, batch_size, length, x_init, device)

    with _eval_mode(model):
        return _sample_loop(model, x, sampler, steps, eps, noise_removal, generator, gumbel_dtype, progress)


def _sample_loop(model, x, sampler, steps, eps, noise_removal, generator, gumbel_dtype, progress):
    device = x.device
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    dt = (1 - eps) / steps
    p_x0_cache = None
    invalid: list = []   # one () bool per step: some row had invalid logits (read once, after the loop)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm  # optional dependency
        it = tqdm(it, desc=f"sampling ({sampler})")
    for i in it:
        t = timesteps[i] * torch.ones(x.shape[0], 1, device=device)
        if sampler == "ddpm":
            x = ddpm_update(model, x, t, dt, generator, gumbel_dtype, invalid=invalid)
        elif sampler == "ddpm_cache":
            p_x0_cache, x_next = ddpm_caching_update(model, x, t, dt, p_x0_cache, generator, gumbel_dtype,
                                                     invalid=invalid)
            if not torch.equal(x_next, x) or model.time_conditioning:
                p_x0_cache = None  # a token changed: the cached p(x0) is stale
            x = x_next
        else:
            x = analytic_update(model, x, t, dt, generator, gumbel_dtype, invalid=invalid)
    if noise_removal:
        t = timesteps[-1] * torch.ones(x.shape[0], 1, device=device)
        if sampler == "analytic":
            x = denoiser_update(model, x, t, generator, gumbel_dtype, invalid=invalid)
        else:
            x = _argmax_step(model, x, model.noise(t)[0], invalid)
    _raise_if_invalid(invalid)
    return x


@torch.no_grad()
def semi_ar_geometry(model, stride_length: int | None, num_strides: int | None, length: int | None):
    """(stride, num_strides, window length L) of a semi-autoregressive run, config defaults filled in and
    checked (1 <= stride <= L, num_strides >= 0); shared by the published and the fused semi-AR samplers."""
    cfg = model.config.sampling
    stride = check_int(stride_length if stride_length is not None else cfg.stride_length, "stride_length")
    num_strides = check_int(num_strides if num_strides is not None else cfg.num_strides, "num_strides", 0)
    L = (check_int(length, "length") if length is not None else
         check_int(model.config.model.length, "length (config.model.length)"))
    if stride > L:
        raise ValueError(f"stride_length must be in [1, {L}], got {stride}")
    return stride, num_strides, L


def semi_ar_sample(model, batch_size: int = 1, stride_length: int | None = None, num_strides: int | None = None,
                   steps: int | None = None, generator=None, gumbel_dtype=torch.float32, length: int | None = None,
                   return_nfe: bool = False):
    """Semi-autoregressive generation beyond the context length (published ``_semi_ar_sampler``).

    Generates one window of L = config.model.length tokens, then ``num_strides`` times: emits the first
    ``stride_length`` tokens, shifts the window left by that much, keeps the rest as given tokens and
    samples ``stride_length`` new ones at the end. Each window runs the published grid: ``ddpm_cache``
    steps at t = 1 - i/steps for i = 0..steps (the last one, at t = 0, unmasks every remaining token),
    then an argmax at sigma = 0. Returns (B, L + num_strides * stride_length) token ids, and with
    ``return_nfe`` also the number of model evaluations (cache misses) as in the published code.
    """
    stride, num_strides, L = semi_ar_geometry(model, stride_length, num_strides, length)
    steps = resolve_steps(model, steps)
    batch_size = check_int(batch_size, "batch_size")
    check_generator(generator)
    if gumbel_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gumbel_dtype must be torch.float32 (published) or torch.float64, got {gumbel_dtype}")
    if model.noise.name != "loglinear":
        raise ValueError("semi-autoregressive sampling uses ddpm_cache, which assumes the loglinear schedule")
    device = next(model.parameters()).device
    ones = torch.ones(batch_size, device=device)
    dt = 1.0 / steps
    pieces, target, nfe, invalid = [], None, 0, []
    with _eval_mode(model):
        for _ in range(num_strides + 1):
            x = torch.full((batch_size, L), model.mask_index, dtype=torch.int64, device=device)
            if target is not None:
                x[:, :L - stride] = target
            p_x0 = None
            for i in range(steps + 1):
                if p_x0 is None:
                    nfe += 1
                p_x0, x_next = ddpm_caching_update(model, x, (1 - i * dt) * ones, dt, p_x0, generator, gumbel_dtype,
                                                   invalid=invalid)
                if not torch.equal(x_next, x) or model.time_conditioning:
                    p_x0 = None
                x = x_next
            x = _argmax_step(model, x, 0 * ones, invalid)
            pieces.append(x[:, :stride])
            target = x[:, stride:]
    _raise_if_invalid(invalid)
    pieces.append(target)
    out = torch.cat(pieces, dim=1)
    return (out, nfe) if return_nfe else out


class _eval_mode:
    """Run the sampler in eval mode (no dropout) and restore the caller's mode afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        return False
