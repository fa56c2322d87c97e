"""Noise schedules of the published MDLM code: ``sigma(t)`` (total noise) and ``dsigma(t)`` (rate).

For every schedule the move (masking) chance is ``1 - exp(-sigma(t))`` and the continuous-time SUBS
loss weight is ``dsigma(t) / expm1(sigma(t))``. For the default loglinear schedule,
``sigma(t) = -log1p(-(1 - eps) t)`` so the move chance is ``(1 - eps) t`` and the weight is exactly ``1/t``.

Calling a schedule returns ``(sigma, dsigma)`` like the published ``Noise.forward``. Inputs are tensors
of any shape; outputs have the same shape and dtype (fp32 inputs stay fp32, as published).
"""
from __future__ import annotations

import math

import torch

__all__ = ["Noise", "LogLinearNoise", "LinearNoise", "GeometricNoise", "CosineNoise", "CosineSqrNoise",
           "get_noise", "SCHEDULES", "loss_weight", "move_chance"]


class Noise:
    """Base class: ``total_noise`` is sigma(t), ``rate_noise`` is dsigma/dt."""

    name = "base"

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total_noise(t), self.rate_noise(t)

    forward = __call__

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def importance_sampling_transformation(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} schedule has no importance-sampling transform "
                                  "in the published code (loglinear and linear do)")


class LogLinearNoise(Noise):
    """sigma(t) = -log1p(-(1 - eps) t): the move chance (1 - eps) t is linear in t (published default)."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps
        self.sigma_max = self.total_noise(torch.tensor(1.0))
        self.sigma_min = self.eps + self.total_noise(torch.tensor(0.0))

    def rate_noise(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def total_noise(self, t):
        return -torch.log1p(-(1 - self.eps) * t)

    def importance_sampling_transformation(self, t):
        # Invert the cumulative loss weight so that t is drawn proportionally to it (published).
        f_T = torch.log1p(-torch.exp(-self.sigma_max))
        f_0 = torch.log1p(-torch.exp(-self.sigma_min))
        sigma_t = -torch.log1p(-torch.exp(t * f_T + (1 - t) * f_0))
        return -torch.expm1(-sigma_t) / (1 - self.eps)


class LinearNoise(Noise):
    """sigma(t) = sigma_min + t (sigma_max - sigma_min)."""

    name = "linear"

    def __init__(self, sigma_min: float = 0.0, sigma_max: float = 10.0, dtype=torch.float32):
        self.sigma_min = torch.tensor(sigma_min, dtype=dtype)
        self.sigma_max = torch.tensor(sigma_max, dtype=dtype)
        self._on_device = {}

    def _consts(self, device):
        """(sigma_min, sigma_max - sigma_min) on ``device``, copied once per device (not once per call)."""
        if device not in self._on_device:
            self._on_device[device] = (self.sigma_min.to(device), (self.sigma_max - self.sigma_min).to(device))
        return self._on_device[device]

    def rate_noise(self, t):
        return self._consts(t.device)[1] + torch.zeros_like(t)

    def total_noise(self, t):
        smin, span = self._consts(t.device)
        return smin + t * span

    def importance_sampling_transformation(self, t):
        f_T = torch.log1p(-torch.exp(-self.sigma_max))
        f_0 = torch.log1p(-torch.exp(-self.sigma_min))
        sigma_t = -torch.log1p(-torch.exp(t * f_T + (1 - t) * f_0))
        return (sigma_t - self.sigma_min) / (self.sigma_max - self.sigma_min)


class GeometricNoise(Noise):
    """sigma(t) = sigma_min^(1-t) sigma_max^t."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 1.0):
        self.sigmas = 1.0 * torch.tensor([sigma_min, sigma_max])
        self._on_device = {}

    def _sigmas(self, device):
        """sigmas on ``device``, copied once per device (not once per call)."""
        if device not in self._on_device:
            self._on_device[device] = self.sigmas.to(device)
        return self._on_device[device]

    def rate_noise(self, t):
        s = self._sigmas(t.device)
        return s[0] ** (1 - t) * s[1] ** t * (s[1].log() - s[0].log())

    def total_noise(self, t):
        s = self._sigmas(t.device)
        return s[0] ** (1 - t) * s[1] ** t


class CosineNoise(Noise):
    """sigma(t) = -log(eps + (1 - eps) cos(pi t / 2)); the rate is the published one (eps in the denominator)."""

    name = "cosine"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def rate_noise(self, t):
        cos = (1 - self.eps) * torch.cos(t * math.pi / 2)
        sin = (1 - self.eps) * torch.sin(t * math.pi / 2)
        return (math.pi / 2) * sin / (cos + self.eps)

    def total_noise(self, t):
        return -torch.log(self.eps + (1 - self.eps) * torch.cos(t * math.pi / 2))


class CosineSqrNoise(Noise):
    """sigma(t) = -log(eps + (1 - eps) cos^2(pi t / 2))."""

    name = "cosinesqr"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def rate_noise(self, t):
        cos = (1 - self.eps) * torch.cos(t * math.pi / 2) ** 2
        sin = (1 - self.eps) * torch.sin(t * math.pi)
        return (math.pi / 2) * sin / (cos + self.eps)

    def total_noise(self, t):
        return -torch.log(self.eps + (1 - self.eps) * torch.cos(t * math.pi / 2) ** 2)


SCHEDULES = ("loglinear", "linear", "geometric", "cosine", "cosinesqr")


def get_noise(config_or_name, **kwargs) -> Noise:
    """Build a schedule from a config (``config.noise.type``, ``sigma_min``, ``sigma_max``, ``eps``) or a name."""
    if isinstance(config_or_name, str):
        name, params = config_or_name, dict(kwargs)
    else:
        node = config_or_name.noise
        name = node.type
        from .config import _MISSING, cfg_get   # any config kind: Config, dict, OmegaConf, attribute objects
        params = {k: v for k in ("sigma_min", "sigma_max", "eps") if (v := cfg_get(node, k, _MISSING)) is not _MISSING}
        params.update(kwargs)
    if name == "loglinear":
        return LogLinearNoise(eps=params.get("eps", 1e-3))
    if name == "linear":
        return LinearNoise(params.get("sigma_min", 0.0), params.get("sigma_max", 10.0))
    if name == "geometric":
        return GeometricNoise(params.get("sigma_min", 1e-3), params.get("sigma_max", 1.0))
    if name == "cosine":
        return CosineNoise(eps=params.get("eps", 1e-3))
    if name == "cosinesqr":
        return CosineSqrNoise(eps=params.get("eps", 1e-3))
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {SCHEDULES}")


def move_chance(sigma: torch.Tensor) -> torch.Tensor:
    """Probability that a token is masked at total noise sigma: 1 - exp(-sigma) (published form)."""
    return 1 - torch.exp(-sigma)


def loss_weight(sigma: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
    """Continuous-time SUBS NELBO weight dsigma / expm1(sigma) (= 1/t for loglinear)."""
    return dsigma / torch.expm1(sigma)
