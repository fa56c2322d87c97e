"""The compiled extension: availability report, import without _C, CUDA error paths."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mdlm_kernels as mk
from mdlm_kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_EXT = _ext.available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"extension not built: {_ext.error()}")


def test_available_structure():
    info = mk.available()
    expected = {
        "extension": bool,
        "cuda_compiled": bool,
        "cuda_archs": str,
        "cuda_runtime_devices": int,
        "torch_cuda": bool,
        "triton": bool,
        "triton_interpret": bool,
    }
    for key, typ in expected.items():
        assert isinstance(info[key], typ), (key, info[key])
    assert info["extension_error"] is None or isinstance(info["extension_error"], str)
    assert (info["extension_error"] is None) == info["extension"]
    if not info["cuda_compiled"]:
        assert info["cuda_runtime_devices"] == 0
    assert mk.BACKENDS == ("cpp", "triton", "reference")
    assert issubclass(mk.KernelError, RuntimeError)
    assert issubclass(mk.BackendUnavailableError, RuntimeError)


def _run(code, **env):
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120)


def test_import_without_extension():
    code = """
        import sys
        sys.modules["mdlm_kernels._C"] = None  # makes `import mdlm_kernels._C` raise ImportError
        import torch, mdlm_kernels as mk
        info = mk.available()
        assert info["extension"] is False, info
        assert "mdlm_kernels._C" in info["extension_error"], info
        assert info["cuda_compiled"] is False and info["cuda_runtime_devices"] == 0
        u = mk.philox_uniform(3, 4, 7, 1)
        assert mk.backend.last_used["philox_uniform"] in ("reference", "triton")
        r = mk.philox_uniform(3, 4, 7, 1, backend="reference")
        assert torch.equal(u, r)
        try:
            mk.philox_uniform(3, 4, 7, 1, backend="cpp")
        except mk.BackendUnavailableError as e:
            assert "mdlm_kernels._C is not available" in str(e), e
        else:
            raise AssertionError("expected BackendUnavailableError")
        print("OK", u.sum().item())
    """
    p = _run(code, MDLM_BACKEND="", TRITON_INTERPRET="0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK" in p.stdout


def test_import_without_triton():
    code = """
        import sys
        sys.modules["triton"] = None
        import mdlm_kernels as mk
        assert mk.available()["triton"] is False
        try:
            mk.philox_uniform(2, 2, 0, backend="triton")
        except mk.BackendUnavailableError as e:
            assert "triton is not installed" in str(e), e
        else:
            raise AssertionError("expected BackendUnavailableError")
        print("OK")
    """
    p = _run(code, MDLM_BACKEND="")
    assert p.returncode == 0, p.stdout + p.stderr


@needs_ext
def test_cuda_compiled_when_nvcc_present():
    C = _ext.load()
    if not C.cuda_compiled():
        pytest.skip("extension built without CUDA (no nvcc at build time)")
    assert mk.available()["cuda_compiled"] is True
    assert C.cuda_archs() != ""


@needs_ext
def test_cuda_device_count_never_raises():
    n = _ext.load().cuda_device_count()
    assert isinstance(n, int) and n >= 0
    if not torch.cuda.is_available():
        assert n == 0


@needs_ext
def test_cuda_launcher_without_gpu_raises_kernel_error():
    C = _ext.load()
    if C.cuda_device_count() > 0:
        pytest.skip("a GPU is present: a fake pointer launch would corrupt the context")
    if C.cuda_compiled():
        match = "mdlm_kernels CUDA error in philox_uniform_cuda: no CUDA device available"
    else:
        match = "built without CUDA"
    with pytest.raises(mk.KernelError, match=match):
        _ext.call("philox_uniform_cuda", (0xDEAD000, 128), 4, 4, 1, 0, 3, 0)
    # and the raw binding raises RuntimeError (KernelError is a RuntimeError subclass)
    with pytest.raises(RuntimeError):
        C.philox_uniform_cuda((0xDEAD000, 128), 4, 4, 1, 0, 3, 0)


@needs_ext
def test_cuda_launcher_validates_before_device_check():
    C = _ext.load()
    with pytest.raises(ValueError, match="unsupported dtype code"):
        C.philox_uniform_cuda((0xDEAD000, 128), 4, 4, 1, 0, 2, 0)
    with pytest.raises(ValueError, match=">= 0"):
        C.philox_uniform_cuda((0xDEAD000, 128), -4, 4, 1, 0, 3, 0)


@needs_ext
def test_dtype_codes_match_header():
    from mdlm_kernels import _dtypes

    codes = _ext.load().DTYPE_CODES
    for name, code in codes.items():
        assert _dtypes.dtype_code(getattr(torch, name)) == code


@pytest.mark.skipif(os.environ.get("MDLM_EXPECT_CUDA_BUILD") != "1",
                    reason="MDLM_EXPECT_CUDA_BUILD=1 is set by CI where nvcc is installed")
def test_ci_build_compiled_cuda_sources():
    """Where nvcc exists (CI), the installed extension must contain the CUDA kernels, not a silent C++-only build."""
    info = mk.available()
    assert info["extension"], info["extension_error"]
    assert info["cuda_compiled"] and "90" in info["cuda_archs"], info
