"""Probe (GPU): the router's fused bias + top-k + softmax (`kernels.router_topk`, what `route`
runs on CUDA) against torch.topk + torch.softmax on the same logits, and the whole layer, same
run, gpt-oss shapes (H = I = 2880, top-4; CUDA-graph replay, L2 flushed). At up to 16 tokens also
the one-launch router (`router_gemv_topk`: the GEMM, bias, top-k and softmax in one launch)
against the cuBLAS GEMM followed by the fused top-k, with the share of tokens routed alike.

    python -m benchmarks.probes.probe_router_topk --out DIR        # writes DIR/probe_router_topk.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import gpt_oss_weights, record, start_probe, time_graph
from mxfp4_moe.kernels.router_topk import ROUTER_GEMV_MAX_TOKENS, router_gemv_topk, router_topk
from mxfp4_moe.moe import MXFP4MoE


def probe_experts(experts: int, token_counts: list[int], rows: list[dict], path: Path, header: dict) -> None:
    """The rows of one expert count (its weights are freed on return)."""
    w = gpt_oss_weights(experts)
    layer = MXFP4MoE(w, backend="triton")
    router_bf16 = w.router_weight.bfloat16()
    bias = w.router_bias
    for tokens in token_counts:
        x = torch.randn(tokens, 2880, generator=torch.Generator(device="cuda").manual_seed(tokens),
                        device="cuda").to(torch.bfloat16)
        logits = torch.mm(x, router_bf16.T, out_dtype=torch.float32)

        def torch_path():
            top, ids = torch.topk(logits + bias, 4, dim=-1)
            return torch.softmax(top, dim=-1), ids

        fused, plain = router_topk(logits, bias, 4), torch_path()
        row = {"experts": experts, "tokens": tokens,
               "fused_ms": time_graph(lambda: router_topk(logits, bias, 4)),
               "torch_ms": time_graph(torch_path),
               "same_ids": float((fused[1] == plain[1]).all(-1).float().mean()),
               "max_weight_diff": float((fused[0] - plain[0]).abs().max()),
               "layer_ms": time_graph(lambda: layer(x))}
        if tokens <= ROUTER_GEMV_MAX_TOKENS:
            def gemm_then_topk():
                return router_topk(torch.mm(x, router_bf16.T, out_dtype=torch.float32), bias, 4)
            one_launch = router_gemv_topk(x, router_bf16, bias, 4)
            row.update({"one_launch_ms": time_graph(lambda: router_gemv_topk(x, router_bf16, bias, 4)),
                        "gemm_then_fused_ms": time_graph(gemm_then_topk),
                        "one_launch_same_ids": float((one_launch[1] == fused[1]).all(-1).float().mean())})
        record(row, rows, path, header)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="128,32")
    p.add_argument("--tokens", default="8192,2048,512,16,8,1")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args()
    header = start_probe(args.out)
    rows: list[dict] = []
    for experts in map(int, args.experts.split(",")):
        probe_experts(experts, [int(t) for t in args.tokens.split(",")], rows, args.out / "probe_router_topk.json",
                      header)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
