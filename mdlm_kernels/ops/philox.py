"""Philox4x32-10 uniforms in (0, 1): the counter-based RNG every stochastic kernel builds on.

Convention (csrc/include/mdlm/philox.h documents it in full): element (r, c) of a (rows, cols)
array uses ctr = {c, r, offset_lo32, offset_hi32}, key = {seed_lo32, seed_hi32};
float64: uniform53(w0, w1), float32: uniform24(w0). Three bit-identical implementations:
Triton (tl.philox: same key split and round function as Random123), the compiled extension
(CPU twin / CUDA kernel from one header) and the PyTorch reference below.

Device-side offset (CUDA graphs: a captured launch freezes its host ints): ``offset_tensor``, a
(1,) or () int64 tensor on the output device, moves the stream position to
(offset + uint64(offset_tensor[0])) mod 2^64, uint64() being the two's complement reinterpretation
(int64 -1 adds 2^64 - 1, i.e. subtracts 1). The "cpp" and "triton" kernels load it themselves when
they run (no host synchronisation; a replayed graph sees the tensor's current value); the
"reference" backend reads it on the host (``int(offset_tensor)``, a sync on a GPU).

Inputs are checked (metadata only: dtype, shape, device, scalar ranges) in the public function, in the body of
the registered op (``torch.ops.mdlm.*`` called directly is checked too) and in its fake kernel. The compiled
extension ``mdlm_kernels._C`` is PRIVATE (raw addresses; it may change between versions): call this op, not
``_C``. Its functions take every buffer as (address, nbytes) and check each access against nbytes before a
kernel runs, so a short buffer is a ValueError, never an out-of-bounds read or write.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _ext, backend as _backend
from .. import launch as _launch
from .._dtypes import dtype_code
from .._triton import HAS_TRITON, tl, triton
from . import _checks

OP = "philox_uniform"
_M32 = 0xFFFFFFFF
_U64 = 1 << 64
_I63 = 1 << 63
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_DTYPES = (torch.float64, torch.float32)

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit(do_not_specialize=["n", "cols", "seed", "off_lo", "off_hi"])
    def _philox_uniform_kernel(out_ptr, off_ptr, n, cols, seed, off_lo, off_hi, HAS_OFF_PTR: tl.constexpr,
                               IS_F64: tl.constexpr, BLOCK: tl.constexpr):
        # off_ptr: the device-side offset (one int64), read only when HAS_OFF_PTR
        pid = tl.program_id(0).to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n
        row = idx // cols
        col = idx - row * cols
        c0 = col.to(tl.uint32)
        c1 = row.to(tl.uint32)
        if HAS_OFF_PTR:
            # (host offset + uint64(*off_ptr)) mod 2^64: unsigned 64-bit addition, then split into words
            dev = tl.load(off_ptr).to(tl.uint64, bitcast=True)
            host = (off_hi.to(tl.uint64) << 32) | off_lo.to(tl.uint64)
            eff = host + dev
            c2 = tl.zeros([BLOCK], dtype=tl.uint32) + eff.to(tl.uint32)
            c3 = tl.zeros([BLOCK], dtype=tl.uint32) + (eff >> 32).to(tl.uint32)
        else:
            c2 = (idx * 0 + off_lo).to(tl.uint32)
            c3 = (idx * 0 + off_hi).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=10)
        if IS_F64:
            x = ((w0 >> 5).to(tl.uint64) << 26) | (w1 >> 6).to(tl.uint64)
            xf = x.to(tl.float64)
            u = tl.where(xf < 4503599627370496.0, xf + 0.5, xf) * 1.1102230246251565e-16  # 2^52, 2^-53
        else:
            y = w0 >> 8
            yf = y.to(tl.float32)
            u = tl.where(yf < 8388608.0, yf + 0.5, yf) * 5.960464477539063e-08  # 2^23, 2^-24
        if (pid + 1) * BLOCK <= n:   # full block: unmasked, so the store is 16 bytes per instruction
            tl.store(out_ptr + idx, u)
        else:
            tl.store(out_ptr + idx, u, mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _philox4x32_kernel(ctr_ptr, out_ptr, seed):
        c0 = tl.load(ctr_ptr + 0).to(tl.uint32)
        c1 = tl.load(ctr_ptr + 1).to(tl.uint32)
        c2 = tl.load(ctr_ptr + 2).to(tl.uint32)
        c3 = tl.load(ctr_ptr + 3).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=10)
        tl.store(out_ptr + 0, w0.to(tl.int64))
        tl.store(out_ptr + 1, w1.to(tl.int64))
        tl.store(out_ptr + 2, w2.to(tl.int64))
        tl.store(out_ptr + 3, w3.to(tl.int64))


# ---------------------------------------------------------------------------------------------
# Reference (plain PyTorch int64; every intermediate stays below 2^63)
# ---------------------------------------------------------------------------------------------
def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a constant uint32 a and uint32 values b (int64 tensor),
    via 16-bit halves of b so no product overflows int64."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    low = a * b_lo  # < 2^48
    high = a * b_hi  # < 2^48
    hi = (high + (low >> 16)) >> 16
    lo = (((high & 0xFFFF) << 16) + low) & _M32
    return hi, lo


def _philox_reference(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 words (Random123 round function)."""
    for i in range(10):
        if i:
            k0 = (k0 + PHILOX_W0) & _M32
            k1 = (k1 + PHILOX_W1) & _M32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _uniform_from_words(w0: torch.Tensor, w1: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float64:
        x = ((w0 >> 5) << 26) | (w1 >> 6)
        xf = x.to(torch.float64)
        return torch.where(x < (1 << 52), xf + 0.5, xf) * (2.0 ** -53)
    y = w0 >> 8
    yf = y.to(torch.float32)
    return torch.where(y < (1 << 23), yf + 0.5, yf) * (2.0 ** -24)


def _host_offset(offset: int, offset_tensor: Optional[torch.Tensor]) -> int:
    """The effective offset read on the HOST (reference backends only): (offset + uint64(t)) mod 2^64."""
    if offset_tensor is None:
        return offset
    return (offset + (int(offset_tensor.reshape(())) & (_U64 - 1))) & (_U64 - 1)


def _reference(rows, cols, seed, offset, dtype, device, offset_tensor=None):
    offset = _host_offset(offset, offset_tensor)
    row = torch.arange(rows, dtype=torch.int64, device=device).view(rows, 1).expand(rows, cols)
    col = torch.arange(cols, dtype=torch.int64, device=device).view(1, cols).expand(rows, cols)
    c2 = torch.full((rows, cols), offset & _M32, dtype=torch.int64, device=device)
    c3 = torch.full((rows, cols), offset >> 32, dtype=torch.int64, device=device)
    w0, w1, _, _ = _philox_reference(col, row, c2, c3, seed & _M32, seed >> 32)
    return _uniform_from_words(w0, w1, dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------
_TRITON_BLOCK = 1024


def _triton_launch(rows, cols, seed, offset, dtype, device, offset_tensor=None):
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    n = rows * cols
    if n == 0:
        return out
    has_off = offset_tensor is not None
    # without a device-side offset, `out` stands in for the pointer the kernel never reads
    _launch.launch(_launch.Plan(
        "philox_uniform", _philox_uniform_kernel, (triton.cdiv(n, _TRITON_BLOCK),),
        (out, offset_tensor if has_off else out, n, cols, seed, offset & _M32, offset >> 32),
        dict(HAS_OFF_PTR=has_off, IS_F64=(dtype == torch.float64), BLOCK=_TRITON_BLOCK), num_warps=4,
        vector_io=("st",)), device)
    return out


def _buf(t: Optional[torch.Tensor]) -> tuple:
    """A buffer argument of the compiled extension: (address, size in bytes) of a contiguous tensor, (0, 0) for
    None. The extension checks every access of a call against these sizes before a kernel runs."""
    if t is None:
        return (0, 0)
    if not t.is_contiguous():
        raise ValueError("internal: a buffer handed to the compiled extension must be contiguous")
    return (t.data_ptr(), t.numel() * t.element_size())


def _offset_buf(offset_tensor: Optional[torch.Tensor]) -> tuple:
    """The device-side offset for the compiled kernels ((0, 0) = none); never read on the host."""
    return (0, 0) if offset_tensor is None else _buf(offset_tensor.reshape(1))


def _cpp_launch(rows, cols, seed, offset, dtype, device, offset_tensor=None):
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    code = dtype_code(dtype)
    off = _offset_buf(offset_tensor)
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _ext.call("philox_uniform_cuda", _buf(out), rows, cols, seed, offset, code, stream, off)
    else:
        _ext.call("philox_uniform_cpu", _buf(out), rows, cols, seed, offset, code, off)
    return out


_IMPLS = {"cpp": _cpp_launch, "triton": _triton_launch, "reference": _reference}
_SUPPORTED = {"cpp": None, "triton": None, "reference": None}


# ---------------------------------------------------------------------------------------------
# torch.library registration (seed/offset travel as int64 two's complement: the schema's int)
# ---------------------------------------------------------------------------------------------
def _to_i64(v: int) -> int:
    return v - _U64 if v >= _I63 else v


def _from_i64(v: int) -> int:
    return v + _U64 if v < 0 else v


@torch.library.custom_op("mdlm::philox_uniform", mutates_args=())
def _philox_uniform_op(rows: int, cols: int, seed: int, offset: int, dtype: torch.dtype,
                       device: torch.device, backend: Optional[str] = None,
                       offset_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    device = torch.device(device)
    offset_tensor = _check_op(rows, cols, dtype, device, offset_tensor)  # before any pointer reaches a kernel
    name = _backend.resolve(OP, backend, device, _SUPPORTED)
    return _IMPLS[name](rows, cols, _from_i64(seed), _from_i64(offset), dtype, device, offset_tensor)


@_philox_uniform_op.register_fake
def _(rows, cols, seed, offset, dtype, device, backend=None, offset_tensor=None):
    _check_op(rows, cols, dtype, torch.device(device), offset_tensor)  # metadata only
    return torch.empty((rows, cols), dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def _check_u64(name: str, v, op: str = "philox_uniform") -> int:
    """v as a Python int in [0, 2^64) (seeds and offsets of every Philox-keyed op); errors name ``op``."""
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            import numpy as np

            if isinstance(v, np.integer):
                v = int(v)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be a Python int, got {type(v).__name__}")
    if not 0 <= v < _U64:
        raise ValueError(f"{op}: {name} must be in [0, 2^64), got {v}")
    return v


def _same_device(a: torch.device, b: torch.device) -> bool:
    """a and b name the same device (a CUDA device without an index is the current one)."""
    if a.type != b.type:
        return False
    if a.type == "cuda":
        cur = torch.cuda.current_device
        return (a.index if a.index is not None else cur()) == (b.index if b.index is not None else cur())
    return a.index is None or b.index is None or a.index == b.index


def _check_offset_tensor(x, device: torch.device, op: str = OP) -> Optional[torch.Tensor]:
    """The device-side Philox offset argument: None, or a (1,) / () int64 tensor on ``device``
    (shared by every Philox-keyed op; errors name ``op``). Reads no value."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: offset_tensor must be a torch.Tensor of shape (1,) and dtype torch.int64 (or None), "
                        f"got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise TypeError(f"{op}: offset_tensor must be torch.int64, got {x.dtype}")
    if x.dim() > 1 or x.numel() != 1:
        raise ValueError(f"{op}: offset_tensor must have shape (1,) or () (one int64), got {tuple(x.shape)}")
    if not _same_device(x.device, device):
        raise ValueError(f"{op}: offset_tensor is on {x.device} but the op runs on {device}; the kernel reads it "
                         "there, so it must be on the same device")
    return x


def _check_dim(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"philox_uniform: {name} must be an int, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"philox_uniform: {name} must be >= 0, got {v}")
    if v > _M32:
        raise ValueError(f"philox_uniform: {name} must be < 2^32 (it is a uint32 Philox counter word), got {v}")
    return v


def _check_op(rows, cols, dtype, device: torch.device, offset_tensor) -> Optional[torch.Tensor]:
    """The checks of the op (its body, its fake kernel and the public function): metadata only."""
    _check_dim("rows", rows)
    _check_dim("cols", cols)
    if dtype not in _DTYPES:
        raise TypeError(f"philox_uniform: dtype must be torch.float64 or torch.float32, got {dtype}")
    return _check_offset_tensor(offset_tensor, device, OP)


def philox_uniform(rows: int, cols: int, seed: int, offset: int = 0, dtype: torch.dtype = torch.float64,
                   device: Union[str, torch.device] = "cpu", backend: Optional[str] = None, *,
                   offset_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(rows, cols) tensor of Philox4x32-10 uniforms in the open interval (0, 1).

    seed, offset: Python ints in [0, 2^64). dtype: torch.float64 (53-bit uniforms, the default)
    or torch.float32 (24-bit). backend: None/"auto", "cpp" (alias "cuda"), "triton", "reference";
    MDLM_BACKEND sets it globally. All backends return bit-identical tensors.

    offset_tensor: optional device-side offset, a tensor of shape (1,) (or ()) and dtype torch.int64
    on ``device``. The stream position is then (offset + uint64(offset_tensor[0])) mod 2^64, uint64
    reinterpreting the int64's two's complement bits (-1 means 2^64 - 1). The "cpp" and "triton"
    kernels read it on the device when they run (no host sync), so a CUDA graph that captured this
    call and then advances the tensor in place (``off += 1``) draws a new stream on each replay. The
    "reference" backend reads it on the host (``int(offset_tensor)``: a synchronisation on a GPU).
    """
    rows = _check_dim("rows", rows)
    cols = _check_dim("cols", cols)
    seed = _check_u64("seed", seed)
    offset = _check_u64("offset", offset)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"philox_uniform: dtype must be a torch.dtype, got {type(dtype).__name__}")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"philox_uniform: device must be a str or torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"philox_uniform: device {device!r} is not a device ({e})") from None
    offset_tensor = _check_op(rows, cols, dtype, device, offset_tensor)
    _checks.backend_arg(OP, backend)  # unknown names fail here, before tracing
    return torch.ops.mdlm.philox_uniform(rows, cols, _to_i64(seed), _to_i64(offset), dtype, device, backend,
                                         offset_tensor)


def philox4x32(ctr: Sequence[int], key: Sequence[int], backend: Optional[str] = None) -> tuple:
    """Philox4x32-10 of one block (known-answer tests): 4 uint32 counter words, 2 uint32 key
    words -> 4 uint32 words, computed on the CPU by the chosen backend."""
    ctr = [int(c) for c in ctr]
    key = [int(k) for k in key]
    if len(ctr) != 4 or len(key) != 2:
        raise ValueError(f"philox4x32: need 4 counter words and 2 key words, got {len(ctr)} and {len(key)}")
    if not all(0 <= w <= _M32 for w in ctr + key):
        raise ValueError("philox4x32: words must be in [0, 2^32)")
    name = _backend.resolve("philox4x32", backend, "cpu", _SUPPORTED)
    if name == "cpp":
        return tuple(int(w) for w in _ext.call("philox4x32", ctr, key))
    if name == "triton":
        c = torch.tensor(ctr, dtype=torch.int64)
        out = torch.zeros(4, dtype=torch.int64)
        _philox4x32_kernel[(1,)](c, out, key[0] | (key[1] << 32))
        return tuple(int(w) & _M32 for w in out.tolist())
    words = _philox_reference(*(torch.tensor(w, dtype=torch.int64) for w in ctr), key[0], key[1])
    return tuple(int(w) for w in words)
