"""The whole gpt-oss model under torchrun (issue 31 item 1): `load_model(path, plan=...)` on every
rank, each MoE block all-reducing its partial output (`DistributedMXFP4MoE`, tokens replicated),
against the same model on one device.

    torchrun --nproc-per-node 2 -m benchmarks.bench_model_torchrun --tp 2 --out $OUT          # NCCL
    torchrun --nproc-per-node 2 -m benchmarks.bench_model_torchrun --ep 2 --out $OUT
    torchrun --nproc-per-node 4 -m benchmarks.bench_model_torchrun --tp 2 --ep 2 --out $OUT
    python -m benchmarks.bench_model_torchrun --tiny --device cpu --nproc 2 --tp 2             # gloo smoke

Model: --model 20b or 120b (bench_model's gpt-oss-shaped random models; --layers N keeps the first
N layers, 120b default 12 as bench_model, for the disk), or --checkpoint DIR; --tiny: bench_model's
CPU-sized model. Rank 0 writes the checkpoint when none is given (into --workdir to keep it for
the next layout's run).

Rank 0 first runs the single-device model alone (the others wait), then frees it; then every
rank loads its shard of every layer and runs the same. Compared: the logits of seeded prompts
(relative Frobenius error; in float32 it must be within model_check's FLOAT32_TOLERANCE, in bf16
it is reported, not judged: each TP/EP rank's partials are rounded to bf16 before the sum), the
greedy ids (equal, or the first step that differs and the single model's logit gap there, top
token against ours: a near-tie when small). Per rank: bytes read from the checkpoint (against the
plan's slices), load time, peak memory (CUDA max allocated; peak RSS on a CPU). Per --batches
size: the decode step's median (bench_model.time_decode; the slowest rank). Prints a summary and
writes JSON to --out (default $OUT). Exit status 1 when a float32 run is out of tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("NCCL_NVLS_ENABLE") != "0":
    os.environ["NCCL_NVLS_ENABLE"] = "0"

import torch
import torch.distributed as dist

from benchmarks.bench_model import SHAPES, TINY_SHAPES, reset_peak, time_decode, write_random_checkpoint
from benchmarks.common import git_commit, spawn_ranks
from mxfp4_moe import distributed as D
from mxfp4_moe.checkpoint import open_checkpoint
from mxfp4_moe.integrations.transformers import load_model, shard_plan
from mxfp4_moe.verify.model_check import FLOAT32_TOLERANCE

PROMPTS, PROMPT_LEN, GREEDY_TOKENS = 4, 16, 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) to spawn when not under torchrun")
    p.add_argument("--tp", type=int, default=None, help="TP size (default: world / ep)")
    p.add_argument("--ep", type=int, default=None, help="EP size (default: world / tp, or 1)")
    p.add_argument("--model", choices=sorted(SHAPES), default="20b")
    p.add_argument("--layers", type=int, default=None, help="layers written (default: 20b all 24, 120b 12)")
    p.add_argument("--tiny", action="store_true", help="bench_model's CPU-sized model, torch backend")
    p.add_argument("--checkpoint", default=None, help="a full-model checkpoint folder instead of a random one")
    p.add_argument("--workdir", default=None, help="keep the random checkpoint in DIR/<model>_<layers>l, written "
                   "once and reused by later runs (default: a temporary folder, removed at the end)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="MXFP4MoE backend (default auto; --tiny: torch)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--align", default="triton", help="ShardPlan alignment preset")
    p.add_argument("--batches", default="1,8,64", help="decode batch sizes (comma-separated; empty: none)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before the timed decode steps")
    p.add_argument("--decode-steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for bench_model_torchrun_<layout>.json (default: $OUT)")
    return p.parse_args(argv)


def layout(args, world: int) -> tuple[int, int]:
    tp, ep = args.tp, args.ep
    if tp is None and ep is None:
        tp, ep = world, 1
    elif tp is None:
        tp = world // ep
    elif ep is None:
        ep = world // tp
    D.check_world(world, tp, ep)
    return tp, ep


@torch.no_grad()
def run_model(model, args, device: torch.device) -> dict:
    """Logits of the seeded prompts, greedy ids, decode step per batch (on every rank alike)."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (PROMPTS, PROMPT_LEN), generator=torch.Generator().manual_seed(args.seed)).to(device)
    logits = model(ids).logits.float().cpu()
    greedy = model.generate(ids[:1], max_new_tokens=GREEDY_TOKENS, do_sample=False)[0, PROMPT_LEN:].cpu()
    # The single model's logits along the greedy path, to judge a disagreement's gap.
    path_logits = model(torch.cat([ids[:1], greedy[None].to(device)], 1)).logits[0, PROMPT_LEN - 1:-1].float().cpu()
    decode = [time_decode(model, b, args, device) for b in args.batch_list]
    return {"logits": logits, "greedy": greedy, "path_logits": path_logits, "decode": decode}


def rank_main(args, ckpt_path: str | None) -> int:
    env = D.torchrun_env()
    device = D.rank_device(env.local_rank, args.device)
    pg = D.init_process_group(device, timeout_s=3600)
    rank, world = dist.get_rank(), dist.get_world_size()
    obj_device = device if device.type == "cuda" else None
    tp, ep = layout(args, world)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = args.backend or ("torch" if args.tiny else "auto")
    tmp, failed = None, False
    try:
        if ckpt_path is None:
            if rank == 0:
                if args.workdir is None:
                    tmp = tempfile.TemporaryDirectory(prefix="bench_model_torchrun_")
                ckpt_path = write_checkpoint(args, Path(args.workdir or tmp.name), device)
            ckpt_path = D.broadcast_object(ckpt_path, device=obj_device)
        single = None
        if rank == 0:                        # alone on the device, then freed
            model = load_model(ckpt_path, device=device, dtype=dtype, backend=backend, progress=False)
            single = run_model(model, args, device)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()
        with open_checkpoint(ckpt_path) as ckpt:
            plan = shard_plan(ckpt, tp_size=tp, tp_rank=rank % tp, ep_size=ep, ep_rank=rank // tp, align=args.align)
            planned = sum(D.planned_read_bytes(plan, ckpt.layer(n)) for n in range(ckpt.config.num_layers))
        reset_peak(device)
        start = time.perf_counter()
        model = load_model(ckpt_path, device=device, dtype=dtype, backend=backend, plan=plan, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        load_s = time.perf_counter() - start
        bytes_read = sum(layer.mlp.moe.weights.bytes_read for layer in model.model.layers)
        mine = run_model(model, args, device)
        peak_bytes, peak_kind = D.peak_memory(device)
        info = {"rank": rank, "tp_rank": plan.tp_rank, "ep_rank": plan.ep_rank, "bytes_read": bytes_read,
                "planned_bytes": planned, "load_s": load_s, "peak_mem_bytes": peak_bytes, "peak_mem_kind": peak_kind,
                "decode": mine["decode"], "logits": mine["logits"], "greedy": mine["greedy"]}
        infos = D.gather_objects(info, device)
        if rank == 0:
            failed = not report(args, infos, single, tp, ep, world, pg, dtype, backend, ckpt_path, device)
    finally:
        code = D.broadcast_object(1 if failed else 0, device=obj_device)
        dist.barrier()
        dist.destroy_process_group()
        if tmp is not None:
            tmp.cleanup()
    return code


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def report(args, infos, single, tp, ep, world, pg, dtype, backend, ckpt_path, device) -> bool:
    name = f"tp{tp}_ep{ep}"
    err = max(rel(i["logits"], single["logits"]) for i in infos)
    same_on_ranks = all(torch.equal(i["logits"], infos[0]["logits"]) for i in infos)
    greedy = infos[0]["greedy"]
    diverged = (greedy != single["greedy"]).nonzero()
    first = int(diverged[0]) if diverged.numel() else None
    gap = None
    if first is not None:            # the single model's top logit against the token ours chose
        row = single["path_logits"][first]
        gap = (row.max() - row[greedy[first]]).item()
    bound = FLOAT32_TOLERANCE if dtype == torch.float32 else None
    ok = (bound is None or err <= bound) and all(i["bytes_read"] == i["planned_bytes"] for i in infos)
    device_name = (f"{world} x {torch.cuda.get_device_properties(device).name}" if device.type == "cuda"
                   else f"cpu, {world} ranks")
    print(f"# bench_model_torchrun: {device_name}, {pg}, torch {torch.__version__}, commit {git_commit()}")
    print(f"layout TP {tp} x EP {ep}; {str(dtype).removeprefix('torch.')}, backend {backend}, align {args.align}; "
          f"checkpoint {ckpt_path}")
    print(f"logits vs single device: rel err {err:.2e}" + (f" (bound {bound:.0e})" if bound else " (bf16: reported)")
          + f"; identical on every rank: {same_on_ranks}")
    print(f"greedy {GREEDY_TOKENS} tokens: " + ("equal" if first is None else
                                                f"differ from step {first}, single model's logit gap there {gap:.3g}"))
    for i in infos:
        print(f"rank {i['rank']} (tp {i['tp_rank']}, ep {i['ep_rank']}): read {i['bytes_read'] / 1e6:.3f} MB "
              f"(plan {i['planned_bytes'] / 1e6:.3f}) in {i['load_s']:.1f} s, peak {i['peak_mem_kind']} "
              f"{i['peak_mem_bytes'] / 2**20:.0f} MiB")
    print("\n| batch | single ms/step | distributed ms/step (slowest rank) | speedup |\n|---:|---:|---:|---:|")
    decode = []
    for n, s in enumerate(single["decode"]):
        dist_ms = max(i["decode"][n]["median_ms"] for i in infos)
        decode.append({"batch": s["batch"], "single_ms": s["median_ms"], "distributed_ms": dist_ms})
        print(f"| {s['batch']} | {s['median_ms']:.2f} | {dist_ms:.2f} | {s['median_ms'] / dist_ms:.2f}x |")
    print("ok" if ok else "FAIL")
    out = args.out or os.environ.get("OUT")
    if out:
        path = Path(out) / f"bench_model_torchrun_{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        ranks = [{k: v for k, v in i.items() if k not in ("logits", "greedy")} for i in infos]
        path.write_text(json.dumps({
            "header": {"device": device_name, "process_group": pg, "torch": torch.__version__, "commit": git_commit(),
                       "dtype": str(dtype).removeprefix("torch."), "backend": backend, "align": args.align,
                       "tp": tp, "ep": ep, "checkpoint": ckpt_path},
            "logits_rel_err": err, "bound": bound, "identical_on_ranks": same_on_ranks,
            "greedy_equal": first is None, "greedy_first_diff": first, "greedy_gap": gap,
            "decode": decode, "ranks": ranks, "passed": ok}, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return ok


def write_checkpoint(args, folder: Path, device: torch.device) -> str:
    shapes = TINY_SHAPES if args.tiny else SHAPES
    shape = shapes[args.model]
    layers = args.layers or (shape.layers_full if args.model == "20b" or args.tiny else 12)
    path = folder / f"{'tiny_' if args.tiny else ''}{args.model}_{layers}l"
    if (path / "config.json").exists():     # an earlier run wrote it (write_checkpoint writes config.json last)
        print(f"reusing {path}", file=sys.stderr)
        return str(path)
    info = write_random_checkpoint(path, shape, layers, device, args.seed)
    print(f"wrote {shape.label(layers)}: {info['bytes'] / 1e9:.2f} GB in {info['write_s']:.0f} s", file=sys.stderr)
    return info["path"]


def main(argv=None) -> int:
    args = parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if D.torchrun_env() is not None:
        return rank_main(args, args.checkpoint)
    return spawn_ranks("bench_model_torchrun", rank_main, args, args.checkpoint)   # rank 0 writes one if none


if __name__ == "__main__":
    raise SystemExit(main())
