"""Fast samplers on the fused categorical step (``mdlm_kernels.sample_step``).

The published samplers in ``mdlm.sampling`` are the spec; these compute the same reverse process with
the LM head applied to masked rows only and the exact (53-bit, log-space Gumbel) categorical kernel:

- ``ddpm`` / ``ddpm_cache``: ancestral steps t -> s on a uniform grid (loglinear: a masked token stays
  masked with probability s/t, else becomes v with probability p_theta(v)); ``ddpm_cache`` reuses the
  masked rows' logits while no token changed (the model ignores t unless time conditioning is on);
- ``first_hitting`` (Zheng et al. 2024): exact event-driven sampling; each event unmasks exactly one
  uniformly chosen masked position per sequence, at the time t_next = t u^(1/n) (n masked tokens);
- ``confidence``: parallel decoding that unmasks, per step, the k most confident masked positions per
  sequence (or every position whose max probability exceeds a threshold, at least one);
- remasking (ReMDM, ``remask_eta > 0``): decoded tokens are re-masked with probability
  sigma_t = min(eta, s / (1 - t)) and masked tokens unmask with the matching posterior.

Given tokens (prefix / infill in ``x_init``) are never changed. Randomness: the kernel's Philox stream
keyed by (seed, step offset, flat position, vocabulary id), the seed drawn once from ``generator``.

Host synchronisation: one per model call, to size the masked-row gather, and for ``ddpm_cache`` one per
step for the cache decision (did any token change?). Not yet captured in CUDA graphs.
"""
from __future__ import annotations

import math

import torch

from .nn import _autocast, check_token_ids

__all__ = ["sample", "fast_sample", "FAST_SAMPLERS", "masked_row_logits"]

FAST_SAMPLERS = ("ddpm", "ddpm_cache", "first_hitting", "confidence")


def masked_row_logits(model, x: torch.Tensor, sigma: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) of the flat positions ``idx`` (N,) of x (B, L): the LM head on those rows only."""
    B, L = x.shape
    from .diffusion import _fp32_outside_blocks
    with _fp32_outside_blocks(x):
        hidden, _ = model.backbone.hidden_states(x, model._process_sigma(sigma))
    h = hidden.reshape(B * L, -1).index_select(0, idx)
    lin = model.backbone.output_layer.linear
    with _autocast(h):
        return lin(h)


def _seed_from(generator) -> int:
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=dev).item())


def _masked_idx(x: torch.Tensor, mask_index: int) -> torch.Tensor:
    return (x == mask_index).reshape(-1).nonzero().squeeze(1)


@torch.no_grad()
def fast_sample(model, batch_size: int = 1, length: int | None = None, steps: int | None = None,
                sampler: str = "ddpm_cache", eps: float = 1e-5, noise_removal: bool = True,
                x_init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                tokens_per_step: int = 1, confidence_threshold: float | None = None,
                remask_eta: float = 0.0, progress: bool = False, return_stats: bool = False):
    """Generate (B, length) token ids with the fused sampling step.

    sampler: "ddpm", "ddpm_cache", "first_hitting" or "confidence" (see the module docstring). steps:
    number of uniform steps (ddpm*; default config.sampling.steps); ignored by first_hitting (one event
    per masked position) and derived from ``tokens_per_step`` for confidence decoding. temperature /
    top_k / top_p reshape p_theta. x_init (B, L): given tokens are kept. With ``return_stats`` also
    returns {"model_calls": int, "steps": int}.
    """
    import mdlm_kernels as mk

    if sampler not in FAST_SAMPLERS:
        raise ValueError(f"unknown fast sampler {sampler!r}; choose one of {FAST_SAMPLERS}")
    if model.parameterization != "subs" or not hasattr(model.backbone, "hidden_states"):
        raise ValueError("fast samplers need a SUBS model with a DIT backbone")
    if model.noise.name != "loglinear":
        raise ValueError("fast samplers assume the loglinear schedule (move chance = t), as ddpm_cache does")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if not 0 <= remask_eta <= 1:
        raise ValueError(f"remask_eta must be in [0, 1], got {remask_eta}")
    device = next(model.parameters()).device
    length = int(length or (x_init.shape[1] if x_init is not None else model.config.model.length))
    if x_init is None:
        x = torch.full((batch_size, length), model.mask_index, dtype=torch.int64, device=device)
    else:
        check_token_ids(x_init, model.vocab_size, "x_init")
        if x_init.shape[0] != batch_size:
            raise ValueError(f"x_init has batch {x_init.shape[0]}, expected {batch_size}")
        x = x_init.to(device=device, dtype=torch.int64).clone()
    given = x != model.mask_index
    B, L = x.shape
    M = model.mask_index
    seed = _seed_from(generator)
    opts = dict(mask_index=M, temperature=temperature, top_k=top_k, top_p=top_p, validate=False)
    stats = {"model_calls": 0, "steps": 0}
    was_training = model.training
    model.eval()
    try:
        if sampler in ("ddpm", "ddpm_cache"):
            x = _ancestral(model, x, given, int(steps or model.config.sampling.steps), eps, sampler == "ddpm_cache",
                           remask_eta, seed, opts, stats, progress)
        elif sampler == "first_hitting":
            x = _first_hitting(model, x, seed, opts, stats, progress)
        else:
            x = _confidence(model, x, tokens_per_step, confidence_threshold, seed, opts, stats, progress)
        if noise_removal and sampler in ("ddpm", "ddpm_cache"):
            idx = _masked_idx(x, M)
            if idx.numel():
                zero = torch.zeros(B, device=device)
                logits = masked_row_logits(model, x, zero, idx)
                stats["model_calls"] += 1
                tok = mk.sample_step(logits, torch.ones(idx.numel(), device=device),
                                     torch.zeros(idx.numel(), device=device), seed, 0, greedy=True, **opts).tokens
                x.view(-1).index_copy_(0, idx, tok)
    finally:
        model.train(was_training)
    return (x, stats) if return_stats else x


def _progress(it, enabled, desc):
    if not enabled:
        return it
    from tqdm.auto import tqdm  # optional dependency
    return tqdm(it, desc=desc)


def _ancestral(model, x, given, steps, eps, cache, remask_eta, seed, opts, stats, progress):
    """Uniform grid 1 -> eps (the published grid); one fused step per masked row per step."""
    import mdlm_kernels as mk
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    B, L = x.shape
    M = opts["mask_index"]
    device = x.device
    grid = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    logits = idx = None
    for i in _progress(range(steps), progress, "sampling (fused)"):
        t, s = float(grid[i]), float(grid[i + 1])
        sigma_t = model.noise(torch.full((B,), t, device=device))[0]
        s_eff = s
        if remask_eta > 0:
            # ReMDM: remask decoded tokens with prob sigma = min(eta, s / (1 - t)); masked tokens then unmask
            # with prob (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t), i.e. the kernel's (t - s') / t with
            # s' = s - sigma (1 - t) (>= 0 by the cap).
            sig = min(remask_eta, s / (1 - t)) if t < 1 else 0.0
            s_eff = max(0.0, s - sig * (1 - t))
            if sig > 0:
                decoded = (x != M) & ~given
                u = mk.philox_uniform(B, L, seed, offset=2 * steps + 2 + i, dtype=torch.float32,
                                      device=device)
                x = torch.where(decoded & (u < sig), M, x)
                logits = None  # tokens changed: the cache is stale
        if logits is None or not cache:
            idx = _masked_idx(x, M)  # host sync: sizes the gather
            if idx.numel() == 0:
                break
            logits = masked_row_logits(model, x, sigma_t, idx)
            stats["model_calls"] += 1
        n = idx.numel()
        out = mk.sample_step(logits, torch.full((n,), t, device=device), torch.full((n,), s_eff, device=device),
                             seed, 1 + i, row_ids=idx, **opts)
        stats["steps"] += 1
        x.view(-1).index_copy_(0, idx, out.tokens)
        if not cache or model.time_conditioning or bool((out.tokens != M).any()):  # cache decision: one sync
            logits = None
    return x


def _first_hitting(model, x, seed, opts, stats, progress):
    """Each event: per sequence, one uniformly chosen masked position gets a token drawn from p_theta
    (s = 0: MASK cannot be drawn). The event times t_{k+1} = t_k u^(1/n) only matter with time
    conditioning; they are tracked for it."""
    import mdlm_kernels as mk
    B, L = x.shape
    M = opts["mask_index"]
    device = x.device
    t = torch.ones(B, dtype=torch.float64, device=device)
    n_events = int((x == M).sum(1).max())
    for k in _progress(range(n_events), progress, "sampling (first hitting)"):
        masked = x == M
        n = masked.sum(1)
        active = n > 0
        # uniform choice among masked positions: argmax of Philox uniforms over masked entries
        u = mk.philox_uniform(B, L, seed, offset=(1 << 40) + k, dtype=torch.float64, device=device)
        pick = torch.where(masked, u, -1.0).argmax(1)                       # (B,)
        r = mk.philox_uniform(B, 1, seed, offset=(1 << 41) + k, dtype=torch.float64, device=device)[:, 0]
        t = torch.where(active, t * r ** (1.0 / n.clamp_min(1).double()), t)
        rows = torch.arange(B, device=device)[active]
        idx = rows * L + pick[active]
        sigma = model.noise(t.float())[0]
        logits = masked_row_logits(model, x, sigma, idx)
        stats["model_calls"] += 1
        stats["steps"] += 1
        m = idx.numel()
        tok = mk.sample_step(logits, torch.ones(m, device=device), torch.zeros(m, device=device), seed, 1 + k,
                             row_ids=idx, **opts).tokens
        x.view(-1).index_copy_(0, idx, tok)
    return x


def _confidence(model, x, k, threshold, seed, opts, stats, progress):
    """Per step: draw a token for every masked position (s = 0), then commit the k most confident ones per
    sequence (max probability; or all above ``threshold``, at least one)."""
    import mdlm_kernels as mk
    if k < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {k}")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"confidence_threshold must be in (0, 1], got {threshold}")
    B, L = x.shape
    M = opts["mask_index"]
    device = x.device
    zero = torch.zeros(B, device=device)
    step = 0
    max_steps = L if threshold is not None else -(-L // k)
    for step in _progress(range(max_steps), progress, "sampling (confidence)"):
        idx = _masked_idx(x, M)
        if idx.numel() == 0:
            break
        logits = masked_row_logits(model, x, zero, idx)
        stats["model_calls"] += 1
        stats["steps"] += 1
        n = idx.numel()
        out = mk.sample_step(logits, torch.ones(n, device=device), torch.zeros(n, device=device), seed, 1 + step,
                             row_ids=idx, **opts)
        conf = torch.full((B * L,), -1.0, device=device)
        conf.index_copy_(0, idx, out.confidence[:, 0].float())
        conf = conf.view(B, L)
        cand = torch.full((B * L,), M, dtype=torch.int64, device=device).index_copy_(0, idx, out.tokens).view(B, L)
        if threshold is None:
            top = conf.topk(min(k, L), dim=1)  # unmasked positions have confidence -1 and are never committed
            commit = torch.zeros(B, L, dtype=torch.bool, device=device).scatter_(1, top.indices, top.values >= 0)
        else:
            best = conf.argmax(1, keepdim=True)  # at least the most confident position of each sequence
            commit = (conf >= threshold).scatter_(1, best, conf.gather(1, best) >= 0)
        x = torch.where(commit & (x == M), cand, x)
    return x


def sample(model, batch_size: int = 1, length: int | None = None, steps: int | None = None,
           sampler: str | None = None, impl: str = "auto", generator: torch.Generator | None = None, **kwargs):
    """``mdlm.sample``: generate (B, length) token ids.

    impl "fused" runs ``fast_sample`` (samplers ddpm, ddpm_cache, first_hitting, confidence; options
    temperature / top_k / top_p / remask_eta / tokens_per_step / confidence_threshold), "reference" the
    published samplers of ``mdlm.sampling`` (ddpm, ddpm_cache, analytic). "auto" picks "fused" where it
    applies (SUBS, loglinear schedule, DIT backbone, a fused sampler) and "reference" otherwise.
    """
    from . import sampling as ref
    sampler = sampler or model.config.sampling.predictor
    fusable = (sampler in FAST_SAMPLERS and model.parameterization == "subs" and model.noise.name == "loglinear"
               and hasattr(model.backbone, "hidden_states"))
    if impl == "auto":
        impl = "fused" if fusable else "reference"
    if impl == "fused":
        return fast_sample(model, batch_size, length, steps, sampler, generator=generator, **kwargs)
    if impl == "reference":
        return ref.sample(model, batch_size, length, steps, sampler, generator=generator, **kwargs)
    raise ValueError(f"unknown sampling implementation {impl!r}; 'auto', 'fused' or 'reference'")
