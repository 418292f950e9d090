"""Launchers for the router's kernels (`_router_topk.py`), used by `mxfp4_moe.routing.route` on
CUDA tensors (and under the interpreter): the fused top-k after the router's GEMM (torch.topk and
torch.softmax are its twins), and at decode sizes the GEMM and the top-k in one launch, which
can also sort the pairs by expert and lay out the tiles (`router_gemv_topk_sort`)."""

from __future__ import annotations

import torch
import triton

from ._compat import LAUNCH_OPTIONS
from .launches import launch
from ._grid_dependency import pdl_launch
from ._router_topk import _router_gemv_topk_kernel, _router_topk_kernel
from .expert_sort import OneChunkSort, fits_one_chunk

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


ROUTER_GEMV_MAX_TOKENS = 16       # the one-launch router's token tile (tl.dot needs 16 rows)
ROUTER_GEMV_MAX_EXPERTS = 256     # its expert tile: all the logits of a token in one program
_GEMV_BLOCK_H = 64         # hidden columns per step; a program takes a whole number of steps
_GEMV_PROGRAMS = 48        # about this many programs share the hidden columns and the experts
_GEMV_EXPERTS_PER_PROGRAM = 32     # tl.dot needs >= 16; more experts per program mean more splits of H


def router_gemv_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (T <= ROUTER_GEMV_MAX_TOKENS) @ weight[:, :H].T + bias, then `router_topk`'s top-k and
    softmax, in one launch: (weights [T, top_k] float32, ids [T, top_k] int64). weight [E, >= H]
    (E <= ROUTER_GEMV_MAX_EXPERTS), bfloat16 with bfloat16 x or float32 with any float x, unit stride
    along H; bias [E] float32. Products are exact and sums float32, as the router GEMM's; their
    order is fixed, so equal inputs give equal outputs. No host synchronisation."""
    weights, ids = _router_outputs(x, weight, bias, top_k)
    _launch_router_gemv(x, weight, bias, top_k, weights, ids, None)
    return weights, ids


def router_gemv_topk_sort(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int,
                          expert_map: torch.Tensor | None, num_local_experts: int, num_tiles: int, block_m: int
                          ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """`router_gemv_topk`, and in the same launch `expert_sort.sort_and_schedule` of its ids and
    weights: (weights, ids, sort_and_schedule's tuple). Only where that sort fits one program
    (`expert_sort.fits_one_chunk(T * top_k, num_local_experts)`)."""
    if not fits_one_chunk(x.shape[0] * top_k, num_local_experts):
        raise ValueError(f"router_gemv_topk_sort: {x.shape[0]} x {top_k} pairs over {num_local_experts} local "
                         "experts do not fit one sort program")
    weights, ids = _router_outputs(x, weight, bias, top_k)
    sort = OneChunkSort(ids, expert_map, num_local_experts, weights, num_tiles, block_m)
    _launch_router_gemv(x, weight, bias, top_k, weights, ids, sort)
    return weights, ids, sort.schedule_outputs()


def _router_outputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks of `router_gemv_topk`'s arguments, and its outputs allocated."""
    tokens, hidden = x.shape
    num_experts = weight.shape[0]
    if not (1 <= tokens <= ROUTER_GEMV_MAX_TOKENS and num_experts <= ROUTER_GEMV_MAX_EXPERTS and weight.shape[1] >= hidden
            and x.stride(1) == 1 and weight.stride(1) == 1 and bias.dtype == torch.float32
            and bias.shape == (num_experts,) and 1 <= top_k <= num_experts
            and (weight.dtype == torch.float32 or weight.dtype == x.dtype == torch.bfloat16)):
        raise ValueError(f"router_gemv_topk: x {tuple(x.shape)} {x.dtype} strides {x.stride()}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}, bias {tuple(bias.shape)} {bias.dtype}, top_k {top_k}")
    return (torch.empty(tokens, top_k, dtype=torch.float32, device=x.device),
            torch.empty(tokens, top_k, dtype=torch.int64, device=x.device))


def _launch_router_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int,
                        weights: torch.Tensor, ids: torch.Tensor, sort: OneChunkSort | None) -> None:
    tokens, hidden = x.shape
    num_experts = weight.shape[0]
    device = x.device
    block_e = max(16, triton.next_power_of_2(num_experts))
    block_ep = min(block_e, _GEMV_EXPERTS_PER_PROGRAM)
    expert_blocks = block_e // block_ep
    hidden_splits = max(1, _GEMV_PROGRAMS // expert_blocks)
    steps = triton.cdiv(triton.cdiv(hidden, _GEMV_BLOCK_H), hidden_splits)     # per program
    splits = triton.cdiv(hidden, steps * _GEMV_BLOCK_H)
    partial = torch.empty(splits * ROUTER_GEMV_MAX_TOKENS * block_e, dtype=torch.float32, device=device)
    ticket = torch.zeros(1, dtype=torch.int32, device=device)
    if sort is None:        # the sort's pointers and sizes go unread
        sort_arguments = (ids,) * 9 + (0, 0)
        sort_constexprs = dict(SORT=False, HAS_MAP=False, SORT_BLOCK_R=16, SORT_BLOCK_E=16, BLOCK_M=16,
                               SCHEDULE_BLOCK_T=16, TILE_STEPS=1)
    else:
        sort_arguments = (sort.map, sort.sorted_slot, sort.sorted_token, sort.sorted_weight, sort.inverse,
                          sort.offsets, sort.counts, sort.tile_expert, sort.tile_row_start, sort.num_local,
                          sort.num_tiles)
        sort_constexprs = dict(SORT=True, HAS_MAP=sort.has_map, SORT_BLOCK_R=sort.pair_block,
                               SORT_BLOCK_E=sort.block_e, BLOCK_M=sort.block_m,
                               SCHEDULE_BLOCK_T=sort.schedule_block_t, TILE_STEPS=sort.tile_steps)
    pdl = pdl_launch(device)
    launch(_router_gemv_topk_kernel, (splits, expert_blocks),
           x, x.stride(0), weight, weight.stride(0), bias, partial, ticket, weights, ids,
           tokens, num_experts, hidden, *sort_arguments, TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
           BLOCK_T=ROUTER_GEMV_MAX_TOKENS, BLOCK_E=block_e, BLOCK_EP=block_ep, BLOCK_H=_GEMV_BLOCK_H, STEPS=steps,
           SPLITS=splits, **sort_constexprs, PDL=pdl,
           num_warps=8 if sort is not None else 4,      # (the sort's one-hot tile: up to 64 x 256 values)
           launch_pdl=pdl, **LAUNCH_OPTIONS)
