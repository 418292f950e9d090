"""Launcher for the expert sort (`_expert_sort.py`), used by `mxfp4_moe.routing.routing_metadata`
on CUDA tensors (and under the interpreter); `routing.expert_sort_torch` is its torch twin."""

from __future__ import annotations

import torch
import triton

from ._expert_sort import _histogram_kernel, _scan_kernel, _scatter_kernel

_ONE_HOT_ELEMENTS = 8192     # pairs per chunk x key slots: the one-hot tile each program holds
_SCAN_CHUNKS = 16            # chunks per step of the scan


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
    block_r = max(16, _ONE_HOT_ELEMENTS // block_e)
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
                                     HAS_MAP=has_map, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=4)
    _scan_kernel[(1,)](counts, start, offsets, num_chunks, num_local_experts,
                       MAX_CHUNKS=max(_SCAN_CHUNKS, triton.next_power_of_2(num_chunks)), BLOCK_C=_SCAN_CHUNKS,
                       BLOCK_E=block_e, num_warps=4)
    if rows:
        _scatter_kernel[(num_chunks,)](
            ids, map_t, weights if weights is not None else ids, start, sorted_slot, sorted_token,
            sorted_weight if sorted_weight is not None else sorted_slot, inverse, rows, num_local_experts, top_k,
            HAS_MAP=has_map, HAS_WEIGHTS=weights is not None, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=4)
    return sorted_slot, sorted_token, sorted_weight, inverse, offsets
