"""Local data helpers (mdlm.data): GPT-2 tokenizer from the shipped files, wrap chunking, decoding."""
import pytest
import torch

from mdlm.data import data_dir, decode, gpt2_tokenizer, wrap_chunks


def _tok():
    d = data_dir(required=False)
    if d is None or not (d / "tokenizers" / "gpt2" / "vocab.json").is_file():
        pytest.skip("shared/data/tokenizers/gpt2 not found (set MDLM_DATA_DIR)")
    pytest.importorskip("tokenizers", reason="the GPT-2 tokenizer needs the 'tokenizers' package")
    return gpt2_tokenizer()


def test_gpt2_tokenizer_known_ids_and_decode_with_masks():
    tok = _tok()
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.token_to_id("<|endoftext|>") == 50256
    out = decode(torch.tensor([[15496, 995], [15496, 50257]]), tok)
    assert out == ["Hello world", "Hello[MASK]"]


def test_wrap_chunks_frames_blocks_with_bos_eos():
    ids = torch.arange(100)
    blocks = wrap_chunks(ids, 12, bos=7, eos=9)
    assert blocks.shape == (10, 12)
    assert torch.all(blocks[:, 0] == 7) and torch.all(blocks[:, -1] == 9)
    assert torch.equal(blocks[:, 1:-1].reshape(-1), ids)
    with pytest.raises(ValueError, match="length"):
        wrap_chunks(ids, 2)
    with pytest.raises(ValueError, match="fewer"):
        wrap_chunks(ids[:5], 12)
