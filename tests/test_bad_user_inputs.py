"""Every bad input a clear error at the user-level entry points (issue 15, the part above the kernels): the
samplers (published reference and fused, through ``mdlm.sample`` and directly), token shards on disk, config
values (Python API and the three CLIs), and the published DiT's config kinds.

Each test here failed before its fix (the issue's examples: ``steps=0`` and ``length=0`` ran the config's
defaults, the reference samplers took a 2-row x_init for batch 3, eps = 2, and turned NaN logits into token 0;
a shard's meta.json without ``model_vocab_size`` served any id, a consistent change of length and block count
was served, ``"length": 1e400`` raised a bare OverflowError; ``model.n_heads=0`` was a ZeroDivisionError
traceback; ``DIT(SimpleNamespace)`` an AttributeError). No tolerances: every check is exact.
"""
import json
import types
import warnings

import numpy as np
import pytest
import torch

import mdlm
from mdlm import sampling as ref
from mdlm.diffusion import MDLM
from mdlm.samplers import fast_sample, fast_semi_ar_sample

V, MASK, L = 13, 12, 6
SIZES = {"model.dropout": 0.0, "model.n_blocks": 1, "model.hidden_size": 32, "model.n_heads": 2,
         "model.cond_dim": 16, "model.length": L}


@pytest.fixture(autouse=True)
def _torch_backends(monkeypatch):
    monkeypatch.setenv("MDLM_BACKEND", "auto")


def _model(seed=0, nan=False):
    torch.manual_seed(seed)
    m = MDLM(mdlm.preset("tiny", **SIZES), V)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
            if nan:
                p.fill_(float("nan"))
    return m.eval()


def _gen():
    return torch.Generator().manual_seed(0)


# ------------------------------------------------------------------------------------------------ samplers

IMPLS = ("fused", "reference")

BAD_COUNTS = [  # (kwargs, the argument the message must name)
    ({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": 4.0}, "steps"),
    ({"steps": "4"}, "steps"), ({"steps": True}, "steps"),
    ({"length": 0}, "length"), ({"length": -1}, "length"), ({"length": 6.0}, "length"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": -2}, "batch_size"), ({"batch_size": 2.0}, "batch_size"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw,name", BAD_COUNTS, ids=[f"{k}={v!r}" for (kw, _) in BAD_COUNTS for k, v in kw.items()])
def test_steps_length_and_batch_must_be_positive_integers(impl, kw, name):
    """steps=0 / length=0 used to run the config's 128 steps / its length (``steps or default``); 2.5 was
    truncated. Now a ValueError naming the argument, the same from both implementations."""
    m = _model()
    kw = {"batch_size": 2, "steps": 3, **kw}
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1, got "):
        mdlm.sample(m, kw.pop("batch_size"), impl=impl, generator=_gen(), **kw)


def test_counts_accept_any_integer_type_and_the_config_default_is_checked_too():
    m = _model()
    for impl in IMPLS:
        out = mdlm.sample(m, np.int64(2), length=np.int32(L), steps=torch.tensor(3), impl=impl, generator=_gen())
        assert out.shape == (2, L)
    m.config.sampling.steps = 0   # a config edited by hand (apply_overrides refuses it)
    for impl in IMPLS:
        with pytest.raises(ValueError, match=r"^steps \(config.sampling.steps\) must be an integer >= 1, got 0"):
            mdlm.sample(m, 2, impl=impl, sampler="ddpm", generator=_gen())


@pytest.mark.parametrize("kw,name", [({"steps": 0}, "steps"), ({"stride_length": 2.0}, "stride_length"),
                                     ({"num_strides": -1}, "num_strides"), ({"batch_size": 0}, "batch_size"),
                                     ({"length": 0}, "length")])
def test_semi_autoregressive_counts(kw, name):
    m = _model()
    kw = {"batch_size": 2, "stride_length": 2, "num_strides": 1, "steps": 3, **kw}
    b = kw.pop("batch_size")
    for fn in (ref.semi_ar_sample, fast_semi_ar_sample):
        with pytest.raises(ValueError, match=rf"^{name} must be an integer >= "):
            fn(m, b, generator=_gen(), **kw)


BAD_SHARED = [  # what the fused samplers refused and the reference took (issue 15), and the shared checks
    ({"batch_size": 3, "x_init": torch.full((2, L), MASK)}, r"^x_init has batch 2, expected batch_size = 3$"),
    ({"length": 4, "x_init": torch.full((2, L), MASK)}, r"^x_init has length 6, but length = 4 was asked for$"),
    ({"eps": 2.0}, r"^eps \(the last time of the grid 1 -> eps\) must be in \[0, 1\], got 2.0$"),
    ({"eps": -0.1}, r"^eps .* got -0.1$"), ({"eps": float("nan")}, r"^eps .* got nan$"),
    ({"eps": "0.1"}, r"^eps .* got '0.1'$"),
    ({"x_init": torch.full((2, L), V)}, r"^x_init contains token id 13, outside \[0, 13\)"),
    ({"x_init": torch.full((2, L), 1.0)}, r"^x_init must be an integer tensor"),
]


@pytest.mark.parametrize("kw,msg", BAD_SHARED, ids=[m[:20] for _, m in BAD_SHARED])
def test_reference_and_fused_samplers_refuse_the_same_inputs_with_the_same_error(kw, msg):
    m = _model()
    kw = {"batch_size": 2, **kw}
    errors = []
    for impl in IMPLS:
        with pytest.raises((ValueError, TypeError), match=msg) as e:
            mdlm.sample(m, kw["batch_size"], steps=3, impl=impl, generator=_gen(),
                        **{k: v for k, v in kw.items() if k != "batch_size"})
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1]


def test_analytic_needs_eps_above_zero_with_noise_removal():
    """Its denoiser at t = eps = 0 divides by expm1(sigma(0)) = 0 (inf / NaN probabilities): refused up front
    instead of being reported as invalid logits; ddpm at eps = 0 is fine (both implementations)."""
    m = _model()
    with pytest.raises(ValueError, match=r"^eps must be > 0 for the analytic sampler"):
        ref.sample(m, 2, steps=3, eps=0.0, sampler="analytic", generator=_gen())
    assert ref.sample(m, 2, steps=3, eps=0.0, sampler="analytic", noise_removal=False, generator=_gen()).shape == (2, L)
    for impl in IMPLS:
        assert mdlm.sample(m, 2, steps=3, eps=0.0, sampler="ddpm", impl=impl, generator=_gen()).shape == (2, L)


@pytest.mark.parametrize("call", ["fused-ddpm_cache", "fused-first_hitting", "ref-ddpm", "ref-ddpm_cache",
                                  "ref-analytic", "ref-semi_ar", "fused-semi_ar"])
def test_nan_logits_are_one_clear_error_in_every_sampler(call):
    """A model with NaN weights: the fused samplers raised INVALID_LOGITS, the reference ones returned every
    token 0 (argmax over NaN). Now all raise the same ValueError."""
    m = _model(nan=True)
    impl, sampler = call.split("-")
    with pytest.raises(ValueError) as e:
        if sampler == "semi_ar":
            fn = ref.semi_ar_sample if impl == "ref" else fast_semi_ar_sample
            fn(m, 2, stride_length=2, num_strides=1, steps=3, generator=_gen())
        else:
            mdlm.sample(m, 2, steps=3, sampler=sampler, impl="reference" if impl == "ref" else "fused",
                        generator=_gen())
    assert str(e.value) == ref.INVALID_LOGITS


def test_reference_noise_removal_checks_the_logits_too():
    """NaN logits only in the final argmax call (eps = 1: t = s = 1, nothing unmasks in the loop, every position
    is still masked at the end): an error with noise removal, none without."""
    m = _model()
    real, calls = m.forward, []

    def forward(x, sigma):
        calls.append(1)
        out = real(x, sigma)
        return out.fill_(float("nan")) if len(calls) == 3 else out

    m.forward = forward
    out = ref.sample(m, 2, steps=2, eps=1.0, sampler="ddpm", noise_removal=False, generator=_gen())
    assert len(calls) == 2 and torch.all(out == MASK)
    calls.clear()
    with pytest.raises(ValueError) as e:
        ref.sample(m, 2, steps=2, eps=1.0, sampler="ddpm", noise_removal=True, generator=_gen())
    assert len(calls) == 3 and str(e.value) == ref.INVALID_LOGITS


def test_an_invalid_row_stays_masked_and_valid_rows_are_drawn_as_published():
    """The update functions with ``invalid``: the NaN row keeps MASK and is flagged; without ``invalid`` (the
    published call) the same draws, the NaN row becoming token 0 as in the published code."""
    m = _model()
    x = torch.full((2, L), MASK)
    x[0, 0] = 3
    t = torch.full((2, 1), 0.5)
    real = m.forward

    def forward(xx, sigma):
        out = real(xx, sigma)
        out[1, 2] = float("nan")
        return out

    m.forward = forward
    flags = []
    _, a = ref.ddpm_caching_update(m, x, t, 0.5, generator=_gen(), invalid=flags)    # s = 0: every row unmasks
    _, b = ref.ddpm_caching_update(m, x, t, 0.5, generator=_gen())
    assert len(flags) == 1 and bool(flags[0])
    assert a[1, 2] == MASK and b[1, 2] == 0
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(a[keep], b[keep]) and a[0, 0] == 3 and not torch.any(a[keep] == MASK)


# ------------------------------------------------------------------------------------------------ config

BAD_CONFIG = [
    ("model.n_heads=0", r"config key model\.n_heads must be an integer >= 1, got 0"),
    ("model.n_heads=-4", r"config key model\.n_heads must be an integer >= 1, got -4"),
    ("model.hidden_size=-128", r"config key model\.hidden_size must be an integer >= 1, got -128"),
    ("model.hidden_size=130", r"config key model\.hidden_size \(130\) must be divisible by model\.n_heads \(4\)"),
    ("model.hidden_size=12", r"the head dim 12 / 4 = 3 must be even"),
    ("model.n_blocks=0", r"config key model\.n_blocks must be an integer >= 1, got 0"),
    ("model.cond_dim=-1", r"config key model\.cond_dim must be an integer >= 1, got -1"),
    ("model.length=0", r"config key model\.length must be an integer >= 1, got 0"),
    ("model.dropout=1.5", r"config key model\.dropout must be a number in \[0.0, 1.0\), got 1.5"),
    ("sampling.steps=0", r"config key sampling\.steps must be an integer >= 1, got 0"),
    ("sampling.eps=2", r"config key sampling\.eps must be a number in \[0.0, 1.0\], got 2.0"),
    ("trainer.sample_steps=0", r"config key trainer\.sample_steps must be an integer >= 1, got 0"),
    ("trainer.max_steps=-1", r"config key trainer\.max_steps must be an integer >= 0, got -1"),
    ("trainer.save_every=-10", r"config key trainer\.save_every must be an integer >= 0, got -10"),
    ("trainer.keep_checkpoints=-1", r"config key trainer\.keep_checkpoints must be an integer >= 0, got -1"),
    ("trainer.max_nonfinite=-3", r"config key trainer\.max_nonfinite must be an integer >= 0, got -3"),
    ("trainer.grad_clip=nan", r"config key trainer\.grad_clip must be a number \(<= 0: no clipping\), got nan"),
    ("loader.global_batch_size=0", r"config key loader\.global_batch_size must be an integer >= 1, got 0"),
    ("loader.batch_size=-2", r"config key loader\.batch_size must be an integer >= 0, got -2"),
    ("optim.lr=-0.001", r"config key optim\.lr must be a finite number >= 0\.0, got -0\.001"),
    ("optim.lr=inf", r"config key optim\.lr must be a finite number >= 0\.0, got inf"),
    ("optim.beta1=1", r"config key optim\.beta1 must be a number in \[0\.0, 1\.0\), got 1\.0"),
    ("optim.eps=0", r"config key optim\.eps must be a finite number > 0\.0, got 0\.0"),
    ("optim.weight_decay=-1", r"config key optim\.weight_decay must be a finite number >= 0\.0, got -1\.0"),
    ("lr_scheduler.type=linear", r"config key lr_scheduler\.type must be constant_warmup or cosine_decay_warmup"),
    ("lr_scheduler.warmup_steps=-5", r"config key lr_scheduler\.warmup_steps must be an integer >= 0, got -5"),
    ("lr_scheduler.warmup_fraction=1.5", r"config key lr_scheduler\.warmup_fraction must be a number in \[0\.0, 1\.0\]"),
]


@pytest.mark.parametrize("override,msg", BAD_CONFIG, ids=[o for o, _ in BAD_CONFIG])
def test_config_values_out_of_range_name_the_key(override, msg):
    """apply_overrides / preset (so the CLIs and checkpoint loading) and the backbones (any config built by
    hand) refuse the same values with the same ValueError."""
    with pytest.raises(ValueError, match=msg):
        mdlm.config.apply_overrides(mdlm.preset("tiny"), [override])
    key, value = override.split("=")
    with pytest.raises(ValueError, match=msg):
        mdlm.preset("tiny", **{key: mdlm.config._parse_value(value)})
    if key.startswith("model."):
        cfg = mdlm.preset("tiny")
        cfg.model[key.split(".")[1]] = mdlm.config._parse_value(value)   # bypasses apply_overrides
        with pytest.raises(ValueError, match=msg):
            mdlm.nn.DIT(cfg, V)
        with pytest.raises(ValueError, match=msg):
            MDLM(cfg, V)


@pytest.mark.parametrize("cli", ["train", "eval", "sample"])
def test_every_cli_reports_a_bad_model_size_in_one_line(cli, tmp_path, capsys):
    """``model.n_heads=0`` ended in a ZeroDivisionError traceback (train); now exit 2 and one line naming the
    key from every command."""
    from mdlm.cli import main
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")   # eval checks the file exists before the overrides; never read
    args = {"train": ["train", "--preset", "tiny", "model.n_heads=0"],
            "eval": ["eval", "--checkpoint", str(ckpt), "--samples", "1", "model.n_heads=0"],
            "sample": ["sample", "--checkpoint", str(ckpt), "model.n_heads=0"]}[cli]
    try:
        rc = main(args)
    except SystemExit as e:   # mdlm eval exits through SystemExit(2)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "model.n_heads must be an integer >= 1, got 0" in lines[0], err


# ------------------------------------------------------------------------------------------------ DiT config kinds

def _namespace(d):
    return types.SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in d.items()})


def test_dit_accepts_a_published_style_attribute_config():
    """The published ``DIT(config, vocab_size)`` reads config.model.{hidden_size, cond_dim, n_heads, n_blocks,
    dropout, scale_by_sigma} by attribute; a SimpleNamespace with those (and the published config's other fields,
    nested as published) builds the same model as a Config: same parameters, same logits on both paths."""
    cfg = mdlm.preset("tiny", **SIZES)
    published = _namespace({"model": {"name": "tiny", "type": "ddit", "hidden_size": 32, "cond_dim": 16,
                                       "length": L, "n_blocks": 1, "n_heads": 2, "scale_by_sigma": True,
                                       "dropout": 0.0},
                            "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20.0}})
    torch.manual_seed(1)
    a = mdlm.nn.DIT(cfg, V)
    torch.manual_seed(1)
    b = mdlm.nn.DIT(published, V)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    a.load_state_dict(b.state_dict())
    x, sigma = torch.randint(0, V, (2, L)), torch.rand(2)
    for kernels in (False, True):   # the reference blocks and the fused block kernels (interpreter on CPU)
        a.use_kernels = b.use_kernels = kernels
        assert torch.equal(a.eval()(x, sigma), b.eval()(x, sigma))
    # the optional fields: absent -> defaults; use_kernels read by attribute too
    minimal = _namespace({"model": {"hidden_size": 32, "cond_dim": 16, "n_blocks": 1, "n_heads": 2, "dropout": 0.0}})
    assert mdlm.nn.DIT(minimal, V).scale_by_sigma is True and mdlm.nn.DIT(minimal, V).use_kernels is None
    minimal.model.use_kernels = False
    assert mdlm.nn.DIT(minimal, V).use_kernels is False
    minimal.model.n_heads = 0
    with pytest.raises(ValueError, match=r"model\.n_heads must be an integer >= 1, got 0"):
        mdlm.nn.DIT(minimal, V)


def test_mdlm_accepts_an_attribute_config_and_trains_and_samples_alike():
    """``MDLM`` (and ``get_noise``, the samplers) read the config by attribute too: a SimpleNamespace copy of a
    preset gives the same loss and the same samples."""
    cfg = mdlm.preset("tiny", **SIZES)
    torch.manual_seed(0)
    a = MDLM(cfg, V)
    torch.manual_seed(0)
    b = MDLM(_namespace(json.loads(json.dumps(cfg))), V)
    x = torch.randint(0, MASK, (2, L))
    la = a.loss(x, generator=torch.Generator().manual_seed(3)).loss
    lb = b.loss(x, generator=torch.Generator().manual_seed(3)).loss
    assert torch.equal(la, lb)
    for impl in IMPLS:
        assert torch.equal(mdlm.sample(a, 2, steps=3, impl=impl, generator=_gen()),
                           mdlm.sample(b, 2, steps=3, impl=impl, generator=_gen()))


# ------------------------------------------------------------------------------------------------ token shards

def _toy_tokenizer():
    from mdlm.data.tokenizers import Tokenizer

    class Backend:
        def encode(self, text):
            return [3 + ord(ch) % 90 for ch in text]

        def encode_batch(self, texts):
            return [self.encode(t) for t in texts]

    return Tokenizer("toy", Backend(), vocab_size=100, model_vocab_size=101, mask_id=100, bos_id=1, eos_id=2,
                     pad_id=0, fingerprint="toy-v1")


def _shard(tmp_path, mode="wrap", name="s"):
    import mdlm.data as D
    docs = ["some text for a few blocks of tokens " * 3, "another document, shorter", "third one here"]
    ds = D.build_shards(docs, tmp_path / name, _toy_tokenizer(), 8, mode=mode, num_workers=0)
    return tmp_path / name, len(ds)


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    (path / "meta.json").write_text(json.dumps(meta))
    return meta


def test_shards_carry_a_checksum_that_catches_a_consistent_layout_change(tmp_path):
    """length 8 x n blocks -> length 4 x 2n: same file size, so the size check passes; the old code served
    wrongly shaped blocks. The checksum binds the layout to the bytes."""
    import mdlm.data as D
    path, n = _shard(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["checksum"].startswith("sha256:") and len(meta["checksum"]) == 7 + 64
    assert (path / "tokens.bin").stat().st_size == n * 8 * 2
    _edit_meta(path, length=4, n_blocks=2 * n)                 # same bytes, other blocks
    with pytest.raises(ValueError, match=rf"tokens\.bin: checksum mismatch: .*\(length 4, n_blocks {2 * n},"):
        D.BlockDataset(path)


@pytest.mark.parametrize("mode", ["wrap", "pad"])
def test_a_changed_token_or_block_length_fails_the_checksum(tmp_path, mode):
    import mdlm.data as D
    path, n = _shard(tmp_path, mode)
    D.BlockDataset(path)                                       # intact: opens, no warning
    arr = np.fromfile(path / "tokens.bin", dtype=np.uint16)
    arr[5] = 7 if arr[5] != 7 else 8                           # still a valid id: only the checksum can tell
    arr.tofile(path / "tokens.bin")
    with pytest.raises(ValueError, match=r"tokens\.bin: checksum mismatch"):
        D.BlockDataset(path)
    D.BlockDataset(path, validate=False)                       # the workers' reopen skips the pass
    if mode == "pad":
        path, _ = _shard(tmp_path, mode, name="p2")
        lens = np.fromfile(path / "lengths.bin", dtype=np.int32)
        lens[0] = lens[0] - 1 if lens[0] > 1 else 2
        lens.tofile(path / "lengths.bin")
        with pytest.raises(ValueError, match="checksum mismatch"):
            D.BlockDataset(path)


def test_build_shards_rebuilds_a_shard_that_fails_its_checksum(tmp_path):
    import mdlm.data as D
    path, n = _shard(tmp_path)
    good = D.BlockDataset(path).tokens.copy()
    arr = np.fromfile(path / "tokens.bin", dtype=np.uint16)
    arr[3] = 7 if arr[3] != 7 else 8
    arr.tofile(path / "tokens.bin")
    path2, _ = _shard(tmp_path)                                # same inputs: cache hit -> checksum fails -> rebuilt
    assert np.array_equal(D.BlockDataset(path2).tokens, good)


def test_a_shard_without_a_checksum_opens_with_one_warning_line(tmp_path):
    """Shards written before checksums keep working (existing caches), with a one-line warning."""
    import mdlm.data as D
    path, n = _shard(tmp_path)
    _edit_meta(path, checksum=None)
    with pytest.warns(UserWarning, match=r"meta\.json: no checksum") as rec:
        ds = D.BlockDataset(path)
    mine = [w for w in rec if "checksum" in str(w.message)]
    assert len(ds) == n and len(mine) == 1 and "\n" not in str(mine[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.BlockDataset(path, validate=False)                  # no pass, no warning


@pytest.mark.parametrize("key,value,msg", [
    ("length", 1e400, r"'length' must be an integer >= 1, got inf"),
    ("length", 8.0, r"'length' must be an integer >= 1, got 8.0"),
    ("length", "8", r"'length' must be an integer >= 1, got '8'"),
    ("n_blocks", True, r"'n_blocks' must be an integer >= 1, got True"),
    ("n_blocks", -1, r"'n_blocks' must be an integer >= 1, got -1"),
    ("model_vocab_size", None, r"key 'model_vocab_size' is missing"),
    ("model_vocab_size", 1e400, r"'model_vocab_size' must be an integer >= 1, got inf"),
    ("checksum", 12, r"'checksum' must be 'sha256:<hex>', got 12"),
])
def test_malformed_meta_values_name_the_file_and_the_key(tmp_path, key, value, msg):
    """"length": 1e400 (JSON's inf) raised a bare OverflowError; 8.0 or "8" were taken; a meta.json without
    model_vocab_size served ids past the vocabulary (nothing to check them against)."""
    import mdlm.data as D
    path, _ = _shard(tmp_path)
    text = json.dumps({**json.loads((path / "meta.json").read_text()), key: value})
    if value is None:
        _edit_meta(path, **{key: None})
    else:
        (path / "meta.json").write_text(text.replace("Infinity", "1e400"))
    with pytest.raises(ValueError, match=rf"meta\.json: malformed shard metadata: {msg}"):
        D.BlockDataset(path)


def test_ids_are_checked_against_the_model_vocabulary_when_training(tmp_path):
    """The trainer turns the model's per-batch id check off ("validated when opened"); blocks checked against a
    larger vocabulary than the model's (another tokenizer's shard, in-memory blocks without meta) must be
    refused when the trainer is built, naming the block, not reach the embedding."""
    import mdlm.data as D
    from mdlm.train import Trainer
    path, n = _shard(tmp_path)
    ds = D.BlockDataset(path)
    assert ds.meta["model_vocab_size"] == 101
    ds.check_vocab(101)                                         # checked at open: free
    with pytest.raises(ValueError, match=r"tokens\.bin: token id \d+ at block \d+, position \d+ is outside the "
                                         r"vocabulary \(the model's vocabulary size 20\)"):
        ds.check_vocab(20)
    x0 = torch.full((4, 8), 5)
    x0[2, 3] = 50
    cfg = mdlm.preset("tiny", **{**SIZES, "model.length": 8, "trainer.out_dir": str(tmp_path / "run"),
                                 "loader.global_batch_size": 2})
    model = MDLM(cfg, 20, mask_index=19)
    with pytest.raises(ValueError, match=r"in-memory blocks: token id 50 at block 2, position 3 .* size 20\)"):
        Trainer(cfg, train_data=x0, val_data=x0[:2], model=model, resume="never")
    x0[2, 3] = 7
    Trainer(cfg, train_data=x0, val_data=x0[:2], model=model, resume="never")   # in range: builds


BAD_OPTIONS = [  # options of both implementations: (kwargs, exception type, message)
    ({"noise_removal": "no"}, ValueError, r"^noise_removal must be True or False, got 'no'$"),
    ({"noise_removal": 2}, ValueError, r"^noise_removal must be True or False, got 2$"),
    ({"generator": 5}, TypeError, r"^generator must be a torch.Generator or None, got int"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD_OPTIONS, ids=[str(kw) for kw, _, _ in BAD_OPTIONS])
def test_option_types_are_checked_alike(kw, exc, msg):
    """noise_removal="no" was truthy (noise removal ON); generator=5 failed inside torch.rand / as an
    AttributeError. The same exception from both implementations."""
    m = _model()
    for impl in IMPLS:
        with pytest.raises(exc, match=msg):
            mdlm.sample(m, 2, steps=3, impl=impl, **kw)
    assert mdlm.sample(m, 2, steps=3, noise_removal=np.bool_(False), generator=_gen()).shape == (2, L)


def test_reference_gumbel_dtype_and_fused_confidence_threshold():
    m = _model()
    with pytest.raises(ValueError, match=r"^gumbel_dtype must be torch.float32 \(published\) or torch.float64"):
        ref.sample(m, 2, steps=3, gumbel_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^gumbel_dtype"):
        ref.semi_ar_sample(m, 2, stride_length=2, num_strides=1, steps=3, gumbel_dtype=torch.float16)
    for th in ("a", float("nan"), 0.0, True):
        with pytest.raises(ValueError, match=rf"^confidence_threshold must be in \(0, 1\], got {th!r}"):
            fast_sample(m, 2, sampler="confidence", confidence_threshold=th)


def test_training_keys_do_not_block_building_or_loading_a_model(tmp_path):
    """The training keys are checked where a run trains (the Trainer) and where they are set (overrides), never
    to build or load a model: a checkpoint whose config carries a value accepted before these checks (here
    trainer.keep_checkpoints = 0, which the trainer reads as 2) still loads, and a published-style config whose
    training sections cannot be evaluated (Hydra interpolations needing resolvers or devices) still builds a DIT."""
    from mdlm.checkpoint import load_model
    cfg = mdlm.preset("tiny", **SIZES)
    cfg.trainer.keep_checkpoints = 0
    cfg.optim.lr = float("nan")                       # would stop a Trainer; irrelevant to sampling
    model = MDLM(cfg, V)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()},
                "config": json.loads(json.dumps(cfg)), "model_meta": {"vocab_size": V, "mask_index": MASK}}, path)
    loaded, _ = load_model(path)
    assert loaded.config.trainer.keep_checkpoints == 0

    class Unresolvable:                                # attribute access fails, as an unresolved interpolation
        def __getattr__(self, name):
            raise RuntimeError(f"cannot resolve {name}")

    published = _namespace({"model": {"hidden_size": 32, "cond_dim": 16, "n_blocks": 1, "n_heads": 2,
                                       "dropout": 0.0}})
    published.loader = published.optim = published.lr_scheduler = Unresolvable()
    mdlm.nn.DIT(published, V)
    with pytest.raises(ValueError, match=r"config key optim\.lr must be a finite number >= 0\.0, got nan"):
        mdlm.config.check_config(cfg, training=True)


def test_trainer_checks_a_config_edited_by_hand(tmp_path):
    """A config edited after ``preset`` (bypassing the overrides) is checked by the Trainer itself: a NaN
    learning rate would otherwise skip every step as non-finite, a zero batch divide by zero."""
    from mdlm.train import Trainer
    cfg = mdlm.preset("tiny")
    cfg.optim.lr = float("nan")
    blocks = torch.randint(0, V, (8, int(cfg.model.length)))
    with pytest.raises(ValueError, match=r"config key optim\.lr must be a finite number >= 0\.0, got nan"):
        Trainer(cfg, train_data=blocks, val_data=blocks)
