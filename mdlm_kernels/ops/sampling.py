"""Fused categorical sampling step of MDLM (ancestral step t -> s, loglinear schedule): each masked row's
logits are read once (plus two 512-column chunks) to draw from the published categorical

    { v != MASK : p(v) (t - s) }  U  { MASK : s }        (unnormalised; p = softmax of logits / T)

by inversion with two 53-bit Philox uniforms per row, plus temperature, top-k / top-p (thresholds by a radix
select: a fixed number of passes, no sort, no bisection), greedy argmax and per-row confidences.

Conventions (csrc/include/mdlm/sampling.h documents them in full):
- keying: one Philox block per row, element (row = row_ids[i] (default i), col = 0xFFFFFFFF: the reserved
  row-draw column) at (seed, offset); u1 = uniform53 of its words 0-1, u2 of words 2-3. MASK stays iff s > 0
  and u1 < s / t; otherwise the class is the first v whose cumulative weight exceeds u2 * Z (weights
  w_v = exp((x_v - max) / T) over the kept classes, Z their sum). This stream is new (the earlier kernel raced
  Gumbel noise keyed per element): same law, different draws for the same seed.
- device-side offset (CUDA graphs): with ``offset_tensor`` (a (1,) or () int64 tensor next to the
  logits) the offset is (offset + uint64(offset_tensor[0])) mod 2^64 (two's complement: -1 adds
  2^64 - 1). The "cpp" kernels (CUDA kernel and CPU twin) load it when they run, never the host, so a
  captured graph that advances it in place draws a fresh step on each replay; the "reference"
  backend reads it on the host (``int(offset_tensor)``).
- accuracy of the kernels' law: per-element weights 2^d2 in float32 (d2 = (x - chunk max) log2(e) / T rounded
  twice, exact base-2 range reduction, degree-6 polynomial: <= 2^-22 relative), float32 sums within 512-column
  chunks and float64 sums over chunks and within the drawn chunk, 53-bit uniforms: each class's probability is
  exact to a relative ~2^-19.5 + |d| 2^-22 (d: its scaled gap to its chunk's maximum, nats), with no truncation of
  small probabilities above e^-87.7 ~ 9e-39 of the chunk's maximum (a 1e-9 class is drawn at rate
  1e-9 (1 +- 7e-6)). The temperature enters as log2(e) / T rounded to float32 (within 2^-24 of T). top-p's kept
  set is exact except where the mass above a class lies within ~2^-22 of top_p (float32-accurate masses).
  temperature must lie in [1e-30, 1e30].
- top-k keeps every class whose logit is >= the k-th largest (ties at the threshold are kept);
  top-p (after top-k, on p renormalised over the top-k set) keeps v iff the probability mass strictly
  above v is < top_p (ties kept; the top class always; the kernels sum the masses in 2^-40 fixed point).
  top_k = 0 / top_p = 1 disable them.
- greedy: argmax of the logits over v != MASK, lowest index on ties (t, s, RNG unused).
- confidence (N, 3) float32 of the (temperature-scaled, filtered) p: max prob, top1 - top2, entropy
  (NaN with entropy=False: not computed; the samplers pass it, none of them reads the entropy).
- invalid rows (NaN or +inf logit at a non-MASK column, no kept class above -inf, row id outside
  [0, 2^32), and unless greedy not 0 <= s < t <= 1) give token -1 and NaN confidences; the op never
  synchronises. ``validate=True`` (default) checks the tokens once afterwards (one host sync on a
  GPU) and raises ValueError naming the first invalid row; samplers pass validate=False in loops.

Backends: "cpp" (CUDA kernel / CPU twin from one header: bit-identical tokens and confidences; V <= 2^19) and
"reference" (plain PyTorch in float64 below: the spec of the law; any V). No Triton implementation.

Inputs are checked (metadata only: dtype, shape, device, scalar ranges) in the public function, in the body of
the registered op (``torch.ops.mdlm.*`` called directly is checked too) and in its fake kernel. The compiled
extension ``mdlm_kernels._C`` is PRIVATE (raw addresses; it may change between versions): call this op, not
``_C``. Its functions take every buffer as (address, nbytes) and check each access against nbytes before a
kernel runs, so a short buffer is a ValueError, never an out-of-bounds read or write.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .. import _ext, backend as _backend
from .._dtypes import dtype_code
from . import _checks
from .philox import (_M32, _buf, _check_offset_tensor, _check_u64, _from_i64, _host_offset, _offset_buf,
                     _philox_reference, _to_i64, _uniform_from_words)

ROW_DRAW_COL = 0xFFFFFFFF  # the reserved Philox column of row-level draws (csrc/include/mdlm/masking.h)
MAX_VOCAB_CPP = 1 << 19    # the compiled kernels' limit (kMaxVocab: their chunk tables); the reference has none

OP = "sample_step"
_DTYPES = (torch.float32, torch.bfloat16)
MIN_TEMPERATURE = 1e-30
MAX_TEMPERATURE = 1e30   # above it a float32 logit gap (at most 2 FLT_MAX) no longer overflows to a 0 weight only
                         # where the true weight underflows, and log2(e) / T leaves float32's normal range


class SampleOutput(NamedTuple):
    """Result of :func:`sample_step`."""

    tokens: torch.Tensor  # (N,) int64: drawn id, mask_index = stays masked, -1 = invalid row
    confidence: torch.Tensor  # (N, 3) float32: [max prob, top1 - top2, entropy (nats)]


# ---------------------------------------------------------------------------------------------
# Reference (plain PyTorch, float64): the definition
# ---------------------------------------------------------------------------------------------
def _row_uniforms(rid: torch.Tensor, seed: int, offset: int):
    """(u1, u2) float64 (N,): the two 53-bit uniforms of each row's Philox block at the reserved row-draw column."""
    N = rid.shape[0]
    device = rid.device
    col = torch.full((N,), ROW_DRAW_COL, dtype=torch.int64, device=device)
    c2 = torch.full((N,), offset & _M32, dtype=torch.int64, device=device)
    c3 = torch.full((N,), offset >> 32, dtype=torch.int64, device=device)
    w0, w1, w2, w3 = _philox_reference(col, rid, c2, c3, seed & _M32, seed >> 32)
    return _uniform_from_words(w0, w1, torch.float64), _uniform_from_words(w2, w3, torch.float64)


def _reference(logits, t, s, row_ids, seed, offset, mask_index, temperature, top_k, top_p, greedy,
               offset_tensor=None, entropy=True):
    offset = _host_offset(offset, offset_tensor)  # the reference reads the device-side offset on the host
    N, V = logits.shape
    device = logits.device
    ninf = float("-inf")
    x = logits.float()
    x = torch.where(x == 0, torch.zeros((), dtype=x.dtype, device=device), x)  # -0 -> +0
    nonmask = torch.ones(V, dtype=torch.bool, device=device)
    nonmask[mask_index] = False
    nm = nonmask.view(1, V).expand(N, V)
    bad = ((torch.isnan(x) | (x == float("inf"))) & nm).any(dim=1)
    inv_t = 1.0 / temperature
    keep = nm & ~torch.isnan(x)
    xk = torch.where(keep, x, torch.full((), ninf, device=device))
    if 0 < top_k < V - 1:
        kth = torch.topk(xk[:, nonmask], top_k, dim=1).values[:, -1:]
        keep = keep & (x >= kth)
    if top_p < 1.0:
        xk = torch.where(keep, x, torch.full((), ninf, device=device))
        xmax = xk.max(dim=1, keepdim=True).values
        fin = keep & (x > ninf)
        w = torch.where(fin, torch.exp((x.double() - xmax.double()) * inv_t), torch.zeros((), dtype=torch.float64,
                                                                                        device=device))
        target = top_p * w.sum(dim=1, keepdim=True)
        xs, order = torch.sort(xk, dim=1, descending=True, stable=True)
        ws = w.gather(1, order)
        excl = torch.cat([torch.zeros_like(ws[:, :1]), torch.cumsum(ws, dim=1)[:, :-1]], dim=1)
        last = ((excl < target).sum(dim=1, keepdim=True) - 1).clamp_min(0)  # excl is non-decreasing
        keep = keep & (x >= xs.gather(1, last))
    kept = keep & (x > ninf)
    empty = ~kept.any(dim=1)
    # scaled gaps to the kept maximum (float64): logits near +-FLT_MAX keep their differences (an absolute
    # x / T of ~1e38 would absorb log-sum-exp corrections)
    xmax = torch.where(kept, x, torch.full((), ninf, device=device)).max(dim=1, keepdim=True).values
    xmax = torch.where(torch.isfinite(xmax), xmax, torch.zeros_like(xmax))
    a = (x.double() - xmax.double()) * inv_t
    a_k = torch.where(kept, a, torch.full((), ninf, dtype=torch.float64, device=device))
    lse = torch.logsumexp(a_k, dim=1)
    if row_ids is None:
        rid = torch.arange(N, dtype=torch.int64, device=device)
    else:
        rid = row_ids.to(torch.int64)
    bad_rid = (rid < 0) | (rid > _M32)
    if greedy:
        token = torch.where(kept, x, torch.full((), ninf, device=device)).argmax(dim=1)
        bad_time = torch.zeros(N, dtype=torch.bool, device=device)
    else:
        # inverse CDF: MASK iff s > 0 and u1 < s / t; else the first class whose cumulative weight exceeds u2 Z
        u1, u2 = _row_uniforms(torch.where(bad_rid, torch.zeros_like(rid), rid), seed, offset)
        tt, ss = t.double(), s.double()
        bad_time = ~((ss >= 0) & (ss < tt) & (tt <= 1))
        w = torch.where(kept, torch.exp(a), torch.zeros((), dtype=torch.float64, device=device))
        cum = torch.cumsum(w, dim=1)
        target = (u2 * cum[:, -1]).view(N, 1)
        idx = (cum <= target).sum(dim=1)                              # the first column with cum > target
        last = torch.where(w > 0, torch.arange(V, device=device), torch.full((), -1, device=device)).max(dim=1).values
        idx = torch.where(idx >= V, last, idx).clamp_min(0)          # target >= Z by rounding: the last class
        mask_wins = (ss > 0) & (u1 < ss / tt)
        token = torch.where(mask_wins, torch.full_like(idx, mask_index), idx)
    p = torch.exp(a_k - lse.view(N, 1))
    top2 = torch.topk(p, 2, dim=1).values
    ent = -torch.where(kept & (p > 0), p * (a_k - lse.view(N, 1)), torch.zeros((), dtype=torch.float64,
                                                                                device=device)).sum(dim=1)
    if not entropy:                                                   # not requested: NaN, as the kernels
        ent = torch.full_like(ent, float("nan"))
    conf = torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], ent.clamp_min(0.0)], dim=1).to(torch.float32)
    invalid = bad | empty | bad_rid | bad_time
    token = torch.where(invalid, torch.full_like(token, -1), token)
    conf = torch.where(invalid.view(N, 1), torch.full((), float("nan"), device=device), conf)
    return token.contiguous(), conf.contiguous()


# ---------------------------------------------------------------------------------------------
# Host launcher of the compiled extension (CUDA kernel / CPU twin)
# ---------------------------------------------------------------------------------------------
def _cpp(logits, t, s, row_ids, seed, offset, mask_index, temperature, top_k, top_p, greedy, offset_tensor=None,
         entropy=True):
    logits = logits.contiguous()
    N, V = logits.shape
    device = logits.device
    tokens = torch.empty(N, dtype=torch.int64, device=device)
    conf = torch.empty((N, 3), dtype=torch.float32, device=device)
    if N == 0:
        return tokens, conf
    t, s, row_ids = (None if x is None else x.contiguous() for x in (t, s, row_ids))
    # every buffer travels with its size in bytes: the binding checks each access against it
    args = (_buf(logits), dtype_code(logits.dtype), _buf(t), _buf(s), _buf(row_ids), _buf(tokens), _buf(conf), N, V,
            seed, offset, mask_index, temperature, top_k, top_p, greedy)
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _ext.call("sample_step_cuda", *args, stream, _offset_buf(offset_tensor), entropy)
    else:
        _ext.call("sample_step_cpu", *args, _offset_buf(offset_tensor), (0, 0), entropy)
    return tokens, conf


_IMPLS = {"cpp": _cpp, "reference": _reference}
_SUPPORTED = {
    "cpp": None,
    "triton": lambda device: "sample_step has no Triton implementation",
    "reference": None,
}


# ---------------------------------------------------------------------------------------------
# torch.library registration (seed/offset travel as int64 two's complement: the schema's int)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mdlm::sample_step", mutates_args=())
def _sample_step_op(logits: torch.Tensor, t: Optional[torch.Tensor], s: Optional[torch.Tensor],
                    row_ids: Optional[torch.Tensor], seed: int, offset: int, mask_index: int, temperature: float,
                    top_k: int, top_p: float, greedy: bool, backend: Optional[str] = None,
                    offset_tensor: Optional[torch.Tensor] = None,
                    entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The op (arguments as :func:`sample_step`; t and s may be None only when greedy). Checked here (metadata
    only) before any pointer reaches a kernel."""
    _check_op(logits, t, s, row_ids, mask_index, temperature, top_k, top_p, greedy, offset_tensor, entropy)
    V = logits.shape[1]
    name = _backend.resolve(OP, backend, logits.device, {
        **_SUPPORTED, "cpp": lambda device: (f"the compiled kernels take V <= {MAX_VOCAB_CPP}, got {V}"
                                             if V > MAX_VOCAB_CPP else None)})
    return _IMPLS[name](logits, t, s, row_ids, _from_i64(seed), _from_i64(offset), mask_index, temperature, top_k,
                        top_p, greedy, offset_tensor, entropy)


@_sample_step_op.register_fake
def _(logits, t, s, row_ids, seed, offset, mask_index, temperature, top_k, top_p, greedy, backend=None,
      offset_tensor=None, entropy=True):
    _check_op(logits, t, s, row_ids, mask_index, temperature, top_k, top_p, greedy, offset_tensor, entropy)
    N = logits.shape[0]
    return logits.new_empty((N,), dtype=torch.int64), logits.new_empty((N, 3), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def _is_compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # pragma: no cover
        return False


def _err(msg: str) -> str:
    return f"sample_step: {msg}"


def _check_op(logits, t, s, row_ids, mask_index, temperature, top_k, top_p, greedy, offset_tensor,
              entropy=True) -> None:
    """Everything the kernels rely on, from metadata only (no value is read): shared by the public function, the
    op body and its fake kernel."""
    _checks.tensor(OP, "logits", logits, dtypes=_DTYPES, ndim=2)
    N, V = logits.shape
    device = logits.device
    if V < 2:
        _checks.fail(OP, f"logits: the vocabulary (logits.shape[1]) must have V >= 2 (MASK plus one class), got {V}")
    if V > 2**31 - 1:
        _checks.fail(OP, f"logits: V must be < 2^31, got {V}")
    _checks.bool_arg(OP, "greedy", greedy)
    _checks.bool_arg(OP, "entropy", entropy)
    for name, x in (("t", t), ("s", s)):
        if x is None:
            if not greedy:
                _checks.fail(OP, f"{name} must be a (N,) float32 tensor (None only with greedy=True)", TypeError)
        else:
            _checks.tensor(OP, name, x, dtypes=(torch.float32,), shape=(N,))
            _checks.on_device(OP, name, x, device, "logits")
    if row_ids is None:
        if N > _M32 + 1:
            _checks.fail(OP, f"logits: N must be <= 2^32 without row_ids (rows are uint32 Philox words), got {N}")
    else:
        _checks.tensor(OP, "row_ids", row_ids, dtypes=(torch.int64,), shape=(N,))
        _checks.on_device(OP, "row_ids", row_ids, device, "logits")
    _check_offset_tensor(offset_tensor, device, OP)
    _checks.int_arg(OP, "mask_index", mask_index, 0, V - 1)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        _checks.fail(OP, f"temperature must be a float, got {type(temperature).__name__}", TypeError)
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        _checks.fail(OP, f"temperature must be finite and > 0, got {temperature}")
    if temperature < MIN_TEMPERATURE:
        _checks.fail(OP, f"temperature must be >= {MIN_TEMPERATURE} (use greedy=True for the argmax), got "
                         f"{temperature}")
    if temperature > MAX_TEMPERATURE:
        _checks.fail(OP, f"temperature must be <= {MAX_TEMPERATURE}, got {temperature}")
    _checks.int_arg(OP, "top_k", top_k, 0)
    _checks.float_arg(OP, "top_p", top_p, 0.0, 1.0, lo_open=True)


def _diagnose(logits, t, s, row_ids, tokens, mask_index, greedy) -> str:
    """Message for the first invalid row (runs only when a row is invalid)."""
    bad = (tokens < 0).nonzero().flatten()
    i = int(bad[0])
    n = int(bad.numel())
    x = logits[i].detach().float().cpu().clone()
    x[mask_index] = 0.0
    why = []
    if bool(torch.isnan(x).any()):
        why.append("NaN logits")
    if bool((x == float("inf")).any()):
        why.append("+inf logits")
    if row_ids is not None:
        r = int(row_ids[i])
        if not 0 <= r <= _M32:
            why.append(f"row_ids: row id {r} outside [0, 2^32)")
    if not greedy:
        ti, si = float(t[i]), float(s[i])
        if not (0.0 <= si < ti <= 1.0):
            why.append(f"t={ti}, s={si} violate 0 <= s < t <= 1")
    if not why:
        why.append("no class with probability > 0 (all kept logits are -inf)")
    return _err(f"{n} invalid row(s); first: row {i}: " + "; ".join(why))


def sample_step(logits: torch.Tensor, t: Optional[torch.Tensor], s: Optional[torch.Tensor], seed: int,
                offset: int = 0, *, mask_index: int, row_ids: Optional[torch.Tensor] = None,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                validate: bool = True, backend: Optional[str] = None,
                offset_tensor: Optional[torch.Tensor] = None, entropy: bool = True) -> SampleOutput:
    """One exact ancestral sampling step t -> s for the rows of masked positions.

    logits: (N, V) float32 or bfloat16 (CPU or CUDA), the rows of MASKED positions only (the MASK
    column is ignored). t, s: (N,) float32 per-row times with 0 <= s < t <= 1 (may be None when
    ``greedy``). seed, offset: Python ints in [0, 2^64) (Philox key and stream position; a new step
    uses a new offset). row_ids: optional (N,) int64 Philox row words (default arange(N)), e.g. the flat
    positions of the masked rows so that a draw does not depend on which rows are masked.
    offset_tensor: optional device-side offset, a tensor of shape (1,) (or ()) and dtype torch.int64 on
    the logits' device; the Philox offset is then (offset + uint64(offset_tensor[0])) mod 2^64, uint64
    reinterpreting the int64's two's complement bits (-1 means 2^64 - 1). The "cpp" kernels read it on
    the device when they run (no host sync): capture the step in a CUDA graph together with an in-place
    ``offset_tensor += 1`` and every replay draws the next step (pass validate=False under capture).
    The "reference" backend reads it on the host (``int(offset_tensor)``: a synchronisation on a GPU).
    temperature > 0 (>= 1e-30; use greedy=True for the limit), top_k >= 0 (0: off), top_p in (0, 1]
    (1: off), greedy: argmax over v != MASK (ties -> lowest index).

    entropy: False skips the entropy (confidence[:, 2] is NaN), the one per-element term nothing else needs
    (~7% of the CUDA kernel's pass-1 instructions; tokens and the other confidences are the same bits); the
    samplers pass False.

    Returns SampleOutput(tokens (N,) int64, confidence (N, 3) float32 = [max prob, margin, entropy]).
    Invalid rows give token -1 (see the module docstring); ``validate=True`` raises ValueError for them
    after one host synchronisation (skipped under torch.compile). backend: None/"auto", "cpp" (alias
    "cuda") or "reference"; MDLM_BACKEND sets it globally.
    """
    _check_op(logits, t, s, row_ids, mask_index, temperature, top_k, top_p, greedy, offset_tensor, entropy)
    _checks.bool_arg(OP, "validate", validate)
    N = logits.shape[0]
    seed = _check_u64("seed", seed, OP)
    offset = _check_u64("offset", offset, OP)
    temperature = float(temperature)
    top_p = float(top_p)
    _checks.backend_arg(OP, backend)  # unknown names fail here, before tracing
    if greedy:
        t = s = None  # not read
    tokens, conf = torch.ops.mdlm.sample_step(logits, t, s, row_ids, _to_i64(seed), _to_i64(offset), mask_index,
                                              temperature, top_k, top_p, greedy, backend, offset_tensor, entropy)
    if validate and N > 0 and not _is_compiling():
        if bool((tokens < 0).any()):  # the one host synchronisation
            raise ValueError(_diagnose(logits, t, s, row_ids, tokens, mask_index, greedy))
    return SampleOutput(tokens, conf)
