"""Dequantize throughput of the pure-torch format core, in GB/s of packed blocks read.

Default: one gpt-oss-20b layer's gate_up blocks ([32, 5760, 90, 16] uint8, 265 MB) to bf16.
    python -m benchmarks.bench_dequantize [--experts 32] [--repeat 3] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from benchmarks.common import git_commit
from mxfp4_moe.mxfp4 import BYTES_PER_BLOCK, dequantize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--rows", type=int, default=5760, help="2 * intermediate for gate_up")
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    n_blocks = args.hidden // 32
    blocks = torch.randint(0, 256, (args.experts, args.rows, n_blocks, BYTES_PER_BLOCK), generator=g,
                           dtype=torch.uint8).to(args.device)
    scales = torch.randint(118, 130, (args.experts, args.rows, n_blocks), generator=g,
                           dtype=torch.uint8).to(args.device)
    dtype = getattr(torch, args.dtype)
    times = []
    for _ in range(args.repeat + 1):                      # the first run is a warm-up
        if args.device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = dequantize(blocks, scales, dtype)
        if args.device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del out
    median = statistics.median(times[1:])
    result = {
        "shape": list(blocks.shape), "blocks_bytes": blocks.numel(), "dtype": args.dtype,
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
                                                          f"{torch.get_num_threads()} threads)",
        "median_s": round(median, 4), "gb_per_s_blocks_in": round(blocks.numel() / median / 1e9, 3),
        "gb_per_s_values_out": round(blocks.numel() * 2 * dtype.itemsize / median / 1e9, 3),
        "torch": torch.__version__, "commit": git_commit(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
