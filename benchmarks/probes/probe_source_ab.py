"""Probe (GPU): time the default w13 + SwiGLU and w2 + combine launches with a kernel module as
it is ("new") and as other sources of it (e.g. `git show REV:kernels/_moe_matmul_sm90.py >
old.py`; named by file stem), same shapes (gpt-oss, H = I = 2880, top-4), same run, outputs
checked to agree with "new".

    python -m benchmarks.probes.probe_source_ab --module _moe_matmul_sm90 --kernel _moe_matmul_sm90_kernel \\
        --old old.py [other.py ...] --out DIR                     # writes DIR/probe_source_ab.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from benchmarks.common import SWEEP_AGREEMENT, git_commit, record, routed_points, time_graph
from mxfp4_moe.kernels.moe_matmul import moe_matmul, pick_block_m
from mxfp4_moe.routing import routing_metadata


def load_source(path: Path, name: str):
    """Import `path` as a module whose relative imports resolve inside mxfp4_moe.kernels."""
    src = path.read_text().replace("from ._", "from mxfp4_moe.kernels._")
    copy = path.with_name(f"ab_copy_{name}.py")
    copy.write_text(src)
    spec = importlib.util.spec_from_file_location(copy.stem, copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[copy.stem] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module", required=True, help="kernel module in mxfp4_moe.kernels, e.g. _moe_matmul_sm90")
    p.add_argument("--kernel", required=True, help="the kernel's name in that module")
    p.add_argument("--old", type=Path, nargs="+", required=True, help="other sources of the module")
    p.add_argument("--points", default="32:2048,32:8192,128:2048,128:8192", help="E:T,...")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(f"mxfp4_moe.kernels.{args.module}")
    kernels = {"new": getattr(module, args.kernel)}
    for path in args.old:
        kernels[path.stem] = getattr(load_source(path, path.stem), args.kernel)
    header = {"device": torch.cuda.get_device_name(), "commit": git_commit(), "module": args.module}
    print(json.dumps(header), flush=True)
    rows = []
    for experts, tokens, w, x, topk_w, topk_ids in routed_points(args.points):
        meta = routing_metadata(topk_ids, w.expert_map, experts, pick_block_m(tokens * 4, experts), topk_w)
        swiglu = (w.swiglu_alpha, w.swiglu_limit)
        act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu)
        calls = {"w13": lambda: moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu),
                 "w2": lambda: moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, gather=False,
                                          apply_row_weight=True, combine="atomic", n_out=2880)}
        for op, fn in calls.items():
            row = {"experts": experts, "tokens": tokens, "op": op}
            outs = {}
            for name, kernel in kernels.items():
                setattr(module, args.kernel, kernel)
                try:
                    outs[name] = fn().float()
                    row[name + "_ms"] = time_graph(fn)
                finally:
                    setattr(module, args.kernel, kernels["new"])
            for name in kernels:
                if name != "new":
                    diff = ((outs["new"] - outs[name]).norm() / outs[name].norm().clamp_min(1e-30)).item()
                    row[name + "_rel_diff"] = diff
                    row[name + "_agree"] = diff <= SWEEP_AGREEMENT
                    row["speedup_vs_" + name] = row[name + "_ms"] / row["new_ms"]
            record(row, rows, args.out / "probe_source_ab.json", header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
