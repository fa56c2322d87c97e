"""Tokenizers from local files only: GPT-2 byte-level BPE, BERT uncased WordPiece, and the text8 characters.

``get_tokenizer(name)`` returns a :class:`Tokenizer` with the ids MDLM needs next to encode/decode:

===================  ==========  ================  =======  ======  ======  ======
name                 vocab_size  model_vocab_size  mask_id  bos_id  eos_id  pad_id
===================  ==========  ================  =======  ======  ======  ======
gpt2                 50257       50258             50257    50256   50256   50257
bert-base-uncased    30522       30522             103      101     102     0
text8                35          35                4        2       3       5
===================  ==========  ================  =======  ======  ======  ======

Why these ids (as the published code ends up with them):

- GPT-2 has no MASK, so MDLM appends one at ``vocab_size`` (model vocab 50258). It has no PAD either:
  the published ``get_tokenizer`` adds a ``[PAD]`` special token, which Hugging Face numbers
  ``len(tokenizer)`` = 50257, the same id as MASK. So ``pad_id == mask_id`` for GPT-2. Padding only
  occurs in ``pad`` mode, where the attention mask excludes it from the loss anyway.
- BERT has its own [MASK] (103) and [PAD] (0); its BOS/EOS are [CLS]/[SEP] (the published code falls
  back to cls/sep when bos/eos are unset).
- text8 is the published character tokenizer (8 specials, then a..z and space).

The Hugging Face ``tokenizers`` package is imported lazily (``import mdlm.data`` works without it).
"""
from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from ._local import data_dir

__all__ = ["Tokenizer", "get_tokenizer", "TOKENIZERS"]

TOKENIZERS = ("gpt2", "bert-base-uncased", "text8")


class Tokenizer:
    """A text tokenizer plus the special ids the diffusion model needs.

    ``encode(text) -> list[int]`` adds no special tokens; ``encode_batch(texts) -> list[list[int]]``;
    ``decode(ids) -> str`` (MASK ids outside the tokenizer's own vocabulary are shown as ``[MASK]``).
    ``fingerprint`` identifies the vocabulary files, so shard caches notice a changed tokenizer.
    """

    def __init__(self, name: str, backend, *, vocab_size: int, model_vocab_size: int, mask_id: int,
                 bos_id: int, eos_id: int, pad_id: int, fingerprint: str):
        self.name = name
        self._backend = backend
        self.vocab_size = int(vocab_size)
        self.model_vocab_size = int(model_vocab_size)
        self.mask_id, self.bos_id, self.eos_id, self.pad_id = int(mask_id), int(bos_id), int(eos_id), int(pad_id)
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, model_vocab_size={self.model_vocab_size}, "
                f"mask_id={self.mask_id}, bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")

    def special_ids(self) -> dict:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "mask_id": self.mask_id}

    def encode(self, text: str) -> list[int]:
        """One text -> its token ids, no special tokens added."""
        return self._backend.encode(text)

    def encode_batch(self, texts: Iterable[str], num_workers: int | None = None) -> list[list[int]]:
        """Texts -> token ids per text, equal to ``[encode(t) for t in texts]``.

        ``num_workers``: None = the Rust tokenizer's parallel ``encode_batch`` (its thread pool has one thread
        per core unless ``RAYON_NUM_THREADS`` says otherwise); 0 or 1 = serial in this process; n > 1 = n
        forked worker processes (useful when the caller's own Python work is the bottleneck).
        """
        texts = texts if isinstance(texts, list) else list(texts)
        if num_workers is None:
            return self._backend.encode_batch(texts)
        if num_workers <= 1 or len(texts) < 2:
            return [self._backend.encode(t) for t in texts]
        with EncodePool(self, num_workers) as pool:
            return pool.encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids (a list or a 1-D tensor) -> text; special tokens are kept (as the published decode)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.mask_id < self.vocab_size:      # the tokenizer knows its MASK (BERT, text8)
            return self._backend.decode(ids)
        parts, run = [], []
        for i in ids:
            if i == self.mask_id:
                if run:
                    parts.append(self._backend.decode(run))
                    run = []
                parts.append("[MASK]")
            else:
                run.append(i)
        if run:
            parts.append(self._backend.decode(run))
        return "".join(parts)


# --- worker processes for encode_batch(num_workers > 1) ---------------------------------------------------------

_WORKER_TOKENIZER: Tokenizer | None = None


def _worker_init(tok: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok
    # the child must not start the Rust thread pool after a fork (tokenizers would warn and disable it)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _worker_encode(texts: list[str]) -> list[list[int]]:
    return [_WORKER_TOKENIZER._backend.encode(t) for t in texts]


class EncodePool:
    """``num_workers`` forked processes that encode serially; reusable across many ``encode_batch`` calls.

    Fork (where available) hands the loaded tokenizer to the children without pickling it; the texts and
    ids travel through pipes, so this pays off only for large batches.
    """

    def __init__(self, tokenizer: Tokenizer, num_workers: int):
        import multiprocessing as mp
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        self.num_workers = int(num_workers)
        self._ex = ProcessPoolExecutor(self.num_workers, mp_context=ctx, initializer=_worker_init,
                                       initargs=(tokenizer,))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        n = max(1, -(-len(texts) // (4 * self.num_workers)))     # ~4 chunks per worker for load balance
        chunks = [texts[i:i + n] for i in range(0, len(texts), n)]
        return [ids for part in self._ex.map(_worker_encode, chunks) for ids in part]

    def close(self) -> None:
        self._ex.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- backends -----------------------------------------------------------------------------------------------------

class _HFBackend:
    """A Hugging Face ``tokenizers`` tokenizer, always without special tokens on encode."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    # the Rust object pickles (needed only where fork is unavailable)
    def __getstate__(self):
        return {"json": self.tok.to_str()}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as _T
        self.tok = _T.from_str(state["json"])


class _Text8Backend:
    """The published text8 character vocabulary: 8 specials, then 'a'..'z' and ' '; anything else is [UNK]."""

    SPECIALS = ("[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
    CHARS = "abcdefghijklmnopqrstuvwxyz "

    def __init__(self):
        self.to_id = {c: i + len(self.SPECIALS) for i, c in enumerate(self.CHARS)}
        self.to_str = list(self.SPECIALS) + list(self.CHARS)
        self.unk = self.SPECIALS.index("[UNK]")

    def encode(self, text: str) -> list[int]:
        get, unk = self.to_id.get, self.unk
        return [get(c, unk) for c in text.lower()]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.to_str[i] if 0 <= i < len(self.to_str) else "" for i in ids)


def _hash_files(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file missing: {path} (set MDLM_DATA_DIR to the folder holding tokenizers/)")
    return path


@functools.lru_cache(maxsize=8)
def _load(name: str, root: str | None) -> Tokenizer:
    if name == "text8":
        return Tokenizer("text8", _Text8Backend(), vocab_size=35, model_vocab_size=35, mask_id=4, bos_id=2,
                         eos_id=3, pad_id=5, fingerprint="text8-chars-v1")
    if name not in TOKENIZERS:      # before any file is looked for: the name is wrong, not the data folder
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {TOKENIZERS}")
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"the {name} tokenizer needs the 'tokenizers' package: pip install tokenizers") from e
    base = Path(root) if root is not None else data_dir() / "tokenizers" / name
    if name == "gpt2":
        vocab, merges = _need(base / "vocab.json", "GPT-2 tokenizer"), _need(base / "merges.txt", "GPT-2 tokenizer")
        tok = tokenizers.ByteLevelBPETokenizer(str(vocab), str(merges))
        # As Hugging Face's GPT-2 tokenizer: "<|endoftext|>" written in a text is the one EOS token (50256),
        # not BPE pieces of it; registering it keeps its id since it is already in the vocabulary.
        tok.add_special_tokens(["<|endoftext|>"])
        V = 50257
        if tok.get_vocab_size() != V or tok.token_to_id("<|endoftext|>") != 50256:
            raise ValueError(f"{vocab}: not the GPT-2 vocabulary ({tok.get_vocab_size()} entries, expected {V})")
        return Tokenizer("gpt2", _HFBackend(tok), vocab_size=V, model_vocab_size=V + 1, mask_id=V,
                         bos_id=50256, eos_id=50256, pad_id=V, fingerprint=_hash_files(vocab, merges))
    if name == "bert-base-uncased":
        vocab = _need(base / "vocab.txt", "BERT tokenizer")
        tok = tokenizers.BertWordPieceTokenizer(str(vocab), lowercase=True)
        ids = {t: tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")}
        if any(v is None for v in ids.values()):
            raise ValueError(f"{vocab}: missing BERT special tokens ({ids})")
        V = tok.get_vocab_size()
        return Tokenizer("bert-base-uncased", _HFBackend(tok), vocab_size=V, model_vocab_size=V,
                         mask_id=ids["[MASK]"], bos_id=ids["[CLS]"], eos_id=ids["[SEP]"], pad_id=ids["[PAD]"],
                         fingerprint=_hash_files(vocab))
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {TOKENIZERS}")


def get_tokenizer(name: str = "gpt2", root: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer ``name`` (gpt2 | bert-base-uncased | text8) from local files.

    ``root``: the folder holding the vocabulary files (default ``<data_dir>/tokenizers/<name>``).
    Loaded tokenizers are cached per (name, root).
    """
    if isinstance(name, Tokenizer):
        return name
    return _load(str(name), None if root is None else str(Path(root).resolve()))
