"""Load and write checkpoints in the published MDLM layouts.

Published checkpoints are PyTorch Lightning ``.ckpt`` files: ``{"state_dict": {"backbone.<key>": tensor,
...}, "ema": {"decay", "num_updates", "shadow_params": [tensor, ...], ...}, "global_step", ...}`` where
``shadow_params`` lists the EMA weights in the order of ``backbone.parameters()`` (the noise schedules
of the published code have no parameters). Plain state dicts (``{"<key>": tensor}``, with or without
the ``backbone.`` prefix) load too.

Self-describing checkpoints: the trainer's checkpoints (and ``save_published_checkpoint(..., config=...)``)
also hold ``config`` (the whole config tree as plain data: model, noise, parameterization, data settings) and
``model_meta`` (vocabulary size, MASK id, tokenizer name, block length and data settings), so ``mdlm eval`` /
``mdlm sample --checkpoint X`` rebuild the model from the file itself (``resolve_config``); flags are
overrides, and a flag that contradicts the file's model is an error naming both configs. Files without these
entries (published Lightning checkpoints, older files) load as before, from the flags.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "load_published_checkpoint", "save_published_checkpoint", "extract_state_dict",
           "save_training_checkpoint", "load_training_checkpoint", "list_training_checkpoints", "read_checkpoint",
           "checkpoint_config", "model_meta", "resolve_config", "open_checkpoint", "load_model"]


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
                              global_step: int = 0, ema_decay: float = 0.9999, config=None,
                              tokenizer: str | None = None) -> None:
    """Write ``model``'s backbone in the published Lightning layout (``backbone.`` prefix, optional EMA).

    ``config`` (e.g. ``model.config`` of an ``MDLM``) makes the file self-describing: it is stored as plain data
    with ``model_meta`` (vocabulary, MASK id, ``tokenizer`` -- default ``config.data.tokenizer``), so
    ``mdlm eval`` / ``mdlm sample`` need no ``--preset`` for it.

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
    if config is not None:
        import json
        obj["config"] = json.loads(json.dumps(config))
        obj["model_meta"] = model_meta(model, config, tokenizer)
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------
# Self-describing checkpoints: the model's config travels with its weights.
META_VERSION = 1


def model_meta(model: nn.Module, config, tokenizer: str | None = None) -> dict:
    """What rebuilding ``model`` needs besides ``config``: ``{"version", "vocab_size", "mask_index",
    "tokenizer", "length", "parameterization", "data": {"train", "valid", "mode"}}`` (plain data)."""
    data = config.get("data", {}) if hasattr(config, "get") else {}
    backbone = _backbone(model)
    V = getattr(model, "vocab_size", None) or getattr(backbone, "vocab_size", None)
    return {"version": META_VERSION, "vocab_size": None if V is None else int(V),
            "mask_index": None if getattr(model, "mask_index", None) is None else int(model.mask_index),
            "tokenizer": tokenizer or data.get("tokenizer"), "length": int(config["model"]["length"]),
            "parameterization": config.get("parameterization", "subs"),
            "data": {k: data.get(k) for k in ("train", "valid", "mode")}}


def read_checkpoint(checkpoint, weights_only: bool = True, map_location="cpu") -> tuple[Any, str]:
    """``(object, path)`` of a checkpoint given as a file, a run folder (``<out_dir>``: its
    ``checkpoints/``) or a checkpoint folder (its ``latest``, verified against its manifest)."""
    target = os.fspath(checkpoint)
    if os.path.isdir(target):
        sub = os.path.join(target, "checkpoints")
        folder = sub if os.path.isdir(sub) else target
        if not list_training_checkpoints(folder):
            raise CheckpointError(f"{target!r} is a folder without training checkpoints (step_*.ckpt)")
        return load_training_checkpoint(folder, map_location=map_location)
    return _read(target, weights_only, map_location), target


def checkpoint_config(obj) -> Any:
    """The ``mdlm.Config`` stored in a checkpoint object (``config`` entry), or None when it holds none. It is laid
    over today's defaults (``mdlm.preset("small")``), so a file written before a config key existed still gets
    that key (with its default) and every stored value wins."""
    from .config import Config, preset
    cfg = obj.get("config") if isinstance(obj, Mapping) else None
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping) and "hidden_size" in cfg["model"]:
        import copy
        return _overlay(preset("small"), Config(copy.deepcopy(dict(cfg))))
    return None


def _overlay(base, saved):
    """``base`` with every value of ``saved`` written over it, recursively (sections merge, leaves replace)."""
    for k, v in saved.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), Mapping):
            _overlay(base[k], v)
        else:
            base[k] = v
    return base


def resolve_config(obj, source: str, preset_name: str | None = None, data: str | None = None,
                   overrides=(), default_preset: str = "small", check_data: bool = True):
    """The config to build a checkpoint's model with: ``(config, stored)`` where ``stored`` says whether it came
    from the checkpoint.

    With a stored config: that config, then ``overrides`` (key=value) on top. ``preset_name`` / ``data`` given
    as well are checked, not applied: a preset whose model differs from the stored one, or a dataset whose
    tokenizer differs from the stored tokenizer, is a ``CheckpointError`` naming both configs (``check_data``
    False: ``data`` is only the fallback for checkpoints without a config -- ``mdlm eval`` scores any dataset
    with the model's own tokenizer). Without one (a
    published Lightning file, an older checkpoint): ``mdlm.preset(preset_name or default_preset, data=data)``
    plus ``overrides``, as before.
    """
    from .config import apply_overrides, describe_model, model_differences, preset
    saved = checkpoint_config(obj)
    if saved is None:
        return apply_overrides(preset(preset_name or default_preset, data=data), list(overrides)), False
    if preset_name is not None:
        asked = preset(preset_name)
        diff = [d for d in model_differences(saved, asked)
                if d.split(":")[0].startswith("model.") and not d.startswith("model.length")]
        if diff:
            raise CheckpointError(
                f"{source} holds a model with {describe_model(saved)}; --preset {preset_name} describes "
                f"{describe_model(asked)} ({'; '.join(diff)}). The checkpoint describes its own model: drop "
                f"--preset (key=value overrides still apply)")
    if data is not None and check_data:
        asked = preset("small", data=data)
        want, have = asked.data.tokenizer, saved.get_path("data.tokenizer")
        if have is not None and want != have:
            raise CheckpointError(f"{source} holds a model trained on {have!r} tokens (data {saved.get_path('data.train')!r}); "
                                  f"--data {data} uses the {want!r} tokenizer")
    return apply_overrides(saved, list(overrides)), True


def open_checkpoint(checkpoint, preset_name: str | None = None, data: str | None = None, overrides=(),
                    weights_only: bool = True, map_location="cpu", check_data: bool = True) -> dict:
    """Everything needed to rebuild a checkpoint's model, for a checkpoint file, a run folder, a checkpoint
    folder or a Hugging Face snapshot folder (``mdlm.hf``): ``{"obj", "path", "config", "stored", "meta"}`` --
    the loaded object (for ``load_published_checkpoint``), the resolved path, the config (``resolve_config``),
    whether it came from the checkpoint, and ``model_meta`` (vocab_size, mask_index, tokenizer) when known."""
    from . import hf
    target = os.fspath(checkpoint)
    if not os.path.exists(target):
        raise CheckpointError(f"checkpoint {target!r} does not exist")
    if hf.is_snapshot(target):
        cfg, V, mask, sd = hf.read_snapshot(target)
        obj = {"state_dict": sd, "config": json_plain(cfg),
               "model_meta": {"vocab_size": V, "mask_index": mask, "tokenizer": cfg.get_path("data.tokenizer")}}
        path = target
    else:
        obj, path = read_checkpoint(target, weights_only, map_location)
    cfg, stored = resolve_config(obj, path, preset_name, data, overrides, check_data=check_data)
    meta = obj.get("model_meta") if isinstance(obj, Mapping) else None
    return {"obj": obj, "path": path, "config": cfg, "stored": stored, "meta": meta if isinstance(meta, Mapping) else None}


def json_plain(cfg) -> dict:
    """A config tree as plain JSON data."""
    import json
    return json.loads(json.dumps(cfg))


def load_model(checkpoint, preset_name: str | None = None, data: str | None = None, overrides=(),
               use_ema: bool = True, weights_only: bool = True, map_location="cpu"):
    """Rebuild an ``MDLM`` from a checkpoint (file, run folder, checkpoint folder or Hugging Face snapshot folder)
    and load its weights (the EMA weights when present and ``use_ema``); eval mode. Self-describing checkpoints
    need nothing else; others need the ``preset_name`` / ``data`` / ``overrides`` they were trained with
    (default: the small preset, vocabulary from ``data.tokenizer``). Returns ``(model, info)`` with
    ``info = {"path", "config_from_checkpoint", "tokenizer", "ema", "global_step"}``."""
    from .diffusion import MDLM
    c = open_checkpoint(checkpoint, preset_name, data, overrides, weights_only, map_location)
    cfg, meta = c["config"], c["meta"] or {}
    tok_name = meta.get("tokenizer") or cfg.get_path("data.tokenizer")
    if meta.get("vocab_size"):
        V, mask = int(meta["vocab_size"]), meta.get("mask_index")
    else:
        from .data import get_tokenizer
        tok = get_tokenizer(tok_name)
        V, mask = int(tok.model_vocab_size), int(tok.mask_id)
    model = MDLM(cfg, V, mask_index=mask)
    try:
        report = load_published_checkpoint(model, c["obj"], use_ema=use_ema)
    except CheckpointError as e:
        raise CheckpointError(f"{c['path']}: {e}{_hint(c['stored'], cfg)}") from e
    model.eval()
    return model, {"path": c["path"], "config_from_checkpoint": c["stored"], "tokenizer": tok_name,
                   "ema": report["ema"], "global_step": report["global_step"]}


def _hint(stored: bool, cfg) -> str:
    """What to do when a checkpoint does not fit the model built for it."""
    from .config import describe_model
    if stored:
        return f" (the model was built from the checkpoint's own config: {describe_model(cfg)}; check the overrides)"
    return (f" (the checkpoint holds no model config, so the model was built from the flags: {describe_model(cfg)}; "
            "pass the --preset, --data and key=value overrides it was trained with)")


# ------------------------------------------------------------------------------------------------------------
# Training checkpoints: everything a run needs to continue exactly where it stopped.
#
# Layout of ``<run>/checkpoints/``:
#   step_00000100.ckpt   the checkpoint (published Lightning layout for the weights + EMA, so
#                        ``load_published_checkpoint`` and ``mdlm eval`` read it; plus optimizer, schedule,
#                        step, data position, every RNG state and the trainer's counters)
#   step_00000100.json   its manifest: byte size and SHA-256, written after the checkpoint is complete
#   latest               the name of the newest complete checkpoint (written last, atomically)
#
# Write order (each file: temporary name -> fsync -> rename -> fsync of the directory): checkpoint,
# manifest, ``latest``; only then are checkpoints beyond ``keep`` deleted, never the one ``latest`` names.
# A crash at any point therefore leaves the previous ``latest`` and its checkpoint intact; a temporary
# file left behind is ignored and removed by the next save.
TRAIN_FORMAT = "mdlm-kernels-train-v1"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: str, write) -> None:
    """``write(f)`` into ``path.tmp.<pid>``, fsync, rename over ``path``, fsync the directory."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_name(step: int) -> str:
    return f"step_{int(step):08d}.ckpt"


def save_training_checkpoint(ckpt_dir, state: Mapping[str, Any], step: int, keep: int = 2,
                             _fault_hook=None) -> str:
    """Write ``state`` (a dict of tensors / plain objects) as the checkpoint of ``step``; returns its path.

    ``keep`` (>= 1) complete checkpoints stay on disk. ``_fault_hook(stage)`` is called between the write
    stages ("partial", "written", "manifest") — the fault-injection tests kill the process there.
    """
    import json
    ckpt_dir = os.fspath(ckpt_dir)
    os.makedirs(ckpt_dir, exist_ok=True)
    for name in os.listdir(ckpt_dir):          # leftovers of a save that was killed
        if ".tmp." in name:
            try:
                os.remove(os.path.join(ckpt_dir, name))
            except OSError:
                pass
    name = checkpoint_name(step)
    path = os.path.join(ckpt_dir, name)
    obj = dict(state)
    obj["format"] = TRAIN_FORMAT
    obj["global_step"] = int(step)

    def write(f):
        torch.save(obj, f)
        if _fault_hook is not None:
            f.flush()
            _fault_hook("partial")

    _atomic_write_bytes(path, write)
    if _fault_hook is not None:
        _fault_hook("written")
    manifest = {"file": name, "step": int(step), "bytes": os.path.getsize(path), "sha256": _sha256(path)}
    _atomic_write_bytes(path[: -len(".ckpt")] + ".json", lambda f: f.write(json.dumps(manifest).encode()))
    if _fault_hook is not None:
        _fault_hook("manifest")
    _atomic_write_bytes(os.path.join(ckpt_dir, "latest"), lambda f: f.write(name.encode()))
    complete = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step_") and n.endswith(".ckpt"))
    for old in complete[: max(0, len(complete) - max(1, int(keep)))]:
        if old == name:
            continue
        for suffix in (".ckpt", ".json"):
            try:
                os.remove(os.path.join(ckpt_dir, old[: -len(".ckpt")] + suffix))
            except OSError:
                pass
    return path


def _verify(path: str) -> None:
    """Check ``path`` against its manifest (size, SHA-256) when there is one; CheckpointError otherwise."""
    import json
    manifest_path = path[: -len(".ckpt")] + ".json"
    if not os.path.exists(manifest_path):
        return  # killed between the checkpoint's rename and its manifest: the file itself is complete
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint manifest {manifest_path!r} is unreadable: {e}") from e
    size = os.path.getsize(path)
    if size != manifest.get("bytes"):
        raise CheckpointError(f"checkpoint {path!r} is truncated or altered: {size} bytes, its manifest "
                              f"{manifest_path!r} says {manifest.get('bytes')}")
    if _sha256(path) != manifest.get("sha256"):
        raise CheckpointError(f"checkpoint {path!r} is corrupt: SHA-256 differs from its manifest "
                              f"{manifest_path!r}")


def list_training_checkpoints(ckpt_dir) -> list[str]:
    """Complete checkpoint paths in ``ckpt_dir``, newest first (the one ``latest`` names leads)."""
    ckpt_dir = os.fspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        return []
    names = sorted((n for n in os.listdir(ckpt_dir) if n.startswith("step_") and n.endswith(".ckpt")),
                   reverse=True)
    latest_file = os.path.join(ckpt_dir, "latest")
    if os.path.exists(latest_file):
        with open(latest_file) as f:
            latest = f.read().strip()
        if latest in names:
            names.remove(latest)
            names.insert(0, latest)
    return [os.path.join(ckpt_dir, n) for n in names]


def load_training_checkpoint(path_or_dir, fallback: bool = False, map_location="cpu",
                             log=None) -> tuple[dict, str]:
    """Load a training checkpoint: a file, or a run's checkpoint directory (its ``latest``).

    A missing, truncated or corrupt file raises ``CheckpointError`` naming it; with ``fallback=True`` and a
    directory, the next older complete checkpoint is tried instead (``log(message)`` is told about each
    one skipped). Returns ``(state, path)``.
    """
    target = os.fspath(path_or_dir)
    candidates = list_training_checkpoints(target) if os.path.isdir(target) else [target]
    if not candidates:
        raise CheckpointError(f"no checkpoint found in {target!r}")
    errors = []
    for path in candidates:
        try:
            _verify(path)
            obj = _read(path, weights_only=True, map_location=map_location)
            if not isinstance(obj, Mapping) or obj.get("format") != TRAIN_FORMAT:
                raise CheckpointError(f"{path!r} is not an mdlm training checkpoint (format "
                                      f"{obj.get('format') if isinstance(obj, Mapping) else type(obj).__name__!r})")
            if errors and log is not None:
                log(f"resuming from the older checkpoint {path!r}")
            return obj, path
        except CheckpointError as e:
            if not fallback:
                raise
            errors.append(str(e))
            if log is not None:
                log(f"skipping checkpoint: {e}")
    raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
