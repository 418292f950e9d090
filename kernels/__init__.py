"""Triton and Gluon kernels for MXFP4 MoE (installed as `mxfp4_moe.kernels`). Private kernels live
in `_name.py` files (`_moe_matmul.py`: Triton, any GPU and the interpreter; `_moe_matmul_sm90.py`
and `_moe_matmul_rs.py`: Gluon, Hopper); `fragment_layout.py` re-arranges weights for the latter;
the launchers here validate, allocate, pick the kernel and grid, and launch. Importing this
package needs triton, not a GPU.
"""

from .fragment_layout import FragmentWeights, fragment_order_problem, from_fragment_order, to_fragment_order
from .moe_matmul import (KernelFallback, MatmulConfig, default_config, interpreting, kernel_fallbacks, moe_matmul,
                         pick_block_m)

__all__ = ["FragmentWeights", "KernelFallback", "MatmulConfig", "default_config", "fragment_order_problem",
           "from_fragment_order", "interpreting", "kernel_fallbacks", "moe_matmul", "pick_block_m", "to_fragment_order"]
