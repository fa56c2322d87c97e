"""What every benchmark script shares: device sync, timing, the measured copy and matmul ceilings, the run's
environment record, and the import of the library from a source checkout. The scripts import from here and
never from each other.
"""
from __future__ import annotations

import datetime as _dt
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
try:
    import mdlm  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))
    import mdlm  # noqa: F401

__all__ = ["ROOT", "sync", "timed", "copy_bandwidth", "matmul_ceiling", "environment"]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters=20, warmup=3) -> float:
    """Seconds per call. On CUDA: back-to-back calls between two events (launches overlap the host work,
    so a kernel that takes longer than its Python wrapper is measured, not the wrapper); on CPU: median."""
    for _ in range(warmup):
        fn()
    sync(device)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / iters
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_bandwidth(device, nbytes=2 ** 30) -> float:
    """Measured device copy rate (bytes read + written per second): the bandwidth denominator."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), device)
    return 2 * nbytes / t


def matmul_ceiling(device, dtype, n: int, reps: int = 5) -> float:
    """Measured dense matmul rate (FLOP/s) for n x n x n in ``dtype``: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def environment(device) -> dict:
    """Where and with what a figure was measured (stored with every result)."""
    device = torch.device(device)
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
    except Exception:
        rev = None
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_revision": rev,
           "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
           "device": device.type, "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import pynvml
            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env
