"""The published MDLM DiT backbone (and the AR baseline backbone) in plain PyTorch.

This is the executable spec every fused kernel is checked against. Class names, constructor arguments
and ``state_dict`` keys equal those of the published code (``models/dit.py``), so a user of that code can
swap ``mdlm.nn.DIT`` in and keep their checkpoints (see ``mdlm.checkpoint``).

Shapes: B batch, L sequence length, V vocabulary, d hidden size, H heads, D = d / H head dim,
c cond_dim. Differences from the published code, none of which changes the math:

- attention uses ``torch.nn.functional.scaled_dot_product_attention`` (the published code calls
  flash-attn's varlen kernel with equal-length sequences, i.e. plain full attention);
- rotary is written out in PyTorch (published: flash-attn's ``apply_rotary_emb_qkv_``): q and k are
  rotated in fp32 with cos/sin first rounded to the activation dtype, as the published code does;
- bf16 autocast is applied only on CUDA tensors, as ``torch.cuda.amp.autocast`` does in the published
  code; on CPU the reference runs in the parameters' dtype (fp32).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import cfg_get, check_config, to_config
from .losses import SUBSLoss  # noqa: F401  (re-exported: the drop-in loss next to the modules)
from .losses import autocast_bf16 as _autocast

__all__ = ["LayerNorm", "Rotary", "TimestepEmbedder", "EmbeddingLayer", "DDiTBlock", "DDitFinalLayer",
           "DIT", "DDiTBlockCausal", "AR", "SUBSLoss", "modulate", "rotate_half", "apply_rotary_pos_emb",
           "bias_dropout_add_scale", "check_token_ids"]


def check_token_ids(x: torch.Tensor, vocab_size: int, name: str = "indices", ndim: int = 2) -> None:
    """Raise a clear error for a non-integer tensor, a wrong rank, or ids outside [0, vocab_size).

    The range check reads two numbers back to the host (one synchronisation).
    """
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape (B, L) (rank {ndim}), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains token id {bad}, outside [0, {vocab_size}) "
                         f"(min {lo}, max {hi}); vocab_size is {vocab_size}")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift; x (B, L, d), shift/scale (B, 1, d)."""
    return x * (1 + scale) + shift


def bias_dropout_add_scale(x, bias, scale, residual, prob: float, training: bool):
    """residual + scale * dropout(x + bias): the published gated residual."""
    if bias is not None:
        x = x + bias
    out = scale * F.dropout(x, p=prob, training=training)
    return out if residual is None else residual + out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary pairing: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q and k of a packed qkv (B, L, 3, H, D); v passes through.

    cos/sin are (1, L, 3, 1, D) from ``Rotary`` (identity on the v slot). Math in fp32, result in
    qkv's dtype, like flash-attn's rotary kernel used by the published code.
    """
    out = qkv.float() * cos.float() + rotate_half(qkv.float()) * sin.float()
    return out.to(qkv.dtype)


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in fp32 (autocast off); x (..., d) -> fp32 (..., d) times weight."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), [self.dim])
        return x * self.weight[None, None, :]


class Rotary(nn.Module):
    """Rotary tables, base 10000, non-interleaved halves: returns cos, sin of shape (1, L, 3, 1, D)."""

    def __init__(self, dim: int, base: float = 10_000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: it is in the published state_dict
        self._cache_key = None
        self.cos_cached = None
        self.sin_cached = None

    def forward(self, x: torch.Tensor, seq_dim: int = 1):
        seq_len = x.shape[seq_dim]
        key = (seq_len, x.device)
        if key != self._cache_key:
            self._cache_key = key
            t = torch.arange(seq_len, device=x.device).type_as(self.inv_freq)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
            sin = emb.sin()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
            cos[:, :, 2, :, :].fill_(1.0)  # identity on v
            sin[:, :, 2, :, :].fill_(0.0)
            self.cos_cached, self.sin_cached = cos, sin
        return self.cos_cached, self.sin_cached


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies (256) of sigma -> MLP -> (B, hidden_size).

    The frequencies f_k are a constant of the module: computed once, on the CPU at construction, with the
    published expression (so the same fp32 numbers as the published code, which recomputes them on the CPU and
    copies them to t's device on every forward), and kept as a NON-persistent buffer ``freqs`` (frequency
    size / 2,): it moves with ``module.to(device)`` but is not in the state_dict, whose keys stay the published
    ones. A forward therefore never copies host data to the device (a pageable host-to-device copy would
    synchronise the stream on every model call and is an error inside CUDA-graph capture).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size
        freqs = self.frequencies(frequency_embedding_size, device="cpu")   # the published numbers, computed once
        self.register_buffer("freqs", freqs.to(torch.get_default_device()), persistent=False)

    @staticmethod
    def frequencies(dim: int, max_period: float = 10000, device=None) -> torch.Tensor:
        """f_k = max_period^(-k / (dim/2)), k < dim // 2: (dim // 2,) fp32 on ``device`` (published expression)."""
        half = dim // 2
        return torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=device) / half)

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000,
                           freqs: torch.Tensor | None = None) -> torch.Tensor:
        """t (B,) -> (B, dim): [cos(t f_k), sin(t f_k)], f_k = max_period^(-k / (dim/2)) (a zero column
        appended when dim is odd). ``freqs`` (dim // 2,) fp32 on t's device: the precomputed f_k; by default
        they are computed on t's device (no host data involved)."""
        if freqs is None:
            freqs = TimestepEmbedder.frequencies(dim, max_period, device=t.device)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self.freqs
        if freqs.dtype != torch.float32 or freqs.device != t.device:
            # the module was cast (e.g. .half()) or t lives elsewhere: fp32 frequencies computed on t's device
            freqs = None
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size, freqs=freqs))


class EmbeddingLayer(nn.Module):
    """Token embedding as a bare (V, d) parameter named ``embedding`` (published key)."""

    def __init__(self, dim: int, vocab_dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_dim, dim)))
        torch.nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding[x]


def _attention(qkv: torch.Tensor, causal: bool) -> torch.Tensor:
    """qkv (B, L, 3, H, D) -> (B, L, H*D) with softmax(q k^T / sqrt(D)) v."""
    b, s = qkv.shape[0], qkv.shape[1]
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, s, -1)


class DDiTBlock(nn.Module):
    """adaLN transformer block: x (B, L, d), c (B, cond_dim) -> (B, L, d)."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim, bias=True))
        self.dropout2 = nn.Dropout(dropout)
        self.dropout = dropout
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        self.adaLN_modulation.weight.data.zero_()
        self.adaLN_modulation.bias.data.zero_()

    def forward(self, x, rotary_cos_sin, c, seqlens=None):
        b, s, d = x.shape
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
         gate_mlp) = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)  # each (B, 1, d)
        # attention branch
        x_skip = x
        x = modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = self.attn_qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads)
        cos, sin = rotary_cos_sin
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            qkv = apply_rotary_pos_emb(qkv, cos.to(qkv.dtype), sin.to(qkv.dtype))
        x = _attention(qkv, causal=False)
        x = bias_dropout_add_scale(self.attn_out(x), None, gate_msa, x_skip, self.dropout, self.training)
        # MLP branch
        x = bias_dropout_add_scale(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), None,
                                   gate_mlp, x, self.dropout, self.training)
        return x


class DDitFinalLayer(nn.Module):
    """Final adaLN (shift, scale) + zero-initialised Linear(d -> V): (B, L, d) -> logits (B, L, V)."""

    def __init__(self, hidden_size: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.linear.weight.data.zero_()
        self.linear.bias.data.zero_()
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)
        self.adaLN_modulation.weight.data.zero_()
        self.adaLN_modulation.bias.data.zero_()

    def hidden(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The modulated final hidden state (B, L, d), i.e. the LM head's input."""
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.hidden(x, c))


class DIT(nn.Module):
    """The published diffusion transformer: ``DIT(config, vocab_size)``.

    forward(indices (B, L) int, sigma (B,) or (B, 1) float) -> logits (B, L, V); bf16 on CUDA under the
    published autocast, the parameter dtype on CPU. ``config`` is a ``mdlm.config.Config``, a dict, an
    OmegaConf tree or any object with attribute access (e.g. ``types.SimpleNamespace``, as the published DIT
    takes) with ``config.model.{hidden_size, n_blocks, n_heads, cond_dim, dropout}`` (optional:
    ``scale_by_sigma``, ``use_kernels``); the sizes are checked (``mdlm.config.check_config``: ValueError
    naming the key).

    ``use_kernels`` (or ``config.model.use_kernels``): None (default) runs the fused block kernels of
    ``mdlm_kernels`` for CUDA inputs and the reference math on CPU; True / False force them on / off (on CPU
    the kernels dispatch to Triton under TRITON_INTERPRET=1, else to their PyTorch references). Same
    parameters and state_dict either way. With kernels, dropout masks come from a counter-based RNG, so
    they differ from ``torch.nn.Dropout``'s (same distribution); the dropout seed is a host integer, so
    CUDA-graph capture would freeze the mask (pass ``dropout_seed`` per step, or train without graphs).
    ``hidden_states`` returns the LM head's input in the autocast dtype (bf16) with kernels and in fp32 on
    the reference path; the logits agree after the LM head's autocast cast. On GPU, Triton may contract
    multiply-adds into FMAs: results can differ from the eager reference by about 1 fp32 ulp before rounding.
    """

    def __init__(self, config, vocab_size: int, use_kernels: bool | None = None):
        super().__init__()
        config = to_config(config)
        self.config = config
        self.vocab_size = vocab_size
        check_config(config)   # sizes: a ValueError naming the key (model.n_heads=0, d not divisible by H, ...)
        m = config.model
        # None: fused kernels for CUDA inputs, the reference math on CPU; True / False: always / never.
        self.use_kernels = cfg_get(m, "use_kernels", None) if use_kernels is None else use_kernels
        self.vocab_embed = EmbeddingLayer(m.hidden_size, vocab_size)
        self.sigma_map = TimestepEmbedder(m.cond_dim)
        self.rotary_emb = Rotary(m.hidden_size // m.n_heads)
        self.blocks = nn.ModuleList([
            DDiTBlock(m.hidden_size, m.n_heads, m.cond_dim, dropout=m.dropout) for _ in range(m.n_blocks)])
        self.output_layer = DDitFinalLayer(m.hidden_size, vocab_size, m.cond_dim)
        self.scale_by_sigma = cfg_get(m, "scale_by_sigma", True)
        self.validate_inputs = True  # one host sync per forward for the token-id range check
        self.bf16_autocast = True    # the published bf16 autocast of the blocks (CUDA only); False: fp32

    def _check(self, indices, sigma):
        if self.validate_inputs:
            check_token_ids(indices, self.vocab_size)
        if sigma is None or not torch.is_tensor(sigma):
            raise TypeError("sigma must be a tensor of shape (B,) or (B, 1)")
        if sigma.dim() == 2 and sigma.shape[1] == 1:
            sigma = sigma[:, 0]
        if sigma.dim() != 1 or sigma.shape[0] != indices.shape[0]:
            raise ValueError(f"sigma must have shape (B,) or (B, 1) with B = {indices.shape[0]}, "
                             f"got {tuple(sigma.shape)}")
        if sigma.device != indices.device or indices.device != self.vocab_embed.embedding.device:
            raise ValueError(f"device mismatch: indices on {indices.device}, sigma on {sigma.device}, "
                             f"model on {self.vocab_embed.embedding.device}")
        return sigma

    def kernels_enabled(self, x: torch.Tensor) -> bool:
        return bool(self.use_kernels) if self.use_kernels is not None else x.is_cuda

    def hidden_states(self, indices: torch.Tensor, sigma: torch.Tensor, dropout_seed: int | None = None):
        """(final modulated hidden (B, L, d), c (B, cond_dim)): everything except the LM head.

        With kernels (see ``use_kernels``) the blocks run the fused path of ``_blocks_fused``; dropout then
        uses a counter-based RNG keyed by ``dropout_seed`` (default: drawn from torch's CPU generator).
        """
        sigma = self._check(indices, sigma)
        x = self.vocab_embed(indices)
        c = F.silu(self.sigma_map(sigma))
        if self.kernels_enabled(x):
            with _autocast(x, self.bf16_autocast):
                return self._blocks_fused(x, c, dropout_seed), c
        rotary_cos_sin = self.rotary_emb(x)
        with _autocast(x, self.bf16_autocast):
            for block in self.blocks:
                x = block(x, rotary_cos_sin, c, seqlens=None)
            h = self.output_layer.hidden(x, c)
        return h, c

    def _blocks_fused(self, x: torch.Tensor, c: torch.Tensor, dropout_seed: int | None) -> torch.Tensor:
        """The blocks and the final norm with the fused kernels of mdlm_kernels (same math as the blocks):

        LN+modulate of block 0; per block: qkv GEMM -> rotary written in the attention layout (q, k, v in fresh
        buffers: qkv is freed right away) -> SDPA -> out GEMM -> [gated residual + dropout + norm2 + modulate]
        -> MLP (GEMM -> bias+GELU -> GEMM, keeping only its input and the first GEMM's output for the backward,
        which recomputes the GELU output) -> [gated residual + dropout + the NEXT block's norm1 + modulate (the
        final layer's norm after the last block)]. The residual stream stays fp32 as in the published code.
        Dropout site (block i, branch j) uses Philox offset 2 i + j of one seed per forward.
        """
        import mdlm_kernels as mk
        from mdlm_kernels.ops.attention import attention
        from mdlm_kernels.ops.mlp import gelu_mlp
        B, L, d = x.shape
        H = self.blocks[0].n_heads
        p = float(self.blocks[0].dropout)
        train = self.training and p > 0
        if train and dropout_seed is None:
            from mdlm_kernels.step_budget import host_side
            with host_side():   # torch's CPU generator: no device read
                dropout_seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
        cos, sin = mk.rotary_tables(self.rotary_emb.inv_freq, L, device=x.device)
        mods = [blk.adaLN_modulation(c) for blk in self.blocks]            # (B, 6d) each
        final_mod = self.output_layer.adaLN_modulation(c)                  # (B, 2d)
        y = mk.adaln_modulate(x, self.blocks[0].norm1.weight, mods[0], 0, 1)
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            q, k, v = mk.rotary_qkv(blk.attn_qkv(y).view(B, L, 3, H, d // H), cos, sin)
            a = attention(q, k, v).transpose(1, 2).reshape(B, L, d)
            r, y = mk.gated_residual_modulate(x, blk.attn_out(a), mods[i], 2, blk.norm2.weight, 3, 4, p=p,
                                              seed=dropout_seed, offset=2 * i, training=train)
            m = gelu_mlp(y, blk.mlp[0].weight, blk.mlp[0].bias, blk.mlp[2].weight, blk.mlp[2].bias)
            last = i == n - 1
            w_next = self.output_layer.norm_final.weight if last else self.blocks[i + 1].norm1.weight
            x, y = mk.gated_residual_modulate(r, m, mods[i], 5, w_next, 0, 1, p=p, seed=dropout_seed,
                                              offset=2 * i + 1, training=train,
                                              mod_next=final_mod if last else mods[i + 1])
        return y

    def forward(self, indices: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        h, _ = self.hidden_states(indices, sigma)
        with _autocast(h, self.bf16_autocast):
            return self.output_layer.linear(h)


class DDiTBlockCausal(nn.Module):
    """Block of the AR baseline: no adaLN, causal attention, unit gates."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim, bias=True))
        self.dropout2 = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x, rotary_cos_sin, **kwargs):
        b, s, d = x.shape
        x_skip = x
        qkv = self.attn_qkv(self.norm1(x)).view(b, s, 3, self.n_heads, d // self.n_heads)
        cos, sin = rotary_cos_sin
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            qkv = apply_rotary_pos_emb(qkv, cos.to(qkv.dtype), sin.to(qkv.dtype))
        x = _attention(qkv, causal=True)
        x = bias_dropout_add_scale(self.attn_out(x), None, 1.0, x_skip, self.dropout, self.training)
        return bias_dropout_add_scale(self.mlp(self.norm2(x)), None, 1.0, x, self.dropout, self.training)


class _FinalLayerNoCond(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.linear.weight.data.zero_()
        self.linear.bias.data.zero_()

    def forward(self, x):
        return self.linear(self.norm_final(x))


class AR(nn.Module):
    """The autoregressive baseline backbone: forward(indices (B, L)) -> log-probs (B, L, V) of the next
    token, with the MASK id given probability zero (published: its logit is set to -1e6)."""

    neg_infinity = -1000000.0

    def __init__(self, config, vocab_size: int, mask_index: int):
        super().__init__()
        config = to_config(config)
        self.config = config
        self.vocab_size = vocab_size
        self.mask_index = mask_index
        check_config(config)
        m = config.model
        self.vocab_embed = EmbeddingLayer(m.hidden_size, vocab_size)
        self.rotary_emb = Rotary(m.hidden_size // m.n_heads)
        self.blocks = nn.ModuleList([
            DDiTBlockCausal(m.hidden_size, m.n_heads, dropout=m.dropout) for _ in range(m.n_blocks)])
        self.output_layer = _FinalLayerNoCond(m.hidden_size, vocab_size)
        self.validate_inputs = True

    def hidden_states(self, indices: torch.Tensor) -> torch.Tensor:
        """The LM head's input (B, L, d): everything except ``output_layer.linear``."""
        if self.validate_inputs:
            check_token_ids(indices, self.vocab_size)
        x = self.vocab_embed(indices)
        rotary_cos_sin = self.rotary_emb(x)
        with _autocast(x):
            for block in self.blocks:
                x = block(x, rotary_cos_sin)
            return self.output_layer.norm_final(x)

    def forward(self, indices: torch.Tensor, sigma=None) -> torch.Tensor:
        h = self.hidden_states(indices)
        with _autocast(h):
            logits = self.output_layer.linear(h)
        logits = logits.float()
        logits[:, :, self.mask_index] = self.neg_infinity
        return logits.log_softmax(-1)
