"""Token shards on disk: tokenise a corpus once, then open it zero-copy for training and evaluation.

A shard directory holds

- ``tokens.bin``: the blocks, shape (n_blocks, length), row-major; ``uint16`` when the model vocabulary
  (MASK included) fits in 65536 ids, else ``uint32``;
- ``lengths.bin`` (``pad`` mode only): int32 (n_blocks,), the number of valid tokens at the start of each
  block (the attention mask is ``position < length``; ``wrap`` blocks are all valid);
- ``meta.json``: length, mode, n_blocks, dtype, the tokenizer and its ids (``model_vocab_size`` included: the
  ids are checked against it on open), the sources, a fingerprint of all inputs, counts, and ``checksum``:
  ``"sha256:<hex>"`` of the layout (format, length, n_blocks, dtype, mode) followed by the bytes of
  ``tokens.bin`` (and ``lengths.bin``). It is written last, so its presence marks a complete shard.

Opening a shard (``BlockDataset(path)``) reads ``tokens.bin`` once, in chunks, for two checks in the same pass:
every id below ``model_vocab_size``, and the checksum (so a ``tokens.bin`` changed after the build, or a
``meta.json`` whose length and block count were changed together -- same file size, wrongly shaped blocks -- is
refused). Why the whole file and not a sample of blocks: the id scan reads every byte anyway, and sha256 adds
~0.55 s per GB on one core (1.8 GB/s measured on this project's 2-core CPU; the id scan ~12 GB/s): an estimated
~10 s for OpenWebText (~9B tokens, ~18 GB as uint16) once per process, comparable to reading the file cold; a
sample would miss a change outside the sampled blocks. ``validate=False`` (worker processes reopening a checked
shard) skips both. A shard written before checksums existed opens with a one-line warning (rebuild it to add one).

Two ways to cut documents into blocks of ``length`` tokens, as in the published data loader:

- ``wrap`` (OpenWebText, WikiText, ...): every document is followed by EOS, the documents are joined into
  one stream, and the stream is cut into pieces of ``length - 2`` tokens, each framed ``[BOS] ... [EOS]``
  (the same blocks as :func:`mdlm.data.wrap_chunks`); the tail that does not fill a block is dropped. The
  framing is the published one; the published code groups each ``datasets.map`` batch of 1000 documents
  separately (dropping each batch's tail, so its blocks depend on the batching), here the whole split is
  one stream (one tail dropped).
- ``pad`` (LM1B): one block per document, ``[BOS] + ids + [EOS]`` truncated to ``length`` *keeping the
  final EOS* (as Hugging Face truncation with special tokens does), then padded with ``pad_id``.

Inputs (``texts_or_files``): one path (str or Path) to a text file, or an iterable whose items are
documents (``str``), files (``pathlib.Path``) or :class:`TextFile` (a file, optionally a byte range of it).
A plain text file is one document in ``wrap`` mode (a single EOS at its end, like one long document) and one
document per non-blank line in ``pad`` mode (LM1B-style one sentence per line); ``docs="file"|"line"``
overrides that. Files must be UTF-8 (read as bytes, newlines kept as they are).

Writing is atomic: data goes to ``*.tmp-<pid>-<random>`` files that are renamed into place, the old
``meta.json`` is removed before the first rename and the new one renamed in last, so an interrupted build
never leaves a directory that looks complete. Builders of the same directory are serialised with an
exclusive ``flock`` on ``.lock`` (POSIX), so several processes may call :func:`build_shards` at once: one
tokenises, the others then find the finished shard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .tokenizers import EncodePool, Tokenizer, get_tokenizer
from ..step_budget import host_side

__all__ = ["build_shards", "BlockDataset", "TextFile", "SHARD_FORMAT"]

SHARD_FORMAT = "mdlm-shards-v1"
META, TOKENS, LENGTHS, LOCK = "meta.json", "tokens.bin", "lengths.bin", ".lock"

_READ_BYTES = 1 << 23      # file read size (8 MiB)
_PIECE_CHARS = 1 << 16     # longer texts are split so that encode_batch can spread one long document over cores
_BATCH_CHARS = 1 << 23     # characters per encode_batch call: bounds memory on big corpora
_BATCH_UNITS = 1 << 14
_VALIDATE_TOKENS = 1 << 24  # tokens per chunk when checking ids on open

# A split point where cutting a text in two and tokenising the halves gives the same ids as the whole:
# just before one space or newline that sits between two non-space characters. GPT-2's pre-tokenizer regex
# ends every match at whitespace and starts the next one at it (" word", "\n"), BERT splits on whitespace, and
# text8 is per character, so no token can span this point. (Runs of whitespace are never split: GPT-2 treats
# "\n\n" or "  x" differently from their halves.)
_SAFE_SPLIT = re.compile(r"(?<=\S)(?=[ \n]\S)")


@dataclasses.dataclass(frozen=True)
class TextFile:
    """A UTF-8 text file as input to :func:`build_shards`: bytes ``[start, end)`` (default the whole file),
    cut into documents per ``docs`` ("file" | "line"; default by mode, see the module docstring)."""
    path: str | os.PathLike
    start: int = 0
    end: int | None = None
    docs: str | None = None

    def __post_init__(self):
        if self.docs not in (None, "file", "line"):
            raise ValueError(f"TextFile.docs must be 'file', 'line' or None, got {self.docs!r}")


# --- reading ---------------------------------------------------------------------------------------------------

def _file_range(tf: TextFile) -> tuple[Path, int, int]:
    """Check the file exists and its range holds bytes; -> (path, start, end)."""
    path = Path(tf.path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty file")
    end = size if tf.end is None else min(int(tf.end), size)
    if not 0 <= tf.start < end:
        raise ValueError(f"{path}: empty byte range [{tf.start}, {end}) of a {size}-byte file")
    return path, int(tf.start), end


def _utf8_boundary(buf: bytes) -> int:
    """The largest cut <= len(buf) that does not split a UTF-8 sequence (invalid bytes are left for the decoder
    to report)."""
    j, k = len(buf) - 1, 0
    while j >= 0 and k < 3 and (buf[j] & 0xC0) == 0x80:      # continuation bytes
        j, k = j - 1, k + 1
    if j < 0:
        return len(buf)
    lead = buf[j]
    need = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 1
    return len(buf) if len(buf) - j >= need else j


def _decoded(tf: TextFile) -> Iterator[str]:
    """The file's text in pieces of about ``_READ_BYTES``; invalid UTF-8 -> ValueError with the byte offset."""
    path, start, end = _file_range(tf)
    with open(path, "rb") as f:
        f.seek(start)
        pos, carry = start, b""
        while pos < end:
            raw = f.read(min(_READ_BYTES, end - pos))
            if not raw:
                break
            buf_start, buf = pos - len(carry), carry + raw
            pos += len(raw)
            cut = len(buf) if pos >= end else _utf8_boundary(buf)
            try:
                text = buf[:cut].decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: invalid UTF-8 at byte offset {buf_start + e.start} "
                                 f"({e.reason}: {buf[e.start:e.start + 4]!r})") from None
            carry = buf[cut:]
            if text:
                yield text


def _last_safe_split(s: str) -> int:
    m = None
    for lo in (max(0, len(s) - _PIECE_CHARS), 0):       # the tail first; the whole text only if that fails
        for m in _SAFE_SPLIT.finditer(s, lo):
            pass
        if m is not None:
            return m.start()
    return 0


def _file_pieces(tf: TextFile) -> Iterator[str]:
    """A file as consecutive texts whose boundaries are safe split points (one document)."""
    pending = ""
    for text in _decoded(tf):
        pending += text
        cut = _last_safe_split(pending)
        if cut > 0:
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


def _file_lines(tf: TextFile) -> Iterator[str]:
    """The non-blank lines of a file, without their line ending."""
    pending = ""
    for text in _decoded(tf):
        lines = (pending + text).split("\n")
        pending = lines.pop()
        for ln in lines:
            if ln.strip():
                yield ln.rstrip("\r")
    if pending.strip():
        yield pending.rstrip("\r")


def _split_long(text: str) -> list[str]:
    """Pieces of about ``_PIECE_CHARS`` characters, cut only at safe split points."""
    if len(text) <= _PIECE_CHARS:
        return [text]
    out, start = [], 0
    while len(text) - start > _PIECE_CHARS:
        m = _SAFE_SPLIT.search(text, start + _PIECE_CHARS)
        if m is None:
            break
        out.append(text[start:m.start()])
        start = m.start()
    out.append(text[start:])
    return out


# --- inputs -> token units ----------------------------------------------------------------------------------------

class _Sources:
    """Tracks what was read (for meta.json and per-file error messages)."""

    def __init__(self):
        self.files: list[dict] = []        # {"path", "start", "end", "docs", "tokens"}
        self.n_texts = 0
        self.n_documents = 0

    def summary(self) -> list:
        out = [{k: f[k] for k in ("path", "start", "end", "docs")} for f in self.files]
        if self.n_texts:
            out.append(f"<{self.n_texts} in-memory documents>")
        return out

    def describe(self) -> str:
        parts = [f["path"] for f in self.files[:3]] + (["..."] if len(self.files) > 3 else [])
        if self.n_texts:
            parts.append(f"{self.n_texts} in-memory documents")
        return ", ".join(parts) or "no inputs"


def _as_textfile(item) -> TextFile | None:
    if isinstance(item, TextFile):
        return item
    if isinstance(item, os.PathLike):
        return TextFile(item)
    return None


def _units(items: Iterable, default_docs: str, sources: _Sources) -> Iterator[tuple[str, bool, int]]:
    """Inputs -> (text, ends_a_document, file index or -1) in order."""
    for k, item in enumerate(items):
        if isinstance(item, str):
            sources.n_texts += 1
            sources.n_documents += 1
            yield item, True, -1
            continue
        tf = _as_textfile(item)
        if tf is None:
            raise TypeError(f"build_shards input {k} is a {type(item).__name__}: expected a str (a document), "
                            "a pathlib.Path or a TextFile")
        path, start, end = _file_range(tf)
        docs = tf.docs or default_docs
        sources.files.append({"path": str(path), "start": start, "end": end, "docs": docs, "tokens": 0})
        idx = len(sources.files) - 1
        if docs == "file":
            sources.n_documents += 1
            for text in _file_pieces(tf):
                yield text, False, idx
            yield "", True, idx
        else:
            for line in _file_lines(tf):
                sources.n_documents += 1
                yield line, True, idx


def _encoded(units: Iterator[tuple[str, bool, int]], encode) -> Iterator[tuple[np.ndarray, bool, int]]:
    """Units -> (ids int64 (n,), ends_a_document, file index), encoding many texts per call."""
    batch, chars = [], 0

    def run(batch):
        pieces, owner = [], []
        for i, (text, _, _) in enumerate(batch):
            for p in _split_long(text):
                pieces.append(p)
                owner.append(i)
        ids = encode(pieces)
        per_unit: list[list] = [[] for _ in batch]
        for i, seq in zip(owner, ids):
            per_unit[i].append(seq)
        for (_, end, src), seqs in zip(batch, per_unit):
            arr = (np.asarray(seqs[0], dtype=np.int64) if len(seqs) == 1 else
                   np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=sum(map(len, seqs))))
            yield arr, end, src

    for u in units:
        batch.append(u)
        chars += len(u[0])
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_UNITS:
            yield from run(batch)
            batch, chars = [], 0
    if batch:
        yield from run(batch)


# --- token units -> blocks ----------------------------------------------------------------------------------------

class _WrapWriter:
    """Documents + EOS joined into one stream, cut into framed blocks (n, L): [BOS] stream[j:j+L-2] [EOS]."""

    def __init__(self, f, length: int, dtype, tok: Tokenizer, add_eos: bool):
        self.f, self.L, self.dtype, self.tok, self.add_eos = f, length, dtype, tok, add_eos
        self.body = length - 2
        self.flush_at = max(self.body * 256, 1 << 20)
        self.parts: list[np.ndarray] = []
        self.pending = 0
        self.n_blocks = 0
        self.eos = np.array([tok.eos_id], dtype=np.int64)

    def add(self, ids: np.ndarray, doc_end: bool) -> None:
        if ids.size:
            self.parts.append(ids)
            self.pending += ids.size
        if doc_end and self.add_eos:
            self.parts.append(self.eos)
            self.pending += 1
        if self.pending >= self.flush_at:
            self._flush()

    def _flush(self) -> None:
        if not self.parts:
            return
        stream = np.concatenate(self.parts)
        k = stream.size // self.body
        if k:
            out = np.empty((k, self.L), dtype=self.dtype)
            out[:, 0], out[:, -1] = self.tok.bos_id, self.tok.eos_id
            out[:, 1:-1] = stream[:k * self.body].reshape(k, self.body)
            out.tofile(self.f)
            self.n_blocks += k
        rest = stream[k * self.body:]
        self.parts, self.pending = ([rest] if rest.size else []), rest.size

    def finish(self) -> dict:
        self._flush()
        return {"dropped_tail_tokens": int(self.pending)}


class _PadWriter:
    """One block per document: [BOS] ids[:L-2] [EOS] (or [BOS] ids[:L-1] without EOS), padded with pad_id."""

    ROWS = 4096

    def __init__(self, f, lf, length: int, dtype, tok: Tokenizer, add_eos: bool):
        self.f, self.lf, self.L, self.dtype, self.tok, self.add_eos = f, lf, length, dtype, tok, add_eos
        self.cap = length - 1 - int(add_eos)          # room for document tokens
        self.cur: list[np.ndarray] = []
        self.rows = np.full((self.ROWS, length), tok.pad_id, dtype=dtype)
        self.lens = np.zeros(self.ROWS, dtype=np.int32)
        self.k = self.n_blocks = self.truncated = 0

    def add(self, ids: np.ndarray, doc_end: bool) -> None:
        self.cur.append(ids)
        if not doc_end:
            return
        ids = self.cur[0] if len(self.cur) == 1 else np.concatenate(self.cur)
        self.cur = []
        self.truncated += ids.size > self.cap
        body = ids[:self.cap]
        row, n = self.rows[self.k], body.size
        row[:] = self.tok.pad_id
        row[0] = self.tok.bos_id
        row[1:1 + n] = body
        if self.add_eos:
            row[1 + n] = self.tok.eos_id
        self.lens[self.k] = 1 + n + int(self.add_eos)
        self.k += 1
        if self.k == self.ROWS:
            self._flush()

    def _flush(self) -> None:
        self.rows[:self.k].tofile(self.f)
        self.lens[:self.k].tofile(self.lf)
        self.n_blocks += self.k
        self.k = 0

    def finish(self) -> dict:
        self._flush()
        return {"truncated_documents": int(self.truncated)}


# --- fingerprints, locking, atomic files -------------------------------------------------------------------------

def _source_fingerprint(items: list) -> str:
    """Documents by content; files by resolved path, range, size and modification time (as ``make`` does)."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, str):
            b = item.encode("utf-8", "surrogatepass")
            h.update(b"T%d:" % len(b) + b)
            continue
        tf = _as_textfile(item)
        if tf is None:
            raise TypeError(f"build_shards input is a {type(item).__name__}: expected a str (a document), "
                            "a pathlib.Path or a TextFile")
        p = Path(tf.path)
        st = p.stat() if p.is_file() else None
        h.update(repr(("F", str(p.resolve()), tf.start, tf.end, tf.docs,
                       st and st.st_size, st and st.st_mtime_ns)).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(out_dir: Path):
    try:
        import fcntl
    except ImportError:          # no flock (Windows): single builder assumed
        yield
        return
    with open(out_dir / LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tmp_name(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _read_meta(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / META).read_text())
    except (OSError, ValueError):
        return None


# --- build ---------------------------------------------------------------------------------------------------------

def build_shards(texts_or_files, out_dir: str | os.PathLike, tokenizer: Tokenizer | str, length: int,
                 mode: str = "wrap", num_workers: int | None = None, add_eos: bool = True, *,
                 docs: str | None = None, fingerprint: str | None = None, rebuild: bool = False) -> "BlockDataset":
    """Tokenise ``texts_or_files`` once into ``out_dir`` and open it; reuse the shard when the inputs match.

    texts_or_files: a path, or an iterable of documents (str) / files (Path, TextFile); see the module docstring.
    tokenizer: a :class:`Tokenizer` or a name for :func:`get_tokenizer`. length: tokens per block (>= 3).
    mode: "wrap" | "pad". num_workers: as :meth:`Tokenizer.encode_batch`. add_eos: EOS after each document.
    docs: "file" | "line" for plain files (default: "file" in wrap mode, "line" in pad mode).
    fingerprint: identifies the inputs instead of hashing them; lets ``texts_or_files`` be a lazy iterable
    (a generator) that is consumed only when a build is needed. Without it a one-shot iterable is first
    collected into a list (documents are hashed by content, files by path, size and mtime).
    rebuild: build even if a matching shard exists.

    Returns the :class:`BlockDataset` (n_blocks, length). Raises ValueError for malformed inputs (the file and
    byte offset of invalid UTF-8, an empty file, no tokens, fewer tokens than one block).
    """
    if mode not in ("wrap", "pad"):
        raise ValueError(f"mode must be 'wrap' or 'pad', got {mode!r}")
    length = int(length)
    if length < 3:
        raise ValueError(f"length must be >= 3 (BOS, EOS and at least one token), got {length}")
    if docs not in (None, "file", "line"):
        raise ValueError(f"docs must be 'file', 'line' or None, got {docs!r}")
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    items = [Path(texts_or_files)] if isinstance(texts_or_files, (str, os.PathLike)) else texts_or_files
    if fingerprint is None:
        items = items if isinstance(items, (list, tuple)) else list(items)
        for item in items:                         # fail on a missing / empty file before any tokenising
            tf = _as_textfile(item)
            if tf is not None:
                _file_range(tf)
        src_fp = _source_fingerprint(items)
    else:
        src_fp = "given:" + str(fingerprint)
    dtype = np.dtype(np.uint16 if tok.model_vocab_size <= 65536 else np.uint32)
    default_docs = docs or ("file" if mode == "wrap" else "line")
    key = {"format": SHARD_FORMAT, "mode": mode, "length": length, "add_eos": bool(add_eos), "docs": default_docs,
           "tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint, **tok.special_ids(), "sources": src_fp}
    fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        meta = _read_meta(out)
        if not rebuild and meta is not None and meta.get("fingerprint") == fp:
            try:
                return BlockDataset(out)
            except (OSError, ValueError):      # damaged since it was written: build it again
                pass
        for stale in out.glob("*.tmp-*"):      # left by an interrupted build (we hold the lock)
            stale.unlink(missing_ok=True)
        return _build(items, out, tok, length, mode, num_workers, bool(add_eos), default_docs, dtype, fp, key)


def _build(items, out: Path, tok: Tokenizer, length: int, mode: str, num_workers, add_eos: bool,
           default_docs: str, dtype, fp: str, key: dict) -> "BlockDataset":
    t0 = time.time()
    tmp_tokens, tmp_lengths = _tmp_name(out, TOKENS), _tmp_name(out, LENGTHS)
    sources = _Sources()
    pool = EncodePool(tok, num_workers) if num_workers is not None and num_workers > 1 else None
    try:
        encode = pool.encode_batch if pool is not None else (lambda t: tok.encode_batch(t, num_workers))
        text_tokens = 0
        with open(tmp_tokens, "wb") as f, (open(tmp_lengths, "wb") if mode == "pad" else
                                           contextlib.nullcontext()) as lf:
            writer = (_WrapWriter(f, length, dtype, tok, add_eos) if mode == "wrap" else
                      _PadWriter(f, lf, length, dtype, tok, add_eos))
            V = int(tok.model_vocab_size)
            for ids, end, src in _encoded(_units(items, default_docs, sources), encode):
                if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
                    # before the cast to the shard dtype, which would wrap an out-of-range id silently
                    bad = int(ids[(ids < 0) | (ids >= V)][0])
                    where = sources.files[src]["path"] if src >= 0 else "an in-memory document"
                    raise ValueError(f"{where}: tokenizer {tok.name!r} produced id {bad}, outside its model "
                                     f"vocabulary [0, {V})")
                writer.add(ids, end)
                text_tokens += ids.size
                if src >= 0:
                    sources.files[src]["tokens"] += int(ids.size)
            stats = writer.finish()
            n_blocks = writer.n_blocks
        for f in sources.files:
            if f["tokens"] == 0:
                raise ValueError(f"{f['path']}: no tokens (only whitespace or blank lines"
                                 f"{'' if f['start'] == 0 else ' in bytes %d..%d' % (f['start'], f['end'])})")
        if text_tokens == 0:
            raise ValueError(f"no tokens at all in the input ({sources.describe()})")
        if n_blocks == 0:
            raise ValueError(f"{text_tokens} tokens ({sources.describe()}) are fewer than one block: a {mode} block "
                             f"of length {length} holds {length - 2} tokens between BOS and EOS; use a smaller "
                             "length or more text")
        toks = np.memmap(tmp_tokens, dtype=dtype, mode="r", shape=(int(n_blocks), length))
        lens = np.fromfile(tmp_lengths, dtype=np.int32) if mode == "pad" else None
        digest = _new_digest(length, int(n_blocks), dtype.name, mode)
        for _, chunk in _row_chunks(toks):
            digest.update(chunk)
        if lens is not None:
            digest.update(lens)
        del toks
        meta = {"format": SHARD_FORMAT, "length": length, "mode": mode, "n_blocks": int(n_blocks),
                "checksum": "sha256:" + digest.hexdigest(),
                "dtype": dtype.name, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
                "model_vocab_size": tok.model_vocab_size, **tok.special_ids(), "add_eos": add_eos,
                "docs": default_docs, "sources": sources.summary(), "n_documents": sources.n_documents,
                "text_tokens": int(text_tokens), **stats, "fingerprint": fp, "fingerprint_inputs": key,
                "build_seconds": round(time.time() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        # commit: invalidate the old shard first, move the data in, meta.json last
        _fsync(tmp_tokens)
        (out / META).unlink(missing_ok=True)
        os.replace(tmp_tokens, out / TOKENS)
        if mode == "pad":
            _fsync(tmp_lengths)
            os.replace(tmp_lengths, out / LENGTHS)
        else:
            (out / LENGTHS).unlink(missing_ok=True)
        tmp_meta = _tmp_name(out, META)
        with open(tmp_meta, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_meta, out / META)
        with contextlib.suppress(OSError):   # make the renames durable (not possible on every platform)
            dfd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        if pool is not None:
            pool.close()
        for p in (tmp_tokens, tmp_lengths):
            p.unlink(missing_ok=True)
    return BlockDataset(out)


# --- reading shards ------------------------------------------------------------------------------------------------

def _new_digest(length: int, n_blocks: int, dtype: str, mode: str):
    """sha256 started with the layout meta.json gives the bytes (so the checksum also binds length / n_blocks /
    dtype / mode: changing them together keeps the file size but not the checksum); then the tokens.bin and
    lengths.bin bytes are fed to it."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": SHARD_FORMAT, "length": length, "n_blocks": n_blocks, "dtype": dtype,
                         "mode": mode}, sort_keys=True).encode() + b"\n")
    return h


def _row_chunks(tokens: np.ndarray):
    """(first row, rows) chunks of about ``_VALIDATE_TOKENS`` tokens of tokens (n, L): contiguous slices (for a
    memory map, consecutive byte ranges of the file)."""
    n, L = tokens.shape
    rows = max(1, _VALIDATE_TOKENS // L)
    for r0 in range(0, n, rows):
        yield r0, tokens[r0:r0 + rows]


def _meta_int(meta: dict, key: str, meta_path: Path, minimum: int) -> int:
    """meta[key] as an int >= minimum, else a ValueError naming the file and the key (a float such as 1e400 --
    JSON's inf -- or 64.0, a string, a bool or a missing key are malformed)."""
    if key not in meta:
        raise ValueError(f"{meta_path}: malformed shard metadata: key {key!r} is missing")
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{meta_path}: malformed shard metadata: {key!r} must be an integer >= {minimum}, "
                         f"got {v!r}")
    return v


class BlockDataset:
    """Blocks of token ids (n_blocks, length) with their attention masks, from a shard directory (memory-mapped,
    zero-copy) or from tensors (:meth:`from_tensor`).

    ``len(ds)`` = n_blocks; ``ds.length``; ``ds.meta`` (dict); ``ds.get(indices (n,)) -> (x0 LongTensor (n, L),
    attention_mask FloatTensor (n, L))``; ``ds[i] -> (x0 (L,), attention_mask (L,))``.
    Opening checks meta.json (``length``, ``n_blocks`` and ``model_vocab_size`` integers >= 1: every shard this
    library writes has them), the file sizes against it, and -- in one pass over tokens.bin -- that every id is
    below ``meta["model_vocab_size"]`` and the ``checksum`` (see the module docstring). ``validate=False`` skips
    the pass, e.g. in worker processes of an already checked shard. ``check_vocab(V)`` checks the ids against a
    model's vocabulary (the trainer calls it).
    """

    def __init__(self, path: str | os.PathLike, validate: bool = True):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path}: not a complete shard directory (no {META}; an interrupted build "
                                    "leaves none): build it with mdlm.data.build_shards")
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise TypeError(f"a JSON {type(meta).__name__}, not an object")
            mode, dtype = meta["mode"], np.dtype(meta["dtype"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path}: malformed shard metadata ({type(e).__name__}: {e})") from None
        n, L = _meta_int(meta, "n_blocks", meta_path, 1), _meta_int(meta, "length", meta_path, 1)
        # required: without it no id could be checked and ids past the vocabulary would reach the model
        _meta_int(meta, "model_vocab_size", meta_path, 1)
        checksum = meta.get("checksum")
        if checksum is not None and not (isinstance(checksum, str) and checksum.startswith("sha256:")):
            raise ValueError(f"{meta_path}: malformed shard metadata: 'checksum' must be 'sha256:<hex>', "
                             f"got {checksum!r}")
        if dtype not in (np.uint16, np.uint32) or mode not in ("wrap", "pad"):
            raise ValueError(f"{meta_path}: unsupported shard (dtype {dtype}, mode {mode!r}, {n} blocks of {L})")
        self.meta = meta
        self._ids_below = None   # the vocabulary bound the ids were checked against (None: not checked)
        tok_path = self.path / TOKENS
        self._tokens = np.memmap(self._checked(tok_path, n * L * dtype.itemsize, f"{n} blocks x {L} tokens x "
                                               f"{dtype.itemsize} bytes"), dtype=dtype, mode="r", shape=(n, L))
        self._lengths = self._mask = None
        if mode == "pad":
            lp = self._checked(self.path / LENGTHS, n * 4, f"{n} blocks x 4 bytes")
            self._lengths = np.fromfile(lp, dtype=np.int32)
            bad = np.flatnonzero((self._lengths < 1) | (self._lengths > L))
            if bad.size:
                b = int(bad[0])
                raise ValueError(f"{lp}: block {b} has length {int(self._lengths[b])}, outside 1..{L}")
        if validate:
            self.validate()

    def _checked(self, path: Path, expected: int, what: str) -> Path:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the shard (meta.json lists {what})")
        size = path.stat().st_size
        if size != expected:
            raise ValueError(f"{path}: {size} bytes, but {self.path / META} says {what} = {expected} bytes "
                             "(truncated or from another build)")
        return path

    @classmethod
    def from_tensor(cls, x0: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    meta: dict | None = None) -> "BlockDataset":
        """In-memory blocks: x0 (N, L) integer ids, attention_mask (N, L) (default all ones).

        ``meta`` may add e.g. ``model_vocab_size`` / ``mask_id`` (ids are then checked against the vocabulary).
        """
        if x0.dim() != 2 or x0.dtype.is_floating_point or x0.dtype == torch.bool:
            raise ValueError(f"x0 must be an (N, L) integer tensor, got {tuple(x0.shape)} {x0.dtype}")
        self = cls.__new__(cls)
        self.path = None
        self._tokens = x0.detach().cpu().long().numpy()
        n, L = self._tokens.shape
        self._lengths = self._mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (n, L):
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != x0 shape {(n, L)}")
            self._mask = attention_mask.detach().cpu().float().numpy()
        self.meta = {"format": "in-memory", "length": L, "n_blocks": n,
                     "mode": "wrap" if attention_mask is None else "pad", **(meta or {})}
        self._ids_below = None
        if n < 1:
            raise ValueError("x0 holds no blocks")
        self.validate()
        return self

    def validate(self) -> None:
        """Every id is >= 0 and below ``meta["model_vocab_size"]`` (when known), and for a shard on disk the
        ``checksum`` of meta.json matches the data (one pass, in chunks, so that big shards stay cheap; see the
        module docstring; a shard without a checksum: a one-line warning). A bad id -> ValueError naming the
        file, block and position; a checksum mismatch -> ValueError naming the file."""
        V = self.meta.get("model_vocab_size")
        digest = None
        if self.path is not None:
            if "checksum" in self.meta:
                n, L = self._tokens.shape
                digest = _new_digest(L, n, self._tokens.dtype.name, self.meta["mode"])
            else:
                warnings.warn(f"{self.path / META}: no checksum (a shard written before checksums): its tokens cannot "
                              "be verified; rebuild it to add one (build_shards(..., rebuild=True))", stacklevel=2)
        self._scan_ids(None if V is None else int(V), digest)
        if digest is not None:
            if self._lengths is not None:
                digest.update(self._lengths)
            got = "sha256:" + digest.hexdigest()
            if got != self.meta["checksum"]:
                raise ValueError(f"{self.path / TOKENS}: checksum mismatch: {self.path / META} says "
                                 f"{self.meta['checksum']}, the data with meta.json's layout (length "
                                 f"{self.meta['length']}, n_blocks {self.meta['n_blocks']}, dtype "
                                 f"{self.meta['dtype']}, mode {self.meta['mode']}) gives {got}: the tokens or "
                                 "meta.json changed after the build; rebuild the shard")

    def check_vocab(self, vocab_size: int) -> None:
        """Every id is below ``vocab_size`` (a model's vocabulary, MASK included): free when the ids were already
        checked against a bound <= vocab_size (``validate``: meta's ``model_vocab_size``), else one scan. A bad
        id -> ValueError naming the file (or in-memory blocks), block and position."""
        below = getattr(self, "_ids_below", None)
        if below is not None and below <= int(vocab_size):
            return
        self._scan_ids(int(vocab_size), None, what=f"the model's vocabulary size {int(vocab_size)}")

    def _scan_ids(self, V: int | None, digest, what: str | None = None) -> None:
        """Check ids >= 0 and < V (V None: only >= 0) chunk by chunk, feeding each chunk to ``digest``."""
        L = self._tokens.shape[1]
        for r0, chunk in _row_chunks(self._tokens):
            if digest is not None:
                digest.update(chunk)
            too_big = V is not None and int(chunk.max()) >= V
            negative = chunk.dtype.kind == "i" and int(chunk.min()) < 0
            if too_big or negative:
                flat = int(np.flatnonzero((chunk < 0) | (chunk >= (V if V is not None else np.inf)))[0])
                b, c = r0 + flat // L, flat % L
                where = self.path / TOKENS if self.path is not None else "in-memory blocks"
                raise ValueError(f"{where}: token id {int(self._tokens[b, c])} at block {b}, position {c} is "
                                 f"outside the vocabulary ({what or f'model_vocab_size {V}'})")
        if V is not None:
            self._ids_below = V

    def __len__(self) -> int:
        return self._tokens.shape[0]

    @property
    def length(self) -> int:
        return self._tokens.shape[1]

    @property
    def tokens(self) -> np.ndarray:
        """The blocks (n_blocks, length) as stored (memory-mapped for a shard)."""
        return self._tokens

    @property
    def lengths(self) -> np.ndarray | None:
        """Valid tokens per block (n_blocks,) int32 in pad mode, else None."""
        return self._lengths

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """indices (n,) -> (x0 LongTensor (n, L), attention_mask FloatTensor (n, L))."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(self)
        with host_side():   # host data: reading it synchronises nothing
            if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
                raise IndexError(f"block index out of range for {n} blocks (got min {int(idx.min())}, "
                                 f"max {int(idx.max())})")
        sel = idx.numpy()
        x0 = torch.from_numpy(np.asarray(self._tokens[sel], dtype=np.int64))
        if self._mask is not None:
            mask = torch.from_numpy(np.ascontiguousarray(self._mask[sel]))
        elif self._lengths is not None:
            valid = torch.from_numpy(self._lengths[sel].astype(np.int64))
            mask = (torch.arange(self.length) < valid[:, None]).float()
        else:
            mask = torch.ones(x0.shape, dtype=torch.float32)
        return x0, mask

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.get(torch.arange(len(self))[i])
        if torch.is_tensor(i) or isinstance(i, (list, tuple, np.ndarray)):
            return self.get(i)
        x0, mask = self.get(torch.tensor([int(i)]))
        return x0[0], mask[0]

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "in-memory"
        return f"BlockDataset({where}, n_blocks={len(self)}, length={self.length}, mode={self.meta.get('mode')!r})"

    # a shard pickles as its path (worker processes reopen the memory map instead of copying the data)
    def __getstate__(self):
        if self.path is not None:
            return {"_reopen": str(self.path)}
        return self.__dict__

    def __setstate__(self, state):
        if "_reopen" in state:
            self.__init__(state["_reopen"], validate=False)
        else:
            self.__dict__.update(state)
