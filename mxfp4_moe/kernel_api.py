"""The one place the package reaches into its Triton kernels (`mxfp4_moe.kernels`, the folder
`kernels/`): each name below is imported from its kernel module on first use, never when the
package is imported, so the torch path runs where Triton is not installed
(tests/test_without_triton.py). `interpreting` and `on_hopper` come from `kernels/_device.py`,
which imports no Triton: asking them never loads a kernel.

Each access looks the name up in its module again (a dictionary lookup), so a test or probe that
replaces a kernel module's function is seen here; one that sets a name on this module replaces
it for the whole package.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from importlib import import_module

# name -> the module of mxfp4_moe.kernels that defines it
_HOMES = {
    "interpreting": "_device", "on_hopper": "_device",
    "moe_matmul": "moe_matmul", "pick_block_m": "moe_matmul_configs", "kernel_fallbacks": "moe_matmul_fallbacks",
    "router_topk": "router_topk", "router_gemv_topk": "router_topk", "ROUTER_GEMV_MAX_TOKENS": "router_topk",
    "ROUTER_GEMV_MAX_EXPERTS": "router_topk", "router_gemv_topk_sort": "router_topk",
    "sort_and_schedule": "expert_sort", "fits_one_chunk": "expert_sort",
    "to_fragment_order": "fragment_layout", "from_fragment_order": "fragment_layout",
    "fragment_order_problem": "fragment_layout", "record_launches": "launches",
    "RoutingMetadata": "routing_metadata", "max_tiles": "routing_metadata",
}

__all__ = [*_HOMES, "triton_installed"]


@functools.cache
def triton_installed() -> bool:
    """Whether Triton can be imported (a dependency on Linux only); without it every torch path
    still runs. Asked once per process: the layer and the routing ask it on every call."""
    return importlib.util.find_spec("triton") is not None


def __getattr__(name: str):
    if name in _HOMES:
        module = f"mxfp4_moe.kernels.{_HOMES[name]}"
        return getattr(sys.modules.get(module) or import_module(module), name)
    raise AttributeError(f"module 'mxfp4_moe.kernel_api' has no attribute {name!r}")
