"""mdlm.nn.DIT with the fused block kernels (adaLN LN+modulate, rotary, gated residual + next norm, the MLP with
bias+GELU recomputed in its backward, SDPA) against the same model with the reference math: logits and every
parameter gradient; and the activation memory the fused path keeps for the backward.

Tolerances (CPU, fp32; Triton under the interpreter, or the kernels' PyTorch backends): max abs error
<= 1e-5 x the largest magnitude of that tensor + 1e-6. GPU (cuda-marked, bf16 autocast): against the
reference run in fp32 (autocast off), the kernel path's error is at most 2x the error of the reference
path under the same bf16 autocast, plus 1e-2 x the tensor's scale.
"""
import pytest
import torch

import mdlm
from mdlm.nn import DIT
from mdlm_kernels import backend as kb

V = 101
KERNEL_BACKENDS = [pytest.param("auto", marks=pytest.mark.skipif(
    kb.unavailable_reason("triton", "cpu") is not None, reason="Triton on CPU needs TRITON_INTERPRET=1")),
    "reference"]


def _model(dropout=0.0, d=96, heads=3, seed=0, n_blocks=2):
    cfg = mdlm.preset("tiny", **{"model.dropout": dropout, "model.hidden_size": d, "model.n_heads": heads,
                                  "model.cond_dim": 16, "model.n_blocks": n_blocks})
    torch.manual_seed(seed)
    m = DIT(cfg, V)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # the zero-initialised adaLN / output layers would hide bugs
    return m


def _run(m, x, sigma, use_kernels, seed=None):
    m.use_kernels = use_kernels
    m.zero_grad()
    h, _ = m.hidden_states(x, sigma, dropout_seed=seed)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda and m.bf16_autocast):
        out = m.output_layer.linear(h).float()
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    return out.detach(), [p.grad.detach().clone() for p in m.parameters()]


def _close(a, b, name):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= 1e-5 * scale + 1e-6, (name, err, scale)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("B,L", [(1, 37), (2, 8)])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_kernels_match_reference_model(backend, B, L, mode, monkeypatch):
    """eval mode, and train mode with dropout 0 (the train-mode code path without randomness)."""
    monkeypatch.setenv("MDLM_BACKEND", backend)
    m = _model()
    m.train(mode == "train")
    x = torch.randint(0, V, (B, L))
    sigma = torch.rand(B)
    ref_out, ref_g = _run(m, x, sigma, False)
    out, g = _run(m, x, sigma, True)
    _close(out, ref_out, "logits")
    for (name, _), a, b in zip(m.named_parameters(), g, ref_g):
        _close(a, b, name)
    if backend == "auto":
        assert kb.last_used["gated_residual_modulate"] == "triton" and kb.last_used["rotary_qkv"] == "triton"


def test_dropout_in_the_kernel_path_is_seeded_and_backend_independent(monkeypatch):
    m = _model(dropout=0.3).train()
    x = torch.randint(0, V, (2, 9))
    sigma = torch.rand(2)
    monkeypatch.setenv("MDLM_BACKEND", "reference")
    a, ga = _run(m, x, sigma, True, seed=7)
    b, _ = _run(m, x, sigma, True, seed=7)
    c, _ = _run(m, x, sigma, True, seed=8)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    m.eval()
    e, _ = _run(m, x, sigma, True)
    assert not torch.allclose(a, e)  # dropout is active in training only
    if kb.unavailable_reason("triton", "cpu") is None:
        m.train()
        monkeypatch.setenv("MDLM_BACKEND", "auto")
        t, gt = _run(m, x, sigma, True, seed=7)  # Triton: the same Philox masks
        _close(t, a, "logits")
        for (name, _), u, v in zip(m.named_parameters(), gt, ga):
            _close(u, v, name)


def test_default_is_reference_on_cpu_and_state_dict_unchanged():
    m = _model()
    assert m.use_kernels is None and not m.kernels_enabled(torch.zeros(1))
    assert list(m.state_dict()) == list(_model(seed=1).state_dict())
    m2 = DIT(mdlm.preset("tiny"), V, use_kernels=True)
    assert m2.kernels_enabled(torch.zeros(1))


def _saved_activation_bytes(m, x, sigma):
    """Bytes of the distinct storages autograd keeps for the backward of the fused forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.hidden_states(x, sigma, dropout_seed=3)
    return sum(saved.values())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_block_saved_activations_per_token(backend, monkeypatch):
    """Saved activation bytes per token of one fused block (fp32 on CPU: 4 bytes per value), measured as the
    difference between a 2-block and a 1-block model in training mode with dropout. The fused block keeps
    14 d + H + 4 values per token (+ 6 d / L: its adaLN row): y1 (d), q, k, v (3 d), the attention output (d) and
    its logsumexp (H), r and the attention branch output (2 d), y2 (d), the first MLP GEMM's output (4 d), the
    block output and the MLP output (2 d), mean and rstd of its two norms (4). Before (v a view of qkv, the GELU
    output kept) it kept 20 d + H + 4: qkv (3 d) instead of v, and the activation (4 d) on top."""
    monkeypatch.setenv("MDLM_BACKEND", backend)
    B, L, d, H = 2, 37, 96, 3
    x, sigma = torch.randint(0, V, (B, L)), torch.rand(B)
    per = []
    for n in (1, 2):
        m = _model(dropout=0.1, d=d, heads=H, n_blocks=n).train()
        m.use_kernels = True
        per.append(_saved_activation_bytes(m, x, sigma))
    per_token = (per[1] - per[0]) / (B * L)
    bound = 4 * (14 * d + H + 4 + 6 * d / L)
    old = 4 * (20 * d + H + 4 + 6 * d / L)
    assert per_token <= bound < old, (per_token, bound, old)
    assert per_token >= 4 * 14 * d, per_token   # the measurement sees the block's activations


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gpu_kernels_match_reference_model_bf16(mode):
    m = _model(d=768, heads=12).cuda()
    m.train(mode == "train")
    x = torch.randint(0, V, (4, 1024), device="cuda")
    sigma = torch.rand(4, device="cuda")
    m.bf16_autocast = False
    truth, truth_g = _run(m, x, sigma, False)
    m.bf16_autocast = True
    low, low_g = _run(m, x, sigma, False)
    out, g = _run(m, x, sigma, True)
    assert kb.last_used["attention"] in ("cudnn", "flash", "efficient", "math")
    for name, a, lo, ex in [("logits", out, low, truth)] + [
            (n, u, w, t) for (n, _), u, w, t in zip(m.named_parameters(), g, low_g, truth_g)]:
        err, ref_err, scale = [(a - ex).abs().max().item(), (lo - ex).abs().max().item(), ex.abs().max().item()]
        assert err <= 2 * ref_err + 1e-2 * scale, (name, err, ref_err, scale)
