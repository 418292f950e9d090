"""`python -m mxfp4_moe.verify` on the other formats: compressed-tensors MXFP4 (Qwen3-MoE, oracle
transformers' Qwen3MoeSparseMoeBlock), GGUF MXFP4 (gpt-oss, oracle GptOssMLP), Quark MXFP4
(both families) and gpt-oss's per-expert unfused layout (found by its config.json): format,
sharding, kernels, consistency and oracle pass on honest files and a NaN scale fails."""

import json

import pytest

from mxfp4_moe import verify
from mxfp4_moe.formats import compressed_tensors as ct_format
from mxfp4_moe.mxfp4 import E8M0_NAN
from mxfp4_moe.synthetic_formats import make_format_checkpoint

pytest.importorskip("gguf")
pytest.importorskip("transformers")


def _run(path, tmp_path, *args):
    report = tmp_path / "report.json"
    code = verify.main([str(path), "--tokens", "12", "--oracle", "transformers", "--quiet", "--json", str(report),
                        *args])
    return code, json.loads(report.read_text())


@pytest.mark.parametrize("fmt,args", [
    pytest.param("compressed-tensors", ["--tp", "3", "--align", "marlin"], id="compressed-tensors-tp3-marlin"),
    pytest.param("compressed-tensors", ["--tp", "2", "--ep", "2", "--align", "triton", "--backend", "triton",
                                        "--dtype", "float32"], id="compressed-tensors-tp2-ep2-triton-silu-kernel"),
    pytest.param("gguf", ["--tp", "2", "--ep", "2", "--align", "trtllm"], id="gguf-tp2-ep2-trtllm"),
    pytest.param("quark-qwen3", ["--tp", "3", "--align", "triton"], id="quark-qwen3-tp3-triton"),
    pytest.param("quark-gpt-oss", ["--tp", "2", "--ep", "2", "--align", "flashinfer-cutlass"],
                 id="quark-gpt-oss-tp2-ep2-flashinfer"),
    pytest.param("gpt-oss-unfused", ["--tp", "2", "--ep", "2", "--align", "triton"], id="gpt-oss-unfused-tp2-ep2-triton"),
])
def test_verify_passes_on_each_format(fmt, args, tmp_path):
    target, _ = make_format_checkpoint(tmp_path / "ckpt", fmt, num_layers=1, seed=2)
    code, report = _run(target, tmp_path, *args)
    checks = {r["check"] for r in report["checks"] if not r.get("skipped")}
    assert code == verify.EXIT_OK, [r for r in report["checks"] if not r["passed"]]
    assert {"format", "sharding", "kernels", "consistency", "oracle"} <= checks
    oracle = next(r for r in report["checks"] if r["check"] == "oracle")
    qwen = fmt in ("compressed-tensors", "quark-qwen3")
    assert ("Qwen3MoeSparseMoeBlock" if qwen else "GptOssMLP") in oracle["summary"]


def test_verify_fails_on_a_nan_scale(tmp_path):
    _, (layer,) = make_format_checkpoint(tmp_path / "a", "compressed-tensors", num_layers=1)
    layer.w13_scales[1, 4, 0] = E8M0_NAN
    target = ct_format.write_checkpoint(tmp_path / "b", [vars(layer)], top_k=2)
    code, report = _run(target, tmp_path)
    assert code != verify.EXIT_OK
    fmt = next(r for r in report["checks"] if r["check"] == "format")
    assert not fmt["passed"] and "experts.1" in fmt["summary"]


def test_model_check_refuses_quark_by_name(tmp_path, capsys):
    # --model has no reference for Quark yet: a usage error naming the format, not a crash.
    target, _ = make_format_checkpoint(tmp_path / "ckpt", "quark-gpt-oss", num_layers=1)
    assert verify.main([str(target), "--model", "--quiet"]) == verify.EXIT_BAD_INPUT
    assert "holds the 'quark' layout" in capsys.readouterr().err


@pytest.mark.parametrize("fmt,says", [("compressed-tensors", "has no dense weights"),
                                      ("gguf", "give --reference FOLDER")])
def test_model_check_on_experts_alone_is_a_usage_error(fmt, says, tmp_path, capsys):
    # The MoE layers alone (no dense model): exit 2 saying what is missing (a GGUF file first
    # needs its Hugging Face twin as the reference: tests/test_gguf_model.py).
    pytest.importorskip("transformers")
    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    target, _ = make_format_checkpoint(tmp_path / "ckpt", fmt, num_layers=1)
    assert verify.main([str(target), "--model", "--quiet"]) == verify.EXIT_BAD_INPUT
    assert says in capsys.readouterr().err
