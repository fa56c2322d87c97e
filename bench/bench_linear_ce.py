"""The SUBS loss stage alone: LM head + SUBS parameterization + NELBO, forward + backward, from given
final hidden states (B, L, d), for each provider, side by side in one process.

    python bench/bench_linear_ce.py                          # GPU: B=64, L=1024, d=768, V=50258, bf16
    python bench/bench_linear_ce.py --batch 2 --length 64    # CPU: small shapes, fp32

Providers (all compute the same loss and gradients for hidden, weight and bias):
  reference        the published tail: (B, L, V) logits, MASK logit -1e6, log-softmax, -1e6/0 scatter for
                   unmasked rows, gather, x weight
  masked           masked rows gathered, MASK column dropped, F.linear + F.cross_entropy (eager)
  masked_compiled  the same under torch.compile (the strongest plain-PyTorch path)
  fused            mdlm_kernels.subs_linear_cross_entropy on the masked rows

Per provider: median and IQR of the step time, extra peak memory beyond the inputs (GPU), and the GEMM
FLOP rate on the masked rows (3 GEMMs of 2 N d V FLOPs) against the bf16 matmul rate measured in the
same run. Writes JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
try:
    import mdlm
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))
    import mdlm
from mdlm.diffusion import subs_nelbo_masked_rows, subs_parameterization  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, matmul_ceiling, sync as _sync  # noqa: E402

PROVIDERS = ("reference", "masked", "masked_compiled", "fused")


def make_inputs(B, L, d, V, dtype, device, mask_rate, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mask_index = V - 1
    hidden = torch.randn(B, L, d, generator=g).to(device=device, dtype=dtype)
    W = (torch.randn(V, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(device=device, dtype=dtype)
    x0 = torch.randint(0, V - 1, (B, L), generator=g).to(device)
    masked = (torch.rand(B, L, generator=g) < mask_rate).to(device)
    xt = torch.where(masked, mask_index, x0)
    t = (torch.rand(B, generator=g) * 0.999 + 1e-3).to(device)
    return hidden, W, b, x0, xt, 1 / t, mask_index


def loss_fns(mask_index):
    def reference(hidden, W, b, x0, xt, w):
        logits = torch.nn.functional.linear(hidden, W, b)
        logp = subs_parameterization(logits, xt, mask_index)
        return (-logp.gather(-1, x0[..., None])[..., 0] * w[:, None]).sum()

    def masked_rows(hidden, W, b, x0, xt, w):
        m = xt == mask_index
        wr = w[:, None].expand_as(x0)[m]
        return subs_nelbo_masked_rows(hidden[m], W, b, x0[m], wr, mask_index).sum()

    def fused(hidden, W, b, x0, xt, w):
        import mdlm_kernels as mk
        m = xt == mask_index
        wr = w[:, None].expand_as(x0)[m]
        return mk.subs_linear_cross_entropy(hidden[m], W, b, x0[m], wr, mask_index, validate=False).loss

    return {"reference": reference, "masked": masked_rows, "masked_compiled": torch.compile(masked_rows),
            "fused": fused}


def bench(fn, inputs, device, warmup, iters):
    hidden, W, b, x0, xt, w = inputs
    params = [hidden.detach().clone().requires_grad_(), W.detach().clone().requires_grad_(),
              b.detach().clone().requires_grad_()]
    for _ in range(warmup):
        fn(*params, x0, xt, w).backward()
    _sync(device)
    for p in params:
        p.grad = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(iters):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        loss = fn(*params, x0, xt, w)
        loss.backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    extra = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30 if device.type == "cuda" else None
    return times, extra, loss.detach().float().item(), [p.grad for p in params]


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64 if cuda else 2)
    p.add_argument("--length", type=int, default=1024 if cuda else 64)
    p.add_argument("--hidden", type=int, default=768 if cuda else 64)
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--mask-rate", type=float, default=0.5)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=("bfloat16", "float32"))
    p.add_argument("--providers", default=",".join(PROVIDERS) if cuda else "reference,masked,fused")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    bad = [s for s in providers if s not in PROVIDERS]
    if bad:
        p.error(f"unknown provider(s) {bad}; choose from {PROVIDERS}")

    inputs = make_inputs(args.batch, args.length, args.hidden, args.vocab, dtype, device, args.mask_rate)
    *tensors, mask_index = inputs
    n_masked = int((tensors[4] == mask_index).sum())
    gemm_flops = 3 * 2 * n_masked * args.hidden * args.vocab
    ceiling = matmul_ceiling(device, dtype, 8192 if device.type == "cuda" else 1024)
    env = environment(device)
    fns = loss_fns(mask_index)
    print(f"# SUBS loss stage fwd+bwd: B={args.batch} L={args.length} d={args.hidden} V={args.vocab} {args.dtype}, "
          f"{n_masked} masked rows, on {env.get('gpu', env.get('cpu'))}; {dtype} matmul ceiling "
          f"{ceiling / 1e12:.2f} TFLOP/s; git {env['git_revision']}")
    rows, ref_grads, ref_loss = [], None, None
    for name in providers:
        try:
            times, extra, loss, grads = bench(fns[name], tensors, device, args.warmup, args.iters)
        except Exception as e:
            print(f"  {name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            rows.append({"provider": name, "error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        med = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [med] * 3
        r = {"provider": name, "median_ms": med * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
             "extra_peak_gib": extra, "loss": loss, "masked_gemm_tflops": gemm_flops / med / 1e12,
             "fraction_of_matmul_ceiling": gemm_flops / med / ceiling}
        if ref_grads is None:
            ref_grads, ref_loss = grads, loss
        else:  # every provider must compute the same thing: report its deviation from the first one
            r["loss_rel_diff_vs_first"] = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
            r["grad_max_rel_diff_vs_first"] = max(
                float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                for a, b in zip(grads, ref_grads))
        rows.append(r)
        del grads
    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["provider"] == "reference"), None)
    print(f"{'provider':<16} {'ms (median)':>12} {'IQR ms':>15} {'vs ref':>7} {'GEMM TFLOP/s':>13} {'of ceiling':>10} "
          f"{'extra GiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['provider']:<16} failed: {r['error'].splitlines()[0][:80]}")
            continue
        speed = f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "-"
        extra = f"{r['extra_peak_gib']:.2f}" if r["extra_peak_gib"] is not None else "n/a"
        print(f"{r['provider']:<16} {r['median_ms']:>12.2f} {r['q1_ms']:>7.2f}-{r['q3_ms']:<7.2f} {speed:>7} "
              f"{r['masked_gemm_tflops']:>13.2f} {r['fraction_of_matmul_ceiling'] * 100:>9.1f}% {extra:>10}")
    if device.type != "cuda":
        print("# CPU figures: they show the benchmark runs, not GPU speed.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"linear_ce_{device.type}"
    try:
        from mdlm_kernels.backend import last_used
        backends = dict(last_used)
    except Exception:
        backends = {}
    (out / f"{stem}.json").write_text(json.dumps({
        "benchmark": "subs_loss_stage", "batch": args.batch, "length": args.length, "hidden": args.hidden,
        "vocab": args.vocab, "dtype": args.dtype, "masked_rows": n_masked, "matmul_ceiling_flops": ceiling,
        "environment": env, "kernel_backends": backends, "results": rows}, indent=2))
    print(f"# wrote {out / (stem + '.json')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
