"""bench/throughput.py runs end to end (tiny shapes, CPU) and writes a JSON with every provider's figures."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_smoke(tmp_path):
    tp = _load()
    rc = tp.main(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--length", "16", "--steps", "2",
                  "--warmup", "1", "--providers", "reference,masked,fused", "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert [r["provider"] for r in res["results"]] == ["reference", "masked", "fused"]
    for r in res["results"]:
        assert "error" not in r and r["tokens_per_s"] > 0 and r["median_s"] > 0 and r["steps_timed"] == 2
    # same seeds and draws: both providers train the same model the same way
    a, b, _ = (r["final_loss"] for r in res["results"])
    assert a == pytest.approx(b, rel=1e-3)
    assert res["environment"]["torch"] and res["model_flops_per_token"] > 0


def test_throughput_rejects_unknown_provider():
    tp = _load()
    with pytest.raises(SystemExit):
        tp.parse_args(["--providers", "fused_magic"])
