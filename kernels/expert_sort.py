"""Launcher for the expert sort (`_expert_sort.py`), used by `mxfp4_moe.routing.routing_metadata`
on CUDA tensors (and under the interpreter); `routing.expert_sort_torch` is its torch twin."""

from __future__ import annotations

import torch
import triton

from ._expert_sort import _histogram_kernel, _scan_kernel, _scatter_kernel

# Pairs per chunk x key slots: the one-hot tile a histogram or scatter program holds, and the
# chunks x key slots of one scan step (8 warps: 64 values a thread). At E = 128 and T = 8192:
# 512 chunks of 64 pairs, 8 scan steps. The first version (8192, 16 chunks a step, 4 warps)
# took 0.111 ms there against 0.033 ms at E = 32 (H200): 1024 chunks for its one-program scan.
_TILE_ELEMENTS = 16384
_NUM_WARPS = 8


def expert_sort(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, num_local_experts: int,
                topk_weights: torch.Tensor | None = None):
    """Stable sort of the T * k routed pairs by local expert, pairs of other ranks' experts last.

    topk_ids [T, k] integer global ids; expert_map [E] global -> local id or -1 (None: identity);
    topk_weights [T, k] float or None. Returns (sorted_slot, sorted_token, sorted_weight or None,
    inverse, offsets) as documented in `routing.RoutingMetadata` (offsets [E_local + 1] int32).
    Three launches, no host synchronisation."""
    tokens, top_k = topk_ids.shape
    rows = tokens * top_k
    device = topk_ids.device
    ids = topk_ids.reshape(-1)
    block_e = triton.next_power_of_2(num_local_experts + 1)
    block_r = max(16, _TILE_ELEMENTS // block_e)       # pairs per chunk, and chunks per scan step
    num_chunks = max(1, triton.cdiv(rows, block_r))
    offsets = torch.empty(num_local_experts + 1, dtype=torch.int32, device=device)
    sorted_slot = torch.empty(rows, dtype=torch.int32, device=device)
    sorted_token = torch.empty(rows, dtype=torch.int32, device=device)
    inverse = torch.empty(rows, dtype=torch.int32, device=device)
    sorted_weight = None
    if topk_weights is not None:
        sorted_weight = torch.empty(rows, dtype=torch.float32, device=device)
        weights = topk_weights.reshape(-1).float()
    else:
        weights = None
    counts = torch.empty((num_chunks, block_e), dtype=torch.int32, device=device)
    start = torch.empty_like(counts)
    has_map = expert_map is not None
    map_t = expert_map.to(device) if has_map else ids      # any integer dtype; unread without a map
    _histogram_kernel[(num_chunks,)](ids, map_t, counts, rows, num_local_experts,
                                     HAS_MAP=has_map, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=_NUM_WARPS)
    _scan_kernel[(1,)](counts, start, offsets, num_chunks, num_local_experts,
                       MAX_CHUNKS=max(block_r, triton.next_power_of_2(num_chunks)), BLOCK_C=block_r,
                       BLOCK_E=block_e, num_warps=_NUM_WARPS)
    if rows:
        _scatter_kernel[(num_chunks,)](
            ids, map_t, weights if weights is not None else ids, start, sorted_slot, sorted_token,
            sorted_weight if sorted_weight is not None else sorted_slot, inverse, rows, num_local_experts, top_k,
            HAS_MAP=has_map, HAS_WEIGHTS=weights is not None, BLOCK_R=block_r, BLOCK_E=block_e,
            num_warps=_NUM_WARPS)
    return sorted_slot, sorted_token, sorted_weight, inverse, offsets
