"""Probe (GPU): what bounds the MoE part of load_model against a raw read of the same bytes (bench_model's loading figure)?

On bench_model's random gpt-oss-shaped checkpoints, the experts of every layer to the GPU as
load_model does it (`load_layer`, then `MXFP4MoE`, which builds the fragment-order copy), for
each variant of
    --read-mib      load_layer's max_read_bytes (its pinned staging buffers are this size)
    --builders      to_fragment_order's builder: "torch" (the reference gathers) or "triton"
against bench_model's raw route (safetensors views through two pinned 64 MiB buffers), in
alternating rounds (raw, every variant, raw, ...); per variant the medians of the whole, of
load_layer alone and of the MXFP4MoE construction alone, each timed between synchronizations.

    python -m benchmarks.probes.probe_model_load --out DIR [--models 20b 120b] [--layers-120b 12]
        [--read-mib 16 64 256] [--builders torch triton] [--rounds 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import bench_model as bm
import mxfp4_moe.kernels as kernels
from mxfp4_moe.checkpoint import open_checkpoint
from mxfp4_moe.integrations.transformers import MXFP4GptOssMLP, shard_plan
from mxfp4_moe.loader import load_layer
from mxfp4_moe.moe import MXFP4MoE

MIB = 2 ** 20


def load_ours(path: Path, device: torch.device, read_mib: int, builder: str) -> dict:
    real = kernels.to_fragment_order
    kernels.to_fragment_order = functools.partial(real, builder=builder)    # what MXFP4MoE imports
    try:
        with open_checkpoint(path) as ckpt:
            plan = shard_plan(ckpt)
            blocks, load_s, build_s, nbytes = [], 0.0, 0.0, 0
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for n in range(ckpt.config.num_layers):
                t0 = time.perf_counter()
                weights = load_layer(ckpt, n, plan, device=device, max_read_bytes=read_mib * MIB)
                torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                blocks.append(MXFP4GptOssMLP(MXFP4MoE(weights)))
                torch.cuda.synchronize(device)
                load_s += t1 - t0
                build_s += time.perf_counter() - t1
                nbytes += weights.bytes_read
                del weights
            seconds = time.perf_counter() - start
    finally:
        kernels.to_fragment_order = real
    del blocks
    bm.free_memory(device)
    return {"seconds": seconds, "load_layer_s": load_s, "moe_s": build_s, "bytes": nbytes}


def measure(path: Path, device: torch.device, args) -> dict:
    refs = bm.moe_tensor_refs(path)
    variants = [(r, b) for r in args.read_mib for b in args.builders]
    raw = [bm.load_moe_raw(refs, device)]
    runs: dict[str, list[dict]] = {f"{r} MiB, {b}": [] for r, b in variants}
    for _ in range(args.rounds):
        for r, b in variants:
            runs[f"{r} MiB, {b}"].append(load_ours(path, device, r, b))
        raw.append(bm.load_moe_raw(refs, device))
    raw_s = statistics.median(x["seconds"] for x in raw[1:])
    out = {"bytes": raw[0]["bytes"], "raw_s": [x["seconds"] for x in raw], "raw_median_s": raw_s, "variants": {}}
    for name, rows in runs.items():
        med = {k: statistics.median(x[k] for x in rows) for k in ("seconds", "load_layer_s", "moe_s")}
        out["variants"][name] = {**med, "ratio": med["seconds"] / raw_s, "load_layer_ratio": med["load_layer_s"] / raw_s,
                                 "all_s": [x["seconds"] for x in rows], "bytes": rows[0]["bytes"]}
        print(f"  {name:>18}: {med['seconds']:.3f} s = {med['seconds'] / raw_s:.2f}x raw {raw_s:.3f} s "
              f"(load_layer {med['load_layer_s']:.3f} s = {med['load_layer_s'] / raw_s:.2f}x, "
              f"MXFP4MoE {med['moe_s']:.3f} s)", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", nargs="+", choices=sorted(bm.SHAPES), default=["20b", "120b"])
    p.add_argument("--layers-120b", type=int, default=12)
    p.add_argument("--read-mib", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--builders", nargs="+", choices=["torch", "triton"], default=["torch", "triton"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/probe_model_load"))
    args = p.parse_args()
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"commit": bm.git_commit(), "device": torch.cuda.get_device_name(device), "models": {}}
    for name in args.models:
        shape = bm.SHAPES[name]
        layers = args.layers_120b if name == "120b" else shape.layers_full
        path = args.workdir / name
        t = time.perf_counter()
        bm.write_random_checkpoint(path, shape, layers, device, seed=0)
        print(f"{shape.label(layers)}: written in {time.perf_counter() - t:.1f} s", flush=True)
        result["models"][name] = {"label": shape.label(layers), **measure(path, device, args)}
        shutil.rmtree(path, ignore_errors=True)
        (args.out / "probe_model_load.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
