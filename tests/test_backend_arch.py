"""Automatic dispatch on a CUDA device whose architecture (or driver) the compiled extension cannot serve: the
compute capability is compared with the archs of the build once per device, the CUDA runtime is asked to load a
probe kernel, and a failure makes automatic selection fall back (with one warning per device) while a forced
"cpp" backend raises with the reason. The GPU is faked (capability and extension stand-ins) so this runs on CPU."""
import warnings

import pytest
import torch

from mdlm_kernels import _ext
from mdlm_kernels import backend as kb
from mdlm_kernels.errors import BackendUnavailableError

ALL = {"cpp": None, "triton": None, "reference": None}


class _FakeExt:
    """Stands in for mdlm_kernels._C built with CUDA for ``archs``; ``err`` is what the runtime's probe says."""

    def __init__(self, archs, err=""):
        self.archs, self.err, self.probed = archs, err, []

    def cuda_compiled(self):
        return True

    def cuda_archs(self):
        return self.archs

    def cuda_versions(self):
        return 12040, 13000

    def cuda_image_error(self, index):
        self.probed.append(index)
        return self.err


@pytest.fixture
def fake_gpu(monkeypatch):
    def make(capability, archs="80;90", err=""):
        ext = _FakeExt(archs, err)
        monkeypatch.setattr(kb, "_device_capability", lambda index: capability)
        monkeypatch.setattr(_ext, "load", lambda: ext)
        monkeypatch.setattr(kb, "_IMAGE_REASON", {})
        monkeypatch.setattr(kb, "_WARNED", set())
        monkeypatch.delenv(kb.ENV_VAR, raising=False)
        return ext
    return make


@pytest.mark.parametrize("capability,archs,ok", [
    ((7, 0), "80;90", False), ((7, 5), "80;90", False),            # V100, T4: no image, PTX is for 9.0
    ((8, 0), "80;90", True), ((8, 6), "80;90", True), ((8, 9), "80;90", True),   # sm_80 SASS runs on 8.x
    ((9, 0), "80;90", True), ((10, 0), "80;90", True), ((12, 0), "80;90", True),  # compute_90 PTX JIT
    ((10, 0), "90a", False), ((8, 0), "90a", False), ((9, 0), "90a", True),      # arch-specific: 9.0 only
    ((8, 6), "86", True), ((8, 0), "86", False),
])
def test_arch_rules(capability, archs, ok):
    reason = kb.arch_mismatch(capability, archs)
    assert (reason is None) == ok, reason
    if not ok:
        assert f"compute capability {capability[0]}.{capability[1]}" in reason and "MDLM_CUDA_ARCHS" in reason


def test_unsupported_arch_falls_back_once_with_a_warning_and_forcing_cpp_raises(fake_gpu):
    ext = fake_gpu((7, 0))
    with pytest.warns(RuntimeWarning, match=r"not used on cuda:0 .*compute capability 7\.0"):
        assert kb.resolve("some_op", None, "cuda:0", ALL) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # said once per device: no second warning
        assert kb.resolve("other_op", None, "cuda:0", ALL) == "triton"
    with pytest.raises(BackendUnavailableError, match="sm_80, sm_90"):
        kb.resolve("some_op", "cpp", "cuda:0", ALL)
    assert ext.probed == []                                # decided by the capability alone


def test_supported_arch_uses_the_extension_without_warning(fake_gpu):
    ext = fake_gpu((8, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kb.resolve("some_op", None, "cuda:0", ALL) == "cpp"
        assert kb.resolve("some_op", None, "cuda:0", ALL) == "cpp"
    assert ext.probed == [0]                               # the runtime was asked once for this device


def test_runtime_refusal_falls_back(fake_gpu):
    fake_gpu((9, 0), err="CUDA driver version is insufficient for CUDA runtime version (code 35)")
    with pytest.warns(RuntimeWarning, match="driver version is insufficient"):
        assert kb.resolve("some_op", None, "cuda:0", ALL) == "triton"
    with pytest.raises(BackendUnavailableError, match="driver 12.4, runtime 13.0"):
        kb.resolve("some_op", "cpp", "cuda:0", ALL)


def test_cpu_tensors_are_not_affected(fake_gpu):
    fake_gpu((7, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kb.resolve("some_op", None, "cpu", ALL) == "cpp"


@pytest.mark.cuda
def test_this_gpu_runs_the_extension():
    if not _ext.cuda_compiled():
        pytest.skip("extension built without CUDA")
    kb._IMAGE_REASON.clear()
    assert kb.cuda_image_reason(torch.device("cuda", 0)) is None
