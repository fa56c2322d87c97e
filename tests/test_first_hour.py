"""A new user's first hour (issue 14), checked on CPU without the shipped data folder:

- ``mdlm train --quick`` is CPU-sized; progress lines appear when stderr is not a terminal (at step 1, every
  ``log_every`` steps and at least every ``_Progress.interval_s`` seconds) with an estimate of the time left;
  a CPU run whose estimate is over an hour points to ``--quick``;
- ``--data text:PATH`` works through the CLI; text8 is never downloaded; ``MDLM_DATA_DIR`` pointing nowhere is an
  error; the default data folder depends on the source checkout only, never on the working directory;
- checkpoints describe themselves: ``mdlm sample`` / ``mdlm eval --checkpoint RUN`` need no ``--preset``, a
  contradicting ``--preset`` names both configs, files without a config load from the flags as before;
- a second SIGINT stops at once (exit 130) without saving;
- an unbuilt source tree warns on import; on a CUDA device a missing or CPU-only extension is announced once;
- ``trainer.max_steps=ten`` names the key, the sampler error lists every sampler, ``mdlm eval`` errors are one
  line, ``bench/throughput.py`` labels its chart, draws the quartiles and says where the PNG went.

The character-level text8 tokenizer needs no files, so the CLI runs here use ``--data text:<file>`` with
``data.tokenizer=text8`` and a tiny model (a few seconds each)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import mdlm
from mdlm import config as C
from mdlm.checkpoint import load_training_checkpoint
from mdlm.data import _local
from mdlm.data import datasets as dsets

REPO = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "data.tokenizer=text8", "model.length=32", "model.hidden_size=32", "model.n_heads=2",
        "model.cond_dim=16", "model.n_blocks=1", "loader.global_batch_size=4", "trainer.val_every=0",
        "trainer.save_every=0", "trainer.num_samples=0", "trainer.log_every=1", "lr_scheduler.warmup_steps=2",
        "trainer.val_blocks=4"]
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity.\n") * 40


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MDLM_BACKEND", "reference")    # the Triton interpreter would only add minutes here


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["MDLM_BACKEND"] = "reference"
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------- --quick, overrides
def test_quick_is_a_cpu_sized_run_of_the_tiny_preset():
    from mdlm.train import build_config
    cfg, _ = build_config(["--quick"])
    assert cfg.model.name == "tiny" and cfg.data.train == "tinyshakespeare"
    steps, gbs, L = int(cfg.trainer.max_steps), int(cfg.loader.global_batch_size), int(cfg.model.length)
    # the README's 4-hour trap was 300 steps x 512 sequences x 128 tokens (19.7M tokens, warm-up 2500 steps);
    # --quick trains 153,600 tokens (~1.5 min at the ~1.8k tokens/s of a 2-core CPU) and warms up in 20 steps
    assert steps * gbs * L <= 160_000 and int(cfg.lr_scheduler.warmup_steps) * 5 <= steps
    assert int(cfg.trainer.val_every) > 0 and steps % int(cfg.trainer.val_every) == 0   # a visible curve
    cfg, _ = build_config(["--quick", "--preset", "small", "trainer.max_steps=7"])       # explicit flags win
    assert cfg.model.name == "small" and cfg.trainer.max_steps == 7 and cfg.loader.global_batch_size == 8
    cfg, _ = build_config([])
    assert cfg.model.name == "small" and cfg.loader.global_batch_size == 512            # the published recipe


def test_overrides_must_fit_the_field_type_and_errors_name_the_key(capsys):
    cfg = mdlm.preset("tiny")
    with pytest.raises(ValueError, match=r"trainer\.max_steps takes an integer, got trainer\.max_steps=ten"):
        C.apply_overrides(cfg, ["trainer.max_steps=ten"])
    with pytest.raises(ValueError, match=r"trainer\.compile takes true or false"):
        C.apply_overrides(cfg, ["trainer.compile=maybe"])
    with pytest.raises(ValueError, match=r"optim\.lr takes a number"):
        C.apply_overrides(cfg, ["optim.lr=fast"])
    C.apply_overrides(cfg, ["trainer.max_steps=1e3", "optim.lr=1", "trainer.compile=0", "trainer.use_kernels=false",
                            "trainer.out_dir=2024", "data.cache_dir=/tmp/x", "trainer.progress=true"])
    assert cfg.trainer.max_steps == 1000 and type(cfg.trainer.max_steps) is int
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float and cfg.trainer.compile is False
    assert cfg.trainer.use_kernels is False and cfg.trainer.out_dir == "2024" and cfg.data.cache_dir == "/tmp/x"
    assert cfg.trainer.progress is True
    from mdlm.train import main
    assert main(["--preset", "tiny", "trainer.max_steps=ten"]) == 2
    err = capsys.readouterr().err
    assert "trainer.max_steps" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_text_data_preset():
    cfg = mdlm.preset("tiny", data="text:/some/where/*.txt")
    assert (cfg.data.train, cfg.data.valid, cfg.data.tokenizer, cfg.data.mode) == \
        ("text:/some/where/*.txt", "text:/some/where/*.txt", "gpt2", "wrap")
    assert cfg.model.length == 128                                      # the model preset's length
    with pytest.raises(ValueError, match="needs a path"):
        mdlm.preset("tiny", data="text:")
    with pytest.raises(ValueError, match="text:<path>"):
        mdlm.preset("tiny", data="nosuch")


# ------------------------------------------------------------------------------------------------ data folder
def test_data_dir_env_checkout_and_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("MDLM_DATA_DIR", str(tmp_path / "nonexistent"))
    with pytest.raises(FileNotFoundError, match="MDLM_DATA_DIR=.*nonexistent is not a folder"):
        _local.data_dir(required=False)                 # set but wrong: an error, never silently replaced
    monkeypatch.setenv("MDLM_DATA_DIR", str(tmp_path))
    assert _local.data_dir() == tmp_path
    monkeypatch.delenv("MDLM_DATA_DIR")
    # an installed package has no default, whatever the working directory holds
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")                 # ../shared/data exists next to the working directory
    monkeypatch.setattr(_local, "source_checkout", lambda: None)
    assert _local.data_dir(required=False) is None
    with pytest.raises(FileNotFoundError, match="set MDLM_DATA_DIR.*installed package"):
        _local.data_dir()
    # a source checkout: <checkout>/../shared/data
    monkeypatch.setattr(_local, "source_checkout", lambda: tmp_path / "checkout")
    assert _local.data_dir() == tmp_path / "shared" / "data"



def test_source_checkout_is_where_mdlm_was_imported_from():
    root = Path(mdlm.__file__).resolve().parents[1]
    want = root if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir() else None   # else installed
    assert _local.source_checkout() == want


def test_text8_is_never_downloaded_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("the network was used")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(dsets, "data_dir", lambda required=True: None)
    monkeypatch.setenv("MDLM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="text8 is not available offline") as e:
        dsets.prepare_dataset("text8", "train", length=16, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value) and "text8.zip" in str(e.value)
    from mdlm.train import main
    rc = main(["--preset", "tiny", "--data", "text8", f"trainer.out_dir={tmp_path / 'run'}",
               f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "not available offline" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_datasets_corpus_without_datasets_lists_what_works_offline(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setattr(dsets, "data_dir", lambda required=True: None)
    monkeypatch.setenv("MDLM_CACHE_DIR", str(tmp_path))
    with pytest.raises(ImportError) as e:
        dsets.prepare_dataset("openwebtext", "train", tokenizer="text8", cache_dir=tmp_path)
    msg = str(e.value)
    assert "pip install datasets" in msg and "offline here: text:<path>" in msg and "text8" not in msg.split("here:")[1]


# ----------------------------------------------------------------------------- a run on text:PATH, end to end
@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """``mdlm train --data text:<file>`` (3 steps of a tiny text8-tokenizer model) in this process."""
    from mdlm.train import main
    d = tmp_path_factory.mktemp("textrun")
    (d / "corpus.txt").write_text(TEXT)
    old = os.environ.get("MDLM_BACKEND")
    os.environ["MDLM_BACKEND"] = "reference"
    try:
        rc = main(["--data", f"text:{d / 'corpus.txt'}", *TINY, "trainer.max_steps=3",
                   f"trainer.out_dir={d / 'run'}", f"data.cache_dir={d / 'cache'}"])
    finally:
        os.environ.pop("MDLM_BACKEND") if old is None else os.environ.__setitem__("MDLM_BACKEND", old)
    assert rc == 0
    return d


def test_checkpoints_describe_their_model_and_data(text_run):
    obj, _ = load_training_checkpoint(text_run / "run" / "checkpoints")
    meta = obj["model_meta"]
    assert (meta["vocab_size"], meta["mask_index"], meta["tokenizer"], meta["length"]) == (35, 4, "text8", 32)
    assert meta["data"]["train"] == f"text:{text_run / 'corpus.txt'}" and meta["data"]["mode"] == "wrap"
    assert obj["config"]["model"]["hidden_size"] == 32 and obj["config"]["data"]["tokenizer"] == "text8"


def test_sample_and_eval_need_no_preset(text_run, capsys, tmp_path):
    from mdlm.cli import sample_main
    from mdlm.eval import main as eval_main
    run = text_run / "run"
    out = tmp_path / "s.json"
    assert sample_main(["--checkpoint", str(run), "--num", "2", "--steps", "4", "--device", "cpu",
                        "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(len(r["ids"]) == 32 for r in rows)
    res = tmp_path / "e.json"
    assert eval_main(["--checkpoint", str(run), "--data", f"text:{text_run / 'corpus.txt'}", "--max-blocks", "4",
                      "--batch-size", "4", "--device", "cpu", "--json", str(res)]) == 0
    r = json.loads(res.read_text())
    assert r["checkpoint"]["config_from_checkpoint"] is True and r["config"]["vocab_size"] == 35
    assert r["nelbo"]["sequences"] == 4 and r["nelbo"]["nelbo"] > 0
    # the same weights through the API
    model = mdlm.from_pretrained(run)
    assert model.vocab_size == 35 and model.mask_index == 4 and not model.training
    capsys.readouterr()


def test_an_earlier_training_checkpoint_without_model_meta_or_newer_keys_loads(text_run, tmp_path, capsys):
    """Training checkpoints written before this change hold ``config`` but no ``model_meta``, and a config
    written before a key existed lacks that key: both rebuild from the file (the vocabulary from its tokenizer,
    missing keys at today's defaults)."""
    from mdlm.cli import sample_main
    obj, _ = load_training_checkpoint(text_run / "run" / "checkpoints")
    del obj["model_meta"]
    del obj["config"]["loss_impl"], obj["config"]["sampling"]["steps"]
    torch.save(obj, tmp_path / "v1.ckpt")
    assert sample_main(["--checkpoint", str(tmp_path / "v1.ckpt"), "--num", "1", "--steps", "2", "--device", "cpu"]) == 0
    model, info = mdlm.load_model(tmp_path / "v1.ckpt")
    assert info["config_from_checkpoint"] and model.vocab_size == 35 and model.config.loss_impl == "auto"
    capsys.readouterr()


def test_a_contradicting_preset_names_both_configs(text_run, capsys):
    from mdlm.cli import sample_main
    from mdlm.eval import main as eval_main
    run = str(text_run / "run")
    assert sample_main(["--checkpoint", run, "--preset", "small", "--num", "1"]) == 2
    err = capsys.readouterr().err
    assert "hidden 32, 1 blocks" in err and "hidden 768, 12 blocks" in err and "drop --preset" in err
    with pytest.raises(SystemExit) as e:
        eval_main(["--checkpoint", run, "--preset", "small", "--samples", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "hidden 768" in err and len(err.strip().splitlines()) == 1 and "usage" not in err
    assert sample_main(["--checkpoint", run, "--data", "lm1b", "--num", "1"]) == 2       # tokenizer mismatch
    assert "'text8'" in (err := capsys.readouterr().err) and "bert-base-uncased" in err


def test_a_checkpoint_without_config_loads_from_the_flags_as_before(text_run, tmp_path, capsys):
    from mdlm.cli import sample_main
    model = mdlm.from_pretrained(text_run / "run", use_ema=False)
    old = tmp_path / "old.ckpt"
    mdlm.save_published_checkpoint(model, old)           # weights only: no config, no model_meta
    # without flags: the small preset (here with the text8 tokenizer, whose files need no data folder)
    assert sample_main(["--checkpoint", str(old), "--num", "1", "--steps", "2", "--no-ema", "data.tokenizer=text8"]) == 2
    err = capsys.readouterr().err
    assert "holds no model config" in err and "--preset" in err and "hidden 768" in err, err
    flags = ["--preset", "tiny", "--data", f"text:{text_run / 'corpus.txt'}",
             *[t for t in TINY[2:] if t.startswith(("model.", "data."))]]
    assert sample_main(["--checkpoint", str(old), "--num", "1", "--steps", "2", "--no-ema", "--device", "cpu",
                        *flags]) == 0
    # a self-describing published-layout file (save_published_checkpoint(config=...)) needs no flags
    described = tmp_path / "described.ckpt"
    mdlm.save_published_checkpoint(model, described, config=model.config)
    assert sample_main(["--checkpoint", str(described), "--num", "1", "--steps", "2", "--no-ema",
                        "--device", "cpu"]) == 0


# --------------------------------------------------------------------------------------------------- progress
def test_progress_lines_without_a_terminal(monkeypatch):
    from mdlm import train as T
    clock = [0.0]
    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    lines = []
    bar = T._Progress(100, False, lines.append, every=10, start=0, tokens=0)
    assert not bar.tty
    for step in range(1, 26):                              # 1 s per step
        clock[0] += 1.0
        bar.update(step, {"loss": 5.0, "lr": 1e-3, "tokens": 100 * step})
    assert [ln.split()[1] for ln in lines] == ["1/100", "10/100", "20/100"]
    assert "~1m20s left" in lines[-1] and "100 tok/s" in lines[-1] and "20s elapsed" in lines[-1]
    clock[0] += 45.0                                       # a slow step: a line although 26 % 10 != 0
    bar.update(26, {"loss": 5.0, "lr": 1e-3, "tokens": 2600})
    assert lines[-1].startswith("step 26/100")
    quiet = []
    T._Progress(10, None, quiet.append).update(1, {"loss": 1.0, "lr": 0.0, "tokens": 1})
    assert quiet == []                                    # other ranks print nothing


def test_a_cpu_run_that_would_take_hours_points_to_quick(tmp_path, monkeypatch):
    from mdlm import train as T
    V = 51
    cfg = mdlm.preset("tiny", **{"model.length": 16, "model.hidden_size": 32, "model.n_heads": 2,
                                 "model.cond_dim": 16, "model.n_blocks": 1, "loader.global_batch_size": 2,
                                 "trainer.max_steps": 3, "trainer.val_every": 0, "trainer.save_every": 0,
                                 "trainer.num_samples": 0, "trainer.progress": False, "trainer.out_dir": str(tmp_path)})
    g = torch.Generator().manual_seed(0)
    lines = []
    t = T.Trainer(cfg, torch.randint(0, V - 1, (8, 16), generator=g), torch.randint(0, V - 1, (2, 16), generator=g),
                  model=mdlm.MDLM(cfg, V), log=lines.append)
    monkeypatch.setattr(T._Progress, "eta", lambda self, step, now: 7200.0)
    t.fit()
    hints = [ln for ln in lines if "--quick" in ln]
    assert len(hints) == 1 and "~2h00m" in hints[0], lines


# ---------------------------------------------------------------------------------------------- second Ctrl-C
def test_second_signal_forces_an_exit_without_saving(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    script = textwrap.dedent(f"""
        import sys, time
        import mdlm.train as T
        orig = T.Trainer.train_step
        def slow(self):
            rec = orig(self)
            if self.state.step == 2:
                print("READY", file=sys.stderr, flush=True)
                time.sleep(60)          # a long step: the first signal waits for it, the second must not
            return rec
        T.Trainer.train_step = slow
        sys.exit(T.main({["--data", f"text:{tmp_path / 'corpus.txt'}", *TINY, "trainer.max_steps=5",
                          f"trainer.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]!r}))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    err = ""
    t0 = time.time()
    while "READY" not in err and time.time() - t0 < 120:
        line = p.stderr.readline()
        if not line and p.poll() is not None:
            break
        err += line
    assert "READY" in err, err[-2000:]
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    try:
        _, rest = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("a second SIGINT did not stop the run")
    err += rest
    assert p.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "again: stopping now" in err and "interrupted at step" not in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob("checkpoints/step_*.ckpt"))    # nothing saved


def test_first_signal_handler_then_second_raises(tmp_path):
    from mdlm import train as T
    t = T.Trainer.__new__(T.Trainer)                      # only the handler's state
    t._stop_signal, t.is_main, t.ckpt_dir = None, True, tmp_path
    said = []
    t._log_fn = said.append
    t._on_signal(signal.SIGINT, None)
    assert t._stop_signal == signal.SIGINT and "send it again" in said[-1]
    with pytest.raises(T.ForcedStop) as e:
        t._on_signal(signal.SIGINT, None)
    assert e.value.signum == signal.SIGINT and isinstance(e.value, KeyboardInterrupt)


# -------------------------------------------------------------------------------------------------- extension
def test_an_unbuilt_source_tree_warns_once_on_import(tmp_path):
    """A checkout whose mdlm_kernels has no _C (python started in a checkout after `pip install .`)."""
    import shutil
    src = tmp_path / "checkout"
    shutil.copytree(REPO / "mdlm_kernels", src / "mdlm_kernels",
                    ignore=shutil.ignore_patterns("_C*", "*.so", "__pycache__", "_C_resources.json"))
    (src / "csrc").mkdir()
    (src / "setup.py").write_text("# checkout marker\n")
    # as after a non-editable install: drop an editable install's import hook (this test environment's), which
    # would otherwise resolve mdlm_kernels._C to the development tree's build
    code = ("import sys, warnings; warnings.simplefilter('default')\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "import mdlm_kernels, mdlm_kernels._ext as e\n"
            "assert mdlm_kernels.__file__.startswith(sys.argv[1]), mdlm_kernels.__file__\n"
            "assert not e.warn_if_unbuilt_source_tree()\n"                 # once
            "print(mdlm_kernels.available()['extension'])")
    r = subprocess.run([sys.executable, "-c", code, str(src)], cwd=src, env=_env(PYTHONPATH=str(src)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False" and r.stderr.count("RuntimeWarning") == 1, r.stderr
    assert "without its compiled extension" in r.stderr and "pip install --no-build-isolation -e ." in r.stderr


def test_the_source_tree_warning_needs_a_checkout_without_the_extension(monkeypatch):
    from mdlm_kernels import _ext
    import importlib.util
    monkeypatch.setattr(_ext, "_warned_source_tree", False)
    monkeypatch.setattr(_ext, "source_tree", lambda: None)                  # an installed package
    assert not _ext.warn_if_unbuilt_source_tree()
    monkeypatch.setattr(_ext, "source_tree", lambda: "/checkout")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # built in place
    assert not _ext.warn_if_unbuilt_source_tree()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.warns(RuntimeWarning, match="source tree /checkout"):
        assert _ext.warn_if_unbuilt_source_tree()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _ext.warn_if_unbuilt_source_tree()


@pytest.mark.parametrize("build,what", [("missing", "mdlm_kernels._C is not available"),
                                        ("cpu_only", "built without CUDA")])
def test_a_cuda_fallback_for_a_missing_or_cpu_only_build_is_announced_once(monkeypatch, build, what):
    from mdlm_kernels import _ext
    from mdlm_kernels import backend as kb
    monkeypatch.setattr(kb, "_WARNED", set())
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    if build == "missing":
        monkeypatch.setattr(_ext, "available", lambda: False)
        monkeypatch.setattr(_ext, "error", lambda: "ModuleNotFoundError: No module named 'mdlm_kernels._C'")
    else:
        monkeypatch.setattr(_ext, "available", lambda: True)
        monkeypatch.setattr(_ext, "cuda_compiled", lambda: False)
    every = {"cpp": None, "triton": None, "reference": None}
    with pytest.warns(RuntimeWarning, match=f"not used on cuda:0 .*{what}") as said:
        assert kb.resolve("some_op", None, "cuda:0", every) == "triton"
    assert ("pip install --no-build-isolation -e ." in str(said[0].message)) == (build == "missing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # once per device
        assert kb.resolve("other_op", None, "cuda:0", every) == "triton"
        assert kb.resolve("some_op", None, "cpu", {"reference": None}) == "reference"   # CPU: nothing to say


@pytest.mark.cuda
def test_on_a_gpu_an_op_falling_back_from_a_cpu_only_build_says_so_once(monkeypatch):
    """The same on a real device: a real op's automatic dispatch on CUDA tensors (owed: no GPU here)."""
    import mdlm_kernels as mk
    from mdlm_kernels import _ext
    from mdlm_kernels import backend as kb
    monkeypatch.setattr(kb, "_WARNED", set())
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    monkeypatch.setattr(_ext, "cuda_compiled", lambda: False)       # as a build without nvcc
    with pytest.warns(RuntimeWarning, match="not used on cuda:.*built without CUDA"):
        u = mk.philox_uniform(2, 8, seed=1, device="cuda")
    assert u.is_cuda and kb.last_used["philox_uniform"] in ("triton", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mk.philox_uniform(2, 8, seed=2, device="cuda")


# ------------------------------------------------------------------------------------------------ small points
def test_the_sampler_error_lists_every_sampler():
    cfg = mdlm.preset("tiny", **{"model.length": 8, "model.hidden_size": 16, "model.n_heads": 2,
                                 "model.cond_dim": 8, "model.n_blocks": 1})
    model = mdlm.MDLM(cfg, 11).eval()
    for impl in ("auto", "reference"):
        with pytest.raises(ValueError) as e:
            mdlm.sample(model, 1, steps=2, sampler="nosuch", impl=impl)
        for name in ("ddpm", "ddpm_cache", "analytic", "first_hitting", "confidence"):
            assert repr(name) in str(e.value), str(e.value)


def test_eval_errors_are_one_line(tmp_path, capsys):
    from mdlm.eval import main as eval_main
    with pytest.raises(SystemExit) as e:
        eval_main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--samples", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines() == [f"mdlm eval: error: checkpoint "
                                                             f"'{tmp_path / 'missing.ckpt'}' does not exist"]


def test_throughput_chart_and_messages(tmp_path, capsys, monkeypatch):
    from bench_loader import load_bench
    tp = load_bench("throughput")
    monkeypatch.setattr(tp, "matmul_ceiling", lambda *a, **k: 1e12)    # not what this test is about
    rows = [{"provider": "a", "tokens_per_s": 1000.0, "median_s": 0.1, "q1_s": 0.08, "q3_s": 0.125},
            {"provider": "b", "tokens_per_s": 500.0, "median_s": 0.2, "q1_s": 0.2, "q3_s": 0.25}]
    names, tps, lo, hi, labels = tp._chart_data(rows)
    assert names == ["a", "b"] and labels == ["1,000", "500"]
    assert lo == pytest.approx([200.0, 100.0]) and hi == pytest.approx([250.0, 0.0])   # 100 tokens/step / q3, q1
    assert tp._plot(rows, tmp_path / "c.png", "t") == tmp_path / "c.png" and (tmp_path / "c.png").stat().st_size
    args = ["--device", "cpu", "--preset", "tiny", "--batch", "1", "--length", "8", "--steps", "1", "--warmup", "0",
            "--providers", "reference", "--out", str(tmp_path), "--tag", "r"]
    assert tp.main(args) == 0
    out = capsys.readouterr().out
    assert f"# wrote {tmp_path / 'r.png'}" in out and "replacing" not in out
    assert tp.main(args) == 0
    assert "replacing the results of an earlier run" in capsys.readouterr().out
