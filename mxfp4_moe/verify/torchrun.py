"""`python -m mxfp4_moe.verify` under torchrun: one process per rank. Each loads only its own
shard through `DistributedMXFP4MoE`, the ranks' outputs are combined by an all-reduce, and rank 0
compares the result with the single-process output and alone prints the report (with per-rank
rows); every rank exits with the same status.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

from .checks import (CheckResult, SHARD_SUM_TOLERANCE, check_coverage,
                     check_format, check_fragment_order, check_kernels, check_oracle, check_shard, kernel_tolerance,
                     median_ms, rel_err, run_noting_fallbacks)
from .common import (BUILTIN_CHECKPOINT, BUILTIN_LAYOUT, EXIT_BAD_INPUT, UsageError, environment,
                            make_plans, one_line, parse_align, parse_layers, rank_label, report, report_header,
                            resolve_compute, write_error_json)
from ..progress import advance, progress_bar


# ---- one process per rank (torchrun) ------------------------------------------------------------

DIST_TIMING_ITERS = 20      # timed distributed forwards per rank (after warm-up), median reported


def _torchrun_layout(args, world_size: int) -> None:
    """--tp / --ep under torchrun: both given must multiply to WORLD_SIZE; one given, the other is
    WORLD_SIZE divided by it; none, tp = WORLD_SIZE. Raises UsageError otherwise."""
    for name, value in (("tp", args.tp), ("ep", args.ep)):
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if args.rank is not None:
        raise UsageError("--rank picks one simulated rank in a single process; under torchrun every "
                         "process is its own rank: drop --rank")
    if args.tokens < 1:
        raise UsageError(f"--tokens must be at least 1, got {args.tokens}")
    tp, ep = args.tp, args.ep
    if tp is None and ep is None:
        tp, ep = world_size, 1
    elif tp is None and world_size % ep == 0:
        tp = world_size // ep
    elif ep is None and world_size % tp == 0:
        ep = world_size // tp
    if tp is None or ep is None or tp * ep != world_size:
        given = " ".join(f"--{n} {v}" for n, v in (("tp", args.tp), ("ep", args.ep)) if v is not None)
        raise UsageError(f"WORLD_SIZE {world_size} (processes started by torchrun) must equal tp x ep; {given} "
                         "does not fit it; launch torchrun --nproc-per-node <tp x ep> or change --tp/--ep")
    args.tp, args.ep = tp, ep


def _first_error(errors: list | None) -> str | None:
    return next((e for e in errors or [] if e), None)


def run_distributed_checks(args, ckpt, device: torch.device, dtype: torch.dtype, groups,
                           progress_enabled: bool) -> list[CheckResult] | None:
    """The checks with one process per rank. Every rank loads only its own shard through
    `DistributedMXFP4MoE` and takes part in the combine; rank 0 also loads the unsharded layer for
    the single-process output and the float64 reference. Returns the results on rank 0, None on
    the others. Raises UsageError (bad layout) or CheckpointError (a rank could not load) on
    every rank alike."""
    import torch.distributed as dist

    from .. import distributed as D
    from ..checkpoint import CheckpointError
    from ..loader import load_layer
    from ..moe import MXFP4MoE
    from ..reference import reference_moe
    from ..routing import route

    rank, world = dist.get_rank(), dist.get_world_size()
    rank0 = rank == 0
    cfg = ckpt.config
    layers = parse_layers(args.layers, cfg.num_layers)
    plans, full_plan = make_plans(args, cfg)
    results: list[CheckResult] = []
    progress = progress_bar(len(layers) * 4 + 2, progress_enabled and rank0, desc="verify")
    if rank0:
        coverage = check_coverage(plans, cfg.num_experts, cfg.intermediate_size)
        results.append(CheckResult("sharding", None, None, not coverage,
                                   "; ".join(coverage) or f"{len(plans)} ranks hold every (expert, block) exactly once",
                                   {"ranks": len(plans)}))
    first = None                    # (distributed layer, single-process module, full weights, x) of the first layer
    tol = None
    for layer in layers:
        advance(progress, f"layer {layer}: format")
        if rank0:
            results.append(check_format(ckpt, layer))
        tensors = ckpt.layer(layer)
        g = torch.Generator(device="cpu").manual_seed(args.seed + layer)
        x = torch.randn(args.tokens, cfg.hidden_size, generator=g).to(device)
        x_compute = x.to(dtype)

        advance(progress, f"layer {layer}: load shards")
        D.reset_peak_memory(device)
        error = None
        try:
            moe = D.DistributedMXFP4MoE.from_checkpoint(
                ckpt, layer, groups=groups, align=args.align, placement=args.placement, hidden_pad=args.hidden_pad,
                device=device, backend=args.backend, compute_dtype=dtype)
        except (ValueError, TypeError) as exc:          # CheckpointError is a ValueError
            error = f"rank {rank}: {exc}"
        errors = D.gather_objects(error, device)
        if not D.all_ok(error is None, device):
            raise CheckpointError(_first_error(errors) or "another rank could not load its shard")
        plan = moe.plan
        assert plan == plans[rank], (plan, plans[rank])
        y = moe(x_compute)                                  # combined output, the same on every rank
        # This rank's shard in checkpoint order (rebuilt from the fragment copy where the layer
        # keeps only that one on a Hopper GPU, so the shard check reads what the kernel reads).
        shard = moe.local.checkpoint_weights()
        topk_weights, topk_ids = route(x_compute, moe.weights.router_weight, moe.weights.router_bias,
                                       cfg.experts_per_token, scoring=moe.weights.router_scoring,
                                       norm_topk_prob=moe.weights.norm_topk_prob)
        # Collectives need contiguous tensors: with H padded, the MoE's outputs are column views
        # of [T, H_pad] buffers, and torch 2.13's gloo reduces/broadcasts their storage without a
        # word (wrong values), so every tensor sent is made contiguous first.
        ref_sum = reference_moe(x_compute.double(), shard, topk_weights, topk_ids, torch.float64).contiguous()
        dist.all_reduce(ref_sum)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peak_bytes, peak_kind = D.peak_memory(device)
        problems = check_shard(tensors, plan, shard)
        del shard

        advance(progress, f"layer {layer}: single-process output")
        if rank0:
            full = load_layer(ckpt, layer, full_plan, device=device)
            ref_full = reference_moe(x_compute.double(), full, topk_weights, topk_ids, torch.float64).contiguous()
            module = MXFP4MoE(full, backend=args.backend, compute_dtype=dtype)
            single, fallbacks = run_noting_fallbacks(module, x_compute)
            single = single.contiguous()
            results.append(check_kernels(single, ref_full, module.backend, layer,
                                         fragment_order=module.fragments is not None, fallbacks=fallbacks))
            if module.fragments is not None:
                results.append(check_fragment_order(module, full, layer))
        else:
            ref_full, single = torch.empty_like(ref_sum), torch.empty_like(y)
        dist.broadcast(ref_full, 0)
        dist.broadcast(single, 0)
        tol = kernel_tolerance(dtype, device, moe.backend)
        stats = moe.load_stats
        info = {"rank": rank, "tp_rank": plan.tp_rank, "ep_rank": plan.ep_rank, "device": str(device),
                "bytes_read": stats.bytes_read, "planned_bytes": stats.planned_bytes, "load_s": stats.load_s,
                "peak_mem_bytes": peak_bytes, "peak_mem_kind": peak_kind, "problems": problems,
                "local_experts": list(plan.local_experts), "inter": plan.inter, "inter_pad": plan.inter_pad,
                "hidden_pad": plan.hidden_pad, "vs_single_rel_err": rel_err(y, single),
                "vs_reference_rel_err": rel_err(y, ref_full), "ref_sum_rel_err": rel_err(ref_sum, ref_full)}
        infos = D.gather_objects(info, device)

        advance(progress, f"layer {layer}: consistency")
        if rank0:
            results.extend(_rank_rows(layer, infos, plans, tol))
            ref_err = infos[0]["ref_sum_rel_err"]
            out_err = max(i["vs_reference_rel_err"] for i in infos)
            results.append(CheckResult(
                "consistency", layer, None, ref_err <= SHARD_SUM_TOLERANCE and out_err <= tol,
                f"all-reduce of {world} processes vs unsharded: reference rel err {ref_err:.1e} "
                f"(<= {SHARD_SUM_TOLERANCE:.0e}), {moe.backend} rel err {out_err:.2e} (<= {tol:.0e})",
                {"reference_rel_err": ref_err, "backend_rel_err": out_err, "ranks": world}))
        if first is None:
            first = (moe, module if rank0 else None, full if rank0 else None, x_compute)
        else:
            del moe
        if rank0:
            del full, module

    advance(progress, "oracle")
    moe, module, full, x_compute = first
    if rank0 and args.oracle:
        results.append(check_oracle(module, full, x_compute, cfg))
    advance(progress, "throughput")
    if device.type == "cuda":
        timing = _time_distributed(moe, module, args.bench_tokens or args.tokens, cfg.hidden_size, device, args.seed)
        timings = D.gather_objects(timing, device)
        if rank0:
            results.append(_throughput_row(timings, moe.weights, full, args.bench_tokens or args.tokens))
    elif rank0:
        results.append(CheckResult("throughput", None, None, True, "needs a CUDA GPU", skipped=True))
    progress.close()
    return results if rank0 else None


def _rank_rows(layer: int, infos: list[dict], plans, tol: float) -> list[CheckResult]:
    """Per-rank rows: the shard (exact, padding clean, bytes read = the plan's, load time, peak
    memory) and the rank's combined output against the single-process one."""
    rows = []
    for info in infos:
        plan = plans[info["rank"]]
        problems = list(info["problems"])
        if info["planned_bytes"] is not None and info["bytes_read"] != info["planned_bytes"]:
            problems.append(f"read {info['bytes_read']} bytes from disk, the plan's slices are {info['planned_bytes']}")
        figures = {k: info[k] for k in ("bytes_read", "planned_bytes", "load_s", "peak_mem_bytes", "peak_mem_kind",
                                        "device", "local_experts", "inter", "inter_pad", "hidden_pad")}
        figures["problems"] = problems
        mem = f"peak {'CUDA alloc' if info['peak_mem_kind'] == 'cuda_max_allocated' else 'RSS'} " \
              f"{info['peak_mem_bytes'] / 2**20:.0f} MiB"
        summary = ("; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
                   if problems else
                   f"{rank_label(plan)} on {info['device']}: {plan.num_local_experts} experts, I {plan.inter}->"
                   f"{plan.inter_pad}, H {plan.hidden}->{plan.hidden_pad}; exact, padding clean; read "
                   f"{info['bytes_read'] / 1e6:.2f} MB (= plan) in {info['load_s'] * 1e3:.0f} ms; {mem}")
        rows.append(CheckResult("sharding", layer, info["rank"], not problems, summary, figures))
    for info in infos:
        err, ref_err = info["vs_single_rel_err"], info["vs_reference_rel_err"]
        rows.append(CheckResult(
            "consistency", layer, info["rank"], err <= tol and ref_err <= tol,
            f"{rank_label(plans[info['rank']])}: combined output vs single-process rel err {err:.2e}, "
            f"vs float64 reference {ref_err:.2e} (<= {tol:.0e})",
            {"single_rel_err": err, "reference_rel_err": ref_err, "tolerance": tol}))
    return rows


def _time_distributed(moe, single_module, tokens: int, hidden: int, device: torch.device, seed: int) -> dict:
    """Median time (CUDA events) of the distributed forward (shard + all-reduce) on this rank, and
    on rank 0 of the single-GPU forward for comparison."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=moe.compute_dtype)

    out = {"ms": median_ms(lambda: moe(x), device, DIST_TIMING_ITERS)}
    if single_module is not None:
        out["single_ms"] = median_ms(lambda: single_module(x), device, DIST_TIMING_ITERS)
    return out


def _throughput_row(timings: list[dict], weights, full, tokens: int) -> CheckResult:
    ms = max(t["ms"] for t in timings)                    # the slowest rank sets the layer's time
    flops = 2 * tokens * full.top_k * (2 * full.inter_pad * full.hidden_pad + full.hidden_pad * full.inter_pad)
    single = timings[0].get("single_ms")
    figures = {"tokens": tokens, "ms": ms, "tokens_per_s": tokens / ms * 1e3, "tflops": flops / ms / 1e9,
               "method": f"CUDA events, median of {DIST_TIMING_ITERS}, eager", "per_rank_ms": [t["ms"] for t in timings],
               "single_ms": single}
    return CheckResult("throughput", None, None, True,
                       f"{tokens} tokens: distributed {ms:.3f} ms (slowest rank; shard + all-reduce), "
                       f"single GPU {single:.3f} ms; {tokens / ms * 1e3:,.0f} tokens/s", figures)


def main_torchrun(args, out, launch) -> int:
    """`main` under torchrun: one process per rank. Only rank 0 prints; every rank returns the
    same exit status."""
    import torch.distributed as dist

    from .. import distributed as D
    from ..checkpoint import CheckpointError, open_checkpoint

    rank0 = launch.rank == 0
    if not rank0:
        out = open(os.devnull, "w")

    def bad_input(message: str) -> int:
        message = one_line(message)
        if rank0:
            print(f"error: {message}", file=sys.stderr)
            write_error_json(args.json_path, message)
        return EXIT_BAD_INPUT

    builtin = args.checkpoint is None
    if args.model:
        return bad_input("--model runs in one process (python -m mxfp4_moe.verify CHECKPOINT --model), "
                         "not under torchrun")
    # Argument errors are the same on every rank: each leaves on its own, before any collective.
    try:
        _torchrun_layout(args, launch.world_size)
        args.align = parse_align(args.align or (BUILTIN_LAYOUT["align"] if builtin else "none"))
        device = D.rank_device(launch.local_rank, args.device)
        dtype = resolve_compute(args, device, builtin)
    except (UsageError, D.DistributedSetupError) as exc:
        return bad_input(str(exc))
    except RuntimeError:
        return bad_input(f"--device {args.device}: not a device name (cpu, cuda)")
    pg_backend = D.init_process_group(device)
    groups = D.MoEGroups.from_world(args.tp, args.ep)
    try:
        with ExitStack() as stack:
            error, path = None, None
            if builtin:
                if rank0:
                    from ..synthetic import make_synthetic_checkpoint
                    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mxfp4_moe_verify_")))
                    path = str(make_synthetic_checkpoint(folder / "checkpoint", **BUILTIN_CHECKPOINT))
                path = D.broadcast_object(path, device=device if device.type == "cuda" else None)
                # Rank 0's folder must outlive the other ranks' reads: every rank waits here on
                # the way out, before rank 0 removes it.
                stack.callback(dist.barrier)
            else:
                path = args.checkpoint
            try:
                ckpt = stack.enter_context(open_checkpoint(path))
            except CheckpointError as exc:
                error = str(exc)
            if not D.all_ok(error is None, device):
                return bad_input(f"cannot read the checkpoint: {error}" if error else "another rank could not "
                                 "read the checkpoint")
            env = environment(device)
            header = report_header(args, path, builtin, ckpt, dtype)
            header["distributed"] = {"launcher": "torchrun", "world_size": launch.world_size,
                                     "process_group": pg_backend, "combine": "all-reduce",
                                     "rank_order": "ep_rank * tp + tp_rank"}
            try:
                results = run_distributed_checks(args, ckpt, device, dtype, groups,
                                                 progress_enabled=not args.quiet)
            except UsageError as exc:
                return bad_input(str(exc))
            except CheckpointError as exc:
                return bad_input(f"cannot read the checkpoint: {exc}")
            exit_code = report(args, out, env, header, results) if rank0 else None
            return D.broadcast_object(exit_code, device=device if device.type == "cuda" else None)
    finally:
        if not rank0:
            out.close()
        dist.destroy_process_group()
