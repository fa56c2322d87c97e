"""mdlm.eval: NELBO (published MC estimator and quadrature), PPL / BPD, standard errors, sample entropy,
generative perplexity (published retokenize + chunk arithmetic, with a stub evaluator) and the CLI.

Small models (V = 50 tokens + MASK, L = 32, one 64-wide block) on the plain-PyTorch kernel backend
(MDLM_BACKEND=reference), so no Triton interpreter runs.
"""
import json
import math
import sys
import types

import pytest
import torch
import torch.nn as nn

import mdlm
from mdlm import eval as ev
from mdlm.diffusion import MDLM

V = 51          # 50 tokens + MASK (id 50)
L = 32
SMALL = {"model.length": L, "model.hidden_size": 64, "model.n_heads": 2, "model.cond_dim": 16, "model.n_blocks": 1}
OVERRIDES = [f"{k}={v}" for k, v in SMALL.items()]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MDLM_BACKEND", "reference")


def _cfg(**extra):
    return mdlm.preset("tiny", **{**SMALL, **extra})


def _uniform_model(**extra):
    """A fresh DIT: its final layer is zero-initialised, so the logits are all zero and p_theta is uniform
    over the V - 1 non-MASK tokens whatever x_t is."""
    torch.manual_seed(0)
    return MDLM(_cfg(**extra), V)


def _random_model(seed=0, **extra):
    torch.manual_seed(seed)
    m = MDLM(_cfg(**extra), V)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        m.backbone.output_layer.linear.weight.normal_(0, 0.3)
    return m


def _data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V - 1, (n, L), generator=g)


def _exact_uniform():
    # Loglinear: weight dsigma/expm1(sigma) = 1/t, move chance (1 - eps) t, -log p = log(V - 1) at every masked
    # token, so E f(t) = (1/t) (1 - eps) t * n * log(V - 1) for every t: the per-token NELBO (the mean over
    # t ~ U[sampling_eps, 1], which is what the published estimator's expectation is) is (1 - eps) log(V - 1).
    return (1 - 1e-3) * math.log(V - 1)


def _hand_mc(model, batches, seed, impl, passes=1):
    """The published validation loop written out: model.loss per batch with the documented seeding."""
    g = torch.Generator().manual_seed(seed)
    seed_gen = torch.Generator().manual_seed(seed)
    model.eval()
    per_pass, counts = [], None
    with torch.no_grad():
        for _ in range(passes):
            sums, cnt = [], []
            for x, m in batches:
                s = int(torch.randint(0, 2 ** 62, (1,), generator=seed_gen).item()) if impl == "fused" else None
                out = model.loss(x, m, generator=g, impl=impl, seed=s)
                sums.append(out.nlls.double().sum(1))
                cnt.append(out.token_mask.double().sum(1))
            per_pass.append(torch.cat(sums))
            counts = torch.cat(cnt)
    return torch.stack(per_pass).mean(0), counts


# ------------------------------------------------------------------------------------------------ MC
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_mc_equals_hand_loop_and_arithmetic(impl):
    model = _random_model()
    x = _data(20)
    mask = torch.ones(20, L)
    mask[3, 20:] = 0
    mask[7, 5:] = 0
    res = ev.nelbo(model, (x, mask), batch_size=8, method="mc", seed=5, impl=impl, draws=2)
    batches = [(x[a:a + 8], mask[a:a + 8]) for a in range(0, 20, 8)]
    s, n = _hand_mc(model, batches, 5, impl, passes=2)
    r = float(s.sum() / n.sum())
    assert res.nelbo == pytest.approx(r, rel=1e-12)
    assert res.tokens == float(mask.sum()) and res.sequences == 20
    assert res.ppl == pytest.approx(math.exp(r), rel=1e-12)
    assert res.bpd == pytest.approx(r / math.log(2), rel=1e-12)
    # ratio-estimator standard error, by hand
    N = 20
    se = math.sqrt(N / (N - 1) * float(((s - r * n) ** 2).sum())) / float(n.sum())
    assert res.stderr == pytest.approx(se, rel=1e-9)
    lo, hi = res.ppl_interval
    assert lo == pytest.approx(math.exp(r - 2 * se)) and hi == pytest.approx(math.exp(r + 2 * se))
    d = res.to_dict()
    assert d["method"] == "mc" and d["tokens"] == int(mask.sum()) and d["impl"] == impl
    json.dumps(d)


def test_equal_lengths_stderr_is_std_over_sqrt_n():
    model = _random_model()
    x = _data(12)
    res = ev.nelbo(model, x, batch_size=4, seed=1, impl="reference")
    s, n = _hand_mc(model, [(x[a:a + 4], torch.ones(4, L)) for a in range(0, 12, 4)], 1, "reference")
    per_token = s / n
    assert res.stderr == pytest.approx(float(per_token.std(unbiased=True)) / math.sqrt(12), rel=1e-9)


def test_determinism_and_training_mode_restored():
    model = _random_model()
    x = _data(16)
    model.train()
    a = ev.nelbo(model, x, batch_size=8, seed=3)
    assert model.training
    b = ev.nelbo(model, x, batch_size=8, seed=3)
    c = ev.nelbo(model, x, batch_size=8, seed=4)
    assert a.nelbo == b.nelbo and a.stderr == b.stderr
    assert c.nelbo != a.nelbo
    q1 = ev.nelbo(model, x, batch_size=8, method="quadrature", num_t=4, seed=3)
    q2 = ev.nelbo(model, x, batch_size=8, method="quadrature", num_t=4, seed=3)
    assert q1.nelbo == q2.nelbo
    model.eval()
    ev.nelbo(model, x, batch_size=8, seed=3)
    assert not model.training


class _Blocks:
    """The BlockDataset interface: __len__ and get(indices) -> (x0, attention_mask)."""

    def __init__(self, x, m):
        self.x, self.m = x, m

    def __len__(self):
        return self.x.shape[0]

    def get(self, idx):
        return self.x[idx], self.m[idx].float()


def test_three_data_forms_agree_and_limit():
    model = _random_model()
    x = _data(10)
    ones = torch.ones(10, L)
    r1 = ev.nelbo(model, x, batch_size=4, seed=2)
    r2 = ev.nelbo(model, (x, ones), batch_size=4, seed=2)
    r3 = ev.nelbo(model, _Blocks(x, ones), batch_size=4, seed=2)
    assert r1.nelbo == r2.nelbo == r3.nelbo
    r4 = ev.nelbo(model, _Blocks(x, ones), batch_size=4, seed=2, limit=6)
    assert r4.sequences == 6 and r4.nelbo == ev.nelbo(model, x[:6], batch_size=4, seed=2).nelbo


# ---------------------------------------------------------------------------------------- quadrature
def test_gauss_legendre_integrates_polynomials_and_means():
    t, a = ev.gauss_legendre(5, 1e-3, 1.0)
    assert float(a.sum()) == pytest.approx(1.0, abs=1e-14)
    assert float(t.min()) > 1e-3 and float(t.max()) < 1.0
    lo = 1e-3
    for k in range(10):  # exact up to degree 2n - 1 = 9: the MEAN over [lo, 1]
        exact = (1 - lo ** (k + 1)) / (k + 1) / (1 - lo)
        assert float((a * t ** k).sum()) == pytest.approx(exact, rel=1e-12)


def test_closed_form_uniform_model_quadrature_exact_and_mc_within_stderr():
    model = _uniform_model()
    x = _data(24)
    mask = torch.ones(24, L)
    mask[::3, L // 2:] = 0  # padding must not change the per-token value, only the count
    exact = _exact_uniform()
    q = ev.nelbo(model, (x, mask), batch_size=12, method="quadrature", num_t=6, seed=0)
    assert q.nelbo == pytest.approx(exact, rel=1e-5)
    assert q.stderr < 1e-5 and q.tokens == float(mask.sum())
    mc = ev.nelbo(model, (x, mask), batch_size=12, method="mc", seed=0, draws=4)
    assert abs(mc.nelbo - exact) < 4 * mc.stderr  # 4: MC's per-sequence terms are skewed (weight 1/t)
    assert mc.stderr > 1e-3  # MC is genuinely noisy here
    # without the control variate the quadrature is unbiased but carries the mask noise
    q0 = ev.nelbo(model, (x, mask), batch_size=12, method="quadrature", num_t=6, seed=0, control_variate=False)
    assert abs(q0.nelbo - exact) < 4 * q0.stderr and q0.stderr > 1e-4


def _exact_uniform_d3pm(T):
    """Per-token NELBO of the zero-logit D3PM model (p_theta uniform over all V tokens) under the published MC
    estimator: log V (reconstruction, every token) + E_k [move chance (1 - eps) k/T x the per-masked-token
    diffusion term at t = k/T], k = floor(u T) + 1 with u uniform on [sampling_eps, 1)."""
    se, eps = 1e-3, 1e-3
    total = math.log(V)
    for k in range(1, T + 1):
        lo, hi = max((k - 1) / T, se), k / T
        pk = max(0.0, hi - lo) / (1 - se)
        t = min(k / T, 1 - 1e-4)
        dt = 1 / T
        nr = math.log((1 - t) / (V * t) + 1)
        term = dt / t * (nr + math.log(V))
        if t - dt > 0:
            term += (1 - dt / t) * (nr - math.log((1 - (t - dt)) / (V * (t - dt)) + 1))
        total += pk * (1 - eps) * (k / T) * T * term
    return total


@pytest.mark.parametrize("param", ["sedd", "d3pm"])
def test_sedd_and_d3pm_mc_values_for_the_uniform_model(param):
    """The published MC estimator on the other parameterizations, checked against closed forms (not only for
    being finite): zero logits give SEDD (1 - eps) log(V - 1) per token (as SUBS: its weight dsigma / expm1(sigma)
    times the score entropy log(V - 1) / ... averages to it) and D3PM log V + the diffusion term
    (_exact_uniform_d3pm). A SEDD loss without dsigma (~log(V - 1) / 2) or a D3PM loss without its
    reconstruction term (log V less) is many standard errors off."""
    extra = {"parameterization": "sedd", "time_conditioning": True} if param == "sedd" else {
        "parameterization": "d3pm", "T": 10}
    model = _uniform_model(**extra)
    x = _data(48)
    mc = ev.nelbo(model, x, batch_size=16, method="mc", seed=0, draws=2)
    exact = _exact_uniform() if param == "sedd" else _exact_uniform_d3pm(10)
    assert abs(mc.nelbo - exact) < 4 * mc.stderr, (mc.nelbo, exact, mc.stderr)
    assert mc.stderr < 0.1 * exact


def test_quadrature_agrees_with_mc_and_has_lower_variance():
    model = _random_model()
    one = _data(1).repeat(48, 1)  # the same sequence repeated: the spread is pure estimator noise
    mc = ev.nelbo(model, one, batch_size=16, method="mc", draws=8, seed=0)
    q = ev.nelbo(model, one, batch_size=16, method="quadrature", num_t=8, draws=1, seed=0)  # same model calls
    assert abs(mc.nelbo - q.nelbo) < 4 * math.hypot(mc.stderr, q.stderr)
    assert q.stderr < 0.7 * mc.stderr
    x = _data(32)  # distinct sequences
    mc = ev.nelbo(model, x, batch_size=16, method="mc", draws=4, seed=1)
    q = ev.nelbo(model, x, batch_size=16, method="quadrature", num_t=4, draws=1, seed=1)
    assert abs(mc.nelbo - q.nelbo) < 4 * math.hypot(mc.stderr, q.stderr)


def test_quadrature_impls_agree():
    model = _random_model()
    x = _data(6)
    vals = [ev.nelbo(model, x, method="quadrature", num_t=3, seed=0, impl=i).nelbo
            for i in ("reference", "masked", "fused")]
    assert vals[1] == pytest.approx(vals[0], rel=1e-5) and vals[2] == pytest.approx(vals[0], rel=1e-5)


@pytest.mark.parametrize("method, draws, bound", [("mc", 16, 0.8), ("quadrature", 8, 0.6)])
def test_stderr_shrinks_with_more_draws(method, draws, bound):
    """Expected ratio 1/sqrt(draws); MC's per-sequence terms are skewed (weight 1/t), so its sample
    standard error itself is noisy and its bound is loose."""
    model = _random_model()
    one = _data(1).repeat(32, 1)
    kw = {"num_t": 4} if method == "quadrature" else {}
    s1 = ev.nelbo(model, one, batch_size=16, method=method, draws=1, seed=0, **kw).stderr
    sd = ev.nelbo(model, one, batch_size=16, method=method, draws=draws, seed=0, **kw).stderr
    assert sd < bound * s1


def test_attention_mask_respected():
    """Pad positions carry no loss and no count; a row that is all padding is not a sequence."""
    model = _random_model()
    x = _data(8)
    mask = torch.ones(8, L)
    mask[0, 10:] = 0
    mask[5] = 0
    for method in ("mc", "quadrature"):
        r = ev.nelbo(model, (x, mask), batch_size=8, method=method, num_t=3, seed=0, impl="reference")
        assert r.tokens == float(mask.sum()) and r.sequences == 7
    r = ev.nelbo(model, (x, mask), batch_size=8, seed=0, impl="reference")
    with torch.no_grad():
        model.eval()
        out = model.loss(x, mask, generator=torch.Generator().manual_seed(0), impl="reference")
    assert float(out.nlls[mask == 0].abs().sum()) == 0
    assert r.nelbo == pytest.approx(float(out.nlls.double().sum() / mask.sum()), rel=1e-12)


def test_clear_errors():
    x = _data(4)
    with pytest.raises(ValueError, match="continuous-time SUBS"):
        ev.nelbo(_random_model(T=10), x, method="quadrature")
    with pytest.raises(ValueError, match="continuous-time SUBS"):
        ev.nelbo(_random_model(**{"parameterization": "sedd"}), x, method="quadrature")
    model = _random_model()
    with pytest.raises(ValueError, match="empty"):
        ev.nelbo(model, torch.zeros(0, L, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        ev.nelbo(model, (x, torch.zeros(4, L)))
    with pytest.raises(ValueError, match="unknown method"):
        ev.nelbo(model, x, method="exact")
    with pytest.raises(TypeError, match="LongTensor"):
        ev.nelbo(model, [[1, 2, 3]])
    # MC works for the other parameterizations (the published estimator)
    r = ev.nelbo(_random_model(T=10), x, method="mc")
    assert math.isfinite(r.nelbo)


# -------------------------------------------------------------------------------------------- entropy
def test_unigram_entropy_hand_examples():
    assert ev.unigram_entropy([[1, 1, 2, 2]]) == pytest.approx(math.log(2))
    assert ev.unigram_entropy(torch.tensor([[1, 2, 3, 4], [5, 5, 5, 5]])) == pytest.approx(math.log(4) / 2)
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert ev.unigram_entropy([[7, 7, 8, 9], [3]]) == pytest.approx(h / 2)  # ragged lists
    assert ev.unigram_entropy(torch.tensor([1, 1, 2, 2])) == pytest.approx(math.log(2))  # one sample
    assert ev.unigram_entropy([[0, 1, 1, 2, 2, 0]], ignore_ids=(0,)) == pytest.approx(math.log(2))
    assert ev.unigram_entropy([[0, 0], [1, 2]], ignore_ids=[0]) == pytest.approx(math.log(2))  # empty skipped
    with pytest.raises(ValueError, match="no tokens"):
        ev.unigram_entropy([[0, 0]], ignore_ids=[0])


# ------------------------------------------------------------------------------------------- gen PPL
EOS = 5  # stub vocabulary: "a".."e" = 0..4, "|" = EOS


class _StubTokenizer:
    """Character-level tokenizer with the minimal HF call interface (right padding with the pad id)."""

    eos_token, eos_token_id = "|", EOS

    def __init__(self):
        self.pad_token = None
        self.calls = []

    @property
    def pad_token_id(self):
        return EOS if self.pad_token == "|" else None

    def encode(self, text):
        return [EOS if c == "|" else ord(c) - ord("a") for c in text]

    def __call__(self, texts, return_tensors=None, return_token_type_ids=None, return_attention_mask=None,
                 padding=False, truncation=False, max_length=None):
        self.calls.append(dict(truncation=truncation, max_length=max_length, padding=padding))
        rows = [self.encode(t)[:max_length] if truncation else self.encode(t) for t in texts]
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad_token_id] * (T - len(r)) for r in rows])
        attn = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": attn}


class _Bigram(nn.Module):
    """Causal stub: the logits at position i depend on token i only (a bigram table)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None):
        return (self.table[input_ids],)  # tuple: the [0] path of the interface


def _hand_gen_ppl(rows, table, ctx):
    """Published arithmetic by hand: chunks of ctx, targets 1.., count non-EOS + first EOS of the chunk."""
    logp = torch.log_softmax(table.double(), -1)
    total, count = 0.0, 0
    for row in rows:
        for c0 in range(0, len(row), ctx):
            chunk = row[c0:c0 + ctx]
            for j in range(1, len(chunk)):
                first_eos = chunk[j] == EOS and EOS not in chunk[:j]
                if chunk[j] != EOS or first_eos:
                    total += -float(logp[chunk[j - 1], chunk[j]])
                    count += 1
    return math.exp(total / count), count


def test_generative_perplexity_matches_hand_computation():
    tok, model = _StubTokenizer(), _Bigram()
    texts = ["abcab|dde", "|aab", "eeeedcba|a|b", "ab"]
    res = ev.generative_perplexity(texts, evaluator=(model, tok), batch_size=3, context_size=4,
                                   sampling_precision="fp64 Gumbel")
    assert tok.pad_token == "|"  # pad set to EOS, as published
    padded = tok(texts, padding=True)["input_ids"].tolist()
    ppl, count = _hand_gen_ppl(padded, model.table.detach(), 4)
    assert res["gen_ppl"] == pytest.approx(ppl, rel=1e-6) and res["tokens"] == count
    assert res["samples"] == 4 and res["sampling_precision"] == "fp64 Gumbel" and res["context_size"] == 4
    # entropy of the evaluator's ids without padding when no generated ids are given, else of those
    rows = [tok.encode(t) for t in texts]
    assert res["entropy"] == pytest.approx(ev.unigram_entropy(rows))
    gen_ids = torch.tensor([[1, 1, 2, 2], [3, 3, 3, 3]])
    res2 = ev.generative_perplexity(texts, evaluator=(model, tok), context_size=4, tokens=gen_ids)
    assert res2["entropy"] == pytest.approx(math.log(2) / 2) and res2["entropy_source"] == "generated ids"
    assert res2["gen_ppl"] == pytest.approx(res["gen_ppl"], rel=1e-9)  # batch size does not matter
    # truncation to max_length (the published code passes the diffusion model's length)
    res3 = ev.generative_perplexity(texts, evaluator=(model, tok), context_size=1024, max_length=5)
    assert tok.calls[-1] == dict(truncation=True, max_length=5, padding=True)
    trunc = tok(texts, padding=True, truncation=True, max_length=5)["input_ids"].tolist()
    assert res3["gen_ppl"] == pytest.approx(_hand_gen_ppl(trunc, model.table.detach(), 1024)[0], rel=1e-6)


def test_generative_perplexity_clear_error_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(RuntimeError, match="'transformers' package"):
        ev.generative_perplexity(["abc"], evaluator="gpt2-large")


def test_generative_perplexity_clear_error_without_weights(monkeypatch):
    seen = {}

    class _Auto:
        @staticmethod
        def from_pretrained(name, **kw):
            seen.update(kw)
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = fake.AutoModelForCausalLM = _Auto
    monkeypatch.setitem(sys.modules, "transformers", fake)
    with pytest.raises(RuntimeError, match="not available locally"):
        ev.generative_perplexity(["abc"], evaluator="gpt2-large")
    assert seen.get("local_files_only") is True


def test_evaluate_samples_with_stub_evaluator():
    model = _random_model()
    tok, lm = _StubTokenizer(), _Bigram()
    decode = lambda ids: ["".join("abcde"[i % 5] for i in row) for row in ids.tolist()]  # noqa: E731
    res = ev.evaluate(model, _data(4), samples=3, steps=4, batch_size=2, decode=decode, evaluator=(lm, tok))
    assert res["nelbo"]["sequences"] == 4
    g = res["generation"]
    assert g["samples"] == 3 and g["gen_ppl_skipped"] is None and "fp64" in g["sampling_precision"]
    # the same numbers by hand from the same samples (the sampler is seeded by `seed`)
    ids = torch.cat([mdlm.sample(model, batch_size=n, steps=4, generator=gen).cpu()
                     for gen in [torch.Generator().manual_seed(0)] for n in (2, 1)])
    assert g["entropy"] == pytest.approx(ev.unigram_entropy(ids))
    padded = tok(decode(ids), padding=True, truncation=True, max_length=L)["input_ids"].tolist()
    assert g["gen_ppl"] == pytest.approx(_hand_gen_ppl(padded, lm.table.detach(), 1024)[0], rel=1e-6)


# ------------------------------------------------------------------------------------------------ CLI
def _write_checkpoint(tmp_path, model, with_ema=True):
    shadow = [p.detach() + 0.05 * torch.randn_like(p) for p in model.backbone.parameters()] if with_ema else None
    path = tmp_path / "model.ckpt"
    mdlm.save_published_checkpoint(model, path, ema_shadow=shadow, global_step=7)
    return path, shadow


def test_cli_main_on_checkpoint_and_tensor_data(tmp_path, capsys):
    model = _random_model()
    ckpt, shadow = _write_checkpoint(tmp_path, model)
    x = _data(10)
    data_path = tmp_path / "blocks.pt"
    torch.save(x, data_path)
    out = tmp_path / "res.json"
    base = ["--preset", "tiny", *OVERRIDES, "--vocab-size", str(V), "--checkpoint", str(ckpt),
            "--data-tensor", str(data_path), "--batch-size", "4", "--seed", "3", "--device", "cpu"]
    assert ev.main(base + ["--json", str(out), "--max-blocks", "8"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "NELBO" in printed
    res = json.loads(out.read_text())
    # the same evaluation through the API, on the EMA weights
    ref = MDLM(_cfg(), V)
    with torch.no_grad():
        for p, s in zip(ref.backbone.parameters(), shadow):
            p.copy_(s)
    expected = ev.nelbo(ref, x, batch_size=4, seed=3, limit=8)
    assert res["nelbo"]["nelbo"] == pytest.approx(expected.nelbo, rel=1e-9)
    assert res["nelbo"]["sequences"] == 8 and res["checkpoint"]["ema"] and res["checkpoint"]["global_step"] == 7
    # --no-ema: the raw weights; quadrature through the CLI
    assert ev.main(base + ["--no-ema", "--method", "quadrature", "--num-t", "3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    expected = ev.nelbo(model, x, batch_size=4, seed=3, method="quadrature", num_t=3)
    assert res["nelbo"]["nelbo"] == pytest.approx(expected.nelbo, rel=1e-9) and res["nelbo"]["method"] == "quadrature"


def test_cli_samples_report_entropy_and_skip_reason(tmp_path, capsys):
    ckpt, _ = _write_checkpoint(tmp_path, _random_model(), with_ema=False)
    out = tmp_path / "res.json"
    assert ev.main(["--preset", "tiny", *OVERRIDES, "--vocab-size", str(V), "--checkpoint", str(ckpt),
                    "--samples", "3", "--steps", "4", "--device", "cpu", "--json", str(out)]) == 0
    g = json.loads(out.read_text())["generation"]
    assert g["samples"] == 3 and g["length"] == L and 0 < g["entropy"] <= math.log(L)
    assert g["gen_ppl"] is None and "50258" in g["gen_ppl_skipped"]
    assert "fp64" in g["sampling_precision"]
    assert "skipped" in capsys.readouterr().out


def test_cli_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--preset", "tiny", "--checkpoint", str(tmp_path / "missing.ckpt"), "--samples", "1"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    ckpt, _ = _write_checkpoint(tmp_path, _random_model(), with_ema=False)
    with pytest.raises(SystemExit):
        ev.main(["--preset", "tiny", *OVERRIDES, "--vocab-size", str(V), "--checkpoint", str(ckpt)])
    assert "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a checkpoint that does not fit the configured model
        ev.main(["--preset", "tiny", "--vocab-size", str(V), "--checkpoint", str(ckpt), "--samples", "1"])
    assert "does not fit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--preset", "tiny", "model.nonsense=1", "--checkpoint", str(ckpt), "--samples", "1"])
    assert "unknown config key" in capsys.readouterr().err


def test_cli_data_name_goes_through_prepare_dataset(tmp_path, monkeypatch):
    """--data NAME --split S calls mdlm.data.prepare_dataset(NAME, S, length=config.model.length) and
    evaluates the BlockDataset-like object it returns (a stand-in here: no shipped corpus needed)."""
    import mdlm.data as data_mod
    calls = []
    x = _data(6)

    def fake_prepare(name, split, length=None, **kw):
        calls.append((name, split, length))
        return _Blocks(x, torch.ones(6, L))

    monkeypatch.setattr(data_mod, "prepare_dataset", fake_prepare, raising=False)
    model = _random_model()
    ckpt, _ = _write_checkpoint(tmp_path, model, with_ema=False)
    out = tmp_path / "res.json"
    assert ev.main(["--preset", "tiny", *OVERRIDES, "--vocab-size", str(V), "--checkpoint", str(ckpt),
                    "--data", "somecorpus", "--split", "test", "--batch-size", "4", "--device", "cpu",
                    "--json", str(out)]) == 0
    assert calls == [("somecorpus", "test", L)]
    res = json.loads(out.read_text())
    assert res["nelbo"]["nelbo"] == pytest.approx(ev.nelbo(model, x, batch_size=4).nelbo, rel=1e-9)
    assert res["config"]["data"] == "somecorpus" and res["config"]["split"] == "test"


def test_cli_shipped_dataset(tmp_path):
    data_mod = pytest.importorskip("mdlm.data")
    if not hasattr(data_mod, "prepare_dataset"):
        pytest.skip("mdlm.data.prepare_dataset does not exist yet (mdlm/data is being turned into a package)")
    if data_mod.data_dir(required=False) is None:
        pytest.skip("the shipped data folder (shared/data) is absent")
    torch.manual_seed(0)
    model = MDLM(_cfg(), 50258)
    ckpt = tmp_path / "m.ckpt"
    mdlm.save_published_checkpoint(model, ckpt)
    out = tmp_path / "res.json"
    assert ev.main(["--preset", "tiny", *OVERRIDES, "--vocab-size", "50258", "--checkpoint", str(ckpt),
                    "--data", "tinyshakespeare", "--split", "val", "--max-blocks", "4", "--batch-size", "4",
                    "--method", "quadrature", "--num-t", "2", "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["nelbo"]
    # a fresh DIT is uniform over the 50257 non-MASK tokens: the closed form again
    assert res["sequences"] == 4 and res["nelbo"] == pytest.approx((1 - 1e-3) * math.log(50257), rel=1e-5)


def test_cli_default_split_is_the_published_eval_split_and_the_model_tokenizer_is_used(tmp_path, monkeypatch):
    import mdlm.data as data_mod
    calls = []
    x = _data(4)

    def fake_prepare(name, split, length=None, tokenizer=None, mode=None, **kw):
        calls.append((name, split, tokenizer, mode))
        return _Blocks(x, torch.ones(4, L))

    monkeypatch.setattr(data_mod, "prepare_dataset", fake_prepare)
    ckpt, _ = _write_checkpoint(tmp_path, _random_model(), with_ema=False)
    for name, split in (("text8", "test"), ("lm1b", "test"), ("tinyshakespeare", "validation")):
        assert ev.main(["--preset", "tiny", *OVERRIDES, "--vocab-size", str(V), "--checkpoint", str(ckpt),
                        "--data", name, "--batch-size", "4", "--device", "cpu", "data.tokenizer=gpt2",
                        "data.mode=wrap"]) == 0
        assert calls[-1] == (name, split, "gpt2", "wrap")


def test_cli_refuses_data_tokenised_for_another_vocabulary(tmp_path, capsys):
    data_mod = pytest.importorskip("mdlm.data")
    d = data_mod.data_dir(required=False)
    if d is None or not (d / "tokenizers" / "bert-base-uncased" / "vocab.txt").is_file():
        pytest.skip("the shipped data folder (shared/data) is absent")
    torch.manual_seed(0)
    ckpt = tmp_path / "m.ckpt"
    mdlm.save_published_checkpoint(MDLM(_cfg(), 50258), ckpt)
    with pytest.raises(SystemExit) as e:
        ev.main(["--preset", "tiny", *OVERRIDES, "--vocab-size", "50258", "--checkpoint", str(ckpt),
                 "--data", "tinyshakespeare", "data.tokenizer=bert-base-uncased", f"data.cache_dir={tmp_path}",
                 "--max-blocks", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "bert-base-uncased" in err and "50258" in err, err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(SystemExit) as e:
        ev.main(["--preset", "tiny", *OVERRIDES, "--vocab-size", "50258", "--checkpoint", str(ckpt),
                 "--data-tensor", str(bad)])
    assert e.value.code == 2 and "cannot read --data-tensor" in capsys.readouterr().err
