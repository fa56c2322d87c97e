"""Generated bad inputs for every op of mdlm_kernels, run on every CPU backend, through the public functions and
directly through ``torch.ops.mdlm.*`` (issue 15). Used by tests/test_bad_inputs.py; also a script:

    python tests/bad_inputs.py [--all] [--op NAME ...] [--backend NAME ...] [--entry public|ops] [-v]

THE CASES. Each op has a valid call (small shapes, fp32) per entry point ("public": the mdlm_kernels function,
"ops": the registered ``torch.ops.mdlm.*`` op, whose arguments are the op schema's). Mutations are applied to it
one at a time:
- every tensor argument: each other dtype of (float64, float32, float16, bfloat16, int64, int32, bool); rank + 1
  and - 1; each dimension + 1, - 1 and 0 (empty / zero-row tensors); a non-contiguous view (every stride doubled)
  and a transposed layout; a stride-0 view (expanded from its first row); moved to the meta device (the others
  stay on the CPU); None; a Python list; for float tensors NaN, +inf and -inf at one element, values times 1e20
  and all values at -1e12; for token / target / row-id tensors out-of-range ids (-1, V, the MASK id, 2^40);
- every scalar argument: a wrong type (str, None, float for int, bool, int for bool) and out-of-range values
  (negative, NaN, inf, too large), listed per argument below, plus valid alternatives (other schedules, dtypes).
A case states what must happen: "error" (a clear exception), "agree" (a result equal to the reference's on
dense inputs: strided views) or "any" (either).

THE CHECK. The oracle of a case is the reference backend on the same inputs made dense (``.contiguous()``): a
strided view must give what its dense copy gives. A trial (a case on one backend) passes when
- the backend raises, the oracle raises an exception of the same type, and the backend's message names an
  argument of the op (the mutated one for dtype / device / type / value mutations; any argument of the op for
  shape mutations, which are relations between arguments) -- "clear error";
  (BackendUnavailableError, where the oracle returned, counts as a clear error: this backend cannot run that
  valid input, e.g. float64 on Triton, and says why);
- or both return and every output (and, for differentiable ops on the public entry, every input gradient of a
  fixed random cotangent) agrees: same shape and dtype, NaN and +-inf at the same places, the finite values
  within a per-dtype tolerance scaled by the largest entry (fp32 1e-4, 16-bit 2e-2; integers exactly) --
  "agreed".
Anything else fails: a crash (the subprocess dies: SIGSEGV, abort), a hang (the batch's time limit), an
unclear error (a message naming no argument, or another exception type than the reference's), a result where
the case requires an error, or a silent difference.

ISOLATION. Cases run in subprocesses forked from a server that imported torch and mdlm_kernels once
(multiprocessing "forkserver"): one subprocess per (op, entry, backend) batch runs its cases and reports each
over a pipe as it finishes; a crash or a hang kills only that batch, is reported as a failure naming the case
that was running, and the rest of the batch is resumed in a new subprocess.

BUDGET. By default a fixed, seeded sample of the cases runs (``DEFAULT_BUDGET`` cases per (op, entry), all
scalar mutations and a sample of the tensor mutations, the same sample every run); MDLM_BAD_INPUTS=all (or
--all) runs every case.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import random
import re
import sys
import time
import traceback
import zlib
from typing import Any, Callable, Optional

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"   # as tests/conftest.py: Triton on CPU tensors

import torch  # noqa: E402

DEFAULT_BUDGET = 60            # cases per (op, entry) in the default run (a fixed stratified sample: select())
BATCH_TIMEOUT_S = 240.0        # a batch (one subprocess) taking longer is a hang
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
RTOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
MASK = 9                       # the MASK id of the token ops (V = 10)
V = 10


# ---------------------------------------------------------------------------------------------------------------
# Op tables
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TArg:
    """A tensor argument of a valid call: shape, dtype, kind of values ("float", "pos" (> 0), "unit" (in (0, 1]),
    "small" (in [0, 0.5)), "ids" (token ids in [0, MASK)), "rows" (row ids), "offset"), the dtypes it accepts
    (other dtypes must be an error) and whether None is accepted."""
    name: str
    shape: tuple
    dtype: torch.dtype = torch.float32
    kind: str = "float"
    ok_dtypes: tuple = ()
    optional: bool = False
    grad: bool = False         # a leaf that requires grad (public entry of differentiable ops)
    dense_only: bool = False   # the op requires it dense (written in place): strided views must be an error


@dataclasses.dataclass
class SArg:
    """A scalar argument: its valid value, values that must be rejected, values that are valid alternatives."""
    name: str
    value: Any
    bad: tuple = ()
    ok: tuple = ()


@dataclasses.dataclass
class OpSpec:
    op: str                    # name in reports
    entry: str                 # "public" | "ops"
    fn: Callable               # called as fn(*positional) (ops) or fn(**kwargs) (public)
    args: list                 # TArg / SArg in call order
    backends: tuple            # backends to try (None: the op has no backend argument)
    backend_arg: Optional[str] = "backend"   # name of the backend argument (None: no backend argument)
    positional: bool = False   # call positionally in args order (the ops entry)
    grad: bool = False         # compare input gradients too
    post: Optional[Callable] = None   # post(args dict) -> args dict: derived valid values (e.g. backward stats)
    groups: tuple = ()         # extra multi-argument mutations: (name, overrides dict, expect)
    mutated: tuple = ()        # arguments the op writes in place: compared after the call too


def _mk():
    import mdlm_kernels as mk
    return mk


def _i64(v):
    return v - (1 << 64) if v >= (1 << 63) else v


F_OK = (torch.float32, torch.float16, torch.bfloat16, torch.float64)    # float tensors of the Triton ops
NAN, INF = float("nan"), float("inf")
BAD_FLOAT = ("1.0", None, NAN, INF)
BAD_INT = ("1", None, 1.5, True)
BAD_BOOL = ("False", 1, None)
BAD_SEED_PUBLIC = (-1, 2 ** 64, 1.5, "1", None)
BAD_SEED_OPS = (1.5, "1", None, 2 ** 64)


def specs() -> list:
    """Every (op, entry) table."""
    mk = _mk()
    from mdlm_kernels.ops.mlp import gelu_mlp
    from mdlm_kernels.ops.gelu import bias_gelu_backward_recompute
    from mdlm_kernels.ops.attention import attention
    ops = torch.ops.mdlm
    out = []
    f = torch.float32
    # ---- forward_mask ----------------------------------------------------------------------------------------
    fm_scalars_pub = [
        SArg("seed", 1, BAD_SEED_PUBLIC, (2 ** 64 - 1,)), SArg("offset", 2, BAD_SEED_PUBLIC, (0,)),
        SArg("mask_index", MASK, (-1, 1.5, None, True, 2 ** 63), (0,)),
        SArg("schedule", "loglinear", ("cosine2", None, 3), ("linear", "geometric", "cosine", "cosinesqr")),
        SArg("noise_eps", 1e-3, ("x", None, NAN, INF, -0.1, 1.0), (0.0, 0.5)),
        SArg("sampling_eps", 1e-3, (1.0, -0.1, NAN, "x"), (0.0, 0.5)),
        SArg("antithetic", True, BAD_BOOL, (False,))]
    fm_groups = [
        ("sigma_min=sigma_max=0 (linear)", dict(schedule="linear", sigma_min=0.0, sigma_max=0.0), "error"),
        ("sigma_min>sigma_max (linear)", dict(schedule="linear", sigma_min=2.0, sigma_max=1.0), "error"),
        ("sigma_min>sigma_max (geometric)", dict(schedule="geometric", sigma_min=2.0, sigma_max=1.0), "error"),
        ("sigma_min=sigma_max (geometric)", dict(schedule="geometric", sigma_min=1.0, sigma_max=1.0), "error"),
        ("sigma_min=0 (geometric)", dict(schedule="geometric", sigma_min=0.0, sigma_max=1.0), "error"),
        ("sigma_min<0 (linear)", dict(schedule="linear", sigma_min=-1.0, sigma_max=1.0), "error"),
        ("sigma_max=nan (linear)", dict(schedule="linear", sigma_min=0.0, sigma_max=NAN), "error"),
        ("sigma_max=inf (geometric)", dict(schedule="geometric", sigma_min=1e-3, sigma_max=INF), "error"),
        ("sigma_min='0' (linear)", dict(schedule="linear", sigma_min="0", sigma_max=1.0), "error"),
        ("linear (0, 10)", dict(schedule="linear", sigma_min=0.0, sigma_max=10.0), "any"),
        ("geometric (1e-3, 1)", dict(schedule="geometric", sigma_min=1e-3, sigma_max=1.0), "any"),
        ("t=None", dict(t=None), "any"),
        ("t with a 0", dict(t=torch.tensor([0.5, 0.0, 0.7])), "error"),
        ("t with 1.5", dict(t=torch.tensor([0.5, 1.5, 0.7])), "error"),
    ]
    out.append(OpSpec("forward_mask", "public", mk.forward_mask, [
        TArg("x0", (3, 5), torch.int64, "ids", ok_dtypes=(torch.int32,)),
        TArg("t", (3,), f, "unit", optional=True)] + fm_scalars_pub + [SArg("sigma_min", None), SArg("sigma_max", None)],
        ("cpp", "reference"), groups=tuple(fm_groups)))
    out.append(OpSpec("forward_mask", "ops", ops.forward_mask, [
        TArg("x0", (3, 5), torch.int64, "ids", ok_dtypes=(torch.int32,)),
        TArg("t", (3,), f, "unit", optional=True),
        SArg("seed", 1, BAD_SEED_OPS, (-1, 2 ** 63 - 1)), SArg("offset", 2, BAD_SEED_OPS, (-5,)),
        SArg("mask_index", MASK, (-1, 1.5, None), (0,)),
        SArg("schedule", "loglinear", ("cosine2", None, 3), ("cosine", "cosinesqr")),
        SArg("eps", 1e-3, ("x", None, NAN, INF, -0.1, 1.0), (0.0,)),
        SArg("sigma_min", 0.0, ("x", None, NAN)), SArg("sigma_max", 0.0, ("x", None, INF)),
        SArg("sampling_eps", 1e-3, (1.0, -0.1, NAN, None), (0.0,)),
        SArg("antithetic", True, ("False",), (False,)),
        SArg("backend", None)], ("cpp", "reference"), positional=True, groups=tuple(
            g for g in [
                ("sigma_min=sigma_max=0 (linear)", dict(schedule="linear", sigma_min=0.0, sigma_max=0.0), "error"),
                ("sigma_min>sigma_max (geometric)", dict(schedule="geometric", sigma_min=2.0, sigma_max=1.0), "error"),
                ("sigma_min>sigma_max (linear)", dict(schedule="linear", sigma_min=2.0, sigma_max=1.0), "error"),
                ("sigma_min=0 (geometric)", dict(schedule="geometric", sigma_min=0.0, sigma_max=1.0), "error"),
                ("linear (0, 10)", dict(schedule="linear", sigma_min=0.0, sigma_max=10.0), "any"),
                ("t=None", dict(t=None), "any"),
                ("t with a 0", dict(t=torch.tensor([0.5, 0.0, 0.7])), "any"),      # no value check in the op
                ("t with 1.5", dict(t=torch.tensor([0.5, 1.5, 0.7])), "any"),
                ("t with NaN", dict(t=torch.tensor([0.5, NAN, 0.7])), "any")])))
    # ---- philox_uniform ----------------------------------------------------------------------------------------
    out.append(OpSpec("philox_uniform", "public", mk.philox_uniform, [
        SArg("rows", 3, (-1, 2 ** 32, 1.5, None, "3", True), (0,)),
        SArg("cols", 4, (-2, 2 ** 32, 2.0, None), (0, 1)),
        SArg("seed", 1, BAD_SEED_PUBLIC, (2 ** 64 - 1,)), SArg("offset", 0, BAD_SEED_PUBLIC, (2 ** 64 - 1,)),
        SArg("dtype", torch.float64, (torch.float16, torch.int64, "float64", None), (torch.float32,)),
        SArg("device", "cpu", ("nodevice", 3, None)),
        TArg("offset_tensor", (1,), torch.int64, "offset", optional=True)], ("cpp", "triton", "reference")))
    out.append(OpSpec("philox_uniform", "ops", ops.philox_uniform, [
        SArg("rows", 3, (-1, 2 ** 32, 1.5, None), (0,)), SArg("cols", 4, (-2, 2 ** 32, None), (0,)),
        SArg("seed", 1, BAD_SEED_OPS, (-1,)), SArg("offset", 0, BAD_SEED_OPS, (-1,)),
        SArg("dtype", torch.float64, (torch.float16, torch.int64, torch.bool, None), (torch.float32,)),
        SArg("device", torch.device("cpu"), ("nodevice", None)),
        SArg("backend", None),
        TArg("offset_tensor", (1,), torch.int64, "offset", optional=True)], ("cpp", "triton", "reference"),
        positional=True))
    # ---- sample_step -------------------------------------------------------------------------------------------
    ss_sc = [SArg("seed", 3, BAD_SEED_PUBLIC), SArg("offset", 1, BAD_SEED_PUBLIC),
             SArg("mask_index", MASK, (-1, V, 1.0, None, True), (0,)),
             SArg("temperature", 1.0, (0.0, -1.0, NAN, INF, 1e-40, 1e31, "1", None, True), (1e-3, 50.0)),
             SArg("top_k", 0, (-1, 2.0, None, "3", True), (1, 3, V - 1, V + 5)),
             SArg("top_p", 1.0, (0.0, -0.5, 1.5, NAN, None, "1"), (0.5, 1e-9)),
             SArg("greedy", False, BAD_BOOL, (True,)), SArg("validate", True, BAD_BOOL, (False,)),
             SArg("entropy", True, BAD_BOOL, (False,))]
    out.append(OpSpec("sample_step", "public", mk.sample_step, [
        TArg("logits", (4, V), f, "float", ok_dtypes=(torch.bfloat16,)),
        TArg("t", (4,), f, "unit"), TArg("s", (4,), f, "small"),
        TArg("row_ids", (4,), torch.int64, "rows", optional=True),
        TArg("offset_tensor", (1,), torch.int64, "offset", optional=True)] + ss_sc, ("cpp", "reference"),
        groups=(("t <= s", dict(t=torch.tensor([0.5, 0.3, 0.9, 0.9]), s=torch.tensor([0.1, 0.3, 0.1, 0.1])), "error"),
                ("t None, greedy", dict(t=None, s=None, greedy=True), "any"),
                ("t None, not greedy", dict(t=None), "error"))))
    out.append(OpSpec("sample_step", "ops", ops.sample_step, [
        TArg("logits", (4, V), f, "float", ok_dtypes=(torch.bfloat16,)),
        TArg("t", (4,), f, "unit", optional=True), TArg("s", (4,), f, "small", optional=True),
        TArg("row_ids", (4,), torch.int64, "rows", optional=True),
        SArg("seed", 3, BAD_SEED_OPS), SArg("offset", 1, BAD_SEED_OPS),
        SArg("mask_index", MASK, (-1, V, 1.0, None), (0,)),
        SArg("temperature", 1.0, (0.0, -1.0, NAN, INF, 1e-40, 1e31, None), (1e-3,)),
        SArg("top_k", 0, (-1, 2.0, None), (1, 3, V + 5)),
        SArg("top_p", 1.0, (0.0, 1.5, NAN, None), (0.5,)),
        SArg("greedy", False, ("False",), (True,)), SArg("backend", None),
        TArg("offset_tensor", (1,), torch.int64, "offset", optional=True),
        SArg("entropy", True, ("False",), (False,))], ("cpp", "reference"), positional=True,
        groups=(("t <= s", dict(t=torch.tensor([0.5, 0.3, 0.9, 0.9]), s=torch.tensor([0.1, 0.3, 0.1, 0.1])), "any"),
                ("t None, not greedy", dict(t=None), "error"))))
    # ---- subs_linear_cross_entropy -----------------------------------------------------------------------------
    lce = [TArg("hidden", (5, 8), f, "float", ok_dtypes=(torch.float16, torch.bfloat16), grad=True),
           TArg("weight", (V, 8), f, "float", ok_dtypes=(torch.float16, torch.bfloat16), grad=True),
           TArg("bias", (V,), f, "float", ok_dtypes=(torch.float16, torch.bfloat16), optional=True, grad=True)]
    out.append(OpSpec("subs_linear_cross_entropy", "public", mk.subs_linear_cross_entropy, lce + [
        TArg("targets", (5,), torch.int64, "ids", ok_dtypes=(torch.int32,)),
        TArg("row_weights", (5,), f, "pos", ok_dtypes=(torch.float64, torch.float16, torch.bfloat16), optional=True),
        SArg("mask_index", MASK, (-1, V, 1.5, "9", True), (None, 0)),
        SArg("validate", True, BAD_BOOL, (False,)), SArg("chunk_rows", None, (0, -1, 1.5, "2"), (1, 2, 1000))],
        ("triton", "reference"), grad=True))
    out.append(OpSpec("subs_linear_cross_entropy", "ops", ops.subs_linear_cross_entropy, [
        TArg("h", (5, 8), f, "float", ok_dtypes=(torch.float16, torch.bfloat16)),
        TArg("W", (V, 8), f, "float", ok_dtypes=(torch.float16, torch.bfloat16)),
        TArg("b", (V,), f, "float", ok_dtypes=(torch.float16, torch.bfloat16), optional=True),
        TArg("tgt", (5,), torch.int64, "ids"), TArg("w", (5,), f, "pos"),
        SArg("mask_index", MASK, (-2, V, 1.5, None), (-1, 0)),
        SArg("grad_h", True, ("True",), (False,)), SArg("grad_w", True, ("True",), (False,)),
        SArg("chunk_rows", 64, (0, -1, 1.5, None), (1, 2)), SArg("backend", None)],
        ("triton", "reference"), positional=True))
    # ---- adaln_modulate ----------------------------------------------------------------------------------------
    B_, L_, d_ = 2, 3, 8
    ad = [TArg("x", (B_, L_, d_), f, "float", ok_dtypes=F_OK, grad=True),
          TArg("weight", (d_,), f, "pos", ok_dtypes=F_OK, grad=True),
          TArg("mod", (B_, 2 * d_), f, "float", ok_dtypes=F_OK, grad=True)]
    idx = lambda n, v, k: SArg(n, v, (-1, k, 1.0, None, "0", True), ())  # noqa: E731
    out.append(OpSpec("adaln_modulate", "public", mk.adaln_modulate, ad + [
        idx("shift_idx", 0, 2), idx("scale_idx", 1, 2),
        SArg("out_dtype", None, (torch.int64, "float32", torch.bool), (torch.bfloat16, torch.float16)),
        SArg("eps", 1e-5, (-1.0, NAN, INF, "1e-5", None), (0.0, 1e-2))], ("triton", "reference"), grad=True,
        groups=(("shift_idx == scale_idx", dict(shift_idx=1, scale_idx=1), "error"),)))
    out.append(OpSpec("adaln_modulate", "ops", ops.adaln_modulate, [
        TArg("x", (B_, L_, d_), f, "float", ok_dtypes=F_OK), TArg("weight", (d_,), f, "pos", ok_dtypes=F_OK),
        TArg("mod", (B_, 2 * d_), f, "float", ok_dtypes=F_OK),
        SArg("shift_idx", 0, (-1, 2, None)), SArg("scale_idx", 1, (-1, 2, None)),
        SArg("out_dtype", f, (torch.int64, None), (torch.bfloat16,)),
        SArg("eps", 1e-5, (-1.0, NAN, INF, None), (0.0,)), SArg("backend", None)], ("triton", "reference"),
        positional=True, groups=(("shift_idx == scale_idx", dict(shift_idx=1, scale_idx=1), "error"),)))
    out.append(OpSpec("adaln_modulate_backward", "ops", ops.adaln_modulate_backward, [
        TArg("gy", (B_, L_, d_), f, "float", ok_dtypes=F_OK), TArg("x", (B_, L_, d_), f, "float", ok_dtypes=F_OK),
        TArg("weight", (d_,), f, "pos", ok_dtypes=F_OK), TArg("mod", (B_, 2 * d_), f, "float", ok_dtypes=F_OK),
        TArg("mean", (B_ * L_,), f, "stat"), TArg("rstd", (B_ * L_,), f, "statpos"),
        SArg("shift_idx", 0, (-1, 2, None)), SArg("scale_idx", 1, (-1, 2, None)),
        SArg("eps", 1e-5, (-1.0, NAN, None), (0.0,)), SArg("backend", None)], ("triton", "reference"),
        positional=True))
    # ---- gated_residual_modulate -------------------------------------------------------------------------------
    gr = [TArg("residual", (B_, L_, d_), f, "float", ok_dtypes=F_OK, grad=True),
          TArg("h", (B_, L_, d_), f, "float", ok_dtypes=F_OK, grad=True),
          TArg("mod", (B_, 6 * d_), f, "float", ok_dtypes=F_OK, grad=True)]
    out.append(OpSpec("gated_residual_modulate", "public", mk.gated_residual_modulate, gr + [
        idx("gate_idx", 2, 6),
        TArg("weight_next", (d_,), f, "pos", ok_dtypes=F_OK, optional=True, grad=True),
        idx("shift_idx", 0, 2), idx("scale_idx", 1, 2),
        SArg("p", 0.25, (-0.1, 1.5, NAN, "0.1", None), (0.0, 1.0)),
        SArg("seed", 5, BAD_SEED_PUBLIC[:-1]), SArg("offset", 1, BAD_SEED_PUBLIC),
        SArg("training", True, ("False", 1, None, "True"), (False,)),
        SArg("out_dtype", None, (torch.int64, "float32"), (torch.bfloat16,)),
        TArg("mod_next", (B_, 2 * d_), f, "float", ok_dtypes=F_OK, optional=True, grad=True),
        SArg("eps", 1e-5, (-1.0, NAN, INF, "1e-5", None), (0.0,))], ("triton", "reference"), grad=True,
        groups=(("shift_idx == scale_idx", dict(shift_idx=0, scale_idx=0), "error"),
                ("no mod_next, shift 3 / scale 4", dict(mod_next=None, shift_idx=3, scale_idx=4), "any"))))
    out.append(OpSpec("gated_residual_modulate", "ops", ops.gated_residual_modulate, [
        TArg("residual", (B_, L_, d_), f, "float", ok_dtypes=F_OK), TArg("h", (B_, L_, d_), f, "float", ok_dtypes=F_OK),
        TArg("mod", (B_, 6 * d_), f, "float", ok_dtypes=F_OK), SArg("gate_idx", 2, (-1, 6, None)),
        TArg("weight_next", (d_,), f, "pos", ok_dtypes=F_OK, optional=True),
        TArg("mod_next", (B_, 2 * d_), f, "float", ok_dtypes=F_OK, optional=True),
        SArg("shift_idx", 0, (-1, 2, None)), SArg("scale_idx", 1, (-1, 2, None)),
        SArg("p", 0.25, (-0.1, 1.5, NAN, None), (0.0, 1.0)), SArg("seed", 5, BAD_SEED_OPS, (-1,)),
        SArg("offset", 1, BAD_SEED_OPS), SArg("dropout", True, ("False",), (False,)),
        SArg("out_dtype", f, (torch.int64, None), (torch.bfloat16,)),
        SArg("eps", 1e-5, (-1.0, NAN, None), (0.0,)), SArg("backend", None)], ("triton", "reference"),
        positional=True))
    out.append(OpSpec("gated_residual_modulate_backward", "ops", ops.gated_residual_modulate_backward, [
        TArg("dr", (B_, L_, d_), f, "float", ok_dtypes=F_OK, optional=True),
        TArg("dy", (B_, L_, d_), f, "float", ok_dtypes=F_OK, optional=True),
        TArg("r", (B_, L_, d_), f, "float", ok_dtypes=F_OK), TArg("h", (B_, L_, d_), f, "float", ok_dtypes=F_OK),
        TArg("mod", (B_, 6 * d_), f, "float", ok_dtypes=F_OK), SArg("gate_idx", 2, (-1, 6, None)),
        TArg("weight_next", (d_,), f, "pos", ok_dtypes=F_OK, optional=True),
        TArg("mod_next", (B_, 2 * d_), f, "float", ok_dtypes=F_OK, optional=True),
        SArg("shift_idx", 0, (-1, 2, None)), SArg("scale_idx", 1, (-1, 2, None)),
        TArg("mean", (B_ * L_,), f, "stat"), TArg("rstd", (B_ * L_,), f, "statpos"),
        SArg("p", 0.25, (-0.1, 1.5, NAN, None), (0.0,)), SArg("seed", 5, BAD_SEED_OPS),
        SArg("offset", 1, BAD_SEED_OPS), SArg("dropout", True, ("False",), (False,)),
        SArg("eps", 1e-5, (-1.0, NAN, None)), SArg("backend", None)], ("triton", "reference"), positional=True))
    # ---- rotary_qkv --------------------------------------------------------------------------------------------
    Bq, Lq, Hq, Dq = 2, 3, 2, 4
    out.append(OpSpec("rotary_qkv", "public", mk.rotary_qkv, [
        TArg("qkv", (Bq, Lq, 3, Hq, Dq), f, "float", ok_dtypes=F_OK, grad=True),
        TArg("cos", (Lq + 1, Dq // 2), f, "unitcos", ok_dtypes=F_OK),
        TArg("sin", (Lq + 1, Dq // 2), f, "unitcos", ok_dtypes=F_OK)], ("triton", "reference"), grad=True))
    out.append(OpSpec("rotary_qkv", "ops", ops.rotary_qkv, [
        TArg("qkv", (Bq, Lq, 3, Hq, Dq), f, "float", ok_dtypes=F_OK),
        TArg("cos", (Lq, Dq // 2), f, "unitcos", ok_dtypes=F_OK),
        TArg("sin", (Lq, Dq // 2), f, "unitcos", ok_dtypes=F_OK), SArg("backend", None)], ("triton", "reference"),
        positional=True))
    out.append(OpSpec("rotary_qkv_backward", "ops", ops.rotary_qkv_backward, [
        TArg("dq", (Bq, Hq, Lq, Dq), f, "float", ok_dtypes=F_OK), TArg("dk", (Bq, Hq, Lq, Dq), f, "float", ok_dtypes=F_OK),
        TArg("dv", (Bq, Hq, Lq, Dq), f, "float", ok_dtypes=F_OK),
        TArg("cos", (Lq, Dq // 2), f, "unitcos", ok_dtypes=F_OK), TArg("sin", (Lq, Dq // 2), f, "unitcos", ok_dtypes=F_OK),
        SArg("dtype", f, (torch.int64, None), (torch.bfloat16,)), SArg("backend", None)], ("triton", "reference"),
        positional=True))
    out.append(OpSpec("rotary_tables", "public", mk.rotary_tables, [
        TArg("inv_freq", (3,), f, "pos", ok_dtypes=(torch.float64, torch.float16, torch.bfloat16)),
        SArg("seq_len", 5, (2.5, -1, None, "5", True), (0, 1))], (None,), backend_arg=None))
    # ---- bias_gelu ---------------------------------------------------------------------------------------------
    out.append(OpSpec("bias_gelu", "public", mk.bias_gelu, [
        TArg("x", (2, 3, 16), f, "float", ok_dtypes=F_OK, grad=True),
        TArg("bias", (16,), f, "float", ok_dtypes=F_OK, grad=True)], ("triton", "reference"), grad=True,
        groups=(("x = -1e12", dict(x=torch.full((2, 16), -1e12)), "any"),
                ("x = -1e13, bias 0", dict(x=torch.full((2, 16), -1e13), bias=torch.zeros(16)), "any"))))
    out.append(OpSpec("bias_gelu", "ops", ops.bias_gelu, [
        TArg("x", (2, 3, 16), f, "float", ok_dtypes=F_OK), TArg("bias", (16,), f, "float", ok_dtypes=F_OK),
        SArg("backend", None)], ("triton", "reference"), positional=True))
    out.append(OpSpec("bias_gelu_backward", "ops", ops.bias_gelu_backward, [
        TArg("g", (2, 3, 16), f, "float", ok_dtypes=F_OK), TArg("x", (2, 3, 16), f, "float", ok_dtypes=F_OK),
        TArg("bias", (16,), f, "float", ok_dtypes=F_OK), SArg("backend", None)], ("triton", "reference"),
        positional=True))
    out.append(OpSpec("bias_gelu_backward_recompute", "public", bias_gelu_backward_recompute, [
        TArg("g", (2, 3, 16), f, "float", dense_only=True), TArg("x", (2, 3, 16), f, "float", dense_only=True),
        TArg("bias", (16,), f, "float", ok_dtypes=F_OK)], ("triton", "reference"), mutated=("g",)))
    out.append(OpSpec("bias_gelu_backward_recompute", "ops", ops.bias_gelu_backward_recompute, [
        TArg("g", (2, 3, 16), f, "float", dense_only=True), TArg("x", (2, 3, 16), f, "float", dense_only=True),
        TArg("bias", (16,), f, "float", ok_dtypes=F_OK), SArg("backend", None)], ("triton", "reference"),
        positional=True, mutated=("g",)))
    # ---- gelu_mlp, attention -----------------------------------------------------------------------------------
    out.append(OpSpec("gelu_mlp", "public", gelu_mlp, [
        TArg("y", (2, 3, 8), f, "float", ok_dtypes=(torch.float64,), grad=True),
        TArg("w1", (16, 8), f, "float", ok_dtypes=(torch.float64,), grad=True),
        TArg("b1", (16,), f, "float", ok_dtypes=F_OK, grad=True),
        TArg("w2", (8, 16), f, "float", ok_dtypes=(torch.float64,), grad=True),
        TArg("b2", (8,), f, "float", ok_dtypes=(torch.float64,), optional=True, grad=True)],
        ("triton", "reference"), grad=True))
    out.append(OpSpec("attention", "public", attention, [
        TArg("q", (2, 2, 3, 4), f, "float", ok_dtypes=(torch.float64, torch.bfloat16, torch.float16), grad=True),
        TArg("k", (2, 2, 3, 4), f, "float", ok_dtypes=(torch.float64, torch.bfloat16, torch.float16), grad=True),
        TArg("v", (2, 2, 3, 4), f, "float", ok_dtypes=(torch.float64, torch.bfloat16, torch.float16), grad=True),
        SArg("causal", False, ("False", None, 1), (True,))], (None,), backend_arg=None, grad=True))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Values and mutations
# ---------------------------------------------------------------------------------------------------------------
def _values(kind: str, shape: tuple, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Valid values of a kind, created in float64 / int64 and cast to ``dtype``."""
    n = int(math.prod(shape))
    if kind == "ids":
        v = torch.randint(0, MASK, (n,), generator=g)
    elif kind == "rows":
        v = torch.randperm(max(n, 1), generator=g)[:n] + 7
    elif kind == "offset":
        v = torch.tensor([5] * n)
    else:
        u = torch.rand(n, generator=g, dtype=torch.float64)
        v = {"float": torch.randn(n, generator=g, dtype=torch.float64), "pos": 0.5 + u, "unit": 0.55 + 0.45 * u,
             "small": 0.5 * u, "unitcos": 2 * u - 1, "stat": 0.1 * (2 * u - 1), "statpos": 0.5 + u}[kind]
    v = v.reshape(shape)
    if dtype == torch.bool:
        return v != 0
    return v.to(dtype)


@dataclasses.dataclass
class Case:
    spec_index: int
    name: str
    arg: str                   # the argument a clear error must name ("*": any argument of the op)
    expect: str                # "error" | "agree" | "any"
    tensor: Optional[tuple] = None    # (arg name, mutation kind, param)
    overrides: Optional[dict] = None  # scalar / group overrides

    def key(self, spec: OpSpec) -> str:
        return f"{spec.op}[{spec.entry}] {self.name}"


def _tensor_mutations(a: TArg, n_tensors: int) -> list:
    """(name, arg, expect, (arg, kind, param)) of one tensor argument."""
    out = []
    for dt in DTYPES:
        if dt == a.dtype:
            continue
        ok = dt in a.ok_dtypes
        out.append((f"{a.name}: dtype {str(dt)[6:]}", a.name, "any" if ok else "error", (a.name, "dtype", dt)))
    out.append((f"{a.name}: rank+1", "*", "any", (a.name, "rank+1", None)))
    if len(a.shape) >= 1:
        out.append((f"{a.name}: rank-1", "*", "any", (a.name, "rank-1", None)))
    for i, s in enumerate(a.shape):
        out.append((f"{a.name}: dim{i}+1", "*", "any", (a.name, "dim", (i, s + 1))))
        if s > 1:
            out.append((f"{a.name}: dim{i}-1", "*", "any", (a.name, "dim", (i, s - 1))))
        out.append((f"{a.name}: dim{i}=0 (empty)", "*", "any", (a.name, "dim", (i, 0))))
    lay = "error" if a.dense_only else "agree"
    out.append((f"{a.name}: non-contiguous (strides x2)", a.name, lay, (a.name, "strided", None)))
    if len(a.shape) >= 2:
        out.append((f"{a.name}: transposed layout", a.name, lay, (a.name, "transposed", None)))
    if len(a.shape) >= 1 and a.shape[0] > 1:
        out.append((f"{a.name}: stride-0 (expanded row)", a.name, lay, (a.name, "expand", None)))
    # on meta while the others stay on the CPU: a device mismatch (an op with one tensor may run on meta)
    out.append((f"{a.name}: on meta", a.name, "error" if n_tensors > 1 else "any", (a.name, "meta", None)))
    if not a.optional:
        out.append((f"{a.name}: None", a.name, "error", (a.name, "none", None)))
    out.append((f"{a.name}: a Python list", a.name, "error", (a.name, "list", None)))
    if a.dtype.is_floating_point:
        for label, param in (("NaN", NAN), ("+inf", INF), ("-inf", -INF)):
            out.append((f"{a.name}: one {label}", a.name, "any", (a.name, "poke", param)))
        out.append((f"{a.name}: x 1e20", a.name, "any", (a.name, "scale", 1e20)))
        out.append((f"{a.name}: all -1e12", a.name, "any", (a.name, "fill", -1e12)))
    elif a.kind in ("ids", "rows"):
        bad = (-1, V, MASK, 2 ** 40) if a.kind == "ids" else (-1, 2 ** 32, 2 ** 40)
        for v in bad:
            out.append((f"{a.name}: an id {v}", a.name, "any", (a.name, "poke", v)))
    elif a.kind == "offset":
        out.append((f"{a.name}: 2 elements", a.name, "error", (a.name, "dim", (0, 2))))
    return out


def cases(spec_index: int, spec: OpSpec) -> list:
    out = []
    for a in spec.args:
        if isinstance(a, SArg):
            if a.name == "backend":
                continue
            for v in a.bad:
                out.append(Case(spec_index, f"{a.name}={v!r}", a.name, "error", overrides={a.name: v}))
            for v in a.ok:
                out.append(Case(spec_index, f"{a.name}={v!r} (valid)", a.name, "any", overrides={a.name: v}))
    for name, ov, expect in spec.groups:
        out.append(Case(spec_index, name, "*", expect, overrides=dict(ov)))
    n_tensors = sum(isinstance(a, TArg) for a in spec.args)
    for a in spec.args:
        if isinstance(a, TArg):
            for name, arg, expect, mut in _tensor_mutations(a, n_tensors):
                out.append(Case(spec_index, name, arg, expect, tensor=mut))
    return out


def _seed_of(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _mutate(t: torch.Tensor, kind: str, param, a: TArg, g: torch.Generator):
    """The mutated value of a tensor argument (``t`` holds its valid values)."""
    if kind == "dtype":
        if param.is_floating_point and not t.dtype.is_floating_point:
            return t.to(param)
        if not param.is_floating_point and param != torch.bool and t.dtype.is_floating_point:
            return (t * 3).round().to(param)
        return t.to(param)
    if kind == "rank+1":
        return t.unsqueeze(0).clone()
    if kind == "rank-1":
        return t.reshape(-1).clone() if t.dim() >= 2 else t.reshape(()).clone() if t.numel() == 1 else t[0].clone()
    if kind == "dim":
        i, s = param
        shape = list(t.shape)
        shape[i] = s
        return _values(a.kind, tuple(shape), t.dtype, g)
    if kind == "strided":
        big = torch.zeros(tuple(2 * s for s in t.shape), dtype=t.dtype)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "expand":
        return t[:1].expand(t.shape)
    if kind == "meta":
        return t.to("meta")
    if kind == "none":
        return None
    if kind == "list":
        return t.tolist()
    if kind == "poke":
        t = t.clone()
        t.view(-1)[min(1, t.numel() - 1)] = param
        return t
    if kind == "scale":
        return t * param
    if kind == "fill":
        return torch.full_like(t, param)
    raise ValueError(kind)


def _derived(spec: OpSpec, vals: dict) -> dict:
    """Valid values that depend on others (saved statistics of the backward ops: those of the forward)."""
    if spec.op == "adaln_modulate_backward" or spec.op == "gated_residual_modulate_backward":
        x = vals.get("x", vals.get("r"))
        if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.dim() == 3 and x.device.type == "cpu":
            var, mean = torch.var_mean(x.double(), dim=-1, unbiased=False)
            for k, v in (("mean", mean.reshape(-1)), ("rstd", torch.rsqrt(var + 1e-5).reshape(-1))):
                if isinstance(vals.get(k), torch.Tensor) and vals[k].shape == v.shape and vals[k].dtype == torch.float32:
                    vals[k] = v.float()
    return vals


def build(spec: OpSpec, case: Optional[Case], grad: bool):
    """(call values dict, leaves dict): fresh tensors for one call, the case's mutation applied; the same values
    on every call (seeded by the case)."""
    g = torch.Generator().manual_seed(_seed_of(spec.op + spec.entry + (case.name if case else "")))
    vals, leaves = {}, {}
    for a in spec.args:
        if isinstance(a, TArg):
            vals[a.name] = _values(a.kind, a.shape, a.dtype, g)
        else:
            vals[a.name] = a.value
    vals = _derived(spec, vals)
    if case is not None and case.tensor is not None:
        name, kind, param = case.tensor
        a = next(x for x in spec.args if x.name == name)
        vals[name] = _mutate(vals[name], kind, param, a, g)
    if case is not None and case.overrides:
        for k, v in case.overrides.items():
            vals[k] = v.clone() if isinstance(v, torch.Tensor) else v
    if grad:
        for a in spec.args:
            v = vals.get(a.name)
            if isinstance(a, TArg) and a.grad and isinstance(v, torch.Tensor) and v.dtype.is_floating_point \
                    and v.device.type == "cpu":
                base = v._base if v._base is not None else None
                if base is not None:      # a strided / expanded view: the leaf is its base
                    leaf = base.detach().clone().requires_grad_()
                    vals[a.name] = leaf.as_strided(v.shape, v.stride(), v.storage_offset())
                    leaves[a.name] = leaf
                else:
                    leaf = v.detach().clone().requires_grad_()
                    vals[a.name] = leaf
                    leaves[a.name] = leaf
    return vals, leaves


def _dense(v):
    if isinstance(v, torch.Tensor) and v.device.type != "meta":
        return v.contiguous()
    return v


def call(spec: OpSpec, vals: dict, backend: Optional[str], dense: bool = False):
    keep = {a.name for a in spec.args if isinstance(a, TArg) and a.dense_only}
    for k in list(vals):
        if dense and k not in keep:
            vals[k] = _dense(vals[k])
    if spec.backend_arg is not None:
        vals[spec.backend_arg] = backend
    if spec.positional:
        return spec.fn(*[vals[a.name] for a in spec.args])
    return spec.fn(**{a.name: vals[a.name] for a in spec.args if a.name in vals},
                   **({spec.backend_arg: backend} if spec.backend_arg else {}))


def _flat(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for e in x for t in _flat(e)]
    if x is None:
        return []
    return [torch.tensor(x)]


def run_once(spec: OpSpec, case: Optional[Case], backend: Optional[str], dense: bool):
    """Outputs (and input gradients) of one call: a list of tensors, or the exception."""
    grad = spec.grad
    try:
        vals, leaves = build(spec, case, grad)
        with torch.enable_grad() if grad else torch.no_grad():
            out = call(spec, vals, backend, dense)
        outs = [o.detach() for o in _flat(out)] + [vals[k].detach() for k in spec.mutated]
        if grad and leaves:
            diff = [o for o in _flat(out) if o.requires_grad and o.dtype.is_floating_point]
            if diff:
                g = torch.Generator().manual_seed(7)
                loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in diff if o.numel())
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
            outs += [leaves[k].grad if leaves[k].grad is not None else torch.zeros(0) for k in sorted(leaves)]
        return outs, None
    except Exception as e:  # noqa: BLE001 - every exception is classified by the caller
        return None, e


def agree(a: list, b: list) -> Optional[str]:
    """None if the two output lists agree, else why not."""
    if len(a) != len(b):
        return f"{len(a)} outputs vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if x.device.type == "meta" or y.device.type == "meta":
            continue
        if not x.dtype.is_floating_point:
            if not torch.equal(x, y):
                return f"output {i}: integers differ ({x.flatten()[:8].tolist()} vs {y.flatten()[:8].tolist()})"
            continue
        xd, yd = x.double(), y.double()
        if not torch.equal(xd.isnan(), yd.isnan()):
            return f"output {i}: NaN at different places ({int(xd.isnan().sum())} vs {int(yd.isnan().sum())})"
        for s in (INF, -INF):
            if not torch.equal(xd == s, yd == s):
                return f"output {i}: {s} at different places"
        fin = torch.isfinite(yd)
        if fin.any():
            rtol = RTOL.get(x.dtype, 1e-4)
            err = (xd[fin] - yd[fin]).abs().max().item()
            scale = yd[fin].abs().max().item()
            if err > rtol * scale + 1e-6:
                return f"output {i}: max abs difference {err:.3g} (scale {scale:.3g}, rtol {rtol})"
    return None


_ARG_RE = {}


def names_arg(msg: str, spec: OpSpec, arg: str) -> bool:
    names = [a.name for a in spec.args] if arg == "*" else [arg]
    extra = {"noise_eps": ["eps"], "eps": ["noise_eps"], "h": ["hidden"], "W": ["weight"], "b": ["bias"],
             "tgt": ["targets"], "w": ["row_weights"], "p": ["dropout probability"]}
    for n in list(names):
        names += extra.get(n, [])
    return any(re.search(r"(?<![A-Za-z0-9_])" + re.escape(n) + r"(?![A-Za-z0-9_])", msg) for n in names)


def judge(spec: OpSpec, case: Case, backend: Optional[str]) -> tuple[str, str]:
    """("clear" | "agreed" | "FAIL", detail) of one trial, in this process."""
    from mdlm_kernels.errors import BackendUnavailableError
    ref, ref_e = run_once(spec, case, "reference" if backend is not None else None, dense=True)
    got, got_e = run_once(spec, case, backend, dense=False)
    if got_e is not None:
        msg = f"{type(got_e).__name__}: {got_e}"
        if isinstance(got_e, BackendUnavailableError) and ref_e is None:
            return "clear", "unsupported by this backend: " + msg[:200]
        if ref_e is None:
            return "FAIL", f"the backend raised but the reference returned: {msg[:300]}"
        if type(got_e) is not type(ref_e):
            return "FAIL", f"exception type {type(got_e).__name__} vs the reference's {type(ref_e).__name__}: " \
                           f"{msg[:300]}"
        if not names_arg(str(got_e), spec, case.arg):
            return "FAIL", f"unclear error (names no argument {case.arg!r}): {msg[:300]}"
        return "clear", msg[:200]
    if case.expect == "error":
        return "FAIL", "returned a result for an input that must be rejected" + (
            "" if ref_e is not None else " (the reference accepts it too)")
    if ref_e is not None:
        return "FAIL", f"the reference raised ({type(ref_e).__name__}: {str(ref_e)[:200]}) but the backend returned"
    why = agree(got, ref)
    if why is not None:
        return "FAIL", "silent difference from the reference: " + why
    return "agreed", ""


# ---------------------------------------------------------------------------------------------------------------
# Selection, batches and the forkserver
# ---------------------------------------------------------------------------------------------------------------
def all_specs_and_cases():
    sp = specs()
    return sp, [cases(i, s) for i, s in enumerate(sp)]


def select(case_list: list, budget: Optional[int], seed: int = 15) -> list:
    """The indices of the cases to run: all of them (budget None), else a fixed sample of ``budget``: every
    multi-argument group, scalar mutations up to a third of the budget, then tensor mutations taken round-robin
    over the mutation kinds (dtype, shape, layout, device, values, ...) so that every kind of every op is tried;
    seeded, so every run draws the same cases."""
    if budget is None or len(case_list) <= budget:
        return list(range(len(case_list)))
    rng = random.Random(seed)
    groups = [i for i, c in enumerate(case_list) if c.tensor is None and c.name in _GROUP_NAMES(case_list)]
    scalars = [i for i, c in enumerate(case_list) if c.tensor is None and i not in groups]
    rng.shuffle(scalars)
    take = groups + scalars[:max(0, budget // 3 - len(groups))]
    by_kind: dict = {}
    for i, c in enumerate(case_list):
        if c.tensor is not None:
            by_kind.setdefault(c.tensor[1], []).append(i)
    for v in by_kind.values():
        rng.shuffle(v)
    kinds = sorted(by_kind)
    while len(take) < budget and any(by_kind.values()):
        for k in kinds:
            if by_kind[k] and len(take) < budget:
                take.append(by_kind[k].pop())
    return sorted(take)


def _GROUP_NAMES(case_list) -> set:
    return {c.name for c in case_list if c.tensor is None and c.arg == "*"}


def _child(spec_index: int, backend, indices: list, conn) -> None:
    """One batch: run the cases, send ("start", i) before and ("done", i, verdict, detail) after each."""
    torch.set_num_threads(1)
    import warnings
    warnings.simplefilter("ignore")
    sp, cl = all_specs_and_cases()
    spec = sp[spec_index]
    for i in indices:
        conn.send(("start", i))
        t0 = time.time()
        try:
            verdict, detail = judge(spec, cl[spec_index][i], backend)
        except BaseException as e:  # noqa: BLE001
            verdict, detail = "FAIL", "the judge itself failed: " + "".join(traceback.format_exception_only(e))[:300]
        conn.send(("done", i, verdict, detail, time.time() - t0))
    conn.send(("end",))
    conn.close()


@dataclasses.dataclass
class Result:
    op: str
    entry: str
    backend: str
    case: str
    verdict: str
    detail: str
    seconds: float = 0.0


def _run_batch(ctx, spec_index, spec, backend, indices, case_list, timeout) -> list:
    """Run one batch in subprocesses (resuming after a crash or a hang); one Result per case."""
    results, todo = [], list(indices)
    while todo:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(spec_index, backend, todo, child), daemon=True)
        p.start()
        child.close()
        running, done = None, set()
        deadline = time.time() + timeout
        ended = False
        while True:
            left = deadline - time.time()
            if left <= 0:
                break
            if parent.poll(min(left, 1.0)):
                try:
                    msg = parent.recv()
                except EOFError:
                    break
                if msg[0] == "start":
                    running = msg[1]
                elif msg[0] == "done":
                    _, i, verdict, detail, secs = msg
                    results.append(Result(spec.op, spec.entry, backend or "-", case_list[i].name, verdict, detail,
                                          secs))
                    done.add(i)
                    running = None
                else:
                    ended = True
                    break
            elif not p.is_alive() and not parent.poll(0):
                break
        if not ended:
            hang = time.time() >= deadline
            if p.is_alive():
                p.kill()
            p.join(5)
            if running is not None:
                what = (f"hang (no result within {timeout:.0f} s)" if hang
                        else f"crash (subprocess exit code {p.exitcode})")
                results.append(Result(spec.op, spec.entry, backend or "-", case_list[running].name, "FAIL", what))
                done.add(running)
            elif not hang:    # died between cases: blame the next one
                nxt = next((i for i in todo if i not in done), None)
                if nxt is not None:
                    results.append(Result(spec.op, spec.entry, backend or "-", case_list[nxt].name, "FAIL",
                                          f"crash (subprocess exit code {p.exitcode})"))
                    done.add(nxt)
        else:
            p.join(5)
        parent.close()
        todo = [i for i in todo if i not in done]
    return results


def _forkserver_context(preload: list):
    """The forkserver context with ``preload`` imported in the server under this process's import path.

    The server is started as ``python -c ...``, which puts the working directory first on its path, and the
    forkserver (3.10-3.13 at least) receives the parent's ``sys.path`` but does not apply it before the preload.
    Run from a checkout whose installed package is not editable, the preload then imports the source tree
    (``mdlm_kernels`` without its compiled ``_C``) instead of the installed package the tests run against. So
    the server is started here, once, from an empty temporary directory (the ``-c`` path entry then holds
    nothing; ``PYTHONSAFEPATH`` drops it on 3.11+) with ``PYTHONPATH`` set to this process's path; this
    process's working directory and environment are restored afterwards (the forked children return to this
    process's directory and ``sys.path`` themselves).
    """
    import atexit
    import shutil
    import tempfile
    from multiprocessing import forkserver
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    saved = {k: os.environ.get(k) for k in ("PYTHONSAFEPATH", "PYTHONPATH")}
    here, empty = os.getcwd(), tempfile.mkdtemp(prefix="mdlm_forkserver_")
    os.environ["PYTHONSAFEPATH"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)
    try:
        os.chdir(empty)
        forkserver.ensure_running()
    finally:
        os.chdir(here)
        # the server keeps the directory as its working directory (removing it under the live server broke
        # the children's MKL load): removed when this process exits
        atexit.register(shutil.rmtree, empty, True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


def run(run_all: Optional[bool] = None, ops: Optional[list] = None, backends: Optional[list] = None,
        entries: Optional[list] = None, jobs: int = 2, timeout: float = BATCH_TIMEOUT_S, verbose: bool = False):
    """Run the suite; returns (results, stats). ``run_all`` None: MDLM_BAD_INPUTS=all decides."""
    from concurrent.futures import ThreadPoolExecutor
    if run_all is None:
        run_all = os.environ.get("MDLM_BAD_INPUTS", "").strip().lower() == "all"
    from mdlm_kernels import backend as kb
    sp, cl = all_specs_and_cases()
    ctx = _forkserver_context(["torch", "mdlm_kernels", "mdlm_kernels.ops.mlp", "mdlm_kernels.ops.attention",
                               __name__ if __name__ != "__main__" else "bad_inputs"])
    jobs_list = []
    n_cases = n_valid = 0
    for i, spec in enumerate(sp):
        if ops and spec.op not in ops:
            continue
        if entries and spec.entry not in entries:
            continue
        idx = select(cl[i], None if run_all else DEFAULT_BUDGET)
        n_cases += len(idx)
        n_valid += sum(cl[i][k].name.endswith("(valid)") for k in idx)
        for b in spec.backends:
            if backends and b is not None and b not in backends:
                continue
            if b is not None and kb.unavailable_reason(b, "cpu") is not None:
                continue
            jobs_list.append((i, spec, b, idx))
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = [ex.submit(_run_batch, ctx, i, spec, b, idx, cl[i], timeout) for i, spec, b, idx in jobs_list]
        results = [r for f in futs for r in f.result()]
    stats = dict(cases=n_cases, valid=n_valid, tried=len(results), clear=sum(r.verdict == "clear" for r in results),
                 agreed=sum(r.verdict == "agreed" for r in results),
                 failed=sum(r.verdict == "FAIL" for r in results), seconds=time.time() - t0,
                 all=bool(run_all))
    return results, stats


def table(results: list, stats: dict) -> str:
    rows = {}
    for r in results:
        k = (r.op, r.entry, r.backend)
        d = rows.setdefault(k, [0, 0, 0, 0])
        d[0] += 1
        d[1] += r.verdict == "clear"
        d[2] += r.verdict == "agreed"
        d[3] += r.verdict == "FAIL"
    lines = [f"{'op':34s} {'entry':6s} {'backend':9s} {'tried':>5s} {'clear':>5s} {'agreed':>6s} {'failed':>6s}"]
    for (op, entry, b), (n, c, a, fl) in sorted(rows.items()):
        lines.append(f"{op:34s} {entry:6s} {b:9s} {n:5d} {c:5d} {a:6d} {fl:6d}")
    lines.append(f"{'total':34s} {'':6s} {'':9s} {stats['tried']:5d} {stats['clear']:5d} {stats['agreed']:6d} "
                 f"{stats['failed']:6d}")
    lines.append(f"{stats['cases'] - stats['valid']} generated bad inputs + {stats['valid']} valid alternatives "
                 f"({'all cases' if stats['all'] else 'default sample; MDLM_BAD_INPUTS=all for all'}), "
                 f"{stats['tried']} trials over the backends and entry points, {stats['seconds']:.0f} s; "
                 f"crashes, hangs, unclear errors and silent differences count as failed")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="generated bad inputs for every mdlm_kernels op")
    ap.add_argument("--all", action="store_true", help="every case (default: the fixed sample)")
    ap.add_argument("--op", nargs="+")
    ap.add_argument("--backend", nargs="+")
    ap.add_argument("--entry", nargs="+", choices=("public", "ops"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("-v", "--verbose", action="store_true", help="print every trial")
    a = ap.parse_args(argv)
    results, stats = run(True if a.all else None, a.op, a.backend, a.entry, a.jobs)
    for r in results:
        if a.verbose or r.verdict == "FAIL":
            print(f"{r.verdict:6s} {r.op}[{r.entry}] {r.backend}: {r.case}: {r.detail}")
    print(table(results, stats))
    return 0 if stats["failed"] == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
