"""Profile (GPU): where the MoE layer's GPU time goes, kernel by kernel (torch.profiler, GPU
time per forward, eager calls after a warm-up), gpt-oss shapes (H = I = 2880, top-4).

    python -m benchmarks.probes.profile_layer --experts 128 --tokens 8192,2048
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import gpt_oss_weights
from mxfp4_moe.moe import MXFP4MoE


def profile_experts(experts: int, token_counts: list[int], forwards: int, top: int) -> None:
    """Print the kernel breakdown at each token count for one expert count."""
    w = gpt_oss_weights(experts)
    layer = MXFP4MoE(w, backend="triton")
    for tokens in token_counts:
        x = torch.randn(tokens, 2880, device="cuda").to(torch.bfloat16)
        for _ in range(3):
            layer(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(forwards):
                layer(x)
            torch.cuda.synchronize()
        kernels = []
        for event in prof.key_averages():
            total_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
            if total_us > 0:
                kernels.append((total_us / forwards, event.count // forwards, event.key[:90]))
        kernels.sort(reverse=True)
        print(f"E={experts} T={tokens}: GPU kernel time per forward {sum(k[0] for k in kernels) / 1000:.3f} ms")
        for us, count, name in kernels[:top]:
            print(f"   {us / 1000:8.4f} ms  x{count:<3d} {name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="128,32")
    p.add_argument("--tokens", default="8192,2048,512")
    p.add_argument("--forwards", type=int, default=5, help="profiled forwards per point (times are per forward)")
    p.add_argument("--top", type=int, default=14, help="kernels listed per point")
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    for experts in map(int, args.experts.split(",")):
        profile_experts(experts, [int(t) for t in args.tokens.split(",")], args.forwards, args.top)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
