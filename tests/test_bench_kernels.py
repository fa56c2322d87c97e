"""bench/kernels.py runs end to end (tiny shapes, CPU, no torch.compile) and writes one row per kernel x pass x
provider; unknown kernels and providers are rejected."""
import json

import pytest

from bench_loader import load_bench



def _load():
    return load_bench("kernels")


def test_kernels_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("MDLM_BACKEND", "reference")
    kb = _load()
    rc = kb.main(["--device", "cpu", "--batch", "1", "--length", "16", "--hidden", "32", "--heads", "2",
                  "--vocab", "512", "--iters", "1", "--warmup", "0", "--providers", "fused,reference",
                  "--out", str(tmp_path), "--tag", "k"])
    assert rc == 0
    res = json.loads((tmp_path / "k.json").read_text())
    assert res["complete"] and res["providers"] == ["fused", "reference"] and list(res["kernels"]) == list(kb.KERNELS)
    assert res["copy_bandwidth_Bps"] > 0 and res["matmul_ceiling_flops"] > 0 and res["environment"]["torch"]
    assert res["masked_rows"] == 8
    rows = res["results"]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    trains = {"adaln_modulate", "gated_residual_modulate", "rotary_qkv", "bias_gelu", "subs_linear_cross_entropy"}
    expected = [(k, p, prov) for k in kb.KERNELS for p in (("fwd", "fwd+bwd") if k in trains else ("fwd",))
                for prov in ("fused", "reference")]
    assert [(r["kernel"], r["pass"], r["provider"]) for r in rows] == expected
    for r in rows:
        assert r["ms"] > 0 and r["fraction_of_ceiling"] > 0
        assert r["backend"] == "reference"          # MDLM_BACKEND=reference forces the plain-PyTorch path
        rate = r["TFLOPs"] if r["kernel"] == "subs_linear_cross_entropy" else r["GBps"]
        assert rate > 0
        assert r["max_abs_diff_vs_reference"] == 0.0    # both providers ran the same reference math


@pytest.mark.parametrize("flag, value", [("--kernels", "adaln_modulate,flash_magic"), ("--providers", "fused,magic"),
                                         ("--kernels", ""), ("--providers", " , ")])
def test_kernels_rejects_unknown(flag, value):
    kb = _load()
    with pytest.raises(SystemExit):
        kb.parse_args(["--device", "cpu", flag, value])


def test_kernels_defaults():
    """CPU: tiny shapes, fp32, compiled only with --compile; subsets as given."""
    kb = _load()
    a = kb.parse_args(["--device", "cpu"])
    assert (a.batch, a.length, a.hidden, a.heads, a.vocab, a.dtype) == (1, 64, 128, 4, 50258, "float32")
    assert a.providers == ["fused", "reference"] and a.kernels == list(kb.KERNELS)
    assert kb.parse_args(["--device", "cpu", "--compile"]).providers == ["fused", "reference", "compiled"]
    a = kb.parse_args(["--device", "cpu", "--kernels", "sample_step,bias_gelu", "--providers", "reference"])
    assert a.kernels == ["sample_step", "bias_gelu"] and a.providers == ["reference"]
