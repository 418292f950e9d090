"""`python -m mxfp4_moe.verify`: validate an MXFP4 MoE checkpoint end to end.

For each layer it checks the format (dtypes, shapes, NaN scale bytes, scale exponents), the
sharding (every rank's shard holds exactly its slice of the checkpoint and clean padding), the
kernels (the MoE layer on random tokens against the float64 reference), TP/EP consistency (the
ranks' outputs add up to the unsharded output), optionally transformers' GptOssMLP as an oracle,
and on a GPU the MoE layer's throughput. With no checkpoint it builds and verifies a small
synthetic one. Exit status: 0 all checks passed, 1 a check failed, 2 unreadable input or bad
arguments.

Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) every process is one rank (global rank =
ep_rank * tp + tp_rank, device cuda:LOCAL_RANK on a GPU machine, NCCL; gloo on CPU): it loads only
its own shard, the ranks' outputs are combined by an all-reduce, rank 0 compares the result with
the single-process output and alone prints the report (with per-rank rows); every rank exits
with the same status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from . import __version__
from .checks import (SHARD_SUM_TOLERANCE, CheckResult, check_coverage, check_format, check_fragment_order,
                     check_kernels, check_oracle, check_shard, kernel_tolerance, measure_throughput, rel_err,
                     run_noting_fallbacks)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
REPORT_SCHEMA = "mxfp4_moe.verify/1"

# The built-in checkpoint: small, seeded, with sizes that leave padding at every rank under the
# default layout (I = 11 blocks: TP 2 gives 6 and 5 blocks, padded to 192 by the Triton preset).
BUILTIN_CHECKPOINT = dict(num_layers=2, num_experts=8, hidden=288, intermediate=352, top_k=4, seed=0)
BUILTIN_LAYOUT = dict(tp=2, ep=2, align="triton")

class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit status 2."""


# ---- environment and arguments ----------------------------------------------------------------

def environment(device: torch.device) -> dict:
    """Versions and device, for the report header."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_name = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    else:
        device_name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {"mxfp4_moe": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "device": device_name,
            "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")}


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; None -> every layer. Raises UsageError when out of range."""
    if spec is None:
        return list(range(num_layers))
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise UsageError(f"--layers: cannot read {part!r}; expected a list like 0,2,5-7") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise UsageError(f"--layers {spec}: layer(s) {bad} out of range; the checkpoint has layers 0..{num_layers - 1}")
    return sorted(set(layers))


def parse_align(spec: str):
    """'triton' (a preset) or 'H,I' (two integers) -> what ShardPlan.create takes."""
    from .sharding import ALIGN_PRESETS
    if "," in spec:
        try:
            h_align, i_align = (int(p) for p in spec.split(","))
        except ValueError:
            raise UsageError(f"--align {spec}: expected a preset ({', '.join(ALIGN_PRESETS)}) or two integers H,I") from None
        return (h_align, i_align)
    if spec not in ALIGN_PRESETS:
        raise UsageError(f"--align {spec}: unknown preset; choose one of {', '.join(ALIGN_PRESETS)} or give H,I")
    return spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mxfp4_moe.verify",
        description="Verify an MXFP4 MoE checkpoint (gpt-oss style): format, TP/EP sharding with padding, "
                    "kernels against the float64 reference, rank consistency, throughput.",
        epilog=f"Without CHECKPOINT: a built-in synthetic checkpoint ({BUILTIN_CHECKPOINT['num_layers']} layers, "
               f"{BUILTIN_CHECKPOINT['num_experts']} experts, H {BUILTIN_CHECKPOINT['hidden']}, "
               f"I {BUILTIN_CHECKPOINT['intermediate']}) at --tp {BUILTIN_LAYOUT['tp']} --ep {BUILTIN_LAYOUT['ep']} "
               f"--align {BUILTIN_LAYOUT['align']} unless those are given. "
               "Exit status: 0 all checks passed, 1 a check failed, 2 unreadable checkpoint or bad arguments.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (Hugging Face layout, original/ layout, "
                                                 "or a model folder holding original/)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (all ranks simulated in one process; under torchrun one process "
                        "per rank, WORLD_SIZE = tp x ep, default tp = WORLD_SIZE)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size")
    p.add_argument("--rank", type=int, default=None,
                   help="check only this global rank (ep_rank * tp + tp_rank) instead of all")
    p.add_argument("--placement", choices=("linear", "round-robin"), default="linear", help="expert placement for EP")
    p.add_argument("--align", default=None, help="padding: a preset (none, triton, marlin, flashinfer-cutlass, "
                                                 "trtllm) or 'H,I' alignments (default: none)")
    p.add_argument("--hidden-pad", type=int, default=None, help="explicit padded hidden size (e.g. 3072 for 2688)")
    p.add_argument("--layers", default=None, help="layers to check, e.g. 0,2,5-7 (default: all)")
    p.add_argument("--tokens", type=int, default=64, help="random tokens per check (default 64)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="MoE backend checked against the reference (auto: triton on CUDA; on a CPU, triton "
                        "through Triton's interpreter for the built-in checkpoint, torch otherwise)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--oracle", choices=("transformers",), default=None,
                   help="also compare with transformers' GptOssMLP (small models)")
    p.add_argument("--bench-tokens", type=int, default=None,
                   help="tokens for the GPU throughput measurement (default: --tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random tokens")
    p.add_argument("--json", dest="json_path", default=None, help="write the report as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    return p


# ---- progress -----------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise or when quiet."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done = max(1, total), 0
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 24
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.1f}s {label[:50]:<50}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def make_plans(args, cfg):
    """Every rank's ShardPlan (ordered ep-major, as global ranks are) and the unsharded plan with
    the same padding. A layout the checkpoint cannot take is a usage error (exit 2)."""
    from .sharding import ShardPlan
    plan_args = dict(num_experts=cfg.num_experts, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
                     placement=args.placement, align=args.align, hidden_pad=args.hidden_pad)
    try:
        return ShardPlan.all_ranks(tp_size=args.tp, ep_size=args.ep, **plan_args), ShardPlan.create(**plan_args)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def _rank_label(plan) -> str:
    return f"tp{plan.tp_rank}/ep{plan.ep_rank}"


def run_checks(args, ckpt, device: torch.device, dtype: torch.dtype, progress_enabled: bool) -> list[CheckResult]:
    from .loader import load_layer
    from .moe import MXFP4MoE
    from .reference import reference_moe
    from .routing import route

    cfg = ckpt.config
    layers = parse_layers(args.layers, cfg.num_layers)
    plans, full_plan = make_plans(args, cfg)
    if args.rank is not None:
        if not 0 <= args.rank < len(plans):
            raise UsageError(f"--rank {args.rank} out of range for tp {args.tp} x ep {args.ep} = {len(plans)} ranks")
        checked_plans = [plans[args.rank]]
    else:
        checked_plans = plans
    backend = args.backend
    results: list[CheckResult] = []
    steps_per_layer = 2 + len(checked_plans) + 1
    progress = Progress(len(layers) * steps_per_layer + 2, progress_enabled)

    coverage = check_coverage(plans, cfg.num_experts, cfg.intermediate_size)
    results.append(CheckResult("sharding", None, None, not coverage,
                               "; ".join(coverage) or f"{len(plans)} ranks hold every (expert, block) exactly once",
                               {"ranks": len(plans)}))
    oracle_layer = None
    for layer in layers:
        progress.step(f"layer {layer}: format")
        results.append(check_format(ckpt, layer))
        tensors = ckpt.layer(layer)

        g = torch.Generator(device="cpu").manual_seed(args.seed + layer)
        x = torch.randn(args.tokens, cfg.hidden_size, generator=g).to(device)
        full = load_layer(ckpt, layer, full_plan, device=device)
        x_compute = x.to(dtype)
        # The reference sees the same (rounded) tokens the layer sees, and routes them as the
        # layer does: routing the unrounded tokens picks other experts for near-ties, which at
        # 2048 tokens in bf16 moved the error to 4e-2 while the kernels were right.
        topk_weights, topk_ids = route(x_compute, full.router_weight, full.router_bias, cfg.experts_per_token)
        ref_full = reference_moe(x_compute.double(), full, topk_weights, topk_ids, torch.float64)

        progress.step(f"layer {layer}: kernels")
        module = MXFP4MoE(full, backend=backend, compute_dtype=dtype)
        got, fallbacks = run_noting_fallbacks(module, x_compute)
        results.append(check_kernels(got, ref_full, module.backend, layer,
                                     fragment_order=module.fragments is not None, fallbacks=fallbacks))
        if module.fragments is not None:
            results.append(check_fragment_order(module, full, layer))
        tol = kernel_tolerance(dtype, device, module.backend)
        if args.oracle and oracle_layer is None:
            oracle_layer = (module, full, x_compute)

        ref_sum = torch.zeros_like(ref_full)
        out_sum = torch.zeros_like(ref_full)
        for plan in checked_plans:
            progress.step(f"layer {layer}: rank {_rank_label(plan)}")
            rank = plans.index(plan)
            weights = load_layer(ckpt, layer, plan, device=device)
            problems = check_shard(tensors, plan, weights)
            results.append(CheckResult(
                "sharding", layer, rank, not problems,
                "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "") if problems
                else f"{_rank_label(plan)}: {plan.num_local_experts} experts, I {plan.inter}->{plan.inter_pad}, "
                     f"H {plan.hidden}->{plan.hidden_pad}; exact, padding clean; read {weights.bytes_read / 1e6:.2f} MB",
                {"bytes_read": weights.bytes_read, "local_experts": list(plan.local_experts),
                 "inter": plan.inter, "inter_pad": plan.inter_pad, "hidden_pad": plan.hidden_pad,
                 "problems": problems}))
            ref_sum += reference_moe(x_compute.double(), weights, topk_weights, topk_ids, torch.float64)
            out_sum += MXFP4MoE(weights, backend=backend, compute_dtype=dtype)(x_compute).double()
            del weights

        progress.step(f"layer {layer}: consistency")
        if len(checked_plans) == len(plans):
            ref_err = rel_err(ref_sum, ref_full)
            out_err = rel_err(out_sum, ref_full)
            ok = ref_err <= SHARD_SUM_TOLERANCE and out_err <= tol
            results.append(CheckResult(
                "consistency", layer, None, ok,
                f"sum of {len(plans)} ranks vs unsharded: reference rel err {ref_err:.1e} (<= {SHARD_SUM_TOLERANCE:.0e}), "
                f"{module.backend} rel err {out_err:.2e} (<= {tol:.0e})",
                {"reference_rel_err": ref_err, "backend_rel_err": out_err, "ranks": len(plans)}))
        else:
            results.append(CheckResult("consistency", layer, None, True, "needs every rank (--rank was given)",
                                       skipped=True))

    progress.step("oracle")
    if args.oracle:
        module, full, x_compute = oracle_layer
        results.append(check_oracle(module, full, x_compute, cfg))
    progress.step("throughput")
    if device.type == "cuda":
        full = load_layer(ckpt, layers[0], full_plan, device=device)
        results.append(measure_throughput(MXFP4MoE(full, backend=backend, compute_dtype=dtype),
                                          args.bench_tokens or args.tokens, cfg.hidden_size, device, args.seed))
    else:
        results.append(CheckResult("throughput", None, None, True, "needs a CUDA GPU", skipped=True))
    progress.close()
    return results


def render(env: dict, header: dict, results: list[CheckResult]) -> str:
    lines = [f"mxfp4_moe {env['mxfp4_moe']} | torch {env['torch']} | triton {env['triton']} | {env['device']}",
             f"checkpoint: {'built-in synthetic' if header['builtin'] else header['path']} ({header['layout']} layout); "
             f"{header['config']['num_layers']} layers, {header['config']['num_experts']} experts, "
             f"H {header['config']['hidden_size']}, I {header['config']['intermediate_size']}, "
             f"top-{header['config']['experts_per_token']}",
             f"layout: tp {header['tp']} x ep {header['ep']} ({header['placement']}), align {header['align']}; "
             f"backend {header['backend']}, {header['dtype']}, {header['tokens']} tokens"]
    if header.get("distributed"):
        d = header["distributed"]
        lines.append(f"launcher: {d['launcher']}, {d['world_size']} processes ({d['process_group']}), "
                     f"rank = {d['rank_order']}, {d['combine']} combine")
    lines.append("")
    width = max(len(r.check) for r in results)
    lines.append(f"{'check':<{width}}  {'layer':>5}  {'rank':>4}  result  details")
    for r in results:
        lines.append(f"{r.check:<{width}}  {'-' if r.layer is None else r.layer:>5}  "
                     f"{'-' if r.rank is None else r.rank:>4}  {r.status:<6}  {r.summary}")
    return "\n".join(lines)


def report_header(args, path, builtin: bool, ckpt, dtype: torch.dtype) -> dict:
    """The report's "checkpoint" section: what was verified and under which layout."""
    return {"path": str(path) if not builtin else "(built-in synthetic)", "builtin": builtin,
            "layout": ckpt.layout, "config": asdict(ckpt.config), "tp": args.tp, "ep": args.ep,
            "rank": args.rank, "placement": args.placement, "align": args.align,
            "hidden_pad": args.hidden_pad, "backend": args.backend,
            "dtype": str(dtype).removeprefix("torch."), "tokens": args.tokens}


def summary_line(results: list[CheckResult]) -> str:
    failed = sum(not r.passed for r in results)
    skipped = sum(r.skipped for r in results)
    passed = len(results) - failed - skipped
    verdict = "FAILED" if failed else "OK"
    return f"{verdict}: {passed} passed, {failed} failed, {skipped} skipped"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = sys.stdout
    try:
        from .distributed import DistributedSetupError, torchrun_env
        try:
            launch = torchrun_env()
        except DistributedSetupError as exc:
            raise UsageError(str(exc)) from None
        if launch is not None:
            from .verify_torchrun import main_torchrun
            return main_torchrun(args, out, launch)
        return _main(args, out)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _resolve_compute(args, device: torch.device, builtin: bool) -> torch.dtype:
    """Settle args.backend for `device` and return the compute dtype (raises UsageError)."""
    if args.backend == "auto" and builtin and device.type != "cuda":
        # The built-in checkpoint is small enough to check the Triton kernels themselves on a
        # CPU, through Triton's interpreter (about half a minute on 2 cores).
        args.backend = "triton"
    if args.backend == "triton" and device.type != "cuda":
        # Triton kernels on a CPU run through Triton's interpreter, which must be switched on
        # before the kernels are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype == torch.bfloat16 and device.type != "cuda" and args.backend == "triton":
        raise UsageError("--dtype bfloat16 with --backend triton needs a GPU: Triton's interpreter has no bf16 "
                         "(it stores bf16 as raw uint16); use float32 or float16 on a CPU")
    return dtype


def _main(args, out) -> int:
    from .checkpoint import CheckpointError, open_checkpoint

    builtin = args.checkpoint is None
    for name, value in (("tp", args.tp), ("ep", args.ep)):
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if args.tokens < 1:
        raise UsageError(f"--tokens must be at least 1, got {args.tokens}")
    args.tp = args.tp or (BUILTIN_LAYOUT["tp"] if builtin else 1)
    args.ep = args.ep or (BUILTIN_LAYOUT["ep"] if builtin else 1)
    args.align = parse_align(args.align or (BUILTIN_LAYOUT["align"] if builtin else "none"))

    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device}: not a device name (cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    dtype = _resolve_compute(args, device, builtin)

    with ExitStack() as stack:
        if builtin:
            from .synthetic import make_synthetic_checkpoint
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mxfp4_moe_verify_")))
            path = make_synthetic_checkpoint(folder / "checkpoint", **BUILTIN_CHECKPOINT)
        else:
            path = Path(args.checkpoint)
        try:
            ckpt = stack.enter_context(open_checkpoint(path))
            env = environment(device)
            header = report_header(args, path, builtin, ckpt, dtype)
            results = run_checks(args, ckpt, device, dtype, progress_enabled=not args.quiet)
        except CheckpointError as exc:
            print(f"error: cannot read the checkpoint: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return report(args, out, env, header, results)


def report(args, out, env: dict, header: dict, results: list[CheckResult]) -> int:
    """Print the table (unless --quiet) and the summary line, write --json; return the exit status."""
    exit_code = EXIT_CHECK_FAILED if any(not r.passed for r in results) else EXIT_OK
    if not args.quiet:
        print(render(env, header, results), file=out)
        print(file=out)
    print(summary_line(results), file=out)
    if args.json_path:
        _write_json(args.json_path, env, header, results, exit_code)
    return exit_code


def _write_json(json_path, env: dict, header: dict, results: list[CheckResult], exit_code: int) -> None:
    report = {"schema": REPORT_SCHEMA, "environment": env, "checkpoint": header,
              "checks": [asdict(r) | {"status": r.status} for r in results],
              "summary": {"passed": sum(r.passed and not r.skipped for r in results),
                          "failed": sum(not r.passed for r in results),
                          "skipped": sum(r.skipped for r in results)},
              "exit_code": exit_code}
    Path(json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
