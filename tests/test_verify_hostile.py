"""`python -m mxfp4_moe.verify` on hostile arguments and damaged checkpoints (issue 26) and what a
new user hits first (issue 25 item 4): every bad input ends in exit status 2 with one `error:` line
(and, with --json, a report saying so), checked before anything is built; the report is strict
JSON, written whole or not at all.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mxfp4_moe import __version__, verify
from mxfp4_moe.synthetic import make_synthetic_checkpoint

FAST = ["--backend", "torch", "--tokens", "8", "--quiet"]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("v") / "ckpt", num_layers=2, num_experts=4, hidden=64,
                                     intermediate=64, top_k=2, seed=3)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---- arguments, bounded and checked before anything is read or built ---------------------------

@pytest.mark.parametrize("args, message", [
    (["--layers", "0-10000000000"], "--layers: '0-10000000000' is no range of layers (expected lo-hi with "
                                    "lo <= hi <= 2147483647)"),
    (["--layers", "3-1"], "--layers: '3-1' is no range of layers (expected lo-hi with lo <= hi <= 2147483647)"),
    (["--hidden-pad", "1099511627776"], "--hidden-pad must be in [1, 131072], got 1099511627776"),
    (["--tokens", "1000000000000"], "--tokens must be in [1, 65536], got 1000000000000"),
    (["--tokens", "0"], "--tokens must be in [1, 65536], got 0"),
    (["--bench-tokens", "-1"], "--bench-tokens must be in [1, 65536], got -1"),
    (["--seed", "-1"], "--seed must be in [0, 9223372036854775807], got -1"),
    (["--tp", "100000"], "--tp must be in [1, 1024], got 100000"),
    (["--tp", "64", "--ep", "64"], "--tp 64 x --ep 64 = 4096 ranks: expected at most 1024"),
    (["--rank", "-1"], "--rank must be in [0, 1023], got -1"),
], ids=["layers_huge", "layers_reversed", "hidden_pad_huge", "tokens_huge", "tokens_zero", "bench_tokens_negative",
        "seed_negative", "tp_huge", "ranks_huge", "rank_negative"])
def test_argument_out_of_bounds_exits_2_before_anything_is_read(tmp_path, capsys, args, message):
    # A folder that does not exist: the argument's error must come first, not the folder's.
    assert verify.main([str(tmp_path / "nope"), *args]) == verify.EXIT_BAD_INPUT
    assert _one_error_line(capsys) == f"error: {message}"


@pytest.mark.parametrize("args, message", [
    (["--device", "meta"], "--device meta: expected cpu or cuda (cuda:N), found a 'meta' device"),
    (["--align", "0,0"], "--align 0,0: expected two alignments in [1, 131072]"),
    (["--layers", "0-100"], "--layers 0-100: layer(s) 0-100 out of range; the checkpoint has layers 0..1"),
], ids=["device_meta", "align_zero", "layers_beyond_the_checkpoint"])
def test_bad_argument_exits_2_with_one_line(small_ckpt, capsys, args, message):
    assert verify.main([str(small_ckpt), *FAST, *args]) == verify.EXIT_BAD_INPUT
    assert _one_error_line(capsys) == f"error: {message}"


def test_oracle_without_transformers_exits_2_with_one_line(small_ckpt, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)      # `import transformers` raises ImportError
    assert verify.main([str(small_ckpt), *FAST, "--oracle", "transformers"]) == verify.EXIT_BAD_INPUT
    assert _one_error_line(capsys) == ("error: --oracle transformers needs transformers: "
                                       "pip install 'mxfp4-moe[transformers]'")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        verify.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mxfp4_moe {__version__}"


# ---- the JSON report --------------------------------------------------------------------------

def test_json_path_in_a_missing_folder_exits_2_before_the_checks(small_ckpt, tmp_path, capsys):
    # The old CLI ran every check, then lost the run to a FileNotFoundError traceback.
    path = tmp_path / "no" / "such" / "r.json"
    assert verify.main([str(small_ckpt), *FAST, "--json", str(path)]) == verify.EXIT_BAD_INPUT
    assert _one_error_line(capsys) == f"error: --json {path}: the folder {path.parent} does not exist"


def test_json_path_that_is_a_directory_exits_2(small_ckpt, tmp_path, capsys):
    assert verify.main([str(small_ckpt), *FAST, "--json", str(tmp_path)]) == verify.EXIT_BAD_INPUT
    assert _one_error_line(capsys) == f"error: --json {tmp_path}: is a directory; expected a file name"


def test_exit_2_replaces_an_older_report(tmp_path, capsys):
    # An old report of a passing run must not survive a run that could not read its checkpoint.
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"exit_code": 0}))
    missing = tmp_path / "nope"
    assert verify.main([str(missing), *FAST, "--json", str(report)]) == verify.EXIT_BAD_INPUT
    line = _one_error_line(capsys)
    data = json.loads(report.read_text())
    assert data["exit_code"] == 2 and data["checks"] == [] and data["checkpoint"] is None
    assert f"error: {data['error']}" == line and "does not exist" in line
    assert data["schema"] == verify.REPORT_SCHEMA and data["environment"]["device"] is None


def test_report_write_is_atomic(small_ckpt, tmp_path, monkeypatch):
    # A full disk while writing: the old report stays whole, and no temporary file is left.
    report = tmp_path / "r.json"
    report.write_text('{"old": true}\n')

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        verify.main([str(small_ckpt), *FAST, "--layers", "0", "--json", str(report)])
    assert report.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_nan_router_bias_writes_strict_json(small_ckpt, tmp_path):
    # A NaN router bias makes the outputs NaN: the old report held a bare NaN, which strict
    # parsers (JavaScript's JSON.parse, jq) reject. Non-finite numbers are strings now.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in small_ckpt.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mlp.router.bias"][1] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    report = tmp_path / "r.json"
    assert verify.main([str(ckpt), *FAST, "--layers", "0", "--json", str(report)]) == verify.EXIT_CHECK_FAILED
    data = _strict_json(report.read_text())
    (kernels,) = [c for c in data["checks"] if c["check"] == "kernels"]
    assert kernels["passed"] is False and kernels["figures"]["rel_err"] in ("NaN", "Infinity")


def test_report_figures_and_wording(small_ckpt, tmp_path):
    # issue 25 item 4: "float32" as elsewhere (not "torch.float32"), "1 rank", skipped checks
    # neither passed nor failed.
    report = tmp_path / "r.json"
    assert verify.main([str(small_ckpt), *FAST, "--layers", "0", "--json", str(report)]) == verify.EXIT_OK
    data = _strict_json(report.read_text())
    (kernels,) = [c for c in data["checks"] if c["check"] == "kernels"]
    assert kernels["figures"]["dtype"] == "float32"
    coverage = [c for c in data["checks"] if c["check"] == "sharding" and c["rank"] is None][0]
    assert coverage["summary"] == "1 rank holds every (expert, block) exactly once"
    (consistency,) = [c for c in data["checks"] if c["check"] == "consistency"]
    assert consistency["summary"].startswith("sum of 1 rank vs unsharded")
    (throughput,) = [c for c in data["checks"] if c["check"] == "throughput"]
    assert throughput["skipped"] and throughput["passed"] is None and throughput["summary"] == "needs a CUDA GPU"


def test_one_nan_scale_byte_is_singular(small_ckpt):
    from mxfp4_moe.checkpoint import NanScaleReport
    from mxfp4_moe.mxfp4 import NanScale
    one = NanScaleReport(1, 1, (NanScale("t", (0, 1, 2)),))
    assert one.describe().startswith("layer 1: 1 NaN scale byte: ")


# ---- memory -----------------------------------------------------------------------------------

def _sparse_checkpoint(folder: Path, experts: int, hidden: int, inter: int) -> None:
    """A one-layer checkpoint whose data section is a hole: as large as its config says, on no disk."""
    import struct
    p = "model.layers.0.mlp."
    tensors = {p + "experts.gate_up_proj_blocks": ("U8", [experts, 2 * inter, hidden // 32, 16]),
               p + "experts.gate_up_proj_scales": ("U8", [experts, 2 * inter, hidden // 32]),
               p + "experts.gate_up_proj_bias": ("BF16", [experts, 2 * inter]),
               p + "experts.down_proj_blocks": ("U8", [experts, hidden, inter // 32, 16]),
               p + "experts.down_proj_scales": ("U8", [experts, hidden, inter // 32]),
               p + "experts.down_proj_bias": ("BF16", [experts, hidden]),
               p + "router.weight": ("BF16", [experts, hidden]), p + "router.bias": ("BF16", [experts])}
    header, position = {}, 0
    for name, (dtype, shape) in tensors.items():
        nbytes = (2 if dtype == "BF16" else 1)
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes
    text = json.dumps(header).encode()
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + position)
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": 1, "num_local_experts": experts, "num_experts_per_tok": 4, "hidden_size": hidden,
        "intermediate_size": inter, "quantization_config": {"quant_method": "mxfp4"}}))


_CHILD = """
import resource, sys
limit = int(sys.argv[1]) * 2 ** 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from mxfp4_moe import verify
sys.exit(verify.main(sys.argv[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")
def test_memory_a_check_cannot_have_is_a_clear_error(tmp_path):
    # A 420 MB layer (gpt-oss-20b's sizes) in a process limited to 1.5 GB of address space: the
    # old CLI died in a MemoryError traceback (the 1.7 GB shard reached 3.7 GB).
    _sparse_checkpoint(tmp_path / "ckpt", experts=32, hidden=2880, inter=2880)
    proc = subprocess.run([sys.executable, "-c", _CHILD, "1500", str(tmp_path / "ckpt"), *FAST],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == verify.EXIT_BAD_INPUT, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of memory on cpu while checking layer 0: format ("), lines
    assert "model.safetensors" in lines[0]


def test_unreadable_argument_is_one_error_line(capsys):
    # argparse printed its usage block first: two lines and more.
    with pytest.raises(SystemExit) as exit_:
        verify.main(["--tokens", "many"])
    assert exit_.value.code == verify.EXIT_BAD_INPUT
    assert _one_error_line(capsys) == "error: argument --tokens: invalid int value: 'many' (see --help)"


def test_model_check_refuses_an_integer_embedding_before_transformers_reads_it(tmp_path, capsys):
    # verify --model died inside transformers with a torch.finfo TypeError.
    pytest.importorskip("transformers")
    import struct
    from mxfp4_moe.synthetic import DenseSpec
    ckpt = make_synthetic_checkpoint(tmp_path / "m", num_layers=2, num_experts=4, hidden=64, intermediate=64,
                                     top_k=2, seed=5, full_model=True, dense=DenseSpec(vocab_size=128))
    file = ckpt / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["model.embed_tokens.weight"]["dtype"] = "I16"
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    assert verify.main([str(ckpt), *FAST, "--model"]) == verify.EXIT_BAD_INPUT
    line = _one_error_line(capsys)
    assert line.startswith("error: cannot read the checkpoint: ") and "model.embed_tokens.weight" in line
    assert "expected a float dtype (bfloat16, float16 or float32), found torch.int16" in line


@pytest.mark.parametrize("value", ["\r", "a\nb", "\x1b[31m", "tab\there"])
def test_control_characters_in_an_argument_stay_on_the_error_line(value, capsys):
    # Found by the command-line property test: '--align=\r' split the error over two lines.
    assert verify.main(["--align", value]) == verify.EXIT_BAD_INPUT
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --align "), lines
    assert value not in lines[0] and value.encode("unicode_escape").decode() in lines[0]
