"""Compile every kernel config the defaults can pick for sm_90, on the CPU, under several Triton
releases, and tabulate registers and spills per release: does each supported Triton compile our
kernels, and what does it make of them?

    python -m benchmarks.compile_matrix --triton 3.6.0= --triton 3.9.0=/path/to/triton-3.9.0 --out DIR

Each `--triton VERSION=PATH` names a folder holding that release's `triton` package (for example
`pip install --no-deps --target PATH triton==VERSION`), put first on PYTHONPATH; an empty PATH
means the Triton installed beside this Python. Per release it runs `mxfp4_moe.kernels.tools.sm90_report`
twice in a fresh process: the gpt-oss default configs (registers, spills, HGMMA count) and
`--small-shapes` (every default config at small H and I). Writes compile_matrix.json and
compile_matrix.md to --out and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _run_report(path: str, *args: str) -> tuple[list[dict], str, int]:
    """sm90_report's JSON lines under the Triton at `path` (or the installed one), its stderr's
    end and its exit status."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH", "")) if p)
    probe = [sys.executable, "-c", "import triton; print(triton.__version__)"]
    version = subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.run([sys.executable, "-m", "mxfp4_moe.kernels.tools.sm90_report", *args], env=env,
                          capture_output=True, text=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for line in lines:
        line["triton"] = version
    return lines, proc.stderr[-2000:], proc.returncode


def _markdown(results: dict[str, dict]) -> str:
    versions = list(results)
    out = ["| gpt-oss default config | " + " | ".join(f"Triton {v}: regs / spill B" for v in versions) + " |",
           "|---|" + "---|" * len(versions)]
    names = list(dict.fromkeys(line["variant"] for r in results.values() for line in r["defaults"]))
    for name in names:
        cells = []
        for v in versions:
            line = next((x for x in results[v]["defaults"] if x["variant"] == name), None)
            cells.append("missing" if line is None else f"{line['registers']} / {line['local_bytes']}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "| small shapes (`--small-shapes`) | " + " | ".join(f"Triton {v}" for v in versions) + " |",
            "|---|" + "---|" * len(versions)]
    summary = {"configs compiled": [], "failed": [], "max registers": [], "configs with spills": []}
    for v in versions:
        small = results[v]["small_shapes"]
        ok = [x for x in small if "error" not in x]
        summary["configs compiled"].append(str(len(ok)))
        summary["failed"].append(str(len(small) - len(ok)))
        summary["max registers"].append(str(max((x["registers"] for x in ok), default=0)))
        summary["configs with spills"].append(str(sum(x["local_bytes"] > 0 for x in ok)))
    out += [f"| {key} | " + " | ".join(cells) + " |" for key, cells in summary.items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", action="append", required=True, metavar="VERSION=PATH",
                        help="a Triton release and the folder holding its package (empty: the installed one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    results, failed = {}, False
    for spec in args.triton:
        expected, _, path = spec.partition("=")
        defaults, err_d, rc_d = _run_report(path)
        small, err_s, rc_s = _run_report(path, "--small-shapes")
        found = {line["triton"] for line in defaults + small}
        if found != {expected}:
            raise SystemExit(f"compile_matrix: asked for Triton {expected} at {path or 'the installed one'}, "
                             f"found {sorted(found)} (stderr: {err_d or err_s})")
        results[expected] = {"defaults": defaults, "small_shapes": small, "exit_codes": [rc_d, rc_s]}
        if rc_d or rc_s:
            failed = True
            print(f"Triton {expected}: sm90_report exited {rc_d} / {rc_s}:\n{err_d}\n{err_s}", file=sys.stderr)
        print(f"Triton {expected}: {len(defaults)} default and {len(small)} small-shape compiles", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_matrix.json").write_text(json.dumps(results, indent=1))
    table = _markdown(results)
    (args.out / "compile_matrix.md").write_text(table)
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
