"""Training throughput of MDLM providers, side by side in one process.

    python bench/throughput.py                      # GPU: DiT small, B=16 x L=1024, bf16; CPU: tiny preset
    python bench/throughput.py --preset small --batch 64 --providers reference,masked_compiled
    python bench/throughput.py --sampling --batch 1 --length 32     # CPU, with the sampling section

A provider is one way of computing the published training loss; every provider runs the same full
training step: forward, backward, AdamW (lr 3e-4, betas 0.9/0.999, wd 0), gradient clipping at 1.0
and the EMA update (decay 0.9999 with the (1+n)/(10+n) warm-up, as ``torch._foreach`` ops).

Providers:
  fused            this library: fused masking kernel + fused SUBS linear-cross-entropy (masked rows only)
  reference        the published loss: (B, L, V) logits, SUBS parameterization, gather (eager)
  masked           LM head + cross-entropy on masked rows only, MASK column dropped (eager)
  compiled         torch.compile of the reference loss function
  masked_compiled  torch.compile of the masked-rows loss (the strongest plain-PyTorch path)
Only `fused` runs the DiT block kernels (DIT's default: on for CUDA inputs, off on CPU); every other
provider runs the plain-PyTorch blocks (`use_kernels=False`), so the comparison is this library vs the
published code and vs what plain PyTorch + torch.compile can do with it.

Per provider: step time (median and inter-quartile range over the timed steps), tokens/s, peak memory,
and model FLOP utilisation (MFU) against the matmul rate measured in the same run. MFU counts the model's
FLOPs with the full LM head for every provider (so it is proportional to tokens/s); a masked-rows provider
skips about half of the LM head and can therefore show more MFU than the hardware really sustains.

Energy (CUDA with ``pynvml`` from the nvidia-ml-py package): a background thread reads the board power
(``nvmlDeviceGetPowerUsage``) every ~20 ms during each provider's timed steps; the row reports the mean
power, the sample count and J/token = mean W x median step s / tokens per step, plus, as a cross-check,
the driver's energy counter (``nvmlDeviceGetTotalEnergyConsumption``) over the same steps divided by all
their tokens. Without NVML these fields are None and ``energy_note`` says why.

Sampling (after the training table; on by default on CUDA, off on CPU; ``--sampling`` / ``--no-sampling``):
the functions of bench/bench_sampling.py at the same preset, batch and length: per-step time of the
sampling arithmetic after the model forward (published ddpm_cache arithmetic vs the fused step) and
generated tokens/s from scratch in ``--sampling-steps`` steps (reference ddpm_cache, fused ddpm_cache,
fused first_hitting). The model there is randomly initialised: speed only.

Results are printed as tables and written as JSON (plus a PNG bar chart if matplotlib is installed) under
bench/results/.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, matmul_ceiling, sync as _sync  # noqa: E402

import mdlm  # noqa: E402
from mdlm.train import EMA  # the trainer's EMA: published decay warm-up, one foreach lerp

PROVIDERS = ("fused", "reference", "masked", "compiled", "masked_compiled")
_IMPL = {"fused": "fused", "reference": "reference", "masked": "masked", "compiled": "reference",
         "masked_compiled": "masked"}
VOCAB = 50258  # GPT-2 + MASK


def model_flops_per_token(cfg, vocab: int, length: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), full LM head, attention included.

    Per token and layer: qkv 3d^2, out d^2, MLP 8d^2 multiply-adds, attention scores + values 2 L d;
    LM head d V. One multiply-add = 2 FLOPs; training = 3x forward.
    """
    d, n = cfg.model.hidden_size, cfg.model.n_blocks
    fwd_macs = n * (12 * d * d + 2 * length * d) + d * vocab
    return 3 * 2 * fwd_macs


def _nvml_handle(pynvml, device):
    """The NVML handle of a torch CUDA device (UUID first: CUDA_VISIBLE_DEVICES renumbers devices)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        try:
            u = str(uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(u if u.startswith(("GPU-", "MIG-")) else "GPU-" + u)
        except Exception:
            pass
    if all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        try:
            bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        except Exception:
            pass
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        raise RuntimeError("cannot map the torch device to an NVML device (no UUID / PCI id match) while "
                           "CUDA_VISIBLE_DEVICES renumbers devices")
    return pynvml.nvmlDeviceGetHandleByIndex(index)


class PowerMeter:
    """Board power from NVML, sampled by a background thread while ``measure()`` is active.

    ``available`` is False (and ``note`` says why) off CUDA, when ``pynvml`` (nvidia-ml-py) does not
    import or when NVML does not initialise; every figure is then None.
    """

    NOTE = ("mean of nvmlDeviceGetPowerUsage samples during the timed steps; J/token = mean W x median step s "
            "/ tokens per step. On recent drivers this reading is a ~1 s moving average, so short timed "
            "windows lag; energy_counter_j_per_token (total energy counter over the timed steps / their "
            "tokens) is the cross-check.")

    def __init__(self, device, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.available, self.handle, self.pynvml = False, None, None
        if device.type != "cuda":
            self.note = "energy not measured: not a CUDA device"
            return
        try:
            import pynvml
        except Exception as e:
            self.note = (f"energy not measured: pynvml does not import ({type(e).__name__}); "
                         "pip install nvidia-ml-py")
            return
        try:
            pynvml.nvmlInit()
            self.handle = _nvml_handle(pynvml, device)
            pynvml.nvmlDeviceGetPowerUsage(self.handle)
        except Exception as e:
            self.note = f"energy not measured: NVML unavailable ({type(e).__name__}: {str(e)[:200]})"
            return
        self.pynvml, self.available, self.note = pynvml, True, self.NOTE

    def _energy_mj(self):
        try:
            return self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            return None

    def measure(self):
        return _PowerWindow(self)


class _PowerWindow:
    def __init__(self, meter: PowerMeter):
        self.meter = meter
        self.samples_mw: list = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = None
        self.energy_mj = None

    def _run(self):
        nvml, h = self.meter.pynvml, self.meter.handle
        while True:
            try:
                self.samples_mw.append(nvml.nvmlDeviceGetPowerUsage(h))
            except Exception:
                self.errors += 1
            if self._stop.wait(self.meter.interval_s):
                return

    def __enter__(self):
        if self.meter.available:
            self._e0 = self.meter._energy_mj()
            self._thread = threading.Thread(target=self._run, name="nvml-power", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            e1 = self.meter._energy_mj()
            if self._e0 is not None and e1 is not None and e1 >= self._e0:
                self.energy_mj = e1 - self._e0
        return False

    def result(self, median_s: float, tokens_per_step: int, n_steps: int) -> dict:
        """Row fields: mean power (W), J/token from the mean power and the median step, sample count."""
        if not self.samples_mw:  # no NVML (all None) or, rarely, not one successful reading (0 samples)
            return {"power_mean_w": None, "j_per_token": None,
                    "power_samples": 0 if self.meter.available else None, "energy_counter_j_per_token": None}
        mean_w = statistics.fmean(self.samples_mw) / 1e3
        return {"power_mean_w": mean_w, "j_per_token": mean_w * median_s / tokens_per_step,
                "power_samples": len(self.samples_mw),
                "energy_counter_j_per_token": (self.energy_mj / 1e3 / (tokens_per_step * n_steps)
                                               if self.energy_mj is not None and self.energy_mj > 0 else None)}


def make_step(provider: str, model: mdlm.MDLM, device, bf16: bool):
    impl = _IMPL[provider]

    def loss_fn(x0):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            return model.loss(x0, impl=impl).loss

    if provider.endswith("compiled"):
        loss_fn = torch.compile(loss_fn)
    # fused AdamW on both devices (torch has a CPU one too): the foreach one reads every step counter on the host
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=True)
    ema = EMA(model.parameters())

    def step(x0, budget=None):
        """One training step; ``budget`` (a StepBudget) gets its phases marked."""
        mark = budget.phase if budget is not None else (lambda name: None)
        mark("forward")
        loss = loss_fn(x0)
        opt.zero_grad(set_to_none=True)
        mark("backward")
        loss.backward()
        mark("optimizer")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        ema.update()
        return loss

    return step


def step_budget(step, x0, provider: str) -> dict | None:
    """Host reads (GPU synchronisations), dispatched ops (~kernel launches) per phase and saved-activation bytes
    per token of one untimed step, counted at the dispatcher (mdlm_kernels.step_budget; None for the compiled
    providers, whose compiled graphs the counting mode would re-trace)."""
    if provider.endswith("compiled"):
        return None
    from mdlm_kernels.step_budget import StepBudget
    with StepBudget() as b:
        step(x0, b)
    s = b.summary()
    return {"host_reads": s["host_reads"], "host_reads_by_phase": s["host_reads_by_phase"],
            "host_reads_by_op": s["host_reads_by_op"], "launches": s["launches"],
            "launches_by_phase": s["launches_by_phase"], "saved_bytes_per_token": s["saved_bytes"] / x0.numel()}


def run_provider(provider, cfg, args, device, meter: PowerMeter | None = None):
    torch.manual_seed(0)
    model = mdlm.MDLM(cfg, VOCAB).to(device)
    model.validate_inputs = model.backbone.validate_inputs = False  # ids are generated in range: no range-check sync
    model.backbone.use_kernels = None if provider == "fused" else False  # block kernels for `fused` only
    model.train()
    step = make_step(provider, model, device, args.bf16)
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, VOCAB - 1, (args.batch, args.length), generator=g).to(device)
               for _ in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_first = time.perf_counter()
    losses = []
    for i in range(args.warmup):
        losses.append(step(batches[i % 4]))
    _sync(device)
    warmup_s = time.perf_counter() - t_first
    times = []
    meter = meter or PowerMeter(torch.device("cpu"))
    with meter.measure() as power:
        for i in range(args.steps):
            t0 = time.perf_counter()
            losses.append(step(batches[i % 4]))
            _sync(device)
            times.append(time.perf_counter() - t0)
    budget = step_budget(step, batches[0], provider)
    final_loss = losses[-1].detach().float().item()
    peak = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    med = statistics.median(times)
    return {"provider": provider, "median_s": med, "q1_s": q[0], "q3_s": q[2], "warmup_s": warmup_s,
            "tokens_per_s": args.batch * args.length / med, "peak_mem_gib": peak,
            "peak_mem_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
            "final_loss": final_loss, "steps_timed": len(times), "step_budget": budget,
            **power.result(med, args.batch * args.length, len(times))}


def run_sampling(args, device) -> dict:
    """The sampling section: bench/bench_sampling.py's step and generation measurements, by import."""
    bench_dir = str(Path(__file__).resolve().parent)
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    import bench_sampling
    from common import copy_bandwidth

    cuda = device.type == "cuda"
    bw = copy_bandwidth(device, 2 ** 30 if cuda else 2 ** 26)
    step, n = bench_sampling.step_rows(args.batch, args.length, VOCAB, device, 20 if cuda else 3)
    for r in step:
        if "read_GBps" in r:
            r["fraction_of_copy"] = r["read_GBps"] * 1e9 / bw
    gen = bench_sampling.generation_rows(args.preset, args.batch, args.length, args.sampling_steps, device)
    return {"preset": args.preset, "batch": args.batch, "length": args.length, "vocab": VOCAB,
            "steps": args.sampling_steps, "masked_rows": n, "copy_bandwidth_Bps": bw, "step": step,
            "generation": gen}


def print_sampling(s: dict):
    print(f"# sampling: step arithmetic after the model forward, B={s['batch']} L={s['length']} V={s['vocab']}, "
          f"{s['masked_rows']} masked rows; copy bandwidth {s['copy_bandwidth_Bps'] / 1e9:.0f} GB/s")
    ref = next((r for r in s["step"] if r["provider"] == "reference"), None)
    print(f"{'sampling step':<24} {'ms':>9} {'vs ref':>7}  read bandwidth")
    for r in s["step"]:
        speed = f"{ref['ms'] / r['ms']:.2f}x" if ref else "-"
        extra = (f"  {r['read_GBps']:.1f} GB/s = {r['fraction_of_copy'] * 100:.0f}% of copy ({r['backend']})"
                 if "read_GBps" in r else "")
        print(f"{r['provider']:<24} {r['ms']:>9.3f} {speed:>7}{extra}")
    print(f"# sampling: generation from scratch, {s['preset']}, B={s['batch']} x L={s['length']}, "
          f"{s['steps']} ddpm_cache steps (first_hitting: one event per position), random model")
    ref = next((r for r in s["generation"] if r["provider"] == "reference ddpm_cache"), None)
    print(f"{'sampler':<24} {'seconds':>9} {'tokens/s':>11} {'vs ref':>7} {'model calls':>12} {'entropy':>8}")
    for r in s["generation"]:
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        calls = "-" if r["model_calls"] is None else str(r["model_calls"])
        ent = "-" if r.get("entropy") is None else f"{r['entropy']:.3f}"   # sample quality, side by side
        print(f"{r['provider']:<24} {r['seconds']:>9.3f} {r['tokens_per_s']:>11,.1f} {speed:>7} {calls:>12} {ent:>8}")


def print_budget(rows):
    rows = [r for r in rows if r.get("step_budget")]
    if not rows:
        return
    print("# step budget (one untimed step, counted at the dispatcher): host reads = GPU synchronisations, "
          "ops ~ kernel launches, saved = activation bytes kept for backward per token")
    print(f"{'provider':<16} {'host reads fwd/bwd/opt':>23} {'ops fwd/bwd/opt':>20} {'saved KiB/token':>16}")
    for r in rows:
        b = r["step_budget"]
        hr, la = b["host_reads_by_phase"], b["launches_by_phase"]
        reads = "/".join(str(hr.get(p, 0)) for p in ("forward", "backward", "optimizer"))
        ops = "/".join(str(la.get(p, 0)) for p in ("forward", "backward", "optimizer"))
        print(f"{r['provider']:<16} {reads:>23} {ops:>20} {b['saved_bytes_per_token'] / 1024:>16.2f}")


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small" if cuda else "tiny", choices=mdlm.PRESETS)
    p.add_argument("--batch", type=int, default=16 if cuda else 4)
    p.add_argument("--length", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--providers", default="fused,reference,masked,compiled,masked_compiled" if cuda else "fused,reference,masked",
                   help=f"comma-separated subset of {PROVIDERS}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per provider")
    p.add_argument("--warmup", type=int, default=3 if cuda else 2)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 on GPU (CPU is always fp32)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and PNG")
    p.add_argument("--tag", default=None, help="file name stem (default: throughput_<device>_<preset>)")
    p.add_argument("--sampling", action=argparse.BooleanOptionalAction, default=None,
                   help="run the sampling section after the training table (default: on for CUDA, off on CPU)")
    p.add_argument("--sampling-steps", type=int, default=100,
                   help="ddpm_cache steps of the generation measurement (default 100)")
    args = p.parse_args(argv)
    args.providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    unknown = [s for s in args.providers if s not in PROVIDERS]
    if unknown:
        p.error(f"unknown provider(s) {unknown}; choose from {PROVIDERS}")
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be >= 1")
    if args.sampling_steps < 1:
        p.error("--sampling-steps must be >= 1")
    if args.sampling is None:
        args.sampling = torch.device(args.device).type == "cuda"
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = mdlm.preset(args.preset)
    args.length = args.length or cfg.model.length
    cfg.model.length = args.length
    dtype = torch.bfloat16 if (device.type == "cuda" and args.bf16) else torch.float32
    ceiling = matmul_ceiling(device, dtype, 8192 if device.type == "cuda" else 2048)
    flops_tok = model_flops_per_token(cfg, VOCAB, args.length)
    env = environment(device)
    print(f"# MDLM training throughput: preset {args.preset}, B={args.batch}, L={args.length}, V={VOCAB}, "
          f"{'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'} on {env.get('gpu', env.get('cpu'))} "
          f"({device.type}); torch {env['torch']}, git {env['git_revision']}")
    print(f"# measured {dtype} matmul ceiling: {ceiling / 1e12:.2f} TFLOP/s; model: {flops_tok / 1e9:.3f} GFLOP/token "
          "(fwd+bwd)")
    meter = PowerMeter(device)
    rows = []
    for prov in args.providers:
        try:
            r = run_provider(prov, cfg, args, device, meter)
        except Exception as e:  # one provider failing (e.g. no compiler for torch.compile) must not hide the others
            print(f"  {prov}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            rows.append({"provider": prov, "error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        r["mfu"] = r["tokens_per_s"] * flops_tok / ceiling
        rows.append(r)
    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["provider"] == "reference"), None)
    try:
        import mdlm_kernels
        from mdlm_kernels.backend import last_used
        backends = dict(last_used)
        avail = mdlm_kernels.available()
    except Exception as e:  # the benchmark must still report the plain-PyTorch providers
        backends, avail = {}, {"error": str(e)}
    hdr = (f"{'provider':<16} {'step ms (median)':>17} {'IQR ms':>13} {'tokens/s':>11} {'vs ref':>7} {'MFU':>6} "
           f"{'peak GiB':>9} {'loss':>7} {'power W':>8} {'mJ/token':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['provider']:<16} failed: {r['error'].splitlines()[0][:80]}")
            continue
        speed = f"{base['median_s'] / r['median_s']:.2f}x" if base else "-"
        watts = "-" if r["power_mean_w"] is None else f"{r['power_mean_w']:.0f}"
        mj = "-" if r["j_per_token"] is None else f"{r['j_per_token'] * 1e3:.3f}"
        print(f"{r['provider']:<16} {r['median_s'] * 1e3:>17.1f} {r['q1_s'] * 1e3:>6.1f}-{r['q3_s'] * 1e3:<6.1f} "
              f"{r['tokens_per_s']:>11,.0f} {speed:>7} {r['mfu'] * 100:>5.1f}% {r['peak_mem_gib']:>9.2f} "
              f"{r['final_loss']:>7.3f} {watts:>8} {mj:>9}")
    print_budget(ok)
    if backends:
        print("# kernel backends used: " + ", ".join(f"{k}={v}" for k, v in sorted(backends.items())))
    if meter.available:
        print(f"# energy: NVML power sampled every {meter.interval_s * 1e3:.0f} ms during the timed steps "
              f"({', '.join(str(r['power_samples']) for r in ok)} samples)")
    else:
        print(f"# {meter.note}")
    sampling, sampling_failed = None, False
    if args.sampling:
        try:
            sampling = run_sampling(args, device)
        except Exception as e:  # the training figures above stay valid; report the failure and exit non-zero
            sampling_failed = True
            sampling = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"# sampling: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                  file=sys.stderr)
        else:
            print_sampling(sampling)
    if device.type != "cuda":
        print("# CPU figures (no GPU here): they show the pipeline works, not GPU speed. Peak memory on CPU is "
              "the process's max RSS, cumulative over providers.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"throughput_{device.type}_{args.preset}"
    earlier = [p for p in (out / f"{stem}.json", out / f"{stem}.png") if p.exists()]
    if earlier:
        print(f"# replacing the results of an earlier run: {', '.join(str(p) for p in earlier)} (--tag NAME or "
              "--out DIR keeps both)")
    result = {"benchmark": "throughput", "preset": args.preset, "batch": args.batch, "length": args.length,
              "vocab": VOCAB, "dtype": str(dtype), "matmul_ceiling_flops": ceiling,
              "model_flops_per_token": flops_tok, "environment": env, "kernel_backends": backends,
              "mdlm_kernels": avail, "energy_note": meter.note, "results": rows}
    if args.sampling:
        result["sampling"] = sampling
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    print(f"# wrote {out / (stem + '.json')}")
    png = _plot(ok, out / f"{stem}.png", f"{args.preset} B={args.batch} L={args.length} on {env.get('gpu', device.type)}")
    print(f"# wrote {png}" if png else "# no chart: matplotlib is not installed (pip install matplotlib)"
          if ok else "# no chart: every provider failed")
    return 0 if ok and not sampling_failed else 1


def _chart_data(rows):
    """(providers, median tokens/s, error below, error above, value labels) of the chart: the error bar runs
    from tokens/s at the step-time third quartile (tokens per step / q3) to tokens/s at the first (/ q1)."""
    names = [r["provider"] for r in rows]
    tps = [r["tokens_per_s"] for r in rows]
    per_step = [r["tokens_per_s"] * r["median_s"] for r in rows]      # tokens per step
    lo = [max(0.0, t - n / r["q3_s"]) for t, n, r in zip(tps, per_step, rows)]
    hi = [max(0.0, n / r["q1_s"] - t) for t, n, r in zip(tps, per_step, rows)]
    return names, tps, lo, hi, [f"{t:,.0f}" for t in tps]


def _plot(rows, path, title):
    """Bar chart of tokens/s per provider -> ``path``; returns the path, or None (no matplotlib, no rows).

    Each bar is the median step's tokens/s, labelled with its value; the error bar spans the tokens/s of the
    step-time quartiles (tokens per step / q3 below, / q1 above: the slower and faster quartile steps)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    names, tps, lo, hi, labels = _chart_data(rows)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, tps, color="#4c72b0", yerr=[lo, hi], capsize=4, ecolor="#333333")
    for i, (t, h, text) in enumerate(zip(tps, hi, labels)):      # the value, above the error bar's cap
        ax.annotate(text, (i, t + h), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("tokens / s (median step; bars: quartiles)")
    ax.set_ylim(0, max(t + h for t, h in zip(tps, hi)) * 1.18)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
