"""Launch plans: every Triton kernel of mdlm_kernels is launched through :func:`launch`, so the settings a
launcher picks (grid, constexprs, ``num_warps``, ``num_stages``) exist as data that the compile-time GPU
check (:mod:`mdlm_kernels.compile_check`) can compile without a GPU.

A launcher asks :func:`gpu_of` what it is planning for (a :class:`GPU`: capability and SM count, or None for
the Triton interpreter on CPU tensors), builds a :class:`Plan` and calls ``launch(plan, device)``. Normally
that launches the kernel on the device's current stream. Inside ``recording(gpu)``, launchers called with
*meta* tensors plan for ``gpu`` and record the plan instead of launching, so the check sees exactly what the
launchers would run at a given shape, for a GPU that is not there (meta tensors carry shapes, dtypes and
strides, and their ``data_ptr()`` is the byte offset into an allocation, which models the 16-byte alignment
Triton specialises on; CUDA allocations are 512-byte aligned).

A plan also states what its launcher assumes about the compiled kernel, and the check asserts it:
``blocks_per_sm`` (the occupancy the grid was sized for: grids that loop over rows are sized
``sm_count * blocks_per_sm``) and ``vector_io`` (a memory-bound kernel: its full tiles must move 16 bytes per
global load ("ld") and / or store ("st") instruction).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Optional, Union

import torch

from .backend import device_guard

__all__ = ["GPU", "H100", "A100", "Plan", "gpu_of", "launch", "recording", "is_recording", "occupancy",
           "ARCH_LIMITS"]


@dataclasses.dataclass(frozen=True)
class GPU:
    """What a launcher needs to know about a GPU."""
    name: str
    capability: tuple            # (major, minor)
    sm_count: int

    @property
    def arch(self) -> int:
        return 10 * self.capability[0] + self.capability[1]


H100 = GPU("H100/H200 SXM (sm_90)", (9, 0), 132)   # the H200 has the H100's 132 SMs
A100 = GPU("A100 SXM (sm_80)", (8, 0), 108)


@dataclasses.dataclass
class Plan:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``."""
    name: str                    # what the launch does, e.g. "adaln_modulate.bwd"
    kernel: Any                  # the @triton.jit function
    grid: tuple
    args: tuple                  # runtime arguments, in the kernel's order
    constexprs: dict
    num_warps: Optional[int] = None      # GPU options (None: Triton's default); ignored by the interpreter
    num_stages: Optional[int] = None
    blocks_per_sm: int = 1       # occupancy the launcher assumes (grid sizing); the check asserts >= this
    vector_io: tuple = ()        # memory-bound: ("ld", "st") = its full tiles move 16 bytes per global load /
                                 # store instruction (checked)

    def options(self) -> dict:
        return {k: v for k, v in (("num_warps", self.num_warps), ("num_stages", self.num_stages)) if v is not None}


class _Recorder:
    def __init__(self, gpu: GPU):
        self.gpu = gpu
        self.plans: list[Plan] = []


_RECORDER: contextvars.ContextVar[Optional[_Recorder]] = contextvars.ContextVar("mdlm_launch_recorder",
                                                                                default=None)
_GPU_CACHE: dict = {}


@contextlib.contextmanager
def recording(gpu: GPU = H100):
    """Within this context, launchers called with meta tensors plan for ``gpu`` and append their plans to the
    yielded list instead of launching (backend selection treats meta tensors like CUDA tensors)."""
    rec = _Recorder(gpu)
    token = _RECORDER.set(rec)
    try:
        yield rec.plans
    finally:
        _RECORDER.reset(token)


def is_recording(device: Union[torch.device, str, None] = None) -> bool:
    """True inside ``recording()`` (and, if ``device`` is given, when it is a meta device)."""
    if _RECORDER.get() is None:
        return False
    return device is None or torch.device(device).type == "meta"


def gpu_of(device: Union[torch.device, str]) -> Optional[GPU]:
    """The GPU a launcher plans for: the CUDA device's properties (cached), the recorded GPU for meta tensors
    inside ``recording()``, None otherwise (the Triton interpreter on CPU tensors)."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _GPU_CACHE:
            p = torch.cuda.get_device_properties(idx)
            _GPU_CACHE[idx] = GPU(p.name, (p.major, p.minor), p.multi_processor_count)
        return _GPU_CACHE[idx]
    rec = _RECORDER.get()
    if rec is not None and device.type == "meta":
        return rec.gpu
    return None


def launch(plan: Plan, device: Union[torch.device, str]) -> None:
    """Launch ``plan`` on ``device`` (its current stream), or record it (meta tensors inside ``recording``)."""
    device = torch.device(device)
    rec = _RECORDER.get()
    if rec is not None and device.type == "meta":
        rec.plans.append(plan)
        return
    if device.type == "meta":
        raise RuntimeError(f"{plan.name}: cannot launch a Triton kernel on meta tensors (outside recording())")
    opts = plan.options() if device.type == "cuda" else {}
    with device_guard(device):  # the device's current stream
        plan.kernel[plan.grid](*plan.args, **plan.constexprs, **opts)


# ---------------------------------------------------------------------------------------------
# Occupancy (CUDA occupancy calculator rules for the archs this library is built for)
# ---------------------------------------------------------------------------------------------
ARCH_LIMITS = {
    # regs per SM, max warps per SM, max blocks per SM, shared memory per SM / per block (bytes), reserved per block
    80: dict(regs=65536, warps=64, blocks=32, smem_sm=167936, smem_block=166912, smem_reserved=1024),
    90: dict(regs=65536, warps=64, blocks=32, smem_sm=233472, smem_block=232448, smem_reserved=1024),
}


def occupancy(arch: int, regs_per_thread: int, num_warps: int, smem_bytes: int) -> int:
    """Resident blocks per SM of a kernel (0: it cannot launch). Registers are allocated per warp in units of
    256 (regs per thread rounded up to a multiple of 8); shared memory per block plus 1 KB reserved."""
    lim = ARCH_LIMITS[arch]
    if smem_bytes > lim["smem_block"] or regs_per_thread > 255 or num_warps * 32 > 1024:
        return 0
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_warps = lim["warps"] // num_warps
    by_smem = lim["smem_sm"] // (smem_bytes + lim["smem_reserved"])
    return max(0, min(by_regs, by_warps, by_smem, lim["blocks"]))
