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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK, E8M0_BIAS, E8M0_NAN, PAD_SCALE_E8M0

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
REPORT_SCHEMA = "mxfp4_moe.verify/1"

# The built-in checkpoint: small, seeded, with sizes that leave padding at every rank under the
# default layout (I = 11 blocks: TP 2 gives 6 and 5 blocks, padded to 192 by the Triton preset).
BUILTIN_CHECKPOINT = dict(num_layers=2, num_experts=8, hidden=288, intermediate=352, top_k=4, seed=0)
BUILTIN_LAYOUT = dict(tp=2, ep=2, align="triton")

# Relative Frobenius error allowed between the MoE layer and the float64 reference, by compute
# dtype. bf16 operands round to 8 bits (2**-9 relative), fp16 to 11; float32 on a GPU may use
# tf32 matrix units (10-bit mantissa), so it gets the fp16 bound there.
KERNEL_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}
KERNEL_TOLERANCE_GPU_FLOAT32 = 5e-3
# The ranks' float64 reference outputs must add up to the unsharded one to rounding.
SHARD_SUM_TOLERANCE = 1e-9
ORACLE_TOLERANCE = 1e-5
ORACLE_MAX_EXPERTS_X_SIZE = 64 * 1024 * 1024   # transformers holds float32 experts: keep it small


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit status 2."""


# ---- results --------------------------------------------------------------------------------

@dataclass
class CheckResult:
    """One row of the report."""
    check: str                     # format | sharding | kernels | consistency | oracle | throughput
    layer: int | None
    rank: int | None
    passed: bool
    summary: str
    figures: dict = field(default_factory=dict)
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("PASS" if self.passed else "FAIL")


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref||_F / ||ref||_F in float64; NaN anywhere gives inf, so it never passes."""
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return float("inf")
    denom = ref.norm().item()
    return (got - ref).norm().item() / denom if denom else (got - ref).norm().item()


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


# ---- the checks -----------------------------------------------------------------------------

def check_format(ckpt, layer: int) -> CheckResult:
    """NaN scale bytes and a summary of the scale exponents of w13 and w2 (dtypes and shapes were
    checked against the config when the checkpoint was opened)."""
    tensors = ckpt.layer(layer)
    report = ckpt.find_nan_scales(layer)
    figures = {"nan_scale_bytes": report.count}
    for proj in ("w13", "w2"):
        scales = getattr(tensors, f"{proj}_scales").read_all()
        exps = scales[scales != E8M0_NAN].to(torch.int32) - E8M0_BIAS
        if exps.numel():
            figures[f"{proj}_scale_exp"] = {"min": int(exps.min()), "median": int(exps.median()),
                                            "max": int(exps.max())}
    exp_text = ", ".join(f"{p} exp {figures[k]['min']}..{figures[k]['max']}"
                         for p, k in (("w13", "w13_scale_exp"), ("w2", "w2_scale_exp")) if k in figures)
    if report.count:
        return CheckResult("format", layer, None, False, report.describe(), figures)
    return CheckResult("format", layer, None, True, f"dtypes and shapes match the config; no NaN scales; {exp_text}",
                       figures)


def _compare_region(problems: list[str], what: str, dest: torch.Tensor, src: torch.Tensor, fill: float) -> None:
    """dest's top-left must equal src exactly and everything else must equal `fill`."""
    region = tuple(slice(0, n) for n in src.shape)
    if dest.dim() != src.dim() or any(d < s for d, s in zip(dest.shape, src.shape)):
        problems.append(f"{what}: shard {tuple(dest.shape)} cannot hold checkpoint slice {tuple(src.shape)}")
        return
    if not torch.equal(dest[region], src.to(dest.dtype)):
        diff = (dest[region] != src.to(dest.dtype)).nonzero()
        problems.append(f"{what}: {diff.shape[0]} elements differ from the checkpoint, first at {tuple(diff[0].tolist())}")
    mask = torch.ones(dest.shape, dtype=torch.bool)
    mask[region] = False
    pad = dest[mask]
    if pad.numel() and not (pad == fill).all():
        problems.append(f"{what}: padding holds {int((pad != fill).sum())} values other than {fill}")


def check_shard(tensors, plan, weights) -> list[str]:
    """Compare one rank's loaded weights with the checkpoint, reading the rank's slices afresh.

    Independent of the loader's copy logic: it only uses the plan's ranges (which global experts,
    which intermediate blocks) and the documented padding fill. Returns the problems found.
    """
    from .loader import PAD_CHANNEL_SCALE
    problems: list[str] = []
    w = weights.to("cpu")
    rows, w2_blocks = plan.w13_rows, plan.w2_blocks_range
    for local, g in enumerate(plan.local_experts):
        e = slice(g, g + 1)
        tag = f"expert {g} (local {local})"
        src = tensors.w13_blocks.read(e, rows)[0]
        _compare_region(problems, f"w13_blocks {tag}", w.w13_blocks[local], src.reshape(src.shape[0], -1), 0)
        _compare_region(problems, f"w13_scales {tag}", w.w13_scales[local], tensors.w13_scales.read(e, rows)[0],
                        PAD_SCALE_E8M0)
        _compare_region(problems, f"w13_bias {tag}", w.w13_bias[local], tensors.w13_bias.read(e, rows)[0].float(), 0)
        src = tensors.w2_blocks.read(e, slice(None), w2_blocks)[0]
        _compare_region(problems, f"w2_blocks {tag}", w.w2_blocks[local], src.reshape(src.shape[0], -1), 0)
        _compare_region(problems, f"w2_scales {tag}", w.w2_scales[local],
                        tensors.w2_scales.read(e, slice(None), w2_blocks)[0], PAD_SCALE_E8M0)
        bias = tensors.w2_bias.read(e)[0].float()
        _compare_region(problems, f"w2_bias {tag}", w.w2_bias[local],
                        bias if plan.includes_w2_bias else torch.zeros_like(bias), 0)
        for proj, sel in (("w13", (e, rows)), ("w2", (e,))):
            ref = getattr(tensors, f"{proj}_channel_scale")
            got = getattr(w, f"{proj}_channel_scale")
            if (ref is None) != (got is None):
                problems.append(f"{proj}_channel_scale {tag}: present in {'checkpoint' if ref is not None else 'shard'} only")
            elif ref is not None:
                src = ref.read(*sel)[0].float()
                _compare_region(problems, f"{proj}_channel_scale {tag}", got[local], src.reshape(src.shape[0]),
                                PAD_CHANNEL_SCALE)
    _compare_region(problems, "router_weight", w.router_weight, tensors.router_weight.read_all().float(), 0)
    _compare_region(problems, "router_bias", w.router_bias, tensors.router_bias.read_all().float(), 0)
    if w.w2_bias_included != plan.includes_w2_bias:
        problems.append(f"w2_bias_included is {w.w2_bias_included} on {plan.describe()}")
    return problems


def check_coverage(plans, num_experts: int, inter: int) -> list[str]:
    """Every (expert, intermediate block) pair must be held by exactly one rank."""
    blocks = inter // BLOCK_SIZE
    count = torch.zeros(num_experts, blocks, dtype=torch.int32)
    for plan in plans:
        for g in plan.local_experts:
            count[g, plan.block_start:plan.block_stop] += 1
    problems = []
    if (count == 0).any():
        g, b = (count == 0).nonzero()[0].tolist()
        problems.append(f"{int((count == 0).sum())} (expert, block) pairs held by no rank, first expert {g} block {b}")
    if (count > 1).any():
        g, b = (count > 1).nonzero()[0].tolist()
        problems.append(f"{int((count > 1).sum())} (expert, block) pairs held twice, first expert {g} block {b}")
    return problems


def kernel_tolerance(dtype: torch.dtype, device: torch.device, backend: str) -> float:
    if dtype == torch.float32 and device.type == "cuda" and backend == "triton":
        return KERNEL_TOLERANCE_GPU_FLOAT32
    return KERNEL_TOLERANCE[dtype]


def check_oracle(layer_module, weights, x: torch.Tensor, config) -> CheckResult:
    """Our MoE block against transformers' GptOssMLP holding the same dequantized weights."""
    from .oracle import transformers_moe_forward
    ref = transformers_moe_forward(x, weights, config)
    got = layer_module(x.to(layer_module.compute_dtype)).float()
    err = _rel_err(got.cpu(), ref.cpu())
    tol = max(ORACLE_TOLERANCE, kernel_tolerance(layer_module.compute_dtype, x.device, layer_module.backend))
    return CheckResult("oracle", None, None, err <= tol,
                       f"transformers GptOssMLP vs ours: rel err {err:.2e} (<= {tol:.0e})",
                       {"rel_err": err, "tolerance": tol})


def measure_throughput(layer_module, tokens: int, hidden: int, device: torch.device, seed: int) -> CheckResult:
    """Median GPU time of the MoE layer's forward at `tokens` tokens (CUDA graph replay)."""
    import triton.testing
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=layer_module.compute_dtype)
    layer_module(x)
    torch.cuda.synchronize()
    try:
        ms = triton.testing.do_bench_cudagraph(lambda: layer_module(x), rep=200)
        method = "CUDA graph replay"
    except Exception:                      # a path that cannot be captured: eager timing instead
        ms = triton.testing.do_bench(lambda: layer_module(x), warmup=25, rep=200, return_mode="median")
        method = "eager"
    w = layer_module.weights
    flops = 2 * tokens * w.top_k * (2 * w.inter_pad * w.hidden_pad + w.hidden_pad * w.inter_pad)
    figures = {"tokens": tokens, "ms": ms, "tokens_per_s": tokens / ms * 1e3, "tflops": flops / ms / 1e9,
               "method": method}
    return CheckResult("throughput", None, None, True,
                       f"{tokens} tokens: {ms:.3f} ms ({method}), {tokens / ms * 1e3:,.0f} tokens/s, "
                       f"{flops / ms / 1e9:.1f} TFLOP/s", figures)


# ---- the run ------------------------------------------------------------------------------

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
    from .sharding import ShardPlan

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
        got = module(x_compute)
        err = _rel_err(got, ref_full)
        tol = kernel_tolerance(dtype, device, module.backend)
        max_abs = (got.double() - ref_full).abs().max().item() if got.numel() else 0.0
        results.append(CheckResult("kernels", layer, None, err <= tol,
                                   f"MoE layer ({module.backend}, {str(dtype).removeprefix('torch.')}) vs float64 "
                                   f"reference: rel err {err:.2e} (<= {tol:.0e}), max abs {max_abs:.2e}",
                                   {"rel_err": err, "max_abs_err": max_abs, "tolerance": tol,
                                    "backend": module.backend, "dtype": str(dtype), "tokens": args.tokens}))
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
            ref_err = _rel_err(ref_sum, ref_full)
            out_err = _rel_err(out_sum, ref_full)
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
        size = full.num_local_experts * full.hidden_pad * full.inter_pad * 3
        if size > ORACLE_MAX_EXPERTS_X_SIZE:
            results.append(CheckResult("oracle", None, None, True,
                                       f"model too large for the transformers oracle ({size:,} weights)", skipped=True))
        else:
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

    from . import distributed as D
    from .checkpoint import CheckpointError
    from .loader import load_layer
    from .moe import MXFP4MoE
    from .reference import reference_moe
    from .routing import route
    from .sharding import ShardPlan

    rank, world = dist.get_rank(), dist.get_world_size()
    rank0 = rank == 0
    cfg = ckpt.config
    layers = parse_layers(args.layers, cfg.num_layers)
    plans, full_plan = make_plans(args, cfg)
    results: list[CheckResult] = []
    progress = Progress(len(layers) * 4 + 2, progress_enabled and rank0)
    if rank0:
        coverage = check_coverage(plans, cfg.num_experts, cfg.intermediate_size)
        results.append(CheckResult("sharding", None, None, not coverage,
                                   "; ".join(coverage) or f"{len(plans)} ranks hold every (expert, block) exactly once",
                                   {"ranks": len(plans)}))
    first = None                    # (distributed layer, single-process module, full weights, x) of the first layer
    tol = None
    for layer in layers:
        progress.step(f"layer {layer}: format")
        if rank0:
            results.append(check_format(ckpt, layer))
        tensors = ckpt.layer(layer)
        g = torch.Generator(device="cpu").manual_seed(args.seed + layer)
        x = torch.randn(args.tokens, cfg.hidden_size, generator=g).to(device)
        x_compute = x.to(dtype)

        progress.step(f"layer {layer}: load shards")
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
        topk_weights, topk_ids = route(x_compute, moe.weights.router_weight, moe.weights.router_bias,
                                       cfg.experts_per_token)
        # Collectives need contiguous tensors: with H padded, the MoE's outputs are column views
        # of [T, H_pad] buffers, and torch 2.13's gloo reduces/broadcasts their storage without a
        # word (wrong values), so every tensor sent is made contiguous first.
        ref_sum = reference_moe(x_compute.double(), moe.weights, topk_weights, topk_ids, torch.float64).contiguous()
        dist.all_reduce(ref_sum)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peak_bytes, peak_kind = D.peak_memory(device)
        problems = check_shard(tensors, plan, moe.weights)

        progress.step(f"layer {layer}: single-process output")
        if rank0:
            full = load_layer(ckpt, layer, full_plan, device=device)
            ref_full = reference_moe(x_compute.double(), full, topk_weights, topk_ids, torch.float64).contiguous()
            module = MXFP4MoE(full, backend=args.backend, compute_dtype=dtype)
            single = module(x_compute).contiguous()
            err = _rel_err(single, ref_full)
            tol = kernel_tolerance(dtype, device, module.backend)
            max_abs = (single.double() - ref_full).abs().max().item() if single.numel() else 0.0
            results.append(CheckResult("kernels", layer, None, err <= tol,
                                       f"MoE layer ({module.backend}, {str(dtype).removeprefix('torch.')}) vs float64 "
                                       f"reference: rel err {err:.2e} (<= {tol:.0e}), max abs {max_abs:.2e}",
                                       {"rel_err": err, "max_abs_err": max_abs, "tolerance": tol,
                                        "backend": module.backend, "dtype": str(dtype), "tokens": args.tokens}))
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
                "hidden_pad": plan.hidden_pad, "vs_single_rel_err": _rel_err(y, single),
                "vs_reference_rel_err": _rel_err(y, ref_full), "ref_sum_rel_err": _rel_err(ref_sum, ref_full)}
        infos = D.gather_objects(info, device)

        progress.step(f"layer {layer}: consistency")
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

    progress.step("oracle")
    moe, module, full, x_compute = first
    if rank0 and args.oracle:
        size = full.num_local_experts * full.hidden_pad * full.inter_pad * 3
        if size > ORACLE_MAX_EXPERTS_X_SIZE:
            results.append(CheckResult("oracle", None, None, True,
                                       f"model too large for the transformers oracle ({size:,} weights)", skipped=True))
        else:
            results.append(check_oracle(module, full, x_compute, cfg))
    progress.step("throughput")
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
                   f"{_rank_label(plan)} on {info['device']}: {plan.num_local_experts} experts, I {plan.inter}->"
                   f"{plan.inter_pad}, H {plan.hidden}->{plan.hidden_pad}; exact, padding clean; read "
                   f"{info['bytes_read'] / 1e6:.2f} MB (= plan) in {info['load_s'] * 1e3:.0f} ms; {mem}")
        rows.append(CheckResult("sharding", layer, info["rank"], not problems, summary, figures))
    for info in infos:
        err, ref_err = info["vs_single_rel_err"], info["vs_reference_rel_err"]
        rows.append(CheckResult(
            "consistency", layer, info["rank"], err <= tol and ref_err <= tol,
            f"{_rank_label(plans[info['rank']])}: combined output vs single-process rel err {err:.2e}, "
            f"vs float64 reference {ref_err:.2e} (<= {tol:.0e})",
            {"single_rel_err": err, "reference_rel_err": ref_err, "tolerance": tol}))
    return rows


def _time_distributed(moe, single_module, tokens: int, hidden: int, device: torch.device, seed: int) -> dict:
    """Median CUDA-event time of the distributed forward (shard + all-reduce) on this rank, and on
    rank 0 of the single-GPU forward for comparison."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=moe.compute_dtype)

    def median_ms(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(DIST_TIMING_ITERS):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return sorted(times)[len(times) // 2]

    out = {"ms": median_ms(lambda: moe(x))}
    if single_module is not None:
        out["single_ms"] = median_ms(lambda: single_module(x))
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


def _main_torchrun(args, out, launch) -> int:
    """`main` under torchrun: one process per rank. Only rank 0 prints; every rank returns the
    same exit status."""
    import torch.distributed as dist

    from . import distributed as D
    from .checkpoint import CheckpointError, open_checkpoint

    rank0 = launch.rank == 0
    if not rank0:
        out = open(os.devnull, "w")

    def bad_input(message: str) -> int:
        if rank0:
            print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT

    builtin = args.checkpoint is None
    # Argument errors are the same on every rank: each leaves on its own, before any collective.
    try:
        _torchrun_layout(args, launch.world_size)
        args.align = parse_align(args.align or (BUILTIN_LAYOUT["align"] if builtin else "none"))
        device = D.rank_device(launch.local_rank, args.device)
        dtype = _resolve_compute(args, device, builtin)
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
                    from .synthetic import make_synthetic_checkpoint
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
            exit_code = None
            if rank0:
                exit_code = EXIT_CHECK_FAILED if any(not r.passed for r in results) else EXIT_OK
                if not args.quiet:
                    print(render(env, header, results), file=out)
                    print(file=out)
                print(summary_line(results), file=out)
                if args.json_path:
                    _write_json(args.json_path, env, header, results, exit_code)
            return D.broadcast_object(exit_code, device=device if device.type == "cuda" else None)
    finally:
        if not rank0:
            out.close()
        dist.destroy_process_group()


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
            return _main_torchrun(args, out, launch)
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
