"""Backend selection shared by every op.

Backends (in auto order):
  "cpp"       the compiled extension mdlm_kernels._C: its CUDA kernel for CUDA tensors, its CPU twin
              (same header code, OpenMP) for CPU tensors. Alias: "cuda".
  "triton"    Triton kernels; on CPU tensors only under TRITON_INTERPRET=1 (set before import).
  "reference" plain PyTorch, the spec; always available.

Forcing: the per-call ``backend=`` argument wins, else the environment variable MDLM_BACKEND
("auto" or empty = automatic). A forced backend that cannot run raises BackendUnavailableError
with the reason; automatic mode falls back along the order above, and says so once per device (a
RuntimeWarning, ``_announce_fallback``) whenever it passes over the compiled kernels on a CUDA device for a
reason of the build: the extension is missing (a source tree without a build) or was built without CUDA, or
it cannot run on this GPU -- an architecture with no image in the build (e.g. a V100 or T4 with the default
"80;90"), or a driver older than the toolkit (``cuda_image_reason``, decided once per device). A fallback on a
GPU is therefore never silent. (Op-specific limits, e.g. a dtype the CUDA kernel does not take, are not
announced: they are per call, not a property of the build.)

How an op uses it::

    impls = {"cpp": _cpp, "triton": _triton, "reference": _reference}
    name = backend.resolve("my_op", backend_arg, x.device,
                           {"cpp": None, "triton": lambda dev: "needs fp32" if bad else None,
                            "reference": None})
    return impls[name](...)

or in one call: ``backend.dispatch("my_op", impls, backend_arg, x.device, *args, supported=...)``.
A predicate receives the torch.device and returns None/True (ok), False (unsupported) or a
string (unsupported, with this reason). The generic availability (extension imported, CUDA
compiled, triton installed, interpreter mode) is checked here, so predicates only add
op-specific limits. ``last_used[op_name]`` records the backend chosen by the latest call.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Mapping, Optional, Union

import torch

from . import _ext, _triton
from .errors import BackendUnavailableError

BACKENDS = ("cpp", "triton", "reference")
ENV_VAR = "MDLM_BACKEND"
_ALIASES = {"cuda": "cpp", "ext": "cpp", "torch": "reference"}

Predicate = Optional[Callable[[torch.device], Union[bool, str, None]]]

# op name -> backend used by the latest call (tests and benchmarks read it)
last_used: dict[str, str] = {}


def normalize(name: Optional[str]) -> Optional[str]:
    """Canonical backend name, or None for automatic selection."""
    if name is None:
        return None
    key = str(name).strip().lower()
    if key in ("", "auto"):
        return None
    key = _ALIASES.get(key, key)
    if key not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} (or 'auto')")
    return key


def unavailable_reason(backend: str, device: Union[torch.device, str]) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` in this process, or None if it can."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type not in ("cpu", "cuda"):
            return f"the compiled extension supports cpu and cuda tensors, not {device.type}"
        if not _ext.available():
            return f"the compiled extension mdlm_kernels._C is not available ({_ext.error()})"
        if device.type == "cuda" and not _ext.cuda_compiled():
            return ("the extension was built without CUDA (nvcc not found at build time or "
                    "MDLM_SKIP_CUDA=1); rebuild with nvcc available")
        if device.type == "cuda":
            return cuda_image_reason(device)
        return None
    if backend == "triton":
        if not _triton.HAS_TRITON:
            return f"triton is not installed ({_triton.ERROR})"
        if device.type == "cuda":
            return None
        if device.type == "meta":
            from . import launch  # launchers record their plans for meta tensors inside launch.recording()
            if launch.is_recording(device):
                return None
            return "triton does not run on meta tensors (outside mdlm_kernels.launch.recording())"
        if device.type == "cpu":
            if not _triton.interpret_env():
                return "TRITON_INTERPRET=1 is needed to run Triton on CPU tensors"
            if not _triton.INTERPRETED:
                return ("TRITON_INTERPRET=1 was set after mdlm_kernels was imported; set it before "
                        "the import so the Triton kernels are created in interpreter mode")
            return None
        return f"triton does not run on {device.type} tensors"
    raise ValueError(f"unknown backend {backend!r}")


def _parse_archs(spec: str) -> list[tuple[int, int, str]]:
    """ "80;90a" -> [(8, 0, ""), (9, 0, "a")]: the compute capabilities the extension has SASS images for."""
    out = []
    for a in spec.replace(",", ";").split(";"):
        a = a.strip()
        if a:
            digits = "".join(c for c in a if c.isdigit())
            out.append((int(digits[:-1]), int(digits[-1]), a[len(digits):]))
    return out


def arch_mismatch(capability: tuple, archs: str) -> Optional[str]:
    """Why a build for ``archs`` (``_C.cuda_archs()``, e.g. "80;90"; the last one also embeds PTX, setup.py)
    cannot run on a GPU of compute capability ``capability`` (major, minor); None if it can.

    A SASS image for sm_XY runs on capability X.Z with Z >= Y (same major); an arch-specific sm_XYa image only on
    X.Y. The PTX of the last arch is JIT-compiled by the driver for any capability >= its own (not for an 'a'
    arch)."""
    parsed = _parse_archs(archs)
    if not parsed:
        return "the extension was built without CUDA archs"
    major, minor = int(capability[0]), int(capability[1])
    for maj, mnr, suffix in parsed:
        if suffix == "a" and (major, minor) == (maj, mnr):
            return None
        if suffix != "a" and major == maj and minor >= mnr:
            return None
    maj, mnr, suffix = parsed[-1]
    if suffix != "a" and (major, minor) >= (maj, mnr):
        return None
    built = ", ".join(f"sm_{m}{n}{s}" for m, n, s in parsed)
    return (f"the extension was built for {built} (+ PTX compute_{maj}{mnr}{suffix}), which cannot run on this GPU "
            f"(compute capability {major}.{minor}); rebuild with MDLM_CUDA_ARCHS including {major}{minor}")


_IMAGE_REASON: dict = {}
_WARNED: set = set()


def _device_capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def cuda_image_reason(device: Union[torch.device, str]) -> Optional[str]:
    """Why the compiled CUDA kernels cannot run on this CUDA device (None if they can), decided once per device:
    the device's compute capability against the archs the extension was built for, then the CUDA runtime's own
    answer (it loads a probe kernel built with the same flags: catches a driver too old for the toolkit or for
    the PTX)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _IMAGE_REASON:
        m = _ext.load()
        cap = _device_capability(index)
        reason = arch_mismatch(cap, m.cuda_archs())
        if reason is None:
            driver, runtime = m.cuda_versions()
            err = m.cuda_image_error(index)
            if err:
                reason = (f"the CUDA runtime cannot load the extension's kernels on cuda:{index} ({err}; driver "
                          f"{driver // 1000}.{driver % 1000 // 10}, runtime {runtime // 1000}.{runtime % 1000 // 10})")
        _IMAGE_REASON[index] = reason
    return _IMAGE_REASON[index]


def _announce_fallback(op_name: str, backend: str, device: torch.device, reason: str) -> None:
    """Automatic selection skipped the compiled CUDA kernels on a CUDA device for a reason of the build (missing,
    built without CUDA, no image for this GPU, driver too old): say so once per device, with the reason."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (backend, index)
    if key in _WARNED:
        return
    _WARNED.add(key)
    if not _ext.available():
        reason = f"{reason}; {_ext.BUILD_HINT}"
    import warnings
    warnings.warn(f"mdlm_kernels: the compiled CUDA kernels are not used on cuda:{index} ({reason}); ops fall back to "
                  f"Triton or PyTorch (first seen in {op_name}; said once per device)", RuntimeWarning, stacklevel=3)


def device_guard(device: Union[torch.device, str]):
    """Make ``device`` current while launching on it (Triton and the extension launch on the current
    device's current stream); a no-op context for CPU tensors."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dtype_predicate(allowed, *tensors) -> Callable[[torch.device], Optional[str]]:
    """A backend predicate: unsupported (with the reason) when a tensor's dtype is not in ``allowed``
    (None entries are ignored). Used by the Triton backends, which take fp32/bf16/fp16 only."""
    def pred(device):
        bad = [t.dtype for t in tensors if t is not None and t.dtype not in allowed]
        if bad:
            return f"the triton kernels support {tuple(allowed)}, got {bad[0]} (float64: use the reference backend)"
        return None
    return pred


def _predicate_reason(pred: Predicate, device: torch.device) -> Optional[str]:
    if pred is None:
        return None
    r = pred(device)
    if r is None or r is True:
        return None
    if r is False:
        return "this backend does not support these inputs"
    return str(r)


def resolve(op_name: str, requested: Optional[str], device: Union[torch.device, str],
            supported: Mapping[str, Predicate]) -> str:
    """Pick the backend for one call of ``op_name`` (see the module docstring)."""
    device = torch.device(device)
    source = "backend="
    forced = normalize(requested)
    if forced is None and requested is None:
        forced = normalize(os.environ.get(ENV_VAR))
        source = f"{ENV_VAR}={os.environ.get(ENV_VAR)!r}"
    if forced is not None:
        if forced not in supported:
            raise BackendUnavailableError(
                f"backend {forced!r} requested for {op_name} ({source}) but {op_name} has no {forced} "
                f"implementation (available: {tuple(b for b in BACKENDS if b in supported)})")
        reason = unavailable_reason(forced, device) or _predicate_reason(supported[forced], device)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {forced!r} requested for {op_name} ({source}) but {reason}")
        last_used[op_name] = forced
        return forced
    reasons = []
    for b in BACKENDS:
        if b not in supported:
            continue
        generic = unavailable_reason(b, device)
        reason = generic or _predicate_reason(supported[b], device)
        if reason is None:
            last_used[op_name] = b
            return b
        if b == "cpp" and device.type == "cuda" and generic is not None:
            _announce_fallback(op_name, b, device, generic)   # missing, CPU-only build, or not runnable here
        reasons.append(f"{b}: {reason}")
    raise BackendUnavailableError(f"no backend can run {op_name} on {device}: " + "; ".join(reasons))


def dispatch(op_name: str, impls: Mapping[str, Callable], requested: Optional[str],
             device: Union[torch.device, str], *args, supported: Optional[Mapping[str, Predicate]] = None,
             **kwargs):
    """resolve() over the backends in ``impls`` and call the chosen implementation."""
    preds = {b: (supported or {}).get(b) for b in impls}
    name = resolve(op_name, requested, device, preds)
    return impls[name](*args, **kwargs)
