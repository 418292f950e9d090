"""Probe (GPU): where the host time of one eager layer call goes at decode sizes, timed with the
GPU idle (synchronise, time the call's issue alone, synchronise), median of many calls. For each
(E, T): the whole call, then its parts as the call makes them (the routing, with the router and
the routing metadata inside it where they are two steps, each moe_matmul; timed by wrapping the
functions the layer calls), then the floors they stand on:
a Triton launch of an empty kernel with as many arguments as the matmul kernel, the same kernel
launched through its compiled handle (no Triton Python dispatch), torch.empty and a torch.mm.
Each point is timed twice: with the layer's eager plans (the default; the parts are then the
router GEMM and each replayed launch) and without them (`mxfp4_moe.eager_plan`); and each for
every --one-launch-router setting (`routing.ONE_LAUNCH_ROUTER_ON_CUDA`). gpt-oss shapes
(H = I = 2880, top-4). Issue 27's target: the whole call <= 100 us.

    python -m benchmarks.probes.probe_host_cost --experts 32,128 --tokens 1,8
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections import defaultdict

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

import mxfp4_moe.eager_plan as eager_plan
import mxfp4_moe.kernels.launches as launches
import mxfp4_moe.kernels.moe_matmul as launcher_module
import mxfp4_moe.moe as moe_module
import mxfp4_moe.routing as routing_module
from benchmarks.common import gpt_oss_weights
from mxfp4_moe.moe import MXFP4MoE


def host_us(fn, calls: int) -> float:
    """Median host time (us) to issue fn(), the GPU idle before each call."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


class PartTimer:
    """Wraps module-level functions the layer calls, recording each call's host time."""

    def __init__(self):
        self.times = defaultdict(list)
        self.restore = []

    def wrap(self, module, name: str, label=None):
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            key = label(args, kwargs) if label else name
            self.times[key].append(time.perf_counter() - start)
            return result
        setattr(module, name, timed)
        self.restore.append((module, name, original))

    def undo(self):
        for module, name, original in reversed(self.restore):
            setattr(module, name, original)

    def medians_us(self) -> dict:
        return {k: round(statistics.median(v) * 1e6, 1) for k, v in self.times.items()}


@triton.jit
def _empty_kernel(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, n0, n1, n2, f0, f1,
                  C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
                  C4: tl.constexpr, C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr):
    pass


def empty_launch_floors(calls: int) -> dict:
    """Host us of one Triton launch of an empty kernel with the matmul's argument count: through
    Triton's dispatch, and through the compiled kernel's own launcher (as a launch plan would)."""
    bufs = [torch.empty(64, device="cuda") for _ in range(11)]
    args = (*bufs, 2880, 5760, 4, 1.702, 7.0)
    consts = dict(C0=2880, C1=True, C2=False, C3=True, C4=False, C5=False, C6=True, C7=False)
    compiled = _empty_kernel[(4,)](*args, **consts)
    out = {"triton_dispatch_empty": host_us(lambda: _empty_kernel[(4,)](*args, **consts), calls)}
    try:
        stream = torch.cuda.current_stream().cuda_stream
        all_args = (*args, *consts.values())

        def direct():
            compiled.run(4, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *all_args)
        direct()
        out["compiled_handle_empty"] = host_us(direct, calls)
    except Exception as error:      # the private launcher's signature differs between releases
        out["compiled_handle_empty"] = f"{type(error).__name__}: {error}"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="32,128")
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--json", default=None)
    p.add_argument("--one-launch-router", default="off,on",
                   help="routing.ONE_LAUNCH_ROUTER_ON_CUDA settings to time (the router GEMM in cuBLAS, or in one launch)")
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    results = {"device": torch.cuda.get_device_name(), "points": []}
    floors = empty_launch_floors(args.calls)
    x_small = torch.randn(1, 2880, device="cuda", dtype=torch.bfloat16)
    router = torch.randn(128, 2880, device="cuda", dtype=torch.bfloat16)
    floors["torch_empty"] = host_us(lambda: torch.empty((4, 2880), device="cuda"), args.calls)
    floors["torch_mm_fp32_out"] = host_us(lambda: torch.mm(x_small, router.T, out_dtype=torch.float32), args.calls)
    print("floors (us):", json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in floors.items()}))
    results["floors_us"] = floors
    for experts, one_launch_router in itertools.product(map(int, args.experts.split(",")),
                                                        args.one_launch_router.split(",")):
        routing_module.ONE_LAUNCH_ROUTER_ON_CUDA = one_launch_router == "on"
        w = gpt_oss_weights(experts)
        layer = MXFP4MoE(w, backend="triton")
        del w
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, 2880, device="cuda").to(torch.bfloat16)
            point = {"experts": experts, "tokens": tokens, "one_launch_router": one_launch_router}
            for plans in (True, False):
                layer.eager_plans = plans
                for _ in range(10):
                    layer(x)
                point["whole_us" if plans else "whole_us_without_plans"] = round(host_us(lambda: layer(x), args.calls), 1)
                timer = PartTimer()
                if plans:       # the replayed call: the router GEMM, then each recorded launch
                    timer.wrap(eager_plan, "router_logits")
                    timer.wrap(launches.RecordedLaunch, "replay", label=lambda a, kw: f"replay {a[0].kernel.__name__}")
                else:           # the routing as a whole, and its two steps where they are apart
                    timer.wrap(moe_module, "route_with_metadata")
                    timer.wrap(routing_module, "route")
                    timer.wrap(routing_module, "routing_metadata")
                    timer.wrap(launcher_module, "moe_matmul",
                               label=lambda a, kw: "moe_matmul_w13" if kw.get("gather") else "moe_matmul_w2")
                try:
                    host_us(lambda: layer(x), args.calls)
                finally:
                    timer.undo()
                point["parts_us" if plans else "parts_us_without_plans"] = timer.medians_us()
            layer.eager_plans = True
            point["gpu_graph_us_l2_warm"] = round(do_bench_cudagraph(lambda: layer(x), rep=100, return_mode="median")
                                                  * 1e3, 1)
            results["points"].append(point)
            print(json.dumps(point), flush=True)
        del layer
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
