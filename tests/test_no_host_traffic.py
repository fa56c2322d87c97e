"""No host <-> device traffic inside the model forward and the sampler loops (issue 13, item 3).

A pageable host-to-device copy (``cpu_tensor.to(device)``, even of a tiny constant) synchronises the stream on
every call and is an error inside CUDA-graph capture; a test that counts host READS does not see it. So these
tests run the code with the model on the ``meta`` device (shapes and dtypes, no data: a stand-in for a GPU that
CPU-only CI has, where every op still dispatches) under ``HostTrafficGuard``, a dispatch mode that raises on

- a copy between the CPU and another device, either direction (``_to_copy``, ``copy_``; ``torch.tensor`` /
  ``as_tensor`` with a device; ``Tensor.tolist`` / ``numpy`` / ``cpu`` of a device tensor);
- an op that mixes CPU and device tensors (e.g. a CPU constant in a device op: a host value baked into a
  launch, frozen by CUDA-graph capture);
- a read of device data on the host (``.item()``, ``bool()``, ``int()``, ``torch.equal``, ...);
- an op whose output size depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean-mask
  indexing, ``bincount``, ``repeat_interleave`` without ``output_size``).

Ops on CPU tensors only (the host's own arithmetic) pass. The guard is armed for the whole model forward, and
for the samplers exactly while a sampler loop runs (every loop of ``mdlm.samplers`` iterates through
``_progress``, which the tests wrap): the reads the samplers make before and after their loops (through
``mdlm.samplers._read``) are replayed on the meta run from a CPU run of the same call. FakeTensorMode with fake
CUDA tensors does not work on the CPU-only torch (indexing a fake CUDA tensor needs the CUDA device guard), so
the meta device it is; meta has no autocast, so ``torch.autocast`` & co. treat it as a CPU device here.
"""
import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import mdlm
import mdlm.samplers as ms
from mdlm.diffusion import MDLM
from mdlm.nn import TimestepEmbedder

V, MASK, L = 13, 12, 6


class HostTraffic(AssertionError):
    """Host <-> device traffic where there must be none."""


_READS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal")
_DATA_DEPENDENT = ("aten.nonzero.", "aten.nonzero_numpy", "aten.masked_select", "aten.unique", "aten._unique",
                   "aten.bincount", "aten.histc", "aten.argwhere")


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


class HostTrafficGuard(TorchDispatchMode):
    """Raises HostTraffic on host <-> device traffic (module docstring) while ``armed``; counts the ops it
    checked (``checked``) and the loops it was armed for (``loops``), so a test can tell it saw something."""

    def __init__(self, armed: bool = True):
        super().__init__()
        self.armed, self.checked, self.loops = armed, 0, 0
        self._fn_mode = _FunctionGuard(self)

    def fail(self, what):
        raise HostTraffic(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.armed:
            self.checked += 1
            self.check(str(func), args, kwargs)
        return func(*args, **kwargs)

    def check(self, name, args, kwargs):
        ts = _tensors(list(args) + list(kwargs.values()), [])
        kinds = {t.device.type for t in ts}
        if name.startswith("aten._to_copy"):
            dst = kwargs.get("device")
            if dst is not None and (torch.device(dst).type == "cpu") != (ts[0].device.type == "cpu"):
                self.fail(f"{name}: a copy {ts[0].device} -> {torch.device(dst)} "
                          f"({'host-to-device' if ts[0].device.type == 'cpu' else 'device-to-host'})")
        if "cpu" in kinds and len(kinds) > 1:
            self.fail(f"{name} mixes tensors on {sorted(kinds)}: host data in a device op "
                      f"({[(tuple(t.shape), str(t.device)) for t in ts]})")
        if name.startswith(_READS) and kinds - {"cpu"}:
            self.fail(f"{name}: a host read of device data")
        if name.startswith(_DATA_DEPENDENT) and not name.startswith("aten.nonzero_static") and kinds - {"cpu"}:
            self.fail(f"{name}: an output size that depends on device data (a host read)")
        if name.startswith("aten.repeat_interleave") and kwargs.get("output_size") is None and kinds - {"cpu"}:
            self.fail(f"{name} without output_size: a host read")
        if name.startswith(("aten.index.", "aten.index_put", "aten._index_put")) and kinds - {"cpu"}:
            idx = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or ()):
                self.fail(f"{name} with a boolean mask: an output size that depends on device data")

    def __enter__(self):
        self._fn_mode.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._fn_mode.__exit__(*exc)


class _FunctionGuard(TorchFunctionMode):
    """The traffic that does not reach the dispatcher: ``torch.tensor(data, device=d)`` copies host data
    inside the constructor; ``Tensor.tolist`` / ``numpy`` read without an aten op."""

    def __init__(self, guard):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        g = self.guard
        if g.armed:
            name = getattr(func, "__name__", str(func))
            dev = kwargs.get("device")
            if name in ("tensor", "as_tensor", "asarray") and dev is not None and torch.device(dev).type != "cpu":
                g.fail(f"torch.{name}(..., device={dev}): host data copied to the device")
            if name in ("tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__") and args \
                    and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
                g.fail(f"Tensor.{name} of a {args[0].device} tensor: a device-to-host read")
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def _meta_autocast(monkeypatch):
    """The meta device has no autocast state: treat it as a CPU device (autocast off)."""
    real_ac, real_en, real_dt = torch.autocast, torch.is_autocast_enabled, torch.get_autocast_dtype

    class autocast(real_ac):
        def __init__(self, device_type, *a, **k):
            super().__init__("cpu" if device_type == "meta" else device_type, *a, **k)

    monkeypatch.setattr(torch, "autocast", autocast)
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda *a: False if a and a[0] == "meta" else real_en(*a))
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda d: real_dt("cpu" if d == "meta" else d))
    monkeypatch.setenv("MDLM_BACKEND", "auto")


def _model(**over):
    cfg = mdlm.preset("tiny", **{"model.dropout": 0.0, "model.n_blocks": 1, "model.hidden_size": 32,
                                  "model.n_heads": 2, "model.cond_dim": 16, "model.length": L, **over})
    torch.manual_seed(0)
    m = MDLM(cfg, V)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return m.eval()


def _old_timestep_embedding(t, dim, max_period=10000, freqs=None):
    """The embedding before the fix: frequencies built on the CPU and copied to t's device on every call."""
    import math
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# the guard itself: every kind of traffic raises, host-only arithmetic and device-only ops pass
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["h2d_to", "h2d_copy_", "h2d_tensor", "d2h_to", "mixed", "item", "bool", "tolist",
                                  "nonzero", "masked_select", "bool_index", "repeat_interleave", "equal"])
def test_guard_raises_on_every_kind_of_host_traffic(kind):
    d = torch.ones(4, device="meta")
    h = torch.ones(4)
    ops = {
        "h2d_to": lambda: h.to("meta"),
        "h2d_copy_": lambda: d.copy_(h),
        "h2d_tensor": lambda: torch.tensor([1.0, 2.0], device="meta"),
        "d2h_to": lambda: d.to("cpu"),
        "mixed": lambda: d * torch.tensor(2.0),
        "item": lambda: d.sum().item(),
        "bool": lambda: bool(d.sum() > 0),
        "tolist": lambda: d.tolist(),
        "nonzero": lambda: d.nonzero(),
        "masked_select": lambda: d.masked_select(d > 0),
        "bool_index": lambda: d[d > 0],
        "repeat_interleave": lambda: torch.repeat_interleave(torch.ones(3, dtype=torch.int64, device="meta")),
        "equal": lambda: torch.equal(d, d),
    }
    with pytest.raises(HostTraffic):
        with HostTrafficGuard():
            ops[kind]()


def test_guard_passes_host_arithmetic_and_device_ops():
    with HostTrafficGuard() as g:
        grid = torch.linspace(1, 0, 11, dtype=torch.float64)
        assert grid.tolist()[0] == 1.0                      # CPU only: the host's own data
        d = torch.ones(3, 4, device="meta")
        k = torch.zeros(1, dtype=torch.int64, device="meta")
        k.fill_(7)                                          # a host scalar as a kernel argument: no copy
        (d * 2.0 + d.sum(1, keepdim=True)).index_select(0, k.clamp_max(2))
        torch.nonzero_static(d.view(-1) > 0, size=5)
    assert g.checked > 5


# ---------------------------------------------------------------------------------------------------------------
# the model forward
# ---------------------------------------------------------------------------------------------------------------
def test_the_old_timestep_embedding_is_caught(monkeypatch):
    """Issue 13, item 3: the frequencies built on the CPU and copied every forward fail this guard."""
    m = _model().to("meta")
    m.backbone.validate_inputs = False
    monkeypatch.setattr(TimestepEmbedder, "timestep_embedding", staticmethod(_old_timestep_embedding))
    with pytest.raises(HostTraffic, match="host-to-device"):
        with HostTrafficGuard():
            m.backbone(torch.full((2, L), MASK, device="meta"), torch.zeros(2, device="meta"))


def test_timestep_embedding_keeps_the_published_frequencies_and_state_dict():
    """The fix keeps the published numbers (computed on the CPU, as the published code does per call) in a
    non-persistent buffer: not in the state_dict, moved with the module, identical embeddings."""
    emb = TimestepEmbedder(16)
    assert "freqs" not in emb.state_dict() and emb.freqs.dtype == torch.float32
    t = torch.rand(5) * 7
    got = emb.timestep_embedding(t, 256, freqs=emb.freqs)
    assert torch.equal(got, _old_timestep_embedding(t, 256))
    assert torch.equal(TimestepEmbedder.timestep_embedding(t, 256), got)          # computed on t's device
    # a module cast to bf16 (run under autocast) still embeds with the fp32 frequencies
    h = copy.deepcopy(emb).bfloat16()
    assert h.freqs.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(h(t), h.mlp(_old_timestep_embedding(t, 256)))
    assert emb.to("meta").freqs.device.type == "meta"


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_model_forward_moves_no_host_data(use_kernels, time_conditioning):
    """DIT forward (reference blocks and the fused block kernels, whose host code runs with meta tensors),
    the masked-row LM head of the fast samplers, on the meta device: no host traffic at all."""
    m = _model(time_conditioning=time_conditioning).to("meta")
    m.backbone.validate_inputs = False     # the input range check is a deliberate read (samplers turn it off)
    m.backbone.use_kernels = use_kernels
    x = torch.full((3, L), MASK, device="meta")
    sigma = torch.rand(3, device="meta")
    with torch.no_grad(), HostTrafficGuard() as g:
        logits = m.backbone(x, sigma)
        rows = ms.masked_row_logits(m, x, sigma, torch.arange(5, device="meta"))
    assert logits.shape == (3, L, V) and rows.shape == (5, V) and g.checked > 20


@pytest.mark.parametrize("noise", ["loglinear", "linear", "geometric"])
def test_published_forward_moves_no_host_data(noise):
    """MDLM.forward (the published path the reference samplers call): DIT + the SUBS parameterization (carry-over
    without boolean indexing) and the noise schedules (their constants copied to a device once, then reused)."""
    m = _model(**{"noise.type": noise}).to("meta")
    m.validate_inputs = m.backbone.validate_inputs = False
    x = torch.full((2, L), MASK, device="meta")
    x[:, ::3] = 1
    t = torch.rand(2, device="meta")
    m.noise(t)                                     # first use on the device: the constants move once, here
    with torch.no_grad(), HostTrafficGuard() as g:
        sigma, _ = m.noise(t)
        out = m.forward(x, sigma[:, None])
    assert out.shape == (2, L, V) and g.checked > 20


@pytest.mark.parametrize("impl", ["masked", "fused"])
def test_statically_gathered_loss_moves_no_host_data(impl):
    """The SUBS loss from hidden states with a static row bound (the trainer's sync-free path), forward and
    backward, on the meta device."""
    from mdlm.losses import subs_loss_from_hidden
    B, d = 2, 8
    hidden = torch.randn(B, L, d, device="meta", requires_grad=True)
    w = torch.randn(V, d, device="meta", requires_grad=True)
    b = torch.zeros(V, device="meta", requires_grad=True)
    x0 = torch.zeros(B, L, dtype=torch.int64, device="meta")
    xt = torch.full((B, L), MASK, device="meta")
    with HostTrafficGuard() as g:
        out = subs_loss_from_hidden(hidden, w, b, x0, xt, torch.ones(B, device="meta"), MASK, impl=impl,
                                    row_bound=7)
        out.loss.backward()
    assert g.checked > 10 and hidden.grad.shape == hidden.shape


# ---------------------------------------------------------------------------------------------------------------
# the sampler loops: a whole fast_sample on meta, guarded inside its loops
# ---------------------------------------------------------------------------------------------------------------
def _run_guarded_on_meta(monkeypatch, m, B, x_init=None, **kw):
    """fast_sample on the CPU (recording the samplers' reads), then the same call with the model on meta, the
    reads replayed, and the guard armed inside every sampler loop. Returns the guard."""
    reads = []
    real_read = ms._read

    def record(stats, t):
        v = real_read(stats, t)
        reads.append(v)
        return v

    monkeypatch.setattr(ms, "_read", record)
    ms.fast_sample(m, B, x_init=x_init, generator=torch.Generator().manual_seed(1), **kw)
    assert reads, "the CPU run made no read to replay"

    def replay(stats, t):
        v = reads.pop(0)
        assert t.device.type == "meta" and t.numel() == len(v), (t.shape, v)
        ms._sync(stats)
        return v

    guard = HostTrafficGuard(armed=False)
    real_progress = ms._progress

    def armed(it, enabled, desc):
        def loop():
            guard.armed, guard.loops = True, guard.loops + 1
            try:
                yield from real_progress(it, enabled, desc)
            finally:
                guard.armed = False
        return loop()

    monkeypatch.setattr(ms, "_read", replay)
    monkeypatch.setattr(ms, "_progress", armed)
    monkeypatch.setattr(mdlm.sampling, "check_token_ids", lambda *a, **k: None)   # x_init's range check reads
    # the host (the fused samplers check x_init with the published sampler's ``initial_tokens``)
    meta = copy.deepcopy(m).to("meta")
    with guard:
        out = ms.fast_sample(meta, B, x_init=None if x_init is None else x_init.to("meta"),
                             generator=torch.Generator().manual_seed(1), **kw)
    assert out.shape == (B, L) and out.device.type == "meta"
    assert not reads, f"{len(reads)} recorded reads were not replayed"
    return guard


@pytest.mark.parametrize("kw,over", [
    (dict(sampler="ddpm_cache", steps=12), {}),
    (dict(sampler="ddpm", steps=12, temperature=0.8, top_k=3), {"time_conditioning": True}),
    (dict(sampler="ddpm_cache", steps=12, remask_eta=0.05), {}),
    (dict(sampler="ddpm_cache", steps=12, pad=True), {}),
    (dict(sampler="ddpm_cache", steps=12, remask_eta=0.05, pad=True), {"time_conditioning": True}),
    (dict(sampler="first_hitting"), {"time_conditioning": True}),
    (dict(sampler="confidence", tokens_per_step=2), {}),
], ids=["ddpm_cache", "ddpm-time-topk", "remask", "ddpm_cache-padded", "remask-padded-time", "first_hitting",
        "confidence-k"])
@pytest.mark.parametrize("use_kernels", [False, True])
def test_sampler_loops_move_no_host_data(monkeypatch, kw, over, use_kernels):
    """Every model call, sampling step and bookkeeping op inside the loops of ddpm / ddpm_cache (with and
    without remasking, time conditioning, padded to the CUDA row buckets or not), first hitting and
    confidence decoding (k per step) runs without host traffic."""
    kw = dict(kw)
    if kw.pop("pad", False):   # the padded events CUDA runs (eager and graphed): force the buckets on meta
        real_bucket = ms._bucket_rows
        monkeypatch.setattr(ms, "_bucket_rows", lambda n, BL, pad: real_bucket(n, BL, True))
    m = _model(**over)
    m.backbone.use_kernels = use_kernels
    x_init = torch.full((3, L), MASK)
    x_init[1, :2] = 4
    g = _run_guarded_on_meta(monkeypatch, m, 3, x_init=x_init, **kw)
    assert g.loops >= 1 and g.checked > 20, (g.loops, g.checked)


def test_a_host_read_or_copy_in_a_sampler_loop_is_caught(monkeypatch):
    """Controls: a scalar read, and a host-to-device copy, slipped into the model call of the loop."""
    m = _model()
    real = ms.masked_row_logits
    for bad in (lambda sigma: float(sigma.sum()), lambda sigma: sigma + torch.ones(sigma.shape).to(sigma.device)):
        def leaky(model, x, sigma, idx, bad=bad):
            bad(sigma)
            return real(model, x, sigma, idx)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ms, "masked_row_logits", leaky)
            with pytest.raises(HostTraffic):
                _run_guarded_on_meta(mp, m, 2, sampler="ddpm_cache", steps=6)
