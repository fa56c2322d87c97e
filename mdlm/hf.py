"""The published Hugging Face weights: load a ``kuleshov-group/mdlm-owt`` snapshot, write the same layout.

Most MDLM users start from the OpenWebText model the authors released on the Hugging Face hub
(``kuleshov-group/mdlm-owt``, loaded there with ``AutoModelForMaskedLM.from_pretrained(..., trust_remote_code=
True)``). A snapshot of it is a folder with

- ``config.json``: ``model_type`` "mdlm" and the fields of the published ``MDLMConfig``
  (``configuration_mdlm.py``): ``vocab_size`` (50258 = GPT-2 + MASK), ``model_length`` (1024), ``hidden_dim``
  (768), ``cond_dim``, ``n_blocks`` (12), ``n_heads`` (12), ``dropout`` (0.1), ``time_conditioning`` (false),
  plus transformers' own entries (``architectures``, ``auto_map``, ``torch_dtype``, ...), which are ignored here;
- ``model.safetensors``: the state dict of the published ``MDLM`` class (``modeling_mdlm.py``), which holds the
  DiT as ``self.backbone``: every key is ``backbone.<name>`` with the DiT's parameter names -- the same names as
  ``mdlm.nn.DIT`` and as the Lightning checkpoints -- including the rotary buffer ``backbone.rotary_emb.inv_freq``;
- ``configuration_mdlm.py`` / ``modeling_mdlm.py``: the remote code (not executed here).

``from_pretrained(path)`` reads such a folder without ``transformers`` and without network: the config fields are
mapped onto this library's config tree (``hidden_dim`` -> ``model.hidden_size``, ``n_blocks`` -> ``model.n_blocks``,
``n_heads`` -> ``model.n_heads``, ``cond_dim`` -> ``model.cond_dim``, ``dropout`` -> ``model.dropout``,
``model_length`` -> ``model.length``, ``time_conditioning`` -> ``time_conditioning``), the rest is the published
recipe (``mdlm.preset("small")``: loglinear noise, SUBS, sampler defaults), MASK is the last id
(``vocab_size - 1``, as the published code appends it to GPT-2), and the weights go into ``mdlm.nn.DIT`` with
every missing, unexpected or mis-shaped key named. The published model's ``time_conditioning`` false means it is
fed sigma = 0 (its backbone zeroes sigma; here ``MDLM`` does, as for every config with time conditioning off).
``from_pretrained`` also takes this library's own checkpoints (a file, a run folder or a checkpoint folder; see
``mdlm.checkpoint.load_model``).

``save_pretrained(model, path)`` writes the same layout (``config.json``, ``model.safetensors``, and a
``configuration_mdlm.py`` / ``modeling_mdlm.py`` of this library -- small files written here, whose model class
wraps ``mdlm.nn.DIT``, so ``transformers`` loads the folder with ``trust_remote_code=True`` where mdlm-kernels is
installed). The weights need the ``safetensors`` package (``pip install mdlm-kernels[hf]``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError

__all__ = ["from_pretrained", "save_pretrained", "read_snapshot", "is_snapshot", "config_from_hf", "hf_config", "HF_FIELDS"]

# published config.json field -> this library's config key
HF_FIELDS = {"hidden_dim": "model.hidden_size", "n_blocks": "model.n_blocks", "n_heads": "model.n_heads",
             "cond_dim": "model.cond_dim", "dropout": "model.dropout", "model_length": "model.length",
             "time_conditioning": "time_conditioning"}
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
PREFIX = "backbone."
GPT2_MODEL_VOCAB = 50258


def is_snapshot(path) -> bool:
    """True for a folder holding ``config.json`` (a Hugging Face snapshot)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError("model.safetensors needs the 'safetensors' package: pip install safetensors (or "
                          "pip install 'mdlm-kernels[hf]')") from e
    return st


def config_from_hf(hf: dict, source: str = "config.json"):
    """``(config, vocab_size, mask_index)`` from the fields of a published ``config.json``."""
    from .config import apply_overrides, preset
    if hf.get("model_type", "mdlm") != "mdlm":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r}, not 'mdlm'")
    missing = [k for k in ("vocab_size", *HF_FIELDS) if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing MDLM config field(s) {missing}")
    cfg = preset("small")
    cfg.model.name = "hf"
    apply_overrides(cfg, {ours: hf[theirs] for theirs, ours in HF_FIELDS.items()})
    V = int(hf["vocab_size"])
    mask = int(hf.get("mask_index", V - 1))           # published: MASK appended as the last id
    cfg.data.tokenizer = hf.get("tokenizer") or ("gpt2" if V == GPT2_MODEL_VOCAB else None)
    return cfg, V, mask


def hf_config(model) -> dict:
    """The ``config.json`` of ``model`` (an ``MDLM`` with a DIT backbone) in the published layout."""
    from .nn import DIT
    if not isinstance(getattr(model, "backbone", None), DIT):
        raise ValueError("save_pretrained writes MDLM models with the DIT backbone (the published layout)")
    m = model.config.model
    out = {"architectures": ["MDLM"],
           "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig", "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
           "model_type": "mdlm", "vocab_size": int(model.vocab_size), "model_length": int(m.length),
           "hidden_dim": int(m.hidden_size), "cond_dim": int(m.cond_dim), "n_blocks": int(m.n_blocks),
           "n_heads": int(m.n_heads), "dropout": float(m.dropout),
           "time_conditioning": bool(model.config.get("time_conditioning", False)),
           "return_dict": False, "torch_dtype": "float32"}
    if int(model.mask_index) != int(model.vocab_size) - 1:
        out["mask_index"] = int(model.mask_index)      # not a published field: only where MASK is not last
    tok = model.config.get_path("data.tokenizer") if hasattr(model.config, "get_path") else None
    if tok and tok != "gpt2":
        out["tokenizer"] = tok                          # likewise (the published model is GPT-2)
    return out


def from_pretrained(path, device=None, use_ema: bool = True, overrides=(), **kw):
    """An ``MDLM`` (eval mode) from a Hugging Face snapshot folder in the ``kuleshov-group/mdlm-owt`` layout, or
    from this library's checkpoint (file, run folder, checkpoint folder). ``overrides``: key=value config
    overrides (e.g. ``["sampling.steps=256"]``); ``use_ema`` and ``kw`` (``preset_name``, ``data``,
    ``weights_only``) go to ``mdlm.checkpoint.load_model``. ``device``: where to put it (default: CPU)."""
    from .checkpoint import load_model
    model, _ = load_model(path, overrides=overrides, use_ema=use_ema, **kw)
    return model.to(device) if device is not None else model


def read_snapshot(path):
    """``(config, vocab_size, mask_index, state_dict)`` of a snapshot folder; the state dict keeps the
    published ``backbone.`` keys. Errors name the file and the keys."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    try:
        hf = json.loads(Path(cfg_path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    cfg, V, mask = config_from_hf(hf, cfg_path)
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        others = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".safetensors", ".ckpt", ".pt")))
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE}" + (f" (found {others})" if others else ""))
    st = _safetensors()
    try:
        sd = st.load_file(weights)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read {weights}: {type(e).__name__}: {e}") from e
    foreign = sorted(k for k in sd if not k.startswith(PREFIX))
    if foreign:
        raise CheckpointError(f"{weights}: keys without the published '{PREFIX}' prefix: {foreign[:10]}")
    return cfg, V, mask, sd


def save_pretrained(model, path) -> Path:
    """Write ``model`` (an ``MDLM`` with the DIT backbone; its current weights -- put EMA weights in first if you
    want those) to folder ``path`` in the published layout; returns the folder. Files are written to temporary
    names and renamed."""
    st = _safetensors()
    cfg = hf_config(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sd = {PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.backbone.state_dict().items()}

    def write(name: str, writer) -> None:
        tmp = out / f"{name}.tmp.{os.getpid()}"
        try:
            writer(tmp)
            os.replace(tmp, out / name)
        finally:
            if tmp.exists():
                tmp.unlink()

    write(WEIGHTS_FILE, lambda p: st.save_file(sd, str(p), metadata={"format": "pt"}))
    write(CONFIG_FILE, lambda p: p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n"))
    write("configuration_mdlm.py", lambda p: p.write_text(_CONFIGURATION_PY))
    write("modeling_mdlm.py", lambda p: p.write_text(_MODELING_PY))
    return out


# The remote code written next to the weights (this library's own, not the published files): transformers
# imports it with trust_remote_code=True. The model class is a thin wrapper around mdlm.nn.DIT, so the state
# dict keys are the published ones ("backbone.<name>").
_CONFIGURATION_PY = '''"""MDLM configuration for Hugging Face transformers, written by mdlm-kernels (mdlm.save_pretrained).

The fields of the published kuleshov-group/mdlm-owt config.json.
"""
import transformers


class MDLMConfig(transformers.PretrainedConfig):
    model_type = "mdlm"

    def __init__(self, vocab_size: int = 50258, model_length: int = 1024, hidden_dim: int = 768,
                 cond_dim: int = 128, n_blocks: int = 12, n_heads: int = 12, dropout: float = 0.1,
                 time_conditioning: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
'''

_MODELING_PY = '''"""MDLM for Hugging Face transformers, written by mdlm-kernels (mdlm.save_pretrained).

The backbone is mdlm.nn.DIT of the mdlm-kernels package (which must be installed): the published diffusion
transformer with the published parameter names, so this class's state dict has the keys "backbone.<name>" of the
published model.safetensors. forward(input_ids (B, L), timesteps (B,)) -> logits (B, L, vocab_size); with
time_conditioning false the backbone is fed zeros, as published.
"""
import torch
import transformers
from transformers import modeling_outputs

from mdlm.nn import DIT

from .configuration_mdlm import MDLMConfig


class MDLM(transformers.PreTrainedModel):
    config_class = MDLMConfig
    base_model_prefix = "mdlm"

    def __init__(self, config: MDLMConfig):
        super().__init__(config)
        tree = {"model": {"hidden_size": config.hidden_dim, "n_blocks": config.n_blocks,
                          "n_heads": config.n_heads, "cond_dim": config.cond_dim, "dropout": config.dropout,
                          "length": config.model_length}}
        self.backbone = DIT(tree, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        pass    # DIT initialises itself (zero-initialised adaLN and output layer, as published)

    def forward(self, input_ids=None, timesteps=None, output_hidden_states=None, return_dict=None):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if timesteps is None or not self.config.time_conditioning:
            timesteps = torch.zeros(input_ids.shape[0], device=input_ids.device)
        logits = self.backbone(input_ids, timesteps)
        if return_dict:
            return modeling_outputs.MaskedLMOutput(logits=logits, hidden_states=None, loss=None)
        return logits
'''
