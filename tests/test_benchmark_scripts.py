"""Every benchmark and probe starts on a CPU: `python -m benchmarks.<name> --help` imports the
script and its shared helpers (benchmarks.common) and builds its argument parser, so a broken
import or a helper moved away fails here rather than on a lent GPU."""

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


@pytest.mark.slow           # each imports torch in a fresh process: 3-5 s on 2 cores
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_parses_help(script):
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
