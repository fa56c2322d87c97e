"""Fast samplers on the fused categorical step (``mdlm_kernels.sample_step``).

The published samplers in ``mdlm.sampling`` are the spec; these compute the same reverse process with
the LM head applied to masked rows only and the exact (53-bit inversion) categorical kernel:

- ``ddpm`` / ``ddpm_cache``: ancestral steps t -> s on a uniform grid (loglinear: a masked token stays
  masked with probability s/t, else becomes v with probability p_theta(v)). Whether a token unmasks does
  not depend on the model, so the masked-set trajectory is drawn first and the model is called only at the
  steps where some token unmasks, on those rows only (``_ancestral``): the cache of ddpm_cache, and for
  ddpm the skipped calls are ones whose output no draw uses. Same process as the published samplers;
  a step launches a number of rows known on the host, so the loop never waits for the device;
- ``first_hitting`` (Zheng et al. 2024): exact event-driven sampling; each event unmasks exactly one
  uniformly chosen masked position per sequence, at the time t_next = t u^(1/n) (n masked tokens);
- ``confidence``: parallel decoding that commits, per step, the most probable token at the k masked
  positions per sequence where its probability is highest (or wherever it exceeds a threshold, at least
  one) — LLaDA-style low-confidence remasking;
- ``fast_semi_ar_sample``: semi-autoregressive generation past the context length (published scheme: a
  window of L tokens, then shifted windows with the previous tokens given), each window a fast sampler;
- remasking (ReMDM, ``remask_eta > 0``): decoded tokens are re-masked with probability
  sigma_t = min(eta, s / (1 - t)) and masked tokens unmask with the matching posterior.

Given tokens (prefix / infill in ``x_init``) are never changed. Randomness: the kernel's Philox stream
keyed by (seed, step offset, flat position, vocabulary id), the seed drawn once from ``generator``.

Host synchronisation (counted in ``stats["host_syncs"]``; ``return_stats=True``): ddpm, ddpm_cache (with or
without remasking or time conditioning) and first_hitting read the host once before the loop (ddpm*: the
trajectory's per-step counts, which size every gather; first hitting: the number of events) and once after
it (invalid rows: NaN logits stay masked and raise then), never inside it. confidence: with k tokens per
step one read before the loop and none in it, with a threshold one per model call. Plus the seed read when
``generator`` lives on an accelerator.

CUDA graphs (``cuda_graph=True``, first_hitting on CUDA): an event is a fixed sequence of kernels on fixed
shapes that updates x, the event times and an event counter in place; the Philox offsets are read by the
kernels from that device counter (``offset_tensor``), so after two eager warm-up events the whole event
(position choice, backbone, row gather, LM head, sampling step, scatter) is captured once and replayed per
event; the capture itself synchronises the device once (counted); a failed capture warns and runs eagerly,
the caller's stream restored. Not yet verified on a GPU. ddpm* steps have data-dependent
row counts (known on the host, but different per step) and are launched eagerly.

Philox offsets (``sample_step`` and ``philox_uniform`` key the same (seed, offset, row, col) stream, so no two
draws may share an offset): 0 noise removal (greedy: RNG unused); 1 + i the step / event at grid index
i < steps (ancestral steps, confidence and first-hitting events); 2^40 + k / 2^41 + k first hitting's
position choice / event time; 2^42 the per-position unmask-step uniforms of ddpm* (2^42 + i per step with
remasking); 2^43 + i the ReMDM remask uniforms (fast_sample enforces steps < 2^38).
"""
from __future__ import annotations

import math

import torch

from .nn import _autocast, check_token_ids

__all__ = ["sample", "fast_sample", "fast_semi_ar_sample", "FAST_SAMPLERS", "masked_row_logits"]

FAST_SAMPLERS = ("ddpm", "ddpm_cache", "first_hitting", "confidence")

_OFF_UNMASK_STEP = 1 << 42  # ddpm*: the per-position unmask-step uniforms (+ grid index with remasking)
_OFF_REMASK = 1 << 43       # + grid index: ReMDM remask uniforms
_MAX_STEPS = 1 << 38        # keeps the offset ranges of the module docstring disjoint


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


class _EventGraph:
    """Runs ``event()`` once per call, where event is a fixed sequence of kernels that only updates
    preallocated tensors in place (fixed shapes, no host read, Philox offsets on the device). The first
    ``warmup`` calls run eagerly on a side stream (they are real events; they compile kernels and settle the
    SDPA backend choice), the next one captures the event into a CUDA graph, and every call from then on
    (that one included) is one ``graph.replay()``: a single launch for the backbone, LM head and sampling
    step. Capture synchronises the device once (``torch.cuda.graph`` does; counted in stats["host_syncs"]).
    Capture runs on a stream of the model's device inside ``torch.cuda.device`` / ``torch.cuda.stream``
    contexts, so the caller's current device and stream are restored even when capture fails; a failed
    capture records nothing and changes no state, so a warning is issued and every later call (this one
    included) runs eagerly with the same results."""

    def __init__(self, event, device, stats, warmup: int = 2):
        self.event, self.device, self.stats, self.warmup = event, device, stats, warmup
        self.graph, self.failed, self.calls = None, False, 0

    def __call__(self):
        if self.graph is None and not self.failed:
            if self.calls < self.warmup:
                self.calls += 1
                self._on_side_stream(lambda stream: self.event())
                return
            self._on_side_stream(self._capture)
        if self.graph is None:
            self.event()
            return
        self.graph.replay()
        self.stats["graph_replays"] = self.stats.get("graph_replays", 0) + 1

    def _on_side_stream(self, fn):
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(main)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(side):
                fn(side)
        finally:
            main.wait_stream(side)

    def _capture(self, stream):
        import warnings
        graph = torch.cuda.CUDAGraph()
        self.stats["host_syncs"] = self.stats.get("host_syncs", 0) + 1
        try:
            with torch.cuda.graph(graph, stream=stream):   # records only: the state is not touched until replay
                self.event()
            self.graph = graph
        except Exception as e:  # a kernel or check that cannot be captured: stay correct, run eagerly
            warnings.warn(f"CUDA-graph capture of the sampling event failed ({type(e).__name__}: {e}); "
                          "running it eagerly")
            self.failed = True


def _seed_from(generator, stats) -> int:
    dev = torch.device(generator.device if generator is not None else "cpu")
    if dev.type != "cpu":
        _sync(stats)
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=dev).item())


def _sync(stats) -> None:
    """Count one explicit host synchronisation (stats["host_syncs"])."""
    stats["host_syncs"] = stats.get("host_syncs", 0) + 1


def _masked_idx(x: torch.Tensor, mask_index: int) -> torch.Tensor:
    return (x == mask_index).reshape(-1).nonzero().squeeze(1)


@torch.no_grad()
def fast_sample(model, batch_size: int = 1, length: int | None = None, steps: int | None = None,
                sampler: str = "ddpm_cache", eps: float = 1e-5, noise_removal: bool = True,
                x_init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                tokens_per_step: int = 1, confidence_threshold: float | None = None,
                remask_eta: float = 0.0, progress: bool = False, return_stats: bool = False,
                cuda_graph: bool = False):
    """Generate (B, length) token ids with the fused sampling step.

    sampler: "ddpm", "ddpm_cache", "first_hitting" or "confidence" (see the module docstring). steps:
    number of uniform steps (ddpm*; default config.sampling.steps); ignored by first_hitting (one event
    per masked position) and derived from ``tokens_per_step`` for confidence decoding. temperature /
    top_k / top_p reshape p_theta. x_init (B, L): given tokens are kept. ``cuda_graph`` (first_hitting on
    CUDA only): replay each whole event from one captured CUDA graph (see the module docstring). With
    ``return_stats`` also returns {"model_calls": int, "steps": int, "host_syncs": int} (+ "graph_replays"
    with cuda_graph) (steps: grid steps covered, including the ones without a model call; host_syncs:
    explicit host reads, see the module docstring).
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
    if not 0 <= eps <= 1:
        raise ValueError(f"eps (the last time of the grid 1 -> eps) must be in [0, 1], got {eps}")
    if not 0 <= remask_eta <= 1:
        raise ValueError(f"remask_eta must be in [0, 1], got {remask_eta}")
    device = next(model.parameters()).device
    if cuda_graph and sampler != "first_hitting":
        raise ValueError(f"cuda_graph=True applies to the first_hitting sampler (fixed shapes), not {sampler!r}")
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
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
    stats = {"model_calls": 0, "steps": 0, "host_syncs": 0}
    seed = _seed_from(generator, stats)
    opts = dict(mask_index=M, temperature=temperature, top_k=top_k, top_p=top_p, validate=False)
    was_training, was_validating = model.training, model.backbone.validate_inputs
    model.eval()
    model.backbone.validate_inputs = False  # x is checked once above; no range-check sync per model call
    invalid: list = []
    left = grid = None  # ddpm*: masked flat positions after the loop (known without a sync), the time grid
    try:
        if sampler in ("ddpm", "ddpm_cache"):
            n_steps = int(steps or model.config.sampling.steps)
            if not 1 <= n_steps < _MAX_STEPS:
                raise ValueError(f"steps must be in [1, 2^38), got {n_steps}")
            grid = torch.linspace(1, eps, n_steps + 1, dtype=torch.float64)  # the published grid
            x, left = _ancestral(model, x, given, grid, remask_eta, seed, opts, stats, progress, invalid)
        elif sampler == "first_hitting":
            x = _first_hitting(model, x, seed, opts, stats, progress, invalid, cuda_graph)
        else:
            x = _confidence(model, x, tokens_per_step, confidence_threshold, seed, opts, stats, progress, invalid)
        if noise_removal and sampler in ("ddpm", "ddpm_cache"):
            idx = left  # the trajectory's masked positions: their number is known without a sync
            if idx.numel():
                sigma = model.noise(torch.full((B,), float(grid[-1]), device=device))[0]  # published: t = eps
                logits = masked_row_logits(model, x, sigma, idx)
                stats["model_calls"] += 1
                tok = mk.sample_step(logits, None, None, seed, 0, greedy=True, **opts).tokens
                x.view(-1).index_copy_(0, idx, _sanitize(tok, M, invalid))
        if invalid:
            _sync(stats)  # one sync, after the loop
            if bool(torch.stack(invalid).any()):
                    raise ValueError("the model produced logits with NaN/inf (or nothing left after top-k/top-p) for "
                                 "some masked positions; those positions were left masked")
    finally:
        model.train(was_training)
        model.backbone.validate_inputs = was_validating
    return (x, stats) if return_stats else x


def _progress(it, enabled, desc):
    if not enabled:
        return it
    from tqdm.auto import tqdm  # optional dependency
    return tqdm(it, desc=desc)


def _sanitize(tok: torch.Tensor, M: int, invalid: list) -> torch.Tensor:
    """The kernel marks invalid rows (NaN logits, no class left after filtering) with -1: keep them MASK
    and remember it on the device (checked once after the loop, no sync here)."""
    bad = tok < 0
    invalid.append(bad.any())
    return torch.where(bad, M, tok)


def _unmask_steps(u: torch.Tensor, t_i: float, neg_grid: torch.Tensor, i: int) -> torch.Tensor:
    """First unmask step of each masked row of the ancestral sampler from grid index i (time t_i = grid[i]).

    A row masked at t_i stays masked through steps i..j (t_k -> t_{k+1}, survival t_{k+1} / t_k each) with
    probability grid[j + 1] / t_i (telescoping), so with u ~ U(0, 1) its first unmask step is the smallest
    j >= i with grid[j + 1] <= u t_i, and ``steps`` ("never") if u t_i < grid[steps]. neg_grid = -grid
    (increasing, float64, on u's device); u (N,) float64 in (0, 1). Returns (N,) int64 in [i, steps].
    """
    # searchsorted (left) on -grid: the first m with -grid[m] >= -u t_i, i.e. grid[m] <= u t_i; j = m - 1.
    # m > i since u t_i < t_i (the clamp only guards the rounding of u t_i up to t_i when u is 1 - 2^-53).
    m = torch.searchsorted(neg_grid, -(u * t_i))
    return (m - 1).clamp_min(i)


def _step_draws(m, given, seed, i, t, s_eff, sig):
    """The model-independent part of ancestral step i (t -> s) with ReMDM remasking, from the masked set m
    (B, L) bool at t: (unmask, remask) bool masks. A masked row stays masked with probability s_eff / t
    (uniform at offset 2^42 + i: unmask iff u t >= s_eff); a decoded, non-given row is re-masked with
    probability sig (uniform at offset 2 steps + 2 + i, float32 as before)."""
    import mdlm_kernels as mk
    B, L = m.shape
    u = mk.philox_uniform(B, L, seed, offset=_OFF_UNMASK_STEP + i, dtype=torch.float64, device=m.device)
    unmask = m & (u * t >= s_eff)
    remask = None
    if sig > 0:
        r = mk.philox_uniform(B, L, seed, offset=_OFF_REMASK + i, dtype=torch.float32, device=m.device)
        remask = ~m & ~given & (r < sig)
    return unmask, remask


def _remask_schedule(grid, remask_eta):
    """Per step i: (t, s, sig, s_eff) with sig = min(eta, s / (1 - t)) (0 at t = 1) and the unmask target
    s_eff = max(0, s - sig (1 - t)) (alpha = 1 - t: the ReMDM posterior with remasking probability sig)."""
    g = grid.tolist()
    out = []
    for i in range(len(g) - 1):
        t, s = g[i], g[i + 1]
        sig = min(remask_eta, s / (1 - t)) if (remask_eta > 0 and t < 1) else 0.0
        out.append((t, s, sig, max(0.0, s - sig * (1 - t))))
    return out


def _ancestral(model, x, given, grid, remask_eta, seed, opts, stats, progress, invalid):
    """ddpm / ddpm_cache: ancestral steps t = grid[i] -> s = grid[i + 1] (fast_sample passes the published
    uniform grid 1 -> eps), with no host read inside the loop. Returns (x, masked flat positions left).

    Under the loglinear SUBS step a masked row stays masked with probability s / t whatever the logits (the
    kernel's race: whether MASK loses is independent of which token wins), and ReMDM re-masking is decided
    on z_t with probability sigma, also without the model. So the whole masked-set trajectory is independent
    of the model: it is drawn first, on the device, and its per-step counts are read ONCE; then the loop visits
    only the steps at which a token unmasks (or is re-masked), calls the model there on the current x at that
    step's time, applies the LM head to the unmasking rows only, and draws their tokens from p_theta (kernel
    with t = 1, s = 0: no MASK option). The gathers are sized from the counts (``nonzero_static`` / slices),
    so nothing in the loop waits for the device.

    Same process as the published ddpm and ddpm_cache: a model call whose output cannot change any token
    (no row unmasks in that step) is skipped — for ddpm_cache this is its cache (x unchanged -> the same
    p_theta), for ddpm the output of such a call is unused. (The published ddpm_cache recomputes every step
    for time-conditioned models, so both call the model at the time of the step that uses it.)

    Without remasking each masked row's first unmask step comes from one uniform (``_unmask_steps`` from
    t = 1, offset 2^42) and the rows are grouped by step with one stable sort. With remasking (eta > 0) the
    trajectory is simulated step by step (``_step_draws``) in a pre-pass and replayed with the same draws.
    """
    import mdlm_kernels as mk
    B, L = x.shape
    M = opts["mask_index"]
    device = x.device
    steps = grid.numel() - 1
    sched = _remask_schedule(grid, remask_eta)
    flat = x.view(-1)

    def draw(idx, i):
        """Tokens for the unmasking flat positions idx at step i: the model at t = grid[i] on the current x."""
        sigma_t = model.noise(torch.full((B,), sched[i][0], device=device))[0]
        logits = masked_row_logits(model, x, sigma_t, idx)
        stats["model_calls"] += 1
        n = idx.numel()
        tok = mk.sample_step(logits, torch.ones(n, device=device), torch.zeros(n, device=device), seed, 1 + i,
                             row_ids=idx, **opts).tokens
        flat.index_copy_(0, idx, _sanitize(tok, M, invalid))  # invalid rows stay MASK, raise after the loop

    stats["steps"] += steps
    if remask_eta == 0:
        u = mk.philox_uniform(B, L, seed, offset=_OFF_UNMASK_STEP, dtype=torch.float64, device=device).view(-1)
        j = _unmask_steps(u, 1.0, (-grid).to(device), 0)
        j = torch.where(flat == M, j, steps + 1)            # given tokens: never drawn
        order = torch.argsort(j, stable=True)                # by unmask step, positions ascending within one
        counts = torch.bincount(j, minlength=steps + 2).tolist()  # the one host read
        _sync(stats)
        start = 0
        for i in _progress(range(steps), progress, "sampling (fused)"):
            n = counts[i]
            if n:
                draw(order[start:start + n], i)
                start += n
        return x, order[start:start + counts[steps]]

    m = flat.view(B, L) == M
    hits = []
    for i, (t, s, sig, s_eff) in enumerate(sched):          # pre-pass: the masked-set trajectory
        unmask, remask = _step_draws(m, given, seed, i, t, s_eff, sig)
        hits.append(unmask.sum())
        m = m & ~unmask
        if remask is not None:
            hits.append(remask.sum())
            m = m | remask
    n_left = m.sum()
    counts = torch.stack(hits + [n_left]).tolist()          # the one host read
    _sync(stats)
    m = x == M
    c = 0
    for i in _progress(range(steps), progress, "sampling (fused)"):
        t, s, sig, s_eff = sched[i]
        n_hit, n_rem = counts[c], counts[c + 1] if sig > 0 else 0
        c += 2 if sig > 0 else 1
        if n_hit == 0 and n_rem == 0:
            continue
        unmask, remask = _step_draws(m, given, seed, i, t, s_eff, sig)
        if n_hit:
            draw(torch.nonzero_static(unmask.view(-1), size=n_hit).squeeze(1), i)
            m = m & ~unmask
        if n_rem:
            x = torch.where(remask, M, x)
            flat = x.view(-1)
            m = m | remask
    return x, torch.nonzero_static(m.view(-1), size=counts[c]).squeeze(1)


def _first_hitting(model, x, seed, opts, stats, progress, invalid, cuda_graph=False):
    """Each event: per sequence, one uniformly chosen masked position gets a token drawn from p_theta
    (s = 0: MASK cannot be drawn). All B rows go through every event with fixed shapes (sequences that are
    done keep their tokens) and the event counter k lives on the device (the Philox offsets 2^40 + k,
    2^41 + k and 1 + k are read by the kernels from it), so an event is one fixed sequence of kernels that
    only updates x, t, k and the invalid flag in place: no host read in the loop, and with ``cuda_graph``
    the whole event (draws, backbone, row gather, LM head, sampling step, scatter) is captured once and
    replayed (``_EventGraph``). The event times t_{k+1} = t_k u^(1/n) only matter with time conditioning;
    they are tracked for it."""
    M = opts["mask_index"]
    n_events = int((x == M).sum(1).max())  # one sync before the loop
    _sync(stats)
    event, bad = _first_hitting_event(model, x, seed, opts)
    run = _EventGraph(event, x.device, stats) if cuda_graph else event
    for _ in _progress(range(n_events), progress, "sampling (first hitting)"):
        run()
        stats["model_calls"] += 1
        stats["steps"] += 1
    invalid.append(bad)
    return x


def _first_hitting_event(model, x, seed, opts):
    """(event, bad): ``event()`` runs one first-hitting event on x (B, L) in place (fixed shapes, every
    tensor it writes allocated here; no host read: it also runs under FakeTensorMode); ``bad`` () bool is set
    when a row's logits were invalid."""
    import mdlm_kernels as mk
    B, L = x.shape
    M = opts["mask_index"]
    device = x.device
    flat = x.view(-1)
    t = torch.ones(B, dtype=torch.float64, device=device)
    k = torch.zeros(1, dtype=torch.int64, device=device)   # event counter, advanced on the device
    bad = torch.zeros((), dtype=torch.bool, device=device)
    row_start = torch.arange(B, device=device) * L
    ones, zeros = torch.ones(B, device=device), torch.zeros(B, device=device)

    def event():
        masked = x == M
        n = masked.sum(1)
        active = n > 0
        # uniform choice among masked positions: argmax of Philox uniforms over masked entries
        u = mk.philox_uniform(B, L, seed, offset=1 << 40, dtype=torch.float64, device=device, offset_tensor=k)
        pick = torch.where(masked, u, -1.0).argmax(1)                       # (B,)
        r = mk.philox_uniform(B, 1, seed, offset=1 << 41, dtype=torch.float64, device=device,
                              offset_tensor=k)[:, 0]
        t.copy_(torch.where(active, t * r ** (1.0 / n.clamp_min(1).double()), t))
        idx = row_start + pick
        logits = masked_row_logits(model, x, model.noise(t.float())[0], idx)
        tok = mk.sample_step(logits, ones, zeros, seed, 1, row_ids=idx, offset_tensor=k, **opts).tokens
        invalid_row = tok < 0                  # NaN logits etc.: the position stays masked, raise after the loop
        bad.logical_or_((invalid_row & active).any())
        tok = torch.where(invalid_row | ~active, flat.index_select(0, idx), tok)
        flat.index_copy_(0, idx, tok)
        k.add_(1)

    return event, bad


def _confidence(model, x, k, threshold, seed, opts, stats, progress, invalid, static_gather: bool = True):
    """Confidence-ordered parallel decoding (LLaDA-style low-confidence remasking): per step, the most
    probable token of every masked position, committed at the k positions per sequence where that
    probability is highest (or at all positions above ``threshold``, at least one per sequence).

    With k per step (no threshold) every sequence commits exactly min(k, its masked count) positions per
    step (confidences of valid rows are >= 0), so the per-row masked counts are read once before the loop
    and then tracked on the host: the masked-row gather is sized without a sync (``nonzero_static``), and
    the loop has no host read. (A row with invalid logits stays masked; the count then runs ahead of the
    truth, the extra positions are left out of later gathers and the sampler raises after the loop, as it
    does for any invalid row.) With a threshold the count is data dependent: one read per model call."""
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
    static = static_gather and threshold is None
    if static:
        counts = (x == M).sum(1).tolist()   # the loop's only host read
        _sync(stats)
    for step in _progress(range(max_steps), progress, "sampling (confidence)"):
        if static:
            n_masked = sum(counts)
            if n_masked == 0:
                break
            idx = torch.nonzero_static((x == M).reshape(-1), size=n_masked).squeeze(1)
            counts = [max(0, c - k) for c in counts]
        else:
            idx = _masked_idx(x, M)
            _sync(stats)
            if idx.numel() == 0:
                break
        logits = masked_row_logits(model, x, zero, idx)
        stats["model_calls"] += 1
        stats["steps"] += 1
        out = mk.sample_step(logits, None, None, seed, 1 + step, row_ids=idx, greedy=True, **opts)
        tok = _sanitize(out.tokens, M, invalid)
        conf = torch.full((B * L,), -1.0, device=device)
        conf.index_copy_(0, idx, torch.nan_to_num(out.confidence[:, 0].float(), nan=-1.0))
        conf = conf.view(B, L)
        cand = torch.full((B * L,), M, dtype=torch.int64, device=device).index_copy_(0, idx, tok).view(B, L)
        if threshold is None:
            top = conf.topk(min(k, L), dim=1)  # unmasked positions have confidence -1 and are never committed
            commit = torch.zeros(B, L, dtype=torch.bool, device=device).scatter_(1, top.indices, top.values >= 0)
        else:
            best = conf.argmax(1, keepdim=True)  # at least the most confident position of each sequence
            commit = (conf >= threshold).scatter_(1, best, conf.gather(1, best) >= 0)
        x = torch.where(commit & (x == M), cand, x)
    return x


def fast_semi_ar_sample(model, batch_size: int = 1, stride_length: int | None = None,
                        num_strides: int | None = None, steps: int | None = None, sampler: str = "ddpm_cache",
                        length: int | None = None, generator: torch.Generator | None = None,
                        progress: bool = False, return_stats: bool = False, **kwargs):
    """Semi-autoregressive generation of L + num_strides * stride_length tokens with the fused samplers.

    The published scheme (``mdlm.sampling.semi_ar_sample``): sample a window of L = config.model.length
    tokens; then, ``num_strides`` times, emit its first ``stride_length`` tokens, shift the window left by
    that much, keep the shifted tokens as given (``x_init``) and sample the ``stride_length`` masked ones at
    its end. Each window runs ``fast_sample(sampler, steps, noise removal)`` — the grid t = 1 .. eps of the
    fast samplers, not the published semi-AR grid that ends at t = 0 (same reverse process; the last step
    differs: here the tokens still masked at t = eps are filled by the greedy noise-removal step). Extra
    ``kwargs`` (temperature, top_k, top_p, remask_eta, ...) go to ``fast_sample``; ``generator`` is drawn
    from once per window. Returns (B, L + num_strides * stride_length) ids, and with ``return_stats`` the
    summed ``fast_sample`` stats plus ``windows``.
    """
    from .sampling import semi_ar_geometry
    stride, num_strides, L = semi_ar_geometry(model, stride_length, num_strides, length)
    if kwargs.get("x_init") is not None:
        raise ValueError("semi-autoregressive sampling builds its own x_init per window")
    device = next(model.parameters()).device
    M = model.mask_index
    pieces, target = [], None
    stats = {"model_calls": 0, "steps": 0, "host_syncs": 0, "windows": 0}
    for _ in range(num_strides + 1):
        x = torch.full((batch_size, L), M, dtype=torch.int64, device=device)
        if target is not None:
            x[:, :L - stride] = target
        x, st = fast_sample(model, batch_size, L, steps, sampler, x_init=x, generator=generator,
                            progress=progress, return_stats=True, **kwargs)
        for k in ("model_calls", "steps", "host_syncs"):
            stats[k] += st[k]
        stats["windows"] += 1
        pieces.append(x[:, :stride])
        target = x[:, stride:]
    pieces.append(target)
    out = torch.cat(pieces, dim=1)
    return (out, stats) if return_stats else out


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
    num_strides = kwargs.pop("num_strides", None)
    stride_length = kwargs.pop("stride_length", None)
    if num_strides:   # semi-autoregressive: L + num_strides * stride_length tokens
        semi_fusable = (sampler in FAST_SAMPLERS and model.parameterization == "subs"
                        and model.noise.name == "loglinear" and hasattr(model.backbone, "hidden_states"))
        if impl == "fused" or (impl == "auto" and semi_fusable):
            return fast_semi_ar_sample(model, batch_size, stride_length, num_strides, steps, sampler,
                                       length=length, generator=generator, **kwargs)
        if impl in ("reference", "auto"):
            return ref.semi_ar_sample(model, batch_size, stride_length, num_strides, steps, generator=generator,
                                      length=length, **kwargs)
        raise ValueError(f"unknown sampling implementation {impl!r}; 'auto', 'fused' or 'reference'")
    fusable = (sampler in FAST_SAMPLERS and model.parameterization == "subs" and model.noise.name == "loglinear"
               and hasattr(model.backbone, "hidden_states"))
    if impl == "auto":
        impl = "fused" if fusable else "reference"
    if impl == "fused":
        return fast_sample(model, batch_size, length, steps, sampler, generator=generator, **kwargs)
    if impl == "reference":
        return ref.sample(model, batch_size, length, steps, sampler, generator=generator, **kwargs)
    raise ValueError(f"unknown sampling implementation {impl!r}; 'auto', 'fused' or 'reference'")
