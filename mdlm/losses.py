"""SUBS losses from the backbone's final hidden states: masked rows only, the fused and the plain-PyTorch path.

Under SUBS, unmasked positions carry over with exactly zero loss and gradient, so the LM head and the loss
need only the masked rows (``subs_loss_from_hidden``); ``subs_nelbo_masked_rows`` is the plain-PyTorch spec of
the fused linear-cross-entropy kernel, and ``SUBSLoss`` the drop-in module for existing MDLM code (also
importable as ``mdlm.nn.SUBSLoss``). ``autocast_bf16`` is the published bf16 autocast (CUDA tensors only).

Layering: this module sits below ``mdlm.nn`` (which re-exports ``SUBSLoss``) and ``mdlm.diffusion`` (which
builds the full objective on it); it imports neither.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .schedules import get_noise

__all__ = ["Loss", "autocast_bf16", "subs_nelbo_masked_rows", "subs_loss_from_hidden", "SUBSLoss"]


def autocast_bf16(x: torch.Tensor, enabled: bool = True):
    """bf16 autocast on CUDA tensors only (the published code uses torch.cuda.amp.autocast)."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=enabled and x.is_cuda)


class Loss(NamedTuple):
    loss: torch.Tensor        # scalar: sum of per-token NELBO over non-pad tokens / their count
    nlls: torch.Tensor        # (B, L) per-token NELBO, zero at pad positions
    token_mask: torch.Tensor  # (B, L) 1 for counted tokens


def subs_nelbo_masked_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           targets: torch.Tensor, row_weights: torch.Tensor, mask_index: int) -> torch.Tensor:
    """Per masked row, w_i * (logsumexp_{v != MASK} z_i - z_i[x0_i]) with z = hidden W^T + b, in fp32.

    hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) int64 (never MASK), row_weights (N,)
    -> (N,) fp32.
    Identical to the published SUBS loss restricted to masked positions (unmasked ones contribute exactly
    zero): this is the contract of the fused linear-cross-entropy kernel, including its answer for an invalid
    target (MASK itself, or outside [0, V)): NaN for that row, never a finite number or an out-of-bounds read.
    """
    V = weight.shape[0]
    logits = F.linear(hidden, weight, bias).float()
    logits = torch.cat([logits[:, :mask_index], logits[:, mask_index + 1:]], dim=-1)  # drop the MASK column
    bad = (targets < 0) | (targets >= V) | (targets == mask_index)
    safe = torch.where(bad, _safe_target(mask_index), targets)
    tgt = safe - (safe > mask_index).long()  # column index once MASK is dropped
    rows = F.cross_entropy(logits, tgt, reduction="none") * row_weights
    return torch.where(bad, float("nan"), rows)


def _safe_target(mask_index: int) -> int:
    """A target id that is never MASK, for the padded rows of a statically sized gather (weight 0 there)."""
    return 1 if mask_index == 0 else 0


def subs_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x0: torch.Tensor,
                          xt: torch.Tensor, row_weight: torch.Tensor, mask_index: int,
                          attention_mask: torch.Tensor | None = None, impl: str = "fused",
                          row_bound: int | None = None) -> Loss:
    """Continuous-time SUBS NELBO from the final hidden states (B, L, d) and the LM head (V, d) / (V,).

    Only masked positions (xt == mask_index) contribute (``xt is x0``: every position does, with x0 as the
    targets; the AR baseline uses this): w_b * CE over v != MASK at x0, with
    w_b = row_weight[b] (B,) times attention_mask (B, L). ``impl`` "masked" runs F.linear + cross-entropy
    on those rows, "fused" runs ``mdlm_kernels.subs_linear_cross_entropy``; both equal the published
    (B, L, V) path. ``nlls`` (B, L) carries no gradient (logging only). The LM head runs under bf16 autocast on
    CUDA, as published.

    Gathering the masked rows: with ``row_bound=None`` the gather is sized on the host (``nonzero``: one
    synchronisation). With ``row_bound`` = n (an upper bound on the masked count, e.g.
    ``mdlm_kernels.masked_rows_bound``) it is sized statically: ``nonzero_static`` takes the first n masked
    positions and pads with weight-0 rows (no host read; the loss and gradients are unchanged). If more than n
    positions are masked, the loss, every gradient and ``nlls`` are NaN (the trainer's non-finite guard skips
    such a step; validation and evaluation sums turn NaN) -- never a loss over a truncated set of rows.
    """
    if impl not in ("masked", "fused"):
        raise ValueError(f"unknown implementation {impl!r} for a loss from hidden states; 'masked' or 'fused'")
    B, L, d = hidden.shape
    if x0.shape != (B, L) or xt.shape != (B, L):
        raise ValueError(f"x0 {tuple(x0.shape)} and xt {tuple(xt.shape)} must be (B, L) = {(B, L)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(x0, dtype=torch.float32)
    w_all = (row_weight[:, None] * attention_mask).reshape(-1).float()
    BL = B * L
    overflow = None
    if xt is x0:  # every position is a row (the AR baseline): no gather, no sync
        idx, h, tgt, w = None, hidden.reshape(BL, d), x0.reshape(-1), w_all
    else:
        masked = (xt == mask_index).reshape(-1)
        if row_bound is None:
            idx = masked.nonzero().squeeze(1)                              # the one host sync
            gather = idx
        else:
            n = min(int(row_bound), BL)
            idx = torch.nonzero_static(masked, size=n, fill_value=BL).reshape(n)   # padded with BL
            valid = idx < BL
            gather = torch.where(valid, idx, 0)
            overflow = masked.sum() > n                                    # device-side check, no read
        h = hidden.reshape(BL, d).index_select(0, gather)
        tgt = x0.reshape(-1).index_select(0, gather)
        w = w_all.index_select(0, gather)
        if row_bound is not None:
            tgt = torch.where(valid, tgt, _safe_target(mask_index))
            w = w * valid
    with autocast_bf16(h):
        if impl == "masked":
            rows = subs_nelbo_masked_rows(h, weight, bias, tgt, w, mask_index)
            total, rows_log = rows.sum(), rows.detach()
        else:
            import mdlm_kernels as mk
            total, rows_log = mk.subs_linear_cross_entropy(h, weight, bias, tgt, w, mask_index, validate=False)
    if idx is None:
        nlls = rows_log.view(B, L)
    else:   # slot BL absorbs the padded rows (their row losses are 0)
        nlls = torch.zeros(BL + 1, dtype=torch.float32, device=x0.device).index_put_((idx,), rows_log)[:BL]
        nlls = nlls.view(B, L)
    if overflow is not None:   # more masked positions than the static gather holds: NaN loss, gradients, nlls
        poison = torch.where(overflow, float("nan"), 1.0)
        total, nlls = total * poison, nlls * poison
    return Loss(loss=total / attention_mask.sum(), nlls=nlls, token_mask=attention_mask)


class SUBSLoss(nn.Module):
    """Drop-in SUBS loss for existing MDLM code: from the backbone's final hidden states (the LM head's
    input), the LM head's weight/bias, x0, xt and t, the published continuous-time NELBO.

    forward(hidden (B, L, d), weight (V, d), bias (V,) | None, x0 (B, L), xt (B, L), t (B,),
            attention_mask (B, L) | None) -> Loss.   The row weight is dsigma/expm1(sigma) at t (1/t
    for loglinear). ``impl``: "fused" (default) or "masked" (plain PyTorch on the masked rows).
    """

    def __init__(self, mask_index: int, noise="loglinear", impl: str = "fused"):
        super().__init__()
        self.mask_index = int(mask_index)
        self.noise = get_noise(noise) if isinstance(noise, str) else noise
        self.impl = impl

    def forward(self, hidden, weight, bias, x0, xt, t, attention_mask=None) -> Loss:
        sigma, dsigma = self.noise(t)
        return subs_loss_from_hidden(hidden, weight, bias, x0, xt, dsigma / torch.expm1(sigma), self.mask_index,
                                     attention_mask, self.impl)
