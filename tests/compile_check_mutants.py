"""Run by tests/test_compile_check.py in a subprocess (TRITON_INTERPRET unset): kernels with known defects, each
compiled for sm_90 through mdlm_kernels.compile_check, to show that the check reports each defect. Prints one JSON
object {case: [failure messages]}."""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mdlm_kernels import compile_check as cc  # noqa: E402
from mdlm_kernels.launch import Plan  # noqa: E402


@triton.jit
def copy_kernel(x_ptr, y_ptr, n, col, BLOCK: tl.constexpr, SKIP_COL: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if SKIP_COL:
        m = m & (offs != col)            # a runtime column in the mask: not uniform over 16-byte groups
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m), mask=m)


@triton.jit
def cumsum_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)           # BLOCK values over one warp: far more than 255 registers per thread
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, tl.cumsum(x * x, 0) + tl.cumsum(x, 0))


@triton.jit
def broken_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)           # BLOCK not a power of two: does not compile
    tl.store(x_ptr + offs, offs)


def m(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


n = 1 << 20
cases = {
    "vectorized": Plan("copy", copy_kernel, (n // 1024,), (m(n), m(n), n, 5), dict(BLOCK=1024, SKIP_COL=False),
                       num_warps=4, vector_io=("ld", "st")),
    "runtime_column_mask": Plan("copy", copy_kernel, (n // 1024,), (m(n), m(n), n, 5),
                                dict(BLOCK=1024, SKIP_COL=True), num_warps=4, vector_io=("ld", "st")),
    "occupancy_assumed_too_high": Plan("copy", copy_kernel, (n // 1024,), (m(n), m(n), n, 5),
                                       dict(BLOCK=1024, SKIP_COL=False), num_warps=4, blocks_per_sm=64),
    "spills": Plan("cumsum", cumsum_kernel, (1,), (m(16384, dtype=torch.float32), m(16384, dtype=torch.float32)),
                   dict(BLOCK=16384), num_warps=1),
    "does_not_compile": Plan("broken", broken_kernel, (1,), (m(3, dtype=torch.int32),), dict(BLOCK=3), num_warps=1),
}
out = {name: cc.failures(cc.compile_plan(plan, int(sys.argv[1]) if len(sys.argv) > 1 else 90))
       for name, plan in cases.items()}
print(json.dumps(out))
