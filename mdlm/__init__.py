"""mdlm: the plain-PyTorch MDLM reference (the spec) and the thin user layer over mdlm_kernels.

- ``mdlm.config``: the published config tree and the tiny / small / medium presets
- ``mdlm.schedules``: noise schedules sigma(t), dsigma(t)
- ``mdlm.nn``: the published DiT (``DIT``) and AR backbones
- ``mdlm.diffusion``: forward masking, parameterizations (SUBS, D3PM, SEDD, AR) and losses (``MDLM``)
- ``mdlm.sampling``: ddpm, ddpm_cache, analytic and semi-autoregressive samplers
- ``mdlm.checkpoint``: published-layout checkpoint loading
"""
from .config import Config, preset, PRESETS
from .schedules import get_noise
from .nn import DIT, AR
from .diffusion import MDLM, Loss
from .sampling import sample, semi_ar_sample
from .checkpoint import load_published_checkpoint, save_published_checkpoint, CheckpointError

__version__ = "0.1.0"

__all__ = ["Config", "preset", "PRESETS", "get_noise", "DIT", "AR", "MDLM", "Loss", "sample", "semi_ar_sample",
           "load_published_checkpoint", "save_published_checkpoint", "CheckpointError", "__version__"]
