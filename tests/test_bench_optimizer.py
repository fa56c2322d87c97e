"""bench/bench_optimizer.py (the optimizer step alone: published sequence vs this trainer's step) runs end to end
on CPU with a tiny model and writes one row per variant; unknown variants are rejected."""
import json

import pytest

from bench_loader import load_bench

TINY = ["--vocab", "101", "--iters", "2", "--warmup", "1", "model.hidden_size=32", "model.n_heads=2",
        "model.cond_dim=16", "model.n_blocks=1"]


def test_bench_optimizer_smoke(tmp_path):
    bo = load_bench("bench_optimizer")
    assert bo.main([*TINY, "--out", str(tmp_path), "--tag", "o"]) == 0
    res = json.loads((tmp_path / "o.json").read_text())
    rows = {r["variant"]: r for r in res["results"]}
    assert list(rows) == list(bo.VARIANTS)
    assert res["n_params"] > 0 and res["copy_bandwidth_Bps"] > 0 and res["must_move_passes"] == 11
    for r in rows.values():
        assert r["ms"] > 0 and r["GBps"] > 0 and r["dispatched_ops"] > 0
        # the same steps on the same inputs: every variant ends within rounding of the published one (fp32
        # parameters of magnitude ~0.02 after a few steps of lr 3e-4)
        assert r["max_abs_diff_vs_reference"] < 1e-6
    assert rows["trainer"]["host_reads"] == 1 and rows["trainer"]["host_reads_by_op"] == {"Tensor.tolist": 1}
    assert rows["published_fused"]["host_reads"] == 0          # no non-finite guard at all
    assert rows["trainer"]["dispatched_ops"] < rows["published_fused"]["dispatched_ops"]
    assert rows["trainer"]["predicted_passes"] == 12 < rows["published_fused"]["predicted_passes"]


def test_bench_optimizer_rejects_unknown_variants(tmp_path):
    bo = load_bench("bench_optimizer")
    with pytest.raises(SystemExit) as e:
        bo.main([*TINY, "--variants", "trainer,magic", "--out", str(tmp_path)])
    assert e.value.code == 2
