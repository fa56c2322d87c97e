"""The DiT block kernels: each memory-bound kernel against the copy bandwidth measured in the same run, and
DiT forward + backward (loss excluded) with the kernels, the reference math, and torch.compile of the
reference, side by side.

    python bench/bench_blocks.py                       # GPU: B=64, L=1024, d=768, bf16
    python bench/bench_blocks.py --batch 1 --length 64 --preset tiny    # CPU smoke run

Kernel rows count each input read once and each output written once (bytes / time). The model rows
report the median step time of forward + backward of the hidden states (sum of the LM head's input).
Writes JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
try:
    import mdlm
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))
    import mdlm
import mdlm_kernels as mk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, environment, timed  # noqa: E402


def kernel_rows(B, L, d, H, dtype, device, iters):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g).to(device=device, dtype=dt)  # noqa: E731
    x = rnd(B, L, d, dt=torch.float32)                # the fp32 residual stream
    h = rnd(B, L, d)
    w = rnd(d, dt=torch.float32)
    mod = rnd(B, 6 * d)
    qkv = rnd(B, L, 3, H, d // H)
    cos, sin = mk.rotary_tables(1.0 / (10000 ** (torch.arange(0, d // H, 2).float() / (d // H))), L, device=device)
    u = rnd(B, L, 4 * d)
    bias = rnd(4 * d)
    es = torch.empty((), dtype=dtype).element_size()
    n = B * L * d
    cases = {
        # name: (forward fn, bytes moved: inputs read once + outputs written once)
        "adaln_modulate": (lambda: mk.adaln_modulate(x, w, mod, 0, 1, dtype), n * 4 + n * es),
        "gated_residual_modulate": (lambda: mk.gated_residual_modulate(x, h, mod, 2, w, 3, 4, p=0.1, seed=1,
                                                                       out_dtype=dtype),
                                    n * 4 + n * es + n * 4 + n * es),
        "rotary_qkv": (lambda: mk.rotary_qkv(qkv, cos, sin), 2 * 3 * n * es),
        "bias_gelu": (lambda: mk.bias_gelu(u, bias), 2 * 4 * n * es),
    }
    rows = []
    for name, (fn, nbytes) in cases.items():
        t = timed(fn, device, iters)
        rows.append({"kernel": name, "ms": t * 1e3, "GBps": nbytes / t / 1e9, "backend": mk.backend.last_used.get(name)})
    # forward + backward of the two adaLN kernels (gradients w.r.t. every input)
    xg, hg, wg, mg = (x.clone().requires_grad_(), h.clone().requires_grad_(), w.clone().requires_grad_(),
                      mod.clone().requires_grad_())
    fb = {
        "adaln_modulate fwd+bwd": lambda: mk.adaln_modulate(xg, wg, mg, 0, 1, dtype).float().sum().backward(),
        "gated_residual_modulate fwd+bwd": lambda: sum(
            o.float().sum() for o in mk.gated_residual_modulate(xg, hg, mg, 2, wg, 3, 4, p=0.1, seed=1,
                                                                out_dtype=dtype)).backward(),
    }
    for name, fn in fb.items():
        t = timed(fn, device, iters)
        rows.append({"kernel": name, "ms": t * 1e3, "GBps": None, "backend": mk.backend.last_used.get(
            name.split()[0] + "_backward")})
    return rows


def model_rows(preset, B, L, device, providers, iters):
    cfg = mdlm.preset(preset)
    cfg.model.length = L
    torch.manual_seed(0)
    model = mdlm.DIT(cfg, 50258).to(device)
    model.validate_inputs = False
    x = torch.randint(0, 50257, (B, L), device=device)
    sigma = torch.zeros(B, device=device)
    rows = []
    for name in providers:
        if name == "kernels":
            model.use_kernels = True
            fn = lambda: model.hidden_states(x, sigma)[0]  # noqa: E731
        elif name == "reference":
            model.use_kernels = False
            fn = lambda: model.hidden_states(x, sigma)[0]  # noqa: E731
        else:  # torch.compile of the reference blocks
            model.use_kernels = False
            fn = torch.compile(lambda: model.hidden_states(x, sigma)[0])

        def step(fn=fn):
            model.zero_grad(set_to_none=True)
            fn().float().sum().backward()
        try:
            t = timed(step, device, iters, warmup=3)
        except Exception as e:
            rows.append({"provider": name, "error": f"{type(e).__name__}: {e}"[:1000]})
            continue
        rows.append({"provider": name, "ms": t * 1e3, "tokens_per_s": B * L / t})
    return rows


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small" if cuda else "tiny", choices=mdlm.PRESETS)
    p.add_argument("--batch", type=int, default=64 if cuda else 1, help="model batch")
    p.add_argument("--kernel-batch", type=int, default=64 if cuda else 1)
    p.add_argument("--length", type=int, default=1024 if cuda else 64)
    p.add_argument("--providers", default="kernels,reference,compiled" if cuda else "kernels,reference")
    p.add_argument("--iters", type=int, default=20 if cuda else 3)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = mdlm.preset(args.preset)
    d, H = cfg.model.hidden_size, cfg.model.n_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    bw = copy_bandwidth(device, 2 ** 30 if device.type == "cuda" else 2 ** 26)
    print(f"# DiT block kernels on {env.get('gpu', env.get('cpu'))}: copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"git {env['git_revision']}")
    krows = kernel_rows(args.kernel_batch, args.length, d, H, dtype, device, args.iters)
    print(f"{'kernel (forward)':<34} {'ms':>8} {'GB/s':>8} {'of copy':>8}  backend")
    for r in krows:
        if r["GBps"] is None:
            print(f"{r['kernel']:<34} {r['ms']:>8.3f} {'':>8} {'':>8}  {r['backend']}")
            continue
        r["fraction_of_copy"] = r["GBps"] * 1e9 / bw
        print(f"{r['kernel']:<34} {r['ms']:>8.3f} {r['GBps']:>8.0f} {r['fraction_of_copy'] * 100:>7.1f}%  {r['backend']}")
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    mrows = model_rows(args.preset, args.batch, args.length, device, providers, max(3, args.iters // 2))
    base = next((r for r in mrows if r.get("provider") == "reference" and "ms" in r), None)
    print(f"{'DiT fwd+bwd (no loss)':<26} {'ms':>8} {'tokens/s':>11} {'vs ref':>7}")
    for r in mrows:
        if "error" in r:
            print(f"{r['provider']:<26} failed: {r['error'].splitlines()[0][:80]}")
            continue
        speed = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
        print(f"{r['provider']:<26} {r['ms']:>8.1f} {r['tokens_per_s']:>11,.0f} {speed:>7}")
    if device.type != "cuda":
        print("# CPU figures: they show the benchmark runs, not GPU speed.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"blocks_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps({
        "benchmark": "dit_blocks", "preset": args.preset, "batch": args.batch, "kernel_batch": args.kernel_batch,
        "length": args.length, "dtype": str(dtype), "copy_bandwidth_Bps": bw, "environment": env,
        "attention_backend": mk.backend.last_used.get("attention"), "kernels": krows, "model": mrows}, indent=2))
    print(f"# wrote {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
