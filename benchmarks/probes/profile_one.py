"""Launch one grouped-matmul configuration a few times at E = 32, T = 8192 (gpt-oss-20b shapes),
for a profiler such as Nsight Compute to pick up (`ncu -k regex:moe_matmul ... python -m
benchmarks.probes.profile_one --config 128,128,64,1,8,4,rs,3 --op w13`). Configs as in
`probe_configs.py`; an "rs" config gets the weights in fragment order."""

from __future__ import annotations

import argparse

import torch

from benchmarks.probes.probe_configs import parse_config
from mxfp4_moe.kernels.moe_matmul import moe_matmul
from mxfp4_moe.kernels.fragment_layout import to_fragment_order
from mxfp4_moe.synthetic import random_expert_weights
from mxfp4_moe.routing import route, routing_metadata


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True,
                   help="block_m,block_n,block_k,swap_ab(0/1),num_warps,num_stages,kernel[,prefetch[,split_k]]")
    p.add_argument("--op", choices=("w13", "w2"), default="w13")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    cfg = parse_config(args.config)
    w, _ = random_expert_weights(args.experts, 2880, 2880, top_k=4, seed=args.experts, device="cuda", dense=False)
    x = torch.randn(args.tokens, 2880, device="cuda").to(torch.bfloat16)
    topk_w, topk_ids = route(x, w.router_weight, w.router_bias, 4)
    meta = routing_metadata(topk_ids, w.expert_map, args.experts, cfg.block_m, topk_w)
    swiglu = (w.swiglu_alpha, w.swiglu_limit)
    act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu)
    fragments = None
    if cfg.kernel == "rs":
        blocks, scales = (w.w13_blocks, w.w13_scales) if args.op == "w13" else (w.w2_blocks, w.w2_scales)
        fragments = to_fragment_order(blocks, scales)
    for _ in range(args.repeat):
        if args.op == "w13":
            moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu, config=cfg,
                       fragments=fragments)
        else:
            moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, gather=False, apply_row_weight=True,
                       combine="atomic", n_out=2880, config=cfg, fragments=fragments)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
