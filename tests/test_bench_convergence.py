"""bench/convergence.py runs end to end on CPU (tiny shapes) and the fused and reference curves agree.

Tolerance: both providers train the same initial weights on the same batches with the same masking draws
and dropout 0, so their per-step training losses differ only by fp32 summation order: the fused
linear-cross-entropy (masked rows, MASK column dropped) vs log-softmax over (B, L, V) logits and a gather.
That is ~1e-7 relative per loss value (measured: max 2e-7 over 30 steps of the tiny preset), and lr 3e-4
keeps the weight updates' rounding differences from growing much over a few steps. ``LOSS_RTOL`` = 1e-5
(about 100 fp32 ulps) leaves a wide margin for thread-count and BLAS-dependent summation orders while
still catching any real difference in the math (a changed draw, weight or reduction moves the loss by
far more than 1e-3 relative).
"""
import json
import math

import pytest

from bench_loader import load_bench

LOSS_RTOL = 1e-5   # per-step relative agreement of the two training-loss curves (fp32, CPU)
STEPS, EVAL_EVERY = 6, 3


def _load():
    return load_bench("convergence")


def _need_corpus():
    from mdlm.data import data_dir
    d = data_dir(required=False)
    if d is None or not (d / "corpora" / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip("shipped corpus shared/data/corpora/tinyshakespeare not found (set MDLM_DATA_DIR)")
    pytest.importorskip("tokenizers", reason="the GPT-2 tokenizer needs the 'tokenizers' package")


def test_convergence_smoke(tmp_path, monkeypatch):
    _need_corpus()
    # the kernels' PyTorch backends: the Triton interpreter is far too slow to train with
    monkeypatch.setenv("MDLM_BACKEND", "reference")
    cv = _load()
    rc = cv.main(["--device", "cpu", "--preset", "tiny", "--override", "model.hidden_size=64",
                  "--override", "model.n_blocks=1", "--batch", "4", "--length", "32", "--max-steps", str(STEPS),
                  "--eval-every", str(EVAL_EVERY), "--val-blocks", "8", "--warmup", "2", "--target-ppl", "0",
                  "--compare-steps", str(STEPS), "--out", str(tmp_path), "--tag", "c"])
    assert rc == 0
    res = json.loads((tmp_path / "c.json").read_text())
    rows = {r["provider"]: r for r in res["results"]}
    assert list(rows) == ["fused", "reference"]
    assert rows["reference"]["block_kernels"] is False
    for r in rows.values():
        assert "error" not in r
        assert r["steps"] == STEPS and len(r["train_loss"]) == STEPS
        assert [e["step"] for e in r["evals"]] == [0, 3, 6]
        assert all(math.isfinite(e["val_ppl"]) and e["val_ppl"] > 1 for e in r["evals"])
        assert math.isfinite(r["final_val_ppl"]) and r["tokens_per_s"] > 0
        assert r["steps_to_target"] is None and r["time_to_target_s"] is None  # --target-ppl 0: never stops early
    f, ref = rows["fused"]["train_loss"], rows["reference"]["train_loss"]
    for step, (a, b) in enumerate(zip(f, ref)):
        assert a == pytest.approx(b, rel=LOSS_RTOL), (step, a, b)
    # the same fixed validation draws: the step-0 evaluation (identical weights) agrees too
    assert rows["fused"]["evals"][0]["val_nelbo"] == pytest.approx(rows["reference"]["evals"][0]["val_nelbo"],
                                                                   rel=LOSS_RTOL)
    agree = res["curve_agreement"]
    assert agree["steps_compared"] == STEPS and agree["max_rel_diff"] <= LOSS_RTOL
    env = res["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["date"]
    assert res["config_overrides"]["model.dropout"] == 0.0


def test_convergence_stops_at_target(tmp_path, monkeypatch):
    """A target above the untrained model's PPL (~V) is met at the first evaluation after step 0."""
    _need_corpus()
    monkeypatch.setenv("MDLM_BACKEND", "reference")
    cv = _load()
    rc = cv.main(["--device", "cpu", "--override", "model.hidden_size=32", "--override", "model.n_blocks=1",
                  "--batch", "2", "--length", "16", "--max-steps", "5", "--eval-every", "2", "--val-blocks", "2",
                  "--providers", "reference", "--target-ppl", "1e9", "--out", str(tmp_path), "--tag", "s"])
    assert rc == 0
    (r,) = json.loads((tmp_path / "s.json").read_text())["results"]
    assert r["steps"] == 2 and r["steps_to_target"] == 2 and r["time_to_target_s"] > 0


def test_convergence_without_corpus_exits_nonzero(tmp_path, monkeypatch, capsys):
    import mdlm.data
    monkeypatch.setattr(mdlm.data, "data_dir", lambda required=True: None)
    cv = _load()
    rc = cv.main(["--device", "cpu", "--max-steps", "1", "--out", str(tmp_path)])
    assert rc != 0
    assert "Tiny Shakespeare corpus" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_convergence_rejects_unknown_provider():
    cv = _load()
    with pytest.raises(SystemExit):
        cv.parse_args(["--providers", "fused_magic"])
