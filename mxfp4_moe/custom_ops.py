"""The MoE layer's forward as a torch.library custom op, `mxfp4_moe::moe_forward`, so that
torch.compile traces a model through an `MXFP4MoE` block in one graph (no graph break) and
CUDA-graph modes capture it: the op is opaque to the compiler, and its fake implementation gives
the output's shape, dtype and device from the layer's sizes alone.

A layer is named by a string (custom ops take tensors and plain values, not modules): each
`MXFP4MoE` registers itself here when built and the op looks it up by that name. The registry
holds the layers weakly, so it never keeps one alive.
"""

from __future__ import annotations

import itertools
import weakref

import torch

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_NAMES = itertools.count()


def register_layer(layer) -> str:
    """Register an `MXFP4MoE` for the op; returns the name the op is called with."""
    name = f"mxfp4_moe.layer.{next(_NAMES)}"
    _LAYERS[name] = layer
    return name


def _layer(name: str):
    layer = _LAYERS.get(name)
    if layer is None:
        raise RuntimeError(f"mxfp4_moe::moe_forward: no MXFP4MoE layer named {name!r} is alive "
                           "(the compiled graph outlived the layer it was traced from)")
    return layer


@torch.library.custom_op("mxfp4_moe::moe_forward", mutates_args=())
def moe_forward(x: torch.Tensor, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H or H_pad] -> (y [T, H], router scores [T, k]), both in x's dtype: the named
    layer's `MXFP4MoE.forward_with_router_scores`, run eagerly, without the layer's eager plans:
    a compiled graph may run it while torch's CUDA-graph trees warm up, where a plan's workspace
    would be allocated in (and outlive) their memory pool."""
    return _layer(layer_name).eager_forward_with_router_scores(x, use_plans=False)


@moe_forward.register_fake
def _moe_forward_fake(x: torch.Tensor, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    weights = _layer(layer_name).weights
    return x.new_empty((x.shape[0], weights.hidden)), x.new_empty((x.shape[0], weights.top_k))
