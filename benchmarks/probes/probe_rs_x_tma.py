"""Probe (GPU): the "rs" kernel's w2 + atomic combine with its x rows (w2 reads them in sorted
order, no gather) copied by TMA, as the launcher does from 64-wide K steps, against the same
launch with the cp.async ring the gathered w13 uses; same run, in alternating order (the median
of --repeats timings each), outputs checked to agree.

    python -m benchmarks.probes.probe_rs_x_tma --points 32:512,128:2048 --out DIR    # DIR/probe_rs_x_tma.json
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from benchmarks.common import record, routed_points, start_probe, time_graph
from mxfp4_moe.kernels.moe_matmul import moe_matmul, pick_block_m
from mxfp4_moe.kernels.fragment_layout import to_fragment_order
from mxfp4_moe.routing import routing_metadata

launcher = importlib.import_module("mxfp4_moe.kernels.moe_matmul")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="32:512,32:2048,32:8192,128:512,128:2048,128:8192", help="E:T,...")
    p.add_argument("--repeats", type=int, default=3, help="timings of each path per point, in alternating order")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args()
    header = start_probe(args.out)
    rows = []
    tma_descriptor = launcher.rs_x_descriptor
    fragments = {}
    for experts, tokens, w, x, topk_w, topk_ids in routed_points(args.points):
        if experts not in fragments:
            fragments = {experts: (to_fragment_order(w.w13_blocks, w.w13_scales),
                                   to_fragment_order(w.w2_blocks, w.w2_scales))}
        frag13, frag2 = fragments[experts]
        meta = routing_metadata(topk_ids, w.expert_map, experts, pick_block_m(tokens * 4, experts), topk_w)
        act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=(w.swiglu_alpha, w.swiglu_limit),
                         fragments=frag13)

        def w2():
            return moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, gather=False, apply_row_weight=True,
                              combine="atomic", n_out=2880, fragments=frag2)

        config = launcher.default_config(meta.block_m, 2880, 2880, sm90=True, fragments=True, rows=meta.num_rows)
        row = {"experts": experts, "tokens": tokens, "block_m": meta.block_m,
               "x_tma": launcher.rs_x_tma_block(config) is not None}      # the launch w2 makes by default
        times = {"tma": [], "cp_async": []}
        outs = {}
        for rep in range(args.repeats):              # alternate which path goes first
            for path in (("tma", "cp_async") if rep % 2 == 0 else ("cp_async", "tma")):
                if path == "cp_async":
                    launcher.rs_x_descriptor = lambda x, config: None          # the cp.async ring
                try:
                    outs[path] = w2()
                    times[path].append(time_graph(w2))
                finally:
                    launcher.rs_x_descriptor = tma_descriptor
        for path, ms in times.items():
            row[f"{path}_ms"] = sorted(ms)[len(ms) // 2]
            row[f"{path}_each_ms"] = ms
        row["rel_diff"] = ((outs["tma"] - outs["cp_async"]).norm() / outs["cp_async"].norm()).item()
        row["speedup"] = row["cp_async_ms"] / row["tma_ms"]
        record(row, rows, args.out / "probe_rs_x_tma.json", header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
