"""Fused forward masking q(x_t | x_0) of MDLM: per-row time t, noise schedule, move chance, loss
weight, masked tokens and per-row masked counts in one kernel.

Conventions (csrc/include/mdlm/masking.h documents them in full):
- element (r, c) masks when uniform24 of Philox element (row=r, col=c) < move_chance_r (float32);
- the row draw r_i is uniform53 of Philox element (row=i, col=0xFFFFFFFF): that column is reserved
  for row-level draws; antithetic u_i = (r_i / B + i / B) mod 1, else u_i = r_i;
  t_i = (1 - sampling_eps) u_i + sampling_eps in float64, returned as float32;
- sigma, dsigma of the schedule in float64 from the float32 t; move_chance = 1 - exp(-sigma)
  ((1 - eps) t for loglinear), weight = dsigma / expm1(sigma) (1 / t for loglinear).

Backends: "cpp" (CUDA kernel / CPU twin from one header, bit-identical for t, loglinear move
chance and xt) and "reference" (plain PyTorch, below, built on the Philox reference). There is
no Triton implementation. On CPU the reference and the CPU twin agree bit for bit on t, xt and
row_counts; torch's float64 transcendentals (SLEEF) and the C library's can differ by one
float64 ulp, so sigma / weight / move_chance of the non-loglinear schedules can differ by one
float32 ulp (rarely).

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
from ..step_budget import host_side
from . import _checks
from .philox import _M32, _buf, _check_u64, _from_i64, _philox_reference, _reference as _philox_uniform_ref
from .philox import _to_i64, _uniform_from_words

OP = "forward_mask"
ROW_DRAW_COL = 0xFFFFFFFF  # reserved Philox column of the row-level draw
SCHEDULES = ("loglinear", "linear", "geometric", "cosine", "cosinesqr")
SCHEDULE_CODES = {name: i for i, name in enumerate(SCHEDULES)}  # mdlm::Schedule
_DEFAULT_SIGMAS = {"linear": (0.0, 10.0), "geometric": (1e-3, 1.0)}  # as mdlm.schedules.get_noise
_INT_MAX = {torch.int64: 2**63 - 1, torch.int32: 2**31 - 1}


class MaskOutput(NamedTuple):
    """Result of :func:`forward_mask`; every field has B rows."""

    xt: torch.Tensor  # (B, L), x0's dtype: mask_index where masked, else x0
    t: torch.Tensor  # (B,) float32 diffusion time
    sigma: torch.Tensor  # (B,) float32 total noise sigma(t)
    weight: torch.Tensor  # (B,) float32 SUBS loss weight dsigma / expm1(sigma)
    move_chance: torch.Tensor  # (B,) float32 1 - exp(-sigma)
    row_counts: torch.Tensor  # (B,) int32 masked positions per row


# ---------------------------------------------------------------------------------------------
# Reference (plain PyTorch): the header math op for op, float64 per row
# ---------------------------------------------------------------------------------------------
def _reference_time(B: int, seed: int, offset: int, sampling_eps: float, antithetic: bool, device):
    rows = torch.arange(B, dtype=torch.int64, device=device)
    col = torch.full((B,), ROW_DRAW_COL, dtype=torch.int64, device=device)
    c2 = torch.full((B,), offset & _M32, dtype=torch.int64, device=device)
    c3 = torch.full((B,), offset >> 32, dtype=torch.int64, device=device)
    w0, w1, _, _ = _philox_reference(col, rows, c2, c3, seed & _M32, seed >> 32)
    u = _uniform_from_words(w0, w1, torch.float64)
    if antithetic:
        n = torch.full((B,), float(B), dtype=torch.float64, device=device)  # tensor / tensor: IEEE division
        u = u / n + rows.to(torch.float64) / n
        u = torch.where(u >= 1.0, u - 1.0, u)
    return ((1.0 - sampling_eps) * u + sampling_eps).to(torch.float32)


def _reference_rows(t32: torch.Tensor, schedule: str, eps: float, sigma_min: float, sigma_max: float):
    """(sigma, weight, move_chance) float64 from the float32 t, as mdlm::row_params."""
    t = t32.to(torch.float64)
    if schedule == "loglinear":
        a = 1.0 - eps
        m = a * t
        sigma = -torch.log1p(-m)
        return sigma, torch.ones_like(t) / t, m
    if schedule == "linear":
        d = sigma_max - sigma_min
        sigma = sigma_min + t * d
        dsigma = torch.full_like(t, d)
    elif schedule == "geometric":
        smin = torch.full_like(t, sigma_min)
        smax = torch.full_like(t, sigma_max)
        sigma = torch.pow(smin, 1.0 - t) * torch.pow(smax, t)
        dsigma = sigma * (math.log(sigma_max) - math.log(sigma_min))
    else:
        a = 1.0 - eps
        x = t * math.pi / 2
        if schedule == "cosine":
            c = a * torch.cos(x)
            s = a * torch.sin(x)
        else:
            cx = torch.cos(x)
            c = a * (cx * cx)
            s = a * torch.sin(t * math.pi)
        sigma = -torch.log(eps + c)
        dsigma = (math.pi / 2) * s / (c + eps)
    return sigma, dsigma / torch.expm1(sigma), 1.0 - torch.exp(-sigma)


def _reference(x0, t, seed, offset, mask_index, schedule, eps, sigma_min, sigma_max, sampling_eps, antithetic):
    B, L = x0.shape
    device = x0.device
    if t is None:
        t32 = _reference_time(B, seed, offset, sampling_eps, antithetic, device)
    else:
        t32 = t.to(torch.float32).clone()
    sigma, weight, mc = _reference_rows(t32, schedule, eps, sigma_min, sigma_max)
    mc32 = mc.to(torch.float32)
    u = _philox_uniform_ref(B, L, seed, offset, torch.float32, device)
    masked = u < mc32[:, None]
    xt = x0.masked_fill(masked, mask_index).contiguous()
    counts = masked.sum(dim=1, dtype=torch.int32)
    return xt, t32, sigma.to(torch.float32), weight.to(torch.float32), mc32, counts


# ---------------------------------------------------------------------------------------------
# Host launcher of the compiled extension (CUDA kernel / CPU twin)
# ---------------------------------------------------------------------------------------------
def _cpp(x0, t, seed, offset, mask_index, schedule, eps, sigma_min, sigma_max, sampling_eps, antithetic):
    x0 = x0.contiguous()
    B, L = x0.shape
    device = x0.device
    xt = torch.empty_like(x0)
    t_out = torch.empty(B, dtype=torch.float32, device=device)
    sigma = torch.empty(B, dtype=torch.float32, device=device)
    weight = torch.empty(B, dtype=torch.float32, device=device)
    mc = torch.empty(B, dtype=torch.float32, device=device)
    counts = torch.empty(B, dtype=torch.int32, device=device)
    if B == 0:
        return xt, t_out, sigma, weight, mc, counts
    t = None if t is None else t.contiguous()     # None: the kernel draws t
    # every buffer travels with its size in bytes: the binding checks each access against it
    args = (_buf(x0), _buf(xt), dtype_code(x0.dtype), _buf(t), _buf(t_out), _buf(sigma), _buf(weight), _buf(mc),
            _buf(counts), B, L, seed, offset, mask_index, SCHEDULE_CODES[schedule], eps, sigma_min, sigma_max,
            sampling_eps, antithetic)
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _ext.call("forward_mask_cuda", *args, stream)
    else:
        _ext.call("forward_mask_cpu", *args)
    return xt, t_out, sigma, weight, mc, counts


_IMPLS = {"cpp": _cpp, "reference": _reference}
_SUPPORTED = {
    "cpp": None,
    "triton": lambda device: "forward_mask has no Triton implementation",
    "reference": None,
}


# ---------------------------------------------------------------------------------------------
# torch.library registration (seed/offset travel as int64 two's complement: the schema's int)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mdlm::forward_mask", mutates_args=())
def _forward_mask_op(x0: torch.Tensor, t: Optional[torch.Tensor], seed: int, offset: int, mask_index: int,
                     schedule: str, eps: float, sigma_min: float, sigma_max: float, sampling_eps: float,
                     antithetic: bool, backend: Optional[str] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op: x0 (B, L) int64 / int32, t None or (B,) float32 on x0's device; the scalars as
    :func:`forward_mask` after its defaults (sigma_min / sigma_max of the schedule resolved, noise_eps = eps).
    Checked here (metadata only) before any pointer reaches a kernel."""
    _check_op(x0, t, mask_index, schedule, eps, sigma_min, sigma_max, sampling_eps, antithetic)
    name = _backend.resolve(OP, backend, x0.device, _SUPPORTED)
    return _IMPLS[name](x0, t, _from_i64(seed), _from_i64(offset), mask_index, schedule, eps, sigma_min, sigma_max,
                        sampling_eps, antithetic)


@_forward_mask_op.register_fake
def _(x0, t, seed, offset, mask_index, schedule, eps, sigma_min, sigma_max, sampling_eps, antithetic, backend=None):
    _check_op(x0, t, mask_index, schedule, eps, sigma_min, sigma_max, sampling_eps, antithetic)
    B, L = x0.shape
    rows = lambda dtype: x0.new_empty((B,), dtype=dtype)  # noqa: E731
    return (x0.new_empty((B, L)), rows(torch.float32), rows(torch.float32), rows(torch.float32),
            rows(torch.float32), rows(torch.int32))


# ---------------------------------------------------------------------------------------------
# Host-side bound on the number of masked positions (no device read)
# ---------------------------------------------------------------------------------------------
def _bernstein_bound(mu: float, var: float, total: int, tail: float, multiple: int) -> int:
    """ceil(mu + delta), delta from Bernstein's inequality for a sum of independent Bernoullis with mean mu and
    variance var: P(S >= mu + delta) <= exp(-delta^2 / (2 (var + delta / 3))) = tail; rounded up to ``multiple``
    and capped at ``total``."""
    ell = math.log(1.0 / tail)
    delta = ell / 3.0 + math.sqrt(ell * ell / 9.0 + 2.0 * ell * var)
    bound = math.ceil(mu + delta)
    bound = -(-bound // multiple) * multiple if multiple > 1 else bound
    return int(min(total, bound))


def _schedule_args(schedule, sigma_min, sigma_max):
    if schedule not in SCHEDULE_CODES:
        raise ValueError(f"masked_rows_bound: unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    dmin, dmax = _DEFAULT_SIGMAS.get(schedule, (0.0, 0.0))
    return (dmin if sigma_min is None else float(sigma_min)), (dmax if sigma_max is None else float(sigma_max))


@torch._dynamo.assume_constant_result   # a function of its (constant) arguments only: traced as its value
def _any_t_bound(B: int, L: int, schedule: str, eps: float, smin: float, smax: float, sampling_eps: float,
                 antithetic: bool, tail: float, multiple: int) -> int:
    """The bound for every seed: each row's move chance at its worst t (antithetic: row i's t lies in the
    stratum ((1 - se) i / B + se, (1 - se) (i + 1) / B + se); otherwise in (se, 1])."""
    i = torch.arange(B, dtype=torch.float64)
    lo, hi = (i / B, (i + 1) / B) if antithetic else (torch.zeros(B, dtype=torch.float64), torch.ones(B, dtype=torch.float64))
    t_lo = ((1.0 - sampling_eps) * lo + sampling_eps).to(torch.float32)
    t_hi = ((1.0 - sampling_eps) * hi + sampling_eps).to(torch.float32)
    p_lo = _reference_rows(t_lo, schedule, eps, smin, smax)[2]
    p_hi = _reference_rows(t_hi, schedule, eps, smin, smax)[2]
    p_max = (torch.maximum(p_lo, p_hi) + 1e-6).clamp(0.0, 1.0)          # + float32 rounding of the kernel's p
    spans_half = (torch.minimum(p_lo, p_hi) <= 0.5) & (0.5 <= torch.maximum(p_lo, p_hi))
    v_max = torch.where(spans_half, 0.25, torch.maximum(p_lo * (1 - p_lo), p_hi * (1 - p_hi)) + 1e-6)
    return _bernstein_bound(float(L * p_max.sum()), float(L * v_max.sum()), B * L, tail, multiple)


def masked_rows_bound(B: int, L: int, seed: Optional[int], offset: int = 0, *, schedule: str = "loglinear",
                      noise_eps: float = 1e-3, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                      sampling_eps: float = 1e-3, antithetic: bool = True, tail: float = 1e-9,
                      multiple: int = 64) -> int:
    """An upper bound, computed on the host without reading the device, on the number of positions that
    :func:`forward_mask` (same B, L, seed, offset and schedule, t drawn by the kernel) masks, exceeded with
    probability at most ``tail``.

    The kernel's times t_b come from B Philox row draws, which the host repeats here (forward_mask on a (B, 1)
    CPU batch: the CPU twin, bit-identical to the CUDA kernel's t and move chance); given t, position (b, l) is masked independently with probability
    p_b = move_chance(t_b), so the count S is a sum of independent Bernoullis with mean mu = L sum_b p_b and
    variance v = L sum_b p_b (1 - p_b). Bernstein's inequality, P(S >= mu + delta) <= exp(-delta^2 / (2 (v +
    delta / 3))), gives delta = l / 3 + sqrt(l^2 / 9 + 2 l v) with l = ln(1 / tail). The bound is ceil(mu + delta)
    rounded up to ``multiple`` (GEMM tiles) and capped at B * L. At the published shape (B = 64, L = 1024,
    loglinear, antithetic t) mu ~ 32.8k, sqrt(v) ~ 105 and the bound is ~2% above the mean.

    ``seed=None``: a bound valid for every seed (each row's t at the worst end of its antithetic stratum; ~3.6%
    above the mean at the published shape; without antithetic sampling it is B * L). It depends on the shapes
    and the schedule only, so ``torch.compile`` treats it as a constant."""
    if not 0.0 < tail < 1.0:
        raise ValueError(f"masked_rows_bound: tail must be in (0, 1), got {tail}")
    smin, smax = _schedule_args(schedule, sigma_min, sigma_max)
    if B * L == 0:
        return 0
    if seed is None:
        return _any_t_bound(int(B), int(L), schedule, float(noise_eps), smin, smax, float(sampling_eps),
                            bool(antithetic), float(tail), int(multiple))
    with host_side():   # CPU tensors of the host's own: no device data is read
        # the kernel's own move chances: forward_mask on a (B, 1) CPU batch draws the same t (t depends on the row
        # draws, not on L) with the CPU twin (or its reference): B Philox blocks on the host, microseconds
        rows = forward_mask(torch.zeros((B, 1), dtype=torch.int64), seed, offset, mask_index=1, schedule=schedule,
                            noise_eps=noise_eps, sigma_min=sigma_min, sigma_max=sigma_max,
                            sampling_eps=sampling_eps, antithetic=antithetic)
        # P(uniform24 < p32) <= p32 + 2^-24 (the uniforms lie on a 2^-24 grid)
        p = (rows.move_chance.to(torch.float64) + 2.0 ** -24).clamp(0.0, 1.0)
        return _bernstein_bound(float(L * p.sum()), float(L * (p * (1.0 - p)).sum()), B * L, tail, multiple)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def _check_schedule(schedule, eps, smin, smax) -> None:
    """The schedule's parameters: finite, and a schedule whose loss weight dsigma / expm1(sigma) is finite and
    positive for t in (0, 1] (sigma increasing: sigma_min < sigma_max; sigma_min = sigma_max = 0 would give 0 / 0,
    a geometric sigma_min > sigma_max negative weights)."""
    if not isinstance(schedule, str) or schedule not in SCHEDULE_CODES:
        _checks.fail(OP, f"schedule: unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    _checks.float_arg(OP, "noise_eps", eps)
    _checks.float_arg(OP, "sigma_min", smin)
    _checks.float_arg(OP, "sigma_max", smax)
    if schedule == "linear" and not 0.0 <= smin < smax:
        _checks.fail(OP, f"sigma_min / sigma_max: the linear schedule needs 0 <= sigma_min < sigma_max, got "
                         f"sigma_min={smin}, sigma_max={smax}")
    if schedule == "geometric" and not 0.0 < smin < smax:
        _checks.fail(OP, f"sigma_min / sigma_max: the geometric schedule needs 0 < sigma_min < sigma_max, got "
                         f"sigma_min={smin}, sigma_max={smax}")
    if schedule not in _DEFAULT_SIGMAS and not 0.0 <= eps < 1.0:
        _checks.fail(OP, f"noise_eps must be in [0, 1) for the {schedule} schedule, got {eps}")


def _check_op(x0, t, mask_index, schedule, eps, smin, smax, sampling_eps, antithetic) -> None:
    """Everything the kernels rely on, from metadata only (no value is read): shared by the public function,
    the op body and its fake kernel."""
    _checks.tensor(OP, "x0", x0, dtypes=(torch.int64, torch.int32), ndim=2)
    B, L = x0.shape
    if B > _M32:
        _checks.fail(OP, f"x0: B must be < 2^32 (rows are uint32 Philox counter words), got {B}")
    if L > _M32:
        _checks.fail(OP, f"x0: L must be < 2^32 (columns are uint32 Philox counter words), got {L}")
    if L > 2**31 - 1:
        _checks.fail(OP, f"x0: L must be < 2^31 (row_counts is int32), got {L}")
    _checks.int_arg(OP, "mask_index", mask_index, 0, _INT_MAX[x0.dtype])
    _check_schedule(schedule, eps, smin, smax)
    _checks.float_arg(OP, "sampling_eps", sampling_eps, 0.0, 1.0, hi_open=True)
    _checks.bool_arg(OP, "antithetic", antithetic)
    if t is not None:
        _checks.tensor(OP, "t", t, dtypes=(torch.float32,), shape=(B,))
        _checks.on_device(OP, "t", t, x0.device, "x0")


def _is_compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # pragma: no cover
        return False


def forward_mask(x0: torch.Tensor, seed: int, offset: int = 0, *, mask_index: int, schedule: str = "loglinear",
                 noise_eps: float = 1e-3, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                 sampling_eps: float = 1e-3, antithetic: bool = True, t: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None) -> MaskOutput:
    """Forward masking q(x_t | x_0) of MDLM in one kernel.

    x0: (B, L) int64 or int32 token ids (CPU or CUDA). seed, offset: Python ints in [0, 2^64) (the
    Philox key and stream position: a new step uses a new offset). t: None to draw per-row times in
    the kernel (antithetic as published when ``antithetic``; t = (1 - sampling_eps) u + sampling_eps),
    or a (B,) float32 tensor in (0, 1] on x0's device used as is. schedule: "loglinear" (eps =
    noise_eps, default), "linear" / "geometric" (sigma_min, sigma_max; defaults as
    mdlm.schedules.get_noise: (0, 10) / (1e-3, 1)), "cosine" / "cosinesqr" (eps = noise_eps).

    Returns MaskOutput(xt, t, sigma, weight, move_chance, row_counts): xt has x0's dtype; t, sigma,
    weight (dsigma / expm1(sigma)), move_chance (1 - exp(-sigma)) are (B,) float32; row_counts (B,)
    int32 counts the masked positions of each row. Token ids are not range-checked (that would
    synchronise a GPU); neither are the values of a CUDA t. backend: None/"auto", "cpp" (alias
    "cuda") or "reference"; MDLM_BACKEND sets it globally.
    """
    if not isinstance(schedule, str) or schedule not in SCHEDULE_CODES:
        _checks.fail(OP, f"schedule: unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    smin, smax = 0.0, 0.0
    if schedule in _DEFAULT_SIGMAS:   # linear / geometric: the defaults of mdlm.schedules.get_noise
        dmin, dmax = _DEFAULT_SIGMAS[schedule]
        smin = _checks.float_arg(OP, "sigma_min", dmin if sigma_min is None else sigma_min)
        smax = _checks.float_arg(OP, "sigma_max", dmax if sigma_max is None else sigma_max)
    eps = _checks.float_arg(OP, "noise_eps", noise_eps)
    sampling_eps = _checks.float_arg(OP, "sampling_eps", sampling_eps)
    if t is not None and not isinstance(t, torch.Tensor):
        _checks.fail(OP, f"t must be None or a torch.Tensor, got {type(t).__name__}", TypeError)
    _check_op(x0, t, mask_index, schedule, eps, smin, smax, sampling_eps, antithetic)
    seed = _check_u64("seed", seed, OP)
    offset = _check_u64("offset", offset, OP)
    B = x0.shape[0]
    if t is not None:
        # the range check reads the values: CPU only (on a GPU it would synchronise), never while tracing
        if t.device.type == "cpu" and B > 0 and not _is_compiling():
            if not bool(((t > 0) & (t <= 1)).all()):
                raise ValueError("forward_mask: t must lie in (0, 1], got values in "
                                 f"[{t.min().item()}, {t.max().item()}]")
    _checks.backend_arg(OP, backend)  # unknown names fail here, before tracing
    xt, t_out, sigma, weight, mc, counts = torch.ops.mdlm.forward_mask(
        x0, t, _to_i64(seed), _to_i64(offset), mask_index, schedule, eps, smin, smax, sampling_eps, antithetic,
        backend)
    return MaskOutput(xt, t_out, sigma, weight, mc, counts)

