"""Every benchmark and probe starts on a CPU: `python -m benchmarks.<name> --help` imports the
script and its shared helpers (benchmarks.common) and builds its argument parser, so a broken
import or a helper moved away fails here rather than on a lent GPU."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "benchmarks" / "probes").glob("*.py")]
                 if p.name not in ("__init__.py", "common.py"))
# Scripts with no argument parser: importing them is the check.
NO_PARSER = {"ncu_top_stalls": "reads Nsight Compute's CSV from stdin and takes no options"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def needs_triton(path: Path) -> bool:
    """Whether the script imports Triton at its top, itself or through another benchmark module
    (the Triton kernels, mxfp4_moe.kernels, count as Triton)."""
    for node in ast.parse(path.read_text()).body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            if name.split(".")[0] == "triton" or name.startswith("mxfp4_moe.kernels"):
                return True
            other = ROOT / Path(*name.split(".")).with_suffix(".py")
            if name.startswith("benchmarks.") and other.exists() and other != path and needs_triton(other):
                return True
    return False


@pytest.mark.slow           # each imports torch in a fresh process: 3-5 s on 2 cores
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_parses_help(script):
    if importlib.util.find_spec("triton") is None and needs_triton(script):
        pytest.skip(f"{script.name} imports Triton at its top and Triton is not installed")
    if script.stem in NO_PARSER:
        cmd = [sys.executable, "-c", f"import {module_name(script)}"]
    else:
        cmd = [sys.executable, "-m", module_name(script), "--help"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    if script.stem not in NO_PARSER:
        assert proc.stdout.startswith("usage: "), proc.stdout[:500]


def test_no_script_reaches_into_another_by_sys_path():
    # One way to reach the shared helpers: `from benchmarks.common import ...` (or a runner by its
    # module name), never a path pushed onto sys.path.
    for script in SCRIPTS:
        assert "sys.path" not in script.read_text(), script
