"""Shared test set-up.

Without CUDA, Triton kernels run through Triton's interpreter: TRITON_INTERPRET must be set
before any kernel module is imported (triton.jit reads it at decoration time), so it is set here,
before the test modules load. Tests marked `gpu` are skipped without CUDA, with the reason.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the lent GPU with `pytest -m gpu`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def nan_like():
    """Make a NaN-filled tensor like the given one, so an element a kernel forgot to write fails."""
    def make(t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, float("nan"))
    return make
