"""Launcher for the tile-schedule kernel (`_tile_schedule.py`), used by
`mxfp4_moe.routing.routing_metadata` on CUDA tensors (and under the interpreter)."""

from __future__ import annotations

import torch
import triton

from ._compat import LAUNCH_OPTIONS
from .launches import launch
from ._tile_schedule import _tile_schedule_kernel

TILES_PER_PROGRAM = 128     # tiles one program (or one step of the one-launch sort) schedules


def tile_schedule(offsets: torch.Tensor, num_tiles: int, block_m: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """offsets: [E + 1] int32 (first sorted row of each local expert; [E] = local rows) ->
    (counts [E] int32, tile_expert [num_tiles] int32, tile_row_start [num_tiles] int32), as
    documented in `routing_metadata.RoutingMetadata`. One launch, no host synchronisation."""
    assert offsets.dtype == torch.int32 and offsets.dim() == 1, (offsets.dtype, offsets.shape)
    num_experts = offsets.shape[0] - 1
    device = offsets.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    tile_expert = torch.empty(num_tiles, dtype=torch.int32, device=device)
    tile_row_start = torch.empty(num_tiles, dtype=torch.int32, device=device)
    launch(_tile_schedule_kernel, (triton.cdiv(num_tiles, TILES_PER_PROGRAM),),
        offsets, counts, tile_expert, tile_row_start, num_experts, num_tiles,
        BLOCK_M=block_m, BLOCK_E=max(16, triton.next_power_of_2(num_experts)), BLOCK_T=TILES_PER_PROGRAM,
        num_warps=4, **LAUNCH_OPTIONS)
    return counts, tile_expert, tile_row_start
