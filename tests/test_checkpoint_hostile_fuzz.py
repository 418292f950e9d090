"""Hostile checkpoints and arguments, property-based (issue 26): the named cases of
test_checkpoint_hostile.py and test_verify_hostile.py generalised.

- config.json and the index replaced by random JSON (any shape, deep nesting, large sizes):
  only CheckpointError may come out of `open_checkpoint` and `load_model`; what loads reads the
  intact bytes.
- every tensor `load_model` reads, given a random dtype and shape in its header: CheckpointError,
  or a model whose logits equal the intact checkpoint's bit for bit. (A header declaring another
  float dtype of the same width, same shape, is another valid checkpoint whose bytes read as that
  dtype: it may load, and differ.)
- random command lines: exit status 2 and one `error:` line, never a traceback.
- random sizes of a sparse layer, verified in a child process under an address-space limit:
  exit 0, 1, or 2 with one `error:` line; never a signal, never a traceback.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mxfp4_moe import verify
from mxfp4_moe.checkpoint import CONFIG_FILE, INDEX_FILE, CheckpointError
from mxfp4_moe.synthetic import DenseSpec, make_synthetic_checkpoint
from safetensors_edit import read_header, write_header  # (tests/ is on sys.path)

MAX_JSON_BYTES = 16 * 2 ** 20     # checkpoint.MAX_JSON_BYTES, the bound on config.json and the index
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any JSON value, nested at most a few levels; and nestings far deeper than any checkpoint's.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
DEEP = st.integers(30, 900).map(lambda depth: json.loads("[" * depth + "]" * depth))
# JSON text as a file may hold it: any value, or a nesting deeper than Python's parser recurses.
JSON_TEXTS = (JSON_VALUES | DEEP).map(json.dumps) | st.integers(900, 300_000).map(lambda n: "[" * n + "]" * n)
SAFETENSORS_DTYPES = ["BOOL", "U8", "I8", "I16", "I32", "I64", "F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"]
WIDTH = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
         "F8_E4M3": 1, "F8_E5M2": 1}
FLOATS = {"F16", "BF16", "F32"}


def _load_model(path):
    from mxfp4_moe.integrations.transformers import load_model
    return load_model(path, device="cpu", dtype=torch.float32, progress=False)


IDS = torch.arange(7)[None] * 5 % 64


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A two-shard full model (1 layer, vocabulary 64) and its logits, loaded intact."""
    pytest.importorskip("transformers", reason="load_model needs Hugging Face transformers")
    path = make_synthetic_checkpoint(tmp_path_factory.mktemp("intact") / "m", num_layers=1, num_experts=4,
                                     hidden=64, intermediate=64, top_k=2, seed=7, shards=2, full_model=True,
                                     dense=DenseSpec(vocab_size=64))
    with torch.no_grad():
        logits = _load_model(path)(IDS).logits
    return path, logits


def _copy(path: Path, root: str) -> Path:
    target = Path(root) / "m"
    shutil.copytree(path, target)
    return target


def _assert_loads_as_intact_or_refuses(path: Path, intact_logits, *, may_differ: bool = False) -> None:
    try:
        model = _load_model(path)
    except CheckpointError:
        return
    with torch.no_grad():
        logits = model(IDS).logits
    if not may_differ:
        assert torch.equal(logits, intact_logits)


def _assert_rewritten_loads_as_intact_or_refuses(intact, file_name: str, rewrite, *, may_differ: bool = False) -> None:
    """A copy of the intact checkpoint whose JSON file `file_name` is replaced by the text
    rewrite(its parsed content) returns, checked by `_assert_loads_as_intact_or_refuses`."""
    path, logits = intact
    with tempfile.TemporaryDirectory() as root:
        ckpt = _copy(path, root)
        text = rewrite(json.loads((ckpt / file_name).read_text()))
        (ckpt / file_name).write_text(text)
        _assert_loads_as_intact_or_refuses(ckpt, logits, may_differ=may_differ)


@FUZZ
@given(change=st.one_of(
    st.tuples(st.just("replace"), JSON_TEXTS),
    st.tuples(st.just("set"), st.tuples(st.sampled_from(["vocab_size", "num_attention_heads", "num_key_value_heads",
                                                           "head_dim", "hidden_size", "num_hidden_layers",
                                                           "rope_scaling", "layer_types", "swiglu_limit",
                                                           "sliding_window", "rms_norm_eps", "self", "to_dict",
                                                           "quantization_config", "num_local_experts", "x y"]),
                                         JSON_VALUES | DEEP)),
    st.tuples(st.just("pad"), st.sampled_from([1024, MAX_JSON_BYTES - 4096, MAX_JSON_BYTES + 1]))))
def test_random_config_json_only_checkpoint_error(intact, change):
    kind, value = change

    def rewrite(config: dict) -> str:
        if kind == "replace":
            return value
        if kind == "set":
            key, item = value
            config[key] = item
            return json.dumps(config)
        text = json.dumps(config)
        return text + " " * max(0, value - len(text))

    # Keys such as rms_norm_eps change the model legitimately: only what loads is asked for.
    _assert_rewritten_loads_as_intact_or_refuses(intact, CONFIG_FILE, rewrite, may_differ=kind != "pad")


@FUZZ
@given(change=st.one_of(
    st.tuples(st.just("replace"), JSON_TEXTS),
    st.tuples(st.just("entry"), st.tuples(st.integers(0, 10_000), JSON_VALUES | DEEP))))
@example(change=("replace", "[" * 200_000 + "]" * 200_000))       # the RecursionError
def test_random_index_json_refused_or_intact(intact, change):
    kind, value = change

    def rewrite(index: dict) -> str:
        if kind == "replace":
            return value
        position, item = value
        names = sorted(index["weight_map"])
        index["weight_map"][names[position % len(names)]] = item
        return json.dumps(index)

    _assert_rewritten_loads_as_intact_or_refuses(intact, INDEX_FILE, rewrite)


# Every tensor of the intact model (one layer, Hugging Face names).
_DENSE = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
          "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
          "model.layers.0.self_attn.sinks"] + [f"model.layers.0.self_attn.{p}_proj.{k}" for p in "qkvo"
                                                 for k in ("weight", "bias")]
_MOE = [f"model.layers.0.mlp.experts.{p}_{k}" for p in ("gate_up_proj", "down_proj") for k in ("blocks", "scales", "bias")]
TENSORS = _DENSE + _MOE + ["model.layers.0.mlp.router.weight", "model.layers.0.mlp.router.bias"]


@FUZZ
@given(name=st.sampled_from(TENSORS), dtype=st.sampled_from(SAFETENSORS_DTYPES),
       shape_kind=st.sampled_from(["same", "same bytes", "any"]), seed=st.integers(0, 2 ** 30),
       any_shape=st.lists(st.integers(0, 300), max_size=4))
@example(name="model.embed_tokens.weight", dtype="I16", shape_kind="same", seed=0, any_shape=[])   # the issue's
def test_random_tensor_dtype_and_shape_refused_or_intact(intact, name, dtype, shape_kind, seed, any_shape):
    path, logits = intact
    with tempfile.TemporaryDirectory() as root:
        ckpt = _copy(path, root)
        (file,) = [f for f in ckpt.glob("*.safetensors") if name in read_header(f)[0]]
        header, blob = read_header(file)
        entry = header[name]
        nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
        if shape_kind == "same":
            shape = entry["shape"]
        elif shape_kind == "same bytes" and nbytes % WIDTH[dtype] == 0:
            shape = _split(nbytes // WIDTH[dtype], seed)
        else:
            shape = any_shape
        same_width_float = (dtype in FLOATS and entry["dtype"] in FLOATS and WIDTH[dtype] == WIDTH[entry["dtype"]]
                            and shape == entry["shape"])
        entry["dtype"], entry["shape"] = dtype, shape
        write_header(file, header, blob)
        _assert_loads_as_intact_or_refuses(ckpt, logits, may_differ=same_width_float)


def _split(count: int, seed: int) -> list[int]:
    """A shape of `count` elements, 1 to 4 dims, picked by `seed`."""
    dims, left = [], count
    for _ in range(seed % 4):
        divisors = [d for d in range(1, min(left, 4096) + 1) if left % d == 0]
        d = divisors[seed % len(divisors)]
        seed //= 7
        dims.append(d)
        left //= d
    return dims + [left]


OPTIONS = ["--tp", "--ep", "--rank", "--placement", "--align", "--hidden-pad", "--layers", "--tokens", "--device",
           "--backend", "--dtype", "--oracle", "--bench-tokens", "--seed", "--json"]
VALUES = (st.integers(-2 ** 66, 2 ** 66).map(str) | st.text(max_size=12)
          | st.sampled_from(["0-10000000000", "meta", "cuda:99", "0,0", "1,1", "none", "triton", "/nonexistent/x.json"]))


@settings(max_examples=60, deadline=None)
@given(argv=st.lists(st.tuples(st.sampled_from(OPTIONS), VALUES), max_size=5))
def test_random_command_lines_exit_2_with_one_line(tmp_path_factory, argv):
    missing = str(tmp_path_factory.getbasetemp() / "no-such-checkpoint")
    args = [missing] + [f"{option}={value}" for option, value in argv]
    import contextlib
    import io
    err = io.StringIO()
    # (in a folder of its own: a --json that names a writable file gets the exit-2 report)
    with contextlib.chdir(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())), \
            contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = verify.main(args)
        except SystemExit as exit_:
            code = exit_.code
    lines = err.getvalue().strip().splitlines()
    assert code == verify.EXIT_BAD_INPUT, (args, err.getvalue())
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, err.getvalue())


_CHILD = """
import resource, sys
limit = int(sys.argv[1]) * 2 ** 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from mxfp4_moe import verify
sys.exit(verify.main(sys.argv[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")
@settings(max_examples=3, deadline=None)
@given(experts=st.integers(4, 48), hidden_blocks=st.integers(1, 96), inter_blocks=st.integers(1, 96),
       tokens=st.integers(1, 64))
@example(experts=32, hidden_blocks=90, inter_blocks=90, tokens=8)    # gpt-oss-20b's layer: 420 MB
def test_memory_bounded_or_a_clear_error(tmp_path_factory, experts, hidden_blocks, inter_blocks, tokens):
    # 1.9 GB of address space: torch takes about 0.65 GB, the 420 MB layer maps, and the check's
    # copies run out; the old CLI died there in a RuntimeError traceback.
    from test_verify_hostile import _sparse_checkpoint
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / "ckpt"
    _sparse_checkpoint(folder, experts=experts, hidden=32 * hidden_blocks, inter=32 * inter_blocks)
    proc = subprocess.run([sys.executable, "-c", _CHILD, "1900", str(folder), "--backend", "torch", "--quiet",
                           "--tokens", str(tokens)], capture_output=True, text=True, timeout=300)
    shutil.rmtree(folder.parent)
    assert proc.returncode in (0, 1, 2), proc.stderr[-2000:]        # (negative: killed by a signal)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if proc.returncode == 2:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
