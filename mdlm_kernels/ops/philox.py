"""Philox4x32-10 uniforms in (0, 1): the counter-based RNG every stochastic kernel builds on.

Convention (csrc/include/mdlm/philox.h documents it in full): element (r, c) of a (rows, cols)
array uses ctr = {c, r, offset_lo32, offset_hi32}, key = {seed_lo32, seed_hi32};
float64: uniform53(w0, w1), float32: uniform24(w0). Three bit-identical implementations:
Triton (tl.philox: same key split and round function as Random123), the compiled extension
(CPU twin / CUDA kernel from one header) and the PyTorch reference below.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _ext, backend as _backend
from .._dtypes import dtype_code
from .._triton import HAS_TRITON, tl, triton

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
    def _philox_uniform_kernel(out_ptr, n, cols, seed, off_lo, off_hi, IS_F64: tl.constexpr,
                               BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n
        row = idx // cols
        col = idx - row * cols
        c0 = col.to(tl.uint32)
        c1 = row.to(tl.uint32)
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


def _reference(rows, cols, seed, offset, dtype, device):
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


def _triton_launch(rows, cols, seed, offset, dtype, device):
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    n = rows * cols
    if n == 0:
        return out
    grid = (triton.cdiv(n, _TRITON_BLOCK),)
    with _backend.device_guard(device):
        _philox_uniform_kernel[grid](out, n, cols, seed, offset & _M32, offset >> 32,
                                     IS_F64=(dtype == torch.float64), BLOCK=_TRITON_BLOCK)
    return out


def _cpp_launch(rows, cols, seed, offset, dtype, device):
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    code = dtype_code(dtype)
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _ext.call("philox_uniform_cuda", out.data_ptr(), rows, cols, seed, offset, code, stream)
    else:
        _ext.call("philox_uniform_cpu", out.data_ptr(), rows, cols, seed, offset, code)
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
                       device: torch.device, backend: Optional[str] = None) -> torch.Tensor:
    device = torch.device(device)
    name = _backend.resolve(OP, backend, device, _SUPPORTED)
    return _IMPLS[name](rows, cols, _from_i64(seed), _from_i64(offset), dtype, device)


@_philox_uniform_op.register_fake
def _(rows, cols, seed, offset, dtype, device, backend=None):
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


def _check_dim(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"philox_uniform: {name} must be an int, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"philox_uniform: {name} must be >= 0, got {v}")
    if v > _M32:
        raise ValueError(f"philox_uniform: {name} must be < 2^32 (it is a uint32 Philox counter word), got {v}")
    return v


def philox_uniform(rows: int, cols: int, seed: int, offset: int = 0, dtype: torch.dtype = torch.float64,
                   device: Union[str, torch.device] = "cpu", backend: Optional[str] = None) -> torch.Tensor:
    """(rows, cols) tensor of Philox4x32-10 uniforms in the open interval (0, 1).

    seed, offset: Python ints in [0, 2^64). dtype: torch.float64 (53-bit uniforms, the default)
    or torch.float32 (24-bit). backend: None/"auto", "cpp" (alias "cuda"), "triton", "reference";
    MDLM_BACKEND sets it globally. All backends return bit-identical tensors.
    """
    rows = _check_dim("rows", rows)
    cols = _check_dim("cols", cols)
    seed = _check_u64("seed", seed)
    offset = _check_u64("offset", offset)
    if dtype not in _DTYPES:
        raise ValueError(f"philox_uniform: dtype must be torch.float64 or torch.float32, got {dtype}")
    device = torch.device(device)
    if backend is not None:
        _backend.normalize(backend)  # unknown names fail here, before tracing
    return torch.ops.mdlm.philox_uniform(rows, cols, _to_i64(seed), _to_i64(offset), dtype, device, backend)


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
