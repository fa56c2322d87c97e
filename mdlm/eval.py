"""Evaluation: validation NELBO / perplexity / bits per token, sample entropy and generative perplexity.

- ``nelbo(model, data, method="mc" | "quadrature")``: the per-token NELBO of a set of token blocks, with
  PPL = exp(NELBO), BPD = NELBO / ln 2 and a standard error. "mc" is the published validation estimator;
  "quadrature" estimates the same expectation with lower variance (continuous-time SUBS only).
- ``unigram_entropy(tokens)``: entropy (nats) of each sample's empirical unigram distribution, averaged
  over samples (the sample-diversity figure reported next to generative perplexity).
- ``generative_perplexity(texts, evaluator)``: perplexity of generated texts under a causal LM (GPT-2
  large by default, via ``transformers``), following the published retokenize + chunk computation.
- ``evaluate(model, data, ...)`` runs all of the above and returns one dict; ``main(argv)`` is the
  ``mdlm eval`` command line around it.

Shapes: x0 (N, L) int64 token blocks, attention_mask (N, L) float (1 = real token, 0 = pad); per-sequence
sums (N,) float64.

What the published code reports (read for behaviour, kuleshov-group/mdlm ``diffusion.py``: ``_compute_loss``
feeding torchmetrics ``MeanMetric``-based ``NLL`` / ``BPD`` / ``Perplexity`` with ``update(nlls,
token_mask)``, and ``compute_generative_perplexity`` / ``eval_retokenize``; sample entropy from the
follow-up code of the same first author, s-sahoo/duo ``metrics.py`` ``record_entropy`` called on the
generated token ids in ``trainer_base.py``):

- val NLL = sum over all batches of the per-token NELBO (pad positions zero) / the number of non-pad
  tokens; PPL = exp of that, BPD = that / ln 2. One draw of (t, x_t) per sequence per validation pass.
- gen PPL: texts retokenized by the evaluator's tokenizer (pad = EOS, ``padding=True``, ``truncation=True,
  max_length=model.length``), split along the sequence into chunks of the evaluator's context (1024 for
  GPT-2, 4096 for llama2), each chunk scored independently (its first token is never a target);
  targets counted: every non-EOS token plus the first EOS of the chunk; gen PPL = exp(sum NLL / count)
  over all chunks of all samples (token-weighted, not a mean of per-sample perplexities).
- entropy: per generated sample (the diffusion model's own token ids, nothing ignored), the entropy in
  nats of its empirical token distribution, then the mean over samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["EvalResult", "nelbo", "unigram_entropy", "generative_perplexity", "load_evaluator", "evaluate",
           "gauss_legendre", "main", "METHODS"]

METHODS = ("mc", "quadrature")
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class EvalResult:
    """Per-token NELBO of an evaluation set.

    nelbo: nats per (non-pad) token, sum of per-sequence NELBO estimates / number of tokens.
    ppl: exp(nelbo). bpd: nelbo / ln 2 (bits per token).
    stderr: standard error of ``nelbo``, from the spread of the per-sequence estimates s_i (nats summed
        over the sequence) with token counts n_i, treating sequences as independent: the ratio (delta
        method) estimator SE = sqrt(N/(N-1) * sum_i (s_i - nelbo n_i)^2) / sum_i n_i over the N sequences
        with n_i > 0, which is the usual std/sqrt(N) of s_i/n_i when all n_i are equal. It includes the
        estimator's noise (t and mask draws) and the sequence-to-sequence variation of the data; for "mc",
        the antithetic t within a batch makes rows slightly negatively correlated, so it is conservative.
        NaN for fewer than two sequences.
    ppl_interval: (exp(nelbo - 2 stderr), exp(nelbo + 2 stderr)).
    tokens: number of non-pad tokens (sum of the attention mask). sequences: sequences with tokens.
    method: "mc" or "quadrature"; num_t, draws, seed, impl: the settings used (num_t None for "mc").
    """

    nelbo: float
    ppl: float
    bpd: float
    stderr: float
    ppl_interval: tuple[float, float]
    tokens: float
    sequences: int
    method: str
    num_t: int | None = None
    draws: int = 1
    seed: int = 0
    impl: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ppl_interval"] = list(self.ppl_interval)
        if float(self.tokens).is_integer():
            d["tokens"] = int(self.tokens)
        return d


def _summarise(seq_sums: torch.Tensor, seq_tokens: torch.Tensor, **info) -> EvalResult:
    """seq_sums, seq_tokens (N,) float64 -> EvalResult (ratio estimator and its delta-method SE)."""
    keep = seq_tokens > 0
    s, n = seq_sums[keep].double(), seq_tokens[keep].double()
    total_tokens = float(n.sum())
    if total_tokens <= 0:
        raise ValueError("no tokens to evaluate: the data is empty or every position is padding")
    r = float(s.sum()) / total_tokens
    N = int(s.numel())
    if N >= 2:
        resid = s - r * n
        stderr = math.sqrt(N / (N - 1) * float((resid * resid).sum())) / total_tokens
    else:
        stderr = float("nan")
    interval = (math.exp(r - 2 * stderr), math.exp(r + 2 * stderr)) if N >= 2 else (float("nan"), float("nan"))
    return EvalResult(nelbo=r, ppl=math.exp(r), bpd=r / LN2, stderr=stderr, ppl_interval=interval,
                      tokens=total_tokens, sequences=N, **info)


# ------------------------------------------------------------------------------------------------ data
def _as_source(data) -> tuple[int, Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]]:
    """Normalise the three accepted data forms to (N, get(start, stop) -> (x0 (n, L), mask (n, L)))."""
    if torch.is_tensor(data):
        if data.dim() != 2:
            raise ValueError(f"token data must have shape (N, L), got {tuple(data.shape)}")
        x = data
        return x.shape[0], lambda a, b: (x[a:b], torch.ones(b - a, x.shape[1], dtype=torch.float32))
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, m = data
        if x.dim() != 2 or m.shape != x.shape:
            raise ValueError(f"(x0, attention_mask) must both be (N, L); got {tuple(x.shape)} and {tuple(m.shape)}")
        return x.shape[0], lambda a, b: (x[a:b], m[a:b])
    if hasattr(data, "__len__") and hasattr(data, "get"):
        def get(a, b):
            out = data.get(torch.arange(a, b))
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError(f"{type(data).__name__}.get(indices) must return (x0, attention_mask)")
            return out[0], out[1]
        return len(data), get
    raise TypeError("data must be a (N, L) LongTensor, a tuple (x0, attention_mask), or an object with "
                    f"__len__ and get(indices) -> (x0, attention_mask); got {type(data).__name__}")


def _batches(data, batch_size: int, limit: int | None, device):
    n, get = _as_source(data)
    if limit is not None:
        n = min(n, int(limit))
    if n <= 0:
        raise ValueError("no sequences to evaluate: the data is empty" + (" (or limit is 0)" if limit == 0 else ""))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for a in range(0, n, batch_size):
        x, m = get(a, min(a + batch_size, n))
        yield x.to(device=device, dtype=torch.int64), m.to(device=device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ NELBO
def gauss_legendre(num_t: int, lo: float, hi: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes t (num_t,) in (lo, hi) and weights (num_t,) normalised to sum to 1, float64.

    ``sum_k weights[k] f(t[k])`` approximates the MEAN of f over [lo, hi], i.e. (1/(hi-lo)) * integral.

    Why Gauss-Legendre for the NELBO: the expected integrand E f(t) = w(t) * sum_l P(l masked at t) *
    E[-log p_theta(x0_l | x_t) | l masked]. For loglinear, w(t) = 1/t and P(masked) = (1 - eps) t, so the
    1/t cancels against the masked count (no endpoint singularity left), and the conditional expectation
    averages over independent Bernoulli masks of the other L - 1 positions: a polynomial in the move
    chance, i.e. a smooth (analytic) function of t on [eps, 1]. n Gauss-Legendre nodes integrate
    polynomials of degree 2n - 1 exactly and converge geometrically for analytic integrands (midpoint:
    O(1/n^2)), so a handful of nodes leaves a discretisation error far below the mask-sampling noise.
    The nodes are interior (no evaluation at t = eps, where a single draw's variance ~ 1/t peaks), and the
    weights near the ends are small.
    """
    import numpy as np
    if num_t < 1:
        raise ValueError(f"num_t must be >= 1, got {num_t}")
    x, w = np.polynomial.legendre.leggauss(int(num_t))
    t = lo + (hi - lo) * (x + 1) / 2
    return torch.from_numpy(t), torch.from_numpy(w / 2)


def _check_quadrature(model) -> None:
    problems = []
    if getattr(model, "parameterization", None) != "subs":
        problems.append(f"parameterization is {getattr(model, 'parameterization', None)!r}, not 'subs'")
    if getattr(model, "T", 0):
        problems.append(f"discrete time T = {model.T}")
    if getattr(model, "importance_sampling", False):
        problems.append("importance sampling is on")
    if getattr(model, "change_of_variables", False):
        problems.append("change of variables is on")
    if problems:
        raise ValueError("method='quadrature' integrates the continuous-time SUBS NELBO and needs "
                         "parameterization 'subs', T = 0, no importance sampling, no change of variables; "
                         f"this model: {'; '.join(problems)}. Use method='mc' (the published estimator).")


def _quadrature_batch(model, x0, mask, t_nodes, a_weights, draws, gen, impl, control_variate):
    """Per-sequence NELBO estimates (B,) float64 for one batch by quadrature over t (see ``nelbo``).

    x0 (B, L) int64, mask (B, L) float; t_nodes, a_weights (K,) float64 (a sums to 1).
    """
    B = x0.shape[0]
    K = t_nodes.numel()
    dev = x0.device
    n_tok = mask.double().sum(1)                                     # (B,)
    S = torch.zeros(K, draws, B, dtype=torch.float64, device=dev)    # weighted NELBO sums w * sum CE
    CE = torch.zeros_like(S)                                         # unweighted masked CE sums
    CNT = torch.zeros_like(S)                                        # masked non-pad token counts
    W = torch.zeros(K, dtype=torch.float64, device=dev)
    MC = torch.zeros(K, dtype=torch.float64, device=dev)
    for k in range(K):
        t = torch.full((B,), float(t_nodes[k]), dtype=torch.float32, device=dev)
        sigma, dsigma = model.noise(t)
        weight = dsigma / torch.expm1(sigma)                          # 1/t for loglinear
        move = 1 - torch.exp(-sigma)                                  # (1-eps) t for loglinear
        W[k], MC[k] = weight[0].double(), move[0].double()
        for d in range(draws):
            xt = model.q_xt(x0, move[:, None], gen)
            out = model.subs_loss_given(x0, xt, sigma, weight, mask, impl)
            S[k, d] = out.nlls.double().sum(1)
            CE[k, d] = S[k, d] / W[k]
            CNT[k, d] = ((xt == model.mask_index).double() * mask.double()).sum(1)
    a = a_weights.to(dev)
    if not control_variate:
        return (a[:, None] * S.mean(1)).sum(0)
    # Control variate: the weighted masked count w_k * CNT has the known mean w_k * move_k * n_tok. Its
    # coefficient (CE per masked token) is estimated leaving the draw itself out, so it is independent of
    # that draw and the estimator stays exactly unbiased.
    tot_ce, tot_cnt = CE.sum((0, 1)), CNT.sum((0, 1))                # (B,)
    den = tot_cnt - CNT
    coef = torch.where(den > 0, (tot_ce - CE) / den.clamp_min(1), torch.zeros_like(den))
    expected = (W * MC)[:, None, None] * n_tok                       # (K, 1, B)
    est = S - coef * W[:, None, None] * CNT + coef * expected
    return (a[:, None] * est.mean(1)).sum(0)


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def nelbo(model, data, batch_size: int = 16, method: str = "mc", num_t: int = 16, draws: int = 1,
          seed: int = 0, impl: str | None = None, device=None, limit: int | None = None,
          control_variate: bool = True) -> EvalResult:
    """Per-token NELBO (nats), perplexity and bits per token of ``data`` under ``model`` (an ``mdlm.MDLM``).

    data: a (N, L) LongTensor of token blocks (no padding), a tuple (x0 (N, L), attention_mask (N, L)),
        or an object with ``__len__`` and ``get(indices (n,) LongTensor) -> (x0 (n, L) int64,
        attention_mask (n, L) float)`` (``mdlm.data.BlockDataset``). Sequences are taken in order, in
        batches of ``batch_size``; ``limit`` keeps only the first ``limit`` sequences.
    method:
      "mc" — the published validation estimator: per batch, ``model.loss(x0, attention_mask)`` (one
        antithetic t per row across the batch, one x_t draw), the per-token NELBO summed over non-pad
        tokens and divided by their number over all batches. Works for every parameterization (SUBS,
        D3PM, SEDD; AR gives its exact NLL). ``draws`` > 1 repeats the pass with fresh draws and averages
        (the published code does one pass). ``num_t`` is unused. Randomness: a ``torch.Generator`` on the
        device seeded with ``seed`` drives ``model.loss`` (t, x_t); for the fused loss each batch also gets
        ``seed=`` drawn as ``torch.randint(0, 2**62, (1,))`` from a CPU generator seeded with ``seed`` —
        i.e. batch b of pass r is exactly ``model.loss(x, m, generator=g, impl=impl, seed=s_b)``.
      "quadrature" — continuous-time SUBS only (ValueError otherwise). Per sequence, the mean of the
        integrand f(t) = w(t) * sum_l mask_l [x_t,l = MASK] * (-log p_theta(x0_l | x_t)),
        w = dsigma/expm1(sigma), over t in [sampling_eps, 1] by ``num_t``-node Gauss-Legendre quadrature,
        with ``draws`` independent masks x_t ~ q(x_t | x0) (move chance 1 - exp(-sigma(t))) per node,
        computed by ``model.subs_loss_given``. The published estimator draws t ~ U[sampling_eps, 1], so
        its expectation is integral_{eps}^{1} E f(t) dt / (1 - eps): the quadrature weights are normalised
        to sum to 1 so this estimates that same expectation (not the bare integral); the two methods
        agree up to their standard errors. With ``control_variate`` (default) the masked-token count,
        whose mean is known, is used as a control variate with a leave-one-draw-out coefficient (still
        exactly unbiased); when every masked token has the same loss (e.g. p_theta uniform over the
        non-MASK tokens) it removes the mask noise entirely, and in general it takes out the part of the
        noise due to how many tokens a draw masks. Cost: num_t * draws model calls per batch (MC: draws).
    impl: loss implementation ("reference" | "masked" | "fused"; None = ``model.default_loss_impl()``).
    device: where batches go (default: the model's device; if given, the model is moved there).

    Runs under ``torch.no_grad()`` in ``model.eval()`` (no dropout) and restores the training mode after.
    Deterministic for a given ``seed``. Returns an ``EvalResult``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if device is None:
        device = _model_device(model)
    else:
        device = torch.device(device)
        model.to(device)
    if method == "quadrature":
        _check_quadrature(model)
        t_nodes, a_weights = gauss_legendre(num_t, float(model.sampling_eps), 1.0)
    impl = impl or (model.default_loss_impl() if hasattr(model, "default_loss_impl") else "reference")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    seed_gen = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    sums, counts = [], []
    try:
        if method == "mc":
            per_pass = []
            for _ in range(draws):
                pass_sums = []
                for x, m in _batches(data, batch_size, limit, device):
                    s = int(torch.randint(0, 2 ** 62, (1,), generator=seed_gen).item()) if impl == "fused" else None
                    out = model.loss(x, m, generator=gen, impl=impl, seed=s)
                    pass_sums.append(out.nlls.double().sum(1))
                    if len(per_pass) == 0:
                        counts.append(out.token_mask.double().sum(1))
                per_pass.append(torch.cat(pass_sums))
            sums = [torch.stack(per_pass).mean(0)]
        else:
            for x, m in _batches(data, batch_size, limit, device):
                sums.append(_quadrature_batch(model, x, m, t_nodes, a_weights, draws, gen, impl, control_variate))
                counts.append(m.double().sum(1))
    finally:
        model.train(was_training)
    return _summarise(torch.cat(sums).cpu(), torch.cat(counts).cpu(), method=method,
                      num_t=int(num_t) if method == "quadrature" else None, draws=int(draws), seed=int(seed),
                      impl=impl)


# ---------------------------------------------------------------------------------------------- entropy
def unigram_entropy(tokens, ignore_ids: Sequence[int] = ()) -> float:
    """Mean over samples of the entropy (nats) of each sample's empirical unigram distribution.

    tokens: a (B, L) integer tensor or array, or a list of B token-id lists (lengths may differ); a 1-D
    tensor is one sample. For sample b with token counts c_v (after dropping ``ignore_ids``),
    H_b = -sum_v (c_v / n_b) log(c_v / n_b); the result is mean_b H_b over samples with at least one
    token left. This is what the published follow-up code reports as sample entropy (per sample, on the
    generated ids, nothing ignored, then averaged) — not the entropy of the pooled token distribution.
    Degenerate (repetitive) samples have low entropy, which a low generative perplexity alone would hide.
    """
    if torch.is_tensor(tokens):
        rows = [tokens.tolist()] if tokens.dim() == 1 else tokens.tolist()
    else:
        rows = [list(map(int, r)) for r in tokens]
    ignore = set(int(i) for i in ignore_ids)
    ents = []
    for row in rows:
        ids = torch.tensor([int(i) for i in row if int(i) not in ignore], dtype=torch.int64)
        if ids.numel() == 0:
            continue
        _, c = torch.unique(ids, return_counts=True)
        p = c.double() / c.sum()
        ents.append(float(-(p * p.log()).sum()))
    if not ents:
        raise ValueError("no tokens to compute an entropy from (empty samples, or everything ignored)")
    return sum(ents) / len(ents)


# ----------------------------------------------------------------------------------- generative PPL
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def load_evaluator(name: str = "gpt2-large", device=None, dtype: str = "fp32"):
    """(model, tokenizer) of a local Hugging Face causal LM, ``local_files_only=True`` (never downloads).

    RuntimeError saying what is missing when ``transformers`` is not installed or the weights / tokenizer
    of ``name`` (a hub id in the local cache, or a directory) are not available locally.
    """
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError(f"generative perplexity needs the 'transformers' package (to run the evaluator "
                           f"{name!r}), which is not installed: pip install transformers") from e
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(name, local_files_only=True,
                                                                  torch_dtype=_DTYPES[dtype])
    except (OSError, ValueError, EnvironmentError) as e:
        raise RuntimeError(f"the evaluator {name!r} (tokenizer and weights) is not available locally: it is "
                           "loaded with local_files_only=True and never downloaded. Put it in the Hugging "
                           "Face cache (e.g. `huggingface-cli download gpt2-large` on a machine with network) "
                           f"or pass a local directory. ({type(e).__name__}: {e})") from e
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


@torch.no_grad()
def generative_perplexity(texts: Sequence[str], evaluator="gpt2-large", batch_size: int = 8, device=None,
                          max_length: int | None = None, sampling_precision: str | None = None,
                          tokens=None, context_size: int | None = None, dtype: str = "fp32") -> dict:
    """Generative perplexity of ``texts`` under a causal LM, computed as the published code does.

    evaluator: a name / local path loaded by ``load_evaluator`` (``transformers``, local files only; a
        RuntimeError says what is missing), or a pair (model, tokenizer) of objects with the minimal
        Hugging Face interface: ``tokenizer(texts, return_tensors="pt", return_token_type_ids=False,
        return_attention_mask=True, padding=True[, truncation=True, max_length=n])`` -> mapping with
        "input_ids" (N, T) and "attention_mask" (N, T), ``tokenizer.eos_token_id`` (and ``pad_token``
        / ``eos_token``, pad set to EOS when missing); ``model(input_ids (b, c), attention_mask=(b, c))``
        -> ``.logits`` or ``[0]`` of shape (b, c, V).
    Published computation: all texts retokenized at once (right-padded with EOS; truncated to
    ``max_length`` tokens when given — the published code passes the diffusion model's length), cut
    along the sequence into chunks of ``context_size`` tokens (default 1024, 4096 if "llama2" is in the
    evaluator's name), each chunk scored on its own: NLL of tokens 1.. given the prefix, counting the
    targets that are not EOS plus the first EOS of the chunk (so the padding after it is excluded).
    gen_ppl = exp(sum of counted NLL / number counted), over all chunks of all texts. Logits are upcast to
    fp32 for the cross-entropy; ``dtype`` is the evaluator's weights dtype when loaded by name (published:
    fp32). Deviation: the published loop runs floor(N / batch_size) batches and silently drops the
    remainder; here every text is scored. If the tokenizer's pad token differs from EOS, padding
    positions are also excluded via the attention mask (with pad = EOS, as for GPT-2, this changes nothing).

    tokens: the generated ids (B, L) in the diffusion model's vocabulary; the reported ``entropy`` is
        ``unigram_entropy(tokens)`` (what the published follow-up reports). Without them it is computed on
        the evaluator's retokenized ids (padding excluded) and ``entropy_source`` says so.
    sampling_precision: passed through to the result (e.g. "fp64 Gumbel"): generative perplexity depends
        strongly on it (32-bit Gumbel noise lowers the effective temperature and the gen PPL).

    Returns {"gen_ppl", "nll" (nats per counted token), "tokens" (counted), "samples", "evaluator",
    "context_size", "max_length", "eval_dtype", "entropy", "entropy_source", "sampling_precision"}.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to evaluate")
    if isinstance(evaluator, str):
        name = evaluator
        model, tok = load_evaluator(evaluator, device=device, dtype=dtype)
    else:
        model, tok = evaluator
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    if device is None:
        device = _model_device(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")
    if context_size is None:
        context_size = 4096 if "llama2" in str(name) else 1024
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        raise ValueError("the evaluator's tokenizer has no eos_token_id (needed for padding and the published "
                         "token mask)")
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    pad_id = getattr(tok, "pad_token_id", None)
    kwargs = dict(return_tensors="pt", return_token_type_ids=False, return_attention_mask=True, padding=True)
    if max_length is not None:
        kwargs.update(truncation=True, max_length=int(max_length))
    enc = tok(texts, **kwargs)
    ids, attn = enc["input_ids"], enc["attention_mask"]
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for a in range(0, ids.shape[0], batch_size):
        for chunk, chunk_mask in zip(torch.split(ids[a:a + batch_size], context_size, dim=-1),
                                     torch.split(attn[a:a + batch_size], context_size, dim=-1)):
            if chunk.shape[1] < 2:  # a 1-token chunk has no target
                continue
            chunk, chunk_mask = chunk.to(device), chunk_mask.to(device)
            out = model(chunk, attention_mask=chunk_mask)
            logits = out.logits if hasattr(out, "logits") else out[0]
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), chunk[:, 1:], reduction="none")
            is_eos = chunk == eos
            valid = (is_eos.cumsum(-1) == 1) | ~is_eos
            if pad_id is not None and pad_id != eos:
                valid &= chunk_mask.bool()
            valid = valid[:, 1:]
            total += (nll.double() * valid).sum().cpu()
            count += valid.sum().cpu()
    if count == 0:
        raise ValueError("no tokens were scored (texts too short for a next-token prediction)")
    mean = float(total / count)
    if tokens is not None:
        ent, src = unigram_entropy(tokens), "generated ids"
    else:
        rows = [r[m.bool()].tolist() for r, m in zip(ids, attn)]
        ent, src = unigram_entropy(rows), "evaluator retokenization"
    return {"gen_ppl": math.exp(mean), "nll": mean, "tokens": int(count), "samples": len(texts),
            "evaluator": str(name), "context_size": int(context_size), "max_length": max_length,
            "eval_dtype": dtype, "entropy": ent, "entropy_source": src, "sampling_precision": sampling_precision}


# ------------------------------------------------------------------------------------------- evaluate
def _sampling_precision(model, sampler: str, impl: str) -> str:
    from .samplers import FAST_SAMPLERS
    fusable = (sampler in FAST_SAMPLERS and model.parameterization == "subs" and model.noise.name == "loglinear"
               and hasattr(model.backbone, "hidden_states"))
    if impl == "fused" or (impl == "auto" and fusable):
        return ("inversion with 53-bit uniforms (fused sampler: fp32 weights within 2^-22 of exp, fp32 sums within "
                "512-column chunks, fp64 sums over chunks)")
    return "fp32 Gumbel (published reference sampler)"


def evaluate(model, data=None, *, method: str = "mc", num_t: int = 16, draws: int = 1, batch_size: int = 16,
             seed: int = 0, impl: str | None = None, device=None, limit: int | None = None,
             samples: int = 0, steps: int | None = None, sampler: str | None = None, sample_impl: str = "auto",
             evaluator="gpt2-large", gen_batch_size: int = 8, decode: Callable | None = None) -> dict:
    """NELBO of ``data`` (if given) and, with ``samples`` > 0, unigram entropy + generative perplexity of
    ``samples`` sequences from ``mdlm.sample`` (``steps``, ``sampler``). ``decode`` maps (B, L) ids to B
    strings for the evaluator; gen PPL is skipped (with the reason in "gen_ppl_skipped") when ``decode``
    is None or the evaluator cannot be loaded. Returns {"nelbo": EvalResult.to_dict() | None,
    "generation": {...} | None}.
    """
    out: dict[str, Any] = {"nelbo": None, "generation": None}
    if data is not None:
        res = nelbo(model, data, batch_size=batch_size, method=method, num_t=num_t, draws=draws, seed=seed,
                    impl=impl, device=device, limit=limit)
        out["nelbo"] = res.to_dict()
    if samples and samples > 0:
        from .samplers import sample
        if device is not None:
            model.to(device)
        dev = _model_device(model)
        sampler = sampler or model.config.sampling.predictor
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        pieces = []
        with torch.no_grad():
            for a in range(0, samples, batch_size):
                pieces.append(sample(model, batch_size=min(batch_size, samples - a), steps=steps, sampler=sampler,
                                     impl=sample_impl, generator=gen).cpu())
        ids = torch.cat(pieces)
        prec = _sampling_precision(model, sampler, sample_impl)
        g: dict[str, Any] = {"samples": int(ids.shape[0]), "length": int(ids.shape[1]), "sampler": sampler,
                             "steps": steps if steps is not None else int(model.config.sampling.steps),
                             "sampling_precision": prec, "entropy": unigram_entropy(ids),
                             "gen_ppl": None, "gen_ppl_skipped": None}
        if decode is None:
            g["gen_ppl_skipped"] = "no tokenizer to decode the samples into text for the evaluator"
        else:
            texts = decode(ids)
            g["texts"] = list(texts[:4])
            try:
                gp = generative_perplexity(texts, evaluator, batch_size=gen_batch_size, device=dev,
                                           max_length=int(ids.shape[1]), sampling_precision=prec, tokens=ids)
                g.update(gen_ppl=gp["gen_ppl"], gen_nll=gp["nll"], gen_tokens=gp["tokens"],
                         evaluator=gp["evaluator"])
            except RuntimeError as e:
                g["gen_ppl_skipped"] = str(e)
        out["generation"] = g
    return out


# ------------------------------------------------------------------------------------------------ CLI
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdlm eval", description="Validation NELBO / perplexity / bits per token of an MDLM checkpoint, "
        "and optionally sample entropy and generative perplexity of its samples.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.length=128")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint or run folder of this library (it "
                   "describes its model: no --preset needed), a Hugging Face snapshot folder (kuleshov-group/mdlm-owt "
                   "layout), a published Lightning .ckpt or a plain state dict")
    p.add_argument("--preset", default=None, choices=["tiny", "small", "medium"],
                   help="only for checkpoints that do not describe their model: the preset it was trained with "
                   "(default small); with a self-describing checkpoint it must agree with it")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary incl. MASK, MASK = last id (default: from the config's tokenizer, else "
                   "GPT-2 + MASK = 50258)")
    p.add_argument("--data", help="dataset name for mdlm.data.prepare_dataset (e.g. tinyshakespeare)")
    p.add_argument("--data-tensor", help=argparse.SUPPRESS)  # torch file: (N, L) tensor or {input_ids, attention_mask}
    p.add_argument("--split", default=None,
                   help="dataset split (default: the split the published run evaluates on: validation, or test for "
                   "text8 / lm1b / ag_news / lambada)")
    p.add_argument("--method", default="mc", choices=METHODS)
    p.add_argument("--num-t", type=int, default=16, help="quadrature nodes (method quadrature)")
    p.add_argument("--draws", type=int, default=1, help="masks per node (quadrature) / passes (mc)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--impl", default=None, choices=["reference", "masked", "fused"], help="loss implementation")
    p.add_argument("--max-blocks", type=int, default=None, help="evaluate only the first N blocks")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA shadow weights")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled non-tensor objects (published Lightning .ckpt files hold a config)")
    p.add_argument("--samples", type=int, default=0, help="generate N samples: entropy and gen PPL")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default config.sampling.steps)")
    p.add_argument("--sampler", default=None, help="sampler (default config.sampling.predictor)")
    p.add_argument("--evaluator", default="gpt2-large", help="causal LM for gen PPL (local files only)")
    p.add_argument("--json", dest="json_out", help="write the results to this JSON file")
    return p


def _load_tensor_data(path: str):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if torch.is_tensor(obj):
        return obj.long()
    if isinstance(obj, dict) and "input_ids" in obj:
        ids = obj["input_ids"].long()
        return (ids, obj["attention_mask"].float()) if "attention_mask" in obj else ids
    raise ValueError(f"{path}: expected a (N, L) tensor or a dict with 'input_ids' [and 'attention_mask']")


def _resolve_vocab(cfg, vocab_size: int | None):
    """(vocab size incl. MASK, mask index or None for V - 1, tokenizer or None, note on why none).

    The config's tokenizer (``mdlm.data.get_tokenizer(cfg.data.tokenizer)``, which knows the model
    vocabulary and the MASK id, e.g. BERT's [MASK] for LM1B) when that API and its files are there and
    ``--vocab-size`` is absent or agrees with it; else GPT-2 + MASK (50258, MASK = 50257) with the shipped
    GPT-2 tokenizer; else an explicit ``--vocab-size`` with MASK = V - 1 and no tokenizer (samples cannot
    be decoded, so gen PPL is skipped with the reason in the note).
    """
    from . import data as mdata
    tok, note = None, None
    name = cfg.get_path("data.tokenizer") if hasattr(cfg, "get_path") else None
    get_tok = getattr(mdata, "get_tokenizer", None)
    if name and get_tok is not None:
        try:
            tok = get_tok(name)
        except Exception as e:  # tokenizer files absent: fall back below
            note = f"tokenizer {name!r} unavailable ({type(e).__name__}: {e})"
    if tok is not None:
        V = int(tok.model_vocab_size)
        if vocab_size is None or int(vocab_size) == V:
            return V, int(tok.mask_id), tok, None
        return int(vocab_size), None, None, (f"vocab size {vocab_size} does not match the tokenizer {name!r} "
                                              f"(model vocabulary {V}): cannot decode samples into text")
    if vocab_size is None or int(vocab_size) == 50258:
        try:
            tok = mdata.gpt2_tokenizer()
        except Exception as e:  # tokenizer files absent / tokenizers not installed / API moved
            note = note or f"GPT-2 tokenizer unavailable ({type(e).__name__}: {e})"
        return 50258, None, tok, note
    return int(vocab_size), None, None, note or (f"vocab size {vocab_size} is not GPT-2 + MASK (50258) and no "
                                                  "tokenizer is configured: cannot decode samples into text")


def _fmt(x, digits=4):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _print_table(res: dict, file=None) -> None:
    file = file if file is not None else sys.stdout
    rows = []
    n = res.get("nelbo")
    if n:
        lo, hi = n["ppl_interval"]
        rows += [("method", f"{n['method']}" + (f" (num_t={n['num_t']}, draws={n['draws']})" if n["num_t"]
                                                 else f" (draws={n['draws']})")),
                 ("NELBO (nats/token)", f"{_fmt(n['nelbo'])} ± {_fmt(n['stderr'])}"),
                 ("perplexity", f"{_fmt(n['ppl'], 3)}  [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"),
                 ("bits per token", _fmt(n["bpd"])),
                 ("tokens / sequences", f"{n['tokens']} / {n['sequences']}")]
    g = res.get("generation")
    if g:
        rows += [("samples", f"{g['samples']} x {g['length']} ({g['sampler']}, {g['steps']} steps)"),
                 ("sampling precision", g["sampling_precision"]),
                 ("sample entropy (nats)", _fmt(g["entropy"], 3)),
                 ("gen PPL", _fmt(g["gen_ppl"], 3) if g["gen_ppl"] is not None
                  else f"skipped: {g['gen_ppl_skipped']}")]
    w = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        print(f"{k:<{w}}  {v}", file=file)


class _UsageError(Exception):
    """A user mistake: ``main`` prints it as one line and exits with status 2."""


def _fail(msg) -> None:
    raise _UsageError(str(msg))


def main(argv: Sequence[str] | None = None) -> int:
    """``mdlm eval``: rebuild the model from ``--checkpoint`` (its own config when it has one, else ``--preset``
    + overrides), load the weights, evaluate.

    User errors (missing files, bad overrides, a checkpoint that does not fit) print one line,
    ``mdlm eval: error: ...``, and exit with status 2 (SystemExit), as ``mdlm sample`` does; argparse's own
    errors (unknown options) keep argparse's usage line.
    """
    parser = _build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        return _main(args)
    except _UsageError as e:
        print(f"mdlm eval: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(args) -> int:
    from .checkpoint import CheckpointError, _hint, load_published_checkpoint, open_checkpoint
    from .config import apply_overrides, preset
    from .diffusion import MDLM

    if not os.path.exists(args.checkpoint):
        _fail(f"checkpoint {args.checkpoint!r} does not exist")
    if args.data and args.data_tensor:
        _fail("give --data or --data-tensor, not both")
    if not (args.data or args.data_tensor) and args.samples <= 0:
        _fail("nothing to evaluate: give --data NAME (and --split) and/or --samples N")
    if args.num_t < 1 or args.draws < 1 or args.batch_size < 1:
        _fail("--num-t, --draws and --batch-size must be >= 1")
    cfg_data = None
    if args.data:
        try:  # the dataset's preset (length, tokenizer) where mdlm.config knows it
            preset("small", data=args.data)
            cfg_data = args.data
        except (TypeError, ValueError):
            cfg_data = None
    try:
        apply_overrides(preset(args.preset or "small"), list(args.overrides))   # unknown keys / bad values first
    except (KeyError, ValueError) as e:
        _fail(f"bad config override: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    try:
        # --data is the dataset to score (with the model's tokenizer); it sets the model's config only for
        # checkpoints that do not carry one
        c = open_checkpoint(args.checkpoint, args.preset, cfg_data, list(args.overrides),
                            weights_only=not args.trust_checkpoint, check_data=False)
    except (KeyError, ValueError) as e:
        _fail(f"bad config override: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    except (CheckpointError, ImportError) as e:
        _fail(e)
    cfg, meta = c["config"], c["meta"] or {}
    if meta.get("vocab_size") and (args.vocab_size is None or int(args.vocab_size) == int(meta["vocab_size"])):
        vocab_size, mask_index = int(meta["vocab_size"]), meta.get("mask_index")
        tok, tok_note = None, None
        name = meta.get("tokenizer")
        if name:
            try:
                from .data import get_tokenizer
                tok = get_tokenizer(name)
            except Exception as e:  # tokenizer files absent: NELBO still works, samples are not decoded
                tok_note = f"tokenizer {name!r} unavailable ({type(e).__name__}: {e})"
        else:
            tok_note = "the checkpoint names no tokenizer: cannot decode samples into text"
    elif meta.get("vocab_size"):
        _fail(f"--vocab-size {args.vocab_size} contradicts the checkpoint's vocabulary {meta['vocab_size']}")
    else:
        vocab_size, mask_index, tok, tok_note = _resolve_vocab(cfg, args.vocab_size)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = MDLM(cfg, vocab_size, mask_index=mask_index)
    try:
        report = load_published_checkpoint(model, c["obj"], use_ema=not args.no_ema)
    except CheckpointError as e:
        _fail(f"{c['path']}: {e}{_hint(c['stored'], cfg)}")
    model.to(device)

    data = None
    if args.data_tensor:
        if not os.path.isfile(args.data_tensor):
            _fail(f"data file {args.data_tensor!r} does not exist")
        try:
            data = _load_tensor_data(args.data_tensor)
        except Exception as e:  # not a torch file, an unsafe pickle, the wrong layout
            _fail(f"cannot read --data-tensor {args.data_tensor!r}: {type(e).__name__}: {e}")
    elif args.data:
        try:
            from .data import prepare_dataset
        except ImportError as e:
            _fail(f"--data needs mdlm.data.prepare_dataset, which is not available: {e}")
        from .data import DATASETS
        if args.split is None:
            spec = DATASETS.get(args.data)
            args.split = spec.eval_split if spec is not None else "validation"
        try:
            # the model's tokenizer and block mode (cfg.data), not the dataset's defaults: a GPT-2 model
            # scored on BERT or character ids would give a number, and a wrong one
            data = prepare_dataset(args.data, args.split, tokenizer=cfg.data.tokenizer, mode=cfg.data.mode,
                                   length=int(cfg.model.length), cache_dir=cfg.data.cache_dir)
        except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:
            _fail(f"cannot prepare dataset {args.data!r} split {args.split!r}: {e}")
        meta = getattr(data, "meta", {}) or {}
        if meta.get("model_vocab_size") is not None and int(meta["model_vocab_size"]) != vocab_size:
            _fail(f"dataset {args.data!r} was tokenised with {meta.get('tokenizer')!r} (vocabulary "
                         f"{meta['model_vocab_size']} with MASK), the model has vocabulary {vocab_size}")

    decode = None
    if tok is not None:
        from . import data as mdata
        decode = lambda ids: mdata.decode(ids, tok, mask_index=model.mask_index)  # noqa: E731
    try:
        res = evaluate(model, data, method=args.method, num_t=args.num_t, draws=args.draws,
                       batch_size=args.batch_size, seed=args.seed, impl=args.impl, device=device,
                       limit=args.max_blocks, samples=args.samples, steps=args.steps, sampler=args.sampler,
                       evaluator=args.evaluator, decode=decode)
    except ValueError as e:
        _fail(str(e))
    g = res["generation"]
    if g is not None and decode is None and tok_note:
        g["gen_ppl_skipped"] = tok_note
    res["checkpoint"] = {"path": c["path"], "ema": report["ema"], "global_step": report["global_step"],
                         "config_from_checkpoint": c["stored"]}
    res["config"] = {"preset": args.preset, "overrides": list(args.overrides), "vocab_size": vocab_size,
                     "mask_index": model.mask_index, "length": int(cfg.model.length),
                     "data": args.data or args.data_tensor, "split": args.split if args.data else None,
                     "max_blocks": args.max_blocks, "device": str(device)}
    _print_table(res)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
