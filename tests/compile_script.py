"""For tests that compile kernels for sm_90 on the CPU: run a Python script in a fresh process
without TRITON_INTERPRET (the interpreter replaces triton.jit, so nothing would compile)."""

import os
import subprocess
import sys


def run_compiler_script(*argv: str) -> str:
    """`python argv...` (e.g. "-c", script, args or "-m", module) with TRITON_INTERPRET unset;
    fails the test with the end of stderr unless it exits 0; returns stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
