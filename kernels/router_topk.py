"""Launcher for the router's fused top-k (`_router_topk.py`), used by `mxfp4_moe.routing.route`
on CUDA tensors (and under the interpreter); torch.topk and torch.softmax are its twins."""

from __future__ import annotations

import torch
import triton

from ._compat import LAUNCH_OPTIONS
from .launches import launch
from ._grid_dependency import pdl_launch
from ._router_topk import _router_topk_kernel

_TILE_ELEMENTS = 4096       # logits one program holds: 32 tokens at 128 experts


def router_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 (unit stride along E) without the bias, bias [E] float32 ->
    (weights [T, top_k] float32: softmax over the top_k chosen, ids [T, top_k] int64, largest
    logit first), written into `out` (contiguous (weights, ids)) when given. One launch, no host
    synchronisation."""
    tokens, num_experts = logits.shape
    if logits.dtype != torch.float32 or bias.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"router_topk: logits and bias must be float32 with unit stride along the experts, got "
                         f"{logits.dtype} {tuple(logits.stride())} and {bias.dtype}")
    if bias.shape != (num_experts,) or not 1 <= top_k <= num_experts:
        raise ValueError(f"router_topk: bias {tuple(bias.shape)} for {num_experts} experts, top_k {top_k}")
    if out is None:
        out = (torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device),
               torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device))
    weights, ids = out
    if (weights.shape != (tokens, top_k) or ids.shape != (tokens, top_k) or weights.dtype != torch.float32
            or ids.dtype != torch.int64 or not (weights.is_contiguous() and ids.is_contiguous())):
        raise ValueError(f"router_topk: out must be contiguous float32 and int64 [{tokens}, {top_k}] tensors")
    if tokens == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(triton.next_power_of_2(tokens), _TILE_ELEMENTS // block_e))
    pdl = pdl_launch(logits.device)
    launch(_router_topk_kernel, (triton.cdiv(tokens, block_t),),
        logits, bias, weights, ids, tokens, num_experts, logits.stride(0), TOP_K=top_k,
        BLOCK_K=triton.next_power_of_2(top_k), BLOCK_T=block_t, BLOCK_E=block_e, PDL=pdl, num_warps=4,
        launch_pdl=pdl, **LAUNCH_OPTIONS)
    return weights, ids
