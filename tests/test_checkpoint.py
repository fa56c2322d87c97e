"""Published-layout checkpoints (mdlm.checkpoint): Lightning .ckpt with backbone. prefix and EMA, plain
state dicts, a checkpoint built from the published key list, and clear errors for bad files."""
import json

import pytest
import torch

import mdlm
from mdlm.checkpoint import CheckpointError, load_published_checkpoint, save_published_checkpoint
from mdlm.data import data_dir
from mdlm.diffusion import MDLM
from mdlm.nn import DIT

V = 211


def _tiny_dit(seed):
    torch.manual_seed(seed)
    m = DIT(mdlm.preset("tiny", **{"model.hidden_size": 32, "model.n_heads": 2, "model.cond_dim": 16}), V)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def test_lightning_round_trip_with_and_without_ema(tmp_path):
    src = _tiny_dit(0)
    shadow = [p.detach() * 2 + 1 for p in src.parameters()]
    path = tmp_path / "last.ckpt"
    save_published_checkpoint(src, path, ema_shadow=shadow, global_step=17)
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("backbone.") for k in raw["state_dict"]) and len(raw["ema"]["shadow_params"]) == len(shadow)

    dst = _tiny_dit(1)
    rep = load_published_checkpoint(dst, path, use_ema=False)
    assert rep["global_step"] == 17 and not rep["ema"]
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)

    dst = MDLM(mdlm.preset("tiny", **{"model.hidden_size": 32, "model.n_heads": 2, "model.cond_dim": 16}), V)
    rep = load_published_checkpoint(dst, path, use_ema=True)
    assert rep["ema"]
    for (name, p), s in zip(dst.backbone.named_parameters(), shadow):
        assert torch.equal(p, s), name
    assert torch.equal(dst.backbone.rotary_emb.inv_freq, src.rotary_emb.inv_freq)  # buffers kept


def test_plain_state_dict_loads(tmp_path):
    src = _tiny_dit(2)
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    dst = _tiny_dit(3)
    load_published_checkpoint(dst, tmp_path / "plain.pt")
    x = torch.randint(0, V, (1, 5))
    dst.eval(), src.eval()
    torch.testing.assert_close(dst(x, torch.zeros(1)), src(x, torch.zeros(1)), rtol=0, atol=0)


def test_checkpoint_built_from_published_key_list_loads_into_small(tmp_path):
    d = data_dir(required=False)
    path = None if d is None else d.parent / "reference" / "mdlm_dit_small_state_dict.json"
    if path is None or not path.is_file():
        pytest.skip("shared/reference/mdlm_dit_small_state_dict.json not found (set MDLM_DATA_DIR)")
    keys = json.loads(path.read_text())["keys"]
    # One distinct constant per tensor; expand() keeps the file tiny (a 1-element storage per key).
    sd = {f"backbone.{k['key']}": torch.full((1,), float(i) / 1000).expand(k["shape"]) for i, k in enumerate(keys)}
    torch.save({"state_dict": sd, "global_step": 5, "epoch": 0}, tmp_path / "published.ckpt")
    model = DIT(mdlm.preset("small"), 50258)
    rep = load_published_checkpoint(model, tmp_path / "published.ckpt", use_ema=False)
    assert rep["missing"] == [] and rep["unexpected"] == []
    own = model.state_dict()
    for i, k in enumerate(keys):
        t = own[k["key"]]
        assert float(t.min()) == float(t.max()) == pytest.approx(float(i) / 1000, abs=1e-7), k["key"]


def test_missing_extra_and_mismatched_keys_are_reported(tmp_path):
    sd = dict(_tiny_dit(0).state_dict())
    del sd["blocks.0.norm1.weight"]
    sd["blocks.0.surprise"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['blocks.0.norm1.weight'\].*unexpected keys "
                                              r"\(1\): \['blocks.0.surprise'\]"):
        load_published_checkpoint(_tiny_dit(1), sd)
    rep = load_published_checkpoint(_tiny_dit(1), sd, strict=False)
    assert rep["missing"] == ["blocks.0.norm1.weight"] and rep["unexpected"] == ["blocks.0.surprise"]
    sd = dict(_tiny_dit(0).state_dict())
    sd["output_layer.linear.bias"] = torch.zeros(V + 1)
    with pytest.raises(CheckpointError, match="shape mismatches.*output_layer.linear.bias"):
        load_published_checkpoint(_tiny_dit(1), sd, strict=False)


def test_truncated_or_missing_file_names_the_file(tmp_path):
    path = tmp_path / "broken.ckpt"
    save_published_checkpoint(_tiny_dit(0), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        load_published_checkpoint(_tiny_dit(1), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_published_checkpoint(_tiny_dit(1), tmp_path / "nope.ckpt")


def test_ema_with_wrong_parameter_count_is_an_error():
    src = _tiny_dit(0)
    obj = {"state_dict": {f"backbone.{k}": v for k, v in src.state_dict().items()},
           "ema": {"shadow_params": [p.detach() for p in src.parameters()][:-1]}}
    with pytest.raises(CheckpointError, match="shadow"):
        load_published_checkpoint(_tiny_dit(1), obj)


def test_save_is_atomic_and_leaves_no_temporary(tmp_path):
    save_published_checkpoint(_tiny_dit(0), tmp_path / "a.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]
