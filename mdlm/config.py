"""Configuration: the published MDLM config tree as plain nested attribute dicts, and the presets.

The published code passes an OmegaConf tree to ``DIT(config, vocab_size)`` and reads
``config.model.hidden_size`` etc. ``Config`` gives the same attribute access without the dependency;
an OmegaConf ``DictConfig`` (or any object with the same attributes) works everywhere a ``Config`` does.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

__all__ = ["Config", "to_config", "preset", "PRESETS", "apply_overrides"]


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


def preset(name: str = "small", **overrides: Any) -> Config:
    """The published config with the model preset ``name`` (tiny | small | medium).

    ``overrides`` are dotted keys with ``__`` or ``.`` separators, e.g. ``preset("tiny", **{"model.length": 64})``.
    """
    if name not in _MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    cfg = Config(copy.deepcopy(_BASE))
    cfg.model.update(copy.deepcopy(_MODEL_PRESETS[name]))
    return apply_overrides(cfg, {k.replace("__", "."): v for k, v in overrides.items()})


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | list[str]) -> Config:
    """Apply ``{"model.length": 64}`` or ``["model.length=64"]`` overrides; unknown keys are an error."""
    if not isinstance(overrides, Mapping):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            k, v = item.split("=", 1)
            parsed[k.strip()] = _parse_value(v.strip())
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
        node[parts[-1]] = value
    return cfg


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
