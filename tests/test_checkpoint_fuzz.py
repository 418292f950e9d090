"""The reader on corrupted checkpoints, property-based: whatever is mutated in the safetensors
headers (bytes, the length field, dtypes, shapes, data offsets), the index or config.json, opening
and reading the checkpoint either raises CheckpointError (the one error the reader may raise on bad
input) or returns exactly the intact checkpoint's bytes. Nothing else may escape: a TypeError from
deep inside is the bug this guards against (an index naming a shard as the number 7 raised one).
"""

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxfp4_moe.checkpoint import CONFIG_FILE, INDEX_FILE, CheckpointError, open_checkpoint
from mxfp4_moe.synthetic import make_synthetic_checkpoint
from safetensors_edit import read_header, write_header  # (tests/ is on sys.path)

# Any JSON value, to put where the reader expects a particular one.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A two-shard checkpoint (with an index) and every layer tensor's bytes, read intact."""
    path = make_synthetic_checkpoint(tmp_path_factory.mktemp("intact") / "ckpt", num_layers=2, num_experts=4,
                                     hidden=64, intermediate=64, top_k=2, shards=2)
    return path, _read_everything(path)


def _read_everything(path: Path) -> dict[str, torch.Tensor]:
    """Open the checkpoint and read every field of every layer whole, and one slice of each."""
    out = {}
    with open_checkpoint(path) as ckpt:
        for layer in range(ckpt.config.num_layers):
            for field, ref in ckpt.layer(layer).tensors().items():
                out[f"{layer}.{field}"] = ref.read()
                out[f"{layer}.{field}[:1]"] = ref.read(slice(0, 1))
            ckpt.find_nan_scales(layer)
    return out


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _mutate(folder: Path, data) -> str:
    """Apply one mutation drawn from `data` to the checkpoint in `folder`; returns what it did."""
    kind = data.draw(st.sampled_from(["header byte", "length field", "entry field", "index value", "index top",
                                      "config value", "config byte"]))
    shard = data.draw(st.sampled_from(_shards(folder)))
    if kind == "header byte":
        raw = bytearray(shard.read_bytes())
        (length,) = struct.unpack("<Q", raw[:8])
        pos = data.draw(st.integers(8, 8 + length - 1))
        raw[pos] = data.draw(st.integers(0, 255))
        shard.write_bytes(bytes(raw))
        return f"{kind} {pos} of {shard.name}"
    if kind == "length field":
        raw = shard.read_bytes()
        length = data.draw(st.integers(0, 2 ** 64 - 1) | st.integers(0, len(raw)))
        shard.write_bytes(struct.pack("<Q", length) + raw[8:])
        return f"{kind} {length} in {shard.name}"
    if kind == "entry field":
        header, body = read_header(shard)
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole entry", "drop key"]))
        if field == "whole entry":
            header[name] = data.draw(JSON_VALUES)
        elif field == "drop key":
            header[name].pop(data.draw(st.sampled_from(sorted(header[name]))))
        else:
            header[name][field] = data.draw(JSON_VALUES | st.lists(st.integers(-5, 2 ** 20), max_size=5)
                                            | st.sampled_from(["U8", "I8", "BF16", "F32", "F4"]))
        write_header(shard, header, body)
        return f"{kind} {field} of {name} in {shard.name}"
    if kind in ("index value", "index top"):
        index_file = folder / INDEX_FILE
        index = json.loads(index_file.read_text())
        if kind == "index top":
            index = data.draw(JSON_VALUES | st.just({"weight_map": data.draw(JSON_VALUES)}))
        else:
            name = data.draw(st.sampled_from(sorted(index["weight_map"])))
            index["weight_map"][name] = data.draw(JSON_VALUES | st.sampled_from([s.name for s in _shards(folder)]))
        index_file.write_text(json.dumps(index))
        return kind
    config_file = folder / CONFIG_FILE
    if kind == "config byte":
        raw = bytearray(config_file.read_bytes())
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
        config_file.write_bytes(bytes(raw))
        return f"{kind} {pos}"
    config = json.loads(config_file.read_text())
    key = data.draw(st.sampled_from(["num_hidden_layers", "num_local_experts", "num_experts_per_tok", "hidden_size",
                                     "intermediate_size", "swiglu_limit", "quantization_config"]))
    config[key] = data.draw(JSON_VALUES | st.integers(-3, 300))
    config_file.write_text(json.dumps(config))
    return f"{kind} {key} = {config[key]!r}"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupt_checkpoint_raises_checkpoint_error_or_reads_intact_bytes(intact, data):
    path, expected = intact
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        shutil.copytree(path, folder)
        what = _mutate(folder, data)
        try:
            got = _read_everything(folder)
        except CheckpointError:
            return
        assert got.keys() == expected.keys(), what
        for key, tensor in expected.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), (what, key)
