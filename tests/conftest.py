"""Shared pytest setup.

- Registers the `cuda` marker; `@pytest.mark.cuda` tests are skipped when torch sees no GPU.
- Without a CUDA GPU, sets TRITON_INTERPRET=1 (unless already set) at import time, before triton
  (or mdlm_kernels, which defines its Triton kernels on import) is imported, so Triton kernels
  run on CPU tensors through the interpreter.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
