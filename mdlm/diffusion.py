"""Masked diffusion in plain PyTorch: forward masking, parameterizations and losses (the spec).

Follows the published ``diffusion.py`` op for op. ``MDLM`` wraps a backbone (``mdlm.nn.DIT`` or ``AR``),
a noise schedule and the config; ``MDLM.loss(x0)`` is the training/validation objective.

Shapes: x0, xt (B, L) int64; t, sigma, dsigma (B,); logits / log-probs (B, L, V); per-token losses (B, L).

One deliberate difference: the published code runs the parameterization (logsumexp etc.) in the
logits' dtype, which is bf16 under its autocast; here logits are upcast to fp32 first, which is what the
fused kernels compute (log-sum-exp in fp32). On CPU both are fp32 anyway.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import contextlib

from .config import cfg_get, to_config
from .losses import Loss, SUBSLoss, subs_loss_from_hidden, subs_nelbo_masked_rows
from .nn import AR, DIT
from .schedules import get_noise
from .step_budget import host_side

__all__ = ["MDLM", "Loss", "sample_t", "q_xt", "subs_parameterization", "d3pm_parameterization",
           "sedd_parameterization", "score_entropy", "subs_nelbo_masked_rows", "d3pm_loss", "NEG_INFINITY", "PARAMETERIZATIONS",
           "LOSS_IMPLS", "subs_loss_from_hidden", "SUBSLoss"]

NEG_INFINITY = -1000000.0  # the published "minus infinity" for logits
PARAMETERIZATIONS = ("subs", "d3pm", "sedd", "ar")
LOSS_IMPLS = ("reference", "masked", "fused")


def _fp32_outside_blocks(x: torch.Tensor):
    """The published ``Diffusion.forward`` wraps the backbone in ``torch.cuda.amp.autocast(dtype=float32)``:
    an outer bf16 autocast does not reach the embedding and sigma_map (the blocks re-enable bf16 inside)."""
    return torch.autocast("cuda", enabled=False) if x.is_cuda else contextlib.nullcontext()


def sample_t(n: int, device, sampling_eps: float = 1e-3, antithetic: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Diffusion times t (n,) in [sampling_eps, 1].

    Antithetic (low-discrepancy) as published: u_i = (r_i / n + i / n) mod 1 with r_i ~ U[0, 1), so the
    batch covers [0, 1) evenly; t = (1 - sampling_eps) u + sampling_eps.
    """
    u = torch.rand(n, device=device, generator=generator)
    if antithetic:
        offset = torch.arange(n, device=device) / n
        u = (u / n + offset) % 1
    return (1 - sampling_eps) * u + sampling_eps


def q_xt(x0: torch.Tensor, move_chance: torch.Tensor, mask_index: int,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Forward masking q(x_t | x_0): each token becomes MASK independently with prob move_chance (B, 1)."""
    move_indices = torch.rand(*x0.shape, device=x0.device, generator=generator) < move_chance
    return torch.where(move_indices, mask_index, x0)


def subs_parameterization(logits: torch.Tensor, xt: torch.Tensor, mask_index: int) -> torch.Tensor:
    """SUBS: log p_theta(x0 | xt) (B, L, V) in fp32.

    Zero masking probability (MASK logit - 1e6, then log-softmax) and carry-over unmasking (an unmasked
    position puts all mass on its own token: log-prob 0 there, -1e6 elsewhere).
    """
    logits = logits.float().clone()
    logits[:, :, mask_index] += NEG_INFINITY
    logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    # carry-over without boolean indexing (a data-dependent gather would read the device every call)
    unmasked = (xt != mask_index)[..., None]
    own = xt[..., None]
    carried = torch.where(unmasked, 0.0, logits.gather(-1, own))      # 0 at the own token of unmasked rows
    return logits.masked_fill(unmasked, NEG_INFINITY).scatter(-1, own, carried)


def d3pm_parameterization(logits: torch.Tensor, mask_index: int, subs_masking: bool = False) -> torch.Tensor:
    logits = logits.float().clone()
    if subs_masking:
        logits[:, :, mask_index] += NEG_INFINITY
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def sedd_parameterization(logits: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SEDD log-score: logits - log(e^sigma - 1) - log(V - 1), with 0 at the input token."""
    logits = logits.float()
    esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log().to(logits.dtype)
    log_v1 = float(torch.log(torch.tensor(logits.shape[-1] - 1.0)))   # the published fp32 constant, on the host
    logits = logits - esigm1_log[:, None, None] - log_v1
    return torch.scatter(logits, -1, xt[..., None], torch.zeros_like(logits[..., :1]))


def score_entropy(log_score: torch.Tensor, sigma: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor,
                  mask_index: int) -> torch.Tensor:
    """SEDD score entropy per token (B, L); sigma (B, 1). Zero at unmasked positions."""
    masked = xt == mask_index
    expsig_minus_1 = torch.expm1(sigma).expand_as(xt)
    q_ratio = 1 / expsig_minus_1[masked]
    words_that_were_masked = x0[masked]
    masked_log_score = log_score[masked]
    neg_term = q_ratio * torch.gather(masked_log_score, -1, words_that_were_masked[..., None]).squeeze(-1)
    score = masked_log_score.exp()
    vocab_size = log_score.shape[-1]
    if mask_index == vocab_size - 1:
        pos_term = score[:, :-1].sum(dim=-1)
    else:
        pos_term = score[:, :mask_index].sum(dim=-1) + score[:, mask_index + 1:].sum(dim=-1)
    const = q_ratio * (q_ratio.log() - 1)
    entropy = torch.zeros(*xt.shape, device=xt.device, dtype=score.dtype)
    entropy[masked] += pos_term - neg_term + const
    return entropy


def d3pm_loss(model_output: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
              T: int, mask_index: int) -> torch.Tensor:
    """Discrete-time (T steps) NELBO term per token (B, L), published form; t (B,) in {1/T, ..., 1}."""
    dt = 1 / T
    t = t[:, None].clamp(0.0, 1.0 - 1e-4)
    alpha_t = 1 - t + torch.zeros_like(xt)
    alpha_s = 1 - (t - dt) + torch.zeros_like(xt)
    log_x_theta_at_x0 = torch.gather(model_output, -1, x0[:, :, None]).squeeze(-1)
    x_theta_at_m = model_output[:, :, mask_index].exp()
    term_1_coef = dt / t
    term_1_log_nr = torch.log(alpha_t * x_theta_at_m / t + 1)
    term_1_log_dr = log_x_theta_at_x0
    term_2_coef = 1 - dt / t
    term_2_log_nr = term_1_log_nr
    # At the first step (s = t - dt = 0) the published code evaluates 0 * log(0/0 + 1) = NaN whenever the
    # model gives MASK zero probability (always, under SUBS). The coefficient 1 - dt/t is exactly 0 there
    # and the term's limit is 0, so it is dropped for those rows; the denominator is made safe first so
    # that no NaN reaches the gradient through the discarded branch either.
    first = (t - dt) <= 0
    term_2_log_dr = torch.log(alpha_s * x_theta_at_m / torch.where(first, 1.0, t - dt) + 1)
    term_2 = torch.where(first, 0.0, term_2_coef * (term_2_log_nr - term_2_log_dr))
    l_vb_masked = term_1_coef * (term_1_log_nr - term_1_log_dr) + term_2
    return T * l_vb_masked * (xt == mask_index)


class MDLM(nn.Module):
    """Masked diffusion LM (the published ``Diffusion`` module without Lightning).

    Args:
        config: ``mdlm.config.Config`` / dict / OmegaConf tree (see ``mdlm.config.preset``).
        vocab_size: V including the MASK token (50258 for GPT-2 + MASK).
        mask_index: id of MASK (default V - 1, as published when the tokenizer has no mask token).
        backbone: optional pre-built backbone; default ``DIT(config, V)`` (``AR`` for parameterization 'ar').
    """

    neg_infinity = NEG_INFINITY

    def __init__(self, config, vocab_size: int, mask_index: int | None = None, backbone: nn.Module | None = None):
        super().__init__()
        config = to_config(config)
        self.config = config
        self.vocab_size = vocab_size
        self.mask_index = vocab_size - 1 if mask_index is None else mask_index
        if not 0 <= self.mask_index < vocab_size:
            raise ValueError(f"mask_index {self.mask_index} outside [0, {vocab_size})")
        self.parameterization = config.parameterization
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {self.parameterization!r}; one of {PARAMETERIZATIONS}")
        self.T = int(cfg_get(config, "T", 0))
        self.time_conditioning = bool(config.time_conditioning)
        self.subs_masking = bool(cfg_get(config, "subs_masking", False))
        tr = config.training
        self.antithetic_sampling = bool(tr.antithetic_sampling)
        self.importance_sampling = bool(tr.importance_sampling)
        self.change_of_variables = bool(tr.change_of_variables)
        self.sampling_eps = float(tr.sampling_eps)
        self._validate_configuration()
        self.validate_inputs = True  # token-id range checks (one host sync each); the trainer may turn them off
        self.noise = get_noise(config)
        if backbone is None:
            backbone = (AR(config, vocab_size, self.mask_index) if self.parameterization == "ar"
                        else DIT(config, vocab_size))
        self.backbone = backbone

    def _validate_configuration(self):
        """The published ``_validate_configuration`` checks, as ValueErrors."""
        if self.change_of_variables and self.importance_sampling:
            raise ValueError("change_of_variables and importance_sampling cannot both be on")
        if self.parameterization == "sedd" and (self.importance_sampling or self.change_of_variables):
            raise ValueError("parameterization 'sedd' supports neither importance sampling nor change of variables")
        if self.parameterization == "d3pm" and self.T == 0:
            raise ValueError("parameterization 'd3pm' needs discrete time: set T > 0")
        if self.T > 0 and self.parameterization not in ("d3pm", "subs"):
            raise ValueError(f"discrete time (T > 0) supports 'd3pm' and 'subs', not {self.parameterization!r}")
        if self.subs_masking and self.parameterization != "d3pm":
            raise ValueError("subs_masking applies to parameterization 'd3pm' only")

    # ----------------------------------------------------------------------------------------- model
    def _process_sigma(self, sigma: torch.Tensor | None) -> torch.Tensor | None:
        if sigma is None:
            return None
        if sigma.ndim > 1:
            sigma = sigma.squeeze(-1)
        if not self.time_conditioning:
            sigma = torch.zeros_like(sigma)
        return sigma

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x (B, L), sigma (B,) or (B, 1) -> the parameterization's log-probs / log-scores (B, L, V), fp32."""
        sigma = self._process_sigma(sigma)
        with _fp32_outside_blocks(x):
            logits = self.backbone(x, sigma)
        if self.parameterization == "subs":
            return subs_parameterization(logits, x, self.mask_index)
        if self.parameterization == "sedd":
            return sedd_parameterization(logits, x, sigma)
        if self.parameterization == "d3pm":
            return d3pm_parameterization(logits, self.mask_index, self.subs_masking)
        return logits.float()

    # -------------------------------------------------------------------------------------- training
    def sample_t(self, n: int, device, generator=None) -> torch.Tensor:
        t = sample_t(n, device, self.sampling_eps, self.antithetic_sampling, generator)
        if self.importance_sampling:
            return self.noise.importance_sampling_transformation(t)
        return t

    def q_xt(self, x0, move_chance, generator=None):
        return q_xt(x0, move_chance, self.mask_index, generator)

    def reconstruction_loss(self, x0: torch.Tensor) -> torch.Tensor:
        """-log p_theta(x0 | x0) at t = 0 (the D3PM reconstruction term), (B, L)."""
        t0 = torch.zeros(x0.shape[0], device=x0.device)
        out = self.forward(x0, self.noise(t0)[0][:, None])
        return -torch.gather(out, -1, x0[:, :, None]).squeeze(-1)

    def forward_pass_diffusion(self, x0: torch.Tensor, generator=None) -> torch.Tensor:
        """Per-token NELBO (B, L) for one draw of t and x_t."""
        t = self.sample_t(x0.shape[0], x0.device, generator)
        if self.T > 0:
            t = (t * self.T).to(torch.int) / self.T + 1 / self.T  # t in {1/T, ..., 1}
        if self.change_of_variables:
            unet_conditioning = t[:, None]
            f_T = torch.log1p(-torch.exp(-self.noise.sigma_max))
            f_0 = torch.log1p(-torch.exp(-self.noise.sigma_min))
            move_chance = torch.exp(f_0 + t * (f_T - f_0))[:, None]
        else:
            sigma, dsigma = self.noise(t)
            unet_conditioning = sigma[:, None]
            move_chance = 1 - torch.exp(-sigma[:, None])
        xt = self.q_xt(x0, move_chance, generator)
        model_output = self.forward(xt, unet_conditioning)

        if self.parameterization == "sedd":
            return dsigma[:, None] * score_entropy(model_output, sigma[:, None], xt, x0, self.mask_index)
        if self.T > 0:
            diffusion_loss = d3pm_loss(model_output, xt, x0, t, self.T, self.mask_index)
            if self.parameterization == "d3pm":
                return self.reconstruction_loss(x0) + diffusion_loss
            return diffusion_loss
        # SUBS, continuous time: weight dsigma / expm1(sigma) (= 1/t for loglinear).
        log_p_theta = torch.gather(model_output, -1, x0[:, :, None]).squeeze(-1)
        if self.change_of_variables or self.importance_sampling:
            return log_p_theta * torch.log1p(-torch.exp(-self.noise.sigma_min))
        return -log_p_theta * (dsigma / torch.expm1(sigma))[:, None]

    # ------------------------------------------------- continuous-time SUBS: three implementations
    def supports_masked_rows(self) -> bool:
        """Whether the loss can be computed on masked rows only (continuous-time SUBS, DIT backbone)."""
        return (self.parameterization == "subs" and self.T == 0 and not self.importance_sampling
                and not self.change_of_variables and hasattr(self.backbone, "hidden_states"))

    @staticmethod
    def _kernel_seed(generator: torch.Generator | None) -> int:
        """A masking-kernel seed from ``generator`` (default: torch's global CPU generator; reading a CUDA
        generator's draw is a host synchronisation)."""
        if generator is None or generator.device.type == "cpu":
            with host_side():
                return int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
        return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device).item())

    def draw_fused(self, x0: torch.Tensor, generator: torch.Generator | None = None, seed: int | None = None):
        """t, sigma, NELBO weight and x_t from the fused masking kernel (Philox, no host sync).

        The kernel's seed is ``seed`` if given (what ``torch.compile(fullgraph=True)`` of a whole step needs),
        else drawn from ``generator`` (default: torch's global CPU generator, so ``torch.manual_seed`` makes
        the step reproducible; a CUDA generator costs a host sync here, prefer a CPU one).
        Returns (t, sigma, weight, xt).
        """
        import mdlm_kernels as mk
        if seed is None:
            seed = self._kernel_seed(generator)
        nz = self.config.noise
        out = mk.forward_mask(
            x0, seed, 0, mask_index=self.mask_index, schedule=self.noise.name,
            noise_eps=float(cfg_get(nz, "eps", 1e-3)), sigma_min=cfg_get(nz, "sigma_min"),
            sigma_max=cfg_get(nz, "sigma_max"),
            sampling_eps=self.sampling_eps, antithetic=self.antithetic_sampling)
        return out.t, out.sigma, out.weight, out.xt

    def masked_rows_bound(self, B: int, L: int, seed: int | None, tail: float = 1e-9) -> int:
        """Host-side bound on the positions ``draw_fused(x0 (B, L), seed=seed)`` masks, exceeded with probability
        <= ``tail`` (``mdlm_kernels.masked_rows_bound``: B Philox row draws on the host, no device read; ``seed``
        None: a bound for every seed, a constant under torch.compile)."""
        import mdlm_kernels as mk
        nz = self.config.noise
        return mk.masked_rows_bound(B, L, seed, 0, schedule=self.noise.name,
                                    noise_eps=float(cfg_get(nz, "eps", 1e-3)), sigma_min=cfg_get(nz, "sigma_min"),
                                    sigma_max=cfg_get(nz, "sigma_max"),
                                    sampling_eps=self.sampling_eps, antithetic=self.antithetic_sampling, tail=tail)

    def subs_loss_given(self, x0: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor, weight: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, impl: str = "reference",
                        row_bound: int | None = None) -> Loss:
        """Continuous-time SUBS NELBO for given draws: x0, xt (B, L); sigma, weight (B,) (weight =
        dsigma/expm1(sigma)). ``impl``:

        - "reference": the published path: (B, L, V) logits, SUBS parameterization, gather;
        - "masked": LM head + cross-entropy on masked rows only, MASK column dropped (plain PyTorch);
        - "fused": the same rows through ``mdlm_kernels.subs_linear_cross_entropy`` (no (N, V) logits).

        All three give the same loss and gradients (see ``subs_loss_from_hidden``). ``row_bound`` ("masked",
        "fused"): size the masked-row gather statically (no host read; see ``subs_loss_from_hidden``).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(x0, dtype=torch.float32)
        if impl == "reference":
            out = self.forward(xt, sigma[:, None])
            log_p = torch.gather(out, -1, x0[:, :, None]).squeeze(-1)
            nlls = -log_p * weight[:, None] * attention_mask
            return Loss(loss=nlls.sum() / attention_mask.sum(), nlls=nlls, token_mask=attention_mask)
        if not self.supports_masked_rows():
            raise ValueError(f"impl={impl!r} needs continuous-time SUBS without importance sampling or change of "
                             "variables, and a DIT backbone")
        with _fp32_outside_blocks(xt):
            hidden, _ = self.backbone.hidden_states(xt, self._process_sigma(sigma[:, None]))
        lin = self.backbone.output_layer.linear
        return subs_loss_from_hidden(hidden, lin.weight, lin.bias, x0, xt, weight, self.mask_index,
                                     attention_mask, impl, row_bound=row_bound)

    def _ar_loss(self, x0: torch.Tensor, attention_mask: torch.Tensor, impl: str) -> Loss:
        """Next-token NLL: inputs x0[:, :-1], targets x0[:, 1:], MASK excluded from the softmax (published)."""
        inputs, targets, mask = x0[:, :-1], x0[:, 1:], attention_mask[:, 1:]
        if impl == "reference":
            logprobs = self.backbone(inputs, None)
            nlls = -logprobs.gather(-1, targets[:, :, None])[:, :, 0] * mask
            return Loss(loss=nlls.sum() / mask.sum(), nlls=nlls, token_mask=mask)
        hidden = self.backbone.hidden_states(inputs)
        lin = self.backbone.output_layer.linear
        # every position is a row with weight = its attention mask: plain cross-entropy, one code path
        return subs_loss_from_hidden(hidden, lin.weight, lin.bias, targets, targets, torch.ones_like(mask[:, 0]),
                                     self.mask_index, mask, impl)

    def default_loss_impl(self) -> str:
        impl = cfg_get(self.config, "loss_impl", "auto")
        if impl in (None, "auto"):
            ar_fusable = self.parameterization == "ar" and hasattr(self.backbone, "hidden_states")
            return "fused" if (self.supports_masked_rows() or ar_fusable) else "reference"
        return impl

    def loss(self, x0: torch.Tensor, attention_mask: torch.Tensor | None = None, generator=None,
             impl: str | None = None, seed: int | None = None) -> Loss:
        """Token-averaged NELBO (diffusion) or NLL (AR) of a batch x0 (B, L); attention_mask (B, L) 0 = pad.

        ``impl`` (default: ``config.loss_impl``, "auto" = "fused" for continuous-time SUBS, else
        "reference"): "reference" draws t and x_t with torch's RNG and runs the published path; "masked"
        uses the same torch draws with the LM head on masked rows only; "fused" draws with the fused masking
        kernel (Philox) and computes the loss with the fused linear-cross-entropy. See ``subs_loss_given``.
        ``seed`` fixes the fused masking kernel's seed (else it is drawn from ``generator``).

        The fused path reads nothing back from the device: the masked rows are gathered into a statically sized
        buffer whose size the host bounds from the kernel's t (``masked_rows_bound``; exceeded with probability
        <= 1e-9, in which case the loss is NaN, see ``subs_loss_from_hidden``).
        ``torch.compile(fullgraph=True)`` traces the fused step when ``seed`` is passed and the input checks are
        off (``validate_inputs = False`` on the model and its backbone); no dynamic shapes are involved.
        """
        attention_mask = self._check_batch(x0, attention_mask)
        x0 = x0.long()
        # A clean token equal to MASK has no defined NELBO (SUBS gives MASK zero probability): with the checks off
        # (validate_inputs = False) the loss, its gradients and nlls are NaN, never a finite wrong number (the
        # published path would give ~1e6 per such token). Device-side: no host read.
        poison = torch.where(((x0 == self.mask_index) & (attention_mask != 0)).any(), float("nan"), 1.0)
        out = self._loss(x0, attention_mask, generator, impl, seed)
        return Loss(loss=out.loss * poison, nlls=out.nlls * poison, token_mask=out.token_mask)

    def _check_batch(self, x0: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Clear errors for a batch the loss cannot score; returns the attention mask (ones by default).

        Always (metadata only): x0 an integer (B, L) tensor with B, L > 0 (L >= 2 for the AR baseline),
        attention_mask a tensor of x0's shape on its device. With ``validate_inputs`` (one host read): token ids in
        [0, vocab_size), no MASK id at a counted (non-pad) position, and in training mode at least one counted
        token."""
        if not torch.is_tensor(x0):
            raise TypeError(f"x0 must be a torch.Tensor of token ids, got {type(x0).__name__}")
        if x0.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"x0 must be an integer tensor of token ids, got dtype {x0.dtype}")
        if x0.dim() != 2:
            raise ValueError(f"x0 must have shape (B, L) (rank 2), got shape {tuple(x0.shape)}")
        if x0.numel() == 0:
            raise ValueError(f"x0 is empty (shape {tuple(x0.shape)}): the loss of an empty batch is undefined "
                             "(0 / 0 tokens); skip empty batches")
        if self.parameterization == "ar" and x0.shape[1] < 2:
            raise ValueError(f"x0 must have L >= 2 for the AR baseline (next-token targets), got shape "
                             f"{tuple(x0.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(x0, dtype=torch.float32)
        elif not torch.is_tensor(attention_mask):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        elif attention_mask.shape != x0.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != x0 shape {tuple(x0.shape)}")
        elif attention_mask.device != x0.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but x0 is on {x0.device}")
        if self.validate_inputs:
            counted = attention_mask != 0
            lo, hi, has_mask, n = torch.stack([x0.min().long(), x0.max().long(),
                                               ((x0 == self.mask_index) & counted).any().long(),
                                               counted.sum().long()]).tolist()      # the one host read
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"x0 contains token id {bad}, outside [0, {self.vocab_size}) (min {lo}, max {hi}); "
                                 f"vocab_size is {self.vocab_size}")
            if has_mask:
                raise ValueError(f"x0 contains the MASK id {self.mask_index} at a counted position: clean data must "
                                 "not hold MASK (its NELBO is undefined: SUBS gives MASK zero probability)")
            if n == 0 and self.training:
                # training on a batch without a token is a data bug (the step's loss is 0 / 0); evaluation may pass
                # a padding-only batch (it sums nlls, all zero here, and counts tokens): loss NaN, nlls 0
                raise ValueError("attention_mask is all zero: no token to score (the token-averaged loss would be "
                                 "0 / 0); in eval mode such a batch gives loss NaN and nlls 0")
        return attention_mask

    def _loss(self, x0, attention_mask, generator, impl, seed) -> Loss:
        impl = impl or self.default_loss_impl()
        if impl not in LOSS_IMPLS:
            raise ValueError(f"unknown loss implementation {impl!r}; one of {LOSS_IMPLS}")
        if self.parameterization == "ar":
            return self._ar_loss(x0, attention_mask, impl)
        if impl != "reference":
            if not self.supports_masked_rows():
                raise ValueError(f"impl={impl!r} needs continuous-time SUBS without importance sampling or "
                                 "change of variables, and a DIT backbone")
            if impl == "fused":
                if seed is None:
                    seed = self._kernel_seed(generator)
                _, sigma, weight, xt = self.draw_fused(x0, seed=seed)
                # the masked count is bounded from t, which the host draws too: no host read in the step (traced
                # by torch.compile: the bound for every seed, a constant of the shapes)
                bound = self.masked_rows_bound(x0.shape[0], x0.shape[1],
                                               None if torch.compiler.is_compiling() else seed)
                return self.subs_loss_given(x0, xt, sigma, weight, attention_mask, impl, row_bound=bound)
            else:
                t = self.sample_t(x0.shape[0], x0.device, generator)
                sigma, dsigma = self.noise(t)
                xt = self.q_xt(x0, 1 - torch.exp(-sigma[:, None]), generator)
                weight = dsigma / torch.expm1(sigma)
            return self.subs_loss_given(x0, xt, sigma, weight, attention_mask, impl)
        loss = self.forward_pass_diffusion(x0, generator)
        nlls = loss * attention_mask
        count = attention_mask.sum()
        return Loss(loss=nlls.sum() / count, nlls=nlls, token_mask=attention_mask)
