"""Routing: logits = x @ W_r.T + b_r, then the family's scoring (`semantics.score`): gpt-oss's
top-k then softmax over the k chosen, or Qwen-style softmax over all experts then top-k
(renormalised or not). Shared by every backend, so the kernels and the reference route identically.
Also the metadata a grouped GEMM needs (`routing_metadata`): rows sorted by expert, counts,
offsets, the tile schedule and the inverse permutation, computed on the device.
"""

from __future__ import annotations

import torch

from . import kernel_api


def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, top_k: int, *,
          router_weight_bf16: torch.Tensor | None = None, scoring: str = "topk_softmax",
          norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts.

    x: [T, H] (or [T, H_pad] with zero padding); router_weight: [E, H_pad]; router_bias: [E].
    Returns (topk_weights [T, k] float32, summing to 1 per token; topk_ids [T, k] int64, global ids).
    Logits are float32 sums of exact products whatever x's dtype: x and the weight in float32,
    or, given router_weight_bf16 (the same weight, exactly representable in bf16: see
    `exact_bf16`) with bf16 x on a GPU, one bf16 tensor-core GEMM with float32 output (the same
    products; only the order of the float32 sums differs, and it is faster: RESULTS.md 3.4).
    Then the bias, the top-k and the softmax: one Triton launch on CUDA and under the interpreter (`kernels.router_topk`;
    among equal logits the lower expert id first), torch.topk and torch.softmax elsewhere. At
    decode sizes (`one_launch_router`) the GEMM joins that launch: the same exact products in
    x's dtype (bf16 with router_weight_bf16) or float32, summed in float32 in a fixed order.
    scoring: "topk_softmax" (gpt-oss, above) or "softmax_topk" (Qwen-style: softmax over all E in
    float32, top-k, divided by their sum when norm_topk_prob; in torch, `semantics.score`).
    """
    _check_route(x, router_weight, top_k)
    if scoring == "topk_softmax" and one_launch_router(x, router_weight.shape[0]):
        # the GEMM, the bias, the top-k and the softmax in one launch (`kernels.router_topk`)
        return kernel_api.router_gemv_topk(*_one_launch_operands(x, router_weight, router_weight_bf16),
                                           router_bias.float(), top_k)
    logits = router_logits(x, router_weight, router_weight_bf16)
    if scoring != "topk_softmax":
        from .semantics import score
        return score(logits + router_bias.float(), top_k, scoring, norm_topk_prob)
    if _use_triton(x.device):
        # bias, top-k and softmax in one launch (`kernels.router_topk`; ties: the lower expert id)
        return kernel_api.router_topk(logits, router_bias.float(), top_k)
    top_logits, topk_ids = torch.topk(logits + router_bias.float(), top_k, dim=-1)
    topk_weights = torch.softmax(top_logits, dim=-1)
    return topk_weights, topk_ids


def _check_route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"route expects x as [tokens, hidden], got shape {tuple(x.shape)}")
    num_experts = router_weight.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    if x.shape[1] > router_weight.shape[1]:
        raise ValueError(f"x has hidden size {x.shape[1]} but the router weight only {router_weight.shape[1]}")


def _one_launch_operands(x: torch.Tensor, router_weight: torch.Tensor, router_weight_bf16: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, weight) as the one-launch router reads them: the exact bf16 weight with bf16 x on a
    GPU, else float32 (the interpreter's bf16 arithmetic is unusable, so x too)."""
    if router_weight_bf16 is not None and x.dtype == torch.bfloat16 and x.device.type == "cuda":
        return x.contiguous(), router_weight_bf16
    x = x.float() if kernel_api.interpreting() else x
    return x.contiguous(), router_weight.float()


def route_with_metadata(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, top_k: int, *,
                        router_weight_bf16: torch.Tensor | None, expert_map: torch.Tensor | None,
                        num_local_experts: int, block_m: int
                        ) -> tuple[torch.Tensor, torch.Tensor, RoutingMetadata]:
    """`route` with gpt-oss's scoring, then `routing_metadata(topk_ids, expert_map,
    num_local_experts, block_m, topk_weights)`: (topk_weights, topk_ids, metadata). Where the
    one-launch router runs and the sort fits one program (`kernels.expert_sort.fits_one_chunk`),
    both in that one launch: the same values as the two calls."""
    tokens = x.shape[0]
    if not (one_launch_router(x, router_weight.shape[0])
            and kernel_api.fits_one_chunk(tokens * top_k, num_local_experts)):
        topk_weights, topk_ids = route(x, router_weight, router_bias, top_k, router_weight_bf16=router_weight_bf16)
        return topk_weights, topk_ids, routing_metadata(topk_ids, expert_map, num_local_experts, block_m,
                                                        topk_weights)
    _check_route(x, router_weight, top_k)      # (`route` checks its own)
    num_tiles = kernel_api.max_tiles(tokens * top_k, num_local_experts, block_m)
    topk_weights, topk_ids, sorted_and_scheduled = kernel_api.router_gemv_topk_sort(
        *_one_launch_operands(x, router_weight, router_weight_bf16), router_bias.float(), top_k,
        expert_map, num_local_experts, num_tiles, block_m)
    return topk_weights, topk_ids, _metadata(sorted_and_scheduled, tokens, top_k, num_local_experts, block_m)


ONE_LAUNCH_ROUTER_ON_CUDA = False
"""Whether CUDA tensors take the one-launch router (`one_launch_router`; with the expert sort in
the same launch through `route_with_metadata`). Off until its GPU tests
(tests/test_routing_on_gpu.py, tests/test_eager_plan.py, tests/test_layer_on_gpu.py) and the
layer's GPU time against cuBLAS then the sort (`benchmarks/probes/probe_layer_ab.py --switch
one_launch_router`) have run on a GPU; the interpreter runs it in every CPU test meanwhile."""


def one_launch_router(x: torch.Tensor, num_experts: int) -> bool:
    """Whether `route` (gpt-oss's scoring) takes the one-launch router GEMM and top-k for x: where
    the Triton routing runs (on CUDA while `ONE_LAUNCH_ROUTER_ON_CUDA`), at up to
    `ROUTER_GEMV_MAX_TOKENS` tokens and experts."""
    return (_use_triton(x.device) and (ONE_LAUNCH_ROUTER_ON_CUDA or x.device.type != "cuda")
            and 1 <= x.shape[0] <= kernel_api.ROUTER_GEMV_MAX_TOKENS
            and num_experts <= kernel_api.ROUTER_GEMV_MAX_EXPERTS)


def router_logits(x: torch.Tensor, router_weight: torch.Tensor,
                  router_weight_bf16: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H(_pad)] @ router_weight[:, :H].T -> [T, E] float32 logits without the bias, as
    `route` computes them (its docstring says when the bf16 GEMM is taken)."""
    hidden = x.shape[1]
    # Padded router columns are zero, so narrowing the weight to x's width changes nothing.
    if router_weight_bf16 is not None and x.dtype == torch.bfloat16 and _bf16_gemm_fp32_out(x.device):
        return torch.mm(x, router_weight_bf16[:, :hidden].T, out_dtype=torch.float32)
    return x.float() @ router_weight[:, :hidden].float().T


def exact_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` in bf16 when every value is exactly representable there (a router weight read
    from a bf16 checkpoint), else None."""
    as_bf16 = weight.to(torch.bfloat16)
    return as_bf16 if torch.equal(as_bf16.to(weight.dtype), weight) else None


_BF16_GEMM_FP32_OUT: dict[str, bool] = {}


def _bf16_gemm_fp32_out(device: torch.device) -> bool:
    """Whether torch.mm takes bf16 operands with a float32 output here (`out_dtype`, CUDA only;
    asked once per device type)."""
    if device.type != "cuda":
        return False
    if device.type not in _BF16_GEMM_FP32_OUT:
        try:
            probe = torch.ones(1, 16, dtype=torch.bfloat16, device=device)
            _BF16_GEMM_FP32_OUT[device.type] = torch.mm(probe, probe.T, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError):
            _BF16_GEMM_FP32_OUT[device.type] = False
    return _BF16_GEMM_FP32_OUT[device.type]


# ---- metadata for grouped GEMMs ---------------------------------------------------------------

def __getattr__(name: str):
    # The metadata's type and its tile bound live beside the kernels that read them
    # (`kernels/routing_metadata.py`, plain torch); their names stay importable from here.
    if name in ("RoutingMetadata", "max_tiles"):
        return getattr(kernel_api, name)
    raise AttributeError(f"module 'mxfp4_moe.routing' has no attribute {name!r}")


def _use_triton(device: torch.device) -> bool:
    """The Triton router top-k, expert sort and tile schedule on CUDA, and under Triton's
    interpreter so that the CPU tests run them; their torch twins elsewhere (and wherever
    Triton is not installed)."""
    if not kernel_api.triton_installed():
        return False
    if device.type == "cuda":
        return True
    return kernel_api.interpreting()


def tile_schedule_torch(offsets: torch.Tensor, num_tiles: int, block_m: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch twin of `kernels.tile_schedule.tile_schedule`: offsets [E + 1] int32 ->
    (counts [E], tile_expert [num_tiles], tile_row_start [num_tiles]), int32.

    Expert e owns ceil(c_e / block_m) consecutive tiles. Tile i belongs to the first expert whose
    cumulative tile count exceeds i; past the last real tile it gets -1 (row start 0)."""
    num_experts = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:-1]
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per_expert, 0)                                 # [E_local]
    tile_idx = torch.arange(num_tiles, dtype=tile_end.dtype, device=offsets.device)
    tile_expert = torch.searchsorted(tile_end, tile_idx, right=True)             # in 0..E_local
    real = tile_expert < num_experts
    safe_expert = tile_expert.clamp(max=num_experts - 1)
    first_tile = tile_end[safe_expert] - tiles_per_expert[safe_expert]
    row_start = offsets[safe_expert] + (tile_idx - first_tile) * block_m
    tile_expert = torch.where(real, tile_expert, torch.full_like(tile_expert, -1)).to(torch.int32)
    row_start = torch.where(real, row_start, torch.zeros_like(row_start)).to(torch.int32)
    return counts.to(torch.int32), tile_expert, row_start


def routing_metadata(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, num_local_experts: int,
                     block_m: int, topk_weights: torch.Tensor | None = None) -> RoutingMetadata:
    """Sort the routed pairs by local expert and lay out the tile schedule, all on topk_ids' device.

    topk_ids: [T, k] integer global expert ids (from `route`); expert_map: [E] integer, global ->
    local id or -1 (None: the identity, every expert local); num_local_experts: E_local;
    block_m: rows per tile (power of two); topk_weights: optional [T, k] float routing weights.
    Returns a `RoutingMetadata`. No host synchronisation: the sizes depend only on T, k, E_local
    and block_m.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"routing_metadata: topk_ids must be [tokens, top_k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"routing_metadata: topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if block_m <= 0 or block_m & (block_m - 1):
        raise ValueError(f"routing_metadata: block_m must be a power of two, got {block_m}")
    if num_local_experts <= 0:
        raise ValueError(f"routing_metadata: num_local_experts must be positive, got {num_local_experts}")
    if topk_weights is not None and topk_weights.shape != topk_ids.shape:
        raise ValueError(f"routing_metadata: topk_weights shape {tuple(topk_weights.shape)} != topk_ids "
                         f"shape {tuple(topk_ids.shape)}")
    device = topk_ids.device
    tokens, top_k = topk_ids.shape
    rows = tokens * top_k
    n_tiles = kernel_api.max_tiles(rows, num_local_experts, block_m)
    if _use_triton(device):
        (sorted_slot, sorted_token, sorted_weight, inverse, offsets, counts, tile_expert,
         row_start) = kernel_api.sort_and_schedule(topk_ids, expert_map, num_local_experts, topk_weights, n_tiles,
                                                   block_m)
    else:
        sorted_slot, sorted_token, sorted_weight, inverse, offsets = expert_sort_torch(
            topk_ids, expert_map, num_local_experts, topk_weights)
        counts, tile_expert, row_start = tile_schedule_torch(offsets, n_tiles, block_m)
    return _metadata((sorted_slot, sorted_token, sorted_weight, inverse, offsets, counts, tile_expert, row_start),
                     tokens, top_k, num_local_experts, block_m)


def _metadata(sorted_and_scheduled: tuple, tokens: int, top_k: int, num_local_experts: int,
              block_m: int) -> RoutingMetadata:
    """A `RoutingMetadata` from `kernels.expert_sort.sort_and_schedule`'s tuple."""
    sorted_slot, sorted_token, sorted_weight, inverse, offsets, counts, tile_expert, row_start = sorted_and_scheduled
    return kernel_api.RoutingMetadata(
        num_tokens=tokens, top_k=top_k, num_local_experts=num_local_experts, block_m=block_m,
        sorted_token=sorted_token, sorted_slot=sorted_slot, sorted_weight=sorted_weight, inverse=inverse,
        expert_counts=counts, expert_offsets=offsets, tile_expert=tile_expert, tile_row_start=row_start)


def expert_sort_torch(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, num_local_experts: int,
                      topk_weights: torch.Tensor | None = None):
    """Torch twin of `kernels.expert_sort.expert_sort`: the stable sort of the routed pairs by
    local expert (other ranks' pairs last) -> (sorted_slot, sorted_token, sorted_weight or None,
    inverse, offsets [E_local + 1]), int32 but the weights (float32)."""
    device = topk_ids.device
    tokens, top_k = topk_ids.shape
    rows = tokens * top_k
    flat_ids = topk_ids.reshape(-1).long()
    if expert_map is None:
        local = flat_ids
    else:
        local = expert_map.to(device=device, dtype=torch.long)[flat_ids]
    # Non-local pairs get key E_local, so a stable sort puts them after every local expert.
    key = torch.where(local < 0, torch.full_like(local, num_local_experts), local)
    sorted_key, order = torch.sort(key, stable=True)
    # offsets[e] = first sorted row whose key is >= e; offsets[E_local] = local rows.
    expert_ids = torch.arange(num_local_experts + 1, dtype=sorted_key.dtype, device=device)
    offsets = torch.searchsorted(sorted_key, expert_ids, out_int32=True)
    inverse = torch.empty(rows, dtype=torch.int32, device=device)
    inverse[order] = torch.arange(rows, dtype=torch.int32, device=device)
    sorted_weight = None if topk_weights is None else topk_weights.reshape(-1).float()[order]
    sorted_token = (order // top_k).to(torch.int32) if top_k else order.to(torch.int32)
    return order.to(torch.int32), sorted_token, sorted_weight, inverse, offsets
