"""Probe (GPU): routing metadata at decode sizes, the sort and tile schedule in one launch
(`routing_metadata` now) against the four-launch path (`expert_sort` + `tile_schedule`), and
the whole layer, same run, gpt-oss shapes (H = I = 2880, top-4).

    python -m benchmarks.probes.probe_routing --out DIR        # writes DIR/probe_routing.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import record, routed_points, start_probe, time_graph
from mxfp4_moe.kernels.moe_matmul import pick_block_m
from mxfp4_moe.kernels.expert_sort import expert_sort
from mxfp4_moe.kernels.tile_schedule import tile_schedule
from mxfp4_moe.moe import MXFP4MoE
from mxfp4_moe.routing import max_tiles, routing_metadata


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="128:1,128:2,128:4,128:8,128:16,128:32,32:1,32:8,32:64,32:128")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args()
    header = start_probe(args.out)
    rows = []
    for experts, tokens, w, x, topk_w, topk_ids in routed_points(args.points):
        block_m = pick_block_m(tokens * 4, experts)
        n_tiles = max_tiles(tokens * 4, experts, block_m)

        def four_launches():
            offsets = expert_sort(topk_ids, w.expert_map, experts, topk_w)[4]
            return tile_schedule(offsets, n_tiles, block_m)

        def metadata():
            return routing_metadata(topk_ids, w.expert_map, experts, block_m, topk_w)

        layer = MXFP4MoE(w, backend="triton")
        row = {"experts": experts, "tokens": tokens, "tiles": n_tiles,
               "routing_metadata_ms": time_graph(metadata),
               "four_launches_ms": time_graph(four_launches),
               "layer_ms": time_graph(lambda: layer(x))}
        record(row, rows, args.out / "probe_routing.json", header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
