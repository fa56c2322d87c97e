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
step one read before the loop and none in it; with a threshold one per model call (the number of steps and
of masked rows depends on the confidences: the one loop that reads by design). Plus the seed read when
``generator`` lives on an accelerator. Every deliberate read goes through ``_read``. Nothing inside a loop
copies host data to the device either (a pageable copy waits for the stream too, and cannot be captured):
per-step constants are device tables copied once before the loop and indexed on the device, a step's index
reaches the device as a ``fill_`` argument. tests/test_no_host_traffic.py checks both, on the meta device.

CUDA graphs (``cuda_graph=True``; ddpm, ddpm_cache and first_hitting on CUDA; ``_EventGraph``): a model call
is made a fixed sequence of kernels on fixed shapes that reads its per-step inputs from the device and
updates preallocated tensors in place; each such event gets two eager warm-up calls, is captured once and
then replayed (a capture synchronises the device once, counted; a failed capture warns and that event runs
eagerly, same tokens, the caller's stream restored). First hitting: one event (position choice, backbone,
row gather, LM head, sampling step, scatter; Philox offsets from the device event counter). ddpm*: the rows
that unmask at step i vary in number, so a call is launched with R >= n rows, R = ``_bucket_rows(n)`` (powers
of two from ``_MIN_BUCKET`` = 128, at most B*L), one graph per bucket, all in one memory pool; padding rows are
computed and dropped. Eager CUDA calls use the same buckets (same kernels, same shapes, so the same tokens
as the graphs); eager CPU calls use R = n. Not yet run on a GPU.

Why buckets and not the full-row head with masking (every call computing all B*L rows: one graph, no
buckets). Figures predicted for the published small model (d = 768, 12 blocks, V = 50258) at B = 16,
L = 1024 on an H200 (758 TFLOP/s bf16, 4.2 TB/s), not measured:
  backbone per call   2 * 16384 * 84.9M params + attention 12 * 4 * 16 * 1024^2 * 768 = 3.4 TFLOP -> ~4.5 ms
  full-row head       GEMM 2 * 16384 * 768 * 50258 = 1.26 TFLOP -> 1.67 ms, + logits 16384 * 50258 * 2 B =
                      1.65 GB written and read again by the sampling step -> 0.78 ms: ~2.5 ms, +55% per call
  bucket of R rows    W read once 50258 * 768 * 2 B = 77 MB -> 18 us, + R * (0.10 us GEMM + 0.05 us logits):
                      R = 128: ~37 us, <1% of the call
  rows per call       ddpm_cache at 1000 steps: n ~ Binomial(16384, 1e-3), mean 16, P(n > 128) < 1e-60: one
                      bucket (128), one capture; 100 steps: n ~ 164 -> bucket 256, ~56 us
Padding to a power of two at most doubles the rows, and a bucket never exceeds B*L, so a call never costs more
than the full-row head (equal only when n > B*L / 2); at 1000 steps it saves ~2.4 ms of ~7 ms per call.
``_MIN_BUCKET`` = 128 because below ~128 rows the head is bound by reading W (18 us whatever R), so smaller
buckets would save nothing measurable and add captures. Host time per call (issue 13, item 5): eager ~230
launches (~1 ms of CPU at a few us each, about the GPU time), graphed one fill and one replay (predicted
tens of us); ``bench/bench_sampling.py`` measures both (``timing=True``).

Philox offsets (``sample_step`` and ``philox_uniform`` key the same (seed, offset, row, col) stream, so no two
draws may share an offset): 0 noise removal (greedy: RNG unused); 1 + i the step / event at grid index
i < steps (ancestral steps, confidence and first-hitting events); 2^40 + k / 2^41 + k first hitting's
position choice / event time; 2^42 the per-position unmask-step uniforms of ddpm* (2^42 + i per step with
remasking); 2^43 + i the ReMDM remask uniforms (fast_sample enforces steps < 2^38).
"""
from __future__ import annotations

import math
import numbers

import torch

from .nn import _autocast
from .sampling import (INVALID_LOGITS, check_bool, check_eps, check_generator, check_int, check_real,
                       initial_tokens, resolve_steps)

__all__ = ["sample", "fast_sample", "fast_semi_ar_sample", "FAST_SAMPLERS", "masked_row_logits"]

FAST_SAMPLERS = ("ddpm", "ddpm_cache", "first_hitting", "confidence")

_OFF_UNMASK_STEP = 1 << 42  # ddpm*: the per-position unmask-step uniforms (+ grid index with remasking)
_OFF_REMASK = 1 << 43       # + grid index: ReMDM remask uniforms
_MAX_STEPS = 1 << 38        # keeps the offset ranges of the module docstring disjoint
_MIN_BUCKET = 128           # smallest padded row count of a ddpm* model call (module docstring: CUDA graphs)
GRAPH_SAMPLERS = ("ddpm", "ddpm_cache", "first_hitting")


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

    def __init__(self, event, device, stats, warmup: int = 2, pool=None, stream=None):
        self.event, self.device, self.stats, self.warmup, self.pool = event, device, stats, warmup, pool
        self.stream = stream  # the side stream of warm-up and capture (one per sampler run: shared with ``pool``)
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
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.device)
        side = self.stream
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
            # records only: the state is not touched until replay. Graphs of one sampler share ``pool``: they
            # are replayed one at a time on one stream and keep nothing they allocate beyond their replay (all
            # state lives in tensors allocated before capture), so their temporaries may share memory.
            with torch.cuda.graph(graph, stream=stream, pool=self.pool):
                self.event()
            self.graph = graph
        except Exception as e:  # a kernel or check that cannot be captured: stay correct, run eagerly
            warnings.warn(f"CUDA-graph capture of the sampling event failed ({type(e).__name__}: {e}); "
                          "running it eagerly", stacklevel=4)
            self.failed = True


def _seed_from(generator, stats) -> int:
    dev = torch.device(generator.device if generator is not None else "cpu")
    if dev.type != "cpu":
        _sync(stats)
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=dev).item())


def _sync(stats) -> None:
    """Count one explicit host synchronisation (stats["host_syncs"])."""
    stats["host_syncs"] = stats.get("host_syncs", 0) + 1


def _read(stats, t: torch.Tensor):
    """Every deliberate host read of the fast samplers goes through here (counted in stats["host_syncs"]):
    the device tensor t as Python numbers (``t.tolist()``)."""
    _sync(stats)
    return t.tolist()


def _issue(stats, timing: bool, device, fn, *args) -> None:
    """fn(*args): one model call of a sampler loop. With ``timing`` (measurement only: it synchronises the
    device twice per call) it appends to stats["host_s"] the host time spent issuing the call
    (time.perf_counter around fn, started on an idle device) and to stats["device_s"] the time from an event
    recorded before fn to the end of its work (CUDA events; on the CPU, where nothing runs asynchronously,
    the host time)."""
    if not timing:
        fn(*args)
        return
    import time
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
    t0 = time.perf_counter()
    fn(*args)
    host = time.perf_counter() - t0
    dev = host
    if cuda:
        e1.record()
        e1.synchronize()
        dev = e0.elapsed_time(e1) / 1e3
        stats["host_syncs"] = stats.get("host_syncs", 0) + 2
    stats.setdefault("host_s", []).append(host)
    stats.setdefault("device_s", []).append(dev)


def _masked_idx(x: torch.Tensor, mask_index: int) -> torch.Tensor:
    return (x == mask_index).reshape(-1).nonzero().squeeze(1)


@torch.no_grad()
def fast_sample(model, batch_size: int = 1, length: int | None = None, steps: int | None = None,
                sampler: str = "ddpm_cache", eps: float = 1e-5, noise_removal: bool = True,
                x_init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                tokens_per_step: int = 1, confidence_threshold: float | None = None,
                remask_eta: float = 0.0, progress: bool = False, return_stats: bool = False,
                cuda_graph: bool = False, timing: bool = False):
    """Generate (B, length) token ids with the fused sampling step.

    sampler: "ddpm", "ddpm_cache", "first_hitting" or "confidence" (see the module docstring). steps:
    number of uniform steps (ddpm*; default config.sampling.steps); ignored by first_hitting (one event
    per masked position) and derived from ``tokens_per_step`` for confidence decoding. temperature /
    top_k / top_p reshape p_theta. x_init (B, L): given tokens are kept. ``cuda_graph`` (ddpm, ddpm_cache and
    first_hitting, on CUDA): replay each model call (backbone, LM head on the drawn rows, sampling step,
    scatter) from a captured CUDA graph: one per row bucket for ddpm*, one for first hitting (see the module
    docstring); same tokens as without. With ``return_stats`` also returns {"model_calls": int, "steps": int,
    "host_syncs": int} (+ "graph_replays" with cuda_graph) (steps: grid steps covered, including the ones
    without a model call; host_syncs: explicit host reads, see the module docstring). ``timing``
    (measurement only, e.g. bench/bench_sampling.py): synchronise around every model call of the loop and
    record its host issue time and its device time in stats["host_s"] / stats["device_s"] (lists, seconds,
    one entry per model call of the loop; see ``_issue``); the syncs are counted in host_syncs.
    """
    import mdlm_kernels as mk

    if sampler not in FAST_SAMPLERS:
        raise ValueError(f"unknown fast sampler {sampler!r}; choose one of {FAST_SAMPLERS}")
    if model.parameterization != "subs" or not hasattr(model.backbone, "hidden_states"):
        raise ValueError("fast samplers need a SUBS model with a DIT backbone")
    if model.noise.name != "loglinear":
        raise ValueError("fast samplers assume the loglinear schedule (move chance = t), as ddpm_cache does")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0
            or not math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    eps = check_eps(eps)
    remask_eta = check_real(remask_eta, "remask_eta", 0.0, 1.0)
    noise_removal = check_bool(noise_removal, "noise_removal")
    check_generator(generator)
    if steps is not None:    # checked whatever the sampler (first_hitting / confidence ignore a valid value)
        steps = check_int(steps, "steps")
    device = next(model.parameters()).device
    if cuda_graph and sampler not in GRAPH_SAMPLERS:
        raise ValueError(f"cuda_graph=True applies to the samplers {GRAPH_SAMPLERS}, not {sampler!r} (its "
                         "per-step row count shrinks every step)")
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    x = initial_tokens(model, batch_size, length, x_init, device)   # the checks of the published sampler
    given = x != model.mask_index
    B, L = x.shape
    M = model.mask_index
    stats = {"model_calls": 0, "steps": 0, "host_syncs": 0}
    seed = _seed_from(generator, stats)
    # entropy=False: no sampler reads the entropy confidence (the kernel then skips its per-element term)
    opts = dict(mask_index=M, temperature=temperature, top_k=top_k, top_p=top_p, validate=False, entropy=False)
    was_training, was_validating = model.training, model.backbone.validate_inputs
    model.eval()
    model.backbone.validate_inputs = False  # x is checked once above; no range-check sync per model call
    invalid: list = []
    left = grid = None  # ddpm*: masked flat positions after the loop (known without a sync), the time grid
    try:
        if sampler in ("ddpm", "ddpm_cache"):
            n_steps = resolve_steps(model, steps)
            if n_steps >= _MAX_STEPS:
                raise ValueError(f"steps must be in [1, 2^38), got {n_steps}")
            grid = torch.linspace(1, eps, n_steps + 1, dtype=torch.float64)  # the published grid
            x, left = _ancestral(model, x, given, grid, remask_eta, seed, opts, stats, progress, invalid,
                                 cuda_graph, timing)
        elif sampler == "first_hitting":
            x = _first_hitting(model, x, seed, opts, stats, progress, invalid, cuda_graph, timing)
        else:
            x = _confidence(model, x, tokens_per_step, confidence_threshold, seed, opts, stats, progress, invalid,
                            timing=timing)
        if noise_removal and sampler in ("ddpm", "ddpm_cache"):
            idx = left  # the trajectory's masked positions: their number is known without a sync
            if idx.numel():
                sigma = model.noise(torch.full((B,), float(grid[-1]), device=device))[0]  # published: t = eps
                logits = masked_row_logits(model, x, sigma, idx)
                stats["model_calls"] += 1
                tok = mk.sample_step(logits, None, None, seed, 0, greedy=True, **opts).tokens
                x.view(-1).index_copy_(0, idx, _sanitize(tok, M, invalid))
        if invalid:
            if any(_read(stats, torch.stack(invalid).any().view(1))):   # one read, after the loop
                raise ValueError(INVALID_LOGITS)
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


def _bucket_rows(n: int, BL: int, pad: bool) -> int:
    """Rows R >= n a step's model call is launched with: n itself when nothing is padded (eager on the CPU);
    padded (CUDA, eager or graphed): the next power of two >= max(n, _MIN_BUCKET), at most B * L. Padding
    is what lets one captured graph serve every step of a bucket; eager CUDA steps use the same buckets so
    that a graphed run launches the same kernels on the same shapes as an eager one (same tokens)."""
    if not pad:
        return n
    r = max(n, _MIN_BUCKET)
    return min(1 << (r - 1).bit_length(), BL)


def _ancestral(model, x, given, grid, remask_eta, seed, opts, stats, progress, invalid, cuda_graph=False,
               timing=False, pad=None):
    """ddpm / ddpm_cache: ancestral steps t = grid[i] -> s = grid[i + 1] (fast_sample passes the published
    uniform grid 1 -> eps), with no host read and no host-to-device copy inside the loop. Returns (x, masked
    flat positions left).

    Under the loglinear SUBS step a masked row stays masked with probability s / t whatever the logits (the
    kernel's race: whether MASK loses is independent of which token wins), and ReMDM re-masking is decided
    on z_t with probability sigma, also without the model. So the whole masked-set trajectory is independent
    of the model: it is drawn first, on the device, and its per-step counts are read ONCE; then the loop visits
    only the steps at which a token unmasks (or is re-masked), calls the model there on the current x at that
    step's time, applies the LM head to the unmasking rows only, and draws their tokens from p_theta (kernel
    with t = 1, s = 0: no MASK option).

    Same process as the published ddpm and ddpm_cache: a model call whose output cannot change any token
    (no row unmasks in that step) is skipped — for ddpm_cache this is its cache (x unchanged -> the same
    p_theta), for ddpm the output of such a call is unused. (The published ddpm_cache recomputes every step
    for time-conditioned models, so both call the model at the time of the step that uses it.)

    Without remasking each masked row's first unmask step comes from one uniform (``_unmask_steps`` from
    t = 1, offset 2^42) and the rows are grouped by step with one stable sort (per-step counts and start
    offsets by ``searchsorted`` on the sorted steps: static shapes, no atomics). With remasking (eta > 0) the
    trajectory is simulated step by step in a pre-pass and replayed with the same draws.

    The step as data (what makes it capturable): every per-step quantity lives on the device — the time grid
    and the remasking schedule in tables copied once before the loop, the step index in ``i_dev`` (set by
    ``fill_`` before each call: a kernel argument, not a copy), the Philox offsets read by the kernels from
    ``i_dev`` (``offset_tensor``). A step with n unmasking rows runs the event of its row bucket R =
    ``_bucket_rows(n)``: rows gathered at fixed size R (padding rows have ``valid`` False: their logits are
    computed and dropped, their writes go to the spare slot B * L of x's buffer), so with ``cuda_graph`` each
    bucket's event is captured once (``_EventGraph``, all buckets in one memory pool) and replayed. ``pad``
    (default: with graphs or on CUDA) pads to the buckets; unpadded, R = n (eager on the CPU).
    """
    import mdlm_kernels as mk
    B, L = x.shape
    BL = B * L
    M = opts["mask_index"]
    device = x.device
    steps = grid.numel() - 1
    sched = _remask_schedule(grid, remask_eta)
    pad = (cuda_graph or device.type == "cuda") if pad is None else pad
    buf = torch.full((BL + 1,), M, dtype=torch.int64, device=device)  # slot BL takes the padded rows' writes
    buf[:BL].copy_(x.reshape(-1))
    x = buf[:BL].view(B, L)
    # the loop's constants in one table and ONE copy, before it: t_i (grid), s_eff_i, sigma_i
    tab = torch.zeros(steps + 1, 3, dtype=torch.float64)
    tab[:, 0] = grid
    if remask_eta > 0:
        tab[:steps, 1] = torch.tensor([s_eff for _, _, _, s_eff in sched], dtype=torch.float64)
        tab[:steps, 2] = torch.tensor([sig for _, _, sig, _ in sched], dtype=torch.float64)
    tab = tab.to(device)
    t64 = tab[:, 0].contiguous()
    t32 = t64.float()            # the model's time: float32(grid[i]), as torch.full((B,), grid[i]) gives
    i_dev = torch.zeros(1, dtype=torch.int64, device=device)   # the current step's grid index
    bad = torch.zeros((), dtype=torch.bool, device=device)     # some row had invalid logits
    # one memory pool and one side stream for every bucket's graph (warm-ups and captures on the same stream, so
    # the pool's blocks freed by one capture are reusable by the next)
    pool = torch.cuda.graph_pool_handle() if cuda_graph else None
    side = torch.cuda.Stream(device=device) if cuda_graph else None
    invalid.append(bad)

    def draw_rows(idx, valid, ones, zeros):
        """The model call of step i_dev for the flat positions idx (R,); valid (R,) marks the real rows (the
        others are padding: gathered from position 0, drawn and dropped, written to the spare slot BL)."""
        gidx = torch.where(valid, idx, 0)
        sigma = model.noise(t32.index_select(0, i_dev).expand(B))[0]
        logits = masked_row_logits(model, x, sigma, gidx)
        tok = mk.sample_step(logits, ones, zeros, seed, 1, row_ids=gidx, offset_tensor=i_dev, **opts).tokens
        bad_row = (tok < 0) & valid            # NaN logits etc.: the position stays masked, raise after the loop
        bad.logical_or_(bad_row.any())
        buf.index_copy_(0, torch.where(valid, idx, BL), torch.where(bad_row, M, tok))

    def bucket_consts(R):
        return (torch.arange(R, device=device), torch.ones(R, device=device), torch.zeros(R, device=device))

    if remask_eta == 0:
        u = mk.philox_uniform(B, L, seed, offset=_OFF_UNMASK_STEP, dtype=torch.float64, device=device).view(-1)
        j = _unmask_steps(u, 1.0, -t64, 0)
        j = torch.where(buf[:BL] == M, j, steps + 1)        # given tokens: never drawn
        js, order = torch.sort(j, stable=True)               # by unmask step, positions ascending within one
        bounds = torch.searchsorted(js, torch.arange(steps + 3, device=device))
        starts, counts_dev = bounds[:-1], bounds[1:] - bounds[:-1]   # (steps + 2,) each
        counts = _read(stats, counts_dev)                     # the one host read

        def make_event(R):
            ar, ones, zeros = bucket_consts(R)

            def event():
                pos = (starts.index_select(0, i_dev) + ar).clamp_max(BL - 1)
                draw_rows(order.index_select(0, pos), ar < counts_dev.index_select(0, i_dev), ones, zeros)
            return event

        work = [(counts[i], 0) for i in range(steps)]
    else:
        seff64, sig32 = tab[:, 1].contiguous(), tab[:, 2].float()

        def draws(m):
            """(unmask, remask) of step i_dev from the masked set m (B, L) at t: a masked row stays masked
            with probability s_eff / t (uniform at 2^42 + i: unmask iff u t >= s_eff); a decoded, non-given
            row is re-masked with probability sigma (float32 uniform at 2^43 + i)."""
            u = mk.philox_uniform(B, L, seed, offset=_OFF_UNMASK_STEP, dtype=torch.float64, device=device,
                                  offset_tensor=i_dev)
            unmask = m & (u * t64.index_select(0, i_dev) >= seff64.index_select(0, i_dev))
            r = mk.philox_uniform(B, L, seed, offset=_OFF_REMASK, dtype=torch.float32, device=device,
                                  offset_tensor=i_dev)
            return unmask, ~m & ~given & (r < sig32.index_select(0, i_dev))

        m = x == M
        mm = m.clone()
        hits = []
        for i in _progress(range(steps), False, ""):          # pre-pass: the masked-set trajectory
            i_dev.fill_(i)
            unmask, remask = draws(mm)
            hits += [unmask.sum(), remask.sum()]
            mm.logical_and_(~unmask).logical_or_(remask)
        counts = _read(stats, torch.stack(hits + [mm.sum()]))   # the one host read
        work = [(counts[2 * i], counts[2 * i + 1]) for i in range(steps)]

        def make_event(R):
            _, ones, zeros = bucket_consts(R)

            def event():
                unmask, remask = draws(m)
                idx = torch.nonzero_static(unmask.view(-1), size=R, fill_value=BL).view(R)
                draw_rows(idx, idx < BL, ones, zeros)
                m.logical_and_(~unmask)
                x.masked_fill_(remask, M)
                m.logical_or_(remask)
            return event

        def remask_only():                                     # a step where nothing unmasks: no model call
            _, remask = draws(m)
            x.masked_fill_(remask, M)
            m.logical_or_(remask)

    runs = {}

    def step(i, run):
        i_dev.fill_(i)
        run()

    stats["steps"] += steps
    for i in _progress(range(steps), progress, "sampling (fused)"):
        n_hit, n_rem = work[i]
        if n_hit:
            R = _bucket_rows(n_hit, BL, pad)
            if R not in runs:
                ev = make_event(R)
                runs[R] = _EventGraph(ev, device, stats, pool=pool, stream=side) if cuda_graph else ev
            _issue(stats, timing, device, step, i, runs[R])
            stats["model_calls"] += 1
        elif n_rem:
            step(i, remask_only)   # a few elementwise kernels, no model call (not timed)
    if remask_eta == 0:
        start = sum(counts[:steps])
        return x, order[start:start + counts[steps]]
    return x, torch.nonzero_static(m.view(-1), size=counts[-1]).squeeze(1)


def _first_hitting(model, x, seed, opts, stats, progress, invalid, cuda_graph=False, timing=False):
    """Each event: per sequence, one uniformly chosen masked position gets a token drawn from p_theta
    (s = 0: MASK cannot be drawn). All B rows go through every event with fixed shapes (sequences that are
    done keep their tokens) and the event counter k lives on the device (the Philox offsets 2^40 + k,
    2^41 + k and 1 + k are read by the kernels from it), so an event is one fixed sequence of kernels that
    only updates x, t, k and the invalid flag in place: no host read in the loop, and with ``cuda_graph``
    the whole event (draws, backbone, row gather, LM head, sampling step, scatter) is captured once and
    replayed (``_EventGraph``). The event times t_{k+1} = t_k u^(1/n) only matter with time conditioning;
    they are tracked for it."""
    M = opts["mask_index"]
    n_events = _read(stats, (x == M).sum(1).max().view(1))[0]  # one read before the loop
    event, bad = _first_hitting_event(model, x, seed, opts)
    run = _EventGraph(event, x.device, stats) if cuda_graph else event
    for _ in _progress(range(n_events), progress, "sampling (first hitting)"):
        _issue(stats, timing, x.device, run)
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


def _confidence(model, x, k, threshold, seed, opts, stats, progress, invalid, static_gather: bool = True,
                timing: bool = False):
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
    k = check_int(k, "tokens_per_step")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                  or not 0 < threshold <= 1):
        raise ValueError(f"confidence_threshold must be in (0, 1], got {threshold!r}")
    B, L = x.shape
    M = opts["mask_index"]
    device = x.device
    zero = torch.zeros(B, device=device)
    step = 0
    max_steps = L if threshold is not None else -(-L // k)
    static = static_gather and threshold is None

    def decode(idx, step):
        """One model call on the masked rows idx: commit the chosen positions' most probable tokens."""
        nonlocal x
        logits = masked_row_logits(model, x, zero, idx)
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

    if static:
        counts = _read(stats, (x == M).sum(1))   # the loop's only host read
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
        _issue(stats, timing, device, decode, idx, step)
        stats["model_calls"] += 1
        stats["steps"] += 1
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
    batch_size = check_int(batch_size, "batch_size")
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
