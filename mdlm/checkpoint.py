"""Load and write checkpoints in the published MDLM layouts.

Published checkpoints are PyTorch Lightning ``.ckpt`` files: ``{"state_dict": {"backbone.<key>": tensor,
...}, "ema": {"decay", "num_updates", "shadow_params": [tensor, ...], ...}, "global_step", ...}`` where
``shadow_params`` lists the EMA weights in the order of ``backbone.parameters()`` (the noise schedules
of the published code have no parameters). Plain state dicts (``{"<key>": tensor}``, with or without
the ``backbone.`` prefix) load too.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "load_published_checkpoint", "save_published_checkpoint", "extract_state_dict"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model; the message names the file and the keys."""


def _backbone(model: nn.Module) -> nn.Module:
    return model.backbone if hasattr(model, "backbone") and isinstance(model.backbone, nn.Module) else model


def _read(path, weights_only: bool, map_location) -> Any:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # truncated zip, pickle error, unsafe global with weights_only
        hint = ""
        if weights_only and "weights_only" in str(e):
            hint = (" (the file holds non-tensor objects, e.g. a Lightning config; if you trust it, pass "
                    "weights_only=False)")
        raise CheckpointError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}{hint}") from e


def extract_state_dict(obj: Mapping, use_ema: bool = True, backbone: nn.Module | None = None,
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone's state dict (keys without ``backbone.``) from a Lightning or plain checkpoint object.

    With ``use_ema`` and an ``ema`` entry, parameters are replaced by the EMA shadow weights (buffers are
    kept); ``backbone`` is needed then, to know the parameter order.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(obj).__name__}")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"{source}: no state_dict found (top-level keys: {sorted(map(str, obj))[:20]})")
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    else:
        sd = dict(sd)
    non_tensor = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if non_tensor:
        raise CheckpointError(f"{source}: state_dict entries that are not tensors: {non_tensor[:10]}")
    ema = obj.get("ema") if use_ema else None
    if ema is not None:
        if backbone is None:
            raise CheckpointError(f"{source}: loading EMA weights needs the model (for the parameter order)")
        shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
        names = [n for n, _ in backbone.named_parameters()]
        if shadow is None or len(shadow) != len(names):
            raise CheckpointError(f"{source}: EMA entry has {None if shadow is None else len(shadow)} shadow "
                                  f"parameters, the model has {len(names)}")
        for name, tensor in zip(names, shadow):
            if name in sd and tuple(sd[name].shape) != tuple(tensor.shape):
                raise CheckpointError(f"{source}: EMA shadow for {name!r} has shape {tuple(tensor.shape)}, "
                                      f"state_dict has {tuple(sd[name].shape)}: parameter order differs")
            sd[name] = tensor
    return sd


def load_published_checkpoint(model: nn.Module, checkpoint, use_ema: bool = True, strict: bool = True,
                              map_location="cpu", weights_only: bool = True) -> dict:
    """Load a published-layout checkpoint (path or already-loaded dict) into ``model`` (a DIT or an MDLM).

    Raises ``CheckpointError`` naming the missing keys, the unexpected keys and the shape mismatches
    (``strict=False`` tolerates missing/unexpected keys but never a shape mismatch). Returns a report
    ``{"missing": [...], "unexpected": [...], "ema": bool, "global_step": int | None}``.
    """
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint dict"
    obj = _read(checkpoint, weights_only, map_location) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    backbone = _backbone(model)
    sd = extract_state_dict(obj, use_ema, backbone, source)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(backbone).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
    ema = obj.get("ema") if isinstance(obj, Mapping) else None
    return {"missing": missing, "unexpected": unexpected, "ema": bool(use_ema and ema is not None),
            "global_step": obj.get("global_step") if isinstance(obj, Mapping) else None}


def save_published_checkpoint(model: nn.Module, path, ema_shadow: list[torch.Tensor] | None = None,
                              global_step: int = 0, ema_decay: float = 0.9999) -> None:
    """Write ``model``'s backbone in the published Lightning layout (``backbone.`` prefix, optional EMA).

    The file holds the weights and EMA entries only (no Lightning loop/optimizer state): it loads with
    ``load_published_checkpoint`` here and with ``load_state_dict`` in the published code, not with the
    published ``Diffusion.load_from_checkpoint``, which also expects Lightning's training-loop state.

    The file is written to a temporary name, fsynced and renamed, so a crash never leaves a partial file.
    """
    backbone = _backbone(model)
    obj: dict[str, Any] = {
        "global_step": int(global_step),
        "state_dict": {f"backbone.{k}": v.detach().cpu() for k, v in backbone.state_dict().items()},
    }
    if ema_shadow is not None:
        obj["ema"] = {"decay": ema_decay, "num_updates": int(global_step),
                      "shadow_params": [p.detach().cpu() for p in ema_shadow], "collected_params": None}
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
