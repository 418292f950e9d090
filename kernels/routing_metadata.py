"""What a grouped GEMM reads of the routing (`RoutingMetadata`, built by
`mxfp4_moe.routing.routing_metadata`; `moe_matmul` reads it) and the bound on its tile count.
Plain torch and Python: it lives beside the kernels that read it so that the launchers name its
fields without importing the package, and the package reaches it through
`mxfp4_moe.kernel_api` (it needs no Triton).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingMetadata:
    """Where each (token, slot) pair goes in a grouped GEMM, and the tiles that cover them.

    The T*k routed pairs ("rows") are sorted by local expert, stably (ties keep token order);
    pairs routed to experts on other ranks (expert_map == -1) sort after all local ones and are
    never touched by a tile: they are dropped (expert parallelism). R = T * k.

      sorted_token   [R] int32  token index of sorted row r (the input row to gather)
      sorted_slot    [R] int32  flat pair index t * k + j of sorted row r
      sorted_weight  [R] float32 routing weight of sorted row r, or None when not given
      inverse        [R] int32  sorted position of flat pair index t * k + j (a permutation)
      expert_counts  [E_local] int32   rows routed to each local expert
      expert_offsets [E_local + 1] int32  first sorted row of each expert; [E_local] = local rows
      tile_expert    [max_tiles] int32  local expert of tile i, or -1: no work (exit at once)
      tile_row_start [max_tiles] int32  first sorted row of tile i (its rows end at
                                        min(start + block_m, expert_offsets[e + 1]))

    max_tiles = min(ceil(R / block_m) + E_local, R) bounds the real tile count whatever the
    routing, so everything is computed on the device with no host synchronisation (CUDA-graph
    safe).
    """

    num_tokens: int
    top_k: int
    num_local_experts: int
    block_m: int
    sorted_token: torch.Tensor
    sorted_slot: torch.Tensor
    sorted_weight: torch.Tensor | None
    inverse: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    tile_expert: torch.Tensor
    tile_row_start: torch.Tensor

    @property
    def num_rows(self) -> int:
        """R = T * k: routed pairs, local or not."""
        return self.num_tokens * self.top_k

    @property
    def max_tiles(self) -> int:
        return self.tile_expert.shape[0]


def max_tiles(num_rows: int, num_local_experts: int, block_m: int) -> int:
    """Upper bound on the tiles of `block_m` rows: sum_e ceil(c_e / m) <= ceil(R / m) + E_local,
    and <= R (every tile holds a row; at least 1). The kernels' grids have this many tiles, and
    the ones past the real count exit at once: at T = 1, E_local = 128 the second bound cuts
    129 tiles to 4."""
    return max(1, min(-(-num_rows // block_m) + num_local_experts, num_rows))
