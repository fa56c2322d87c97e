"""A tiny MDLM learns on the shipped Tiny Shakespeare corpus (GPT-2 tokens, published wrap mode) on CPU.

Training uses the default loss path (fused masking + fused linear-cross-entropy). The held-out NELBO is measured with the same seed (same t and masks) before and after 30 AdamW steps;
it must fall by more than 2 nats/token (it falls from ~10.8, the uniform-prediction value, to ~7).
"""
import pytest
import torch

import mdlm
from mdlm.data import data_dir, load_corpus_tokens, wrap_chunks


def test_tiny_model_loss_falls_on_tiny_shakespeare(monkeypatch):
    d = data_dir(required=False)
    if d is None or not (d / "corpora" / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip("shipped corpus shared/data/corpora/tinyshakespeare not found (set MDLM_DATA_DIR)")
    pytest.importorskip("tokenizers", reason="the GPT-2 tokenizer needs the 'tokenizers' package")
    # the default (fused) loss path, with its PyTorch backends: the Triton interpreter is too slow to train
    monkeypatch.setenv("MDLM_BACKEND", "reference")
    train = wrap_chunks(load_corpus_tokens(split="train"), 64)
    val = wrap_chunks(load_corpus_tokens(split="val"), 64)[:16]
    torch.manual_seed(0)
    model = mdlm.MDLM(mdlm.preset("tiny", **{"model.length": 64}), 50258)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.999), weight_decay=0)

    def val_loss():
        model.eval()
        with torch.no_grad():
            out = model.loss(val, generator=torch.Generator().manual_seed(123)).loss.item()
        model.train()
        return out

    before = val_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = train[torch.randint(0, train.shape[0], (8,), generator=g)]
        loss = model.loss(batch, generator=g).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    after = val_loss()
    assert before > 10.0, before
    assert after < before - 2.0, (before, after)
