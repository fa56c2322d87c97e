"""Every kernel against its plain-PyTorch reference and against torch.compile of the mdlm spec, forward and
forward + backward, with the hardware ceilings measured in the same run.

    python bench/kernels.py                                  # GPU: B=8, L=1024, d=768, H=12, V=50258, bf16
    python bench/kernels.py --kernels adaln_modulate,bias_gelu --providers fused,compiled --iters 50
    python bench/kernels.py --compile                        # CPU: tiny shapes, with the compiled provider

Providers (each row computes the same thing from the same inputs):
  fused      the mdlm_kernels op with its default backend (cpp -> triton -> reference; MDLM_BACKEND forces one)
  reference  the same op with backend="reference": the plain-PyTorch math of the op
  compiled   torch.compile of a plain-PyTorch function written from the mdlm spec (mdlm.nn / mdlm.diffusion /
             mdlm.sampling), i.e. what a user would write and compile instead of calling the kernel; a compile
             failure is reported in its row. Default on CUDA; on CPU only with --compile.

Kernels: adaln_modulate, gated_residual_modulate (dropout p=0.1, as in training), rotary_qkv and bias_gelu
(forward, and forward + backward through torch.autograd.grad with given output gradients); forward_mask and
sample_step (forward only); subs_linear_cross_entropy on N = B*L/2 masked rows (forward, and forward + backward
w.r.t. hidden, weight and bias). Forward rows run under torch.no_grad().

Figures: milliseconds per call (common.timed: CUDA events around back-to-back calls on a GPU, the median
on CPU). Memory-bound kernels: GB/s counting each input read once and each output written once (forward +
backward adds the output gradients and the saved inputs read once and the input gradients written once),
against the copy bandwidth measured in the same run. The loss: TFLOP/s of its GEMMs (1 forward, 3 with the
backward, 2 N d V FLOPs each) against the matmul rate measured in the same run. ``max_abs_diff_vs_reference``
compares each row's outputs (forward) or input gradients (forward + backward) with the reference provider's
(not for compiled rows of random kernels: torch's RNG draws other numbers than the Philox kernels).

Prints a table and writes JSON (with the environment) to OUT/kernels_<device>.json (``--tag`` renames it),
rewritten after every row so that a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
try:
    import mdlm
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))
    import mdlm
import mdlm.nn as mnn  # noqa: E402
import mdlm_kernels as mk  # noqa: E402
from mdlm.diffusion import q_xt, sample_t, subs_nelbo_masked_rows, subs_parameterization  # noqa: E402
from mdlm.sampling import sample_categorical  # noqa: E402
from mdlm.schedules import LogLinearNoise, loss_weight, move_chance  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, environment, matmul_ceiling, timed  # noqa: E402

KERNELS = ("adaln_modulate", "gated_residual_modulate", "rotary_qkv", "bias_gelu", "forward_mask",
           "subs_linear_cross_entropy", "sample_step")
PROVIDERS = ("fused", "reference", "compiled")
_BACKEND = {"fused": None, "reference": "reference"}


class Case:
    """One kernel: forward callables per provider, optional forward + backward callables, traffic / FLOPs."""

    def __init__(self, name, op, fwd, fwd_amount, bwd=None, bwd_amount=None, metric="GBps", rng=False):
        self.name, self.op, self.fwd, self.fwd_amount = name, op, fwd, fwd_amount
        self.bwd, self.bwd_amount, self.metric, self.rng = bwd, bwd_amount, metric, rng


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _grad_fn(f, inputs, grad_outputs):
    """A forward + backward step: f(), then torch.autograd.grad w.r.t. inputs (returned; no .grad accumulation)."""
    def step():
        out = f()
        outs = [out] if torch.is_tensor(out) else list(out)
        return torch.autograd.grad(outs, inputs, grad_outputs)
    return step


def _providers_map(make, compiled_spec):
    """{"fused": fn, "reference": fn, "compiled": fn} from make(backend) and the call of the compiled spec."""
    fns = {p: make(b) for p, b in _BACKEND.items()}
    fns["compiled"] = compiled_spec
    return fns


class _Ctx:
    """Shapes, dtype, device and the seeded input generator shared by the case builders."""

    def __init__(self, B, L, d, H, V, dtype, device, p_drop):
        self.B, self.L, self.d, self.H, self.V = B, L, d, H, V
        self.dtype, self.device, self.p_drop = dtype, device, p_drop
        self.g = torch.Generator(device="cpu").manual_seed(0)
        self.es = torch.empty((), dtype=dtype).element_size()
        self.n = B * L * d
        self.M = V - 1                 # MASK = the last id (GPT-2 + MASK)
        self.N = (B * L) // 2          # masked rows (half the positions)

    def rnd(self, *s, dt=None, scale=1.0, grad=False):
        t = torch.randn(*s, generator=self.g) * scale
        return t.to(device=self.device, dtype=dt or self.dtype).requires_grad_(grad)

    def randint(self, hi, *s):
        return torch.randint(0, hi, s, generator=self.g).to(self.device)


# One builder per kernel (each in its own scope: the closures must not share variable names).
def _adaln(c):
    B, L, d, n, es, dtype = c.B, c.L, c.d, c.n, c.es, c.dtype
    norm = mnn.LayerNorm(d).to(c.device)          # the spec's weight-only LayerNorm and its fp32 weight
    with torch.no_grad():
        norm.weight.copy_(c.rnd(d, dt=torch.float32))
    x, mod = c.rnd(B, L, d, dt=torch.float32, grad=True), c.rnd(B, 6 * d, grad=True)   # fp32 residual stream
    w = norm.weight

    def spec(x, mod):
        shift, scale = mod[:, None].chunk(6, dim=2)[:2]
        return mnn.modulate(norm(x), shift, scale).to(dtype)

    csp = torch.compile(spec)
    fwd = _providers_map(lambda b: (lambda: mk.adaln_modulate(x, w, mod, 0, 1, dtype, backend=b)),
                         lambda: csp(x, mod))
    gy = c.rnd(B, L, d)
    bwd = {k: _grad_fn(f, [x, w, mod], [gy]) for k, f in fwd.items()}
    fb = n * 4 + _nbytes(w) + 2 * B * d * es + n * es                     # x, w, shift+scale -> y
    bb = _nbytes(gy, x, w, mod) + _nbytes(x, w, mod)                      # gy, saved inputs -> dx, dw, dmod
    return Case("adaln_modulate", "adaln_modulate", fwd, fb, bwd, fb + bb)


def _gated(c):
    B, L, d, n, es, dtype, p_drop = c.B, c.L, c.d, c.n, c.es, c.dtype, c.p_drop
    norm2 = mnn.LayerNorm(d).to(c.device)
    with torch.no_grad():
        norm2.weight.copy_(c.rnd(d, dt=torch.float32))
    res, h, mod = c.rnd(B, L, d, dt=torch.float32, grad=True), c.rnd(B, L, d, grad=True), c.rnd(B, 6 * d, grad=True)
    w = norm2.weight

    def spec(res, h, mod):
        _, _, gate, shift, scale, _ = mod[:, None].chunk(6, dim=2)
        r = mnn.bias_dropout_add_scale(h, None, gate, res, p_drop, True)
        return r, mnn.modulate(norm2(r), shift, scale).to(dtype)

    csp = torch.compile(spec)
    fwd = _providers_map(lambda b: (lambda: mk.gated_residual_modulate(
        res, h, mod, 2, w, 3, 4, p=p_drop, seed=1, out_dtype=dtype, backend=b)), lambda: csp(res, h, mod))
    gr, gy = c.rnd(B, L, d, dt=torch.float32), c.rnd(B, L, d)
    bwd = {k: _grad_fn(f, [res, h, mod, w], [gr, gy]) for k, f in fwd.items()}
    fb = n * 4 + n * es + 3 * B * d * es + _nbytes(w) + n * 4 + n * es   # res, h, gate/shift/scale, w -> r, y
    bb = _nbytes(gr, gy, res, h, mod, w) + _nbytes(res, h, mod, w)       # gr, gy, saved -> dres, dh, dmod, dw
    return Case("gated_residual_modulate", "gated_residual_modulate", fwd, fb, bwd, fb + bb, rng=True)


def _rotary(c):
    B, L, d, H, n, es = c.B, c.L, c.d, c.H, c.n, c.es
    D = d // H
    qkv = c.rnd(B, L, 3, H, D, grad=True)
    cos, sin = mnn.Rotary(D).to(c.device)(qkv)    # the (1, L, 3, 1, D) tables of the spec (identity on v)

    def spec(qkv):
        out = mnn.apply_rotary_pos_emb(qkv, cos.to(qkv.dtype), sin.to(qkv.dtype))
        q, k, v = out.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # the SDPA layout (B, H, L, D)

    csp = torch.compile(spec)
    fwd = _providers_map(lambda b: (lambda: mk.rotary_qkv(qkv, cos, sin, backend=b)), lambda: csp(qkv))
    gq, gk, gv = (c.rnd(B, H, L, D) for _ in range(3))
    bwd = {k: _grad_fn(f, [qkv], [gq, gk, gv]) for k, f in fwd.items()}
    tables = L * D * 4                                                      # cos and sin halves, fp32
    fb = 3 * n * es + tables + 3 * n * es                                   # qkv -> q, k, v (fresh buffers)
    bb = 3 * n * es + tables + 3 * n * es                                   # dq, dk, dv -> dqkv
    return Case("rotary_qkv", "rotary_qkv", fwd, fb, bwd, fb + bb)


def _gelu(c):
    B, L, d = c.B, c.L, c.d
    u, bias = c.rnd(B, L, 4 * d, grad=True), c.rnd(4 * d, grad=True)

    def spec(u, bias):  # the MLP's bias + GELU(tanh), fp32 math, as the op defines it
        return F.gelu(u.float() + bias.float(), approximate="tanh").to(u.dtype)

    csp = torch.compile(spec)
    fwd = _providers_map(lambda b: (lambda: mk.bias_gelu(u, bias, backend=b)), lambda: csp(u, bias))
    gu = c.rnd(B, L, 4 * d)
    bwd = {k: _grad_fn(f, [u, bias], [gu]) for k, f in fwd.items()}
    fb = _nbytes(u, bias) + _nbytes(u)
    bb = _nbytes(gu, u, bias) + _nbytes(u, bias)
    return Case("bias_gelu", "bias_gelu", fwd, fb, bwd, fb + bb)


def _mask(c):
    B, L, M = c.B, c.L, c.M
    x0 = c.randint(M, B, L)
    noise = LogLinearNoise()

    def spec(x0):  # the published training draw: antithetic t, loglinear sigma, q(x_t | x_0), loss weight
        t = sample_t(x0.shape[0], x0.device)
        sigma, dsigma = noise(t)
        mc = move_chance(sigma)
        xt = q_xt(x0, mc[:, None], M)
        return xt, t, sigma, loss_weight(sigma, dsigma), mc, (xt == M).sum(1, dtype=torch.int32)

    csp = torch.compile(spec)
    fwd = _providers_map(lambda b: (lambda: mk.forward_mask(x0, 1234, 0, mask_index=M, backend=b)),
                         lambda: csp(x0))
    fb = 2 * _nbytes(x0) + B * (4 * 4 + 4)                                  # x0 -> xt, 4 float rows, counts
    return Case("forward_mask", "forward_mask", fwd, fb, rng=True)


def _linear_ce(c):
    N, d, V, M = c.N, c.d, c.V, c.M
    hid = c.rnd(N, d, grad=True)
    W = c.rnd(V, d, scale=d ** -0.5, grad=True)
    bvec = c.rnd(V, scale=0.1, grad=True)
    tgt = c.randint(M, N)                                                   # never MASK
    wr = (1.0 / (torch.rand(N, generator=c.g) * 0.999 + 1e-3)).to(c.device)  # 1/t per row (loglinear)

    def spec(hid, W, bvec):
        return subs_nelbo_masked_rows(hid, W, bvec, tgt, wr, M).sum()

    csp = torch.compile(spec)
    fwd = _providers_map(lambda b: (lambda: mk.subs_linear_cross_entropy(
        hid, W, bvec, tgt, wr, M, validate=False, backend=b).loss), lambda: csp(hid, W, bvec))
    bwd = {k: _grad_fn(f, [hid, W, bvec], None) for k, f in fwd.items()}
    gemm = 2 * N * d * V
    return Case("subs_linear_cross_entropy", "subs_linear_cross_entropy", fwd, gemm, bwd, 3 * gemm, metric="TFLOPs")


def _sample(c):
    N, V, M, device = c.N, c.V, c.M, c.device
    logits = c.rnd(N, V, scale=3.0)
    row_ids = torch.randperm(c.B * c.L, generator=c.g)[:N].sort().values.to(device)   # flat masked positions
    t = torch.full((N,), 0.5, device=device)
    s = torch.full((N,), 0.5 - 1e-3, device=device)
    xt_masked = torch.full((1, N), M, dtype=torch.int64, device=device)

    def spec(logits, t, s):  # the published ddpm_cache step after the forward, on the masked rows
        p_x0 = subs_parameterization(logits[None], xt_masked, M)[0].exp()
        q_xs = p_x0 * (t - s)[:, None]
        q_xs[:, M] = s
        return sample_categorical(q_xs)

    csp = torch.compile(spec)
    # entropy=False: the samplers' setting (the published step computes no confidences either)
    fwd = _providers_map(lambda b: (lambda: mk.sample_step(logits, t, s, 1234, 0, mask_index=M, row_ids=row_ids,
                                                           validate=False, entropy=False, backend=b)),
                         lambda: csp(logits, t, s))
    fb = _nbytes(logits, t, s, row_ids) + N * 8 + N * 3 * 4                 # logits -> tokens, confidence
    return Case("sample_step", "sample_step", fwd, fb, rng=True)


_BUILDERS = {"adaln_modulate": _adaln, "gated_residual_modulate": _gated, "rotary_qkv": _rotary,
             "bias_gelu": _gelu, "forward_mask": _mask, "subs_linear_cross_entropy": _linear_ce,
             "sample_step": _sample}


def build_cases(names, B, L, d, H, V, dtype, device, p_drop=0.1):
    """The Case of each kernel in ``names`` (in KERNELS order) and N, the masked-row count."""
    c = _Ctx(B, L, d, H, V, dtype, device, p_drop)
    return [_BUILDERS[k](c) for k in KERNELS if k in names], c.N


def _tensors(out):
    if torch.is_tensor(out):
        return [out]
    return [o for o in out if torch.is_tensor(o)]


def _max_abs_diff(a, b):
    worst = 0.0
    for x, y in zip(_tensors(a), _tensors(b)):
        if x.shape != y.shape:
            return None
        diff = (x.detach().double() - y.detach().double()).abs()
        diff = torch.where(torch.isnan(x.detach().double()) & torch.isnan(y.detach().double()), 0.0, diff)
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def _err(e):
    return f"{type(e).__name__}: {e}"[:2000]


def _reference_output(fns, pas):
    try:
        if pas == "fwd":
            with torch.no_grad():
                return fns["reference"]()
        return fns["reference"]()
    except Exception:
        return None


def run(cases, providers, device, iters, warmup, ceilings, on_row=lambda rows: None):
    """One row per kernel x pass x provider; ``on_row(rows)`` after each (the JSON is rewritten there)."""
    rows = []
    for case in cases:
        passes = [("fwd", case.fwd, case.fwd_amount)]
        if case.bwd is not None:
            passes.append(("fwd+bwd", case.bwd, case.bwd_amount))
        for pas, fns, amount in passes:
            ref_out = _reference_output(fns, pas)   # outputs (fwd) or input gradients (fwd+bwd) to compare with
            for prov in providers:
                row = {"kernel": case.name, "pass": pas, "provider": prov, "metric": case.metric}
                fn = fns[prov]
                if pas == "fwd":
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn()
                else:
                    call = fn
                mk.backend.last_used.pop(case.op, None)
                mk.backend.last_used.pop(case.op + "_backward", None)
                try:
                    sec = timed(call, device, iters, warmup)
                except Exception as e:  # e.g. no C compiler for torch.compile: report it, keep going
                    row["error"] = _err(e)
                    print(f"  {case.name} {pas} {prov}: FAILED: {row['error'].splitlines()[0][:200]}",
                          file=sys.stderr)
                    rows.append(row)
                    on_row(rows)
                    continue
                row["ms"] = sec * 1e3
                if case.metric == "TFLOPs":
                    row["flops"] = amount
                    row["TFLOPs"] = amount / sec / 1e12
                    row["fraction_of_ceiling"] = amount / sec / ceilings["matmul"]
                else:
                    row["bytes"] = amount
                    row["GBps"] = amount / sec / 1e9
                    row["fraction_of_ceiling"] = amount / sec / ceilings["copy"]
                if prov != "compiled":
                    row["backend"] = mk.backend.last_used.get(case.op)
                    if (case.op + "_backward") in mk.backend.last_used:
                        row["backend_backward"] = mk.backend.last_used[case.op + "_backward"]
                if ref_out is not None and not (case.rng and prov == "compiled"):
                    try:
                        row["max_abs_diff_vs_reference"] = _max_abs_diff(call(), ref_out)
                    except Exception as e:
                        row["max_abs_diff_vs_reference"] = None
                        row["diff_error"] = _err(e)
                rows.append(row)
                on_row(rows)
    return rows


def print_table(rows):
    hdr = (f"{'kernel':<26} {'pass':<8} {'provider':<10} {'ms':>9} {'vs ref':>7} {'rate':>16} {'of ceil':>8} "
           f"{'max|diff|':>9}  backend")
    print(hdr)
    print("-" * len(hdr))
    ref = {(r["kernel"], r["pass"]): r["ms"] for r in rows if r["provider"] == "reference" and "ms" in r}
    for r in rows:
        head = f"{r['kernel']:<26} {r['pass']:<8} {r['provider']:<10}"
        if "error" in r:
            print(f"{head} failed: {r['error'].splitlines()[0][:90]}")
            continue
        base = ref.get((r["kernel"], r["pass"]))
        speed = f"{base / r['ms']:.2f}x" if base else "-"
        rate = (f"{r['TFLOPs']:.3g} TFLOP/s" if r["metric"] == "TFLOPs" else f"{r['GBps']:.4g} GB/s")
        diff = r.get("max_abs_diff_vs_reference")
        diff = "-" if diff is None else f"{diff:.1e}"
        be = r.get("backend") or ("torch.compile" if r["provider"] == "compiled" else "")
        if r.get("backend_backward"):
            be += f" / {r['backend_backward']}"
        print(f"{head} {r['ms']:>9.3f} {speed:>7} {rate:>16} {r['fraction_of_ceiling'] * 100:>7.1f}% {diff:>9}  {be}")


def _csv(text, allowed, what, parser):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        parser.error(f"unknown {what}(s) {bad}; choose from {allowed}")
    if not items:
        parser.error(f"no {what} given")
    return items


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated subset of {PROVIDERS} (default: all on CUDA; fused,reference on CPU, "
                        "plus compiled with --compile)")
    p.add_argument("--compile", action="store_true", help="add the compiled provider on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed calls per row (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch", type=int, default=None, help="B (default 8 on CUDA, 1 on CPU)")
    p.add_argument("--length", type=int, default=None, help="L (default 1024 on CUDA, 64 on CPU)")
    p.add_argument("--hidden", type=int, default=None, help="d (default 768 on CUDA, 128 on CPU)")
    p.add_argument("--heads", type=int, default=None, help="H (default 12 on CUDA, 4 on CPU)")
    p.add_argument("--vocab", type=int, default=50258, help="V including MASK (= V - 1)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="activation dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout of gated_residual_modulate")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON")
    p.add_argument("--tag", default=None, help="file name stem (default: kernels_<device>)")
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    args.kernels = _csv(args.kernels, KERNELS, "kernel", p)
    if args.providers is None:
        args.providers = list(PROVIDERS) if (gpu or args.compile) else ["fused", "reference"]
    else:
        args.providers = _csv(args.providers, PROVIDERS, "provider", p)
    for name, g_default, c_default in (("iters", 20, 3), ("warmup", 3, 1), ("batch", 8, 1), ("length", 1024, 64),
                                       ("hidden", 768, 128), ("heads", 12, 4)):
        if getattr(args, name) is None:
            setattr(args, name, g_default if gpu else c_default)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.iters < 1 or args.warmup < 0 or min(args.batch, args.length, args.hidden, args.heads) < 1:
        p.error("--iters, --batch, --length, --hidden, --heads must be >= 1 and --warmup >= 0")
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        p.error("--hidden must be a multiple of --heads with an even head dim")
    if args.batch * args.length < 2:
        p.error("need B*L >= 2 (N = B*L/2 masked rows)")
    if args.vocab < 3:
        p.error("--vocab must be >= 3")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    env = environment(device)
    bw = copy_bandwidth(device, 2 ** 30 if cuda else 2 ** 26)
    ceiling = matmul_ceiling(device, dtype, 8192 if cuda else 1024)
    B, L, d, H, V = args.batch, args.length, args.hidden, args.heads, args.vocab
    cases, N = build_cases(args.kernels, B, L, d, H, V, dtype, device, args.dropout)
    print(f"# kernels: B={B} L={L} d={d} H={H} V={V} {args.dtype}, N={N} masked rows, on "
          f"{env.get('gpu', env.get('cpu'))}; copy bandwidth {bw / 1e9:.1f} GB/s, {dtype} matmul ceiling "
          f"{ceiling / 1e12:.2f} TFLOP/s; torch {env['torch']}, git {env['git_revision']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.tag or 'kernels_' + device.type}.json"
    meta = {"benchmark": "kernels", "batch": B, "length": L, "hidden": d, "heads": H, "vocab": V, "masked_rows": N,
            "dtype": args.dtype, "dropout": args.dropout, "iters": args.iters, "warmup": args.warmup,
            "kernels": args.kernels, "providers": args.providers, "copy_bandwidth_Bps": bw,
            "matmul_ceiling_flops": ceiling, "environment": env, "mdlm_kernels": mk.available()}

    def write(rows, complete=False):
        path.write_text(json.dumps({**meta, "complete": complete, "results": rows}, indent=2))

    rows = run(cases, args.providers, device, args.iters, args.warmup, {"copy": bw, "matmul": ceiling}, write)
    write(rows, complete=True)
    print_table(rows)
    if not cuda:
        print("# CPU figures: they show the benchmark runs, not GPU speed.")
    print(f"# wrote {path}")
    failed = [r for r in rows if "error" in r and r["provider"] != "compiled"]
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
