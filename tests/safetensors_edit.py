"""Editing a safetensors file's header in place, for the tests that damage checkpoints on purpose
(a safetensors file: 8 bytes of little-endian header length, the JSON header, the data)."""

import json
import struct
from pathlib import Path


def read_header(file: Path) -> tuple[dict, bytes]:
    """(the parsed header, the data bytes after it)."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_header(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)
