"""Probe (GPU): do programmatic dependent launches shorten the MoE layer, most of all at decode sizes where it is a chain of short kernels?

The whole layer (`MXFP4MoE` forward: router GEMM, fused top-k, expert sort, w13 + SwiGLU, w2 +
combine), captured in a CUDA graph with `_grid_dependency.ENABLED` off and on (the router top-k,
the one-launch sort and both "rs" matmuls then wait for their predecessor inside the kernel
instead of being launched after it), GPU time of a replay with L2 flushed
(`benchmarks.common.time_graph`), in alternating rounds, medians; gpt-oss shapes (H = I = 2880, top-4,
bf16). Each point also checks that both graphs give the same output (relative Frobenius
difference <= 1e-3: only the order of w2's atomic adds may differ).

    python -m benchmarks.probes.probe_pdl --out DIR [--points 128:1,128:8,...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from benchmarks import common
import mxfp4_moe.kernels._grid_dependency as grid_dependency
from mxfp4_moe.moe import MXFP4MoE

DEFAULT_POINTS = "128:1,128:8,128:32,128:128,32:1,32:8,32:32,32:128"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--points", default=DEFAULT_POINTS)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    header = common.start_probe(args.out, probe="pdl", points=args.points, rounds=args.rounds)
    rows: list[dict] = []
    for experts, tokens, w, x, _, _ in common.routed_points(args.points):
        layer = MXFP4MoE(w, backend="triton")
        times: dict[bool, list[float]] = {False: [], True: []}
        outputs = {}
        for _ in range(args.rounds):
            for pdl in (False, True):
                grid_dependency.ENABLED = pdl
                graph, out = common.graph_of(lambda: layer(x))
                times[pdl].append(common.time_graph(lambda: layer(x)) * 1e3)
                graph.replay()
                torch.cuda.synchronize()
                outputs[pdl] = out.float().clone()
                del graph
        grid_dependency.ENABLED = True
        diff = ((outputs[True] - outputs[False]).norm() / outputs[False].norm()).item()
        off, on = statistics.median(times[False]), statistics.median(times[True])
        common.record({"E": experts, "T": tokens, "off_us": off, "on_us": on, "speedup": off / on,
                   "off_all_us": times[False], "on_all_us": times[True], "output_rel_diff": diff,
                   "outputs_agree": diff <= 1e-3}, rows, args.out / "probe_pdl.json", header)
        del layer
    return 0


if __name__ == "__main__":
    sys.exit(main())
