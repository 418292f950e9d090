"""Triton kernels for MXFP4 MoE (installed as `mxfp4_moe.kernels`). Private kernels live in
`_name.py` files; the launchers here validate, allocate, pick the grid and launch.
Importing this package needs triton, not a GPU.
"""

from .moe_matmul import MatmulConfig, default_config, interpreting, moe_matmul, pick_block_m

__all__ = ["MatmulConfig", "default_config", "interpreting", "moe_matmul", "pick_block_m"]
