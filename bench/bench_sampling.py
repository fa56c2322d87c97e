"""Sampling: the categorical step alone, and end-to-end generation, fused vs the published reference.

    python bench/bench_sampling.py                       # GPU: B=16, L=1024, V=50258, DiT small
    python bench/bench_sampling.py --batch 2 --length 64 --preset tiny --steps 16   # CPU smoke run
    python bench/bench_sampling.py --checkpoint runs/quick --batch 4 --steps 64 --gen-ppl gpt2   # a trained model

1. Step arithmetic after the model forward (half the positions masked): the published ddpm_cache
   arithmetic on full (B, L, V) log-probabilities (exp, q_xs, fp32 Gumbel noise over every position,
   argmax) vs ``mdlm_kernels.sample_step`` on the masked rows' logits (one read of those rows). Reports ms
   and the fused kernel's read bandwidth against the copy bandwidth measured in the same run.
2. Generation of B x L tokens from scratch with ``--steps`` ddpm_cache steps: reference sampler
   (``mdlm.sampling.sample``) vs fused (``mdlm.fast_sample``), plus the first-hitting sampler (fused), each
   fused sampler eagerly and (CUDA) replayed from CUDA graphs (``cuda_graph=True``; fused ddpm runs the same
   loop as fused ddpm_cache): wall time, generated tokens/s and the ratio to the reference's, model calls,
   graph replays, and sample quality side by side: the unigram entropy of each provider's samples
   (``mdlm.eval.unigram_entropy``) and, with ``--gen-ppl EVALUATOR`` and a tokenizer, their generative
   perplexity (``mdlm.eval.generative_perplexity``; skipped with the reason when the evaluator cannot be
   loaded, e.g. offline). The model is randomly initialised (speed; the entropies still compare the two
   samplers' laws), or a trained one with ``--checkpoint`` (anything ``mdlm sample --checkpoint`` takes).
3. Host time per step of the fused samplers, eager and graphed: a second run with ``timing=True``, which
   synchronises before every model call of the loop and measures with time.perf_counter the CPU time spent
   issuing it (launches, Python, graph replay) and with CUDA events its device time (from an event recorded
   before the issue to the end of its work; on the CPU nothing is asynchronous and the two are equal).
   Medians over the loop's model calls (the warm-up and capture calls of a graph are in the means).
Writes JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import json
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
import mdlm_kernels as mk  # noqa: E402
from mdlm.diffusion import subs_parameterization  # noqa: E402
from mdlm.sampling import sample_categorical  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, environment, timed  # noqa: E402


def step_rows(B, L, V, device, iters):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    M = V - 1
    logits = (torch.randn(B, L, V, generator=g) * 3).to(device=device, dtype=dtype)
    x = torch.randint(0, V - 1, (B, L), generator=g).to(device)
    masked = (torch.rand(B, L, generator=g) < 0.5).to(device)
    x = torch.where(masked, M, x)
    t, dt = 0.5, 1e-3

    def reference():  # published _ddpm_caching_update after the forward: SUBS log-probs -> exp -> q_xs -> draw
        p_x0 = subs_parameterization(logits, x, M).exp()
        q_xs = p_x0 * dt
        q_xs[:, :, M] = t - dt
        _x = sample_categorical(q_xs)
        copy = (x != M).to(x.dtype)
        return copy * x + (1 - copy) * _x

    idx = masked.reshape(-1).nonzero().squeeze(1)
    rows = logits.reshape(B * L, V).index_select(0, idx)  # the LM head applied to masked rows only
    n = idx.numel()
    tt = torch.full((n,), t, device=device)
    ss = torch.full((n,), t - dt, device=device)

    def fused():
        out = mk.sample_step(rows, tt, ss, 1234, 0, mask_index=M, row_ids=idx, validate=False,
                             entropy=False)   # the samplers' setting
        return x.view(-1).index_copy(0, idx, out.tokens)

    res = []
    for name, fn in (("reference", reference), ("fused", fused)):
        ms = timed(fn, device, iters) * 1e3
        res.append({"provider": name, "ms": ms})
    res[-1]["read_GBps"] = rows.numel() * rows.element_size() / (res[-1]["ms"] / 1e3) / 1e9
    res[-1]["backend"] = mk.backend.last_used.get("sample_step")
    return res, n


def _median(v):
    v = sorted(v)
    n = len(v)
    return None if n == 0 else (v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2]))


def _evaluator(evaluator, decode, device):
    """(loaded evaluator or None, reason gen PPL is skipped or None) for ``--gen-ppl``: loaded once for all rows."""
    if not evaluator:
        return None, None
    if decode is None:
        return None, "no tokenizer to decode the samples into text"
    if not isinstance(evaluator, str):
        return evaluator, None
    from mdlm.eval import load_evaluator
    try:
        return load_evaluator(evaluator, device), None
    except (RuntimeError, OSError, ImportError) as e:   # transformers or the weights absent (offline), ...
        return None, f"{type(e).__name__}: {e}"


def _quality(ids, decode, evaluator, skipped, device) -> dict:
    """Sample quality of one provider's (B, L) ids: unigram entropy, and gen PPL under a loaded ``evaluator``
    (``_evaluator``), else the reason it is ``skipped`` (None: not asked)."""
    from mdlm.eval import generative_perplexity, unigram_entropy
    q = {"entropy": unigram_entropy(ids), "gen_ppl": None, "gen_ppl_skipped": skipped}
    if evaluator is not None:
        q["gen_ppl"] = generative_perplexity(decode(ids), evaluator, device=device, max_length=int(ids.shape[1]),
                                             tokens=ids)["gen_ppl"]
    return q


def generation_rows(preset, B, L, steps, device, timing: bool = True, model=None, decode=None, evaluator=None,
                    vocab: int = 50258):
    """Generation rows (see the module docstring); with ``timing`` each fused row also gets the host and device
    time per model call of its loop (seconds: host_s_median / host_s_mean / device_s_median / device_s_mean).
    ``model``: a trained MDLM (default: a random one of ``preset`` with length L); ``decode`` ((B, L) ids -> B
    strings) and ``evaluator`` (an evaluator name) add the generative perplexity."""
    if model is None:
        cfg = mdlm.preset(preset)
        cfg.model.length = L
        torch.manual_seed(0)
        model = mdlm.MDLM(cfg, vocab).to(device).eval()
        with torch.no_grad():  # a non-degenerate random model (the published init has a zero output layer)
            for p in model.backbone.output_layer.parameters():
                p.normal_(0, 0.02)
    model = model.to(device).eval()
    model.validate_inputs = model.backbone.validate_inputs = False
    evaluator, skipped = _evaluator(evaluator, decode, device)
    res = []
    cases = [("reference ddpm_cache", lambda **kw: mdlm.sampling.sample(model, B, L, steps, "ddpm_cache"))]
    fused = [("fused ddpm_cache", dict(steps=steps, sampler="ddpm_cache")),
             ("fused first_hitting", dict(sampler="first_hitting"))]
    for name, kw in fused:
        variants = ((name, False), (name + " graph", True)) if device.type == "cuda" else ((name, False),)
        for label, graph in variants:   # graph: every model call replayed from a captured CUDA graph
            cases.append((label, lambda kw=kw, graph=graph, **extra: mdlm.fast_sample(
                model, B, L, cuda_graph=graph, return_stats=True, **kw, **extra)))
    for name, fn in cases:
        # the published sampler runs the plain-PyTorch blocks; the fused samplers the block kernels (on CUDA)
        model.backbone.use_kernels = False if name.startswith("reference") else None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        stats = out[1] if isinstance(out, tuple) else {}
        ids = (out[0] if isinstance(out, tuple) else out).cpu()
        row = {"provider": name, "seconds": sec, "tokens_per_s": B * L / sec,
               "x_reference": res[0]["seconds"] / sec if res else 1.0,
               "model_calls": stats.get("model_calls"), "graph_replays": stats.get("graph_replays"),
               **_quality(ids, decode, evaluator, skipped, device)}
        if timing and not name.startswith("reference"):
            st = fn(timing=True)[1]
            host, dev = st.get("host_s", []), st.get("device_s", [])
            row.update(host_s_median=_median(host), host_s_mean=sum(host) / max(len(host), 1),
                       device_s_median=_median(dev), device_s_mean=sum(dev) / max(len(dev), 1),
                       timed_calls=len(host))
        res.append(row)
    return res


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, choices=mdlm.PRESETS,
                   help="the random model's preset (default small on CUDA, tiny on CPU); with --checkpoint, the "
                        "preset of a checkpoint that stores no config (default small)")
    p.add_argument("--batch", type=int, default=16 if cuda else 2)
    p.add_argument("--length", type=int, default=None,
                   help="sequence length (default: the checkpoint's, else 1024 on CUDA, 64 on CPU)")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary of the step-arithmetic section (default: the checkpoint's, else 50258)")
    p.add_argument("--steps", type=int, default=1000 if cuda else 16)
    p.add_argument("--iters", type=int, default=20 if cuda else 3)
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--checkpoint", default=None,
                   help="generate with this trained model (a checkpoint file / run folder / HF snapshot) instead "
                        "of a random one; its length is the default --length")
    p.add_argument("--gen-ppl", default=None, metavar="EVALUATOR",
                   help="also report each provider's generative perplexity under this evaluator (e.g. gpt2, "
                        "gpt2-large); needs its weights (transformers) and the model's tokenizer")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = decode = None
    if args.checkpoint is not None:
        from mdlm.checkpoint import load_model
        model, info = load_model(args.checkpoint, preset_name=args.preset)
        args.preset = f"checkpoint {info['path']}"
        if args.length is None:
            args.length = int(model.config.model.length)
        if args.vocab is None:
            args.vocab = int(model.vocab_size)
        if info["tokenizer"]:
            try:
                from mdlm import data as mdata
                tok = mdata.get_tokenizer(info["tokenizer"])
                decode = lambda ids: mdata.decode(ids, tok, mask_index=model.mask_index)  # noqa: E731
            except Exception as e:  # tokenizer files absent: no gen PPL (said in the rows)
                print(f"# tokenizer {info['tokenizer']!r} unavailable ({type(e).__name__}: {e}): no gen PPL")
    if args.preset is None:
        args.preset = "small" if device.type == "cuda" else "tiny"
    if args.length is None:
        args.length = 1024 if device.type == "cuda" else 64
    if args.vocab is None:
        args.vocab = 50258
    env = environment(device)
    bw = copy_bandwidth(device, 2 ** 30 if device.type == "cuda" else 2 ** 26)
    steps, n = step_rows(args.batch, args.length, args.vocab, device, args.iters)
    print(f"# sampling on {env.get('gpu', env.get('cpu'))}; copy bandwidth {bw / 1e9:.0f} GB/s; git {env['git_revision']}")
    print(f"# step arithmetic after the forward: B={args.batch} L={args.length} V={args.vocab}, {n} masked rows")
    for r in steps:
        extra = (f"  read {r['read_GBps']:.0f} GB/s = {r['read_GBps'] * 1e9 / bw * 100:.0f}% of copy "
                 f"({r['backend']})" if "read_GBps" in r else "")
        print(f"  {r['provider']:<12} {r['ms']:>9.3f} ms{extra}")
    gen = [] if args.skip_generation else generation_rows(args.preset, args.batch, args.length, args.steps, device,
                                                           model=model, decode=decode, evaluator=args.gen_ppl,
                                                           vocab=args.vocab)
    if gen:
        print(f"# generation: {args.preset}, B={args.batch} x L={args.length}, {args.steps} steps "
              f"({'trained' if model is not None else 'random'} model); entropy: mean unigram entropy of the "
              f"samples (nats){'; gen PPL under ' + args.gen_ppl if args.gen_ppl else ''}")
        for r in gen:
            calls = f"  model calls {r['model_calls']}" if r["model_calls"] is not None else ""
            calls += f" ({r['graph_replays']} graph replays)" if r.get("graph_replays") is not None else ""
            ppl = (f"  gen PPL {r['gen_ppl']:.2f}" if r.get("gen_ppl") is not None else
                   f"  gen PPL skipped ({r['gen_ppl_skipped']})" if r.get("gen_ppl_skipped") else "")
            print(f"  {r['provider']:<26} {r['seconds']:>8.2f} s {r['tokens_per_s']:>10,.0f} tokens/s "
                  f"{r['x_reference']:>6.2f}x  entropy {r['entropy']:.3f}{ppl}{calls}")
        timed = [r for r in gen if r.get("host_s_median") is not None]
        if timed:
            print("# per model call of the loop (timing run: synchronised before each call), median (mean):")
            for r in timed:
                print(f"  {r['provider']:<26} host {r['host_s_median'] * 1e3:>8.3f} ms "
                      f"({r['host_s_mean'] * 1e3:.3f})"
                      f"   device {r['device_s_median'] * 1e3:>8.3f} ms ({r['device_s_mean'] * 1e3:.3f})"
                      f"   over {r['timed_calls']} calls")
    if device.type != "cuda":
        print("# CPU figures: they show the benchmark runs, not GPU speed.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"sampling_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps({
        "benchmark": "sampling", "preset": args.preset, "batch": args.batch, "length": args.length,
        "vocab": args.vocab, "steps": args.steps, "masked_rows": n, "copy_bandwidth_Bps": bw, "environment": env,
        "step": steps, "generation": gen}, indent=2))
    print(f"# wrote {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
