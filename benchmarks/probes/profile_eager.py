"""Profile (GPU): where an eager forward's host time goes. For each point it prints the wall time
of an eager forward, the host time to issue one (no synchronisation: what Python and the
launches cost), the GPU time of the same forward (CUDA-graph replay), the same two times for
`CUDAGraphMoE` (the layer replayed from a graph per token bucket, input and output copies
included), and the functions that take the eager host time (cProfile, own time and
cumulative). gpt-oss shapes (H = I = 2880, top-4).

    python -m benchmarks.probes.profile_eager --experts 32 --tokens 1,512
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from triton.testing import do_bench_cudagraph

from benchmarks.common import gpt_oss_weights
from mxfp4_moe.graphs import CUDAGraphMoE
from mxfp4_moe.moe import MXFP4MoE


def host_and_wall_ms(fn, calls: int) -> tuple[float, float]:
    """(host ms per call to issue `calls` calls, wall ms per call until the GPU is done)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (issued - start) * 1e3 / calls, (done - start) * 1e3 / calls


def profile_point(layer: MXFP4MoE, graphed: CUDAGraphMoE, tokens: int, calls: int, top: int) -> None:
    x = torch.randn(tokens, 2880, device="cuda").to(torch.bfloat16)
    for _ in range(5):
        layer(x)
        graphed(x)
    host_ms, wall_ms = host_and_wall_ms(lambda: layer(x), calls)
    graph_ms = do_bench_cudagraph(lambda: layer(x), rep=100)
    graphed_host_ms, graphed_wall_ms = host_and_wall_ms(lambda: graphed(x), calls)
    print(f"\nE={layer.weights.num_local_experts} T={tokens}: eager {wall_ms:.3f} ms per forward, host "
          f"{host_ms:.3f} ms to issue one, GPU {graph_ms:.3f} ms (CUDA graph); CUDAGraphMoE {graphed_wall_ms:.3f} "
          f"ms per forward, host {graphed_host_ms:.3f} ms to issue one", flush=True)
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(calls):
        layer(x)
    profiler.disable()
    torch.cuda.synchronize()
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats(order).print_stats(top)
        body = text.getvalue()
        print(f"-- by {order} ({calls} forwards)\n" + body[body.find("ncalls"):], flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="32")
    p.add_argument("--tokens", default="1,512")
    p.add_argument("--calls", type=int, default=50, help="forwards timed and profiled per point")
    p.add_argument("--top", type=int, default=25, help="functions listed per ordering")
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    for experts in map(int, args.experts.split(",")):
        w = gpt_oss_weights(experts)
        layer = MXFP4MoE(w, backend="triton")
        del w
        graphed = CUDAGraphMoE(layer, max_tokens=max(map(int, args.tokens.split(","))))
        for tokens in map(int, args.tokens.split(",")):
            profile_point(layer, graphed, tokens, args.calls, args.top)
        del layer, graphed
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
