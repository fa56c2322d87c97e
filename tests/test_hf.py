"""The published Hugging Face layout (``kuleshov-group/mdlm-owt``): ``mdlm.from_pretrained`` on a local snapshot
folder and ``mdlm.save_pretrained`` writing the same layout. No network: the tests write a small snapshot by
hand -- ``config.json`` with the published ``MDLMConfig`` field names, ``model.safetensors`` with the published
``backbone.<name>`` keys -- and compare the logits with the same weights loaded into ``mdlm.nn.DIT`` (bitwise:
the same module, the same ops, fp32 on CPU)."""
import json
import os

import pytest
import torch

import mdlm
from mdlm import hf
from mdlm.checkpoint import CheckpointError
from mdlm.nn import DIT

st = pytest.importorskip("safetensors.torch", reason="model.safetensors needs the 'safetensors' package")

V, L = 97, 24
# the published config.json fields (configuration_mdlm.py's MDLMConfig) plus the entries transformers writes
PUBLISHED_FIELDS = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads", "dropout",
                    "time_conditioning")


def _hf_json(V=V, L=L, d=32, c=16, blocks=2, heads=4, tc=False):
    return {"architectures": ["MDLM"],
            "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig", "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
            "model_type": "mdlm", "vocab_size": V, "model_length": L, "hidden_dim": d, "cond_dim": c,
            "n_blocks": blocks, "n_heads": heads, "dropout": 0.1, "time_conditioning": tc, "return_dict": False,
            "torch_dtype": "float32", "transformers_version": "4.38.2"}


def _random_dit(hfj):
    tree = {"model": {"hidden_size": hfj["hidden_dim"], "n_blocks": hfj["n_blocks"], "n_heads": hfj["n_heads"],
                      "cond_dim": hfj["cond_dim"], "dropout": hfj["dropout"], "length": hfj["model_length"]}}
    torch.manual_seed(0)
    dit = DIT(tree, hfj["vocab_size"])
    with torch.no_grad():
        for p in dit.parameters():      # the published init zeroes adaLN and the head: make every weight count
            p.normal_(0, 0.2)
    return dit.eval()


def _write_snapshot(folder, hfj, dit):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hfj))
    st.save_file({f"backbone.{k}": v.contiguous() for k, v in dit.state_dict().items()},
                 str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "modeling_mdlm.py").write_text("# the published remote code; not executed by mdlm\n")
    (folder / "configuration_mdlm.py").write_text("# likewise\n")
    return folder


def _inputs(V=V, L=L, B=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, L), generator=g)
    x[:, ::3] = V - 1                                   # MASK tokens
    return x, torch.rand(B, generator=g)


@pytest.mark.parametrize("tc", [False, True])
def test_from_pretrained_on_a_snapshot_gives_the_dits_logits(tmp_path, tc):
    hfj = _hf_json(tc=tc)
    dit = _random_dit(hfj)
    snap = _write_snapshot(tmp_path / "mdlm-owt", hfj, dit)
    model = hf.from_pretrained(snap)
    assert isinstance(model, mdlm.MDLM) and isinstance(model.backbone, DIT) and not model.training
    m = model.config.model
    assert (m.hidden_size, m.n_blocks, m.n_heads, m.cond_dim, m.length, m.dropout) == (32, 2, 4, 16, L, 0.1)
    assert model.time_conditioning is tc and model.vocab_size == V and model.mask_index == V - 1
    x, sigma = _inputs()
    with torch.no_grad():
        assert torch.equal(model.backbone(x, sigma), dit(x, sigma))
        # and the diffusion model feeds sigma = 0 without time conditioning, as the published backbone does
        want = dit(x, sigma if tc else torch.zeros_like(sigma))
        assert torch.equal(model.backbone(x, model._process_sigma(sigma)), want)
    # every tensor of the file, bit for bit
    sd = st.load_file(str(snap / "model.safetensors"))
    own = model.backbone.state_dict()
    assert set(sd) == {f"backbone.{k}" for k in own} and "backbone.rotary_emb.inv_freq" in sd
    assert all(torch.equal(sd[f"backbone.{k}"], v) for k, v in own.items())


def test_the_published_small_config_maps_onto_the_small_preset():
    hfj = _hf_json(V=50258, L=1024, d=768, c=128, blocks=12, heads=12)
    cfg, V_, mask = hf.config_from_hf(hfj)
    small = mdlm.preset("small")
    for k in ("hidden_size", "n_blocks", "n_heads", "cond_dim", "length", "dropout"):
        assert cfg.model[k] == small.model[k], k
    assert (V_, mask, cfg.data.tokenizer, cfg.time_conditioning, cfg.parameterization, cfg.noise.type) == \
        (50258, 50257, "gpt2", False, "subs", "loglinear")


def test_save_pretrained_writes_the_same_layout_and_round_trips(tmp_path):
    hfj = _hf_json()
    dit = _random_dit(hfj)
    hand = _write_snapshot(tmp_path / "hand", hfj, dit)
    model = hf.from_pretrained(hand)
    out = mdlm.save_pretrained(model, tmp_path / "saved")
    assert sorted(os.listdir(out)) == ["config.json", "configuration_mdlm.py", "model.safetensors",
                                       "modeling_mdlm.py"]
    written = json.loads((out / "config.json").read_text())
    assert {k: written[k] for k in PUBLISHED_FIELDS} == {k: hfj[k] for k in PUBLISHED_FIELDS}
    for k in ("model_type", "architectures", "auto_map"):
        assert written[k] == hfj[k], k
    a, b = st.load_file(str(hand / "model.safetensors")), st.load_file(str(out / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("configuration_mdlm.py", "modeling_mdlm.py"):
        compile((out / name).read_text(), name, "exec")      # valid Python
    again = mdlm.from_pretrained(out)
    x, sigma = _inputs()
    with torch.no_grad():
        assert torch.equal(again.backbone(x, sigma), dit(x, sigma))


def test_a_snapshot_that_does_not_fit_names_the_problem(tmp_path):
    hfj = _hf_json()
    dit = _random_dit(hfj)
    sd = {f"backbone.{k}": v.contiguous() for k, v in dit.state_dict().items()}
    bad = tmp_path / "bad"
    _write_snapshot(bad, hfj, dit)
    del sd["backbone.blocks.1.attn_qkv.weight"]
    st.save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys .*blocks\.1\.attn_qkv\.weight"):
        mdlm.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(dict(hfj, hidden_dim=64)))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        mdlm.from_pretrained(bad)
    st.save_file({"model.embed": torch.zeros(2)}, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="without the published 'backbone.' prefix"):
        mdlm.from_pretrained(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        mdlm.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 3}))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        mdlm.from_pretrained(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        mdlm.from_pretrained(tmp_path / "nowhere")


def test_the_cli_samples_from_a_snapshot(tmp_path, capsys, monkeypatch):
    """`mdlm sample --checkpoint SNAPSHOT` with the GPT-2 vocabulary of the published model (needs the shipped
    GPT-2 tokenizer to decode)."""
    from mdlm.data import data_dir
    d = data_dir(required=False)
    if d is None or not (d / "tokenizers" / "gpt2").is_dir():
        pytest.skip("shared/data/tokenizers/gpt2 not found (set MDLM_DATA_DIR)")
    monkeypatch.setenv("MDLM_BACKEND", "reference")
    from mdlm.cli import sample_main
    hfj = _hf_json(V=50258, L=16, d=16, c=8, blocks=1, heads=2)
    snap = _write_snapshot(tmp_path / "snap", hfj, _random_dit(hfj))
    out = tmp_path / "s.json"
    assert sample_main(["--checkpoint", str(snap), "--num", "2", "--steps", "3", "--device", "cpu",
                        "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(len(r["ids"]) == 16 and 50257 not in r["ids"] for r in rows)
    assert "--- sample 1" in capsys.readouterr().out


def test_transformers_loads_what_save_pretrained_wrote(tmp_path):
    """The written remote code, run by transformers itself (skipped where transformers is not installed)."""
    transformers = pytest.importorskip("transformers")
    hfj = _hf_json()
    dit = _random_dit(hfj)
    model = hf.from_pretrained(_write_snapshot(tmp_path / "hand", hfj, dit))
    out = mdlm.save_pretrained(model, tmp_path / "saved")
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=True).eval()
    x, sigma = _inputs()
    with torch.no_grad():
        got = loaded(input_ids=x, timesteps=sigma)
        assert torch.is_tensor(got)                      # return_dict false, as the published diffusion.py expects
        assert torch.equal(got, dit(x, torch.zeros_like(sigma)))
