"""Expert parallelism, two schemes, on N ranks at T tokens per rank (a global batch of N x T):

  replicated  every rank gets all N x T tokens, runs its experts on them and one all-reduce of
              [N T, H] sums the partials (`distributed.DistributedMXFP4MoE`); a model whose
              attention is data-parallel must first all-gather its [T, H] tokens, timed beside it;
  dispatch    every rank keeps its own T tokens, sends each to the ranks holding its experts and
              gets the results back (`expert_dispatch.TokenShardedMXFP4MoE`: all-to-all).

Default: a gpt-oss-120b-like layer (E 128, H = I = 2880, top-4; one layer of a seeded synthetic
checkpoint written here), EP = N (TP 1), Triton backend, bf16, T = 1, 2, 4, ..., 8192.

    torchrun --nproc-per-node 8 -m benchmarks.bench_expert_dispatch --out $OUT   # 8 GPUs, NCCL
    python -m benchmarks.bench_expert_dispatch --nproc 4                         # spawns its own ranks
    python -m benchmarks.bench_expert_dispatch --device cpu --tiny --nproc 2 --tokens 1,8 --iters 2  # gloo smoke

Timing: per rank, CUDA events (perf_counter on a CPU) around each forward after warm-up, median
of --iters; a layer's time is the slowest rank's median (every rank waits in the collectives).
Eager only: the dispatch copies its counts to the host (the row exchange needs its sizes), so it
cannot be captured in a CUDA graph. Bytes: what one rank puts on the wire per forward: the ring
all-reduce's 2 (N-1)/N x N T H values, the all-gather's (N-1) T H, and for the dispatch the rows
it sent to other ranks (H values + k ids + k weights each) plus the rows it returned (H values
each), the largest over ranks (`DispatchCounts.bytes_moved`). Prints a markdown table and the
crossover (the smallest T from which the dispatch is faster); writes JSON to --out (default $OUT).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 is forced). Exit status 1 when the dispatched
output, on the replicated layer's routing, leaves the tolerance against the replicated layer's.
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

from benchmarks.bench_distributed import TOLERANCE
from benchmarks.common import layer_run_header, run_ranks, start_rank, tokens_and_iters, write_synthetic_layer
from mxfp4_moe import distributed as D
from mxfp4_moe.checkpoint import open_checkpoint
from mxfp4_moe.verify.checks import median_ms, rel_err
from mxfp4_moe.expert_dispatch import EXCHANGES, TokenShardedMXFP4MoE

FULL = dict(num_layers=1, num_experts=128, hidden=2880, intermediate=2880, top_k=4, seed=0)
TINY = dict(num_layers=1, num_experts=8, hidden=288, intermediate=288, top_k=4, seed=0)
FULL_TOKENS = tuple(2 ** i for i in range(14))            # 1 .. 8192 per rank
TINY_TOKENS = (1, 4, 16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) to spawn when not under torchrun")
    p.add_argument("--tp", type=int, default=1, help="TP size within each EP rank (EP = world / tp)")
    p.add_argument("--tiny", action="store_true", help=f"tiny layer {TINY} instead of gpt-oss-120b-like {FULL}")
    p.add_argument("--experts", type=int, default=None, help="experts of the synthetic layer (32: gpt-oss-20b-like)")
    p.add_argument("--tokens", default=None, help="comma-separated tokens per rank (default: "
                   f"{','.join(map(str, FULL_TOKENS))}; tiny: {','.join(map(str, TINY_TOKENS))})")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint folder instead of writing a synthetic one")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--align", default="triton", help="ShardPlan alignment preset (default triton)")
    p.add_argument("--exchange", choices=EXCHANGES, default="all-to-all")
    p.add_argument("--iters", type=int, default=None, help="timed forwards per case (default 20 GPU, 3 CPU)")
    p.add_argument("--out", default=None, help="folder for bench_expert_dispatch.json (default: $OUT if set)")
    return p.parse_args(argv)


def ring_allreduce_bytes(world: int, values: int, itemsize: int) -> int:
    """Bytes one rank sends in a ring all-reduce of `values` elements: 2 (N-1)/N of them."""
    return 2 * (world - 1) * values * itemsize // world


def rank_main(args: argparse.Namespace, ckpt_path: str | None) -> int:
    me = start_rank("bench_expert_dispatch", args, ckpt_path, write_checkpoint)
    device, pg, rank, world, ckpt_path, dtype = me.device, me.pg, me.rank, me.world, me.checkpoint, me.dtype
    tokens_list, iters = tokens_and_iters(args, device, FULL_TOKENS, TINY_TOKENS, iters_gpu_cpu=(20, 3))
    tol = TOLERANCE[dtype]
    tp = args.tp
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide the world size {world}")
    ep = world // tp
    rows, failed, cfg = [], False, None
    try:
        with open_checkpoint(ckpt_path) as ckpt:
            cfg = ckpt.config
            groups = D.MoEGroups.from_world(tp, ep)
            replicated = D.DistributedMXFP4MoE.from_checkpoint(ckpt, 0, groups=groups, align=args.align,
                                                               device=device, backend=args.backend,
                                                               compute_dtype=dtype)
            sharded = TokenShardedMXFP4MoE.from_replicated(replicated, exchange=args.exchange)
            hidden, itemsize = cfg.hidden_size, torch.empty(0, dtype=dtype).element_size()
            for tokens in tokens_list:
                g = torch.Generator(device="cpu").manual_seed(2000 + tokens)
                x_all = torch.randn(world * tokens, hidden, generator=g).to(device=device, dtype=dtype)
                mine_rows = slice(rank * tokens, (rank + 1) * tokens)
                x_mine = x_all[mine_rows].contiguous()
                # Checked on one routing: the router GEMM at N T rows and at T rows may order its
                # float32 sums apart, and in bf16 a near-tie then picks another expert in each
                # scheme (legitimate; not what this check is for).
                topk_weights, topk_ids = sharded.route(x_all)
                y_rep = replicated.reduce(replicated.local.experts(x_all, topk_weights, topk_ids))
                y = sharded.experts(x_mine, topk_weights[mine_rows], topk_ids[mine_rows])
                err = rel_err(y, y_rep[mine_rows])
                moved = sharded.last_counts.bytes_moved(hidden, itemsize, y.element_size(), cfg.experts_per_token)
                gathered = torch.empty_like(x_all)
                partial = replicated.partial(x_all).contiguous()
                dist.barrier()
                t_rep = median_ms(lambda: replicated(x_all), device, iters)
                t_reduce = median_ms(lambda: replicated.reduce(partial), device, iters)
                t_gather = median_ms(lambda: dist.all_gather_into_tensor(gathered, x_mine), device, iters)
                t_dispatch = median_ms(lambda: sharded(x_mine), device, iters)
                mine = {"rank": rank, "replicated_ms": t_rep, "allreduce_ms": t_reduce, "allgather_ms": t_gather,
                        "dispatch_ms": t_dispatch, "rel_err": err, "dispatch_bytes": moved,
                        "send_rows": list(sharded.last_counts.send_rows),
                        "recv_rows": list(sharded.last_counts.recv_rows)}
                infos = D.gather_objects(mine, device)
                if rank == 0:
                    worst = max(i["rel_err"] for i in infos)
                    ok = worst <= tol
                    failed |= not ok
                    rows.append({"world": world, "tp": tp, "ep": ep, "tokens_per_rank": tokens,
                                 "replicated_ms": max(i["replicated_ms"] for i in infos),
                                 "allreduce_ms": max(i["allreduce_ms"] for i in infos),
                                 "allgather_ms": max(i["allgather_ms"] for i in infos),
                                 "dispatch_ms": max(i["dispatch_ms"] for i in infos),
                                 "replicated_bytes": ring_allreduce_bytes(world, world * tokens * hidden, itemsize),
                                 "allgather_bytes": (world - 1) * tokens * hidden * itemsize,
                                 "dispatch_bytes": max(i["dispatch_bytes"]["total"] for i in infos),
                                 "rel_err": worst, "tolerance": tol, "passed": ok, "ranks": infos})
    finally:
        code = me.finish(failed, None if cfg is None else
                         lambda: report(args, rows, device, pg, world, dtype, ckpt_path, cfg))
    return code


def crossover(rows: list[dict], key: str) -> int | None:
    """The smallest T per rank from which the dispatch is faster than `key` at every larger T
    measured (None: never)."""
    best = None
    for r in sorted(rows, key=lambda r: r["tokens_per_rank"], reverse=True):
        if r["dispatch_ms"] < r[key]:
            best = r["tokens_per_rank"]
        else:
            break
    return best


def report(args, rows, device, pg, world, dtype, ckpt_path, cfg) -> None:
    header = layer_run_header(args, device, pg, world, dtype, ckpt_path, cfg, exchange=args.exchange)
    print(f"# bench_expert_dispatch: {header['device']}, {pg}, torch {torch.__version__}, triton {header['triton']}, "
          f"commit {header['commit']}")
    print(f"layer: E {cfg.num_experts}, H {cfg.hidden_size}, I {cfg.intermediate_size}, top-{cfg.experts_per_token}; "
          f"{header['dtype']}, backend {args.backend}, align {args.align}, exchange {args.exchange}; "
          f"TP {args.tp} x EP {world // args.tp}; median ms of the slowest rank, eager; MB sent per rank\n")
    print("| T/rank | replicated | all-reduce | all-gather | dispatch | dispatch speedup | speedup vs all-gather + "
          "replicated | MB replicated | MB all-gather | MB dispatch | rel err | ok |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['tokens_per_rank']} | {r['replicated_ms']:.3f} | {r['allreduce_ms']:.3f} | "
              f"{r['allgather_ms']:.3f} | {r['dispatch_ms']:.3f} | {r['replicated_ms'] / r['dispatch_ms']:.2f}x | "
              f"{(r['replicated_ms'] + r['allgather_ms']) / r['dispatch_ms']:.2f}x | "
              f"{r['replicated_bytes'] / 1e6:.3f} | {r['allgather_bytes'] / 1e6:.3f} | "
              f"{r['dispatch_bytes'] / 1e6:.3f} | {r['rel_err']:.2e} | "
              f"{'yes' if r['passed'] else 'NO'} |")
    for r in rows:
        r["replicated_plus_allgather_ms"] = r["replicated_ms"] + r["allgather_ms"]
        # What the collectives alone achieved (bytes sent per rank / their time): the wire's
        # rate at this size, beside which the dispatch's bytes say what its exchange must cost.
        r["allreduce_GBps"] = r["replicated_bytes"] / r["allreduce_ms"] / 1e6
        r["allgather_GBps"] = r["allgather_bytes"] / r["allgather_ms"] / 1e6
    cross = {"vs_replicated": crossover(rows, "replicated_ms"),
             "vs_allgather_plus_replicated": crossover(rows, "replicated_plus_allgather_ms")}
    print(f"\ncrossover (dispatch faster from this T per rank on): vs replicated {cross['vs_replicated']}, "
          f"vs all-gather + replicated {cross['vs_allgather_plus_replicated']}")
    out = args.out or os.environ.get("OUT")
    if out:
        path = Path(out) / f"bench_expert_dispatch_n{world}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"header": header, "rows": rows, "crossover": cross}, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")


def write_checkpoint(args: argparse.Namespace, folder: Path) -> str:
    spec = dict(TINY if args.tiny else FULL)
    if args.experts:
        spec["num_experts"] = args.experts
    return write_synthetic_layer(spec, folder)


def main(argv=None) -> int:
    return run_ranks("bench_expert_dispatch", rank_main, parse_args(argv), write_checkpoint)


if __name__ == "__main__":
    raise SystemExit(main())
