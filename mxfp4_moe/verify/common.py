"""What `python -m mxfp4_moe.verify` shares between its single-process run (`cli.py`) and its
torchrun mode (`torchrun.py`): exit codes, the built-in checkpoint, argument parsing
helpers, the rank plans and the report (table, summary line, JSON).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__, kernel_api
from .checks import CheckResult

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
REPORT_SCHEMA = "mxfp4_moe.verify/1"

# The built-in checkpoint: small, seeded, with sizes that leave padding at every rank under the
# default layout (I = 11 blocks: TP 2 gives 6 and 5 blocks, padded to 192 by the Triton preset); with
# a tiny model's dense weights around the MoE layers, so `--model` can check it whole.
BUILTIN_CHECKPOINT = dict(num_layers=2, num_experts=8, hidden=288, intermediate=352, top_k=4, seed=0,
                          full_model=True)
BUILTIN_LAYOUT = dict(tp=2, ep=2, align="triton")

# Bounds on the arguments, checked before anything is read or built: each is far above what a
# check needs (gpt-oss: H 2880 padded to 3072, a few thousand tokens, 8 ranks) and far below
# what would exhaust a machine's memory by itself.
MAX_TOKENS = 65536
MAX_PADDED_SIZE = 131072
MAX_RANKS = 1024
MAX_LAYER_INDEX = 2 ** 31 - 1
MAX_SEED = 2 ** 63 - 1
_LAYER_PART = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class UsageError(Exception):
    """Bad input, the command line's or the checkpoint's: reported in one line, exit status 2."""


def one_line(message: str) -> str:
    """`message` with every control character escaped (a newline as \\n, a carriage return as
    \\r, ...): an error is one line, whatever a path or argument in it holds."""
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
                   for ch in message)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 rank', '2 ranks' ('1 NaN scale byte', '3 NaN scale bytes')."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


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


def parse_layer_spec(spec: str) -> list[tuple[int, int]]:
    """'0,2,5-7' -> [(0, 0), (2, 2), (5, 7)], read without expanding a range. Raises UsageError."""
    if len(spec) > 1000:
        raise UsageError(f"--layers: expected a list like 0,2,5-7, found {len(spec)} characters")
    ranges = []
    for part in spec.split(","):
        m = _LAYER_PART.match(part)
        if not m:
            raise UsageError(f"--layers: cannot read {part.strip()[:40]!r}; expected a list like 0,2,5-7")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo or hi > MAX_LAYER_INDEX:
            raise UsageError(f"--layers: {part.strip()!r} is no range of layers (expected lo-hi with "
                             f"lo <= hi <= {MAX_LAYER_INDEX})")
        ranges.append((lo, hi))
    return ranges


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; None -> every layer. Raises UsageError when out of range
    (checked on the ranges, before any is expanded)."""
    if spec is None:
        return list(range(num_layers))
    ranges = parse_layer_spec(spec)
    bad = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges if hi >= num_layers]
    if bad:
        raise UsageError(f"--layers {spec}: layer(s) {', '.join(bad)} out of range; the checkpoint has "
                         f"layers 0..{num_layers - 1}")
    return sorted({i for lo, hi in ranges for i in range(lo, hi + 1)})


def check_arguments(args) -> None:
    """Bounds of every numeric argument, the --layers syntax and the --json path, checked before
    anything is read or built. Raises UsageError naming the argument."""
    def bounded(name: str, value, lo: int, hi: int) -> None:
        if value is not None and not lo <= value <= hi:
            raise UsageError(f"--{name} must be in [{lo}, {hi}], got {value}")

    bounded("tp", args.tp, 1, MAX_RANKS)
    bounded("ep", args.ep, 1, MAX_RANKS)
    if (args.tp or 1) * (args.ep or 1) > MAX_RANKS:
        raise UsageError(f"--tp {args.tp} x --ep {args.ep} = {(args.tp or 1) * (args.ep or 1)} ranks: "
                         f"expected at most {MAX_RANKS}")
    bounded("rank", args.rank, 0, MAX_RANKS - 1)
    bounded("tokens", args.tokens, 1, MAX_TOKENS)
    bounded("bench-tokens", args.bench_tokens, 1, MAX_TOKENS)
    bounded("hidden-pad", args.hidden_pad, 1, MAX_PADDED_SIZE)
    bounded("seed", args.seed, 0, MAX_SEED)
    if args.layers is not None:
        parse_layer_spec(args.layers)
    if args.json_path is not None:
        check_json_path(args.json_path)


def parse_device(spec: str | None):
    """--device: cpu, cuda or cuda:N (N an existing GPU) -> torch.device; None -> cuda when
    available, else cpu. Raises UsageError for anything else (meta, a typo, a missing GPU)."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {spec}: not a device name (cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec}: expected cpu or cuda (cuda:N), found a {device.type!r} device")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {plural(torch.cuda.device_count(), 'CUDA GPU')}")
    return device


def check_json_path(json_path: str) -> None:
    """--json must name a file that can be written: its folder exists, and it is no folder."""
    path = Path(json_path)
    folder = path.parent
    if path.is_dir():
        raise UsageError(f"--json {json_path}: is a directory; expected a file name")
    if not folder.is_dir():
        raise UsageError(f"--json {json_path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--json {json_path}: the folder {folder} is not writable")


def parse_align(spec: str):
    """'triton' (a preset) or 'H,I' (two integers) -> what ShardPlan.create takes."""
    from ..sharding import ALIGN_PRESETS
    if "," in spec:
        try:
            h_align, i_align = (int(p) for p in spec.split(","))
        except ValueError:
            raise UsageError(f"--align {spec}: expected a preset ({', '.join(ALIGN_PRESETS)}) or two integers H,I") from None
        if not (1 <= h_align <= MAX_PADDED_SIZE and 1 <= i_align <= MAX_PADDED_SIZE):
            raise UsageError(f"--align {spec}: expected two alignments in [1, {MAX_PADDED_SIZE}]")
        return (h_align, i_align)
    if spec not in ALIGN_PRESETS:
        raise UsageError(f"--align {spec}: unknown preset; choose one of {', '.join(ALIGN_PRESETS)} or give H,I")
    return spec

def make_plans(args, cfg):
    """Every rank's ShardPlan (ordered ep-major, as global ranks are) and the unsharded plan with
    the same padding. A layout the checkpoint cannot take is a usage error (exit 2)."""
    from ..sharding import ShardPlan
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
        args.backend = "triton" if kernels_here and kernel_api.triton_installed() else "torch"
    if args.backend == "triton" and not kernel_api.triton_installed():
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
        write_json(args.json_path, env, header, results, exit_code)
    return exit_code


def _check_json(result: CheckResult) -> dict:
    row = asdict(result) | {"status": result.status}
    if result.skipped:
        row["passed"] = None        # a check that did not run neither passed nor failed
    return row


def _strict(value):
    """`value` with every non-finite float written as the string "NaN", "Infinity" or
    "-Infinity": strict JSON has no such numbers (json.dumps would write bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(json_path, env: dict | None, header: dict | None, results: list[CheckResult], exit_code: int,
               error: str | None = None) -> None:
    """Write the report (strict JSON) to a temporary file in the same folder, then rename it over
    `json_path`: a full disk or a crash leaves the old report or none, never half of one."""
    report = {"schema": REPORT_SCHEMA, "environment": env, "checkpoint": header,
              "checks": [_check_json(r) for r in results],
              "summary": {"passed": sum(r.passed and not r.skipped for r in results),
                          "failed": sum(not r.passed for r in results),
                          "skipped": sum(r.skipped for r in results)},
              "exit_code": exit_code, "error": error}
    text = json.dumps(_strict(report), indent=2, allow_nan=False) + "\n"
    path = Path(json_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_error_json(json_path: str | None, message: str) -> None:
    """The report of a run that ended in exit status 2: no checks, the error's line. Written
    only where --json names a writable place (a report about the --json path itself cannot be)."""
    if not json_path:
        return
    env = environment(torch.device("cpu")) | {"device": None}
    try:
        check_json_path(json_path)
        write_json(json_path, env, None, [], EXIT_BAD_INPUT, error=message)
    except (UsageError, OSError):
        pass
