"""Probe (GPU): the whole MoE layer with one of its switches off and on, same run, GPU time.

The layer (`MXFP4MoE` forward) is captured in a CUDA graph with the switch off and on in
alternating rounds, and each replay timed with L2 flushed (`benchmarks.common.time_graph`);
medians; gpt-oss shapes (H = I = 2880, top-4, bf16). Each point also checks that both graphs give
the same output (relative Frobenius difference <= 1e-3: only the order of w2's atomic adds may
differ). The switches:

  pdl                programmatic dependent launch (`kernels._grid_dependency.ENABLED`): the
                     router top-k, the sort and both "rs" matmuls wait for their predecessor
                     inside the kernel instead of being launched after it
  one_launch_router  at up to 16 tokens the router's GEMM, top-k and the expert sort in one launch
                     (`routing.ONE_LAUNCH_ROUTER_ON_CUDA`) against cuBLAS, the fused top-k and the sort
  l2_prefetch        w13 asks the L2 for the routed experts' w2 weights while it runs
                     (`moe.L2_PREFETCH_MAX_ROWS`: "on" is 64 routed rows)

    python -m benchmarks.probes.probe_layer_ab --switch pdl --out DIR [--points 128:1,128:8,...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from benchmarks import common
import mxfp4_moe.kernels._grid_dependency as grid_dependency
from mxfp4_moe import moe, routing
from mxfp4_moe.moe import MXFP4MoE

DEFAULT_POINTS = "128:1,128:8,128:32,128:128,32:1,32:8,32:32,32:128"

# switch -> (module, attribute, value when off, value when on)
SWITCHES = {
    "pdl": (grid_dependency, "ENABLED", False, True),
    "one_launch_router": (routing, "ONE_LAUNCH_ROUTER_ON_CUDA", False, True),
    "l2_prefetch": (moe, "L2_PREFETCH_MAX_ROWS", 0, 64),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--switch", choices=sorted(SWITCHES), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--points", default=DEFAULT_POINTS)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    module, attribute, off_value, on_value = SWITCHES[args.switch]
    default = getattr(module, attribute)
    header = common.start_probe(args.out, probe=f"layer_ab_{args.switch}", points=args.points, rounds=args.rounds)
    rows: list[dict] = []
    for experts, tokens, w, x, _, _ in common.routed_points(args.points):
        layer = MXFP4MoE(w, backend="triton", eager_plans=False)
        times: dict[bool, list[float]] = {False: [], True: []}
        outputs = {}
        try:
            for _ in range(args.rounds):
                for on in (False, True):
                    setattr(module, attribute, on_value if on else off_value)
                    graph, out = common.graph_of(lambda: layer(x))
                    times[on].append(common.time_graph(lambda: layer(x)) * 1e3)
                    graph.replay()
                    torch.cuda.synchronize()
                    outputs[on] = out.float().clone()
                    del graph
        finally:
            setattr(module, attribute, default)
        diff = ((outputs[True] - outputs[False]).norm() / outputs[False].norm()).item()
        off, on = statistics.median(times[False]), statistics.median(times[True])
        common.record({"switch": args.switch, "E": experts, "T": tokens, "off_us": off, "on_us": on,
                       "speedup": off / on, "off_all_us": times[False], "on_all_us": times[True],
                       "output_rel_diff": diff, "outputs_agree": diff <= 1e-3},
                      rows, args.out / f"probe_layer_ab_{args.switch}.json", header)
        del layer
    return 0


if __name__ == "__main__":
    sys.exit(main())
