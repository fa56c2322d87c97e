"""Configuration: the published MDLM config tree as plain nested attribute dicts, and the presets.

The published code passes an OmegaConf tree to ``DIT(config, vocab_size)`` and reads
``config.model.hidden_size`` etc. ``Config`` gives the same attribute access without the dependency;
an OmegaConf ``DictConfig`` (or any object with the same attributes) works everywhere a ``Config`` does.
"""
from __future__ import annotations

import copy
import math
import numbers
import operator
from typing import Any, Mapping

__all__ = ["Config", "to_config", "preset", "PRESETS", "DATA_PRESETS", "QUICK", "apply_overrides", "describe_model",
           "model_differences", "cfg_get", "check_config", "check_training_keys"]


class Config(dict):
    """A dict whose keys are also attributes, recursively (``cfg.model.hidden_size``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for k, v in list(self.items()):
            if isinstance(v, Mapping) and not isinstance(v, Config):
                dict.__setitem__(self, k, Config(v))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r} (fields: {sorted(self)})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = Config(value) if isinstance(value, Mapping) and not isinstance(value, Config) else value

    def __deepcopy__(self, memo):
        return Config(copy.deepcopy(dict(self), memo))

    def get_path(self, dotted: str, default: Any = None) -> Any:
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node


def to_config(cfg: Any) -> Any:
    """Plain dicts become ``Config``; anything with attribute access (OmegaConf, Config) is returned as is."""
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, Mapping) and type(cfg).__module__.split(".")[0] != "omegaconf":
        return Config(cfg)
    return cfg


def cfg_get(node: Any, name: str, default: Any = None) -> Any:
    """``node.name``, or ``default`` when the field is absent, for every config kind the library accepts: a
    ``Config`` / dict / OmegaConf ``DictConfig`` (mappings: ``node.get``) or any object with attribute access
    (e.g. ``types.SimpleNamespace``, as the published ``DIT(config, vocab_size)`` reads its config)."""
    if isinstance(node, Mapping):
        return node.get(name, default)
    return getattr(node, name, default)


_MISSING = object()


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """value as an int >= minimum, else a ValueError naming ``name``. bool, float (2.0 too) and text are refused;
    integers that are not Python ints (numpy's, one-element integer tensors) are taken through ``operator.index``.
    (Shared by the config checks below and the samplers' argument checks, mdlm.sampling.)"""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _check_int(key: str, value: Any, minimum: int) -> int | None:
    """check_int for config key ``key`` (None when the field is absent)."""
    if value is _MISSING:
        return None
    return check_int(value, f"config key {key}", minimum)


def _check_real(key: str, value: Any, lo: float, hi: float, hi_open: bool = False, lo_open: bool = False) -> None:
    """A real number (not bool, not NaN) in the interval; ``hi = inf`` means any finite number above ``lo``."""
    if value is _MISSING:
        return
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi))
    if not ok:
        what = (f"a finite number {'>' if lo_open else '>='} {lo}" if hi == math.inf else
                f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
        raise ValueError(f"config key {key} must be {what}, got {value!r}")


def check_config(cfg: Any, training: bool = False) -> Any:
    """Check the fields that size a model or a sampler run; a ValueError names the key
    (``config key model.n_heads must be an integer >= 1, got 0``). Fields that are absent are not checked (a
    partial config, e.g. the published DiT's ``config.model`` alone, is fine). Works on any config kind
    (``cfg_get``). Called by ``apply_overrides`` (so ``preset``, the CLIs and checkpoint loading) and by the
    backbones' constructors (``DIT``, ``AR``). Returns ``cfg``.

    model: hidden_size, n_heads, n_blocks, cond_dim, length integers >= 1; hidden_size divisible by n_heads
    with an even head dim (rotary pairs the two halves); dropout in [0, 1). sampling: steps >= 1, eps in
    [0, 1], stride_length >= 1, num_strides >= 0. trainer: sample_steps >= 1, num_samples >= 0.

    ``training=True`` (the ``Trainer``) also checks the training keys (``TRAINING_CHECKS``); they are not read
    to build or sample a model, so loading a checkpoint or building a ``DIT`` from the published (Hydra) config
    never evaluates them. ``apply_overrides`` checks those among the keys it sets."""
    m = cfg_get(cfg, "model", None)
    if m is not None:
        sizes = {k: _check_int(f"model.{k}", cfg_get(m, k, _MISSING), 1)
                 for k in ("hidden_size", "n_heads", "n_blocks", "cond_dim", "length")}
        d, h = sizes["hidden_size"], sizes["n_heads"]
        if d is not None and h is not None:
            if d % h:
                raise ValueError(f"config key model.hidden_size ({d}) must be divisible by model.n_heads ({h})")
            if (d // h) % 2:
                raise ValueError(f"config keys model.hidden_size / model.n_heads: the head dim {d} / {h} = {d // h} "
                                 "must be even (rotary embeddings rotate pairs of halves)")
        _check_real("model.dropout", cfg_get(m, "dropout", _MISSING), 0.0, 1.0, hi_open=True)
    s = cfg_get(cfg, "sampling", None)
    if s is not None:
        _check_int("sampling.steps", cfg_get(s, "steps", _MISSING), 1)
        _check_real("sampling.eps", cfg_get(s, "eps", _MISSING), 0.0, 1.0)
        _check_int("sampling.stride_length", cfg_get(s, "stride_length", _MISSING), 1)
        _check_int("sampling.num_strides", cfg_get(s, "num_strides", _MISSING), 0)
    tr = cfg_get(cfg, "trainer", None)
    if tr is not None:   # the samples drawn during training: a bad value would only fail after hours of training
        _check_int("trainer.sample_steps", cfg_get(tr, "sample_steps", _MISSING), 1)
        _check_int("trainer.num_samples", cfg_get(tr, "num_samples", _MISSING), 0)
    if training:
        check_training_keys(cfg)
    return cfg


def _grad_clip(key: str, value: Any) -> None:
    if value is _MISSING:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"config key {key} must be a number (<= 0: no clipping), got {value!r}")


def _scheduler_type(key: str, value: Any) -> None:
    if value is not _MISSING and value not in ("constant_warmup", "cosine_decay_warmup"):
        raise ValueError(f"config key {key} must be constant_warmup or cosine_decay_warmup, got {value!r}")


# The training keys' checks (key -> check(key, value)): a bad value would otherwise fail late (after hours of
# training, at the first checkpoint) or silently (a NaN learning rate or clip threshold skips every step as
# non-finite). 0 keeps its documented meaning where it has one (val_every / save_every / sample_every 0: only
# at the end / never; batch_size 0: derived; keep_checkpoints below 2: 2; max_nonfinite 0: stop at the first).
_INT0 = lambda k, v: _check_int(k, v, 0)  # noqa: E731
TRAINING_CHECKS = {
    **{f"trainer.{k}": _INT0 for k in ("max_steps", "log_every", "val_every", "val_blocks", "save_every",
                                        "sample_every", "keep_checkpoints", "max_nonfinite")},
    "trainer.grad_clip": _grad_clip,
    "loader.global_batch_size": lambda k, v: _check_int(k, v, 1),
    "loader.batch_size": _INT0,
    "loader.eval_batch_size": _INT0,
    "optim.lr": lambda k, v: _check_real(k, v, 0.0, math.inf),
    "optim.beta1": lambda k, v: _check_real(k, v, 0.0, 1.0, hi_open=True),
    "optim.beta2": lambda k, v: _check_real(k, v, 0.0, 1.0, hi_open=True),
    "optim.eps": lambda k, v: _check_real(k, v, 0.0, math.inf, lo_open=True),
    "optim.weight_decay": lambda k, v: _check_real(k, v, 0.0, math.inf),
    "lr_scheduler.type": _scheduler_type,
    "lr_scheduler.warmup_steps": _INT0,
    "lr_scheduler.warmup_fraction": lambda k, v: _check_real(k, v, 0.0, 1.0),
    "lr_scheduler.warmup_lr_init": lambda k, v: _check_real(k, v, 0.0, math.inf),
    "lr_scheduler.lr_min": lambda k, v: _check_real(k, v, 0.0, math.inf),
}


def check_training_keys(cfg: Any, keys=None) -> Any:
    """Check the training keys of ``cfg`` (all of ``TRAINING_CHECKS``, or those among ``keys``): trainer
    counts (max_steps, log_every, val_every, val_blocks, save_every, sample_every, keep_checkpoints,
    max_nonfinite) integers >= 0, grad_clip a number (not NaN; <= 0 turns clipping off); loader:
    global_batch_size >= 1, batch_size / eval_batch_size >= 0; optim: lr, weight_decay finite >= 0, beta1 /
    beta2 in [0, 1), eps finite > 0; lr_scheduler: type known, warmup_steps >= 0, warmup_fraction in [0, 1],
    warmup_lr_init / lr_min finite >= 0. A ValueError names the key. Returns ``cfg``."""
    for key, check in TRAINING_CHECKS.items():
        if keys is not None and key not in keys:
            continue
        section, name = key.split(".")
        node = cfg_get(cfg, section, None)
        if node is not None:
            check(key, cfg_get(node, name, _MISSING))
    return cfg


# The published defaults (configs/config.yaml + model/small.yaml + noise/loglinear.yaml of the MDLM code),
# restricted to the fields this library reads.
_BASE: dict = {
    "model": {
        "name": "small", "type": "ddit", "hidden_size": 768, "cond_dim": 128, "length": 1024,
        "n_blocks": 12, "n_heads": 12, "scale_by_sigma": True, "dropout": 0.1,
        "tie_word_embeddings": False,
    },
    "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20.0, "eps": 1e-3},
    "parameterization": "subs",      # subs | d3pm | sedd | ar
    "time_conditioning": False,      # published default: sigma is fed to the backbone as zeros
    "T": 0,                          # 0 = continuous time; T > 0 = discrete time with T steps
    "subs_masking": False,
    "loss_impl": "auto",             # auto | reference | masked | fused (auto: fused for continuous-time SUBS)
    "training": {
        "antithetic_sampling": True, "importance_sampling": False, "sampling_eps": 1e-3,
        "change_of_variables": False, "ema": 0.9999,
    },
    "sampling": {
        "predictor": "ddpm_cache", "steps": 128, "noise_removal": True, "eps": 1e-5,
        "stride_length": 1, "num_strides": 1,
    },
    # ---- training run (mdlm.train); published values from configs/config.yaml unless noted
    "seed": 1,
    "optim": {"lr": 3e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    # constant_warmup (published default): lr * min(1, step / warmup_steps), HF-style (the first update has
    # lr 0). cosine_decay_warmup (published alternative, timm-style with warmup prefix): linear from
    # warmup_lr_init over warmup_fraction * max_steps, then cosine to lr_min at max_steps.
    "lr_scheduler": {"type": "constant_warmup", "warmup_steps": 2500, "warmup_fraction": 0.1,
                     "warmup_lr_init": 1e-6, "lr_min": 1e-6},
    "loader": {
        "global_batch_size": 512,   # sequences per optimizer step, over all processes and accumulation
        "batch_size": 0,            # per-process micro-batch; 0 = global / world size (no accumulation)
        "eval_batch_size": 0,       # 0 = batch_size
    },
    "data": {"train": "openwebtext", "valid": "openwebtext", "tokenizer": "gpt2", "mode": "wrap",
             "cache_dir": None, "num_workers": 0},
    "trainer": {
        "max_steps": 1_000_000,
        "grad_clip": 1.0,
        "precision": "auto",        # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
        "compile": False,           # torch.compile the loss function
        "use_kernels": "auto",      # auto (on CUDA) | true | false: the fused DiT block kernels
        "strategy": "auto",         # auto (ddp when WORLD_SIZE > 1) | ddp | fsdp | none
        "log_every": 10,
        "val_every": 1000,          # steps; 0 = only at the end
        "val_blocks": 0,            # validation blocks per evaluation; 0 = all
        "save_every": 1000,         # steps; 0 = only at the end / on interruption
        "keep_checkpoints": 2,      # complete checkpoints kept on disk (>= 2: the last good one survives)
        "resume_fallback": True,    # newest checkpoint corrupt: resume from the previous one (False: stop)
        "sample_every": 0,          # steps; 0 = never during training
        "num_samples": 2, "sample_steps": 128,
        "max_nonfinite": 10,        # consecutive non-finite steps that stop the run
        "out_dir": "runs/mdlm",
        "progress": "auto",         # auto (a bar on a terminal, log lines otherwise) | true | false
        "loggers": "",              # extra loggers besides log.jsonl: "tensorboard", "wandb" (comma list)
        "wandb_project": "mdlm",
    },
}

# Dataset presets: the published data configs, plus the shipped local corpora for CPU runs.
_DATA_PRESETS = {
    "openwebtext": {"data": {"train": "openwebtext", "valid": "openwebtext", "tokenizer": "gpt2", "mode": "wrap"}},
    "lm1b": {"data": {"train": "lm1b", "valid": "lm1b", "tokenizer": "bert-base-uncased", "mode": "pad"},
             "model": {"length": 128}},
    "text8": {"data": {"train": "text8", "valid": "text8", "tokenizer": "text8", "mode": "wrap"},
              "model": {"length": 256}},
    "wikitext103": {"data": {"train": "wikitext103", "valid": "wikitext103", "tokenizer": "gpt2", "mode": "wrap"}},
    "wikitext2": {"data": {"train": "wikitext2", "valid": "wikitext2", "tokenizer": "gpt2", "mode": "wrap"}},
    "tinyshakespeare": {"data": {"train": "tinyshakespeare", "valid": "tinyshakespeare", "tokenizer": "gpt2",
                                 "mode": "wrap"}},
}
DATA_PRESETS = tuple(_DATA_PRESETS)

# `mdlm train --quick`: a CPU-sized run of the tiny preset that finishes in minutes and visibly learns. The
# published recipe (512 sequences per step, a 2500-step warm-up) is for GPU clusters: on two CPU cores one of
# its tiny-preset steps takes 40-60 s and the warm-up alone ~30 hours. These settings train 150 steps of 8
# sequences (153,600 tokens at L = 128: ~1.5 min at the ~1.8k tokens/s of a 2-core CPU) and validate at
# steps 0, 50, 100 and 150 on 64 held-out blocks. Explicit key=value overrides win over them.
QUICK: dict = {
    "loader.global_batch_size": 8,
    "optim.lr": 1e-3,
    "lr_scheduler.warmup_steps": 20,
    "trainer.max_steps": 150,
    "trainer.val_every": 50,
    "trainer.val_blocks": 64,
    "trainer.save_every": 50,
    "trainer.log_every": 10,
    "trainer.out_dir": "runs/quick",
}

_MODEL_PRESETS = {
    # For CPUs and tests: well under a second per step on two cores at the GPT-2 vocabulary. NOT the
    # published configs/model/tiny.yaml (512 wide, 8 blocks, 8 heads, cond_dim 128).
    "tiny": {"name": "tiny", "hidden_size": 128, "cond_dim": 32, "length": 128, "n_blocks": 2,
             "n_heads": 4, "dropout": 0.1},
    "small": {"name": "small", "hidden_size": 768, "cond_dim": 128, "length": 1024, "n_blocks": 12,
              "n_heads": 12, "dropout": 0.1},
    "medium": {"name": "medium", "hidden_size": 1024, "cond_dim": 128, "length": 1024, "n_blocks": 24,
               "n_heads": 16, "dropout": 0.1},
}
PRESETS = tuple(_MODEL_PRESETS)


def preset(name: str = "small", data: str | None = None, **overrides: Any) -> Config:
    """The published config with the model preset ``name`` (tiny | small | medium) and, optionally, the
    dataset preset ``data`` (openwebtext | lm1b | text8 | wikitext103 | wikitext2 | tinyshakespeare, or
    ``text:<path>[:<path>...]`` for local UTF-8 text files: GPT-2 tokens, wrap mode, the preset's length).

    ``overrides`` are dotted keys with ``__`` or ``.`` separators, e.g. ``preset("tiny", **{"model.length": 64})``.
    """
    if name not in _MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    cfg = Config(copy.deepcopy(_BASE))
    cfg.model.update(copy.deepcopy(_MODEL_PRESETS[name]))
    if data is not None:
        if str(data).startswith("text:"):
            if not str(data)[5:]:
                raise ValueError("--data text: needs a path, e.g. text:corpus.txt (globs and os.pathsep-separated "
                                 "lists allowed)")
            cfg.data.update({"train": data, "valid": data, "tokenizer": "gpt2", "mode": "wrap"})
        elif data not in _DATA_PRESETS:
            raise ValueError(f"unknown data preset {data!r}; choose one of {DATA_PRESETS} or text:<path>")
        else:
            for section, values in copy.deepcopy(_DATA_PRESETS[data]).items():
                cfg[section].update(values)
    return apply_overrides(cfg, {k.replace("__", "."): v for k, v in overrides.items()})


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | list[str]) -> Config:
    """Apply ``{"model.length": 64}`` or ``["model.length=64"]`` overrides; unknown keys are an error.

    A value must fit the type of the value it replaces: an integer field takes an integer (``1e6`` too, as it
    is whole), a float field a number, a boolean field true / false / 0 / 1; a string field takes any text
    (and true / false where the default is a mode such as ``"auto"``); a field whose default is None takes
    anything. A mismatch is a ValueError naming the key, e.g. ``trainer.max_steps=ten``; so is a value out of
    range for a field that sizes the model or the sampler (``check_config``, run on the result: ``model.n_heads=0``,
    a hidden size not divisible by the heads, negative sizes)."""
    raw: dict = {}
    if not isinstance(overrides, Mapping):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            k, v = item.split("=", 1)
            parsed[k.strip()] = _parse_value(v.strip())
            raw[k.strip()] = v.strip()
        overrides = parsed
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = cfg
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], Mapping):
                raise KeyError(f"unknown config key {dotted!r}")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"unknown config key {dotted!r} (known at that level: {sorted(node)})")
        node[parts[-1]] = _coerce(dotted, node[parts[-1]], value, raw.get(dotted))
    check_training_keys(cfg, keys=set(overrides))   # the training keys set here (all of them: the Trainer)
    return check_config(cfg)


def _coerce(key: str, old: Any, value: Any, text: str | None) -> Any:
    """``value`` converted to the type of the field's current value ``old``, or a ValueError naming ``key``."""
    shown = text if text is not None else repr(value)

    def bad(kind: str) -> ValueError:
        return ValueError(f"config key {key} takes {kind}, got {key}={shown} (current value: {old!r})")

    if old is None or isinstance(old, Mapping) or value is None and not isinstance(old, (bool, int, float)):
        return value
    if isinstance(old, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad("true or false")
    if isinstance(old, int):
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if isinstance(old, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if isinstance(old, str):
        if isinstance(value, (str, bool)):
            return value
        return text if text is not None else str(value)     # e.g. trainer.out_dir=2024 stays "2024"
    return value


def describe_model(cfg: Any) -> str:
    """One line with the fields that decide a model's shape: ``hidden 128, 2 blocks, 4 heads, cond 32, L 128,
    subs, time conditioning off``."""
    m = cfg.model
    return (f"hidden {m.hidden_size}, {m.n_blocks} blocks, {m.n_heads} heads, cond {m.cond_dim}, L {m.length}, "
            f"{cfg.get('parameterization', 'subs')}, time conditioning {'on' if cfg.get('time_conditioning') else 'off'}")


_SHAPE_KEYS = ("model.hidden_size", "model.n_blocks", "model.n_heads", "model.cond_dim", "model.length",
               "parameterization", "time_conditioning", "T", "noise.type", "data.tokenizer")


def model_differences(a: Any, b: Any) -> list[str]:
    """The model-defining fields (shapes, parameterization, noise, tokenizer) on which configs ``a`` and ``b``
    differ, as ``key: a_value vs b_value``."""
    out = []
    for key in _SHAPE_KEYS:
        va, vb = _get_path(a, key), _get_path(b, key)
        if va != vb:
            out.append(f"{key}: {va!r} vs {vb!r}")
    return out


def _get_path(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
