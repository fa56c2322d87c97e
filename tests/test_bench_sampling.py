"""bench/bench_sampling.py: generation rows carry the speed ratio to the reference and the sample quality side by
side (unigram entropy; gen PPL or the reason it was skipped), also for a trained model given by --checkpoint."""
import json
import math

import torch

import mdlm
from bench_loader import load_bench


def test_generation_rows_report_quality_side_by_side(tmp_path):
    bs = load_bench("bench_sampling")
    torch.manual_seed(0)
    model = mdlm.MDLM(mdlm.preset("tiny", **{"model.length": 16}), 50258)
    snap = mdlm.save_pretrained(model, tmp_path / "snap")      # a checkpoint in the published layout
    rc = bs.main(["--device", "cpu", "--checkpoint", str(snap), "--batch", "2", "--steps", "2", "--iters", "1",
                  "--gen-ppl", "gpt2", "--out", str(tmp_path), "--tag", "q"])
    assert rc == 0
    res = json.loads((tmp_path / "q.json").read_text())
    assert res["length"] == 16 and res["preset"].startswith("checkpoint ")   # the checkpoint's own length
    gen = res["generation"]
    assert [r["provider"] for r in gen] == ["reference ddpm_cache", "fused ddpm_cache", "fused first_hitting"]
    assert gen[0]["x_reference"] == 1.0
    for r in gen:
        assert r["x_reference"] == gen[0]["seconds"] / r["seconds"]
        assert 0.0 <= r["entropy"] <= math.log(16) + 1e-9          # per-sample unigram entropy of 16 tokens
        # no evaluator weights here (offline / no transformers): the reason is recorded, never a number
        assert r["gen_ppl"] is None and r["gen_ppl_skipped"]
    # an explicit length wins over the checkpoint's, in every spelling argparse accepts
    for flag in (["--length", "8"], ["--length=8"], ["--len", "8"]):
        assert bs.main(["--device", "cpu", "--checkpoint", str(snap), "--batch", "1", "--steps", "1", "--iters",
                        "1", "--skip-generation", "--out", str(tmp_path), "--tag", "l", *flag]) == 0
        assert json.loads((tmp_path / "l.json").read_text())["length"] == 8, flag


def test_quality_without_a_tokenizer_says_why():
    bs = load_bench("bench_sampling")
    ids = torch.tensor([[1, 1, 2, 3], [5, 5, 5, 5]])
    cpu = torch.device("cpu")
    ev, skipped = bs._evaluator("gpt2", None, cpu)
    assert ev is None and "no tokenizer" in skipped
    q = bs._quality(ids, None, ev, skipped, cpu)
    # sample 0: counts {1: 2, 2: 1, 3: 1} -> 1.0397 nats; sample 1: one token -> 0
    want = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / 2
    assert abs(q["entropy"] - want) < 1e-12
    assert q["gen_ppl"] is None and q["gen_ppl_skipped"] == skipped
    assert bs._evaluator(None, None, cpu) == (None, None)                  # not asked: silent
    assert bs._quality(ids, None, None, None, cpu)["gen_ppl_skipped"] is None
