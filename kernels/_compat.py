"""What differs between the Triton releases the kernels support (3.6 through 3.9), in one place:
kernels import these names instead of testing `triton.__version__`.
"""

from triton.experimental.gluon import language as _gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as _async_copy
from triton.experimental.gluon.language.nvidia.hopper import tma as _tma

# Gluon's copies into shared memory: `async_copy_global_to_shared` up to Triton 3.8, renamed
# `async_load` (same leading arguments) in 3.9, where the old names remain as stubs that raise.
cp_async_load = getattr(_async_copy, "async_load", None) or _async_copy.async_copy_global_to_shared
tma_async_load = getattr(_tma, "async_load", None) or _tma.async_copy_global_to_shared
# The barrier of all the CTA's threads: `gl.thread_barrier()` up to 3.8, `gl.barrier()` in 3.9.
cta_barrier = getattr(_gl, "barrier", None) or _gl.thread_barrier

# Options every launch passes. FP fusion (a * b + c as one FMA) on, as the kernels' numerics were
# validated: Triton 3.9 warns when it is left to the default, which turns off in 3.10.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

__all__ = ["LAUNCH_OPTIONS", "cp_async_load", "cta_barrier", "tma_async_load"]
