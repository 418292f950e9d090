"""Probe (GPU): time a few block configs against the default one, same run, gpt-oss shapes
(H = I = 2880, top-4), for w13 + SwiGLU and w2 + atomic combine. A config counts only if its
output agrees with the default's (relative Frobenius difference < 1e-2, as in bench_moe's sweep).
Lighter than `bench_moe.py`'s full sweep when only a handful of configs is in question.

    python -m benchmarks.probes.probe_configs --points 128:1,128:8 \\
        --configs "16,64,256,1,4,3,triton;16,64,128,1,4,4,triton" --out DIR    # DIR/probe_configs.json

--rs-maxnreg N caps the registers per thread of the listed "rs" configs (ptxas maxnreg; the
default config runs uncapped), to trade spills for programs per SM.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from benchmarks.common import SWEEP_AGREEMENT, record, routed_points, start_probe, time_graph
from mxfp4_moe.kernels.moe_matmul import MatmulConfig, moe_matmul, pick_block_m
from mxfp4_moe.kernels.fragment_layout import to_fragment_order
from mxfp4_moe.routing import routing_metadata


def parse_config(text: str) -> MatmulConfig:
    f = text.split(",")
    prefetch = int(f[7]) if len(f) > 7 else 1
    split_k = int(f[8]) if len(f) > 8 else 1
    pipeline_mma = bool(int(f[9])) if len(f) > 9 else False
    width_step = int(f[10]) if len(f) > 10 else 0
    return MatmulConfig(int(f[0]), int(f[1]), int(f[2]), bool(int(f[3])), int(f[4]), int(f[5]), f[6], prefetch,
                        split_k, pipeline_mma, width_step)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="128:1,128:8,32:1,32:8", help="E:T,...")
    p.add_argument("--configs", required=True,
                   help="';'-separated block_m,block_n,block_k,swap_ab(0/1),num_warps,num_stages,kernel"
                        "[,prefetch[,split_k[,pipeline_mma(0/1)[,width_step]]]]; kernel 'rs' gets the weights in fragment "
                        "order; a config "
                        "with split_k > 1 runs for w2 only")
    p.add_argument("--rs-maxnreg", type=int, default=0,
                   help="registers per thread for the listed 'rs' configs (0: as the compiler picks)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args()
    capped = _register_cap(args.rs_maxnreg)
    configs = [parse_config(c) for c in args.configs.split(";") if c.strip()]
    header = start_probe(args.out)
    rows = []
    fragments = {}
    for experts, tokens, w, x, topk_w, topk_ids in routed_points(args.points):
        metas = {}

        def fragments_for(op):
            key = (experts, op)
            if key not in fragments:
                if fragments and next(iter(fragments))[0] != experts:
                    fragments.clear()
                blocks, scales = (w.w13_blocks, w.w13_scales) if op == "w13" else (w.w2_blocks, w.w2_scales)
                fragments[key] = to_fragment_order(blocks, scales)
            return fragments[key]

        def meta_for(block_m):
            if block_m not in metas:
                metas[block_m] = routing_metadata(topk_ids, w.expert_map, experts, block_m, topk_w)
            return metas[block_m]

        default_bm = pick_block_m(tokens * 4, experts)
        swiglu = (w.swiglu_alpha, w.swiglu_limit)
        act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta_for(default_bm), swiglu=swiglu)

        def launch(op, meta, config=None):
            fragments = None
            if config is not None and config.kernel == "rs":
                fragments = fragments_for(op)
            if op == "w13":
                return lambda: moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu,
                                          config=config, fragments=fragments)
            return lambda: moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, gather=False,
                                      apply_row_weight=True, combine="atomic", n_out=2880, config=config,
                                      fragments=fragments)

        for op in ("w13", "w2"):
            ref = launch(op, meta_for(default_bm))().float()
            row = {"experts": experts, "tokens": tokens, "op": op,
                   "default_ms": time_graph(launch(op, meta_for(default_bm)))}
            for cfg in configs:
                if op == "w13" and cfg.split_k > 1:
                    continue
                name = ",".join(str(v) for v in cfg.__dict__.values())
                try:
                    fn = capped(launch(op, meta_for(cfg.block_m), cfg))
                    out = fn().float()
                    diff = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    row[name] = time_graph(fn) if diff <= SWEEP_AGREEMENT else f"disagrees: {diff:.2e}"
                except Exception as exc:
                    row[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            if args.rs_maxnreg:
                row["rs_maxnreg"] = args.rs_maxnreg
            record(row, rows, args.out / "probe_configs.json", header)
    return 0


def _register_cap(maxnreg: int):
    """A wrapper for launch closures: while one runs, the "rs" kernel launches with ptxas'
    maxnreg = `maxnreg` (a Triton compile option passed at launch); identity for 0."""
    if not maxnreg:
        return lambda fn: fn
    rs_module = importlib.import_module("mxfp4_moe.kernels._moe_matmul_rs")
    uncapped = rs_module._moe_matmul_rs_kernel

    class Capped:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: uncapped[grid](*args, **kwargs, maxnreg=maxnreg)

    def wrap(fn):
        def run():
            rs_module._moe_matmul_rs_kernel = Capped()
            try:
                return fn()
            finally:
                rs_module._moe_matmul_rs_kernel = uncapped
        return run
    return wrap


if __name__ == "__main__":
    raise SystemExit(main())
