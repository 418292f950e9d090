"""Benchmark (GPU): the fragment-order copy's cost at load time and in memory. Per expert count,
gpt-oss shapes (H = I = 2880): the time `to_fragment_order` takes to build the copy of w13 and w2
and `from_fragment_order` to rebuild checkpoint order (median of 3, synchronised; GB/s of the
checkpoint-order bytes), and the GPU memory an `MXFP4MoE` holds with only the fragment copy (the
default on Hopper) and with both orders (keep_checkpoint_order=True).

    python -m benchmarks.bench_fragment_layout --out DIR    # writes DIR/bench_fragment_layout.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import gpt_oss_weights, record, start_probe
from mxfp4_moe.kernels.fragment_layout import from_fragment_order, to_fragment_order
from mxfp4_moe.moe import MXFP4MoE


def seconds(fn, repeats: int = 3) -> float:
    """Median wall time of fn() in s, synchronised before and after."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_bytes(experts: int, keep: bool | None) -> int:
    """GPU memory held by a layer built from fresh weights the caller then drops."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    weights = gpt_oss_weights(experts)
    layer = MXFP4MoE(weights, backend="triton", keep_checkpoint_order=keep)
    del weights
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    del layer
    torch.cuda.empty_cache()
    return held


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="32,128")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args()
    header = start_probe(args.out, shapes="H = I = 2880")
    rows: list[dict] = []
    path = args.out / "bench_fragment_layout.json"
    for experts in map(int, args.experts.split(",")):
        w = gpt_oss_weights(experts)
        for name in ("w13", "w2"):
            blocks, scales = getattr(w, f"{name}_blocks"), getattr(w, f"{name}_scales")
            checkpoint_bytes = blocks.numel() + scales.numel()
            fragments = to_fragment_order(blocks, scales)
            build_s = seconds(lambda: to_fragment_order(blocks, scales))
            rebuild_s = seconds(lambda: from_fragment_order(fragments))
            record({"experts": experts, "weight": name, "checkpoint_mb": checkpoint_bytes / 1e6,
                    "fragment_mb": (fragments.words.numel() * 4 + fragments.scales.numel()) / 1e6,
                    "to_fragment_order_s": build_s, "to_gbs": checkpoint_bytes / build_s / 1e9,
                    "from_fragment_order_s": rebuild_s, "from_gbs": checkpoint_bytes / rebuild_s / 1e9},
                   rows, path, header)
        del w
        torch.cuda.empty_cache()
        record({"experts": experts, "layer_mb_fragment_copy_only": layer_bytes(experts, None) / 1e6,
                "layer_mb_both_orders": layer_bytes(experts, True) / 1e6}, rows, path, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
