"""`python -m mxfp4_moe.verify`: validate an MXFP4 MoE checkpoint end to end.

For each layer it checks the format (dtypes, shapes, NaN scale bytes, scale exponents), the
sharding (every rank's shard holds exactly its slice of the checkpoint and clean padding), the
kernels (the MoE layer on random tokens against the float64 reference), TP/EP consistency (the
ranks' outputs add up to the unsharded output), optionally transformers' GptOssMLP as an oracle,
and on a GPU the MoE layer's throughput. With no checkpoint it builds and verifies a small
synthetic one. Exit status: 0 all checks passed, 1 a check failed, 2 unreadable input, bad
arguments or a check out of memory (one `error:` line; with --json, a report holding it).

Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) every process is one rank (global rank =
ep_rank * tp + tp_rank, device cuda:LOCAL_RANK on a GPU machine, NCCL; gloo on CPU): it loads only
its own shard, the ranks' outputs are combined by an all-reduce, rank 0 compares the result with
the single-process output and alone prints the report (with per-rank rows); every rank exits
with the same status.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

from .checks import (SHARD_SUM_TOLERANCE, CheckResult, check_coverage, check_format, check_fragment_order,
                     check_kernels, check_oracle, check_shard, kernel_tolerance, measure_throughput, rel_err,
                     run_noting_fallbacks)
from .. import __version__
from .common import (BUILTIN_CHECKPOINT, BUILTIN_LAYOUT, EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK,
                            MAX_TOKENS, REPORT_SCHEMA, UsageError, check_arguments, environment, make_plans, one_line,
                            parse_align, parse_device, parse_layers, plural, rank_label, report, report_header,
                            resolve_compute, write_error_json)
from ..progress import advance as advance_bar
from ..progress import progress_bar

# The exit codes and the report schema are part of the CLI (`verify.EXIT_OK`, ...).
__all__ = ["EXIT_BAD_INPUT", "EXIT_CHECK_FAILED", "EXIT_OK", "REPORT_SCHEMA", "build_parser", "main", "run_checks"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error:` line (exit 2) like every other bad input,
    not the usage block first."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {one_line(message)} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m mxfp4_moe.verify",
        description="Verify an MXFP4 MoE checkpoint (gpt-oss style): format, TP/EP sharding with padding, "
                    "kernels against the float64 reference, rank consistency, throughput.",
        epilog=f"Without CHECKPOINT: a built-in synthetic checkpoint ({BUILTIN_CHECKPOINT['num_layers']} layers, "
               f"{BUILTIN_CHECKPOINT['num_experts']} experts, H {BUILTIN_CHECKPOINT['hidden']}, "
               f"I {BUILTIN_CHECKPOINT['intermediate']}) at --tp {BUILTIN_LAYOUT['tp']} --ep {BUILTIN_LAYOUT['ep']} "
               f"--align {BUILTIN_LAYOUT['align']} unless those are given. "
               "Exit status: 0 all checks passed, 1 a check failed, 2 unreadable checkpoint or bad arguments.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (Hugging Face layout, original/ layout, "
                                                 "a model folder holding original/, gpt-oss unfused, "
                                                 "compressed-tensors or Quark MXFP4) or a GGUF file")
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
    p.add_argument("--tokens", type=int, default=64, help=f"random tokens per check (default 64, at most {MAX_TOKENS})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="MoE backend checked against the reference (auto: triton on CUDA; on a CPU, triton "
                        "through Triton's interpreter for the built-in checkpoint, torch otherwise)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--oracle", choices=("transformers",), default=None,
                   help="also compare with transformers' GptOssMLP (small models)")
    p.add_argument("--model", action="store_true",
                   help="also check the whole model: logits and greedy decoding of load_model's model (gpt-oss or "
                        "Qwen3-MoE) against transformers' dequantized model of the checkpoint (needs the dense "
                        "weights; a GGUF file needs --reference)")
    p.add_argument("--reference", default=None, metavar="FOLDER",
                   help="with --model on a GGUF file: the same model in the Hugging Face layout, which transformers "
                        "loads as the reference (its own GGUF loader cannot read gpt-oss); its dense weights must "
                        "hold the GGUF's values (a GGUF whose dense tensors were re-quantized differs by that)")
    p.add_argument("--bench-tokens", type=int, default=None,
                   help="tokens for the GPU throughput measurement (default: --tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random tokens")
    p.add_argument("--json", dest="json_path", default=None, help="write the report as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--version", action="version", version=f"mxfp4_moe {__version__}")
    return p


def run_checks(args, ckpt, device: torch.device, dtype: torch.dtype, progress_enabled: bool) -> list[CheckResult]:
    from ..loader import load_layer
    from ..moe import MXFP4MoE
    from ..reference import reference_moe
    from ..routing import route

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
    progress = progress_bar(len(layers) * steps_per_layer + 3, progress_enabled, desc="verify")

    def advance(progress, stage: str) -> None:
        args.stage = stage              # named by the error if memory runs out (`_main`)
        advance_bar(progress, stage)

    coverage = check_coverage(plans, cfg.num_experts, cfg.intermediate_size)
    results.append(CheckResult("sharding", None, None, not coverage,
                               "; ".join(coverage) or f"{plural(len(plans), 'rank')} "
                                                      f"{'holds' if len(plans) == 1 else 'hold'} every "
                                                      "(expert, block) exactly once",
                               {"ranks": len(plans)}))
    oracle_layer = None
    for layer in layers:
        advance(progress, f"layer {layer}: format")
        results.append(check_format(ckpt, layer))
        tensors = ckpt.layer(layer)

        g = torch.Generator(device="cpu").manual_seed(args.seed + layer)
        x = torch.randn(args.tokens, cfg.hidden_size, generator=g).to(device)
        args.stage = f"layer {layer}: loading it unsharded"
        full = load_layer(ckpt, layer, full_plan, device=device)
        x_compute = x.to(dtype)
        # The reference sees the same (rounded) tokens the layer sees, and routes them as the
        # layer does: routing the unrounded tokens picks other experts for near-ties, which at
        # 2048 tokens in bf16 moved the error to 4e-2 while the kernels were right.
        topk_weights, topk_ids = route(x_compute, full.router_weight, full.router_bias, cfg.experts_per_token,
                                       scoring=full.router_scoring, norm_topk_prob=full.norm_topk_prob)
        args.stage = f"layer {layer}: the float64 reference"
        ref_full = reference_moe(x_compute.double(), full, topk_weights, topk_ids, torch.float64)

        advance(progress, f"layer {layer}: kernels")
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
            advance(progress, f"layer {layer}: rank {rank_label(plan)}")
            rank = plans.index(plan)
            weights = load_layer(ckpt, layer, plan, device=device)
            problems = check_shard(tensors, plan, weights)
            results.append(CheckResult(
                "sharding", layer, rank, not problems,
                "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "") if problems
                else f"{rank_label(plan)}: {plan.num_local_experts} experts, I {plan.inter}->{plan.inter_pad}, "
                     f"H {plan.hidden}->{plan.hidden_pad}; exact, padding clean; read {weights.bytes_read / 1e6:.2f} MB",
                {"bytes_read": weights.bytes_read, "local_experts": list(plan.local_experts),
                 "inter": plan.inter, "inter_pad": plan.inter_pad, "hidden_pad": plan.hidden_pad,
                 "problems": problems}))
            ref_sum += reference_moe(x_compute.double(), weights, topk_weights, topk_ids, torch.float64)
            out_sum += MXFP4MoE(weights, backend=backend, compute_dtype=dtype)(x_compute).double()
            del weights

        advance(progress, f"layer {layer}: consistency")
        if len(checked_plans) == len(plans):
            ref_err = rel_err(ref_sum, ref_full)
            out_err = rel_err(out_sum, ref_full)
            ok = ref_err <= SHARD_SUM_TOLERANCE and out_err <= tol
            results.append(CheckResult(
                "consistency", layer, None, ok,
                f"sum of {plural(len(plans), 'rank')} vs unsharded: reference rel err {ref_err:.1e} (<= {SHARD_SUM_TOLERANCE:.0e}), "
                f"{module.backend} rel err {out_err:.2e} (<= {tol:.0e})",
                {"reference_rel_err": ref_err, "backend_rel_err": out_err, "ranks": len(plans)}))
        else:
            results.append(CheckResult("consistency", layer, None, True, "needs every rank (--rank was given)",
                                       skipped=True))

    advance(progress, "oracle")
    if args.oracle:
        module, full, x_compute = oracle_layer
        results.append(check_oracle(module, full, x_compute, cfg))
    advance(progress, "model")
    if args.model:
        from .model_check import check_model
        results.append(check_model(ckpt.path, device, dtype, args.model_backend, args.seed,
                                   reference=args.reference))
    advance(progress, "throughput")
    if device.type == "cuda":
        full = load_layer(ckpt, layers[0], full_plan, device=device)
        results.append(measure_throughput(MXFP4MoE(full, backend=backend, compute_dtype=dtype),
                                          args.bench_tokens or args.tokens, cfg.hidden_size, device, args.seed))
    else:
        results.append(CheckResult("throughput", None, None, True, "needs a CUDA GPU", skipped=True))
    progress.close()
    return results


def main(argv: list[str] | None = None) -> int:
    """The CLI. Returns the exit status: EXIT_OK, EXIT_CHECK_FAILED, or EXIT_BAD_INPUT after one
    `error:` line on stderr (and, with --json, a report holding that line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = sys.stdout
    try:
        check_arguments(args)
        from ..distributed import DistributedSetupError, torchrun_env
        try:
            launch = torchrun_env()
        except DistributedSetupError as exc:
            raise UsageError(str(exc)) from None
        if launch is not None:
            from .torchrun import main_torchrun
            return main_torchrun(args, out, launch)
        return _main(args, out)
    except UsageError as exc:
        message = one_line(str(exc))
        print(f"error: {message}", file=sys.stderr)
        write_error_json(args.json_path, message)
        return EXIT_BAD_INPUT


def _main(args, out) -> int:
    from ..checkpoint import CheckpointError, open_checkpoint

    builtin = args.checkpoint is None
    args.tp = args.tp or (BUILTIN_LAYOUT["tp"] if builtin else 1)
    args.ep = args.ep or (BUILTIN_LAYOUT["ep"] if builtin else 1)
    args.align = parse_align(args.align or (BUILTIN_LAYOUT["align"] if builtin else "none"))
    device = parse_device(args.device)
    if args.oracle == "transformers":
        _require_transformers("--oracle transformers")
    # The model check runs the backend asked for: "auto" is the torch reference on a CPU, since a
    # whole model through Triton's interpreter takes minutes (the kernels check covers them).
    args.model_backend = args.backend
    dtype = resolve_compute(args, device, builtin)

    with ExitStack() as stack:
        if builtin:
            from ..synthetic import make_synthetic_checkpoint
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mxfp4_moe_verify_")))
            path = make_synthetic_checkpoint(folder / "checkpoint", **BUILTIN_CHECKPOINT)
        else:
            path = Path(args.checkpoint)
        try:
            ckpt = stack.enter_context(open_checkpoint(path))
            env = environment(device)
            header = report_header(args, path, builtin, ckpt, dtype)
            if args.model or args.reference:
                _check_model_prerequisites(ckpt, args)
            args.stage = "opening the checkpoint"
            results = run_checks(args, ckpt, device, dtype, progress_enabled=not args.quiet)
        except CheckpointError as exc:
            raise UsageError(f"cannot read the checkpoint: {exc}") from None
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise UsageError(_out_of_memory(args, device, exc)) from None
        except RuntimeError as exc:
            # torch's CPU allocator reports a failed allocation as a RuntimeError.
            if "alloc" not in str(exc).lower():
                raise
            raise UsageError(_out_of_memory(args, device, exc)) from None

    return report(args, out, env, header, results)


def _out_of_memory(args, device: torch.device, exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    cause = lines[0][:200] if lines else type(exc).__name__
    return (f"out of memory on {device} while checking {args.stage} ({cause}): check fewer tokens (--tokens), "
            "one layer (--layers) or one rank (--rank), or use a machine with more memory")


def _require_transformers(option: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError(f"{option} needs transformers: pip install 'mxfp4-moe[transformers]'") from None


def _check_model_prerequisites(ckpt, args) -> None:
    """--model needs transformers and a full-model checkpoint in a layout transformers reads (a
    GGUF file: its twin in the Hugging Face layout, --reference)."""
    if not args.model:
        raise UsageError("--reference is the reference of the model check: give --model too")
    _require_transformers("--model")
    from .model_check import dense_weights_problem
    problem = dense_weights_problem(ckpt, args.reference)
    if problem:
        raise UsageError(f"--model: {problem}")

