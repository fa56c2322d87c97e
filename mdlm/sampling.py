"""Reference samplers of the published MDLM code: ``ddpm``, ``ddpm_cache``, ``analytic`` (SEDD), the final
noise-removal step and semi-autoregressive generation of arbitrary length.

These are the spec for the fused sampling step. Like the published code they draw categoricals with
Gumbel-max over ``probs / (-log u)``; with ``gumbel_dtype=torch.float32`` (published) the noise is
truncated (Zheng et al. 2024), ``torch.float64`` makes the draw exact to double precision.

All functions take an ``MDLM`` (``mdlm.diffusion``) and return token ids (B, L) int64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sample", "semi_ar_sample", "sample_categorical", "ddpm_update", "ddpm_caching_update",
           "analytic_update", "denoiser_update", "get_score", "SAMPLERS"]

SAMPLERS = ("ddpm", "ddpm_cache", "analytic")


def sample_categorical(probs: torch.Tensor, generator=None, gumbel_dtype=torch.float32) -> torch.Tensor:
    """argmax(probs / E) with E = -log(u) ~ Exp(1): an exact draw from probs / probs.sum(-1) up to the
    resolution of u (published form: ``1e-10 - log(u + 1e-10)``). probs (..., V) >= 0 -> ids (...)."""
    u = torch.rand(probs.shape, device=probs.device, dtype=gumbel_dtype, generator=generator)
    gumbel_norm = 1e-10 - (u + 1e-10).log()
    return (probs.to(gumbel_dtype) / gumbel_norm).argmax(dim=-1)


def _times(x: torch.Tensor, t: float) -> torch.Tensor:
    return t * torch.ones(x.shape[0], 1, device=x.device)


def ddpm_caching_update(model, x, t, dt, p_x0=None, generator=None, gumbel_dtype=torch.float32):
    """One ancestral step t -> t - dt (loglinear: move chance = t). Returns (p_x0 (B, L, V), x_next (B, L)).

    Unmasked tokens are copied; a masked token stays masked with prob s/t, else becomes v with prob
    p_theta(v) (t - s)/t (the published q_xs, unnormalised by t).
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
    _x = sample_categorical(q_xs, generator, gumbel_dtype)
    copy_flag = (x != model.mask_index).to(x.dtype)
    return p_x0, copy_flag * x + (1 - copy_flag) * _x


def ddpm_update(model, x, t, dt, generator=None, gumbel_dtype=torch.float32):
    """One ancestral step for any schedule: move chances 1 - exp(-sigma) at t and s = t - dt."""
    sigma_t, _ = model.noise(t)
    sigma_s, _ = model.noise(t - dt)
    sigma_t, sigma_s = sigma_t.reshape(-1), sigma_s.reshape(-1)
    move_chance_t = (1 - torch.exp(-sigma_t))[:, None, None]
    move_chance_s = (1 - torch.exp(-sigma_s))[:, None, None]
    log_p_x0 = model.forward(x, sigma_t)
    q_xs = log_p_x0.exp() * (move_chance_t - move_chance_s)
    q_xs[:, :, model.mask_index] = move_chance_s[:, :, 0]
    _x = sample_categorical(q_xs, generator, gumbel_dtype)
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


def analytic_update(model, x, t, step_size, generator=None, gumbel_dtype=torch.float32):
    """SEDD's analytic (Tweedie tau-leaping) step t -> t - step_size."""
    curr_sigma, _ = model.noise(t)
    next_sigma, _ = model.noise(t - step_size)
    dsigma = curr_sigma - next_sigma
    score = get_score(model, x, curr_sigma)
    probs = _staggered_score(model, score, dsigma) * _transp_transition(model, x, dsigma)
    return sample_categorical(probs, generator, gumbel_dtype)


def denoiser_update(model, x, t, generator=None, gumbel_dtype=torch.float32):
    """SEDD's final denoising step (MASK gets probability 0)."""
    sigma, _ = model.noise(t)
    score = get_score(model, x, sigma)
    probs = _staggered_score(model, score, sigma) * _transp_transition(model, x, sigma)
    probs[..., model.mask_index] = 0
    return sample_categorical(probs, generator, gumbel_dtype)


def _check_x_init(model, x_init, batch_size, length, device):
    if x_init is None:
        return torch.full((batch_size, length), model.mask_index, dtype=torch.int64, device=device)
    from .nn import check_token_ids
    check_token_ids(x_init, model.vocab_size, "x_init")
    return x_init.to(device=device, dtype=torch.int64).clone()


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
    steps = int(steps if steps is not None else cfg.steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    eps = float(cfg.get("eps", 1e-5) if eps is None else eps)
    noise_removal = bool(cfg.noise_removal if noise_removal is None else noise_removal)
    length = int(length or (x_init.shape[1] if x_init is not None else model.config.model.length))
    device = next(model.parameters()).device
    x = _check_x_init(model, x_init, batch_size, length, device)

    with _eval_mode(model):
        return _sample_loop(model, x, sampler, steps, eps, noise_removal, generator, gumbel_dtype, progress)


def _sample_loop(model, x, sampler, steps, eps, noise_removal, generator, gumbel_dtype, progress):
    device = x.device
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    dt = (1 - eps) / steps
    p_x0_cache = None
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm  # optional dependency
        it = tqdm(it, desc=f"sampling ({sampler})")
    for i in it:
        t = timesteps[i] * torch.ones(x.shape[0], 1, device=device)
        if sampler == "ddpm":
            x = ddpm_update(model, x, t, dt, generator, gumbel_dtype)
        elif sampler == "ddpm_cache":
            p_x0_cache, x_next = ddpm_caching_update(model, x, t, dt, p_x0_cache, generator, gumbel_dtype)
            if not torch.equal(x_next, x) or model.time_conditioning:
                p_x0_cache = None  # a token changed: the cached p(x0) is stale
            x = x_next
        else:
            x = analytic_update(model, x, t, dt, generator, gumbel_dtype)
    if noise_removal:
        t = timesteps[-1] * torch.ones(x.shape[0], 1, device=device)
        if sampler == "analytic":
            x = denoiser_update(model, x, t, generator, gumbel_dtype)
        else:
            x = model.forward(x, model.noise(t)[0]).argmax(dim=-1)
    return x


@torch.no_grad()
def semi_ar_geometry(model, stride_length: int | None, num_strides: int | None, length: int | None):
    """(stride, num_strides, window length L) of a semi-autoregressive run, config defaults filled in and
    checked (1 <= stride <= L, num_strides >= 0); shared by the published and the fused semi-AR samplers."""
    cfg = model.config.sampling
    stride = int(stride_length if stride_length is not None else cfg.stride_length)
    num_strides = int(num_strides if num_strides is not None else cfg.num_strides)
    L = int(length or model.config.model.length)
    if not 0 < stride <= L:
        raise ValueError(f"stride_length must be in [1, {L}], got {stride}")
    if num_strides < 0:
        raise ValueError(f"num_strides must be >= 0, got {num_strides}")
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
    steps = int(steps if steps is not None else model.config.sampling.steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if model.noise.name != "loglinear":
        raise ValueError("semi-autoregressive sampling uses ddpm_cache, which assumes the loglinear schedule")
    device = next(model.parameters()).device
    ones = torch.ones(batch_size, device=device)
    dt = 1.0 / steps
    pieces, target, nfe = [], None, 0
    with _eval_mode(model):
        for _ in range(num_strides + 1):
            x = torch.full((batch_size, L), model.mask_index, dtype=torch.int64, device=device)
            if target is not None:
                x[:, :L - stride] = target
            p_x0 = None
            for i in range(steps + 1):
                if p_x0 is None:
                    nfe += 1
                p_x0, x_next = ddpm_caching_update(model, x, (1 - i * dt) * ones, dt, p_x0, generator, gumbel_dtype)
                if not torch.equal(x_next, x) or model.time_conditioning:
                    p_x0 = None
                x = x_next
            x = model.forward(x, 0 * ones).argmax(dim=-1)
            pieces.append(x[:, :stride])
            target = x[:, stride:]
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
