"""benchmarks.bench_model_torchrun (the whole model under torchrun, issue 31 item 1) at its
CPU size over gloo: TP 2 gives the single-process logits within the float32 bound, the same
greedy ids, and each rank reads exactly its plan's bytes. The layouts themselves (TP 2, EP 2,
TP 2 x EP 2) are checked against transformers' model in test_transformers_model; this keeps the
script a multi-GPU session runs working."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the whole model needs Hugging Face transformers")

ROOT = Path(__file__).parents[1]


def test_tiny_model_tp2_on_gloo(tmp_path):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.bench_model_torchrun", "--tiny", "--device", "cpu", "--nproc", "2",
           "--tp", "2", "--batches", "1", "--decode-steps", "1", "--warmup", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "bench_model_torchrun_tp2_ep1.json").read_text())
    assert data["passed"] and data["logits_rel_err"] <= data["bound"] and data["identical_on_ranks"]
    assert data["greedy_equal"]
    assert [r["rank"] for r in data["ranks"]] == [0, 1]
    for r in data["ranks"]:
        assert r["bytes_read"] == r["planned_bytes"] > 0
    assert [d["batch"] for d in data["decode"]] == [1]
