"""`model.generate()` as a user calls it, on a model `load_model` builds: load_model's default (on
CUDA, a static KV cache sized from length buckets, which transformers compiles: `integrations/
generation.py`) against `fast_generate=False` (transformers' dynamic cache, eager). Per batch size:
the first call (the compile, for the default), the same call again (ms per new token), a call of
another length within the same bucket (no new compile expected) and the time to the first token;
then the first call in a second process, which reads torch's compile caches the first one wrote.
A gpt-oss-20b-shaped model with random weights (bench_model's writer) unless --checkpoint is given.

    python -m benchmarks.bench_generate --out DIR [--layers 24] [--batches 1 8] [--new-tokens 128]
    python -m benchmarks.bench_generate --tiny --out DIR       # the pipeline at CPU sizes (no compile)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_model import SHAPES, sync, write_random_checkpoint
from benchmarks.common import git_commit

MODES = {"default": None, "eager": False}      # load_model(fast_generate=...)


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds for one greedy generate() of `new_tokens` tokens."""
    sync(ids.device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    sync(ids.device)
    return time.perf_counter() - start


def prompt_ids(model, batch: int, prompt: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen).to(device)


def measure(path: Path, mode: str, args, device: torch.device) -> dict:
    from mxfp4_moe.integrations.transformers import load_model
    start = time.perf_counter()
    model = load_model(path, device=device, dtype=args.dtype, progress=False, fast_generate=MODES[mode],
                       backend=args.backend)
    row = {"mode": mode, "load_s": time.perf_counter() - start, "batches": []}
    for batch in args.batches:
        ids = prompt_ids(model, batch, args.prompt, device)
        first = timed_generate(model, ids, args.new_tokens)
        again = timed_generate(model, ids, args.new_tokens)
        other = timed_generate(model, ids, args.new_tokens // 2 + 7)
        to_first = timed_generate(model, ids, 1)
        row["batches"].append({"batch": batch, "first_call_s": first, "again_s": again,
                               "ms_per_token": again * 1e3 / args.new_tokens,
                               "tokens_per_s": batch * args.new_tokens / again,
                               "other_length_s": other, "time_to_first_token_ms": to_first * 1e3})
        print(json.dumps({"mode": mode, **row["batches"][-1]}), flush=True)
    return row


def second_process_first_call(path: Path, args) -> dict:
    """The default mode's first call at the first batch size, in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.bench_generate", "--child", "--checkpoint", str(path),
           "--batches", str(args.batches[0]), "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt),
           "--dtype", str(args.dtype).removeprefix("torch."), "--backend", args.backend]
    if args.tiny:
        cmd.append("--tiny")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**child, "process_s": time.perf_counter() - start}


def table(results: dict) -> str:
    lines = ["| mode | batch | first call s | again s | ms / new token | tokens/s | other length s | first token ms |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["modes"]:
        for b in row["batches"]:
            lines.append(f"| {row['mode']} | {b['batch']} | {b['first_call_s']:.2f} | {b['again_s']:.3f} | "
                         f"{b['ms_per_token']:.2f} | {b['tokens_per_s']:.1f} | {b['other_length_s']:.3f} | "
                         f"{b['time_to_first_token_ms']:.1f} |")
    second = results.get("second_process")
    if second:
        lines.append("")
        lines.append(f"second process, default mode, first call: {second}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--checkpoint", type=Path, default=None, help="a full-model checkpoint (default: write one)")
    p.add_argument("--layers", type=int, default=24, help="layers of the written 20b-shaped model")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_generate"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 with --tiny")
    p.add_argument("--backend", default="auto")
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the pipeline, times nothing")
    p.add_argument("--no-second-process", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_generate needs a CUDA GPU (or --tiny for the CPU-sized pipeline)", file=sys.stderr)
        return 2
    if args.child:
        from mxfp4_moe.integrations.transformers import load_model
        model = load_model(args.checkpoint, device=device, dtype=args.dtype, progress=False, backend=args.backend)
        seconds = timed_generate(model, prompt_ids(model, args.batches[0], args.prompt, device), args.new_tokens)
        print(json.dumps({"batch": args.batches[0], "first_call_s": seconds}))
        return 0
    path = args.checkpoint
    if path is None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        if args.tiny:
            from mxfp4_moe.synthetic import make_synthetic_checkpoint
            path = make_synthetic_checkpoint(args.workdir / "tiny", full_model=True, num_layers=2, num_experts=4,
                                             hidden=64, intermediate=64, top_k=2)
        else:
            path = args.workdir / f"gpt-oss-20b-{args.layers}l"
            if not (path / "config.json").exists():
                write_random_checkpoint(path, SHAPES["20b"], args.layers, device, seed=0)
    results = {"header": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          "torch": torch.__version__, "commit": git_commit(), "checkpoint": str(path),
                          "prompt": args.prompt, "new_tokens": args.new_tokens,
                          "command": "python -m benchmarks.bench_generate " + " ".join(argv or sys.argv[1:])},
               "modes": []}
    for mode in MODES:
        results["modes"].append(measure(path, mode, args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_second_process:
        results["second_process"] = second_process_first_call(path, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "out_generate.json").write_text(json.dumps(results, indent=1))
    print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
