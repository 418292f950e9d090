"""Without Triton (it is a dependency on Linux only): reading, sharding, the torch backend,
`verify --backend torch` and `load_model(..., backend="torch")` still work, and asking for the
Triton kernels says how to install them. Each case runs in a child interpreter where `import
triton` fails, as it does where Triton is not installed (CI also runs this file in an environment
that lacks Triton)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# The path finder, told to find nothing named triton: `import triton` then fails and
# importlib.util.find_spec("triton") is None, exactly as where the package is not installed.
BLOCK_TRITON = textwrap.dedent("""
    import importlib.machinery, sys
    class _PathFinderWithoutTriton(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] == "triton":
                return None
            return super().find_spec(name, path, target)
    sys.meta_path = [_PathFinderWithoutTriton if finder is importlib.machinery.PathFinder else finder
                     for finder in sys.meta_path]
""")


def run_without_triton(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    script = BLOCK_TRITON + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)


def test_triton_is_blocked_in_the_child():
    proc = run_without_triton("""
        import importlib.util
        assert importlib.util.find_spec("triton") is None
        try:
            import triton
        except ModuleNotFoundError:
            print("blocked")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "blocked"


def test_torch_backend_layer_and_loader_run_without_triton(tmp_path):
    proc = run_without_triton("""
        import sys, torch
        from mxfp4_moe import MXFP4MoE, ShardPlan, load_layer, make_synthetic_checkpoint, open_checkpoint, reference_moe
        from mxfp4_moe.routing import route
        path = make_synthetic_checkpoint(sys.argv[1], num_layers=1, num_experts=4, hidden=64, intermediate=96,
                                         top_k=2, seed=3)
        with open_checkpoint(path) as ckpt:
            plan = ShardPlan.create(num_experts=4, hidden=64, inter=96, tp_size=2, tp_rank=1, align="triton")
            weights = load_layer(ckpt, 0, plan)
        layer = MXFP4MoE(weights)                      # "auto" on a CPU: the torch backend
        x = torch.randn(5, 64)
        y = layer(x)
        w, ids = route(x, weights.router_weight, weights.router_bias, weights.top_k)
        ref = reference_moe(x, weights, w, ids, torch.float64)
        assert layer.backend == "torch" and y.shape == (5, 64)
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5), (y.double() - ref).abs().max()
        assert "triton" not in sys.modules
        try:
            MXFP4MoE(weights, backend="triton")
        except ImportError as e:
            print("triton:", e)
    """, str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stderr
    assert "triton: MXFP4MoE: backend='triton' needs Triton, which is not installed" in proc.stdout
    assert "pip install" in proc.stdout


def test_verify_runs_the_torch_backend_without_triton(tmp_path):
    """The built-in checkpoint's default (`--backend auto`, the interpreter where Triton exists)
    becomes the torch backend; `--backend triton` is an argument error with the install command."""
    report = tmp_path / "report.json"
    proc = run_without_triton("""
        import runpy, sys
        sys.argv = ["verify", "--quiet", "--json", sys.argv[1]]
        runpy.run_module("mxfp4_moe.verify", run_name="__main__")
    """, str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["checkpoint"]["backend"] == "torch"
    assert data["environment"]["triton"] is None
    proc = run_without_triton("""
        import runpy, sys
        sys.argv = ["verify", "--backend", "triton"]
        runpy.run_module("mxfp4_moe.verify", run_name="__main__")
    """, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--backend triton needs Triton, which is not installed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_load_model_torch_backend_without_triton(tmp_path):
    pytest.importorskip("transformers")
    proc = run_without_triton("""
        import sys, torch
        from mxfp4_moe import make_synthetic_checkpoint
        from mxfp4_moe.integrations.transformers import load_model
        path = make_synthetic_checkpoint(sys.argv[1], num_layers=2, num_experts=4, hidden=64, intermediate=64,
                                         top_k=2, full_model=True, seed=1)
        model = load_model(path, device="cpu", dtype=torch.float32, backend="torch", progress=False)
        logits = model(torch.tensor([[1, 5, 9]])).logits
        assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()
        assert "triton" not in sys.modules
        print("ok")
    """, str(tmp_path / "model"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
