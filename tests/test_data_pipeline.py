"""mdlm.data pipeline: tokenizers, detokenizers, shards (wrap / pad, cache, atomicity, malformed data),
the resumable batch sampler and prepare_dataset."""
import json
import pickle

import numpy as np
import pytest
import torch

import mdlm.data as D
from mdlm.data import detokenizers as dt
from mdlm.data import shards


def _shipped(rel=""):
    d = D.data_dir(required=False)
    if d is None or not (d / rel).exists():
        pytest.skip(f"shipped data {rel or 'folder'} not found (set MDLM_DATA_DIR to shared/data)")
    return d / rel


def _tok(name="gpt2"):
    pytest.importorskip("tokenizers", reason="the GPT-2 / BERT tokenizers need the 'tokenizers' package")
    _shipped(f"tokenizers/{name}")
    return D.get_tokenizer(name)


DOCS = ["First document, with some words in it.", "A second one\nover two lines.", "",
        "Third: numbers 1 2 3, unicode caf\u00e9 \u2014 and more text to fill a few blocks. " * 3]


# --- tokenizers ------------------------------------------------------------------------------------------------

def test_gpt2_tokenizer_ids():
    tok = _tok("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.model_vocab_size, tok.mask_id) == (50257, 50258, 50257)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (50256, 50256, 50257)   # published: [PAD] added at 50257
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]                # EOS written in text is one token
    assert tok.decode([15496, 995, 50257]) == "Hello world[MASK]"


def test_bert_tokenizer_ids():
    tok = _tok("bert-base-uncased")
    assert tok.encode("Hello world") == [7592, 2088]        # README: [101, 7592, 2088, 102] with [CLS]/[SEP]
    assert tok.encode("Hello, WORLD! unaffable") == [7592, 1010, 2088, 999, 14477, 20961, 3468]
    assert (tok.vocab_size, tok.model_vocab_size, tok.mask_id) == (30522, 30522, 103)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (101, 102, 0)
    assert tok.decode([101, 7592, 2088, 103, 102]) == "[CLS] hello world [MASK] [SEP]"


def test_text8_tokenizer():
    tok = D.get_tokenizer("text8")
    assert tok.encode("ab z") == [8, 9, 34, 33] and tok.encode("A!") == [8, 7]     # lower-cased; ! -> [UNK]
    assert (tok.vocab_size, tok.model_vocab_size, tok.mask_id, tok.bos_id, tok.eos_id, tok.pad_id) == \
        (35, 35, 4, 2, 3, 5)
    assert tok.decode([2, 8, 4, 34]) == "[BOS]a[MASK] "
    with pytest.raises(ValueError, match="unknown tokenizer"):
        D.get_tokenizer("nope")


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased"])
def test_encode_batch_matches_encode(name):
    tok = _tok(name)
    texts = DOCS + [" leading space", "tabs\tand  double  spaces\n\n", "\u00e9\u00e8 \u4e2d\u6587 \U0001F600"]
    want = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == want
    assert tok.encode_batch(texts, num_workers=1) == want
    assert tok.encode_batch(texts, num_workers=2) == want        # forked worker processes


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased"])
def test_safe_split_points_keep_tokenization(name, monkeypatch):
    """Long texts are cut before a lone space/newline between non-spaces; the ids must not change."""
    tok = _tok(name)
    text = _shipped("corpora/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:30000]
    text += _shipped("corpora/wikitext-2/wiki.test.raw").read_text(encoding="utf-8")[:30000]
    text += "  double  spaces\n\nand\n \nodd  \n white\u00a0 space\u3000x \t tab 's 're 123 456 " * 50
    monkeypatch.setattr(shards, "_PIECE_CHARS", 300)
    pieces = shards._split_long(text)
    assert len(pieces) > 100 and "".join(pieces) == text
    assert [i for p in tok.encode_batch(pieces) for i in p] == tok.encode(text)


# --- detokenizers (expected outputs derived by hand from the published rules) ------------------------------------

def test_wikitext_detokenizer():
    assert dt.wikitext_detokenizer(" = = Early life = = \n") == " == Early life ==\n"
    src = ("The team 's 1 @,@ 000 fans ( the \" Reds \" ) won 3 @-@ 2 . It was 20 @.@ 5 \u00b0 warm ; "
           "the players ' wages rose , too : 2 N .")
    assert dt.wikitext_detokenizer(src) == ("The team's 1,000 fans (the \"Reds\") won 3-2. It was 20.5\u00b0warm; "
                                            "the players' wages rose, too: 2 1 .")
    assert dt.wikitext_detokenizer("a /' 5/ b") == "a /'[0-9]/ b"       # the published regex quirk


def test_ptb_lm1b_lambada_scientific_detokenizers():
    assert dt.ptb_detokenizer("the company 's chief said it wo n't pay $ N million or N N \\/ share <unk> .") == \
        "the company's chief said it won't pay $1 million or 1 1 / share ? ."
    assert dt.lm1b_detokenizer("He said \" it 's fine \" ( really ) , see http : / / x.com / a . "
                               "Cost : $ 5 or \u00a3 3 ?") == \
        "He said \"it's fine\" (really), see http://x.com/a. Cost: $5 or \u00a33?"
    assert dt.lm1b_detokenizer("Hello , world !") == "Hello, world!"
    assert dt.lambada_detokenizer("  \u201cHi,\u201d she said.  \n") == "\n\"Hi,\" she said."
    assert dt.scientific_papers_detokenizer("we use ( see @xcite ) 10 @,@ 000 samples .") == \
        "we use (see @xcite) 10,000 samples."


def test_get_detokenizer():
    assert D.get_detokenizer("wikitext2") is dt.wikitext_detokenizer
    assert D.get_detokenizer("wikitext103") is dt.wikitext_detokenizer
    assert D.get_detokenizer("ptb") is dt.ptb_detokenizer
    assert D.get_detokenizer("lm1b") is dt.lm1b_detokenizer
    assert D.get_detokenizer("lambada") is dt.lambada_detokenizer
    assert D.get_detokenizer("scientific_papers_pubmed") is dt.scientific_papers_detokenizer
    for name in ("openwebtext", "text8", "ag_news", "tinyshakespeare"):
        assert D.get_detokenizer(name) is None


# --- shards: wrap / pad ----------------------------------------------------------------------------------------

def test_wrap_shards_equal_wrap_chunks(tmp_path):
    tok = _tok()
    ds = D.build_shards(DOCS * 3, tmp_path / "s", tok, 16)
    stream = torch.tensor([i for d in DOCS * 3 for i in tok.encode(d) + [tok.eos_id]])
    want = D.wrap_chunks(stream, 16, bos=tok.bos_id, eos=tok.eos_id)
    x0, mask = ds.get(torch.arange(len(ds)))
    assert torch.equal(x0, want) and x0.dtype == torch.int64
    assert mask.dtype == torch.float32 and torch.all(mask == 1)
    assert ds.length == 16 and len(ds) == want.shape[0]
    m = ds.meta
    assert (m["mode"], m["n_blocks"], m["dtype"], m["tokenizer"], m["model_vocab_size"], m["mask_id"]) == \
        ("wrap", len(ds), "uint16", "gpt2", 50258, 50257)
    assert m["dropped_tail_tokens"] == stream.numel() % 14
    x, mk = ds[3]
    assert torch.equal(x, want[3]) and mk.shape == (16,)
    assert np.fromfile(tmp_path / "s" / "tokens.bin", dtype=np.uint16).size == want.numel()


def test_wrap_file_streaming_matches_whole_text(tmp_path, monkeypatch):
    """A file read in tiny chunks (UTF-8 sequences cut across reads) and encoded in pieces gives the ids of the
    whole text, as one document followed by a single EOS."""
    tok = _tok()
    text = ("caf\u00e9 \u2014 na\u00efve \U0001F600 text, line one\nline two  with  spaces\n\n" * 40)
    f = tmp_path / "doc.txt"
    f.write_text(text, encoding="utf-8")
    monkeypatch.setattr(shards, "_READ_BYTES", 7)
    monkeypatch.setattr(shards, "_PIECE_CHARS", 50)
    ds = D.build_shards(f, tmp_path / "s", tok, 32)
    want = D.wrap_chunks(torch.tensor(tok.encode(text) + [tok.eos_id]), 32)
    assert torch.equal(ds.get(torch.arange(len(ds)))[0], want)
    assert ds.meta["sources"][0]["path"] == str(f) and ds.meta["docs"] == "file"


def test_pad_mode_blocks_lengths_and_masks(tmp_path):
    tok = _tok("bert-base-uncased")
    docs = ["hello world", "", "a b c d e f g h i j k l m n o p"]
    ds = D.build_shards(docs, tmp_path / "p", tok, 8, mode="pad")
    x0, mask = ds.get(torch.arange(3))
    hw = tok.encode("hello world")
    assert x0[0].tolist() == [101, *hw, 102, 0, 0, 0, 0]
    assert x0[1].tolist() == [101, 102, 0, 0, 0, 0, 0, 0]                 # an empty document: [BOS][EOS]
    assert x0[2].tolist() == [101, *tok.encode("a b c d e f")] + [102]   # truncated, EOS kept (published)
    assert mask.tolist() == [[1] * 4 + [0] * 4, [1] * 2 + [0] * 6, [1] * 8]
    assert ds.lengths.tolist() == [4, 2, 8] and ds.meta["truncated_documents"] == 1
    # a file in pad mode: one document per non-blank line
    f = tmp_path / "lines.txt"
    f.write_text("hello world\n\n   \nsecond line\r\nlast", encoding="utf-8")
    ds2 = D.build_shards(f, tmp_path / "p2", tok, 8, mode="pad")
    assert len(ds2) == 3 and ds2.meta["docs"] == "line"
    assert ds2[1][0].tolist()[:4] == [101, *tok.encode("second line"), 102]


# --- shards: cache, atomicity ----------------------------------------------------------------------------------

def test_cache_reuse_and_rebuild(tmp_path):
    tok = _tok()
    out = tmp_path / "c"
    ds = D.build_shards(DOCS, out, tok, 8)
    created = ds.meta["created"], ds.meta["fingerprint"]
    meta_mtime = (out / "meta.json").stat().st_mtime_ns
    again = D.build_shards(list(DOCS), out, tok, 8)            # same inputs: reused, nothing rewritten
    assert (again.meta["created"], again.meta["fingerprint"]) == created
    assert (out / "meta.json").stat().st_mtime_ns == meta_mtime
    changed = D.build_shards(DOCS + ["one more document here, long enough to add blocks"], out, tok, 8)
    assert changed.meta["fingerprint"] != created[1] and len(changed) > len(ds)
    other_len = D.build_shards(DOCS, out, tok, 12)
    assert other_len.length == 12
    pad = D.build_shards(DOCS, out, tok, 12, mode="pad")
    assert pad.meta["mode"] == "pad" and (out / "lengths.bin").is_file()
    back = D.build_shards(DOCS, out, tok, 12)
    assert back.meta["mode"] == "wrap" and not (out / "lengths.bin").exists()
    # files: a changed file rebuilds
    f = tmp_path / "t.txt"
    f.write_text("some text for the file " * 10)
    a = D.build_shards(f, tmp_path / "f", tok, 8)
    f.write_text("different text now, longer " * 20)
    b = D.build_shards(f, tmp_path / "f", tok, 8)
    assert b.meta["fingerprint"] != a.meta["fingerprint"] and len(b) > len(a)


def test_atomicity_incomplete_dirs_and_temp_files(tmp_path):
    tok = _tok()
    out = tmp_path / "a"
    out.mkdir()
    (out / "tokens.bin").write_bytes(b"\0" * 64)           # data without meta.json: not a shard
    (out / "tokens.bin.tmp-123-deadbeef").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        D.BlockDataset(out)
    ds = D.build_shards(DOCS, out, tok, 8)
    assert len(ds) > 0 and not list(out.glob("*.tmp-*"))   # stale temp files are cleaned up
    good = ds.get(torch.arange(len(ds)))[0]

    def failing():
        yield "a document that is tokenised"
        raise RuntimeError("crash in the middle of a build")

    with pytest.raises(RuntimeError, match="crash"):
        D.build_shards(failing(), out, tok, 8, fingerprint="another input")
    again = D.BlockDataset(out)                             # the previous complete shard is untouched
    assert torch.equal(again.get(torch.arange(len(again)))[0], good)
    assert not list(out.glob("*.tmp-*"))


def _build_in_child(out, q):
    ds = D.build_shards(DOCS * 50, out, D.get_tokenizer("gpt2"), 8)
    q.put(((out / "meta.json").stat().st_ino, len(ds)))


def test_concurrent_builders_build_once(tmp_path):
    """Two processes building the same shard at once: one tokenises (flock), the other reuses its result."""
    import multiprocessing as mp
    _tok()
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(tmp_path / "s", q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0] == got[1]          # same meta.json file (one build) and the same blocks


def test_lazy_input_with_fingerprint_is_not_read_when_cached(tmp_path):
    tok = _tok()
    D.build_shards(iter(DOCS), tmp_path / "l", tok, 8, fingerprint="v1")

    def boom():
        raise AssertionError("should not be read")
        yield

    assert len(D.build_shards(boom(), tmp_path / "l", tok, 8, fingerprint="v1")) > 0


def test_blockdataset_pickles_as_path_and_from_tensor(tmp_path):
    tok = _tok()
    ds = D.build_shards(DOCS, tmp_path / "s", tok, 8)
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2.path == ds.path and torch.equal(ds2.get([0, 1])[0], ds.get([0, 1])[0])
    x0 = torch.randint(0, 10, (5, 6))
    mem = D.BlockDataset.from_tensor(x0)
    assert len(mem) == 5 and mem.length == 6 and torch.equal(mem.get(torch.tensor([4, 0]))[0], x0[[4, 0]])
    am = torch.ones(5, 6)
    am[:, 4:] = 0
    mem = D.BlockDataset.from_tensor(x0, am, meta={"model_vocab_size": 10, "mask_id": 9})
    assert torch.equal(mem.get([2])[1], am[[2]]) and mem.meta["mask_id"] == 9
    assert "mask_id" not in D.BlockDataset.from_tensor(x0).meta
    with pytest.raises(ValueError, match="block 1, position 2"):
        bad = x0.clone()
        bad[1, 2] = 10
        D.BlockDataset.from_tensor(bad, meta={"model_vocab_size": 10})
    with pytest.raises(IndexError):
        mem.get([5])


# --- malformed data ----------------------------------------------------------------------------------------------

def test_invalid_utf8_names_file_and_byte_offset(tmp_path, monkeypatch):
    tok = _tok()
    f = tmp_path / "bad.txt"
    f.write_bytes("ok caf\u00e9 text\n".encode() + b"abc\xff\xfedef\n")
    with pytest.raises(ValueError, match=r"bad\.txt: invalid UTF-8 at byte offset 17"):
        D.build_shards(f, tmp_path / "s", tok, 4)
    monkeypatch.setattr(shards, "_READ_BYTES", 5)               # the bad byte in a later read
    with pytest.raises(ValueError, match=r"bad\.txt: invalid UTF-8 at byte offset 17"):
        D.build_shards([f], tmp_path / "s", tok, 4)
    f.write_bytes(b"truncated \xe2\x82")                        # a sequence cut off by the end of the file
    with pytest.raises(ValueError, match=r"bad\.txt: invalid UTF-8 at byte offset 10"):
        D.build_shards(f, tmp_path / "s", tok, 4)
    assert not (tmp_path / "s" / "meta.json").exists()


def test_empty_and_too_small_inputs(tmp_path):
    tok = _tok()
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt: empty file"):
        D.build_shards(empty, tmp_path / "s", tok, 8)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"blank\.txt: no tokens"):
        D.build_shards(blank, tmp_path / "s", tok, 8, mode="pad")
    with pytest.raises(ValueError, match="no tokens at all"):
        D.build_shards(["", ""], tmp_path / "s", tok, 8)
    with pytest.raises(ValueError, match="fewer than one block"):
        D.build_shards(["just a few words"], tmp_path / "s", tok, 64)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        D.build_shards(tmp_path / "missing.txt", tmp_path / "s", tok, 8)
    with pytest.raises(ValueError, match="mode"):
        D.build_shards(DOCS, tmp_path / "s", tok, 8, mode="chunks")


def test_out_of_vocab_id_and_size_mismatch(tmp_path):
    tok = _tok()
    out = tmp_path / "s"
    ds = D.build_shards(DOCS * 4, out, tok, 8)
    n = len(ds)
    del ds
    arr = np.fromfile(out / "tokens.bin", dtype=np.uint16)
    arr[2 * 8 + 5] = 60000                                    # >= model_vocab_size 50258
    arr.tofile(out / "tokens.bin")
    with pytest.raises(ValueError, match=r"tokens\.bin: token id 60000 at block 2, position 5"):
        D.BlockDataset(out)
    D.BlockDataset(out, validate=False)                       # the scan can be skipped
    with open(out / "tokens.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=rf"tokens\.bin: {n * 16 + 2} bytes"):
        D.BlockDataset(out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        D.BlockDataset(out)
    # a damaged shard is rebuilt by build_shards even though meta.json's fingerprint would match
    (out / "meta.json").write_text(json.dumps(meta))
    assert len(D.build_shards(DOCS * 4, out, tok, 8)) == n


# --- sampler -----------------------------------------------------------------------------------------------------

def _stream(sampler, k):
    return [sampler.next().tolist() for _ in range(k)]


def test_sampler_definition_and_epochs():
    s = D.ResumableBatchSampler(10, 3, seed=5)
    assert s.batches_per_epoch == 3
    got = _stream(s, 6)
    for e in range(2):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(D.epoch_seed(5, e)))
        assert got[3 * e:3 * e + 3] == [perm[j * 3:(j + 1) * 3].tolist() for j in range(3)]
        flat = sum(got[3 * e:3 * e + 3], [])
        assert len(set(flat)) == 9                       # each index at most once per epoch (tail of 1 dropped)
    assert got[:3] != got[3:6]                           # a new permutation per epoch
    assert _stream(D.ResumableBatchSampler(10, 3, seed=5), 6) == got          # deterministic
    assert _stream(D.ResumableBatchSampler(10, 3, seed=6), 3) != got[:3]
    s = D.ResumableBatchSampler(12, 4)
    assert sorted(sum(_stream(s, 3), [])) == list(range(12))                 # exactly once per epoch
    assert _stream(D.ResumableBatchSampler(6, 2, shuffle=False), 4) == [[0, 1], [2, 3], [4, 5], [0, 1]]
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        D.ResumableBatchSampler(3, 4)
    with pytest.raises(ValueError, match="rank"):
        D.ResumableBatchSampler(10, 2, rank=2, world_size=2)


def test_sampler_world_size_independent():
    single = _stream(D.ResumableBatchSampler(50, 4, seed=1), 24)
    for W in (2, 3):
        ranks = [D.ResumableBatchSampler(50, 4, seed=1, rank=r, world_size=W) for r in range(W)]
        inter = []
        for _ in range(24 // W):
            for r in ranks:
                assert r.global_index == len(inter)
                inter.append(r.next().tolist())
        assert inter == single


def test_sampler_state_dict_resume():
    full = _stream(D.ResumableBatchSampler(40, 4, seed=3), 20)
    # world size 2 -> checkpoint after 3 steps each -> resume on 1, on 2 and on 3 processes
    ranks = [D.ResumableBatchSampler(40, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for r in ranks:
            r.next()
    state = ranks[0].state_dict()
    assert state["consumed"] == 6 and {"seed", "n_blocks", "batch_size"} <= set(state)
    one = D.ResumableBatchSampler(40, 4, seed=3)
    one.load_state_dict(state)
    assert _stream(one, 14) == full[6:]
    three = [D.ResumableBatchSampler(40, 4, seed=3, rank=r, world_size=3) for r in range(3)]
    for r in three:
        r.load_state_dict(state)
    assert [b for _ in range(4) for r in three for b in _stream(r, 1)] == full[6:18]
    four = D.ResumableBatchSampler(40, 4, seed=3, rank=0, world_size=4)
    with pytest.raises(ValueError, match="not a multiple of world_size 4"):
        four.load_state_dict(state)
    for field, value in (("seed", 4), ("n_blocks", 41), ("batch_size", 8)):
        with pytest.raises(ValueError, match=field):
            D.ResumableBatchSampler(40, 4, seed=3).load_state_dict({**state, field: value})
    with pytest.raises(ValueError, match="consumed"):
        D.ResumableBatchSampler(40, 4, seed=3).load_state_dict({k: v for k, v in state.items() if k != "consumed"})


# --- prepare_dataset ----------------------------------------------------------------------------------------------

def test_prepare_tinyshakespeare_validation(tmp_path):
    _tok()
    _shipped("corpora/tinyshakespeare/input.txt")
    ds = D.prepare_dataset("tinyshakespeare", "validation", length=128, cache_dir=tmp_path)
    want = D.wrap_chunks(D.load_corpus_tokens(split="val"), 128)
    # published wrap adds EOS after the document: the same blocks (the last may differ only if the tail fits)
    assert len(ds) in (want.shape[0], want.shape[0] + 1)
    assert torch.equal(ds.get(torch.arange(want.shape[0]))[0], want)
    assert ds.path.parent.parent == tmp_path and ds.path.name == "validation-gpt2-L128-wrap"
    assert D.prepare_dataset("tinyshakespeare", "val", length=128, cache_dir=tmp_path).meta["created"] == \
        ds.meta["created"]


def test_prepare_wikitext2_local_split(tmp_path):
    tok = _tok()
    path = _shipped("corpora/wikitext-2/wiki.test.raw")
    ds = D.prepare_dataset("wikitext2", "test_raw", length=256, cache_dir=tmp_path)
    rows = path.read_text(encoding="utf-8").split("\n")[:6]
    stream = [i for r in rows for i in tok.encode(dt.wikitext_detokenizer(r + "\n" if r.strip() else "")) +
              [tok.eos_id]]
    assert ds.get([0])[0][0, 1:1 + 40].tolist() == stream[:40]
    assert ds.meta["n_documents"] == 4358


def test_prepare_text_files(tmp_path):
    tok = _tok()
    f = tmp_path / "corpus.txt"
    f.write_text("".join(f"line {i} of a small local corpus\n" for i in range(200)))
    tr = D.prepare_dataset(f"text:{f}", "train", length=16, cache_dir=tmp_path / "c")
    va = D.prepare_dataset(f"text:{f}", "validation", length=16, cache_dir=tmp_path / "c")
    cut = tr.meta["sources"][0]["end"]
    assert va.meta["sources"][0]["start"] == cut and f.read_bytes()[cut - 1:cut] == b"\n"
    raw = f.read_bytes()
    want_tr = D.wrap_chunks(torch.tensor(tok.encode(raw[:cut].decode()) + [tok.eos_id]), 16)
    assert torch.equal(tr.get(torch.arange(len(tr)))[0], want_tr)
    assert len(va) < len(tr)


def test_prepare_text8_split_and_chunks(tmp_path, monkeypatch):
    import mdlm.data.datasets as dsets
    (tmp_path / "text8").mkdir()
    (tmp_path / "text8" / "text8").write_text("anarchism originated as a term of abuse " * 10)
    monkeypatch.setattr(dsets, "TEXT8_SPLITS", {"train": (0, 300), "validation": (300, 350), "test": (350, None)})
    monkeypatch.setattr(dsets, "data_dir", lambda required=True: None)
    ds = D.prepare_dataset("text8", "train", length=16, cache_dir=tmp_path)
    tok = D.get_tokenizer("text8")
    text = (tmp_path / "text8" / "text8").read_text()[:300]
    chunks = [text[i:i + 16] for i in range(0, 288, 16)]          # 16-char documents, the last partial dropped
    want = D.wrap_chunks(torch.tensor([i for c in chunks for i in tok.encode(c) + [3]]), 16, bos=2, eos=3)
    assert torch.equal(ds.get(torch.arange(len(ds)))[0], want)
    assert ds.meta["tokenizer"] == "text8" and ds.meta["dtype"] == "uint16"


def test_prepare_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        D.prepare_dataset("nope", "train", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no split"):
        D.prepare_dataset("tinyshakespeare", "test", cache_dir=tmp_path)
    assert D.DATASETS["lm1b"].resolve_split("validation") == "test"
    assert (D.DATASETS["lm1b"].tokenizer, D.DATASETS["lm1b"].mode, D.DATASETS["lm1b"].length) == \
        ("bert-base-uncased", "pad", 128)


def test_datasets_backed_names_need_datasets(tmp_path):
    try:
        import datasets  # noqa: F401
        pytest.skip("the 'datasets' package is installed")
    except ImportError:
        pass
    _tok()
    for name, split in (("openwebtext", "train"), ("lm1b", "validation"), ("wikitext2", "train"), ("ptb", "test")):
        with pytest.raises(ImportError, match="needs the Hugging Face 'datasets' package"):
            D.prepare_dataset(name, split, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())          # nothing half-made on disk


def test_datasets_backed_loaders_with_a_stand_in_datasets_module(tmp_path, monkeypatch):
    """The `datasets` path without the network: a stand-in `datasets` module records the load_dataset calls
    and serves a few rows; checks the published splits, text fields, detokenizers, tokenizers and modes."""
    import sys
    import types

    import mdlm.data as mdata
    from mdlm.data.detokenizers import get_detokenizer
    d = mdata.data_dir(required=False)
    if d is None or not (d / "tokenizers" / "bert-base-uncased" / "vocab.txt").is_file():
        pytest.skip("shipped tokenizers not found (set MDLM_DATA_DIR)")
    pytest.importorskip("tokenizers", reason="the tokenizers need the 'tokenizers' package")
    calls = []
    rows = {"text": ["Hello world , it 's a test .", "Second document @-@ here ."] * 20,
            "sentence": ["the n't cat sat on the mat <unk> ."] * 40}

    class _DS:
        def __init__(self, field):
            self.field = field

        def iter(self, batch_size):
            data = rows[self.field]
            for i in range(0, len(data), batch_size):
                yield {self.field: data[i:i + batch_size]}

    def load_dataset(path, config=None, split=None, **kw):
        calls.append((path, config, split))
        return _DS("sentence" if path == "ptb_text_only" else "text")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))

    owt = mdata.prepare_dataset("openwebtext", "validation", length=16, cache_dir=tmp_path)
    assert calls[-1] == ("openwebtext", None, "train[-100000:]") and owt.meta["mode"] == "wrap"
    tok = mdata.get_tokenizer("gpt2")
    stream = []
    for t in rows["text"]:
        stream += tok.encode(t) + [tok.eos_id]
    x0, _ = owt.get(torch.arange(len(owt)))
    assert torch.equal(x0[:, 1:-1].reshape(-1), torch.tensor(stream[: len(owt) * 14]))   # no detokenizer for OWT
    mdata.prepare_dataset("openwebtext", "train", length=16, cache_dir=tmp_path)
    assert calls[-1] == ("openwebtext", None, "train[:-100000]")

    lm1b = mdata.prepare_dataset("lm1b", "validation", cache_dir=tmp_path)           # published: test split, BERT, pad
    assert calls[-1] == ("lm1b", None, "test") and lm1b.meta["mode"] == "pad" and lm1b.length == 128
    bert = mdata.get_tokenizer("bert-base-uncased")
    x0, mask = lm1b[0]
    n = int(mask.sum())
    want = [bert.bos_id] + bert.encode(get_detokenizer("lm1b")(rows["text"][0])) + [bert.eos_id]
    assert x0[:n].tolist() == want and torch.all(x0[n:] == bert.pad_id)

    ptb = mdata.prepare_dataset("ptb", "train", length=16, cache_dir=tmp_path)
    assert calls[-1] == ("ptb_text_only", None, "train") and len(ptb) > 0
    first = tok.encode(get_detokenizer("ptb")(rows["sentence"][0]))
    assert ptb[0][0][1:1 + len(first)].tolist() == first
    n_calls = len(calls)
    mdata.prepare_dataset("ptb", "train", length=16, cache_dir=tmp_path)            # cached: no new load
    assert len(calls) == n_calls


def test_ids_outside_the_model_vocabulary_are_refused_before_the_uint16_cast(tmp_path):
    import mdlm.data as mdata
    from mdlm.data.tokenizers import Tokenizer

    class Backend:
        def encode(self, text):
            return [70000 if ch == "z" else ord(ch) % 100 for ch in text]

        def encode_batch(self, texts):
            return [self.encode(t) for t in texts]

    tok = Tokenizer("toy", Backend(), vocab_size=100, model_vocab_size=101, mask_id=100, bos_id=1, eos_id=2,
                    pad_id=0, fingerprint="toy-v1")
    f = tmp_path / "doc.txt"
    f.write_text("abc abc abc abc abc z abc")
    with pytest.raises(ValueError, match=r"doc.txt.*produced id 70000.*\[0, 101\)"):
        mdata.build_shards(f, tmp_path / "out", tok, 8, mode="wrap", num_workers=0)
    assert not (tmp_path / "out" / "meta.json").exists()
