"""The compile-time GPU check (mdlm_kernels.compile_check): every Triton kernel of a training step of the
published small model compiled for sm_80 and sm_90 exactly as its launcher plans it, read with ptxas and the PTX,
and the CUDA kernels' ptxas record from the build. Runs without a GPU; skips only where Triton's ptxas is absent.

- The whole check must report no finding (compiles, 0 spills, shared memory within the limit, occupancy >= what
  the launcher sizes its grid for, 16-byte global accesses on the full tiles of memory-bound kernels); a
  regression in any kernel fails here.
- The check itself can fail: kernels with known defects (a runtime column in a load mask, spills, an impossible
  occupancy assumption, a compile error) are each reported (tests/compile_check_mutants.py).
- Parsers and the occupancy rule against hand-computed cases; recording captures plans without launching.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from mdlm_kernels import compile_check as cc
from mdlm_kernels import launch

HERE = os.path.dirname(os.path.abspath(__file__))


def _ptxas_reason():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(90).path
    except Exception as e:  # no triton, or a triton without its NVIDIA backend
        return f"Triton's ptxas is not available ({type(e).__name__}: {e})"
    return None if path and os.path.exists(path) else f"Triton's ptxas not found ({path})"


needs_ptxas = pytest.mark.skipif(_ptxas_reason() is not None, reason=str(_ptxas_reason()))


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)     # kernels must be defined as compilable JIT functions
    return env


@needs_ptxas
def test_training_step_kernels_compile_clean_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "check.json"
    p = subprocess.run([sys.executable, "-m", "mdlm_kernels.compile_check", "--jobs", "2", "--json", str(out)],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.exists(), p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert p.returncode == 0 and res["failures"] == [], p.stdout[-6000:] + p.stderr[-3000:]
    names = {r["name"] for r in res["triton"]}
    assert {"adaln_modulate.fwd", "adaln_modulate.bwd", "gated_residual_modulate.fwd", "gated_residual_modulate.bwd",
            "rotary_qkv.fwd", "rotary_qkv.bwd", "bias_gelu.fwd", "bias_gelu.bwd", "subs_linear_cross_entropy.rows",
            "philox_uniform"} <= names, names
    assert {r["arch"] for r in res["triton"]} == {80, 90}
    if os.environ.get("MDLM_EXPECT_CUDA_BUILD") == "1":   # set by .ci/run where nvcc exists
        assert res["cuda"], "the extension was built with nvcc but left no ptxas record (_C_resources.json)"
        assert {k["arch"] for k in res["cuda"]} >= {"sm_80", "sm_90"}


@needs_ptxas
def test_the_check_reports_each_planted_defect():
    p = subprocess.run([sys.executable, os.path.join(HERE, "compile_check_mutants.py"), "90"], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    found = json.loads(p.stdout.strip().splitlines()[-1])
    assert found["vectorized"] == []
    assert any("no 16-byte global load" in f for f in found["runtime_column_mask"])
    assert any("no 16-byte global store" in f for f in found["runtime_column_mask"])
    assert any("< the 64 its launcher sizes the grid for" in f for f in found["occupancy_assumed_too_high"])
    assert any("spills" in f for f in found["spills"])
    assert any("does not compile" in f for f in found["does_not_compile"])


def test_access_widths_from_ptx():
    ptx = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p1 ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];
    @!%p2 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
    ld.global.nc.v2.b64 { %rd4, %rd5 }, [ %rd6 + 0 ];
    st.global.v2.b32 [ %rd7 + 0 ], { %r9, %r10 };
    @%p3 st.global.b32 [ %rd8 + 0 ], { %r11 };
    @%p4 ld.global.L1::evict_last.v4.b32 { %r21, %r22, %r23, %r24 }, [ %rd11 + 0 ];
    cp.async.cg.shared.global [ %r12 + 0 ], [ %rd9 + 0 ], 0x10, %r13;
    cp.async.ca.shared.global [ %r14 + 0 ], [ %rd10 + 0 ], 0x4, %r15;
    ld.shared.v4.b32 { %r16, %r17, %r18, %r19 }, [ %r20 ];
    """
    w = cc.global_access_widths(ptx)
    assert w == {"ld": {16: 5, 2: 1, 4: 1}, "st": {8: 1, 4: 1}}


def test_ptxas_log_parser():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]\n")
    assert cc.parse_ptxas(log) == {"registers": 168, "stack": 16, "spill_stores": 8, "spill_loads": 12,
                                   "static_smem": 4096}
    with pytest.raises(ValueError):
        cc.parse_ptxas("nothing here")


@pytest.mark.parametrize("arch,regs,warps,smem,blocks", [
    (90, 255, 8, 0, 1),        # 256 regs x 256 threads = the whole register file
    (90, 128, 8, 0, 2),
    (90, 129, 8, 0, 1),        # 136 after rounding to 8: 34816 per block -> 1
    (90, 64, 4, 0, 8),
    (90, 32, 4, 0, 16),        # 64 warps per SM
    (90, 16, 1, 0, 32),        # 32 blocks per SM
    (90, 40, 4, 100 * 1024, 2),  # shared memory: 233472 / (102400 + 1024)
    (80, 40, 4, 100 * 1024, 1),
    (90, 40, 4, 240 * 1024, 0),  # over the per-block limit: cannot launch
])
def test_occupancy_rule(arch, regs, warps, smem, blocks):
    assert launch.occupancy(arch, regs, warps, smem) == blocks


def test_recording_captures_the_plans_without_launching():
    plans = cc.step_plans("bf16", launch.H100, shape=dict(B=2, L=64, d=96, H=2, V=300))
    names = [p.name for p in plans]
    for n in ("adaln_modulate.fwd", "adaln_modulate.bwd", "gated_residual_modulate.fwd",
              "gated_residual_modulate.bwd", "rotary_qkv.fwd", "rotary_qkv.bwd", "bias_gelu.fwd", "bias_gelu.bwd",
              "subs_linear_cross_entropy.rows", "philox_uniform"):
        assert n in names, (n, names)
    for p in plans:
        assert all(not torch.is_tensor(a) or a.device.type == "meta" for a in p.args)
        assert p.num_warps is not None and p.grid and all(g >= 1 for g in p.grid)
    # outside recording, meta tensors reach no Triton launch: the backend refuses them with a reason
    from mdlm_kernels import backend as kb
    assert "meta" in kb.unavailable_reason("triton", "meta")
    with launch.recording(launch.A100):
        assert kb.unavailable_reason("triton", "meta") is None
        assert launch.gpu_of("meta") == launch.A100
    assert launch.gpu_of("meta") is None


@pytest.mark.cuda
def test_on_a_gpu_the_runtime_compiles_what_the_check_compiled():
    """The instrument against the real thing: launch each recorded plan (small shapes) with CUDA tensors of the
    same shapes, strides and dtypes, and compare the register count the runtime's compiled kernel reports with
    the AOT compile + ptxas of the same plan for this GPU's arch."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("kernels defined in interpreter mode")
    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    arch = 10 * cap[0] + cap[1]
    if arch not in cc.ARCHS:
        pytest.skip(f"the check compiles for {cc.ARCHS}, this GPU is sm_{arch}")
    plans = cc.step_plans("bf16", launch.gpu_of(dev), shape=dict(B=2, L=128, d=768, H=12, V=50258))
    seen = set()
    for plan in plans:
        key = cc.plan_key(plan, arch)
        if key in seen:
            continue
        seen.add(key)
        # same shape, strides, dtype and storage offset (so the same 16-byte alignment specialisation)
        real = [torch.zeros(a.untyped_storage().nbytes() // a.element_size(), dtype=a.dtype, device=dev)
                .as_strided(a.shape, a.stride(), a.storage_offset()) if torch.is_tensor(a) else a for a in plan.args]
        compiled = plan.kernel[plan.grid](*real, **plan.constexprs, **plan.options())
        torch.cuda.synchronize(dev)
        compiled._init_handles()
        res = cc.compile_plan(plan, arch)
        assert res["error"] is None, res["error"]
        assert compiled.n_regs == res["registers"], (plan.name, compiled.n_regs, res["registers"])
        assert compiled.n_spills == 0 and res["spill_stores"] == 0, plan.name
