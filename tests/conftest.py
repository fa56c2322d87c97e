"""Shared pytest setup.

- Registers the `cuda` marker; `@pytest.mark.cuda` tests are skipped when torch sees no GPU.
- Without a CUDA GPU, sets TRITON_INTERPRET=1 (unless already set) at import time, before triton
  (or mdlm_kernels, which defines its Triton kernels on import) is imported, so Triton kernels
  run on CPU tensors through the interpreter.
- Points MDLM_DATA_DIR (unless already set) at the shipped data folder next to this checkout
  (``<checkout>/../shared/data``) when it exists: the tests know where the checkout is, the installed package
  does not (it has no default data folder), so CI keeps the tests that need the data.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_SHIPPED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data")
if not os.environ.get("MDLM_DATA_DIR") and os.path.isdir(_SHIPPED_DATA):
    os.environ["MDLM_DATA_DIR"] = os.path.normpath(_SHIPPED_DATA)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
