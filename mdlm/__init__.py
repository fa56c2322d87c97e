"""mdlm: the plain-PyTorch MDLM reference (the spec) and the thin user layer over mdlm_kernels.

- ``mdlm.config``: the published config tree and the tiny / small / medium presets
- ``mdlm.schedules``: noise schedules sigma(t), dsigma(t)
- ``mdlm.nn``: the published DiT (``DIT``) and AR backbones
- ``mdlm.diffusion``: forward masking, parameterizations (SUBS, D3PM, SEDD, AR) and losses (``MDLM``)
- ``mdlm.sampling``: the published samplers (ddpm, ddpm_cache, analytic, semi-autoregressive): the spec
- ``mdlm.samplers``: fast samplers on the fused sampling kernel; ``mdlm.sample`` dispatches
- ``mdlm.checkpoint``: published-layout checkpoint loading; self-describing checkpoints (``load_model``)
- ``mdlm.hf``: the published Hugging Face layout (``kuleshov-group/mdlm-owt``): ``from_pretrained`` /
  ``save_pretrained``

``mdlm.sample(model, ..., progress=True)`` shows a progress bar on stderr (one tick per model call) -- off by
default; ``mdlm sample`` turns it on.
"""
from .config import Config, preset, PRESETS
from .schedules import get_noise
from .nn import DIT, AR
from .diffusion import MDLM, Loss
from .sampling import semi_ar_sample
from .samplers import sample, fast_sample
from .checkpoint import load_published_checkpoint, save_published_checkpoint, CheckpointError, load_model
from .hf import from_pretrained, save_pretrained
from . import data, sampling, samplers

__version__ = "0.1.0"

__all__ = ["Config", "preset", "PRESETS", "get_noise", "DIT", "AR", "MDLM", "Loss", "sample", "fast_sample", "semi_ar_sample",
           "load_published_checkpoint", "save_published_checkpoint", "CheckpointError", "load_model",
           "from_pretrained", "save_pretrained", "__version__"]
