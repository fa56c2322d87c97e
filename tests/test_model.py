"""The published DiT reference (mdlm.nn): state-dict layout, component formulas, input validation.

Tolerances: fp32 component checks to rtol 1e-5 / atol 1e-5 (independent formulas, same precision).
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import mdlm
from mdlm.data import data_dir
from mdlm.nn import AR, DIT, LayerNorm, Rotary, TimestepEmbedder, apply_rotary_pos_emb

V = 50258


def _reference_keys():
    d = data_dir(required=False)
    path = None if d is None else d.parent / "reference" / "mdlm_dit_small_state_dict.json"
    if path is None or not path.is_file():
        pytest.skip("shared/reference/mdlm_dit_small_state_dict.json not found (set MDLM_DATA_DIR)")
    return json.loads(path.read_text())["keys"]


def test_small_state_dict_equals_published_key_list():
    ref = _reference_keys()
    with torch.device("meta"):
        model = DIT(mdlm.preset("small"), V)
    sd = model.state_dict()
    assert list(sd) == [k["key"] for k in ref]
    for k in ref:
        assert list(sd[k["key"]].shape) == k["shape"], k["key"]
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 1) == 169.6


def test_medium_preset_shapes():
    with torch.device("meta"):
        model = DIT(mdlm.preset("medium"), V)
    assert len(model.blocks) == 24 and model.blocks[0].n_heads == 16
    assert model.blocks[0].attn_qkv.weight.shape == (3 * 1024, 1024)


def test_fresh_model_outputs_zero_logits():
    cfg = mdlm.preset("tiny")
    model = DIT(cfg, 1000)
    x = torch.randint(0, 1000, (2, 7))
    out = model(x, torch.zeros(2))
    assert out.shape == (2, 7, 1000) and torch.count_nonzero(out) == 0


def test_layernorm_is_fp32_weight_only():
    ln = LayerNorm(48)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 48).to(torch.bfloat16)
    y = ln(x)
    assert y.dtype == torch.float32
    ref = (x.float() - x.float().mean(-1, keepdim=True)) / torch.sqrt(x.float().var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(y, ref * ln.weight, rtol=1e-5, atol=1e-5)


def test_rotary_matches_complex_rotation_of_half_pairs():
    D, L, H = 16, 37, 3
    rot = Rotary(D)
    qkv = torch.randn(2, L, 3, H, D)
    cos, sin = rot(qkv)
    out = apply_rotary_pos_emb(qkv, cos, sin)
    pos = torch.arange(L, dtype=torch.float32)[:, None]
    theta = pos * (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))[None]  # (L, D/2)
    for s in (0, 1):  # q and k: pair (j, j + D/2) rotated by theta_j
        z = torch.complex(qkv[:, :, s, :, : D // 2], qkv[:, :, s, :, D // 2:])
        zr = z * torch.polar(torch.ones_like(theta), theta)[None, :, None, :]
        torch.testing.assert_close(out[:, :, s], torch.cat([zr.real, zr.imag], -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, :, 2], qkv[:, :, 2])  # v untouched


def test_rotary_scores_depend_on_relative_position_only():
    D = 8
    rot = Rotary(D)
    q, k = torch.randn(D), torch.randn(D)
    qkv = torch.zeros(1, 20, 3, 1, D)
    qkv[0, :, 0, 0] = q
    qkv[0, :, 1, 0] = k
    out = apply_rotary_pos_emb(qkv, *rot(qkv))
    s = lambda i, j: float(out[0, i, 0, 0] @ out[0, j, 1, 0])
    assert abs(s(3, 1) - s(12, 10)) < 1e-4 and abs(s(0, 5) - s(14, 19)) < 1e-4


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 0.5, 3.0])
    emb = TimestepEmbedder.timestep_embedding(t, 6)
    freqs = torch.exp(-math.log(10000) * torch.arange(3) / 3)
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1))
    assert TimestepEmbedder.timestep_embedding(t, 7).shape == (3, 7)


def _tiny(seed=0, **over):
    cfg = mdlm.preset("tiny", **{"model.dropout": 0.0, **over})
    torch.manual_seed(seed)
    model = DIT(cfg, 101)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_attention_is_bidirectional_in_dit_and_causal_in_ar():
    model = _tiny().eval()
    x = torch.randint(0, 100, (1, 12))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 100
    a, b = model(x, torch.zeros(1)), model(y, torch.zeros(1))
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first position sees the last token
    cfg = mdlm.preset("tiny", **{"model.dropout": 0.0})
    ar = AR(cfg, 101, mask_index=100).eval()
    with torch.no_grad():
        for p in ar.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    a, b = ar(x), ar(y)
    torch.testing.assert_close(a[0, :-1], b[0, :-1])  # earlier positions do not see the last token
    assert not torch.allclose(a[0, -1], b[0, -1])
    assert torch.all(a[..., 100] < -1e5)  # MASK gets no probability
    torch.testing.assert_close(a.exp().sum(-1), torch.ones(1, 12), rtol=1e-5, atol=1e-5)


def test_sigma_conditions_the_output_and_dropout_only_in_training():
    model = _tiny().eval()
    x = torch.randint(0, 100, (2, 9))
    assert not torch.allclose(model(x, torch.zeros(2)), model(x, torch.ones(2)))
    model_d = _tiny(**{"model.dropout": 0.5}).eval()
    torch.testing.assert_close(model_d(x, torch.zeros(2)), model_d(x, torch.zeros(2)))
    model_d.train()
    assert not torch.allclose(model_d(x, torch.zeros(2)), model_d(x, torch.zeros(2)))


def test_dit_accepts_plain_dict_config():
    cfg = {"model": {"hidden_size": 32, "n_blocks": 1, "n_heads": 2, "cond_dim": 16, "dropout": 0.0,
                     "scale_by_sigma": True}}
    model = DIT(cfg, 50)
    assert model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 1)).shape == (1, 4, 50)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.zeros(2, 5), TypeError, "integer"),
    (torch.zeros(2, 5, 1, dtype=torch.long), ValueError, "shape"),
    (torch.full((2, 5), 101), ValueError, "101, outside"),
    (torch.full((2, 5), -1), ValueError, "-1, outside"),
])
def test_bad_token_ids_are_clear_errors(bad, exc, match):
    model = _tiny()
    with pytest.raises(exc, match=match):
        model(bad, torch.zeros(2))


def test_bad_sigma_shape_is_a_clear_error():
    model = _tiny()
    with pytest.raises(ValueError, match="sigma must have shape"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(3))


def test_mismatched_devices_are_a_clear_error():
    model = _tiny()
    with pytest.raises(ValueError, match="device mismatch"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, device="meta"))


def test_bad_head_config_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        DIT(mdlm.preset("tiny", **{"model.n_heads": 3}), 10)
