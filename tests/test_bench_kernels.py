"""bench/kernels.py runs end to end (tiny shapes, CPU, no torch.compile) and writes one row per kernel x pass x
provider; unknown kernels and providers are rejected."""
import json

import pytest

from bench_loader import load_bench
from mdlm_kernels import _ext
from mdlm_kernels import backend as B



def _load():
    return load_bench("kernels")


def test_kernels_smoke(tmp_path, monkeypatch):
    """The fused provider runs each op's own fast backend (not MDLM_BACKEND=reference, which would compare the
    reference with itself): Triton under the interpreter, the compiled extension's CPU twin; its outputs agree with
    the reference provider's (the bench's max_abs_diff_vs_reference), and the reference rows differ by 0."""
    monkeypatch.delenv("MDLM_BACKEND", raising=False)
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
    triton_cpu = B.unavailable_reason("triton", "cpu") is None
    fast = {k: ("cpp" if _ext.available() else "reference") if k in ("forward_mask", "sample_step")
            else ("triton" if triton_cpu else "reference") for k in kb.KERNELS}
    for r in rows:
        assert r["ms"] > 0 and r["fraction_of_ceiling"] > 0
        rate = r["TFLOPs"] if r["kernel"] == "subs_linear_cross_entropy" else r["GBps"]
        assert rate > 0
        if r["provider"] == "reference":
            assert r["backend"] == "reference" and r["max_abs_diff_vs_reference"] == 0.0
        else:
            assert r["backend"] == fast[r["kernel"]], r      # the op's own fast path, not the reference
            assert r["max_abs_diff_vs_reference"] <= 1e-4, r  # fp32, values of scale ~1: rounding-level differences


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
