"""Load time and peak host memory of `load_layer` for one rank of a gpt-oss-120b-size layer
(E = 128, H = I = 2880), beside safetensors alone reading the same bytes.

    python -m benchmarks.bench_loader [--dir /tmp/mxfp4_bench_120b] [--repeats 3]
                                    [--out benchmarks/out/results_loader.md]

Every measurement runs in a fresh child process, so its peak RSS is its own. Peak memory is
reported two ways: ru_maxrss (all resident pages, including the file pages safetensors maps
while reading) and the peak of RssAnon sampled every millisecond (the process's own allocations:
the rank's tensors plus the loader's temporaries). The page cache cannot be dropped here (no
root), so the file is read once before timing: every figure is for a cached file.
The checkpoint holds random bytes (codes and finite scale bytes): the loader's work does not
depend on the values, and writing it is much faster than quantizing 128 experts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import git_commit

# The checkout holding this file: the measuring children import this module from it.
ROOT = Path(__file__).resolve().parents[1]
E, H, I = 128, 2880, 2880
NOTES_MARKER = "<!-- notes: kept when the benchmark rewrites this file -->"
CASES = [  # (tp_size, tp_rank, align)
    (1, 0, "none"),            # no padding: 2880 is a multiple of 32 (and of 64: "triton" is the same)
    (1, 0, "marlin"),          # H 2880 -> 3072
    (4, 0, "none"),            # 736 per rank, no padding on rank 0
    (4, 0, "triton"),          # 736 -> 768
    (4, 3, "triton"),          # the last rank: 672 -> 768
    (4, 3, "marlin"),          # 672 -> 768 and H 2880 -> 3072
]


# ---- the child: one measurement ----------------------------------------------------------------

def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class _AnonPeak:
    """Samples RssAnon every millisecond in a thread; `peak` is the largest value seen."""

    def __init__(self):
        self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_anon())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


class _NoSampler:
    peak = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def child(args) -> None:
    import torch
    from safetensors import safe_open

    from mxfp4_moe.checkpoint import open_checkpoint
    from mxfp4_moe.loader import load_layer
    from mxfp4_moe.sharding import ShardPlan

    torch.set_num_threads(args.threads)
    checkpoint = open_checkpoint(args.dir)
    plan = ShardPlan.create(num_experts=E, hidden=H, inter=I, tp_size=args.tp, tp_rank=args.rank, align=args.align)
    layer = checkpoint.layer(0)
    # Warm-up, untimed and the same for both modes: open the file handles (the reader's and
    # safetensors' own) and run torch's first copy, so the timing holds the steady-state work
    # of loading a layer, not one-off process start-up costs.
    layer.router_bias.read().float()
    handles = {file: safe_open(str(file), "pt") for file in checkpoint.files}
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base_anon = _rss_anon()
    keep = []
    # The sampler thread competes for the 2 cores: timed runs go without it (`--sample` off),
    # memory runs with it.
    with (_AnonPeak() if args.sample else _NoSampler()) as anon:
        start = time.perf_counter()
        if args.mode == "load":
            w = load_layer(checkpoint, 0, plan, max_read_bytes=args.max_read_bytes)
            nbytes = w.bytes_read
            held = sum(t.numel() * t.element_size() for t in w.__dict__.values() if isinstance(t, torch.Tensor))
        else:
            # safetensors alone: one get_slice per tensor and range of the plan, results kept.
            nbytes = 0
            for role, indexes in plan.read_ranges().items():
                ref = getattr(layer, role)
                if ref is None:
                    continue
                handle = handles[ref.file]
                for index in indexes:
                    # get_slice hands back a view into safetensors' memory map: clone() is the
                    # read, one copy of the selected bytes from the (cached) file into our memory.
                    t = handle.get_slice(ref.name)[index].clone(memory_format=torch.contiguous_format)
                    keep.append(t)
                    nbytes += t.numel() * t.element_size()
            held = nbytes
        seconds = time.perf_counter() - start
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "bytes_read": nbytes, "held_bytes": held,
                      "maxrss": maxrss, "base_maxrss": base_maxrss,
                      "peak_anon": anon.peak, "base_anon": base_anon}))


# ---- the parent ---------------------------------------------------------------------------------

def make_checkpoint(folder: Path) -> None:
    import torch

    from mxfp4_moe.checkpoint import MoEConfig
    from mxfp4_moe.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK
    from mxfp4_moe.synthetic import LayerWeights, write_checkpoint

    g = torch.Generator().manual_seed(0)
    config = MoEConfig(num_layers=1, num_experts=E, experts_per_token=4, hidden_size=H, intermediate_size=I)
    u8 = dict(dtype=torch.uint8, generator=g)
    layer = LayerWeights(
        w13_blocks=torch.randint(0, 256, (E, 2 * I, H // BLOCK_SIZE, BYTES_PER_BLOCK), **u8),
        w13_scales=torch.randint(118, 136, (E, 2 * I, H // BLOCK_SIZE), **u8),
        w2_blocks=torch.randint(0, 256, (E, H, I // BLOCK_SIZE, BYTES_PER_BLOCK), **u8),
        w2_scales=torch.randint(118, 136, (E, H, I // BLOCK_SIZE), **u8),
        w13_bias=torch.randn(E, 2 * I, generator=g), w2_bias=torch.randn(E, H, generator=g),
        router_weight=torch.randn(E, H, generator=g), router_bias=torch.randn(E, generator=g))
    write_checkpoint(folder, config, [layer])


def warm_cache(folder: Path) -> int:
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total


def run_child(argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_loader", "--child", *argv], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/mxfp4_bench_120b"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-read-bytes", type=int, default=None,
                        help="the loader's chunk size (default: the loader's default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "results_loader.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in the measured processes (default 1: on a shared "
                             "2-core machine, 2 threads make every torch op wait at OpenMP barriers "
                             "whenever another process holds a core, which swamps the timings)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("load", "raw"), default="load", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--align", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--sample", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import safetensors
    import torch

    from mxfp4_moe.loader import DEFAULT_MAX_READ_BYTES

    max_read = args.max_read_bytes or DEFAULT_MAX_READ_BYTES
    if not (args.dir / "config.json").is_file():
        print(f"writing a {E}-expert H = I = {H} layer to {args.dir} ...", flush=True)
        make_checkpoint(args.dir)
    file_bytes = warm_cache(args.dir)
    warm_cache(args.dir)
    rows = []
    for tp, rank, align in CASES:
        common = ["--threads", str(args.threads), "--dir", str(args.dir), "--tp", str(tp), "--rank", str(rank), "--align", align,
                  "--max-read-bytes", str(max_read)]
        runs = {mode: [] for mode in ("raw", "load")}
        for _ in range(args.repeats):           # interleaved, so drifting load hits both alike
            for mode in runs:
                runs[mode].append(run_child(["--mode", mode, *common]))
        mem = {mode: run_child(["--mode", mode, "--sample", *common]) for mode in runs}
        med = {mode: statistics.median(r["seconds"] for r in runs[mode]) for mode in runs}
        load, raw = runs["load"][0], runs["raw"][0]
        assert load["bytes_read"] == raw["bytes_read"], (load["bytes_read"], raw["bytes_read"])
        row = dict(
            case=f"TP {tp} rank {rank}, {align}", bytes_read=load["bytes_read"], held=load["held_bytes"],
            raw_s=med["raw"], load_s=med["load"], ratio=med["load"] / med["raw"],
            raw_spread=(min(r["seconds"] for r in runs["raw"]), max(r["seconds"] for r in runs["raw"])),
            load_spread=(min(r["seconds"] for r in runs["load"]), max(r["seconds"] for r in runs["load"])),
            load_anon=mem["load"]["peak_anon"] - mem["load"]["base_anon"],
            raw_anon=mem["raw"]["peak_anon"] - mem["raw"]["base_anon"],
            load_maxrss=mem["load"]["maxrss"] - mem["load"]["base_maxrss"],
        )
        rows.append(row)
        print(f"{row['case']:28s} read {row['bytes_read'] / 2**20:8.1f} MiB  raw {row['raw_s']:.3f} s  "
              f"load {row['load_s']:.3f} s  ({row['ratio']:.2f}x)  peak anon +{row['load_anon'] / 2**20:.0f} MiB "
              f"(held {row['held'] / 2**20:.0f} MiB)", flush=True)

    mib = 2 ** 20
    lines = [
        "# Loader benchmark: one rank of a gpt-oss-120b-size layer",
        "",
        f"- command: `python -m benchmarks.bench_loader --repeats {args.repeats} --threads {args.threads}"
        + (f" --max-read-bytes {args.max_read_bytes}" if args.max_read_bytes else "") + "`",
        f"- commit: {git_commit()} (plus the working tree at the time of the run)",
        f"- machine: {os.cpu_count()} CPU cores ({_cpu_model()}), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU; "
        f"load average at the end {os.getloadavg()[0]:.1f} (the cores are shared with other work)",
        f"- python {platform.python_version()}, torch {torch.__version__} "
        f"({args.threads} intra-op thread(s) in the measured processes, `--threads`), "
        f"safetensors {safetensors.__version__}",
        f"- layer: E = {E}, H = I = {H}, random MXFP4 bytes, bf16 biases and router; file "
        f"{file_bytes / mib:.0f} MiB, **cached** (read twice before timing; the page cache cannot be dropped here)",
        f"- loader chunk (max_read_bytes): {max_read / mib:.0f} MiB; each figure is the median of "
        f"{args.repeats} fresh child processes (min-max in brackets)",
        "- raw = safetensors `get_slice` alone over the plan's read ranges (one call per tensor and expert run), "
        "each result cloned into process memory and kept (get_slice returns a view into safetensors' memory "
        "map, so the clone is the read: one copy, the least any reader can do); load = `open_checkpoint` already done, then `load_layer` (allocate the padded tensors, "
        "read, copy, fill padding)",
        "- peak anon = peak RssAnon (sampled every 1 ms, in one extra untimed run per case) minus its value "
        "before the call: the process's own "
        "memory. ru_maxrss also counts the file pages safetensors maps while reading (page cache, not "
        "allocations); it is shown for completeness",
        "",
        "| case | bytes read (MiB) | rank tensors (MiB) | raw read (s) | load_layer (s) | load / raw | "
        "peak anon, load (MiB) | peak anon, raw (MiB) | load extra over rank tensors (MiB) | ru_maxrss delta, load (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['bytes_read'] / mib:.1f} | {r['held'] / mib:.1f} | "
            f"{r['raw_s']:.3f} [{r['raw_spread'][0]:.3f}-{r['raw_spread'][1]:.3f}] | "
            f"{r['load_s']:.3f} [{r['load_spread'][0]:.3f}-{r['load_spread'][1]:.3f}] | {r['ratio']:.2f}x | "
            f"{r['load_anon'] / mib:.0f} | {r['raw_anon'] / mib:.0f} | {(r['load_anon'] - r['held']) / mib:.0f} | "
            f"{r['load_maxrss'] / mib:.0f} |")
    # Hand-written notes below the marker survive a re-run.
    notes = ""
    if args.out.is_file() and NOTES_MARKER in args.out.read_text():
        notes = args.out.read_text().split(NOTES_MARKER, 1)[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + notes)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
