"""Time to a target validation perplexity, fused vs reference, on the shipped Tiny Shakespeare corpus.

    python bench/convergence.py                     # GPU: DiT small, B=32 x L=256, bf16; CPU: tiny preset, ~1 min
    python bench/convergence.py --target-ppl 400 --max-steps 3000 --eval-every 100

The same model (same initial weights) is trained twice, once per provider:
  fused      this library: fused linear-cross-entropy on masked rows (impl="fused"); on CUDA also the DiT
             block kernels (DIT's default use_kernels)
  reference  the published loss: (B, L, V) logits, SUBS parameterization, gather (impl="reference"), with
             the plain-PyTorch DiT blocks (use_kernels=False)

Speed must not change the math, so both providers see exactly the same inputs: the same batches (block
indices drawn up front from --seed) and the same masking draws, (t, sigma, weight, x_t) from the fused
masking kernel with a deterministic per-step seed (``MDLM.draw_fused(x0, seed=...)``), and dropout is 0.
The loss of those draws is then ``MDLM.subs_loss_given(..., impl=provider)``. Each training run is
therefore a deterministic function of the same inputs, and the two per-step loss curves differ only by
floating-point summation order (fp32 on CPU: ~1e-6 relative at first, growing slowly as training amplifies
it; bf16 on GPU: within bf16 noise).

Optimiser: the published recipe. AdamW (lr --lr, betas 0.9/0.999, eps 1e-8, weight decay 0), linear
warm-up over --warmup steps then constant (the published ``get_constant_schedule_with_warmup``: lr 0 at
step 0), gradient clipping at 1.0, bf16 autocast on CUDA; the published EMA only with --ema (validation
then uses the EMA weights).

Every --eval-every steps (and at step 0 and the last step) the validation NELBO is measured on a fixed set
of validation blocks with fixed draws (the same for both providers and every evaluation);
val PPL = exp(mean per-token NELBO). A provider stops at --max-steps or at the first evaluation with
val PPL <= --target-ppl. Time to target is training wall-clock (evaluations excluded), after an untimed
priming pass on a throw-away copy of the model that compiles / loads every kernel (default on CUDA;
--no-prime to charge it to the run).

Results: a table; JSON (environment, per-provider figures, both loss curves, their step-by-step difference)
and, if matplotlib is installed, a PNG of both curves under bench/results/ (--out, --tag).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, sync as _sync  # noqa: E402

import mdlm  # noqa: E402
from mdlm.train import EMA  # noqa: E402

PROVIDERS = ("fused", "reference")
_IMPL = {"fused": "fused", "reference": "reference"}
VOCAB = 50258  # GPT-2 + MASK
CORPUS = "tinyshakespeare/input.txt"


def step_seed(seed: int, step: int) -> int:
    """Masking-kernel seed of training step ``step``: the same for every provider."""
    return (seed * 1_000_003 + step + 1) % 2 ** 62


def val_seed(seed: int, chunk: int) -> int:
    """Masking-kernel seed of validation chunk ``chunk``: the same for every provider and evaluation."""
    return (seed * 1_000_003 + 2 ** 40 + chunk) % 2 ** 62


class DataUnavailable(RuntimeError):
    pass


def load_data(length: int, val_blocks: int):
    """(train blocks (N, L), validation blocks (M, L)) of Tiny Shakespeare in GPT-2 tokens, published wrap mode."""
    from mdlm.data import data_dir, load_corpus_tokens, wrap_chunks
    d = data_dir(required=False)
    if d is None or not (d / "corpora" / CORPUS).is_file():
        where = "no data folder found" if d is None else f"{d / 'corpora' / CORPUS} is missing"
        raise DataUnavailable(f"the Tiny Shakespeare corpus is needed ({where}): set MDLM_DATA_DIR to the folder "
                              "holding corpora/tinyshakespeare/input.txt and tokenizers/gpt2/ (default ../shared/data)")
    try:
        train = wrap_chunks(load_corpus_tokens(CORPUS, split="train"), length)
        val = wrap_chunks(load_corpus_tokens(CORPUS, split="val"), length)
    except (ImportError, FileNotFoundError) as e:
        raise DataUnavailable(str(e)) from e
    if val_blocks > 0:
        val = val[:val_blocks]
    return train, val


def lr_lambda(warmup: int):
    """Published constant schedule with linear warm-up: step / warmup before ``warmup``, then 1."""
    return lambda s: min(1.0, s / warmup) if warmup > 0 else 1.0


def build_model(cfg, provider: str, init_state: dict | None, device) -> mdlm.MDLM:
    torch.manual_seed(0)
    model = mdlm.MDLM(cfg, VOCAB)
    if init_state is not None:
        model.load_state_dict(init_state)
    if provider == "reference":
        model.backbone.use_kernels = False  # plain-PyTorch blocks everywhere
    model.validate_inputs = model.backbone.validate_inputs = False  # corpus ids are in range: no range-check sync
    return model.to(device)


def _autocast(device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


@torch.no_grad()
def evaluate(model, val_set, impl: str, device, bf16: bool) -> float:
    """Mean per-token validation NELBO over the fixed blocks and draws ``val_set`` [(x0, xt, sigma, weight)]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for x0, xt, sigma, weight in val_set:
        with _autocast(device, bf16):
            out = model.subs_loss_given(x0, xt, sigma, weight, impl=impl)
        total += float(out.nlls.float().sum())
        count += float(out.token_mask.sum())
    model.train(was_training)
    return total / count


def _ppl(nelbo: float) -> float:
    return math.exp(nelbo) if nelbo < 700 else float("inf")


def _prime(model, provider, args, device, train, batch_idx):
    """Two untimed steps on a throw-away copy: kernel compilation / loading is not charged to the timed run."""
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=args.lr)
    for i in range(2):
        x0 = train[batch_idx[i % len(batch_idx)]].to(device)
        _, sigma, weight, xt = m.draw_fused(x0, seed=step_seed(args.seed + 1, i))
        with _autocast(device, args.bf16):
            loss = m.subs_loss_given(x0, xt, sigma, weight, impl=_IMPL[provider]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    del m, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_provider(provider: str, cfg, args, device, init_state, train, val, batch_idx) -> dict:
    impl = _IMPL[provider]
    model = build_model(cfg, provider, init_state, device)
    model.train()
    # fixed validation draws, the same for every provider and evaluation (seeded masking kernel)
    val_set = []
    for c, i in enumerate(range(0, val.shape[0], args.batch)):
        x0 = val[i:i + args.batch].to(device)
        _, sigma, weight, xt = model.draw_fused(x0, seed=val_seed(args.seed, c))
        val_set.append((x0, xt, sigma, weight))
    if args.prime:
        _prime(model, provider, args, device, train, batch_idx)
    fused_opt = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            **({"fused": True} if fused_opt else {"foreach": True}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup))
    ema = EMA(model.parameters()) if args.ema else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def val_nelbo():
        if ema is None:
            return evaluate(model, val_set, impl, device, args.bf16)
        with ema.averaged():
            return evaluate(model, val_set, impl, device, args.bf16)

    losses, evals = [], []
    train_s, eval_s = 0.0, 0.0
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    nelbo = val_nelbo()
    eval_s += time.perf_counter() - t0
    evals.append({"step": 0, "train_s": 0.0, "val_nelbo": nelbo, "val_ppl": _ppl(nelbo)})
    reached = None
    tokens_per_step = args.batch * args.length
    for step in range(args.max_steps):
        x0 = train[batch_idx[step]].to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        _, sigma, weight, xt = model.draw_fused(x0, seed=step_seed(args.seed, step))
        with _autocast(device, args.bf16):
            loss = model.subs_loss_given(x0, xt, sigma, weight, impl=impl).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        losses.append(loss.detach().float().item())  # a host sync: the step is done
        _sync(device)
        train_s += time.perf_counter() - t0
        done = step + 1
        if done % args.eval_every == 0 or done == args.max_steps:
            t0 = time.perf_counter()
            nelbo = val_nelbo()
            eval_s += time.perf_counter() - t0
            evals.append({"step": done, "train_s": train_s, "val_nelbo": nelbo, "val_ppl": _ppl(nelbo)})
            if args.target_ppl and _ppl(nelbo) <= args.target_ppl:
                reached = evals[-1]
                break
    wall_s = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    block_kernels = model.backbone.kernels_enabled(train[:1].to(device))
    del model, opt, ema, val_set
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    steps = len(losses)
    return {"provider": provider, "impl": impl, "block_kernels": block_kernels, "steps": steps,
            "steps_to_target": reached["step"] if reached else None,
            "time_to_target_s": reached["train_s"] if reached else None,
            "final_val_ppl": evals[-1]["val_ppl"], "final_val_nelbo": evals[-1]["val_nelbo"],
            "best_val_ppl": min(e["val_ppl"] for e in evals),
            "train_s": train_s, "eval_s": eval_s, "wall_s": wall_s,
            "tokens_per_s": steps * tokens_per_step / train_s if train_s > 0 else None,
            "peak_mem_gib": peak, "train_loss": losses, "evals": evals}


def compare_curves(a: list[float], b: list[float], n: int) -> dict:
    """Step-by-step agreement of two loss curves over their first ``n`` common steps."""
    n = min(n, len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    rel = [d / max(abs(y), 1e-12) for d, y in zip(diffs, b[:n])]
    return {"steps_compared": n, "max_abs_diff": max(diffs) if diffs else None,
            "max_rel_diff": max(rel) if rel else None, "abs_diff_per_step": diffs}


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small" if cuda else "tiny", choices=mdlm.PRESETS)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.hidden_size=64 (repeatable; model.dropout is forced to 0)")
    p.add_argument("--batch", type=int, default=32 if cuda else 8)
    p.add_argument("--length", type=int, default=256 if cuda else 64, help="block length (published wrap mode)")
    p.add_argument("--max-steps", type=int, default=2000 if cuda else 30)
    p.add_argument("--eval-every", type=int, default=100 if cuda else 10)
    p.add_argument("--target-ppl", type=float, default=400.0 if cuda else 25000.0,
                   help="stop at the first evaluation with val PPL <= this (0: never stop early). The GPU default "
                        "is a first guess, not yet calibrated on a GPU run")
    p.add_argument("--val-blocks", type=int, default=128 if cuda else 16,
                   help="validation blocks (fixed; 0 = the whole validation split)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100 if cuda else 5, help="linear warm-up steps (published: 2500)")
    p.add_argument("--ema", action="store_true", help="keep the published EMA and validate with its weights")
    p.add_argument("--compare-steps", type=int, default=50, help="N: loss curves are compared over the first N steps")
    p.add_argument("--providers", default="fused,reference", help=f"comma-separated subset of {PROVIDERS}")
    p.add_argument("--seed", type=int, default=0, help="batches and masking draws")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 on GPU (CPU is always fp32)")
    p.add_argument("--prime", action=argparse.BooleanOptionalAction, default=None,
                   help="prime the kernels (compile / load) with two steps on a throw-away copy before the timed "
                        "run (default: on CUDA only; the CPU paths compile nothing)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and PNG")
    p.add_argument("--tag", default=None, help="file name stem (default: convergence_<device>_<preset>)")
    args = p.parse_args(argv)
    if args.prime is None:
        args.prime = args.device.startswith("cuda")
    args.providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    unknown = [s for s in args.providers if s not in PROVIDERS]
    if unknown or not args.providers:
        p.error(f"unknown provider(s) {unknown}; choose from {PROVIDERS}")
    if min(args.batch, args.max_steps, args.eval_every, args.compare_steps) < 1 or args.length < 3:
        p.error("--batch, --max-steps, --eval-every and --compare-steps must be >= 1, --length >= 3")
    if args.warmup < 0 or args.target_ppl < 0 or args.val_blocks < 0:
        p.error("--warmup, --target-ppl and --val-blocks must be >= 0")
    return args


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    overrides = {"model.length": args.length}
    for kv in args.override:
        k, _, v = kv.partition("=")
        try:
            overrides[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k.strip()] = v
    overrides["model.dropout"] = 0.0  # both runs must be deterministic functions of the same inputs
    cfg = mdlm.preset(args.preset, **overrides)
    try:
        train, val = load_data(args.length, args.val_blocks)
    except DataUnavailable as e:
        print(f"convergence: {e}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    batch_idx = torch.randint(0, train.shape[0], (args.max_steps, args.batch), generator=g)
    torch.manual_seed(0)
    init_state = copy.deepcopy(mdlm.MDLM(cfg, VOCAB).state_dict())  # the one initialisation both runs start from
    env = environment(device)
    dtype = "bf16 autocast" if (device.type == "cuda" and args.bf16) else "fp32"
    n_params = sum(v.numel() for v in init_state.values())
    print(f"# MDLM convergence on Tiny Shakespeare (GPT-2 tokens, wrap): preset {args.preset} "
          f"({n_params / 1e6:.1f}M params), B={args.batch}, L={args.length}, {dtype} on "
          f"{env.get('gpu', env.get('cpu'))} ({device.type}); torch {env['torch']}, git {env['git_revision']}")
    print(f"# {train.shape[0]} train / {val.shape[0]} val blocks; lr {args.lr}, warm-up {args.warmup}, "
          f"max {args.max_steps} steps, eval every {args.eval_every}, target val PPL "
          f"{args.target_ppl if args.target_ppl else 'none'}")
    rows = []
    for prov in args.providers:
        try:
            r = run_provider(prov, cfg, args, device, init_state, train, val, batch_idx)
        except Exception as e:  # one provider failing must not hide the other
            print(f"  {prov}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                  file=sys.stderr)
            rows.append({"provider": prov, "error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        rows.append(r)
        print(f"  {prov}: " + ", ".join(f"step {e['step']} PPL {e['val_ppl']:.1f}" for e in r["evals"]))
    ok = {r["provider"]: r for r in rows if "error" not in r}
    hdr = (f"{'provider':<10} {'steps':>6} {'to target':>9} {'time to target s':>17} {'final val PPL':>14} "
           f"{'tokens/s':>11} {'train s':>8} {'last loss':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['provider']:<10} failed: {r['error'].splitlines()[0][:80]}")
            continue
        print(f"{r['provider']:<10} {r['steps']:>6} {_fmt(r['steps_to_target'], 'd'):>9} "
              f"{_fmt(r['time_to_target_s'], '.2f'):>17} {r['final_val_ppl']:>14.2f} {r['tokens_per_s']:>11,.0f} "
              f"{r['train_s']:>8.2f} {r['train_loss'][-1]:>10.4f}")
    agreement = None
    if "fused" in ok and "reference" in ok:
        agreement = compare_curves(ok["fused"]["train_loss"], ok["reference"]["train_loss"], args.compare_steps)
        f, ref = ok["fused"], ok["reference"]
        print(f"# loss curves, fused vs reference, first {agreement['steps_compared']} steps: max |diff| "
              f"{agreement['max_abs_diff']:.3e} (max relative {agreement['max_rel_diff']:.3e})")
        if f["time_to_target_s"] is not None and ref["time_to_target_s"] is not None:
            print(f"# time to target: fused {f['time_to_target_s']:.2f} s = "
                  f"{100 * f['time_to_target_s'] / ref['time_to_target_s']:.0f}% of reference's "
                  f"{ref['time_to_target_s']:.2f} s")
        elif args.target_ppl:
            print("# the target was not reached by both providers: raise --max-steps or the --target-ppl")
    try:
        import mdlm_kernels
        from mdlm_kernels.backend import last_used
        backends, avail = dict(last_used), mdlm_kernels.available()
    except Exception as e:
        backends, avail = {}, {"error": str(e)}
    if backends:
        print("# kernel backends used: " + ", ".join(f"{k}={v}" for k, v in sorted(backends.items())))
    if device.type != "cuda":
        print("# CPU figures (no GPU here): they show the pipeline and the agreement of the curves, not GPU speed.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"convergence_{device.type}_{args.preset}"
    result = {"benchmark": "convergence", "corpus": CORPUS, "tokenizer": "gpt2", "preset": args.preset,
              "config_overrides": overrides, "n_params": n_params, "batch": args.batch, "length": args.length,
              "vocab": VOCAB, "dtype": dtype, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
              "max_steps": args.max_steps, "eval_every": args.eval_every, "target_ppl": args.target_ppl or None,
              "val_blocks": int(val.shape[0]), "train_blocks": int(train.shape[0]), "seed": args.seed,
              "primed": args.prime, "environment": env, "kernel_backends": backends, "mdlm_kernels": avail,
              "curve_agreement": agreement, "results": rows}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    _plot(list(ok.values()), out / f"{stem}.png",
          f"{args.preset} B={args.batch} L={args.length} on {env.get('gpu', device.type)}")
    print(f"# wrote {out / (stem + '.json')}")
    return 0 if len(ok) == len(rows) else 1


def _plot(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not rows:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for r, style in zip(rows, ("-", "--")):
        ax1.plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], style, label=r["provider"], linewidth=1)
        ax2.plot([e["step"] for e in r["evals"]], [e["val_ppl"] for e in r["evals"]], style + "o",
                 label=r["provider"], markersize=3)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (NELBO / token)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation PPL")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
