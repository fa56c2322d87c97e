"""bench/make_readme_table.py: GPU JSONs -> Markdown tables; README block replacement between markers."""
import json
from pathlib import Path

import pytest

from bench_loader import load_bench



def _load():
    return load_bench("make_readme_table")


def _env(device="cuda", gpu="NVIDIA H200", rev="abc1234", date="2027-01-02T03:04:05+00:00"):
    env = {"date": date, "git_revision": rev, "torch": "2.13.0", "device": device}
    if device == "cuda":
        env["gpu"] = gpu
    return env


def _sampling(src_steps=1000):
    return {"preset": "small", "batch": 16, "length": 1024, "vocab": 50258, "steps": src_steps,
            "masked_rows": 8190, "copy_bandwidth_Bps": 4.2e12,
            "step": [{"provider": "reference", "ms": 41.25},
                     {"provider": "fused", "ms": 0.875, "read_GBps": 2100.0, "backend": "cpp"}],
            "generation": [{"provider": "reference ddpm_cache", "seconds": 61.5, "tokens_per_s": 266.4,
                            "model_calls": None},
                           {"provider": "fused ddpm_cache", "seconds": 12.25, "tokens_per_s": 1337.4,
                            "model_calls": 733},
                           {"provider": "fused first_hitting", "seconds": 9.5, "tokens_per_s": 1724.6,
                            "model_calls": 1024}]}


def _write_all(d: Path):
    d.mkdir(exist_ok=True)
    (d / "throughput_cuda_small.json").write_text(json.dumps({
        "benchmark": "throughput", "preset": "small", "batch": 64, "length": 1024, "dtype": "torch.bfloat16",
        "environment": _env(),
        "results": [
            {"provider": "fused", "median_s": 0.1234, "tokens_per_s": 531234.0, "peak_mem_gib": 27.25,
             "mfu": 0.5678, "j_per_token": 0.00123, "power_mean_w": 650.0, "power_samples": 60},
            {"provider": "reference", "median_s": 0.4471, "tokens_per_s": 146612.0, "peak_mem_gib": 93.71,
             "mfu": 0.1567, "j_per_token": None, "power_mean_w": None, "power_samples": None},
            {"provider": "compiled", "error": "BackendCompilerFailed: no compiler"}],
        "sampling": _sampling(100)}))
    (d / "linear_ce_cuda.json").write_text(json.dumps({
        "benchmark": "subs_loss_stage", "batch": 64, "length": 1024, "hidden": 768, "vocab": 50258,
        "dtype": "bfloat16", "environment": _env(rev="def5678"),
        "results": [{"provider": "masked_compiled", "median_ms": 48.76, "fraction_of_matmul_ceiling": 0.4321,
                     "extra_peak_gib": 12.5},
                    {"provider": "fused", "median_ms": 31.42, "fraction_of_matmul_ceiling": 0.6789,
                     "extra_peak_gib": 1.25}]}))
    (d / "blocks_cuda.json").write_text(json.dumps({
        "benchmark": "dit_blocks", "preset": "small", "batch": 64, "kernel_batch": 64, "length": 1024,
        "dtype": "torch.bfloat16", "copy_bandwidth_Bps": 4.0e12, "environment": _env(gpu="NVIDIA H100 80GB HBM3"),
        "kernels": [{"kernel": "adaln_modulate", "ms": 0.157, "GBps": 3200.0, "backend": "triton",
                     "fraction_of_copy": 0.8},
                    {"kernel": "bias_gelu", "ms": 0.333, "GBps": 3000.0, "backend": "triton"},
                    {"kernel": "adaln_modulate fwd+bwd", "ms": 0.611, "GBps": None, "backend": "triton"}],
        "model": [{"provider": "kernels", "ms": 211.5, "tokens_per_s": 309876.0},
                  {"provider": "compiled", "error": "RuntimeError: boom"}]}))
    (d / "sampling_cuda.json").write_text(json.dumps({"benchmark": "sampling", "environment": _env(),
                                                       **_sampling(1000)}))
    # CPU runs are ignored
    (d / "throughput_cpu_tiny.json").write_text(json.dumps({
        "benchmark": "throughput", "preset": "tiny", "batch": 4, "length": 128, "environment": _env("cpu"),
        "results": [{"provider": "fused", "median_s": 0.25, "tokens_per_s": 98765.0, "peak_mem_gib": 0.9,
                     "mfu": 0.1}]}))


def test_table_contains_every_kind(tmp_path):
    mt = _load()
    _write_all(tmp_path / "results")
    runs = mt.load_gpu_runs(tmp_path / "results")
    assert len(runs) == 4  # the CPU JSON is skipped
    table = mt.make_table(runs)
    # throughput: tokens/s, step ms, peak GiB, MFU, mJ/token, failed provider, GPU / date / git
    for s in ("531,234", "123.4", "27.25", "56.8%", "1.230", "146,612", "447.1", "93.71", "15.7%",
              "failed: BackendCompilerFailed", "NVIDIA H200", "2027-01-02", "abc1234"):
        assert s in table, s
    # linear_ce: ms and % of the matmul ceiling
    for s in ("48.76", "43.2%", "31.42", "67.9%", "def5678", "64 x 1024, 768, 50258"):
        assert s in table, s
    # blocks: % of copy bandwidth (given, and derived from GB/s and the copy bandwidth) and model rows
    for s in ("adaln_modulate", "80.0%", "bias_gelu", "75.0%", "NVIDIA H100 80GB HBM3", "211.5", "309,876",
              "failed: RuntimeError: boom"):
        assert s in table, s
    # sampling: from the sampling JSON and the throughput JSON's sampling section
    for s in ("41.250", "0.875", "50.0%", "1,337", "1,725", "733", "bench_sampling.py", "throughput.py"):
        assert s in table, s
    assert "98,765" not in table  # CPU numbers never appear
    for head in ("### Training step", "### SUBS loss stage", "### DiT block kernels", "### Sampling"):
        assert table.count(head) == 1
    # every table row has the same number of cells as its header
    for block in table.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count(" | ") for ln in lines if not ln.startswith("|---")}) == 1, block


def test_main_prints_table(tmp_path, capsys):
    mt = _load()
    _write_all(tmp_path / "results")
    assert mt.main(["--results", str(tmp_path / "results")]) == 0
    assert "531,234" in capsys.readouterr().out


README = """# title

intro text
<!-- perf-table:start -->
old table line 1
old table line 2
<!-- perf-table:end -->

## after
tail text
"""


def test_update_replaces_only_marked_block(tmp_path):
    mt = _load()
    _write_all(tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert mt.main(["--results", str(tmp_path / "results"), "--update", str(readme)]) == 0
    new = readme.read_text()
    assert "old table line" not in new and "531,234" in new
    before, rest = new.split("<!-- perf-table:start -->\n")
    block, after = rest.split("<!-- perf-table:end -->\n")
    assert before == "# title\n\nintro text\n"
    assert after == "\n## after\ntail text\n"
    assert block.strip() == mt.make_table(mt.load_gpu_runs(tmp_path / "results"))
    # idempotent
    assert mt.main(["--results", str(tmp_path / "results"), "--update", str(readme)]) == 0
    assert readme.read_text() == new


def test_update_without_gpu_runs_writes_placeholder(tmp_path):
    mt = _load()
    results = tmp_path / "results"
    results.mkdir()
    (results / "throughput_cpu_tiny.json").write_text(json.dumps({"benchmark": "throughput",
                                                                  "environment": _env("cpu"), "results": []}))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert mt.main(["--results", str(results), "--update", str(readme)]) == 0
    assert readme.read_text() == README.replace("old table line 1\nold table line 2\n",
                                                "\nNo GPU run recorded yet.\n\n")
    assert mt.make_table([]) == "No GPU run recorded yet."


@pytest.mark.parametrize("text", ["# no markers\n", "<!-- perf-table:start -->\nx\n",
                                  "<!-- perf-table:end -->\nx\n<!-- perf-table:start -->\n"])
def test_update_missing_markers_is_a_clear_error(tmp_path, capsys, text):
    mt = _load()
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(mt.MarkerError, match="perf-table:start"):
        mt.replace_block(text, "table")
    assert mt.main(["--results", str(tmp_path), "--update", str(readme)]) == 2
    err = capsys.readouterr().err
    assert "<!-- perf-table:start -->" in err and "<!-- perf-table:end -->" in err
    assert readme.read_text() == text  # untouched
