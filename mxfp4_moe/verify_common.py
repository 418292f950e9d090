"""What `python -m mxfp4_moe.verify` shares between its single-process run (`verify.py`) and its
torchrun mode (`verify_torchrun.py`): exit codes, the built-in checkpoint, argument parsing
helpers, the rank plans and the report (table, summary line, JSON).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from . import __version__, kernel_api
from .checks import CheckResult
from .moe import triton_installed

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
REPORT_SCHEMA = "mxfp4_moe.verify/1"

# The built-in checkpoint: small, seeded, with sizes that leave padding at every rank under the
# default layout (I = 11 blocks: TP 2 gives 6 and 5 blocks, padded to 192 by the Triton preset); with
# a tiny model's dense weights around the MoE layers, so `--model` can check it whole.
BUILTIN_CHECKPOINT = dict(num_layers=2, num_experts=8, hidden=288, intermediate=352, top_k=4, seed=0,
                          full_model=True)
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
            "triton_interpreter": kernel_api.interpreting()}


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


def rank_label(plan) -> str:
    return f"tp{plan.tp_rank}/ep{plan.ep_rank}"

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

def resolve_compute(args, device: torch.device, builtin: bool) -> torch.dtype:
    """Settle args.backend for `device` and return the compute dtype (raises UsageError)."""
    if args.backend == "auto":
        # On a CPU the built-in checkpoint is small enough to check the Triton kernels themselves,
        # through Triton's interpreter (one to two minutes on 2 cores).
        kernels_here = device.type == "cuda" or builtin
        args.backend = "triton" if kernels_here and triton_installed() else "torch"
    if args.backend == "triton" and not triton_installed():
        raise UsageError("--backend triton needs Triton, which is not installed: "
                         "pip install 'triton>=3.6,<3.10' (Linux), or use --backend torch")
    if args.backend == "triton" and device.type != "cuda":
        # Triton kernels on a CPU run through Triton's interpreter, which must be switched on
        # before the kernels are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype == torch.bfloat16 and device.type != "cuda" and args.backend == "triton":
        raise UsageError("--dtype bfloat16 with --backend triton needs a GPU: Triton's interpreter has no bf16 "
                         "(it stores bf16 as raw uint16); use float32 or float16 on a CPU")
    return dtype

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
