"""The optimizer step alone (gradient clip + AdamW + EMA) on a model's parameters: the published sequence vs
this trainer's step, median ms, GB/s against the bytes the step must move, host reads and launches counted.

    python bench/bench_optimizer.py                        # CUDA: the small preset's 169.6M parameters
    python bench/bench_optimizer.py --preset tiny          # the CPU default (13.4M parameters at V = 50258)

Variants (all on the same parameters and gradients, fp32, clip at 1.0, EMA 0.9999 with the published warm-up):
- ``published_foreach`` / ``published_fused``: ``torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)``,
  ``torch.optim.AdamW`` (foreach / fused) and the published EMA loop (per tensor: ``s.sub_((1-d) * (s - p))``).
  It has no non-finite guard.
- ``trainer_before``: the previous ``mdlm.train`` step: fp64 norm, clip factor multiplied into the gradients,
  the host read of (loss, norm, stop) BEFORE the optimizer, then AdamW (fused on CUDA, foreach on CPU) and one
  ``_foreach_lerp_`` EMA.
- ``trainer``: this trainer's step, ``mdlm.train.optimizer_step_on_device`` (clip folded into fused AdamW's
  grad_scale, the skip into found_inf, the EMA weight on the device) followed by its one host read.

Each timed call is one optimizer step that ends with the device idle (the trainer variants end with their
read; the published sequence, which reads nothing, with a synchronize): median wall time. Bytes the step must
move: 11 x 4 bytes per parameter (the norm reads g; AdamW reads p, g, m, v and writes p, m, v; the EMA reads
shadow, p and writes shadow); GB/s = those bytes / time, and the time floor = those bytes / the copy bandwidth
measured in the same run. ``passes`` is the number of 4-byte-per-parameter passes each variant's kernels make
(a prediction from the kernels' source, not a measurement). Launches: dispatched ops per step counted by
``mdlm.step_budget.StepBudget`` (a foreach op counts once), and on CUDA the device kernels and copies seen
by torch.profiler. ``max_abs_diff_vs_reference``: parameters and EMA after the run vs ``published_fused``, a
sanity check; most of it is the published clip's fp32 norm (~1e-4 relative summation error on the 6-38M-element
embedding / LM-head gradients) against the trainers' fp64 norm, not the trainer's folded clip (<= 1 ulp of the
gradient, tests/test_optimizer_step.py). Writes JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, copy_bandwidth, environment, sync as _sync  # noqa: E402

import mdlm  # noqa: E402
from mdlm.config import apply_overrides  # noqa: E402
from mdlm.step_budget import StepBudget  # noqa: E402
from mdlm.train import EMA, DeviceAdamW, global_grad_norm, optimizer_step_on_device  # noqa: E402

VARIANTS = ("published_foreach", "published_fused", "trainer_before", "trainer")
MUST_MOVE_PASSES = 11
# 4-byte-per-parameter passes of each variant's kernels (prediction from the source, see the module doc):
# norm read 1; clip multiply r+w 2; foreach AdamW 18 (lerp m 3, mul v 2, addcmul v 3, sqrt 2, div 2, add eps
# 2, addcdiv p 4); fused AdamW 7 (+1 when it writes g / s back); published EMA loop 8 (s - p 3, * (1-d) 2,
# sub_ 3); one lerp 3
PASSES = {"published_foreach": 1 + 2 + 18 + 8, "published_fused": 1 + 2 + 7 + 8,
          "trainer_before": {"cuda": 1 + 2 + 7 + 3, "cpu": 1 + 2 + 18 + 3}, "trainer": 1 + 8 + 3}


def make_variant(name: str, shapes, masters, grads, device, max_norm: float = 1.0, lr: float = 3e-4):
    """(step function, params, ema) of one variant on fresh copies of ``masters`` / ``grads``."""
    params = [torch.nn.Parameter(m.clone()) for m in masters]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if name.startswith("published"):
        opt = torch.optim.AdamW(params, **kw, **({"fused": True} if name.endswith("fused") else {"foreach": True}))
        shadow = [p.detach().clone() for p in params]
        n = [0]

        def step():
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            opt.step()
            n[0] += 1                                        # the published ExponentialMovingAverage.update
            decay = min(0.9999, (1 + n[0]) / (10 + n[0]))
            with torch.no_grad():
                for s, p in zip(shadow, params):
                    s.sub_((1.0 - decay) * (s - p))
            _sync(device)
        return step, params, shadow
    ema = EMA(params, 0.9999)
    if name == "trainer_before":
        opt = torch.optim.AdamW(params, **kw, **({"fused": True} if device.type == "cuda" else {"foreach": True}))

        def step():
            with torch.no_grad():
                local = [p.grad for p in params]
                norm = torch.stack(torch._foreach_norm(local, 2, dtype=torch.float64)).square().sum().sqrt()
                coef = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
                torch._foreach_mul_(local, coef)
                flags = torch.stack([norm.new_zeros(()), norm, torch.tensor(0.0, dtype=torch.float64,
                                                                             device=norm.device)])
                _, gnorm, _ = flags.tolist()                 # the host read before the optimizer
                if gnorm == gnorm and abs(gnorm) != float("inf"):
                    opt.step()
                    ema.update()
        return step, params, ema.shadow
    if name == "trainer":
        opt = DeviceAdamW(params, **kw)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        stop = torch.zeros((), dtype=torch.float64, device=device)

        def step():
            norm = global_grad_norm(params)
            flags = torch.stack([loss, norm, stop])
            optimizer_step_on_device(opt, ema, norm, flags[:2], max_norm)
            _, gnorm, _ = flags.tolist()                     # the one host read, after everything is enqueued
            if gnorm == gnorm and abs(gnorm) != float("inf"):
                ema.num_updates += 1
        return step, params, ema.shadow
    raise ValueError(f"unknown variant {name!r}; one of {', '.join(VARIANTS)}")


def count_step(step, device) -> dict:
    """Host reads and dispatched ops of one step (StepBudget); on CUDA also the profiler's device events."""
    budget = StepBudget()
    with budget:
        step()
    out = {"host_reads": budget.host_reads, "dispatched_ops": budget.launches,
           "host_reads_by_op": dict(budget.read_ops)}
    if device.type == "cuda":
        try:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
            n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            out["cuda_kernels_and_copies"] = n or None
            if not n:
                out["profiler_error"] = "the profiler saw no device events (CUPTI unavailable?)"
        except Exception as e:  # no CUPTI: say so
            out["cuda_kernels_and_copies"] = None
            out["profiler_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small" if cuda else "tiny", choices=mdlm.PRESETS,
                   help="model whose parameters are stepped (default: small on CUDA, tiny on CPU)")
    p.add_argument("--vocab", type=int, default=50258, help="vocabulary size of the model (default 50258)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--iters", type=int, default=20 if cuda else 5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1, help="untimed steps first (state allocation)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default=None, help="output file stem (default optimizer_<device>)")
    p.add_argument("overrides", nargs="*", help="model config overrides key=value, e.g. model.hidden_size=32")
    args = p.parse_args(argv)
    variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        p.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    cfg = mdlm.preset(args.preset)
    apply_overrides(cfg, args.overrides)
    with torch.device("meta"):
        shapes = [tuple(q.shape) for q in mdlm.MDLM(cfg, args.vocab).parameters() if q.requires_grad]
    n_params = sum(int(torch.Size(s).numel()) for s in shapes)
    g = torch.Generator(device="cpu").manual_seed(0)
    masters = [torch.randn(s, generator=g).mul_(0.02).to(device) for s in shapes]
    # gradients of an early step: global norm ~ 1e-3 sqrt(N) >> 1, so the first step clips (the later ones
    # find the clipped gradients, norm ~1: the same kernels run either way)
    grads = [torch.randn(s, generator=g).mul_(1e-3).to(device) for s in shapes]

    env = environment(device)
    bw = copy_bandwidth(device, 2 ** 30 if device.type == "cuda" else 2 ** 26)
    must_bytes = MUST_MOVE_PASSES * 4 * n_params
    floor_ms = must_bytes / bw * 1e3
    print(f"# optimizer step on {env.get('gpu', env.get('cpu'))}: {args.preset} preset, {len(shapes)} tensors, "
          f"{n_params / 1e6:.1f}M fp32 parameters; copy bandwidth {bw / 1e9:.0f} GB/s; must move "
          f"{must_bytes / 1e9:.2f} GB -> floor {floor_ms:.3f} ms; git {env['git_revision']}")
    rows, finals = [], {}
    for name in variants:
        step, params, shadow = make_variant(name, shapes, masters, grads, device)
        for _ in range(args.warmup):
            step()
        _sync(device)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        counts = count_step(step, device)
        passes = PASSES[name] if not isinstance(PASSES[name], dict) else PASSES[name][device.type]
        finals[name] = [q.detach().clone() for q in params] + [s.detach().clone() for s in shadow]
        rows.append({"variant": name, "ms": med * 1e3, "GBps": must_bytes / med / 1e9,
                     "fraction_of_floor": floor_ms / (med * 1e3), "predicted_passes": passes,
                     "predicted_GB": passes * 4 * n_params / 1e9, **counts})
        del step, params, shadow
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = finals.get("published_fused") or finals.get(variants[0])
    for r in rows:     # every variant ran the same steps on the same inputs: they agree up to rounding
        r["max_abs_diff_vs_reference"] = max(float((a - b).abs().max()) for a, b in zip(finals[r["variant"]], ref))
    print(f"{'variant':<18} {'ms':>8} {'GB/s':>8} {'of floor':>8} {'passes':>6} {'reads':>5} {'ops':>5} "
          f"{'kernels':>7}  max|diff|")
    for r in rows:
        k = r.get("cuda_kernels_and_copies")
        print(f"{r['variant']:<18} {r['ms']:>8.3f} {r['GBps']:>8.1f} {r['fraction_of_floor'] * 100:>7.1f}% "
              f"{r['predicted_passes']:>6} {r['host_reads']:>5} {r['dispatched_ops']:>5} "
              f"{'-' if k is None else k:>7}  {r['max_abs_diff_vs_reference']:.2e}")
    if device.type != "cuda":
        print("# CPU figures: they show the benchmark runs, not GPU speed.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"optimizer_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps({
        "benchmark": "optimizer_step", "preset": args.preset, "vocab": args.vocab, "overrides": args.overrides,
        "n_tensors": len(shapes), "n_params": n_params, "iters": args.iters, "warmup": args.warmup,
        "copy_bandwidth_Bps": bw, "must_move_bytes": must_bytes, "must_move_passes": MUST_MOVE_PASSES,
        "floor_ms": floor_ms, "predicted_passes_note": "predicted from the kernels' source, not measured",
        "environment": env, "results": rows}, indent=2))
    print(f"# wrote {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
