"""Triton kernel: the tile schedule of `routing.routing_metadata` in one small launch (it was
about 18 torch ops, each a launch of a few microseconds: most of the layer's fixed cost at
decode sizes). Launched by `tile_schedule.py`; `_schedule_tiles` is also called by the one-launch
sort of `_expert_sort.py`.
"""

import triton
import triton.language as tl


@triton.jit
def _schedule_tiles(start, counts, mask_e, tile_expert_ptr, tile_row_start_ptr, num_experts, num_tiles, t0,
                    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tiles t0 .. t0 + BLOCK_T of the schedule: start, counts [BLOCK_E] int32 (first sorted row
    and row count of each expert; counts 0 where not mask_e) -> tile_expert (-1 past the last real
    tile) and tile_row_start (0 there). Expert e owns ceil(counts[e] / BLOCK_M) consecutive
    tiles, in expert order."""
    e = tl.arange(0, BLOCK_E)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    first_tile = tile_end - tiles
    t = t0 + tl.arange(0, BLOCK_T)
    # owner = number of experts whose tiles all come before t (a right-sided search)
    before = (tile_end[None, :] <= t[:, None]) & mask_e[None, :]
    owner = tl.sum(before.to(tl.int32), axis=1)
    is_owner = e[None, :] == owner[:, None]
    owner_first = tl.sum(tl.where(is_owner, first_tile[None, :], 0), axis=1)
    owner_start = tl.sum(tl.where(is_owner, start[None, :], 0), axis=1)
    real = owner < num_experts
    row_start = owner_start + (t - owner_first) * BLOCK_M
    mask_t = t < num_tiles
    tl.store(tile_expert_ptr + t, tl.where(real, owner, -1), mask=mask_t)
    tl.store(tile_row_start_ptr + t, tl.where(real, row_start, 0), mask=mask_t)


@triton.jit
def _tile_schedule_kernel(offsets_ptr, counts_ptr, tile_expert_ptr, tile_row_start_ptr, num_experts, num_tiles,
                          BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program i: tiles i * BLOCK_T .. + BLOCK_T. offsets [E + 1] int32 (first sorted row of each
    expert, then the local row count) -> counts [E] int32 (written by program 0), tile_expert
    [num_tiles] int32, tile_row_start [num_tiles] int32 (`_schedule_tiles`). Each program
    recomputes the per-expert prefix sums (E values: cheaper than a second launch)."""
    e = tl.arange(0, BLOCK_E)
    mask_e = e < num_experts
    start = tl.load(offsets_ptr + e, mask=mask_e, other=0)
    end = tl.load(offsets_ptr + e + 1, mask=mask_e, other=0)
    counts = end - start
    if tl.program_id(0) == 0:      # (a branch, not a scalar in the mask: Triton 3.9's interpreter rejects that)
        tl.store(counts_ptr + e, counts, mask=mask_e)
    _schedule_tiles(start, counts, mask_e, tile_expert_ptr, tile_row_start_ptr, num_experts, num_tiles,
                    tl.program_id(0) * BLOCK_T, BLOCK_M, BLOCK_E, BLOCK_T)
