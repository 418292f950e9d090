"""Where the kernels run: Triton's CPU interpreter or a CUDA GPU of some compute capability. The
launchers (`moe_matmul.py`, `_grid_dependency.py`) ask these at every launch, so the GPU's
capability is queried once per device."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_CUDA_MAJOR: dict[int, int] = {}


def cuda_major(device: torch.device) -> int:
    """The compute capability's major number of CUDA `device`, asked once per device (the layer
    asks several times per forward; torch's query costs microseconds of an eager call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_MAJOR:
        _CUDA_MAJOR[index] = torch.cuda.get_device_capability(index)[0]
    return _CUDA_MAJOR[index]
