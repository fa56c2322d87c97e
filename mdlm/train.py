"""Training runs: the published MDLM recipe on this library's kernels, resumable, on one or many processes.

``python -m mdlm.train --preset tiny --data tinyshakespeare trainer.max_steps=200`` (or ``mdlm train ...``).

Recipe (published ``configs/config.yaml``): AdamW (lr 3e-4, betas 0.9/0.999, eps 1e-8, weight decay 0),
constant LR after a linear warm-up (or cosine decay), gradient clipping at 1.0, bf16 autocast on CUDA,
EMA 0.9999 with the (1+n)/(10+n) warm-up (``torch._foreach_lerp_``), gradient accumulation to
``loader.global_batch_size`` sequences per optimizer step over all processes.

Reproducibility: every random draw of a step is keyed by the run seed and the *global micro-batch index*
g (the masking kernel's seed, torch's RNG for dropout) and the data order is a pure function of (seed, g)
(``mdlm.data.ResumableBatchSampler``). A resumed run therefore repeats the uninterrupted one exactly, and
one process with accumulation sees the same micro-batches and draws as several processes without it.

Fault tolerance: checkpoints (``mdlm.checkpoint.save_training_checkpoint``) hold the model, EMA, optimizer,
LR schedule, step, data position, every RNG state and the trainer's counters, written atomically with the
last good checkpoint kept; the run resumes from ``<out_dir>/checkpoints`` automatically (falling back to
an older checkpoint if the newest is corrupt). SIGTERM / SIGINT finish the current step, save and exit; a
second signal (a second Ctrl-C) stops at once without saving (exit 128 + signal; the last checkpoint stays).
Checkpoints describe themselves: the config tree and ``model_meta`` (vocabulary, MASK id, tokenizer, data
settings) are stored with the weights, so ``mdlm eval`` / ``mdlm sample`` need no ``--preset``.
A non-finite loss or gradient skips the step (counted, logged); ``trainer.max_nonfinite`` in a row stop
the run with an error naming the step, without writing a checkpoint.

Progress: a bar on a terminal; otherwise plain lines on stderr at step 1, every ``trainer.log_every`` steps,
at the last step and at least every ``_Progress.interval_s`` seconds, each with loss, tokens/s, LR, elapsed
time and an estimate of the time left (on a CPU, an estimate over an hour points once to ``--quick``).
``--quick`` is a CPU-sized run (``mdlm.config.QUICK``).

Distributed: under ``torchrun`` the strategy is DDP (``trainer.strategy=ddp``) or FSDP2 ``fully_shard``
(``trainer.strategy=fsdp``), NCCL on GPUs and gloo on CPUs. Rank 0 writes logs and checkpoints.

Optimizer step on the device (``optimizer_step_on_device``): after the last backward, the global gradient
norm (fp64), the clip factor, the non-finite guard, AdamW (``DeviceAdamW``: torch's fused kernel, the clip
folded into its ``grad_scale``, the skip into its ``found_inf``) and the EMA update are all enqueued without
the host knowing whether the step is skipped; the host then reads (loss, grad norm, stop) ONCE, after
everything of the step has been enqueued, for logging, the non-finite counters, the stop agreement across
ranks, the applied-step count and the LR of the next step.

Host syncs: one per optimizer step (that read). The fused loss adds one per micro-batch (sizing the
masked-row gather).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import (CheckpointError, list_training_checkpoints, load_training_checkpoint, model_meta,
                         save_training_checkpoint)
from .config import QUICK, Config, apply_overrides, check_config, describe_model, model_differences, preset

__all__ = ["Trainer", "EMA", "DeviceAdamW", "NonFiniteError", "ForcedStop", "global_grad_norm", "clip_scale",
           "optimizer_step_on_device", "lr_factor", "micro_seed", "main"]

_MASK62 = (1 << 62) - 1


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient; the message names the step."""


class ForcedStop(KeyboardInterrupt):
    """A second SIGINT / SIGTERM during a run: stop now, without finishing the step or saving."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


def micro_seed(seed: int, g: int, stream: int = 0) -> int:
    """A 62-bit seed for global micro-batch ``g`` of a run seeded ``seed`` (splitmix64 finaliser): the
    masking kernel's seed and torch's RNG for dropout. ``stream`` separates validation from training."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(g) + (int(stream) << 48) + 1) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK62


def lr_factor(cfg, step: int) -> float:
    """Multiplier of ``optim.lr`` after ``step`` optimizer updates (``lr_scheduler.type``)."""
    sc, lr = cfg.lr_scheduler, float(cfg.optim.lr)
    if lr == 0.0:                                    # optim.lr = 0 (allowed: a dry run): any factor gives 0
        return 1.0
    if sc.type == "constant_warmup":                 # transformers' constant schedule with warm-up
        w = int(sc.warmup_steps)
        return step / w if step < w else 1.0
    if sc.type == "cosine_decay_warmup":             # timm cosine with a warm-up prefix, one cycle
        w = float(sc.warmup_fraction) * int(cfg.trainer.max_steps)    # a float, as the published config
        lr0, lr_min = float(sc.warmup_lr_init), float(sc.lr_min)
        if step < w:
            return (lr0 + step * (lr - lr0) / w) / lr
        total = max(1e-9, int(cfg.trainer.max_steps) - w)
        t = min(step - w, total)
        return (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / total))) / lr
    raise ValueError(f"unknown lr_scheduler.type {sc.type!r}; constant_warmup or cosine_decay_warmup")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The process-local storage of a tensor: the shard of an FSDP2 DTensor parameter, else itself."""
    t = t.detach()
    return t._local_tensor if hasattr(t, "_local_tensor") else t


class EMA:
    """Published EMA of the parameters: decay min(decay, (1+n)/(10+n)) after the n-th update, as one
    fused ``torch._foreach_lerp_`` over all tensors (shadow += (1-decay) (param - shadow)). Under FSDP2
    the shadow is sharded like the parameters (DTensor) and updated shard-locally.

    ``update()`` applies an update the host knows about. ``update(found_inf=f)`` (a 0-dim float32 tensor on
    the parameters' device, 1.0 when the optimizer step was skipped, else 0.0) issues the update without the
    host knowing: the lerp weight is (1 - f) (1 - decay), computed on the device, so a skipped step lerps by 0
    (shadow + 0 * (param - shadow): every value unchanged; only a shadow entry of -0.0 may become +0.0). The
    caller adds 1 to ``num_updates`` once it has read that the step was applied (n counts applied updates).

    Memory traffic: one pass reading shadow and param and writing shadow (3 x 4 bytes per parameter). The
    tensor-weight form is ``_foreach_lerp_.List`` with the same 0-dim weight for every tensor: on CUDA that
    is torch's per-tensor slow path (one ``lerp_`` kernel per parameter tensor, same bytes) since no foreach
    lerp overload takes a device scalar; the alternative with fast-path foreach ops (sub, mul by the tensor,
    add) would move 8 x 4 bytes per parameter instead of 3 x 4."""

    def __init__(self, params, decay: float = 0.9999):
        self.params = [p for p in params if p.requires_grad]
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in self.params]

    def next_weight(self) -> float:
        """1 - decay of the next applied update (the published warm-up (1+n)/(10+n), n = num_updates + 1)."""
        n = self.num_updates + 1
        return 1.0 - min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor | None = None) -> None:
        shadow, live = [_local(s) for s in self.shadow], [_local(p) for p in self.params]
        if found_inf is None:
            w = self.next_weight()
            self.num_updates += 1
            torch._foreach_lerp_(shadow, live, w)
            return
        # (1-d) - (1-d) * f in one op: f in {0, 1} gives exactly fp32(1-d) or +0 (the value the scalar
        # overload would use, fp32(1-d), when applied)
        w = self.next_weight()
        weight = torch.rsub(found_inf, w, alpha=w)
        torch._foreach_lerp_(shadow, live, [weight] * len(shadow))

    @contextlib.contextmanager
    def averaged(self):
        """Temporarily put the EMA weights into the model (validation, sampling)."""
        live = [p.detach().clone() for p in self.params]
        self._copy_into_params(self.shadow)
        try:
            yield
        finally:
            self._copy_into_params(live)

    @torch.no_grad()
    def _copy_into_params(self, values) -> None:
        if any(hasattr(p, "_local_tensor") for p in self.params):
            # FSDP2 parameters: copy through the DTensor (FSDP re-registers the shard storage around its
            # forward, so writes into a cached local view do not reliably reach the parameter)
            for p, v in zip(self.params, values):
                p.detach().copy_(v)
        else:
            torch._foreach_copy_([p.detach() for p in self.params], list(values))


class DeviceAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay, no amsgrad) on torch's fused kernel, with the gradient
    clip and the non-finite guard handed in as device tensors, so that no host read has to precede it.

    ``step(grad_scale=s, found_inf=f)``, both 0-dim float32 tensors on the parameters' device:

    1. ``torch._fused_adamw_`` (one launch per device and dtype on CUDA, multi-tensor-apply) reads p, g, m, v
       and writes p, m, v; with ``grad_scale`` it uses g / s as the gradient (one IEEE fp32 division,
       correctly rounded on CPU and CUDA) and also writes g / s back into ``.grad`` (GradScaler's contract:
       one more write of g). With ``found_inf == 1.0`` it returns before touching anything (CPU: checked
       once before the loop; CUDA: checked by every block on the device).
    2. The step counters advance by 1 - f (one foreach add of a device scalar), so a skipped step leaves
       them as they were, as torch's GradScaler path does (it adds 1, then subtracts f).

    Without the tensors it is plain fused AdamW. The optimizer state is torch.optim.AdamW's (``step``,
    ``exp_avg``, ``exp_avg_sq`` per parameter; ``step`` a float32 tensor on the parameter's device), so
    checkpoints written with ``foreach`` or ``fused`` AdamW load into it and the other way round:
    ``load_state_dict`` puts the flags and the ``step`` tensors into this form. Under FSDP2 the kernel runs on
    the local shards of parameters, gradients and state (DTensors), as the EMA does."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize") or group.get("differentiable"):
                raise ValueError("DeviceAdamW: optimizer state with amsgrad / maximize / differentiable set cannot "
                                 "be resumed (the trainer's AdamW uses none of them)")
            # the saved flags (e.g. foreach=True from a CPU run of the earlier trainer) are not how this
            # optimizer steps: state them as they are
            group.update(fused=True, foreach=False, capturable=False)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    stp = st["step"]
                    stp = stp if torch.is_tensor(stp) else torch.tensor(float(stp))
                    st["step"] = stp.to(dtype=torch.float32, device=_local(p).device)

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if len(st) == 0:        # torch.optim.AdamW's lazy initialisation (fused: step on the device)
            st["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None):
        if closure is not None:
            raise ValueError("DeviceAdamW.step takes no closure")
        for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if t is not None and (t.dtype != torch.float32 or t.dim() != 0):
                raise ValueError(f"DeviceAdamW.step: {name} must be a 0-dim float32 tensor, got {t.dtype} {tuple(t.shape)}")
        advance = 1.0 if found_inf is None else torch.rsub(found_inf, 1.0)   # 1 - f
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("DeviceAdamW supports neither amsgrad nor maximize")
            beta1, beta2 = group["betas"]
            by_kind: dict = {}   # (device, dtype) -> (params, grads, exp_avgs, exp_avg_sqs, steps), local tensors
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("DeviceAdamW does not support sparse gradients")
                st = self._state(p)
                lp = _local(p)
                lists = by_kind.setdefault((lp.device, lp.dtype), ([], [], [], [], []))
                for lst, t in zip(lists, (lp, _local(p.grad), _local(st["exp_avg"]), _local(st["exp_avg_sq"]),
                                          st["step"])):
                    lst.append(t)
            for params, grads, exp_avgs, exp_avg_sqs, steps in by_kind.values():
                if found_inf is None:
                    torch._foreach_add_(steps, 1.0)
                else:   # the .Tensor overload by name: torch._foreach_add_(list, tensor) would bind the 0-dim
                        # tensor as a Scalar, i.e. read it on the host
                    torch.ops.aten._foreach_add_.Tensor(steps, advance)
                torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"],
                                    beta1=float(beta1), beta2=float(beta2), weight_decay=float(group["weight_decay"]),
                                    eps=float(group["eps"]), amsgrad=False, maximize=False,
                                    grad_scale=grad_scale, found_inf=found_inf)
        return None


@torch.no_grad()
def global_grad_norm(params, all_reduce=None) -> torch.Tensor:
    """The global gradient 2-norm of ``params`` (those with a ``.grad``) as a 0-dim fp64 tensor on their device.

    Per-tensor norms accumulate in fp64: an fp32 norm of a 38M-element LM-head gradient carries ~1e-4
    relative summation error that depends on how the tensor is split, so FSDP shards, DDP replicas and
    one process would clip by different factors. Under FSDP2 each rank holds disjoint gradient shards:
    ``all_reduce`` (e.g. ``torch.distributed.all_reduce``) sums their squared norms over ranks (one number).
    One read pass over the gradients (4 bytes per parameter); no host read."""
    local = [_local(p.grad) for p in params if p.grad is not None]
    if not local:
        dev = next((_local(p).device for p in params), torch.device("cpu"))
        return torch.zeros((), dtype=torch.float64, device=dev)
    sq = torch.stack(torch._foreach_norm(local, 2, dtype=torch.float64)).square().sum()
    if all_reduce is not None:
        all_reduce(sq)
    return sq.sqrt()


@torch.no_grad()
def clip_scale(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The divisor that clips the gradient 2-norm to ``max_norm``: max(1, (norm + 1e-6) / max_norm), computed in
    fp64 and rounded to fp32 (0-dim, on the norm's device), for ``DeviceAdamW.step(grad_scale=...)``.
    ``max_norm <= 0`` turns clipping off (divisor 1). A non-finite norm gives a non-finite divisor, which no
    kernel uses: that step is skipped.

    Rounding vs the published multiply g * c with c = fp32(min(1, max_norm / (norm + 1e-6))): the kernel
    computes fp32(g / s) with s = fp32(1 / c_exact). Each is g c_exact times (1 + e1)(1 + e2) with |e| <= 2^-24
    (one rounding of the factor, one of the product or quotient), so the two clipped gradients differ by at
    most ~2^-22 relative (a few ulp, mostly 0 or 1) when the clip is active, and are bitwise equal when it is
    not (s = c = 1). tests/test_train.py measures it."""
    if max_norm <= 0:
        return torch.ones((), dtype=torch.float32, device=grad_norm.device)
    return grad_norm.add(1e-6).div_(float(max_norm)).clamp_(min=1.0).float()


@torch.no_grad()
def optimizer_step_on_device(optimizer: DeviceAdamW, ema: EMA | None, grad_norm: torch.Tensor,
                             checked: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Clip + AdamW + EMA of one optimizer step, enqueued without a host read.

    ``grad_norm``: the global gradient norm (0-dim fp64, from ``global_grad_norm``); ``checked``: the values
    whose non-finiteness skips the step (the loss and the gradient norm, as every rank will read them);
    ``max_norm``: the clip threshold. Returns ``found_inf`` (0-dim float32: 1.0 = skipped).

    Decided on the device: found_inf = any(not isfinite(checked)); s = clip_scale(grad_norm). Then
    ``optimizer.step(grad_scale=s, found_inf=found_inf)`` (fused AdamW on g / s, nothing touched when
    skipped, step counters advance by 1 - found_inf) and ``ema.update(found_inf=found_inf)`` (lerp weight 0
    when skipped). Passes over the parameters: AdamW reads p, g, m, v and writes p, g, m, v; the EMA reads
    shadow, p and writes shadow: 11 x 4 bytes per parameter, plus the norm's read of g (by the caller)."""
    # non-finite anywhere <=> NaN in sum(checked * 0) (inf * 0 = NaN, NaN * 0 = NaN, finite * 0 = +-0), and
    # nan_to_num maps that NaN to exactly 1.0 (what the kernels compare with): three small kernels
    # (torch.isfinite(checked).all().float() would be seven: isfinite is abs, ne, eq, mul)
    found_inf = checked.mul(0.0).sum(dtype=torch.float32).nan_to_num_(nan=1.0)
    optimizer.step(grad_scale=clip_scale(grad_norm, max_norm), found_inf=found_inf)
    if ema is not None:
        ema.update(found_inf=found_inf)
    return found_inf


class _LossModule(nn.Module):
    """The training objective as a module whose ``forward`` DDP / FSDP can hook: (x0, mask, seed) -> loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x0: torch.Tensor, attention_mask: torch.Tensor, seed: int):
        gen = torch.Generator(device=x0.device).manual_seed(seed)
        out = self.model.loss(x0, attention_mask, generator=gen, seed=seed)
        return out.loss, (out.nlls.detach().sum(), out.token_mask.sum())


@dataclass
class RunState:
    step: int = 0                 # training steps taken (a skipped non-finite step counts)
    optimizer_steps: int = 0      # updates applied (the LR schedule and EMA follow these)
    tokens: int = 0               # tokens consumed, all processes
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    train_seconds: float = 0.0


def _rng_state() -> dict:
    import numpy as np
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _duration(seconds: float) -> str:
    """45s, 2m05s, 3h20m."""
    s = int(round(max(0.0, float(seconds))))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _Progress:
    """Progress of a run: a one-line bar rewritten in place on a terminal; plain lines through ``log``
    otherwise -- at the first step, every ``every`` steps, at the last step, and at least every ``interval_s``
    seconds, so a log file shows progress even when steps are slow. Each says loss, tokens/s, LR, elapsed
    time and the time left at the pace since the first step (which also pays for warm-up and compilation).

    ``enabled``: "auto" (bar on a terminal, lines otherwise), True (bar), False (lines), None (nothing)."""

    interval_s = 30.0

    def __init__(self, total: int, enabled, log, every: int = 10, start: int = 0, tokens: int = 0,
                 stream=sys.stderr):
        self.total, self.stream, self.log = total, stream, log
        self.quiet = enabled is None
        self.tty = (stream.isatty() if enabled == "auto" else bool(enabled)) and not self.quiet
        self.every = max(1, int(every))
        self.t0 = time.perf_counter()
        self.start = start
        self.t_first = None          # time after the first step of this process
        self.step_first = start
        self.mark(tokens)

    def mark(self, tokens: int) -> None:
        """Start the tokens/s window now (after a validation, say), at ``tokens`` consumed."""
        self.t_line, self.tok_line = time.perf_counter(), tokens

    def eta(self, step: int, now: float) -> float | None:
        """Seconds left at the pace since the end of the first step (None before there is a pace)."""
        if self.t_first is None or step <= self.step_first:
            return None
        return (now - self.t_first) / (step - self.step_first) * (self.total - step)

    def update(self, step: int, rec: dict) -> None:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first, self.step_first = now, step
        elapsed = now - self.t0
        eta = self.eta(step, now)
        left = f", ~{_duration(eta)} left" if eta is not None else ""
        if self.quiet:
            return
        due = (step == self.start + 1 or step % self.every == 0 or step == self.total
               or now - self.t_line >= self.interval_s)
        if not self.tty and not due:
            return
        tps = (rec["tokens"] - self.tok_line) / max(now - self.t_line, 1e-9)
        text = f"loss {rec['loss']:.4f} | {tps:,.0f} tok/s | lr {rec['lr']:.2e} | {_duration(elapsed)} elapsed{left}"
        if self.tty:
            frac = step / max(1, self.total)
            self.stream.write(f"\r[{'#' * int(24 * frac):<24}] {step}/{self.total} {text} ")
            self.stream.flush()
        else:
            self.log(f"step {step}/{self.total} {text}")
        if due:
            self.t_line, self.tok_line = now, rec["tokens"]

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _read_log(path) -> list[tuple[str, dict]]:
    """(line, record) of each parseable line of a JSONL log; a torn last line (crash mid-write) is skipped."""
    out = []
    for ln in Path(path).read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append((ln, rec))
    return out


def _plain(obj):
    """Config -> plain dict (checkpoints load with ``weights_only=True``)."""
    return json.loads(json.dumps(obj))


class Trainer:
    """One training run. ``cfg``: a ``mdlm.preset(...)`` config. ``train_data`` / ``val_data``: optional
    ``mdlm.data.BlockDataset`` (or (N, L) token tensors) instead of ``cfg.data``; ``model``: an optional
    ``MDLM`` built from the same config. ``resume``: "auto" (continue from ``out_dir/checkpoints`` when it
    holds a checkpoint), "never", or a checkpoint path."""

    def __init__(self, cfg, train_data=None, val_data=None, model=None, resume: str = "auto", log=None,
                 tokenizer=None):
        from . import data as mdata
        from .diffusion import MDLM
        from .nn import DIT

        self.cfg = check_config(cfg, training=True)   # also the training keys (a config built or edited by hand)
        tr = cfg.trainer
        self._init_distributed(tr.strategy)
        self.out_dir = Path(tr.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._log_fn = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.tokenizer = tokenizer

        # data: a pure function of (seed, global micro-batch index)
        if train_data is None or val_data is None:
            self.tokenizer = tokenizer or mdata.get_tokenizer(cfg.data.tokenizer)
            train_data = train_data if train_data is not None else self._prepare("train")
            val_data = val_data if val_data is not None else self._prepare("validation")
        self.train_data = self._as_dataset(train_data)
        self.val_data = self._as_dataset(val_data)
        L = int(self.train_data.length)
        if L != int(cfg.model.length):
            raise ValueError(f"training blocks have length {L}, config model.length is {cfg.model.length}")
        W = self.world_size
        gbs, mbs = int(cfg.loader.global_batch_size), int(cfg.loader.batch_size) or 0
        mbs = mbs or max(1, gbs // W)
        if gbs % (mbs * W):
            raise ValueError(f"loader.global_batch_size {gbs} is not a multiple of batch_size {mbs} x world size {W}")
        self.micro_batch, self.accum = mbs, gbs // (mbs * W)
        self.sampler = mdata.ResumableBatchSampler(len(self.train_data), mbs, seed=int(cfg.seed), rank=self.rank,
                                                   world_size=W, shuffle=True)

        # model
        if model is None:
            torch.manual_seed(int(cfg.seed))   # the same initial weights on every process
            meta = getattr(self.train_data, "meta", None) or {}
            V = int(meta.get("model_vocab_size") or (self.tokenizer.model_vocab_size if self.tokenizer else 0))
            if not V:
                raise ValueError("vocabulary size unknown: pass a tokenizer, a model, or BlockDatasets with meta")
            mask = meta.get("mask_id", self.tokenizer.mask_id if self.tokenizer else None)
            uk = tr.use_kernels
            uk = None if uk in ("auto", None) else bool(uk)
            backbone = DIT(cfg, V, use_kernels=uk) if cfg.parameterization != "ar" else None
            model = MDLM(cfg, V, mask_index=mask, backbone=backbone)
        self.model = model.to(self.device)
        for ds in (self.train_data, self.val_data):   # ids against THIS model's vocabulary (a shard without
            if hasattr(ds, "check_vocab"):            # model_vocab_size, in-memory blocks, another tokenizer)
                ds.check_vocab(int(self.model.vocab_size))
        self.model.validate_inputs = False    # the data's ids were checked above (and when the shards were opened)
        if hasattr(self.model.backbone, "validate_inputs"):
            self.model.backbone.validate_inputs = False
        prec = tr.precision if tr.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if prec not in ("bf16", "fp32"):
            raise ValueError(f"trainer.precision must be auto, bf16 or fp32, got {tr.precision!r}")
        self.autocast = prec == "bf16"
        self.loss_module = self._wrap(_LossModule(self.model))
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        # fused AdamW on every device (CPU too): the kernel the GPU runs is the one the CPU tests run
        self.optimizer = DeviceAdamW(params, lr=float(o.lr), betas=(float(o.beta1), float(o.beta2)),
                                     eps=float(o.eps), weight_decay=float(o.weight_decay))
        lr_factor(cfg, 0)  # validates the schedule type
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg, s))
        self.ema = EMA(params, float(cfg.training.ema)) if float(cfg.training.ema) > 0 else None
        self.forward = self.loss_module
        if tr.compile:
            if self.model.default_loss_impl() == "fused":
                torch._dynamo.config.capture_dynamic_output_shape_ops = True
            self.forward = torch.compile(self.loss_module)
        self.state = RunState()
        self._stop_signal = None
        self._stop_agreed = False
        self._fault = os.environ.get("_MDLM_FAULT_INJECT")   # tests: "save:<step>:<stage>" -> SIGKILL there
        self.log_path = self.out_dir / "log.jsonl"
        if resume != "never":
            self._maybe_resume(resume)
        else:
            if list_training_checkpoints(self.ckpt_dir):
                raise ValueError(f"{self.ckpt_dir} holds checkpoints of an earlier run; with --resume never use a "
                                 "new trainer.out_dir (or remove them), so that runs never mix checkpoints")
            if self.is_main and self.log_path.exists():
                self.log_path.unlink()
        self._open_loggers()

    # ------------------------------------------------------------------------------------- set-up
    def _init_distributed(self, strategy: str) -> None:
        import torch.distributed as dist
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if strategy not in ("auto", "ddp", "fsdp", "none"):
            raise ValueError(f"trainer.strategy must be auto, ddp, fsdp or none, got {strategy!r}")
        if self.world_size > 1 and strategy == "none":
            raise ValueError("trainer.strategy=none with WORLD_SIZE > 1: every process would train alone")
        self.strategy = ("ddp" if strategy == "auto" else strategy) if self.world_size > 1 else "none"
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard
            # One FSDP unit per block when the blocks run through their own forward (plain path); the fused
            # block path reads block weights directly, so there the model is one unit (parameters gathered
            # for the forward, gradients / optimizer state / EMA stay sharded).
            bb = self.model.backbone
            if hasattr(bb, "blocks") and not (hasattr(bb, "kernels_enabled") and
                                               bb.kernels_enabled(torch.empty(0, device=self.device))):
                for blk in bb.blocks:
                    fully_shard(blk)
            return fully_shard(module)
        return module

    def _prepare(self, split: str):
        from . import data as mdata
        d = self.cfg.data
        name = d.train if split == "train" else d.valid
        if split == "validation" and name in mdata.DATASETS:
            split = mdata.DATASETS[name].eval_split     # the published run validates text8 / lm1b on "test"
        kw = dict(tokenizer=self.tokenizer, length=int(self.cfg.model.length), mode=d.mode, cache_dir=d.cache_dir,
                  num_workers=int(d.num_workers) or None)
        if self.world_size > 1:        # rank 0 tokenises once; the others open its shards
            import torch.distributed as dist
            if self.is_main:
                mdata.prepare_dataset(name, split, **kw)
            dist.barrier()
        return mdata.prepare_dataset(name, split, **kw)

    @staticmethod
    def _as_dataset(data):
        from . import data as mdata
        if torch.is_tensor(data):
            return mdata.BlockDataset.from_tensor(data)
        if isinstance(data, tuple) and len(data) == 2:
            return mdata.BlockDataset.from_tensor(*data)
        return data

    def log(self, msg: str) -> None:
        if self.is_main:
            self._log_fn(msg)

    def _open_loggers(self) -> None:
        """TensorBoard / W&B when ``trainer.loggers`` asks for them (rank 0; a clear error if not installed)."""
        self._tb = self._wandb = None
        names = [n.strip() for n in str(self.cfg.trainer.get("loggers") or "").split(",") if n.strip()]
        for n in names:
            if n not in ("tensorboard", "wandb"):
                raise ValueError(f"unknown logger {n!r} in trainer.loggers; tensorboard and/or wandb")
        if not self.is_main:
            return
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("trainer.loggers=tensorboard needs the 'tensorboard' package") from e
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        if "wandb" in names:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("trainer.loggers=wandb needs the 'wandb' package") from e
            self._wandb = wandb.init(project=self.cfg.trainer.wandb_project, config=_plain(self.cfg),
                                     dir=str(self.out_dir), resume="allow")

    def _record(self, rec: dict) -> None:
        if self.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, rec["step"])
            if self._wandb is not None:
                self._wandb.log(scalars, step=rec["step"])

    # ------------------------------------------------------------------------------- checkpoints
    def _full_state(self) -> tuple[dict, dict | None]:
        """(backbone state dict, optimizer state dict) as full CPU tensors (collective under FSDP)."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
            msd, osd = get_state_dict(self.loss_module, self.optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            prefix = "model.backbone."
            return {k[len(prefix):]: v for k, v in msd.items() if k.startswith(prefix)}, osd
        sd = {k: v.detach().cpu() for k, v in self.model.backbone.state_dict().items()}
        return sd, self.optimizer.state_dict()

    def save(self) -> str | None:
        sd, osd = self._full_state()
        shadow = None
        if self.ema is not None:
            shadow = [s.full_tensor() if hasattr(s, "full_tensor") else s for s in self.ema.shadow]
            shadow = [s.detach().cpu() for s in shadow]
        path = None
        if self.is_main:
            state = {
                "state_dict": {f"backbone.{k}": v for k, v in sd.items()},
                "ema": None if shadow is None else {"decay": self.ema.decay, "num_updates": self.ema.num_updates,
                                                    "shadow_params": shadow, "collected_params": None},
                "optimizer": osd, "lr_scheduler": self.scheduler.state_dict(),
                "data": self.sampler.state_dict(), "rng": _rng_state(), "trainer": asdict(self.state),
                "config": _plain(self.cfg), "world_size": self.world_size,
                # what rebuilding the model needs besides the config (mdlm eval / sample need no --preset)
                "model_meta": model_meta(self.model, self.cfg,
                                         getattr(self.tokenizer, "name", None) or self.cfg.data.tokenizer),
            }
            hook = None
            if self._fault and self._fault.startswith(f"save:{self.state.step}:"):
                stage = self._fault.split(":")[2]

                def hook(s):
                    if s == stage:
                        os.kill(os.getpid(), signal.SIGKILL)
            path = save_training_checkpoint(self.ckpt_dir, state, self.state.step,
                                            keep=max(2, int(self.cfg.trainer.keep_checkpoints)), _fault_hook=hook)
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def _maybe_resume(self, resume: str) -> None:
        if resume == "auto":
            if not list_training_checkpoints(self.ckpt_dir):
                if self.is_main and self.log_path.exists():
                    self.log_path.unlink()        # a fresh run: no stale log lines
                return
            target = self.ckpt_dir
        else:
            target = resume
        obj, path = load_training_checkpoint(target, fallback=bool(self.cfg.trainer.get("resume_fallback", True)),
                                             log=self.log)
        self.load_state(obj)
        self.log(f"resumed from {path} at step {self.state.step}")
        if self.is_main and self.log_path.exists():
            # keep the log lines up to the checkpoint: the steps after it are redone
            keep = [ln for ln, rec in _read_log(self.log_path) if rec.get("step", 0) <= self.state.step]
            tmp = self.log_path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.log_path)
        self._barrier()

    def load_state(self, obj: dict) -> None:
        sd = {k[len("backbone."):]: v for k, v in obj["state_dict"].items() if k.startswith("backbone.")}
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(self.loss_module, self.optimizer,
                           model_state_dict={f"model.backbone.{k}": v for k, v in sd.items()},
                           optim_state_dict=obj["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            try:
                self.model.backbone.load_state_dict(sd)
            except RuntimeError as e:
                saved = obj.get("config")
                both = ""
                if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
                    saved = Config(saved)
                    both = (f" (checkpoint: {describe_model(saved)}; this run: {describe_model(self.cfg)}; differing: "
                            f"{'; '.join(model_differences(saved, self.cfg)) or 'see below'})")
                raise CheckpointError(f"the checkpoint in {self.ckpt_dir} was written by a model with a different "
                                      f"configuration{both} (use a new trainer.out_dir, or --resume never): {e}") from e
            self.optimizer.load_state_dict(obj["optimizer"])
        self.scheduler.load_state_dict(obj["lr_scheduler"])
        if self.ema is not None and obj.get("ema") is not None:
            e = obj["ema"]
            with torch.no_grad():
                for s, v in zip(self.ema.shadow, e["shadow_params"]):
                    if hasattr(s, "full_tensor"):
                        from torch.distributed.tensor import distribute_tensor
                        v = distribute_tensor(v.to(s.device), s.device_mesh, s.placements)
                    _local(s).copy_(_local(v))
            self.ema.num_updates = int(e["num_updates"])
        try:
            self.sampler.load_state_dict(obj["data"])
        except ValueError as e:
            raise ValueError(f"{e}. The checkpoint was written with micro-batch {obj['data'].get('batch_size')} "
                             f"on {obj.get('world_size')} process(es); to resume on a different number of "
                             "processes keep the micro-batch: set loader.batch_size explicitly") from e
        _set_rng_state(obj["rng"])
        self.state = RunState(**obj["trainer"])

    # -------------------------------------------------------------------------------------- steps
    def _autocast(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        """One optimizer step over ``accum`` micro-batches; returns its record (loss, grad norm, ...)."""
        self.loss_module.train()
        loss_sum = torch.zeros((), device=self.device)
        for a in range(self.accum):
            g = self.sampler.global_index
            idx = self.sampler.next()
            x0, mask = self.train_data.get(idx)
            if self.device.type == "cuda":   # pageable memory would make the copy wait for the stream: pin it
                x0, mask = x0.pin_memory(), mask.pin_memory()
            x0 = x0.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            seed = micro_seed(int(self.cfg.seed), g)
            torch.manual_seed(seed)   # dropout (and the fused blocks' dropout seed) keyed by g
            sync = (self.loss_module.no_sync() if self.strategy == "ddp" and a < self.accum - 1
                    else contextlib.nullcontext())
            with sync:
                with self._autocast():
                    loss, _ = self.forward(x0, mask, seed)
                (loss / self.accum).backward()
            loss_sum += loss.detach().float() / self.accum
        flags = self._optimizer_step(loss_sum)
        self.optimizer.zero_grad(set_to_none=True)
        loss_v, gnorm_v, stop_v = flags.tolist()   # the step's one host read: everything above is enqueued
        # a signal seen by any rank stops every rank after this same step (no rank left in a collective)
        self._stop_agreed = stop_v > 0
        # the decision the device took from the same values (optimizer_step_on_device)
        finite = math.isfinite(loss_v) and math.isfinite(gnorm_v)
        lr = self.optimizer.param_groups[0]["lr"]
        if finite:
            self.scheduler.step()             # the LR of the next step follows the applied updates
            if self.ema is not None:
                self.ema.num_updates += 1
            self.state.optimizer_steps += 1
            self.state.nonfinite_run = 0
        else:
            self.state.nonfinite_total += 1
            self.state.nonfinite_run += 1
        self.state.step += 1
        self.state.tokens += int(self.cfg.loader.global_batch_size) * int(self.train_data.length)
        rec = {"step": self.state.step, "loss": loss_v, "grad_norm": gnorm_v, "lr": lr, "tokens": self.state.tokens}
        if not finite:
            rec["skipped"] = "non-finite " + ("loss" if not math.isfinite(loss_v) else "gradient")
            self.log(f"step {self.state.step}: {rec['skipped']} (loss {loss_v}, grad norm {gnorm_v}); step skipped "
                     f"({self.state.nonfinite_run} in a row, {self.state.nonfinite_total} in total)")
            if self.state.nonfinite_run >= int(self.cfg.trainer.max_nonfinite):
                self._record(rec)
                raise NonFiniteError(
                    f"stopping at step {self.state.step}: {self.state.nonfinite_run} consecutive steps with a "
                    f"non-finite loss or gradient (trainer.max_nonfinite={self.cfg.trainer.max_nonfinite}); "
                    f"the last good checkpoint in {self.ckpt_dir} was not overwritten")
        return rec

    @torch.no_grad()
    def _optimizer_step(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Clip, AdamW and EMA of this step, enqueued without a host read (``optimizer_step_on_device``).
        Returns the flags the host reads once: (loss, gradient norm, stop) as an fp64 tensor, all-reduced over
        processes (NaN anywhere -> NaN everywhere, so every rank skips alike; loss and norm averaged).

        The clip uses the process's own norm (``global_grad_norm``: fp64, summed over FSDP shards), the same
        on every rank; the skip uses the all-reduced flags, so all ranks skip or apply together."""
        sq_reduce = None
        if self.strategy == "fsdp":
            import torch.distributed as dist
            sq_reduce = dist.all_reduce
        norm = global_grad_norm(list(self.model.parameters()), all_reduce=sq_reduce)
        # torch.full, not torch.tensor: a host-to-device copy of a pageable constant would synchronise
        stop = torch.full((), 1.0 if self._stop_signal is not None else 0.0, dtype=torch.float64,
                          device=norm.device)
        flags = torch.stack([loss_sum.double(), norm, stop])
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(flags)            # NaN anywhere -> NaN everywhere: all ranks decide alike
            flags /= self.world_size          # loss: mean over processes (= over the global batch); the
                                              # gradient norm is the same on every rank (synced gradients)
        optimizer_step_on_device(self.optimizer, self.ema, norm, flags[:2], float(self.cfg.trainer.grad_clip))
        return flags

    def _val_count(self) -> int:
        cap = int(self.cfg.trainer.val_blocks)
        return min(len(self.val_data), cap) if cap > 0 else len(self.val_data)

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation NELBO (published Monte Carlo estimate, antithetic t per batch) with the EMA weights;
        fixed draws per batch (seeded by batch index), so evaluations are comparable across steps."""
        n = len(self.val_data)
        cap = int(self.cfg.trainer.val_blocks)
        n = min(n, cap) if cap > 0 else n
        bs = int(self.cfg.loader.eval_batch_size) or self.micro_batch
        batches = list(range(0, n, bs))
        if self.strategy != "fsdp":                # FSDP: every rank runs every batch (collective forwards)
            batches = batches[self.rank::self.world_size]
        module = self.loss_module if self.strategy == "fsdp" else self.model_loss_module_unwrapped()
        was_training = module.training
        module.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        ctx = self.ema.averaged() if self.ema is not None else contextlib.nullcontext()
        with ctx:
            for i in batches:
                idx = torch.arange(i, min(i + bs, n))
                x0, mask = self.val_data.get(idx)
                with self._autocast():
                    _, (nll, count) = module(x0.to(self.device), mask.to(self.device),
                                             micro_seed(int(self.cfg.seed), i // bs, stream=1))
                tot += torch.stack([nll.double(), count.double()])
            if self.strategy == "fsdp":
                # FSDP2 leaves the root's parameters unsharded after a forward without backward: reshard
                # before the live weights are restored, or the next step would train on the EMA copy
                for m in self.loss_module.modules():
                    if hasattr(m, "reshard"):
                        m.reshard()
        module.train(was_training)
        if self.world_size > 1 and self.strategy != "fsdp":
            import torch.distributed as dist
            dist.all_reduce(tot)
        nelbo = (tot[0] / tot[1]).item()
        return {"step": self.state.step, "val_nelbo": nelbo, "val_ppl": math.exp(min(nelbo, 700.0)),
                "val_bpd": nelbo / math.log(2), "val_tokens": int(tot[1].item())}

    def model_loss_module_unwrapped(self) -> nn.Module:
        return self.loss_module.module if self.strategy == "ddp" else self.loss_module

    @torch.no_grad()
    def generate(self) -> list[str]:
        """``trainer.num_samples`` samples with the EMA weights (rank 0; not under FSDP)."""
        from .samplers import sample
        if self.strategy == "fsdp" or not self.is_main:
            return []
        self.model.eval()
        ctx = self.ema.averaged() if self.ema is not None else contextlib.nullcontext()
        with ctx:
            gen = torch.Generator().manual_seed(micro_seed(int(self.cfg.seed), self.state.step, stream=2))
            x = sample(self.model, int(self.cfg.trainer.num_samples), steps=int(self.cfg.trainer.sample_steps),
                       generator=gen)
        self.model.train()
        if self.tokenizer is None:
            return [" ".join(map(str, row)) for row in x.tolist()]
        from .data import decode
        return decode(x.cpu(), self.tokenizer, mask_index=self.model.mask_index)

    # ---------------------------------------------------------------------------------------- run
    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:
            # a second signal (a second Ctrl-C): stop where we are. Checkpoint files are written to a temporary
            # name and renamed, so an interrupted save leaves the previous checkpoint as it was.
            self.log(f"received signal {signum} again: stopping now, without finishing the step or saving "
                     f"(the newest complete checkpoint in {self.ckpt_dir} is kept; rerun the command to resume)")
            raise ForcedStop(signum)
        self._stop_signal = signum
        self.log(f"received signal {signum}: finishing this step, then saving a checkpoint "
                 "(send it again, e.g. a second Ctrl-C, to stop at once without saving)")

    def fit(self) -> dict:
        """Train to ``trainer.max_steps``; returns a summary. Resumes are handled at construction."""
        tr = self.cfg.trainer
        max_steps = int(tr.max_steps)
        old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                old[s] = signal.signal(s, self._on_signal)
            except ValueError:    # not the main thread
                pass
        bar = _Progress(max_steps, tr.progress if self.is_main else None, self.log, every=int(tr.log_every),
                        start=self.state.step, tokens=self.state.tokens)
        hinted = False
        self.log(f"training {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters on "
                 f"{self.world_size} x {self.device.type}, strategy {self.strategy}, micro-batch {self.micro_batch} "
                 f"x {self.accum} accumulation x {self.world_size} = {self.cfg.loader.global_batch_size} sequences "
                 f"of {self.train_data.length} tokens per step; from step {self.state.step} to {max_steps}; "
                 f"out_dir {self.out_dir}")
        t_last, tok_last = time.perf_counter(), self.state.tokens
        last_val = None
        try:
            if int(tr.val_every) > 0 and self.state.step == 0:     # the starting point of the curve
                self.log(f"step 0: validating on {self._val_count()} blocks (EMA weights)")
                last_val = self.validate()
                self._record(last_val)
                self.log(f"step 0: val NELBO {last_val['val_nelbo']:.4f}, PPL {last_val['val_ppl']:.2f}")
            bar.mark(self.state.tokens)            # tokens/s of the progress lines: training time only
            while self.state.step < max_steps:
                t0 = time.perf_counter()
                rec = self.train_step()
                self.state.train_seconds += time.perf_counter() - t0
                step = self.state.step
                if step % max(1, int(tr.log_every)) == 0 or "skipped" in rec or step == max_steps:
                    now = time.perf_counter()
                    rec["tok_per_s"] = (self.state.tokens - tok_last) / max(now - t_last, 1e-9)
                    t_last, tok_last = now, self.state.tokens
                    self._record(rec)
                bar.update(step, rec)
                eta = bar.eta(step, time.perf_counter())
                if not hinted and eta is not None and self.device.type == "cpu" and eta > 3600:
                    hinted = True
                    self.log(f"at this pace the run needs ~{_duration(eta)} more on this CPU ({self.cfg.loader.global_batch_size} "
                             f"sequences of {self.train_data.length} tokens per step, {max_steps} steps). For a "
                             "CPU-sized run that finishes in minutes: mdlm train --quick (see the README)")
                if int(tr.val_every) > 0 and step % int(tr.val_every) == 0 and step < max_steps:
                    last_val = self.validate()
                    self._record(last_val)
                    self.log(f"step {step}: val NELBO {last_val['val_nelbo']:.4f}, PPL {last_val['val_ppl']:.2f}")
                    bar.mark(self.state.tokens)
                if int(tr.sample_every) > 0 and step % int(tr.sample_every) == 0:
                    self._write_samples(self.generate())
                if (int(tr.save_every) > 0 and step % int(tr.save_every) == 0) or self._stop_agreed:
                    path = self.save()
                    if self._stop_agreed:
                        self.log(f"interrupted at step {step}; checkpoint {path}; run the same command to resume")
                        return {"interrupted": True, "step": step, "checkpoint": path,
                                "signal": self._stop_signal}
            bar.close()
            last_val = self.validate()
            self._record(last_val)
            self.log(f"done at step {self.state.step}: val NELBO {last_val['val_nelbo']:.4f}, "
                     f"PPL {last_val['val_ppl']:.2f}")
            path = self.save()
            if int(tr.num_samples) > 0:
                self._write_samples(self.generate())
            summary = {"step": self.state.step, "checkpoint": path, **last_val, **asdict(self.state)}
            if self.is_main:
                (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                self._plot()
            return summary
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _write_samples(self, texts: list[str]) -> None:
        if self.is_main and texts:
            with open(self.out_dir / "samples.jsonl", "a") as f:
                for t in texts:
                    f.write(json.dumps({"step": self.state.step, "text": t}) + "\n")

    def _plot(self) -> None:
        """Loss curve (train loss per logged step, validation NELBO) -> ``out_dir/loss_curve.png``."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.log("matplotlib not installed: no loss_curve.png")
            return
        recs = [rec for _, rec in _read_log(self.log_path)]
        tr = [(r["step"], r["loss"]) for r in recs if "loss" in r and math.isfinite(r["loss"])]
        va = [(r["step"], r["val_nelbo"]) for r in recs if "val_nelbo" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if tr:
            ax.plot(*zip(*tr), label="train loss (NELBO / token)")
        if va:
            ax.plot(*zip(*va), "o-", label="validation NELBO (EMA)")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out_dir / "loss_curve.png", dpi=100)
        plt.close(fig)


def build_config(argv: list[str]) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="mdlm train", description="Train an MDLM with the published recipe.")
    p.add_argument("--preset", default=None,
                   help="model preset: tiny | small | medium (default small; tiny with --quick)")
    p.add_argument("--data", default=None,
                   help="dataset preset: openwebtext | lm1b | text8 | wikitext103 | wikitext2 | tinyshakespeare | "
                        "text:<path> (local UTF-8 files; default tinyshakespeare with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a CPU-sized run that finishes in minutes: " + " ".join(f"{k}={v}" for k, v in QUICK.items())
                        + " (key=value overrides still win)")
    p.add_argument("--resume", default="auto", help="auto (from out_dir/checkpoints) | never | a checkpoint path")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. trainer.max_steps=200")
    args = p.parse_args(argv)
    cfg = preset(args.preset or ("tiny" if args.quick else "small"),
                 data=args.data or ("tinyshakespeare" if args.quick else None))
    if args.quick:
        apply_overrides(cfg, QUICK)
    apply_overrides(cfg, args.overrides)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    """``mdlm train``. Exit codes: 0 done; 2 a usage / data / checkpoint error (message, no traceback);
    3 stopped by the non-finite guard; 128 + signal number when SIGTERM / SIGINT stopped it after saving."""
    try:
        cfg, args = build_config(sys.argv[1:] if argv is None else argv)
        trainer = Trainer(cfg, resume=args.resume)
        out = trainer.fit()
        if out.get("interrupted"):
            return 128 + int(out["signal"] or signal.SIGTERM)
    except NonFiniteError as e:
        print(f"mdlm train: {e}", file=sys.stderr)
        return 3
    except ForcedStop as e:
        print(f"mdlm train: stopped by a second signal {e.signum}, without saving", file=sys.stderr)
        return 128 + e.signum
    except KeyError as e:
        print(f"mdlm train: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, OSError, ImportError) as e:
        print(f"mdlm train: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
