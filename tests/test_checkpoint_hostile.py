"""Hostile and damaged checkpoints (issue 26), one named test per case: what a stranger's upload or
a half-written copy can hold. Each ends in a CheckpointError naming the file and tensor (or config
key) and saying what was expected and found, never in a silent wrong load or a foreign exception.
"""

import json
import struct
from pathlib import Path

import pytest
import torch

from mxfp4_moe.checkpoint import CONFIG_FILE, INDEX_FILE, CheckpointError, MoEConfig, open_checkpoint
from mxfp4_moe.synthetic import DenseSpec, make_synthetic_checkpoint

# The model: original-layout qkv of 4 q heads + 2 x 2 kv heads of 16 = 128 rows.
FULL = dict(num_layers=2, num_experts=4, hidden=64, intermediate=64, top_k=2, seed=5, full_model=True,
            dense=DenseSpec(vocab_size=128))


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write_header(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _load_model(path):
    pytest.importorskip("transformers", reason="load_model needs Hugging Face transformers")
    from mxfp4_moe.integrations.transformers import load_model
    return load_model(path, device="cpu", dtype=torch.float32, progress=False)


# ---- silent wrong loads -----------------------------------------------------------------------

def test_original_layout_qkv_rows_must_total_the_configs_heads(tmp_path):
    # num_key_value_heads 1 instead of 2: q 64 + k 16 + v 16 = 96 of the 128 rows; the old code
    # took k from rows 64:80, v from 80:96 and dropped the rest.
    path = make_synthetic_checkpoint(tmp_path / "m", layout="original", **FULL)
    _edit_config(path, num_key_value_heads=1)
    with pytest.raises(CheckpointError) as err:
        _load_model(path)
    msg = str(err.value)
    assert "block.0.attn.qkv." in msg and "expected shape [96" in msg and "found [128" in msg
    assert "4 + 2 x 1 heads of 16" in msg


def test_dense_tensor_of_integer_dtype_is_refused(tmp_path):
    # BF16 -> I16 in the header: the same byte count, so the reader's header checks pass; the old
    # code cast the integers to floats.
    path = make_synthetic_checkpoint(tmp_path / "m", **FULL)
    file = path / "model.safetensors"
    header, data = _header(file)
    header["model.embed_tokens.weight"]["dtype"] = "I16"
    _write_header(file, header, data)
    with pytest.raises(CheckpointError) as err:
        _load_model(path)
    msg = str(err.value)
    assert "model.safetensors" in msg and "model.embed_tokens.weight" in msg and "found torch.int16" in msg


def test_dense_tensor_of_wrong_shape_is_refused_before_allocation(tmp_path):
    # vocab_size 2**34: the embedding would take 4 TB; the checkpoint's is [128, 64].
    path = make_synthetic_checkpoint(tmp_path / "m", **FULL)
    _edit_config(path, vocab_size=2 ** 34)
    with pytest.raises(CheckpointError) as err:
        _load_model(path)
    msg = str(err.value)
    assert "model.embed_tokens.weight" in msg and f"expected shape [{2 ** 34}, 64]" in msg and "found [128, 64]" in msg
