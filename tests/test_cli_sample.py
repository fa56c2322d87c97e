"""`mdlm sample` end to end on a tiny random GPT-2-vocabulary checkpoint (in process): sampling controls reach
the fused samplers, --prefix keeps the given tokens, the output is ids + decoded text, and mistakes give a
message and exit code 2. Needs the shipped GPT-2 tokenizer (skips with the reason otherwise)."""
import json

import pytest
import torch

import mdlm
from mdlm.cli import sample_main
from mdlm.data import data_dir

L = 16
OVERRIDES = [f"model.length={L}", "model.hidden_size=32", "model.n_heads=2", "model.cond_dim=16",
             "model.n_blocks=1"]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MDLM_BACKEND", "reference")   # the interpreter would be slow at V = 50258


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = data_dir(required=False)
    if d is None or not (d / "tokenizers" / "gpt2").is_dir():
        pytest.skip("shared/data/tokenizers/gpt2 not found (set MDLM_DATA_DIR)")
    pytest.importorskip("tokenizers", reason="the GPT-2 tokenizer needs the 'tokenizers' package")
    cfg = mdlm.config.apply_overrides(mdlm.preset("tiny"), OVERRIDES)
    torch.manual_seed(0)
    model = mdlm.MDLM(cfg, 50258)
    with torch.no_grad():
        for p in model.backbone.output_layer.parameters():
            p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    mdlm.save_published_checkpoint(model, path, global_step=1)
    return path


def _run(ckpt, tmp_path, *args):
    out = tmp_path / "s.json"
    rc = sample_main(["--checkpoint", str(ckpt), "--preset", "tiny", "--num", "3", "--steps", "8", "--device",
                      "cpu", "--no-ema", "--json", str(out), *args, *OVERRIDES])
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


def test_sample_cli_prefix_controls_and_output(ckpt, tmp_path, capsys):
    from mdlm.data import get_tokenizer
    tok = get_tokenizer("gpt2")
    prefix = tok.encode("The quick brown fox")
    rc, rows = _run(ckpt, tmp_path, "--prefix", "The quick brown fox", "--temperature", "0.7", "--top-k", "50",
                    "--top-p", "0.9", "--sampler", "ddpm_cache", "--remask-eta", "0.02")
    assert rc == 0 and len(rows) == 3
    for r in rows:
        assert len(r["ids"]) == L and r["ids"][:len(prefix)] == prefix and 50257 not in r["ids"]
        assert r["text"].startswith("The quick brown fox") and r["text"] == tok.decode(r["ids"])
    assert "--- sample 2" in capsys.readouterr().out
    # the same seed and options give the same samples; top-k 1 is greedy: every row equal
    assert _run(ckpt, tmp_path, "--prefix", "The quick brown fox", "--temperature", "0.7", "--top-k", "50",
                "--top-p", "0.9", "--sampler", "ddpm_cache", "--remask-eta", "0.02")[1] == rows
    rc, greedy = _run(ckpt, tmp_path, "--top-k", "1", "--sampler", "first_hitting", "--prefix", "Hello")
    assert rc == 0 and greedy[0]["ids"] == greedy[1]["ids"] == greedy[2]["ids"]
    rc, conf = _run(ckpt, tmp_path, "--sampler", "confidence", "--tokens-per-step", "4")
    assert rc == 0 and all(50257 not in r["ids"] for r in conf)


def test_sample_cli_semi_autoregressive_length(ckpt, tmp_path):
    rc, rows = _run(ckpt, tmp_path, "--num-strides", "2", "--stride-length", "4")
    assert rc == 0 and all(len(r["ids"]) == L + 8 for r in rows)


@pytest.mark.parametrize("args,what", [
    (["--top-p", "1.5"], "top_p"),
    (["--temperature", "0.5", "--impl", "reference"], "--temperature"),
    (["--prefix", "word " * 40], "--prefix"),
    (["--sampler", "nosuch"], "nosuch"),
    (["--prefix", "Hi", "--num-strides", "1"], "--prefix"),
])
def test_sample_cli_mistakes_give_a_message_and_exit_2(ckpt, tmp_path, capsys, args, what):
    rc, _ = _run(ckpt, tmp_path, *args)
    err = capsys.readouterr().err
    assert rc == 2 and "error" in err and what in err, err


@pytest.mark.parametrize("args,line", [
    (["--steps", "0"], "mdlm sample: error: steps must be an integer >= 1, got 0"),
    (["--steps", "-2", "--impl", "reference"], "mdlm sample: error: steps must be an integer >= 1, got -2"),
    (["--num", "0"], "mdlm sample: error: batch_size must be an integer >= 1, got 0"),
])
def test_sample_cli_bad_counts_are_one_line_not_the_config_default(ckpt, tmp_path, capsys, args, line):
    """``--steps 0`` ran config.sampling.steps (128) steps; now one line naming the argument, exit 2."""
    rc, _ = _run(ckpt, tmp_path, *args)
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [line], err
