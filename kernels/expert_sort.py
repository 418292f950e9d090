"""Launchers for the expert sort (`_expert_sort.py`), used by `mxfp4_moe.routing.routing_metadata`
on CUDA tensors (and under the interpreter); `routing.expert_sort_torch` and
`routing.tile_schedule_torch` are their torch twins."""

from __future__ import annotations

import torch
import triton

from ._compat import LAUNCH_OPTIONS
from .launches import launch
from ._grid_dependency import pdl_launch
from ._expert_sort import _histogram_kernel, _scan_kernel, _scatter_kernel, _sort_one_chunk_kernel
from .tile_schedule import TILES_PER_PROGRAM, tile_schedule

# Pairs per chunk x key slots: the one-hot tile a histogram or scatter program holds, and the
# chunks x key slots of one scan step (8 warps: 64 values a thread). At E = 128 and T = 8192:
# 512 chunks of 64 pairs, 8 scan steps; a smaller tile left the one-program scan too many chunks
# (RESULTS.md 3.4).
_TILE_ELEMENTS = 16384
_NUM_WARPS = 8


def _chunking(rows: int, num_local_experts: int) -> tuple[int, int, int]:
    """(key slots, pairs per chunk, chunks) of a sort of `rows` pairs: key slot E_local holds
    the pairs of other ranks' experts."""
    block_e = triton.next_power_of_2(num_local_experts + 1)
    block_r = max(16, _TILE_ELEMENTS // block_e)       # pairs per chunk, and chunks per scan step
    return block_e, block_r, max(1, triton.cdiv(rows, block_r))


class _Sort:
    """What the launches of one sort share: sizes, flattened inputs, the output tensors."""

    def __init__(self, topk_ids: torch.Tensor, expert_map: torch.Tensor | None, num_local_experts: int,
                 topk_weights: torch.Tensor | None):
        tokens, self.top_k = topk_ids.shape
        self.rows = tokens * self.top_k
        self.num_local = num_local_experts
        self.block_e, self.block_r, self.num_chunks = _chunking(self.rows, num_local_experts)
        device = topk_ids.device
        self.ids = topk_ids.reshape(-1)
        self.has_map = expert_map is not None
        self.map = expert_map.to(device) if self.has_map else self.ids   # any integer dtype; unread without a map
        self.weights = topk_weights.reshape(-1).float() if topk_weights is not None else None
        self.offsets = torch.empty(num_local_experts + 1, dtype=torch.int32, device=device)
        self.sorted_slot = torch.empty(self.rows, dtype=torch.int32, device=device)
        self.sorted_token = torch.empty(self.rows, dtype=torch.int32, device=device)
        self.inverse = torch.empty(self.rows, dtype=torch.int32, device=device)
        self.sorted_weight = (torch.empty(self.rows, dtype=torch.float32, device=device)
                              if topk_weights is not None else None)

    def scatter_pointers(self) -> tuple:
        """ids, map, weights, sorted_slot, sorted_token, sorted_weight: the leading arguments of
        the scatter and of the one-launch sort (a placeholder tensor where one is absent)."""
        return (self.ids, self.map, self.weights if self.weights is not None else self.ids,
                self.sorted_slot, self.sorted_token,
                self.sorted_weight if self.sorted_weight is not None else self.sorted_slot)

    def outputs(self) -> tuple:
        return self.sorted_slot, self.sorted_token, self.sorted_weight, self.inverse, self.offsets


def expert_sort(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, num_local_experts: int,
                topk_weights: torch.Tensor | None = None):
    """Stable sort of the T * k routed pairs by local expert, pairs of other ranks' experts last.

    topk_ids [T, k] integer global ids; expert_map [E] global -> local id or -1 (None: identity);
    topk_weights [T, k] float or None. Returns (sorted_slot, sorted_token, sorted_weight or None,
    inverse, offsets) as documented in `routing_metadata.RoutingMetadata` (offsets [E_local + 1] int32).
    Three launches, no host synchronisation."""
    s = _Sort(topk_ids, expert_map, num_local_experts, topk_weights)
    counts = torch.empty((s.num_chunks, s.block_e), dtype=torch.int32, device=s.ids.device)
    start = torch.empty_like(counts)
    launch(_histogram_kernel, (s.num_chunks,), s.ids, s.map, counts, s.rows, s.num_local,
                                       HAS_MAP=s.has_map, BLOCK_R=s.block_r, BLOCK_E=s.block_e, num_warps=_NUM_WARPS,
                                       **LAUNCH_OPTIONS)
    launch(_scan_kernel, (1,), counts, start, s.offsets, s.num_chunks, s.num_local,
                       MAX_CHUNKS=max(s.block_r, triton.next_power_of_2(s.num_chunks)), BLOCK_C=s.block_r,
                       BLOCK_E=s.block_e, num_warps=_NUM_WARPS, **LAUNCH_OPTIONS)
    if s.rows:
        ids, map_t, weights, sorted_slot, sorted_token, sorted_weight = s.scatter_pointers()
        launch(_scatter_kernel, (s.num_chunks,),
            ids, map_t, weights, start, sorted_slot, sorted_token, sorted_weight, s.inverse, s.rows, s.num_local,
            s.top_k, HAS_MAP=s.has_map, HAS_WEIGHTS=s.weights is not None, BLOCK_R=s.block_r, BLOCK_E=s.block_e,
            num_warps=_NUM_WARPS, **LAUNCH_OPTIONS)
    return s.outputs()


def fits_one_chunk(rows: int, num_local_experts: int) -> bool:
    """Whether a sort of `rows` pairs is one program's (`_sort_one_chunk`): T * k <= 64 pairs
    at E_local = 128, 256 at 32 (decode sizes)."""
    return _chunking(rows, num_local_experts)[2] == 1


class OneChunkSort(_Sort):
    """A sort that fits one chunk, and its tile schedule: the outputs, and the sizes of the one
    program (`_expert_sort._sort_one_chunk`) that computes them, in its own launch
    (`sort_and_schedule`) or at the end of the one-launch router's (`router_topk`)."""

    def __init__(self, topk_ids: torch.Tensor, expert_map: torch.Tensor | None, num_local_experts: int,
                 topk_weights: torch.Tensor | None, num_tiles: int, block_m: int):
        super().__init__(topk_ids, expert_map, num_local_experts, topk_weights)
        self.num_tiles, self.block_m = num_tiles, block_m
        # The schedule's tiles per step: the tiles' next power of two, up to TILES_PER_PROGRAM (a
        # search over more tiles than there are is what made one launch lose to two: RESULTS.md 3.5).
        self.schedule_block_t = min(TILES_PER_PROGRAM, max(16, triton.next_power_of_2(num_tiles)))
        self.tile_steps = triton.next_power_of_2(triton.cdiv(num_tiles, self.schedule_block_t))
        # Likewise the pairs: the one-hot [pairs x key slots] the program scans spans the pairs'
        # next power of two, not the chunk's (T = 1 at E = 128: 16 x 256 instead of 64 x 256).
        self.pair_block = min(self.block_r, max(16, triton.next_power_of_2(self.rows)))
        device = self.ids.device
        self.counts = torch.empty(num_local_experts, dtype=torch.int32, device=device)
        self.tile_expert = torch.empty(num_tiles, dtype=torch.int32, device=device)
        self.tile_row_start = torch.empty(num_tiles, dtype=torch.int32, device=device)

    def schedule_outputs(self) -> tuple:
        """`sort_and_schedule`'s return value."""
        return (*self.outputs(), self.counts, self.tile_expert, self.tile_row_start)


def sort_and_schedule(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, num_local_experts: int,
                      topk_weights: torch.Tensor | None, num_tiles: int, block_m: int) -> tuple:
    """`expert_sort`, then `tile_schedule.tile_schedule(offsets, num_tiles, block_m)`: returns
    (sorted_slot, sorted_token, sorted_weight, inverse, offsets, counts, tile_expert,
    tile_row_start). When every pair fits in one chunk of the sort (`fits_one_chunk`), one
    launch sorts and builds the schedule; otherwise four launches. No host synchronisation
    either way."""
    if not fits_one_chunk(topk_ids.shape[0] * topk_ids.shape[1], num_local_experts):
        sorted_pairs = expert_sort(topk_ids, expert_map, num_local_experts, topk_weights)
        return (*sorted_pairs, *tile_schedule(sorted_pairs[4], num_tiles, block_m))
    s = OneChunkSort(topk_ids, expert_map, num_local_experts, topk_weights, num_tiles, block_m)
    pdl = pdl_launch(s.ids.device)
    launch(_sort_one_chunk_kernel, (1,),
        *s.scatter_pointers(), s.inverse, s.offsets, s.counts, s.tile_expert, s.tile_row_start,
        s.rows, s.num_local, s.top_k, num_tiles,
        HAS_MAP=s.has_map, HAS_WEIGHTS=s.weights is not None, BLOCK_R=s.pair_block, BLOCK_E=s.block_e,
        BLOCK_M=block_m, BLOCK_T=s.schedule_block_t, TILE_STEPS=s.tile_steps,
        PDL=pdl, num_warps=_NUM_WARPS, launch_pdl=pdl, **LAUNCH_OPTIONS)
    return s.schedule_outputs()
