"""For the tests that damage checkpoints on purpose: editing a safetensors file's header in place
(a safetensors file: 8 bytes of little-endian header length, the JSON header, the data), and the
check that `open_checkpoint` then refuses the folder."""

import json
import struct
from pathlib import Path

import pytest

from mxfp4_moe.checkpoint import CheckpointError, open_checkpoint


def read_header(file: Path) -> tuple[dict, bytes]:
    """(the parsed header, the data bytes after it)."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_header(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def merge_first_two_dims_in_header(file: Path, name: str) -> None:
    """Tensor `name` of `file` gets another shape of the same bytes (its first two dims merged) in
    the header; the data stays as it is."""
    header, data = read_header(file)
    shape = header[name]["shape"]
    header[name]["shape"] = [shape[0] * shape[1], *shape[2:]]
    write_header(file, header, data)


def assert_refused(path: Path, match: str) -> None:
    """open_checkpoint(path) raises a CheckpointError whose message matches the regex `match`."""
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(path)
