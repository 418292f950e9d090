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

# CI (CI=true) draws the property tests' examples from a fixed seed, so that a landing is judged
# on the same examples every time; developer runs keep exploring new ones.
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:
    pass
else:
    _hypothesis_settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on a CUDA GPU with `pytest -m gpu`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def nan_like():
    """Make a NaN-filled tensor like the given one, so an element a kernel forgot to write fails."""
    def make(t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, float("nan"))
    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module of many small tensor ops: on a shared 2-core machine
    the thread pool turns each 3 MB torch.zeros into ~15 ms of barrier waiting (1 thread: 0.1 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def poisoned_loader_destinations():
    """The loader allocates its destinations uninitialized and writes only what it copies plus the
    padding. Poison them (0xAB bytes, NaN floats) so an element it forgot to write fails."""
    from mxfp4_moe import loader
    real_empty = loader._empty

    def poisoned(shape, dtype, device):
        t = real_empty(shape, dtype, device)
        return t.fill_(0xAB) if dtype == torch.uint8 else t.fill_(float("nan"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader, "_empty", poisoned)
        yield
