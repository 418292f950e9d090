"""Distributed MoE layer (`DistributedMXFP4MoE`): correctness against the single-GPU layer and the
time of the distributed forward (shard compute + all-reduce) at TP and EP over N processes.

Default: gpt-oss-20b-like layer (E 32, H = I = 2880, top-4; one layer of a seeded synthetic
checkpoint written here), TP N and EP N on N = 2 GPUs with NCCL, Triton backend, bf16.

    python -m benchmarks.bench_distributed                      # 2 GPUs; spawns its own ranks
    torchrun --nproc-per-node 2 -m benchmarks.bench_distributed # the same under torchrun
    python -m benchmarks.bench_distributed --device cpu --tiny  # CPU, gloo, tiny shapes (a check)

Timing: per rank, CUDA events around each forward after warm-up, median of --iters; the layer's
time is the slowest rank's median (every rank waits in the all-reduce). Beside it: the rank's
shard compute alone and the all-reduce alone on a [T, H] tensor, and the single-GPU layer on
rank 0. Prints a markdown table; writes JSON to --out (default $OUT if set). NVLink multicast
stays off (NCCL_NVLS_ENABLE=0 is forced). Exit status 1 when an output is out of tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Before torch / NCCL start: never enable NVLink multicast on the lent machines.
if os.environ.get("NCCL_NVLS_ENABLE") != "0":
    os.environ["NCCL_NVLS_ENABLE"] = "0"

import torch
import torch.distributed as dist

from benchmarks.common import layer_run_header, run_ranks, start_rank, tokens_and_iters, write_synthetic_layer
from mxfp4_moe import distributed as D
from mxfp4_moe.checkpoint import open_checkpoint
from mxfp4_moe.verify.checks import median_ms, rel_err
from mxfp4_moe.loader import load_layer
from mxfp4_moe.moe import MXFP4MoE
from mxfp4_moe.sharding import ShardPlan

FULL = dict(num_layers=1, num_experts=32, hidden=2880, intermediate=2880, top_k=4, seed=0)
# Tiny: I = 9 blocks, so TP 2 gives 5 + 4 blocks (160, 128 -> 192 with the Triton alignment).
TINY = dict(num_layers=1, num_experts=8, hidden=288, intermediate=288, top_k=4, seed=0)
FULL_TOKENS = (1, 32, 256, 1024, 4096)
TINY_TOKENS = (1, 16, 64)
# Relative Frobenius error of the distributed output against the single-device one: bf16 (the
# ranks' partials are rounded to bf16 before the sum) as verify's bf16 kernel bound; float32 as
# verify's float32 bound.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) to spawn when not under torchrun")
    p.add_argument("--tiny", action="store_true", help=f"tiny layer {TINY} instead of gpt-oss-20b-like {FULL}")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default: "
                   f"{','.join(map(str, FULL_TOKENS))}; tiny: {','.join(map(str, TINY_TOKENS))})")
    p.add_argument("--layouts", default="tp,ep", help="comma-separated: tp (TP = nproc), ep (EP = nproc), "
                   "or TPxEP such as 2x2")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint folder instead of writing a synthetic one")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--align", default="triton", help="ShardPlan alignment preset (default triton)")
    p.add_argument("--iters", type=int, default=None, help="timed forwards per case (default 50 GPU, 5 CPU)")
    p.add_argument("--out", default=None, help="folder for bench_distributed.json (default: $OUT if set)")
    return p.parse_args(argv)


def layouts(spec: str, world: int) -> list[tuple[str, int, int]]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item == "tp":
            out.append((f"TP {world}", world, 1))
        elif item == "ep":
            out.append((f"EP {world}", 1, world))
        else:
            tp, ep = (int(v) for v in item.lower().split("x"))
            out.append((f"TP {tp} x EP {ep}", tp, ep))
    for name, tp, ep in out:
        if tp * ep != world:
            raise SystemExit(f"layout {name} needs {tp * ep} ranks, the world has {world}")
    return out


# ---- timing ---------------------------------------------------------------------------------

def capture_graph(fn, device: torch.device):
    """fn captured in a CUDA graph (after a warm-up on a side stream), or None when capture fails.
    NCCL collectives inside fn are captured too; every rank must call this in the same order."""
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize(device)
        return graph
    except Exception as exc:                              # reported as NaN in the table
        print(f"graph capture failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None


# ---- one rank -------------------------------------------------------------------------------

def rank_main(args: argparse.Namespace, ckpt_path: str | None) -> int:
    me = start_rank("bench_distributed", args, ckpt_path, write_checkpoint)
    device, pg, rank, world, ckpt_path, dtype = me.device, me.pg, me.rank, me.world, me.checkpoint, me.dtype
    tokens_list, iters = tokens_and_iters(args, device, FULL_TOKENS, TINY_TOKENS, iters_gpu_cpu=(50, 5))
    tol = TOLERANCE[dtype]
    rows, failed, cfg = [], False, None
    try:
        with open_checkpoint(ckpt_path) as ckpt:
            cfg = ckpt.config
            single = None
            if rank == 0:
                plan = ShardPlan.create(num_experts=cfg.num_experts, hidden=cfg.hidden_size,
                                        inter=cfg.intermediate_size, align=args.align)
                single = MXFP4MoE(load_layer(ckpt, 0, plan, device=device), backend=args.backend, compute_dtype=dtype)
            for name, tp, ep in layouts(args.layouts, world):
                D.reset_peak_memory(device)
                layer = D.DistributedMXFP4MoE.from_checkpoint(
                    ckpt, 0, groups=D.MoEGroups.from_world(tp, ep), align=args.align, device=device,
                    backend=args.backend, compute_dtype=dtype)
                for tokens in tokens_list:
                    g = torch.Generator(device="cpu").manual_seed(1000 + tokens)
                    x = torch.randn(tokens, cfg.hidden_size, generator=g).to(device=device, dtype=dtype)
                    y = layer(x)
                    # The all-reduce alone, in place on one [T, H] buffer (its values grow with each
                    # repeat; the time does not depend on them).
                    buf = layer.partial(x).contiguous()
                    t_dist = median_ms(lambda: layer(x), device, iters)
                    t_compute = median_ms(lambda: layer.partial(x), device, iters)
                    t_reduce = median_ms(lambda: layer.reduce(buf), device, iters)
                    # The same forward replayed from a CUDA graph (launch overhead removed): every rank
                    # captures, and replays only if every rank's capture worked (a lone replay of a
                    # captured all-reduce would wait for its peers forever).
                    t_graph = float("nan")
                    if device.type == "cuda":
                        graph = capture_graph(lambda: layer(x), device)
                        if D.all_ok(graph is not None, device):
                            t_graph = median_ms(graph.replay, device, iters)
                        del graph
                    peak, peak_kind = D.peak_memory(device)
                    mine = {"rank": rank, "ms": t_dist, "graph_ms": t_graph, "compute_ms": t_compute,
                            "allreduce_ms": t_reduce,
                            "peak_mem_bytes": peak, "peak_mem_kind": peak_kind,
                            "bytes_read": layer.load_stats.bytes_read, "load_s": layer.load_stats.load_s}
                    if rank == 0:
                        ref = single(x)
                        mine["single_ms"] = median_ms(lambda: single(x), device, iters)
                        single_graph = capture_graph(lambda: single(x), device) if device.type == "cuda" else None
                        mine["single_graph_ms"] = (median_ms(single_graph.replay, device, iters)
                                                   if single_graph is not None else float("nan"))
                        mine["rel_err"] = rel_err(y, ref)
                    # Every rank's output must be rank 0's (one all-reduce hands all the same sum).
                    y0 = y.clone().contiguous()
                    dist.broadcast(y0, 0)
                    mine["max_diff_vs_rank0"] = (y.float() - y0.float()).abs().max().item() if y.numel() else 0.0
                    infos = D.gather_objects(mine, device)
                    if rank == 0:
                        err = infos[0]["rel_err"]
                        ok = err <= tol and all(i["max_diff_vs_rank0"] == 0 for i in infos)
                        failed |= not ok
                        rows.append({"layout": name, "tp": tp, "ep": ep, "tokens": tokens,
                                     "single_ms": infos[0]["single_ms"],
                                     "dist_ms": max(i["ms"] for i in infos),
                                     "single_graph_ms": infos[0]["single_graph_ms"],
                                     "dist_graph_ms": max(i["graph_ms"] for i in infos),
                                     "compute_ms": max(i["compute_ms"] for i in infos),
                                     "allreduce_ms": max(i["allreduce_ms"] for i in infos),
                                     "rel_err": err, "tolerance": tol, "passed": ok, "ranks": infos})
                del layer
    finally:
        code = me.finish(failed, None if cfg is None else
                         lambda: report(args, rows, device, pg, world, dtype, ckpt_path, cfg))
    return code


def report(args, rows, device, pg, world, dtype, ckpt_path, cfg) -> None:
    header = layer_run_header(args, device, pg, world, dtype, ckpt_path, cfg)
    print(f"# bench_distributed: {header['device']}, {pg}, torch {torch.__version__}, triton {header['triton']}, "
          f"commit {header['commit']}")
    print(f"layer: E {cfg.num_experts}, H {cfg.hidden_size}, I {cfg.intermediate_size}, top-{cfg.experts_per_token}; "
          f"{header['dtype']}, backend {args.backend}, align {args.align}; median ms, slowest rank; eager "
          "(CUDA events around each call, launch overhead included) and CUDA-graph replay\n")
    print("| layout | tokens | single | distributed | speedup | single (graph) | distributed (graph) | speedup (graph) "
          "| shard compute | all-reduce | rel err vs single | ok |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['tokens']} | {r['single_ms']:.3f} | {r['dist_ms']:.3f} | "
              f"{r['single_ms'] / r['dist_ms']:.2f}x | {r['single_graph_ms']:.3f} | {r['dist_graph_ms']:.3f} | "
              f"{r['single_graph_ms'] / r['dist_graph_ms']:.2f}x | {r['compute_ms']:.3f} | "
              f"{r['allreduce_ms']:.3f} | {r['rel_err']:.2e} | {'yes' if r['passed'] else 'NO'} |")
    print()
    seen = set()
    for r in rows:
        if r["layout"] in seen:
            continue
        seen.add(r["layout"])
        for i in r["ranks"]:
            print(f"{r['layout']} rank {i['rank']}: read {i['bytes_read'] / 1e6:.1f} MB in {i['load_s']:.2f} s, "
                  f"peak {i['peak_mem_kind']} {i['peak_mem_bytes'] / 2**20:.0f} MiB")
    out = args.out or os.environ.get("OUT")
    if out:
        path = Path(out) / "bench_distributed.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"header": header, "rows": rows}, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")


def write_checkpoint(args: argparse.Namespace, folder: Path) -> str:
    return write_synthetic_layer(TINY if args.tiny else FULL, folder)


def main(argv=None) -> int:
    return run_ranks("bench_distributed", rank_main, parse_args(argv), write_checkpoint)


if __name__ == "__main__":
    raise SystemExit(main())
