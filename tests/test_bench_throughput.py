"""bench/throughput.py runs end to end (tiny shapes, CPU) and writes a JSON with every provider's figures."""
import json

import pytest

from bench_loader import load_bench



def _load():
    return load_bench("throughput")


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
    # the step budget: the fused provider reads nothing back (no GPU synchronisation) in the whole step, the
    # masked one sizes its gather on the host once in the forward
    budget = {r["provider"]: r["step_budget"] for r in res["results"]}
    assert budget["fused"]["host_reads"] == 0, budget["fused"]["host_reads_by_op"]
    assert budget["masked"]["host_reads_by_phase"] == {"forward": 1}
    for b in budget.values():
        assert all(b["launches_by_phase"][p] > 0 for p in ("forward", "backward", "optimizer"))
        assert b["saved_bytes_per_token"] > 0


def test_throughput_rejects_unknown_provider():
    tp = _load()
    with pytest.raises(SystemExit):
        tp.parse_args(["--providers", "fused_magic"])


def test_throughput_sampling_section(tmp_path, monkeypatch):
    """--sampling adds the bench_sampling measurements (step arithmetic, generation) to the table and JSON."""
    monkeypatch.setenv("MDLM_BACKEND", "reference")
    tp = _load()
    rc = tp.main(["--device", "cpu", "--preset", "tiny", "--batch", "1", "--length", "16", "--steps", "1",
                  "--warmup", "0", "--providers", "fused", "--sampling", "--sampling-steps", "2",
                  "--out", str(tmp_path), "--tag", "s"])
    assert rc == 0
    res = json.loads((tmp_path / "s.json").read_text())
    s = res["sampling"]
    assert s["steps"] == 2 and s["batch"] == 1 and s["length"] == 16 and s["copy_bandwidth_Bps"] > 0
    assert [r["provider"] for r in s["step"]] == ["reference", "fused"]
    assert all(r["ms"] > 0 for r in s["step"]) and s["step"][1]["backend"] == "reference"
    assert [r["provider"] for r in s["generation"]] == ["reference ddpm_cache", "fused ddpm_cache",
                                                        "fused first_hitting"]
    assert all(r["tokens_per_s"] > 0 and r["seconds"] > 0 for r in s["generation"])
    # no NVML on CPU: the energy fields are present and None, with a note
    r = res["results"][0]
    assert r["power_mean_w"] is None and r["j_per_token"] is None and r["power_samples"] is None
    assert "not a CUDA device" in res["energy_note"]


def test_sampling_default_off_on_cpu_on_on_cuda():
    tp = _load()
    assert tp.parse_args(["--device", "cpu"]).sampling is False
    assert tp.parse_args(["--device", "cuda"]).sampling is True
    assert tp.parse_args(["--device", "cuda", "--no-sampling"]).sampling is False
    assert tp.parse_args(["--device", "cpu", "--sampling"]).sampling is True
    with pytest.raises(SystemExit):
        tp.parse_args(["--sampling-steps", "0"])


def test_power_window_energy_per_token():
    """J/token = mean W x median step s / tokens per step, from (fake) NVML milliwatt samples."""
    import threading
    import time
    import torch

    tp = _load()

    class FakeNVML:
        def __init__(self):
            self.energy_mj, self.calls = 1000, 0
            self.sampled = threading.Event()

        def nvmlDeviceGetPowerUsage(self, handle):
            self.calls += 1
            if self.calls >= 3:
                self.sampled.set()
            return 300_000  # mW

        def nvmlDeviceGetTotalEnergyConsumption(self, handle):
            self.energy_mj += 600  # mJ between the two reads around the window
            return self.energy_mj

    meter = tp.PowerMeter(torch.device("cpu"), interval_s=0.001)
    assert not meter.available
    nvml = FakeNVML()
    meter.pynvml, meter.handle, meter.available = nvml, object(), True
    with meter.measure() as w:
        assert nvml.sampled.wait(5)
        time.sleep(0.005)
    r = w.result(median_s=0.5, tokens_per_step=100, n_steps=3)
    assert r["power_samples"] >= 3
    assert r["power_mean_w"] == pytest.approx(300.0)
    assert r["j_per_token"] == pytest.approx(300.0 * 0.5 / 100)
    assert r["energy_counter_j_per_token"] == pytest.approx(0.6 / 300)
