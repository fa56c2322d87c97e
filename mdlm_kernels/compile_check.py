"""Compile-time GPU check: what the GPU would run, compiled and read without a GPU.

Every Triton kernel is compiled through Triton's own ahead-of-time path for sm_80 and sm_90 exactly as its
launcher would launch it during a training step of the published small model (B = 64, L = 1024, d = 768,
12 heads, V = 50258; bf16 autocast and fp32): the launchers run on meta tensors inside
``mdlm_kernels.launch.recording`` and record their plans (grid, constexprs, num_warps, num_stages), the
runtime's own binder specialises the arguments (dtypes, 16-byte alignment and divisibility of pointers and
integers), and Triton compiles for a GPU that is not there. ``ptxas -v`` (shipped in the triton wheel) then
gives registers, spills and stack; the PTX gives the width of every global memory instruction.

Asserted for every compiled plan (``failures``):
  - it compiles, with 0 bytes of spill stores / loads;
  - shared memory within the arch's per-block limit (227 KB sm_90, 163 KB sm_80);
  - resident blocks per SM (registers, warps, shared memory) >= the launcher's ``blocks_per_sm``;
  - memory-bound kernels (``vector_io``): their full tiles issue 16-byte global loads / stores.
And for the CUDA kernels of the built extension (``mdlm_kernels/_C_resources.json``, written by setup.py
from ``nvcc -Xptxas -v``): 0 spills, shared memory within the limit, and >= 2 resident blocks of 256
threads per SM.

Command: ``python -m mdlm_kernels.compile_check [--arch 80 90] [--flow bf16 fp32] [--json PATH] [--jobs N]``
prints one line per compiled kernel and the failures; exit status 1 if any. TRITON_INTERPRET must be unset
(kernels defined in interpreter mode cannot be compiled). Needs triton (with its ptxas); no GPU, no CUDA
torch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import torch

from . import _triton, launch
from .launch import Plan

ARCHS = (80, 90)
FLOWS = ("bf16", "fp32")
# the published small model (DESIGN.md): B x L tokens, hidden d, heads, vocabulary (GPT-2 + MASK)
PUBLISHED_SMALL = dict(B=64, L=1024, d=768, H=12, V=50258)
SMEM_LIMIT = {a: launch.ARCH_LIMITS[a]["smem_block"] for a in ARCHS}
CUDA_MIN_BLOCKS = 2          # resident 256-thread blocks per SM asked of every CUDA kernel
_GPUS = {80: launch.A100, 90: launch.H100}


# ---------------------------------------------------------------------------------------------
# The workload: every launch of a fused training step (and the eval-mode block), on meta tensors
# ---------------------------------------------------------------------------------------------
def _body(op):
    """The Python body of a torch.library custom op (its dispatcher entry would run the fake kernel on meta
    tensors; the body runs backend selection and the real launcher)."""
    return op._init_fn


def _m(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def step_plans(flow: str = "bf16", gpu: launch.GPU = launch.H100, shape: Optional[dict] = None) -> list[Plan]:
    """The plans the launchers record for one training step of the DiT (forward and backward of every fused
    op, as ``mdlm.nn.DIT._blocks_fused`` and the fused SUBS loss call them), plus the eval-mode block.

    ``flow`` "bf16": bf16 autocast as published (GEMM outputs and the adaLN output in bf16, the residual
    stream, LayerNorm weights and biases fp32); "fp32": no autocast."""
    from .ops import adaln, gated_residual, gelu, linear_ce, philox, rotary

    s = dict(PUBLISHED_SMALL, **(shape or {}))
    B, L, d, H, V = s["B"], s["L"], s["d"], s["H"], s["V"]
    D = d // H
    act = {"bf16": torch.bfloat16, "fp32": torch.float32}[flow]
    f32 = torch.float32
    N = B * L
    n_masked = N // 2                     # E[masked rows] of the loglinear schedule (t uniform)
    with launch.recording(gpu) as plans:
        x = _m((B, L, d), f32)                                     # residual stream (fp32 in both flows)
        w = _m((d,), f32)                                          # LayerNorm weight
        mod, mod_final = _m((B, 6 * d), act), _m((B, 2 * d), act)  # adaLN outputs (autocast Linear)
        # block 0: LN1 + modulate; its backward
        y, mean, rstd = _body(adaln._adaln_op)(x, w, mod, 0, 1, act, adaln.EPS)
        _body(adaln._adaln_bwd_op)(_m((B, L, d), act), x, w, mod, mean, rstd, 0, 1, adaln.EPS)
        # rotary into the SDPA layout; backward from SDPA's dq, dk, dv ((B, H, L, D), q's layout)
        qkv = _m((B, L, 3, H, D), act)
        q, k, v = _body(rotary._rotary_op)(qkv, _m((L, D // 2), f32), _m((L, D // 2), f32))
        _body(rotary._rotary_bwd_op)(torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                                     _m((L, D // 2), f32), _m((L, D // 2), f32), act)
        # gated residual + dropout + the next norm (training), inside a block and across to the final layer
        h = _m((B, L, d), act)
        for mod_next, sh, sc in ((None, 3, 4), (mod_final, 0, 1)):
            r, y, mean, rstd = _body(gated_residual._gated_op)(x, h, mod, 2, w, mod_next, sh, sc, 0.1, 1, 0, True,
                                                               act, gated_residual.EPS)
            for dr in (torch.empty_like(r), None):   # the last block's r has no later use
                _body(gated_residual._gated_bwd_op)(dr, torch.empty_like(y), r, h, mod, 2, w, mod_next, sh, sc, mean,
                                                    rstd, 0.1, 1, 0, True, gated_residual.EPS)
        _body(gated_residual._gated_op)(x, h, mod, 2, w, None, 3, 4, 0.0, 0, 0, False, act,
                                        gated_residual.EPS)                                   # eval
        # MLP (mdlm_kernels.ops.mlp): bias + GELU between the two GEMMs; its backward recomputes the activation
        a, bias = _m((B, L, 4 * d), act), _m((4 * d,), f32)
        _body(gelu._bias_gelu_op)(a, bias)
        _body(gelu._bias_gelu_bwd_recompute_op)(torch.empty_like(a), a, bias)
        _body(gelu._bias_gelu_bwd_op)(torch.empty_like(a), a, bias)         # bias_gelu on its own
        # the fused SUBS loss on the masked rows (LM head weight/bias fp32, cast to the compute dtype inside)
        _body(linear_ce._linear_ce_op)(_m((n_masked, d), act), _m((V, d), f32), _m((V,), f32),
                                       _m((n_masked,), torch.int64), _m((n_masked,), f32), V - 1, True, True,
                                       linear_ce.chunk_rows_for(V, act))
        _body(linear_ce._linear_ce_op)(_m((n_masked, d), act), _m((V, d), f32), _m((V,), f32),
                                       _m((n_masked,), torch.int64), _m((n_masked,), f32), V - 1, False, False,
                                       linear_ce.chunk_rows_for(V, act))                       # validation
        # uniforms (sampling, tests): one (rows, V) table
        _body(philox._philox_uniform_op)(16, V, 1, 0, torch.float64 if flow == "fp32" else torch.float32,
                                         torch.device("meta"))
    return plans


# ---------------------------------------------------------------------------------------------
# Compiling a plan for an arch, and reading the result
# ---------------------------------------------------------------------------------------------
_LDST = re.compile(r"^\s*(?:@!?%p\w+\s+)?(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)\s", re.M)   # incl. .L1::evict_*
_WIDTH = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2, "b32": 4, "u32": 4,
          "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


_CP_ASYNC = re.compile(r"^\s*(?:@!?%p\w+\s+)?cp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*"
                       r"(0x[0-9a-fA-F]+|\d+)", re.M)


def global_access_widths(ptx: str) -> dict:
    """{"ld": {bytes: count}, "st": {bytes: count}} over the global load / store instructions of a PTX text;
    asynchronous global -> shared copies (``cp.async``, software-pipelined loads) count as loads."""
    out = {"ld": {}, "st": {}}
    for kind, suffix in _LDST.findall(ptx):
        parts = suffix.strip(".").split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        width = next((_WIDTH[p] for p in reversed(parts) if p in _WIDTH), 0)
        nbytes = vec * width
        out[kind][nbytes] = out[kind].get(nbytes, 0) + 1
    for size in _CP_ASYNC.findall(ptx):
        nbytes = int(size, 0)
        out["ld"][nbytes] = out["ld"].get(nbytes, 0) + 1
    return out


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict:
    """registers, stack, spill_stores, spill_loads, smem (static) from one kernel's ``ptxas -v`` output."""
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    smem = _PTXAS_SMEM.search(log)
    if regs is None or spill is None:
        raise ValueError(f"unrecognised ptxas -v output:\n{log}")
    return {"registers": int(regs.group(1)), "stack": int(spill.group(1)), "spill_stores": int(spill.group(2)),
            "spill_loads": int(spill.group(3)), "static_smem": int(smem.group(1)) if smem else 0}


def _compile_inputs(plan: Plan, arch: int):
    """(ASTSource, target, options) for ``plan`` on sm_<arch>, specialised by the runtime's own binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = plan.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**plan.constexprs, **plan.options()}
    bound, specialization, options = binder(*plan.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options


def plan_key(plan: Plan, arch: int) -> str:
    """Identity of the compiled binary (kernel, specialisation, options): plans with equal keys compile alike."""
    src, _, options = _compile_inputs(plan, arch)
    return json.dumps([arch, plan.kernel.fn.__qualname__, sorted(src.signature.items()), sorted(
        (str(k), repr(v)) for k, v in src.constants.items()), sorted((str(k), repr(v)) for k, v in src.attrs.items()),
        options.num_warps, options.num_stages], default=str)


def compile_plan(plan: Plan, arch: int) -> dict:
    """Compile ``plan`` for sm_<arch>; resources, access widths and occupancy (``error`` set if it fails)."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    res = {"name": plan.name, "kernel": plan.kernel.fn.__name__, "arch": arch, "num_warps": None,
           "constexprs": {k: v for k, v in plan.constexprs.items()}, "blocks_per_sm_assumed": plan.blocks_per_sm,
           "vector_io": list(plan.vector_io), "error": None}
    try:
        src, target, options = _compile_inputs(plan, arch)
        ck = triton.compile(src, target=target, options=options.__dict__)
        ptx = ck.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", path,
                   "-o", os.path.join(tmp, "k.cubin")]
            if not options.enable_fp_fusion:
                cmd.insert(1, "--fmad=false")
            p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"ptxas failed: {p.stderr.strip()}")
        res.update(parse_ptxas(p.stderr + p.stdout))
        res["num_warps"] = ck.metadata.num_warps
        res["num_stages"] = ck.metadata.num_stages
        res["smem"] = max(int(ck.metadata.shared), res["static_smem"])
        res["blocks_per_sm"] = launch.occupancy(arch, res["registers"], res["num_warps"], res["smem"])
        res["widths"] = global_access_widths(ptx)
    except Exception as e:  # a compile error is a finding, reported with the others
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def failures(res: dict) -> list[str]:
    """What is wrong with one compiled plan (empty: nothing)."""
    where = f"{res['name']} ({res['kernel']} {_cx(res)}) sm_{res['arch']}"
    if res["error"]:
        return [f"{where}: does not compile: {res['error']}"]
    out = []
    if res["spill_stores"] or res["spill_loads"]:
        out.append(f"{where}: spills ({res['spill_stores']} B stored, {res['spill_loads']} B loaded; "
                   f"{res['registers']} registers)")
    if res["smem"] > SMEM_LIMIT[res["arch"]]:
        out.append(f"{where}: {res['smem']} B shared memory > {SMEM_LIMIT[res['arch']]} B")
    if res["blocks_per_sm"] < res["blocks_per_sm_assumed"]:
        out.append(f"{where}: {res['blocks_per_sm']} resident block(s) per SM ({res['registers']} registers x "
                   f"{res['num_warps']} warps, {res['smem']} B smem) < the {res['blocks_per_sm_assumed']} its "
                   f"launcher sizes the grid for")
    for kind in res["vector_io"]:
        if not res["widths"][kind].get(16):
            out.append(f"{where}: no 16-byte global {'load' if kind == 'ld' else 'store'} (memory-bound kernel; "
                       f"{kind} widths {_w(res['widths'][kind])})")
    return out


def _cx(res) -> str:
    return ",".join(f"{k}={v}" for k, v in res["constexprs"].items())


def _w(d: dict) -> str:
    return " ".join(f"{b}Bx{n}" for b, n in sorted(d.items(), reverse=True)) or "-"


def _compile_job(job):
    flow, arch, index = job
    plan = step_plans(flow, _GPUS[arch])[index]
    res = compile_plan(plan, arch)
    res["flow"] = flow
    return res


def run(archs=ARCHS, flows=FLOWS, jobs: int = 1) -> list[dict]:
    """Compile every distinct plan of ``step_plans`` for each arch and flow; one result dict per compile."""
    if _triton.INTERPRETED:
        raise RuntimeError("mdlm_kernels was imported with TRITON_INTERPRET=1: its kernels are interpreter "
                           "functions and cannot be compiled; run the check with TRITON_INTERPRET unset")
    if not _triton.HAS_TRITON:
        raise RuntimeError(f"triton is not available ({_triton.ERROR})")
    todo, seen = [], {}
    for arch in archs:
        for flow in flows:
            for i, plan in enumerate(step_plans(flow, _GPUS[arch])):
                key = plan_key(plan, arch)
                if key in seen:          # same binary: keep the strictest assumptions of all its launches
                    entry = todo[seen[key]]
                    entry[3] = max(entry[3], plan.blocks_per_sm)
                    entry[4] = entry[4] | set(plan.vector_io)
                    continue
                seen[key] = len(todo)
                todo.append([flow, arch, i, plan.blocks_per_sm, set(plan.vector_io)])
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_job, [(f, a, i) for f, a, i, _, _ in todo]))
    else:
        results = [_compile_job((f, a, i)) for f, a, i, _, _ in todo]
    for res, (_, _, _, bps, vio) in zip(results, todo):
        res["blocks_per_sm_assumed"] = bps
        res["vector_io"] = sorted(vio)
    return results


# ---------------------------------------------------------------------------------------------
# CUDA kernels of the built extension
# ---------------------------------------------------------------------------------------------
def cuda_resources() -> Optional[list]:
    """Per-kernel ptxas resources recorded when the extension was built (None: built without nvcc or the
    record is missing)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_resources.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["kernels"]


def cuda_failures(kernels: list) -> list[str]:
    out = []
    for k in kernels:
        arch = int(re.match(r"\D*(\d+)", k["arch"]).group(1))     # "sm_90a" -> 90, "sm_100" -> 100
        where = f"CUDA {k['kernel']} {k['arch']}"
        if k["spill_stores"] or k["spill_loads"]:
            out.append(f"{where}: spills ({k['spill_stores']} B stored, {k['spill_loads']} B loaded)")
        lim = launch.ARCH_LIMITS.get(arch, launch.ARCH_LIMITS[90])
        if k["smem"] > lim["smem_block"]:
            out.append(f"{where}: {k['smem']} B shared memory > {lim['smem_block']} B")
        blocks = launch.occupancy(arch if arch in launch.ARCH_LIMITS else 90, k["registers"], 8, k["smem"])
        if blocks < CUDA_MIN_BLOCKS:
            out.append(f"{where}: {blocks} resident 256-thread block(s) per SM ({k['registers']} registers, "
                       f"{k['smem']} B smem) < {CUDA_MIN_BLOCKS}")
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def format_table(results: list[dict]) -> str:
    head = (f"{'kernel launch':34} {'flow':4} {'sm':>3} {'regs':>4} {'warps':>5} {'blk/SM':>6} {'need':>4} "
            f"{'smem':>6} {'spill':>5}  {'ld widths':24} {'st widths':18} constexprs")
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: (r["name"], r.get("flow", ""), r["arch"])):
        if r["error"]:
            lines.append(f"{r['name']:34} {r.get('flow', ''):4} {r['arch']:>3}  ERROR {r['error'][:120]}")
            continue
        lines.append(f"{r['name']:34} {r.get('flow', ''):4} {r['arch']:>3} {r['registers']:>4} {r['num_warps']:>5} "
                     f"{r['blocks_per_sm']:>6} {r['blocks_per_sm_assumed']:>4} {r['smem']:>6} "
                     f"{r['spill_stores'] + r['spill_loads']:>5}  {_w(r['widths']['ld']):24} "
                     f"{_w(r['widths']['st']):18} {_cx(r)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdlm_kernels.compile_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--flow", nargs="+", default=list(FLOWS), choices=FLOWS)
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--json", help="write the results (Triton and CUDA) to this file")
    ap.add_argument("--no-cuda", action="store_true", help="skip the extension's CUDA kernels")
    args = ap.parse_args(argv)
    try:
        results = run(tuple(args.arch), tuple(args.flow), args.jobs)
    except RuntimeError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    fails = [f for r in results for f in failures(r)]
    print(format_table(results))
    cuda = None if args.no_cuda else cuda_resources()
    if cuda is not None:
        print(f"\nCUDA kernels of the built extension ({len(cuda)}):")
        for k in cuda:
            print(f"  {k['kernel']:48} {k['arch']:>7} regs {k['registers']:>3} smem {k['smem']:>6} "
                  f"stack {k['stack']:>4} spill {k['spill_stores'] + k['spill_loads']}")
        fails += cuda_failures(cuda)
    elif not args.no_cuda:
        print("\nCUDA kernels: no resource record (mdlm_kernels/_C_resources.json): the extension was built "
              "without nvcc, or not from this tree")
    import triton
    versions = {"triton": triton.__version__, "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions, "triton": results, "cuda": cuda, "failures": fails}, f, indent=1,
                      default=str)
    print(f"\n{len(results)} Triton compiles (triton {versions['triton']}: the results hold for this Triton; the "
          f"H200 machine runs 3.6.0), {len(fails)} failure(s)")
    for f in fails:
        print("FAIL", f)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
