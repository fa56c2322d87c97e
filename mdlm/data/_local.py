"""Local data: where the shipped corpora/tokenizers are, the GPT-2 tokenizer, and the published ``wrap`` chunking.

The original ``mdlm/data.py`` helpers (``mdlm.data`` re-exports them). No network is used.

The data folder (``data_dir``) is ``$MDLM_DATA_DIR`` when it is set (a path that is not a folder is an error,
never silently replaced); otherwise, only when ``mdlm`` is imported from a source checkout (an editable install
or Python started in the checkout), the ``shared/data`` folder next to that checkout (``<checkout>/../shared/
data``); otherwise there is none, and code that needs it says to set ``MDLM_DATA_DIR``. An installed package
therefore never depends on the working directory or on where it was installed.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["data_dir", "gpt2_tokenizer", "GPT2_EOS", "GPT2_VOCAB", "wrap_chunks", "load_corpus_tokens", "decode"]

GPT2_EOS = 50256      # <|endoftext|>, also used as BOS in the published wrap mode
GPT2_VOCAB = 50257    # MASK is appended as id 50257 -> model vocab 50258


def source_checkout() -> Path | None:
    """The source checkout this package is imported from (``<checkout>/mdlm/data/_local.py`` with
    ``<checkout>/pyproject.toml`` and ``<checkout>/csrc``), or None for an installed package."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir() else None


def data_dir(required: bool = True) -> Path | None:
    """The data folder (tokenizers/, corpora/): ``$MDLM_DATA_DIR``, else ``<checkout>/../shared/data`` when
    imported from a source checkout (see the module docstring). ``MDLM_DATA_DIR`` set to a path that is not a
    folder raises FileNotFoundError even when not ``required``; without a folder: None, or FileNotFoundError
    if ``required``."""
    env = os.environ.get("MDLM_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"MDLM_DATA_DIR={env} is not a folder; point it to the folder holding "
                                    "tokenizers/ and corpora/, or unset it")
        return path
    checkout = source_checkout()
    if checkout is not None and (checkout.parent / "shared" / "data").is_dir():
        return checkout.parent / "shared" / "data"
    if required:
        where = (f"; the checkout's default {checkout.parent / 'shared' / 'data'} does not exist" if checkout
                 else " (an installed package has no default data folder)")
        raise FileNotFoundError("no data folder: set MDLM_DATA_DIR to the folder holding tokenizers/ and corpora/"
                                + where)
    return None


def gpt2_tokenizer(root: str | os.PathLike | None = None):
    """GPT-2 byte-level BPE from local ``tokenizers/gpt2/{vocab.json,merges.txt}`` (HF ``tokenizers``)."""
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError as e:
        raise ImportError("the GPT-2 tokenizer needs the 'tokenizers' package: pip install tokenizers") from e
    root = Path(root) if root is not None else data_dir() / "tokenizers" / "gpt2"
    vocab, merges = root / "vocab.json", root / "merges.txt"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer file missing: {f}")
    return ByteLevelBPETokenizer(str(vocab), str(merges))


def wrap_chunks(ids: torch.Tensor, length: int, bos: int = GPT2_EOS, eos: int = GPT2_EOS) -> torch.Tensor:
    """Published ``wrap`` mode: a 1-D token stream cut into blocks of length-2, each framed [BOS ... EOS].

    ids (N,) -> (N // (length - 2), length) int64; the tail that does not fill a block is dropped.
    """
    if length < 3:
        raise ValueError(f"length must be >= 3 for wrap mode, got {length}")
    body = length - 2
    n = ids.numel() // body
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one block of {body}")
    blocks = ids[: n * body].reshape(n, body).long()
    return torch.cat([torch.full((n, 1), bos), blocks, torch.full((n, 1), eos)], dim=1)


def load_corpus_tokens(name: str = "tinyshakespeare/input.txt", split: str = "train", train_fraction: float = 0.9,
                       root: str | os.PathLike | None = None) -> torch.Tensor:
    """GPT-2 tokens (N,) of a shipped corpus file, split by characters (first 90% train, rest validation)."""
    path = (Path(root) if root is not None else data_dir() / "corpora") / name
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * train_fraction)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    text = text[:cut] if split == "train" else text[cut:]
    return torch.tensor(gpt2_tokenizer().encode(text).ids, dtype=torch.int64)


def decode(tokens: torch.Tensor, tokenizer=None, mask_index: int = GPT2_VOCAB, mask_text: str = "[MASK]") -> list[str]:
    """Token ids (B, L) -> B strings with the GPT-2 tokenizer (default) or any object with ``decode(ids)``;
    MASK ids (outside the tokenizer's vocabulary) are rendered as ``mask_text``."""
    tok = tokenizer or gpt2_tokenizer()
    out = []
    for row in tokens.tolist():
        parts, run = [], []
        for i in row:
            if i == mask_index:
                if run:
                    parts.append(tok.decode(run))
                    run = []
                parts.append(mask_text)
            else:
                run.append(i)
        if run:
            parts.append(tok.decode(run))
        out.append("".join(parts))
    return out
