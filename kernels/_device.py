"""Where the kernels run: Triton's CPU interpreter or a CUDA GPU of some compute capability, asked
by the launchers at every launch (the GPU's capability once per device).

This is the one home of "are we in Triton's interpreter": the kernels ask it here, and the
package asks it through `mxfp4_moe.kernel_api` (moe.py's backend choice, routing's choice of
kernels, verify's environment header). It lives here, not in `mxfp4_moe`, because nothing in
`kernels/` imports the package; it imports neither Triton nor any kernel, so the package may ask
it on its torch path, where Triton may be absent (tests/test_without_triton.py).
"""

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


def on_hopper(device: torch.device) -> bool:
    """Whether `device` is a Hopper GPU (sm_90) outside the interpreter: where the Gluon kernels run."""
    return device.type == "cuda" and not interpreting() and cuda_major(device) == 9
