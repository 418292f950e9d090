"""What the benchmarks and probes share: the commit a result records, the GPU timing of a call
(CUDA-graph replay with L2 flushed, or eager), the probes' header, rows, gpt-oss-shaped weights and
routed inputs, and the start of the multi-process runners' ranks (torchrun or spawned). Scripts
import it as `benchmarks.common` (they run as `python -m benchmarks.x`).

torch and triton are imported inside the helpers that use them: bench_loader, which needs
neither, takes the commit from here and still starts without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# gpt-oss-120b and -20b: hidden and intermediate sizes (unpadded: 2880 = 90 MXFP4 blocks) and top-k.
HIDDEN, INTER, TOP_K = 2880, 2880, 4

# do_bench's measuring time per call, ms (after 10 ms of warm-up).
REP_MS = 40

# Relative Frobenius difference a swept config may have from the default (another summation
# order: bf16-rounding differences only) before its time counts.
SWEEP_AGREEMENT = 1e-2


def git_commit() -> str:
    """The commit a result records: $MXFP4_COMMIT where set (the device scripts set it: the device's
    copy of the checkout may carry no or stale git metadata), else the short hash of HEAD of the
    checkout holding this file, else "unknown"."""
    if os.environ.get("MXFP4_COMMIT"):
        return os.environ["MXFP4_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def graph_of(fn):
    """Capture fn into a CUDA graph (after a warm-up on a side stream); returns (graph, outputs)."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_graph(fn) -> float:
    """GPU time of fn in ms: its CUDA graph replayed by triton.testing.do_bench (L2 flushed
    between replays), median."""
    from triton.testing import do_bench
    graph, _ = graph_of(fn)
    return do_bench(graph.replay, warmup=10, rep=REP_MS, return_mode="median")


def time_eager(fn) -> float:
    """Time of fn called eagerly (launch overhead included), ms, do_bench's median."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=REP_MS, return_mode="median")


def gpt_oss_weights(experts: int):
    """For probes: random MXFP4 expert weights of gpt-oss shape (H = I = 2880, top-4) with
    `experts` experts, seeded by the expert count, drawn on the GPU (ExpertWeights only, no float
    copy)."""
    from mxfp4_moe.synthetic import random_expert_weights
    weights, _ = random_expert_weights(experts, HIDDEN, INTER, top_k=TOP_K, seed=experts, device="cuda", dense=False)
    return weights


def routed_points(spec: str):
    """For probes: "E:T,E:T,..." -> (experts, tokens, weights, x, topk_weights, topk_ids) per
    point, at gpt-oss shapes (H = I = 2880, top-4, random weights seeded by E, tokens by T); the
    weights of one E are built once and reused by consecutive points."""
    import torch

    from mxfp4_moe.routing import route
    weights = {}
    for point in filter(None, spec.split(",")):
        experts, tokens = map(int, point.split(":"))
        if experts not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            weights[experts] = gpt_oss_weights(experts)
        w = weights[experts]
        x = torch.randn(tokens, HIDDEN, generator=torch.Generator(device="cuda").manual_seed(tokens),
                        device="cuda").to(torch.bfloat16)
        topk_w, topk_ids = route(x, w.router_weight, w.router_bias, w.top_k)
        yield experts, tokens, w, x, topk_w, topk_ids


def start_probe(out: Path, **extra) -> dict:
    """For probes: create `out`, print the header (device, commit, `extra`) and return it."""
    import torch
    out.mkdir(parents=True, exist_ok=True)
    header = {"device": torch.cuda.get_device_name(), "commit": git_commit(), **extra}
    print(json.dumps(header), flush=True)
    return header


def record(row: dict, rows: list[dict], path: Path, header: dict) -> None:
    """For probes: print one result row, keep it, and rewrite `path` with every row so far (a
    run cut short still leaves its rows)."""
    print(json.dumps(row), flush=True)
    rows.append(row)
    path.write_text(json.dumps({"header": header, "rows": rows}, indent=1))


@dataclass
class Rank:
    """One rank of a multi-process runner, from start_rank: its device, process group kind ("nccl"
    or "gloo"), rank and world size, the checkpoint every rank reads, and the compute dtype."""
    device: torch.device
    pg: str
    rank: int
    world: int
    checkpoint: str
    dtype: torch.dtype
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def obj_device(self):
        """Where broadcast_object stages its bytes: the GPU under NCCL, None (the CPU) under gloo."""
        return self.device if self.device.type == "cuda" else None

    def finish(self, failed: bool, report=None) -> int:
        """Every rank's exit status (1 when any rank failed), after rank 0 runs `report()`; then the
        process group ends and rank 0's temporary checkpoint goes, once every rank is done with it."""
        import torch.distributed as dist

        from mxfp4_moe import distributed as D
        code = D.broadcast_object(1 if failed else 0, device=self.obj_device)
        if self.rank == 0 and report is not None:
            report()
        dist.barrier()                                   # rank 0's checkpoint folder outlives every read
        dist.destroy_process_group()
        if self._tmp is not None:
            self._tmp.cleanup()
        return code


def start_rank(name: str, args, checkpoint: str | None, write_checkpoint) -> Rank:
    """This process's rank (under torchrun or spawned): its device (args.device), the process group,
    the checkpoint (given, or written by rank 0 with `write_checkpoint(args, folder)` into a
    temporary folder and broadcast) and the dtype (args.dtype, else bf16 on a GPU, float32 on a CPU)."""
    import torch
    import torch.distributed as dist

    from mxfp4_moe import distributed as D
    device = D.rank_device(D.torchrun_env().local_rank, args.device)
    # Generous timeout: under torchrun rank 0 may first write a gpt-oss-size checkpoint.
    pg = D.init_process_group(device, timeout_s=1800)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rank = Rank(device, pg, dist.get_rank(), dist.get_world_size(), checkpoint, dtype)
    if checkpoint is None:
        if rank.rank == 0:
            rank._tmp = tempfile.TemporaryDirectory(prefix=f"{name}_")
            checkpoint = write_checkpoint(args, Path(rank._tmp.name))
        rank.checkpoint = D.broadcast_object(checkpoint, device=rank.obj_device)
    return rank


def tokens_and_iters(args, device, full_tokens, tiny_tokens, iters_gpu_cpu: tuple[int, int]
                     ) -> tuple[list[int], int]:
    """What a multi-rank layer runner times on `device`: the token counts (args.tokens,
    comma-separated, else tiny_tokens under args.tiny, else full_tokens) and the timed forwards per
    case (args.iters, else iters_gpu_cpu[0] on a GPU, iters_gpu_cpu[1] on a CPU)."""
    tokens = [int(t) for t in (args.tokens.split(",") if args.tokens else (tiny_tokens if args.tiny else full_tokens))]
    return tokens, args.iters or iters_gpu_cpu[0 if device.type == "cuda" else 1]


def layer_run_header(args, device, pg: str, world: int, dtype, checkpoint: str, cfg, **extra) -> dict:
    """The JSON header of a multi-rank layer run: devices ("N x <GPU>" or the CPU and its threads),
    process group, torch, triton (None where absent), commit, dtype, args.backend, args.align, then
    `extra`, the checkpoint, the layer's sizes (`cfg`: its MoEConfig) and NCCL_NVLS_ENABLE."""
    import platform

    import torch
    if device.type == "cuda":
        device_name = f"{world} x {torch.cuda.get_device_properties(device).name}"
    else:
        device_name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads per rank), {world} ranks"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name, "process_group": pg, "torch": torch.__version__, "triton": triton_version,
            "commit": git_commit(), "dtype": str(dtype).removeprefix("torch."), "backend": args.backend,
            "align": args.align, **extra, "checkpoint": checkpoint,
            "layer": {"num_experts": cfg.num_experts, "hidden": cfg.hidden_size,
                      "intermediate": cfg.intermediate_size, "top_k": cfg.experts_per_token},
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}


def write_synthetic_layer(spec: dict, folder: Path) -> str:
    """A seeded synthetic checkpoint (`spec`: make_synthetic_checkpoint's arguments) written into
    folder/ckpt; its path."""
    from mxfp4_moe.synthetic import make_synthetic_checkpoint
    t0 = time.perf_counter()
    path = str(make_synthetic_checkpoint(folder / "ckpt", **spec))
    print(f"wrote synthetic checkpoint {spec} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


def _rank_entry(rank_main, args, checkpoint) -> None:
    code = rank_main(args, checkpoint)
    if code:
        raise SystemExit(code)


def spawn_ranks(name: str, rank_main, args, checkpoint: str | None) -> int:
    """Run `rank_main(args, checkpoint)` (a module-level function returning an exit status) in
    args.nproc processes spawned on this host; 1 when any fails (its traceback is printed), else 0."""
    from mxfp4_moe import distributed as D
    try:
        D.spawn_local(_rank_entry, args.nproc, (rank_main, args, checkpoint))
    except Exception as exc:                         # a rank failed: its traceback is above
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def run_ranks(name: str, rank_main, args, write_checkpoint) -> int:
    """Under torchrun: `rank_main(args, args.checkpoint)` in this process (rank 0 writes the
    checkpoint when none is given). Else args.nproc spawned ranks (one GPU each on "cuda"), on
    args.checkpoint or on the one `write_checkpoint(args, folder)` writes into a temporary folder.
    args.device None becomes "cuda" where a GPU is visible, else "cpu"."""
    import torch

    from mxfp4_moe import distributed as D
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if D.torchrun_env() is not None:
        return rank_main(args, args.checkpoint)
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix=f"{name}_") as tmp:
        return spawn_ranks(name, rank_main, args, args.checkpoint or write_checkpoint(args, Path(tmp)))
