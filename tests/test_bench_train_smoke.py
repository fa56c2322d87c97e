"""bench/train_smoke.py (the trainer on a synthetic corpus, stop + resume) runs end to end on CPU."""
import json

import torch

from bench_loader import load_bench



def _load():
    return load_bench("train_smoke")


def test_synthetic_blocks_are_phrase_sequences():
    mod = _load()
    x = mod.synthetic_blocks(5, 20, seed=0)
    assert x.shape == (5, 20) and x.dtype == torch.int64 and int(x.max()) < mod.V - 1
    phrases = {tuple(r) for r in mod.synthetic_blocks(400, 8, seed=1).tolist()}
    assert len(phrases) <= mod.PHRASES                    # every 8-token block is one of the 64 phrases
    assert torch.equal(x, mod.synthetic_blocks(5, 20, seed=0))


def test_train_smoke_runs_stops_and_resumes(tmp_path, monkeypatch):
    # the fused loss with its PyTorch backends: the Triton interpreter is too slow to train at V = 50258
    monkeypatch.setenv("MDLM_BACKEND", "reference")
    mod = _load()
    rc = mod.main(["--steps", "6", "--batch", "4", "--length", "32", "--out", str(tmp_path),
                   "model.hidden_size=32", "model.n_heads=2", "model.cond_dim=16", "model.n_blocks=1",
                   "trainer.log_every=1", "trainer.val_blocks=8"])
    res = json.loads((tmp_path / "train_smoke_cpu.json").read_text())
    assert rc == 0 and res["ok"]
    assert res["saved_step"] == res["resumed_at"] == 3 and res["final_step"] == 6
    assert res["val_nelbo_end"] < res["val_nelbo_start"]
