"""The trainer (mdlm.train): recipe pieces, resume exactness, non-finite guard, checkpoint faults, CLI.

Exactness claims are bitwise: a resumed run must reproduce the uninterrupted run's per-step loss (a JSON
float round-trips exactly) and weights. The multi-process comparison (DDP on gloo vs one process with
gradient accumulation) differs only by the order of the gradient sum: losses and weights agree to
``DIST_RTOL`` / ``DIST_ATOL`` (fp32).
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mdlm
from mdlm.checkpoint import CheckpointError, load_training_checkpoint, save_training_checkpoint
from mdlm.train import EMA, NonFiniteError, Trainer, lr_factor, micro_seed

DIST_RTOL, DIST_ATOL = 1e-5, 1e-6
REPO = Path(__file__).resolve().parent.parent
V = 51  # 50 tokens + MASK for the in-process tests


def _cfg(out_dir, **over):
    base = {"model.length": 16, "model.hidden_size": 32, "model.n_heads": 2, "model.cond_dim": 16,
            "model.n_blocks": 1, "loader.global_batch_size": 4, "loader.batch_size": 2, "trainer.max_steps": 6,
            "trainer.log_every": 1, "trainer.val_every": 0, "trainer.save_every": 2, "trainer.out_dir": str(out_dir),
            "lr_scheduler.warmup_steps": 2, "trainer.num_samples": 0, "trainer.progress": False}
    base.update(over)
    return mdlm.preset("tiny", **base)


def _data(n=40, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V - 1, (n, L), generator=g), torch.randint(0, V - 1, (6, L), generator=g)


def _trainer(cfg, resume="auto"):
    train, val = _data()
    torch.manual_seed(0)
    return Trainer(cfg, train, val, model=mdlm.MDLM(cfg, V), resume=resume, log=lambda m: None)


def _losses(run_dir):
    recs = [json.loads(x) for x in (Path(run_dir) / "log.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


# ------------------------------------------------------------------------------------------ recipe
def test_lr_schedules():
    cfg = _cfg("unused", **{"lr_scheduler.warmup_steps": 4})
    assert [lr_factor(cfg, s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    cfg = _cfg("unused", **{"lr_scheduler.type": "cosine_decay_warmup", "trainer.max_steps": 100})
    lr = cfg.optim.lr
    assert lr_factor(cfg, 0) * lr == pytest.approx(1e-6)                       # warmup_lr_init
    assert lr_factor(cfg, 10) == pytest.approx(1.0)                            # end of the 10% warm-up
    assert lr_factor(cfg, 55) * lr == pytest.approx(1e-6 + 0.5 * (lr - 1e-6))   # half-way down the cosine
    assert lr_factor(cfg, 100) * lr == pytest.approx(1e-6)
    cfg = _cfg("unused", **{"lr_scheduler.type": "cosine_decay_warmup", "trainer.max_steps": 7})
    assert lr_factor(cfg, 0) * lr == pytest.approx(1e-6)                       # warm-up of 0.7 steps (timm: float)
    assert lr_factor(cfg, 1) * lr == pytest.approx(1e-6 + 0.5 * (lr - 1e-6) * (1 + math.cos(math.pi * 0.3 / 6.3)))
    with pytest.raises(ValueError, match="lr_scheduler.type"):
        lr_factor(_cfg("unused", **{"lr_scheduler.type": "nope"}), 0)


def test_ema_matches_published_update_loop():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ema = EMA(params, 0.9999)
    shadow = [p.detach().clone() for p in params]
    for n in range(1, 30):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.update()
        decay = min(0.9999, (1 + n) / (10 + n))                 # published ExponentialMovingAverage.update
        for s, p in zip(shadow, params):
            s.sub_((1.0 - decay) * (s - p.detach()))
    for a, b in zip(ema.shadow, shadow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    live = [p.detach().clone() for p in params]
    with ema.averaged():
        assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow))
    assert all(torch.equal(p, s) for p, s in zip(params, live))


def test_micro_seeds_distinct_and_stable():
    seeds = {micro_seed(1, g) for g in range(10000)} | {micro_seed(1, g, stream=1) for g in range(10000)}
    assert len(seeds) == 20000 and all(0 <= s < 2 ** 62 for s in seeds)
    assert micro_seed(7, 3) == micro_seed(7, 3) != micro_seed(8, 3)


def test_bad_config_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        _trainer(_cfg(tmp_path, **{"loader.global_batch_size": 5}))
    with pytest.raises(ValueError, match="precision"):
        _trainer(_cfg(tmp_path, **{"trainer.precision": "fp8"}))
    with pytest.raises(ValueError, match="strategy"):
        _trainer(_cfg(tmp_path, **{"trainer.strategy": "zero"}))
    with pytest.raises(ValueError, match="length"):
        _trainer(_cfg(tmp_path, **{"model.length": 32}))


# ---------------------------------------------------------------------------------- resume, in process
def test_run_writes_log_checkpoints_summary_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    t = _trainer(_cfg(full, **{"trainer.val_every": 3}))
    summary = t.fit()
    ref = _losses(full)
    assert [s for s, _ in ref] == list(range(1, 7)) and all(math.isfinite(x) for _, x in ref)
    assert summary["step"] == 6 and (full / "summary.json").is_file() and (full / "loss_curve.png").is_file()
    recs = [json.loads(x) for x in (full / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "val_nelbo" in r] == [0, 3, 6]
    assert sorted(os.listdir(full / "checkpoints")) == ["latest", "step_00000004.ckpt", "step_00000004.json",
                                                        "step_00000006.ckpt", "step_00000006.json"]
    # the training checkpoint also loads as a published checkpoint (weights + EMA) for eval / sampling
    m = mdlm.MDLM(_cfg(full), V)
    report = mdlm.load_published_checkpoint(m, full / "checkpoints" / "step_00000006.ckpt")
    assert report["ema"] and report["global_step"] == 6

    part = tmp_path / "part"
    _trainer(_cfg(part, **{"trainer.max_steps": 4})).fit()
    t2 = _trainer(_cfg(part))                  # resumes at step 4 from part/checkpoints
    assert t2.state.step == 4 and t2.sampler.global_index == 8
    t2.fit()
    assert _losses(part) == ref                # bitwise: same data order, draws, optimizer and LR state
    for a, b in zip(t.model.parameters(), t2.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(t.ema.shadow, t2.ema.shadow):
        assert torch.equal(a, b)


def test_corrupt_checkpoint_named_and_fallback(tmp_path):
    run = tmp_path / "run"
    _trainer(_cfg(run, **{"trainer.max_steps": 4})).fit()
    ckpts = run / "checkpoints"
    newest = ckpts / "step_00000004.ckpt"
    with open(newest, "r+b") as f:                # flip bytes in the middle: size unchanged, hash differs
        f.seek(newest.stat().st_size // 2)
        f.write(b"\x00garbage\x00")
    with pytest.raises(CheckpointError, match="step_00000004.ckpt.*corrupt"):
        load_training_checkpoint(ckpts)
    obj, path = load_training_checkpoint(ckpts, fallback=True)
    assert path.endswith("step_00000002.ckpt") and obj["global_step"] == 2
    with open(newest, "r+b") as f:                # truncated
        f.truncate(100)
    with pytest.raises(CheckpointError, match="step_00000004.ckpt.*truncated"):
        load_training_checkpoint(newest)
    (ckpts / "step_00000004.json").unlink()        # no manifest: torch.load's own error, file named
    with pytest.raises(CheckpointError, match="step_00000004.ckpt"):
        load_training_checkpoint(newest)
    msgs = []
    train, val = _data()
    with pytest.raises(CheckpointError, match="step_00000004.ckpt"):       # fallback turned off: stop, named
        Trainer(_cfg(run, **{"trainer.resume_fallback": False}), train, val, model=mdlm.MDLM(_cfg(run), V))
    t = Trainer(_cfg(run), train, val, model=mdlm.MDLM(_cfg(run), V), log=msgs.append)
    assert t.state.step == 2 and any("skipping checkpoint" in m for m in msgs)
    with pytest.raises(CheckpointError, match="does_not_exist.*does not exist"):
        load_training_checkpoint(tmp_path / "does_not_exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found in .*empty"):
        load_training_checkpoint(tmp_path / "empty")


def test_save_leaves_previous_checkpoint_until_complete(tmp_path):
    d = tmp_path / "ck"
    save_training_checkpoint(d, {"x": torch.ones(3)}, 1)

    class Boom(Exception):
        pass

    def hook(stage):
        if stage == "partial":
            raise Boom

    with pytest.raises(Boom):
        save_training_checkpoint(d, {"x": torch.zeros(3)}, 2, _fault_hook=hook)
    obj, path = load_training_checkpoint(d)
    assert path.endswith("step_00000001.ckpt") and torch.equal(obj["x"], torch.ones(3))
    assert not any(".tmp." in n for n in os.listdir(d)) and not (d / "step_00000002.ckpt").exists()


# ------------------------------------------------------------------------------------ non-finite guard
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    run = tmp_path / "nan"
    cfg = _cfg(run, **{"trainer.max_steps": 12, "trainer.max_nonfinite": 3, "trainer.save_every": 1})
    t = _trainer(cfg)
    real_loss = t.model.loss
    bad_steps = {3, 6, 7, 8}        # 1-based steps whose loss is NaN; 6, 7, 8 in a row stops the run

    def loss(*a, **k):
        out = real_loss(*a, **k)
        if t.state.step + 1 in bad_steps:
            out = out._replace(loss=out.loss * float("nan"))
        return out

    t.model.loss = loss
    before = {}

    def snapshot():
        before[t.state.step] = [p.detach().clone() for p in t.model.parameters()]

    orig = t.train_step

    def step():
        snapshot()
        return orig()

    t.train_step = step
    with pytest.raises(NonFiniteError, match="stopping at step 8: 3 consecutive"):
        t.fit()
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in recs if "skipped" in r]
    assert skipped == [3, 6, 7, 8] and t.state.nonfinite_total == 4
    # a skipped step leaves weights, optimizer steps and EMA updates as they were
    assert t.state.optimizer_steps == 4 and t.ema.num_updates == 4
    for p, q in zip(t.model.parameters(), before[7]):
        assert torch.equal(p, q)
    # the stop writes no checkpoint over the last good one (step 7 was saved by save_every=1 before
    # step 8; step 8's state is not saved)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000007.ckpt"


def test_nonfinite_gradient_detected(tmp_path):
    t = _trainer(_cfg(tmp_path / "g", **{"trainer.max_steps": 1}))
    w = t.model.backbone.output_layer.linear.weight
    w.register_hook(lambda g: g * float("inf"))
    rec = t.train_step()
    assert rec["skipped"] == "non-finite gradient" and t.state.optimizer_steps == 0


def _opt_snapshot(t):
    """Everything a skipped step must leave as it was: weights, AdamW state (moments and step counters), EMA
    shadow and count, the LR schedule."""
    st = [(v["exp_avg"].clone(), v["exp_avg_sq"].clone(), v["step"].clone()) for v in t.optimizer.state.values()]
    return {"params": [p.detach().clone() for p in t.model.parameters()], "state": st,
            "shadow": [s.clone() for s in t.ema.shadow], "ema_n": t.ema.num_updates,
            "lr": t.optimizer.param_groups[0]["lr"], "sched": t.scheduler.last_epoch}


def _bitwise(a, b):
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def test_a_skipped_step_leaves_weights_optimizer_state_step_counts_ema_and_lr_untouched(tmp_path):
    t = _trainer(_cfg(tmp_path / "s", **{"trainer.max_steps": 4, "trainer.save_every": 0}))
    ref = _trainer(_cfg(tmp_path / "r", **{"trainer.max_steps": 4, "trainer.save_every": 0}))
    for _ in range(2):
        t.train_step()
        ref.train_step()
    before = _opt_snapshot(t)
    real_loss = t.model.loss

    def nan_loss(*a, **k):
        out = real_loss(*a, **k)
        return out._replace(loss=out.loss * float("nan"))

    t.model.loss = nan_loss
    rec = t.train_step()
    t.model.loss = real_loss
    after = _opt_snapshot(t)
    assert rec["skipped"] == "non-finite loss" and t.state.optimizer_steps == 2
    assert all(_bitwise(a, b) for a, b in zip(after["params"], before["params"]))
    for now, was in zip(after["state"], before["state"]):
        assert all(_bitwise(a, b) for a, b in zip(now, was))
    assert all(v[2].item() == 2 for v in after["state"])                 # step counters: 2 applied updates
    assert all(torch.equal(a, b) for a, b in zip(after["shadow"], before["shadow"]))
    assert (after["ema_n"], after["lr"], after["sched"]) == (before["ema_n"], before["lr"], before["sched"])
    # the next good step is the reference's third step: same bias corrections, EMA decay and LR (the data
    # position moved on by one step, so the reference skips those micro-batches too)
    ref.sampler.next(), ref.sampler.next()
    t.train_step()
    ref.train_step()
    for a, b in zip(list(t.model.parameters()) + t.ema.shadow, list(ref.model.parameters()) + ref.ema.shadow):
        assert _bitwise(a.detach(), b.detach())


def test_checkpoint_with_the_earlier_foreach_optimizer_state_resumes(tmp_path):
    """The earlier trainer ran torch.optim.AdamW(foreach=True) on CPU: its checkpoints hold that optimizer's
    state dict (flags foreach=True, fused=None). They resume: same moments and step counters, fused stepping."""
    run = tmp_path / "run"
    _trainer(_cfg(run, **{"trainer.max_steps": 2})).fit()
    obj, _ = load_training_checkpoint(run / "checkpoints")
    for g in obj["optimizer"]["param_groups"]:
        g.update(foreach=True, fused=None)
    for v in obj["optimizer"]["state"].values():
        v["step"] = torch.tensor(float(v["step"]))       # a host tensor, as foreach AdamW keeps it
    save_training_checkpoint(run / "checkpoints", obj, 3)
    t = _trainer(_cfg(run, **{"trainer.max_steps": 4}))
    assert t.state.step == 2
    g0 = t.optimizer.param_groups[0]
    assert g0["fused"] is True and g0["foreach"] is False
    saved = list(obj["optimizer"]["state"].values())
    for v, w in zip(t.optimizer.state.values(), saved):
        assert torch.equal(v["exp_avg"], w["exp_avg"]) and v["step"].dtype == torch.float32 and v["step"].item() == 2
    rec = t.train_step()
    assert "skipped" not in rec and t.state.optimizer_steps == 3
    assert all(v["step"].item() == 3 for v in t.optimizer.state.values())


# ------------------------------------------------------------------------------ subprocess: CLI, kill
def _shipped_corpus():
    d = mdlm.data.data_dir(required=False)
    if d is None or not (d / "corpora" / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip("shipped corpus shared/data/corpora/tinyshakespeare not found (set MDLM_DATA_DIR)")
    pytest.importorskip("tokenizers", reason="the GPT-2 tokenizer needs the 'tokenizers' package")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MDLM_BACKEND")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"          # the same thread count in every process: bitwise-equal CPU math
    env.update(extra)
    return env


CLI_TINY = ["--preset", "tiny", "--data", "tinyshakespeare", "model.length=32", "model.hidden_size=32",
            "model.n_heads=2", "model.cond_dim=16", "model.n_blocks=1", "loader.global_batch_size=4",
            "trainer.log_every=1", "lr_scheduler.warmup_steps=2", "optim.lr=3e-3", "trainer.num_samples=1",
            "trainer.sample_steps=4", "trainer.val_blocks=8"]


def _train_cmd(out_dir, cache, *extra):
    return [sys.executable, "-m", "mdlm", "train", *CLI_TINY, f"trainer.out_dir={out_dir}",
            f"data.cache_dir={cache}", *extra]


@pytest.fixture(scope="module")
def shard_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shards")


def test_cli_train_tinyshakespeare_progress_checkpoints_and_val_ppl_falls(tmp_path, shard_cache):
    _shipped_corpus()
    out = tmp_path / "run"
    r = subprocess.run(_train_cmd(out, shard_cache, "trainer.max_steps=30", "trainer.val_every=15",
                                  "trainer.save_every=10"),
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 30/30" in r.stderr and "tok/s" in r.stderr
    vals = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if "val_ppl" in x]
    assert [v["step"] for v in vals] == [0, 15, 30]
    assert vals[-1]["val_ppl"] < 0.5 * vals[0]["val_ppl"], vals       # ~50k (uniform) -> well below
    assert (out / "checkpoints" / "latest").read_text() == "step_00000030.ckpt"
    assert (out / "loss_curve.png").is_file() and (out / "samples.jsonl").is_file()


def _run_until(cmd, env, kill_after=None):
    """Run ``cmd``; with ``kill_after`` seconds, SIGKILL it then (if still running). Returns the rc."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        return 0
    try:
        p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
    p.stderr.close()
    return p.returncode


def test_sigkill_anywhere_including_during_save_resumes_to_the_same_losses(tmp_path, shard_cache):
    _shipped_corpus()
    steps = ["trainer.max_steps=16", "trainer.save_every=2", "trainer.val_every=0", "trainer.num_samples=0"]
    ref = tmp_path / "ref"
    _run_until(_train_cmd(ref, shard_cache, *steps), _env())
    expected = _losses(ref)
    assert len(expected) == 16

    # 1. killed inside a save, at each write stage, then restarted without the fault
    run = tmp_path / "faults"
    for step, stage in ((4, "partial"), (8, "written"), (12, "manifest")):
        rc = _run_until(_train_cmd(run, shard_cache, *steps), _env(_MDLM_FAULT_INJECT=f"save:{step}:{stage}"),
                        kill_after=300)
        assert rc == -signal.SIGKILL, f"fault save:{step}:{stage} did not fire (rc {rc})"
    _run_until(_train_cmd(run, shard_cache, *steps), _env())
    assert _losses(run) == expected

    # 2. killed from outside at random moments while training (printed, so a failure can be replayed): each
    #    run is killed once the log reaches a random step, after a random 0-60 ms more (mid-step, mid-save)
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng = random.Random(seed)
    run = tmp_path / "random"
    kills = []
    for target in sorted(rng.sample(range(1, 16), 3)):
        jitter = rng.uniform(0.0, 0.06)
        p = subprocess.Popen(_train_cmd(run, shard_cache, *steps), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < 120:
            recs = _losses(run) if (run / "log.jsonl").exists() else []
            if recs and recs[-1][0] >= target:
                time.sleep(jitter)
                break
            time.sleep(0.005)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
        kills.append((target, round(jitter, 3), p.returncode))
    assert any(rc == -signal.SIGKILL for _, _, rc in kills), kills
    _run_until(_train_cmd(run, shard_cache, *steps), _env())
    assert _losses(run) == expected, f"random kills (step, delay, rc) {kills} (seed {seed})"
    ref_w = load_training_checkpoint(ref / "checkpoints")[0]["state_dict"]
    got_w = load_training_checkpoint(run / "checkpoints")[0]["state_dict"]
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


def test_cli_malformed_data_names_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n\xff\xfe broken\n")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    pytest.importorskip("tokenizers", reason="the GPT-2 tokenizer needs the 'tokenizers' package")
    if mdlm.data.data_dir(required=False) is None:
        pytest.skip("shipped tokenizers not found (set MDLM_DATA_DIR)")
    for f, what in ((bad, "UTF-8"), (empty, "empty")):
        r = subprocess.run([sys.executable, "-m", "mdlm", "train", *CLI_TINY, f"data.train=text:{f}",
                            f"data.valid=text:{f}", f"trainer.out_dir={tmp_path / 'o'}",
                            f"data.cache_dir={tmp_path / 'c'}"], env=_env(), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert str(f) in r.stderr and what.lower() in r.stderr.lower(), r.stderr[-2000:]


def test_cli_help_and_user_mistakes_give_messages_not_tracebacks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mdlm"], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "train" in r.stdout
    for args, what in ((["trainer.nope=1"], "trainer.nope"), (["trainer.max_steps"], "key=value"),
                       (["--data", "nosuch"], "nosuch"), ([f"trainer.out_dir={tmp_path / 'f' / 'x'}"], "out_dir")):
        if what == "out_dir":
            (tmp_path / "f").write_text("a file, not a folder")
        r = subprocess.run([sys.executable, "-m", "mdlm", "train", "--preset", "tiny", *args], env=_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "error" in r.stderr and (what in r.stderr or what == "out_dir"), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "mdlm", "sample", "--checkpoint", str(tmp_path / "none.ckpt"),
                        "--preset", "tiny", "model.nope=1"], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "model.nope" in r.stderr, r.stderr[-2000:]


def test_resume_refuses_a_checkpoint_of_another_model_config_and_never_mixes_runs(tmp_path):
    run = tmp_path / "run"
    _trainer(_cfg(run, **{"trainer.max_steps": 2})).fit()
    with pytest.raises(CheckpointError, match="different configuration"):
        train, val = _data()
        cfg = _cfg(run, **{"model.hidden_size": 64})
        Trainer(cfg, train, val, model=mdlm.MDLM(cfg, V), log=lambda m: None)
    with pytest.raises(ValueError, match="earlier run"):
        _trainer(_cfg(run), resume="never")


def _wait_for_steps(log, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.exists() and len(_losses(log.parent)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("run did not reach the step in time")


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_exits_143_and_the_resumed_run_repeats_the_uninterrupted_one(tmp_path, shard_cache, nproc):
    """SIGTERM (to the only process, or to ONE of two DDP workers): every rank stops after the same step,
    saves, exits with 128 + 15; rerunning the command finishes with the uninterrupted run's losses."""
    _shipped_corpus()
    steps = ["trainer.max_steps=30", "trainer.save_every=0", "trainer.val_every=0", "trainer.num_samples=0",
             "loader.batch_size=2"]
    ref = tmp_path / "ref"
    _run_until(_dist_cmd(nproc, ref, shard_cache, *steps), _env())
    run = tmp_path / "run"
    p = subprocess.Popen(_dist_cmd(nproc, run, shard_cache, *steps), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run / "log.jsonl", 3, p)
    target = p.pid if nproc == 1 else _children(p.pid)[-1]
    os.kill(target, signal.SIGTERM)
    try:
        p.wait(timeout=90)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("the run hung after SIGTERM")
    err = p.stderr.read()
    p.stderr.close()
    assert "interrupted at step" in err, err[-2000:]
    if nproc == 1:
        assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = int((run / "checkpoints" / "latest").read_text()[len("step_"):-len(".ckpt")])
    assert 3 <= stopped < 30
    _run_until(_dist_cmd(nproc, run, shard_cache, *steps), _env())
    a, b = _losses(ref), _losses(run)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 31))
    assert a == b    # the same number of processes: bitwise


# --------------------------------------------------------------------------- torchrun: 2 processes, gloo
def _dist_cmd(nproc, out_dir, cache, *extra):
    base = ["-m", "mdlm", "train"] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc_per_node={nproc}", "-m", "mdlm", "train"]
    return [sys.executable, *base, *CLI_TINY, f"trainer.out_dir={out_dir}", f"data.cache_dir={cache}",
            "loader.batch_size=2", "trainer.max_steps=6", "trainer.save_every=0", "trainer.val_every=3",
            "trainer.num_samples=0", *extra]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, shard_cache, strategy):
    _shipped_corpus()
    one, two = tmp_path / "one", tmp_path / "two"
    _run_until(_dist_cmd(1, one, shard_cache), _env())      # 1 process: micro-batch 2 x 2 accumulation
    _run_until(_dist_cmd(2, two, shard_cache, f"trainer.strategy={strategy}"), _env())   # 2 x micro-batch 2
    a, b = _losses(one), _losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=DIST_RTOL, abs=DIST_ATOL)
    va = [json.loads(x)["val_nelbo"] for x in (one / "log.jsonl").read_text().splitlines() if "val_nelbo" in x]
    vb = [json.loads(x)["val_nelbo"] for x in (two / "log.jsonl").read_text().splitlines() if "val_nelbo" in x]
    assert va == pytest.approx(vb, rel=DIST_RTOL, abs=DIST_ATOL)
    wa = load_training_checkpoint(one / "checkpoints")[0]
    wb = load_training_checkpoint(two / "checkpoints")[0]
    for k, v in wa["state_dict"].items():
        torch.testing.assert_close(wb["state_dict"][k], v, rtol=DIST_RTOL, atol=DIST_ATOL)
    for x, y in zip(wa["ema"]["shadow_params"], wb["ema"]["shadow_params"]):
        torch.testing.assert_close(y, x, rtol=DIST_RTOL, atol=DIST_ATOL)
    assert wb["world_size"] == 2 and wb["data"]["consumed"] == wa["data"]["consumed"] == 12


def test_compiled_loss_trains_like_eager(tmp_path):
    """trainer.compile=true (torch.compile of the loss module, fused loss path with a dynamic masked-row
    count): the same losses as eager for the same draws (dropout off: compiled dropout draws differently)."""
    losses = {}
    for comp in (False, True):
        cfg = _cfg(tmp_path / f"c{int(comp)}", **{"trainer.compile": comp, "model.dropout": 0.0})
        t = _trainer(cfg, resume="never")
        losses[comp] = [t.train_step()["loss"] for _ in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_gradient_accumulation_averages_the_micro_batch_gradients(tmp_path):
    """With accumulation (global batch 4 = 2 micro-batches of 2) the gradient the optimizer step sees is the mean of
    the micro-batch gradients (each micro-batch's loss is a token mean): the same micro-batches and draws, each
    backpropagated alone, summed and divided by 2. A missing 1/accum scale doubles it (caught here in seconds, not
    only by the two-process test, which needs the shipped data)."""
    t = _trainer(_cfg(tmp_path, **{"trainer.max_steps": 1}), resume="never")
    assert t.accum == 2
    calls, seen = [], {}
    real_forward, real_step = t.forward, t._optimizer_step

    def forward(x0, mask, seed):
        calls.append((x0.clone(), mask.clone(), seed))
        return real_forward(x0, mask, seed)

    def optimizer_step(loss_sum):
        params = [p for p in t.model.parameters() if p.requires_grad]
        seen["accumulated"] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        per_micro = []
        for x0, mask, seed in calls:     # each micro-batch alone, same seeds (dropout and masking draws)
            for p in params:
                p.grad = None
            torch.manual_seed(seed)
            loss, _ = real_forward(x0, mask, seed)
            loss.backward()
            per_micro.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        for p, g in zip(params, seen["accumulated"]):
            p.grad = g.clone()
        seen["expected"] = [sum(gs) / len(calls) for gs in zip(*per_micro)]
        return real_step(loss_sum)

    t.forward, t._optimizer_step = forward, optimizer_step
    t.train_step()
    assert len(calls) == 2
    num = sum(float((a - e).double().pow(2).sum()) for a, e in zip(seen["accumulated"], seen["expected"]))
    den = sum(float(e.double().pow(2).sum()) for e in seen["expected"])
    assert den > 0 and num <= (1e-5) ** 2 * den, (num, den)     # relative L2 distance <= 1e-5
