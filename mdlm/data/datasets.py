"""Named datasets -> cached token shards: ``prepare_dataset(name, split) -> BlockDataset``.

Local (no network, no ``datasets`` package):

- ``tinyshakespeare``: ``corpora/tinyshakespeare/input.txt``; "train" = the first 90% of the characters,
  "validation" = the rest (the split of :func:`mdlm.data.load_corpus_tokens`); the split is one document.
- ``wikitext2``: the shipped ``wiki.valid.tokens`` ("validation") and ``wiki.test.tokens`` ("test"), plus
  ``wiki.test.raw`` ("test_raw": the ``wikitext-2-raw-v1`` test rows the published loader reads). Each line is
  one row as in Hugging Face's ``wikitext`` (blank lines are empty rows, which still get their EOS), put
  through the published WikiText detokenizer. The ``.tokens`` files keep ``<unk>``. "train" is not shipped:
  it comes from ``datasets`` (``wikitext-2-raw-v1``) when that is installed.
- ``text:<path>[<os.pathsep><path>...]`` (globs allowed): local UTF-8 text files; "train" = the first 90%
  of each file's bytes (cut after a newline), "validation" = the rest, "all" = everything.
- ``text8``: the published 90M / 5M / 5M character split of ``text8`` cut into ``length``-character
  documents (the published ``get_text8_dataset``), read from ``<data_dir>/corpora/text8/text8[.zip]`` or
  ``<cache_dir>/text8/``. Nothing is downloaded: without the file a one-line FileNotFoundError says where to
  put it (the published loader fetches ``TEXT8_URL`` itself). The published run validates on "test".

Through Hugging Face ``datasets`` (imported only when a shard has to be built; a clear ImportError without
it): openwebtext (train = all but the last 100k documents, validation = the last 100k), lm1b (BERT, pad
mode, length 128), wikitext2 (train) / wikitext103, ptb, lambada (the published OpenAI test file), ag_news,
scientific_papers_arxiv / scientific_papers_pubmed. Defaults (tokenizer, mode, length) are the published
ones; "validation" means "test" where a dataset has no validation split (lm1b, ag_news, lambada), as the
published loader does.

Shards are cached in ``cache_dir`` (default ``$MDLM_CACHE_DIR`` or ``~/.cache/mdlm/shards``) under
``<dataset>/<split>-<tokenizer>-L<length>-<mode>``; a shard whose inputs changed is rebuilt.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import zipfile
from pathlib import Path
from typing import Iterator

from ._local import data_dir
from .detokenizers import get_detokenizer
from .shards import BlockDataset, TextFile, build_shards
from .tokenizers import Tokenizer, get_tokenizer

__all__ = ["DATASETS", "DatasetSpec", "prepare_dataset", "default_cache_dir", "offline_datasets"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its published defaults and where its documents come from.

    hf: (path, config, text field) for ``datasets.load_dataset``; hf_splits maps our split to theirs.
    local_splits: splits available without ``datasets``. aliases: split names that mean another split.
    eval_split: the split the published run validates on.
    """
    name: str
    tokenizer: str = "gpt2"
    mode: str = "wrap"
    length: int = 1024
    splits: tuple = ("train", "validation", "test")
    local_splits: tuple = ()
    aliases: tuple = ()                 # ((alias, split), ...)
    detokenizer: str | None = None      # name for get_detokenizer
    hf: tuple | None = None
    hf_splits: tuple = ()               # ((split, hf split expression), ...)
    trust_remote_code: bool = False
    eval_split: str = "validation"

    def resolve_split(self, split: str) -> str:
        split = {"val": "validation", "valid": "validation"}.get(split, split)
        split = dict(self.aliases).get(split, split)
        if split not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; splits: {list(self.splits)}")
        return split


_TEST_ONLY = (("validation", "test"),)
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("tinyshakespeare", splits=("train", "validation"), local_splits=("train", "validation")),
    DatasetSpec("wikitext2", splits=("train", "validation", "test", "test_raw"),
                local_splits=("validation", "test", "test_raw"), detokenizer="wikitext",
                hf=("wikitext", "wikitext-2-raw-v1", "text")),
    DatasetSpec("text8", tokenizer="text8", length=256, local_splits=("train", "validation", "test"),
                eval_split="test"),
    DatasetSpec("openwebtext", splits=("train", "validation"), hf=("openwebtext", None, "text"),
                hf_splits=(("train", "train[:-100000]"), ("validation", "train[-100000:]"))),
    DatasetSpec("lm1b", tokenizer="bert-base-uncased", mode="pad", length=128, splits=("train", "test"),
                aliases=_TEST_ONLY, detokenizer="lm1b", hf=("lm1b", None, "text"), eval_split="test"),
    DatasetSpec("wikitext103", detokenizer="wikitext", hf=("wikitext", "wikitext-103-raw-v1", "text")),
    DatasetSpec("ptb", detokenizer="ptb", hf=("ptb_text_only", None, "sentence")),
    DatasetSpec("lambada", splits=("test",), aliases=_TEST_ONLY, detokenizer="lambada", eval_split="test",
                hf=("json", None, "text"), hf_splits=(("test", "train"),)),
    DatasetSpec("ag_news", splits=("train", "test"), aliases=_TEST_ONLY, hf=("ag_news", None, "text"),
                eval_split="test"),
    DatasetSpec("scientific_papers_arxiv", detokenizer="scientific_papers", trust_remote_code=True,
                hf=("scientific_papers", "arxiv", "article")),
    DatasetSpec("scientific_papers_pubmed", detokenizer="scientific_papers", trust_remote_code=True,
                hf=("scientific_papers", "pubmed", "article")),
]}

LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_SPLITS = {"train": (0, 90_000_000), "validation": (90_000_000, 95_000_000), "test": (95_000_000, None)}
TRAIN_FRACTION = 0.9
# bump when a detokenizer's rules change, so that shards built with the old rules are rebuilt (the Hugging Face
# sources are identified by name and split only: a new upstream revision needs a new cache_dir or rebuild)
DETOKENIZER_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("MDLM_CACHE_DIR") or Path.home() / ".cache" / "mdlm" / "shards")


# --- document sources: each returns (documents, fingerprint or None = hash the documents) -----------------------

def _shipped(rel: str) -> Path:
    root = data_dir(required=False)
    path = root / rel if root is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"shipped data file {rel} not found (looked in {root}); set MDLM_DATA_DIR to the "
                                "folder holding corpora/ and tokenizers/")
    return path


def _tinyshakespeare(split: str):
    text = _shipped("corpora/tinyshakespeare/input.txt").read_text(encoding="utf-8")
    cut = int(len(text) * TRAIN_FRACTION)
    return [text[:cut] if split == "train" else text[cut:]], None


def _wikitext_rows(path: Path) -> list[str]:
    """The rows Hugging Face's ``wikitext`` builds from a file: each line with its newline, blank ones as ""."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln + "\n" if ln.strip() else "" for ln in lines]


def _wikitext2_local(split: str):
    name = {"validation": "wiki.valid.tokens", "test": "wiki.test.tokens", "test_raw": "wiki.test.raw"}[split]
    detok = get_detokenizer("wikitext")
    return [detok(r) for r in _wikitext_rows(_shipped(f"corpora/wikitext-2/{name}"))], None


def _text_files(spec: str, split: str):
    entries = [e for e in spec.split(os.pathsep) if e]
    paths: list[Path] = []
    for e in entries:
        hits = sorted(glob.glob(os.path.expanduser(e))) if glob.has_magic(e) else [os.path.expanduser(e)]
        if not hits:
            raise FileNotFoundError(f"text:{spec}: no file matches {e!r}")
        paths += [Path(h) for h in hits]
    files = []
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"text file not found: {p}")
        if split == "all":
            files.append(TextFile(p))
            continue
        cut = _line_cut(p, TRAIN_FRACTION)
        files.append(TextFile(p, 0, cut) if split == "train" else TextFile(p, cut, None))
    return files, None


def _line_cut(path: Path, fraction: float) -> int:
    """The byte offset just after the first newline at or after ``fraction`` of the file (its size if none)."""
    size = path.stat().st_size
    pos = int(size * fraction)
    with open(path, "rb") as f:
        f.seek(pos)
        while True:
            block = f.read(1 << 16)
            if not block:
                return size
            i = block.find(b"\n")
            if i >= 0:
                return pos + i + 1
            pos += len(block)


def _text8_documents(split: str, length: int, cache_root: Path) -> Iterator[str]:
    text = _text8_text(cache_root)
    lo, hi = TEXT8_SPLITS[split]
    part = text[lo:hi]
    for i in range(len(part) // length):        # the incomplete last chunk is dropped, as published
        yield part[i * length:(i + 1) * length]


def _text8_places(cache_root: Path) -> tuple[list[Path], list[Path]]:
    roots = [cache_root / "text8"]
    if data_dir(required=False) is not None:
        roots.insert(0, data_dir(required=False) / "corpora" / "text8")
    return roots, [r / f for r in roots for f in ("text8", "text8.zip")]


def _text8_source_stamp(cache_root: Path) -> str:
    """Path, size and mtime of the local text8 file the shard would be built from ("none" if absent), so a
    replaced file rebuilds the shard."""
    found = next((p for p in _text8_places(cache_root)[1] if p.is_file()), None)
    if found is None:
        return "none"
    st = found.stat()
    return f"{found.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _text8_text(cache_root: Path) -> str:
    roots, places = _text8_places(cache_root)
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        # nothing is downloaded by this library (the published loader fetches TEXT8_URL itself): one line, and
        # the CLI exits with status 2
        raise FileNotFoundError(f"text8 is not available offline: download {TEXT8_URL} yourself and put text8.zip "
                                f"(or the unzipped text8) in one of: {', '.join(str(r) for r in roots)}")
    if found.suffix == ".zip":
        with zipfile.ZipFile(found) as z:
            return z.read("text8").decode("utf-8")
    return found.read_text(encoding="utf-8")


def offline_datasets() -> list[str]:
    """Names that build without ``datasets`` and without a download, given the files present: the shipped
    corpora found in the data folder, text8 when its file is in place, and ``text:<path>``."""
    root = data_dir(required=False)
    out = []
    if root is not None and (root / "corpora" / "tinyshakespeare" / "input.txt").is_file():
        out.append("tinyshakespeare")
    if root is not None and (root / "corpora" / "wikitext-2").is_dir():
        out.append("wikitext2 (validation, test)")
    if _text8_source_stamp(default_cache_dir()) != "none":
        out.append("text8")
    return out + ["text:<path>"]


def _require_datasets(spec: DatasetSpec, split: str):
    try:
        import datasets
    except ImportError as e:
        extra = (f"; split(s) {list(spec.local_splits)} are available locally" if spec.local_splits else "")
        raise ImportError(f"dataset {spec.name!r} split {split!r} needs the Hugging Face 'datasets' package (which "
                          f"downloads it), and it is not installed (pip install datasets){extra}. Datasets that work "
                          f"offline here: {', '.join(offline_datasets())}") from e
    return datasets


def _hf_documents(spec: DatasetSpec, split: str) -> Iterator[str]:
    datasets = _require_datasets(spec, split)
    path, config, field = spec.hf
    kw = {"trust_remote_code": True} if spec.trust_remote_code else {}
    if spec.name == "lambada":
        kw["data_files"] = LAMBADA_URL
    ds = datasets.load_dataset(path, config, split=dict(spec.hf_splits).get(split, split), **kw)
    detok = get_detokenizer(spec.detokenizer) if spec.detokenizer else None
    for batch in ds.iter(batch_size=1024):
        for text in batch[field]:
            yield detok(text) if detok else text


# --- the entry point --------------------------------------------------------------------------------------------------

def _text_spec(name: str) -> DatasetSpec:
    return DatasetSpec(name, splits=("train", "validation", "all"), local_splits=("train", "validation", "all"))


def _safe(name: str) -> str:
    if name.startswith("text:"):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name[5:].split(os.pathsep)[0]).stem)[:40]
        paths = os.pathsep.join(str(Path(os.path.expanduser(p)).resolve()) for p in name[5:].split(os.pathsep))
        return f"text-{stem}-{hashlib.sha1(paths.encode()).hexdigest()[:10]}"
    return name


def prepare_dataset(name: str, split: str, tokenizer: Tokenizer | str | None = None, length: int | None = None,
                    mode: str | None = None, cache_dir: str | os.PathLike | None = None,
                    num_workers: int | None = None) -> BlockDataset:
    """The shard of ``name`` / ``split`` (built on first use, then reused): a :class:`BlockDataset` of blocks
    (n_blocks, length). ``tokenizer`` / ``length`` / ``mode`` default to the dataset's published ones.

    Raises ValueError for an unknown name or split, FileNotFoundError for missing local files, ImportError
    when the shard must be built from a ``datasets``-backed source and ``datasets`` is not installed.
    """
    if name.startswith("text:"):
        spec = _text_spec(name)
    elif name in DATASETS:
        spec = DATASETS[name]
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} or 'text:<path>'")
    split = spec.resolve_split(split)
    tok = get_tokenizer(tokenizer or spec.tokenizer) if not isinstance(tokenizer, Tokenizer) else tokenizer
    length = int(length or spec.length)
    mode = mode or spec.mode
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache_root / _safe(name) / f"{split}-{tok.name}-L{length}-{mode}"

    if name.startswith("text:"):
        docs, fp = _text_files(name[5:], split)
    elif name == "tinyshakespeare":
        docs, fp = _tinyshakespeare(split)
    elif name == "wikitext2" and split in spec.local_splits:
        docs, fp = _wikitext2_local(split)
    elif name == "text8":
        # lazy: the 100 MB corpus is read (or fetched) only when the shard has to be built
        docs, fp = _text8_documents(split, length, cache_root), \
            f"text8:{TEXT8_SPLITS[split]}:{length}:{_text8_source_stamp(cache_root)}"
    else:
        # lazy too, so that a shard built elsewhere is usable without `datasets`; with no shard yet, fail
        # before anything is created on disk
        if not (out / "meta.json").is_file():
            _require_datasets(spec, split)
        docs, fp = _hf_documents(spec, split), f"hf:{spec.hf}:{dict(spec.hf_splits).get(split, split)}:" \
                                              f"{spec.detokenizer}:detok-v{DETOKENIZER_VERSION}"
    return build_shards(docs, out, tok, length, mode, num_workers, fingerprint=fp)
