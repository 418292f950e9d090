"""Programmatic dependent launch (Hopper on): a kernel launched with `launch_pdl=True` may start
while the kernel before it on the stream is still running, so its launch and set-up overlap that
kernel's tail instead of following it. Such a kernel must execute `griddepcontrol.wait` before it
reads anything the kernel before wrote (the wait returns once that kernel has finished and its
writes are visible), and may execute `griddepcontrol.launch_dependents` to let the next kernel
start early in turn. Both are no-ops in a kernel launched without the attribute.

Triton kernels call `triton.language.extra.cuda.gdc_wait` / `gdc_launch_dependents`; the Gluon
kernels call the same instructions through the two functions here. `pdl_launch` says where the
launchers turn it on.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from . import _device


# inline_asm_elementwise needs an output: `$0` is a register the instruction never writes.
@gluon.jit
def gdc_wait_gluon():
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def gdc_launch_dependents_gluon():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


# ---- launching -----------------------------------------------------------------------------------

ENABLED = True
"""Launch the MoE kernels as programmatic dependent launches where the GPU supports them (a
switch for A/B measurements: benchmarks/RESULTS.md 3.4)."""


def pdl_launch(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with `launch_pdl` (and wait for their predecessor
    in the kernel): on a CUDA GPU of compute capability 9 or newer, outside the interpreter."""
    return ENABLED and device.type == "cuda" and not _device.interpreting() and _device.cuda_major(device) >= 9
