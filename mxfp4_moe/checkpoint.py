"""What every checkpoint reader shares, and `open_checkpoint`, which picks the reader: config.json
into one `MoEConfig` (gpt-oss's Hugging Face or original naming), bounded JSON and the symbolic-link
policy, safetensors headers read into lazy `TensorRef`s, and the NaN-scale report. The readers, one
module per format, live in `mxfp4_moe.formats` (gpt-oss's fused layouts: `formats/gpt_oss.py`).
Nothing is read beyond the headers until a slice is asked for.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch

from .mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK, NanScale

if TYPE_CHECKING:
    from .formats import ExpertReader
    from .formats.gpt_oss import Checkpoint, Layout

NanScalePolicy = Literal["report", "error"]

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

DEFAULT_SWIGLU_LIMIT = 7.0
DEFAULT_SWIGLU_ALPHA = 1.702

# safetensors' dtype strings -> torch dtypes (the ones a checkpoint of this kind may hold).
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
SAFETENSORS_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _SAFETENSORS_DTYPES.items()}

# safetensors refuses headers above 100 MB; a larger length field means a corrupt file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# config.json and the index are small (gpt-oss-120b's index: about 70 KB); a larger one is not a
# checkpoint's, and parsing it whole would take memory in proportion to its size.
MAX_JSON_BYTES = 16 * 1024 * 1024
# Nesting allowed in config.json and the index (gpt-oss configs nest 2 deep).
MAX_JSON_DEPTH = 32
# swiglu_limit and swiglu_alpha are applied in float32.
_FLOAT32_MAX = torch.finfo(torch.float32).max
# Longest excerpt of a config value quoted in an error message: a message never echoes a file.
_SHOWN_CHARS = 60


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a gpt-oss MXFP4 MoE checkpoint. The message names the
    file, the tensor (or config key) and what was expected versus found."""


def shown(value: Any) -> str:
    """repr(value), cut to a few dozen characters: what an error message may quote of a file."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + f"... ({len(text)} characters)"


# ---- files and symbolic links ------------------------------------------------------------------
#
# Policy: a file the reader opens (config.json, the index, a shard, in the folder or in original/)
# may be a symbolic link only to a regular file inside the checkpoint folder given, or, for a
# folder in a Hugging Face cache (`models--org--name/snapshots/<rev>/`), inside that cache entry's
# `blobs/` folder, where the cache links every file. Any other link (to /proc/self/environ, to
# another user's files) is refused unread; so are directories, sockets, devices, broken links and
# link loops that carry a reader's file name.

def link_roots(root: Path) -> tuple[Path, ...]:
    """The folders a file of the checkpoint at `root` may resolve into (see the policy above)."""
    root = root.resolve()
    roots = [root]
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots":
            roots.append(folder.parent.parent / "blobs")
            break
    return tuple(roots)


def checked_file(path: Path, what: str, roots: tuple[Path, ...]) -> Path:
    """`path` if it is a regular file (or a link to one inside `roots`); else CheckpointError
    naming the file and what it is. `what` names the role ("config", "safetensors file")."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise CheckpointError(f"{path}: expected a {what}, found a broken symbolic link "
                                  f"(to {os.readlink(path)})") from None
        raise CheckpointError(f"{path}: expected a {what}, found no such file") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: expected a {what}, found a symbolic link loop") from None
        raise CheckpointError(f"{path}: cannot read the {what}: {err.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path}: expected a {what}, found a directory")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: expected a {what}, found a special file (not a regular file)")
    target = path.resolve()
    if not any(target.is_relative_to(r) for r in roots):
        raise CheckpointError(f"{path}: a symbolic link to {target}, outside the checkpoint folder "
                              f"{roots[0]}: expected links only into the folder (or into a Hugging Face "
                              f"cache's blobs/); copy the file into the folder to use it")
    return path


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    """What says a file is still the one read: device, inode, size, modification time."""
    info = path.stat()
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def read_json(path: Path, what: str, roots: tuple[Path, ...]) -> Any:
    """Parse a small JSON file (config.json, the index) with bounded size and nesting.
    Raises CheckpointError naming the file; never quotes its contents."""
    checked_file(path, what, roots)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the {what}: {err.strerror}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: expected a {what} of at most {MAX_JSON_BYTES} bytes, found a larger file")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: {what} is not valid JSON: not UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: {what} is not valid JSON: {err.msg} at line {err.lineno} "
                              f"column {err.colno}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    if _too_deep(value):
        raise CheckpointError(f"{path}: {what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _too_deep(value: Any) -> bool:
    """Whether a parsed JSON value nests deeper than MAX_JSON_DEPTH (walked without recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return False


# ---- config ------------------------------------------------------------------------------------

def _config_value(raw: dict, keys: tuple[str, ...], source: str, *, required: bool = True, default: Any = None):
    """The value under the first of `keys` present; several present must agree."""
    found = {k: raw[k] for k in keys if k in raw and raw[k] is not None}
    if not found:
        if required:
            raise CheckpointError(f"{source}: missing config key: expected one of {list(keys)}, found none "
                                  f"(keys present: {shown(sorted(map(str, raw)))})")
        return default
    values = set(json.dumps(v, sort_keys=True) for v in found.values())
    if len(values) > 1:
        raise CheckpointError(f"{source}: config keys disagree: expected {list(found)} to hold one value, "
                              f"found {shown(found)}")
    return next(iter(found.values()))


def _positive_number(raw: dict, key: str, default: float, source: str) -> float:
    """The config value under `key` (default when absent) as a float, which must be > 0 and fit a
    float32 (the kernels and the reference apply it in float32)."""
    value = _config_value(raw, (key,), source, required=False, default=default)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not (0 < value <= _FLOAT32_MAX)):              # (false for NaN too)
        raise CheckpointError(f"{source}: {key}: expected a number > 0 and at most {_FLOAT32_MAX:.3e} "
                              f"(float32), found {shown(value)}")
    return float(value)


@dataclass(frozen=True)
class MoEConfig:
    """The MoE part of a gpt-oss config.json, whichever naming it used.

    Hugging Face names: num_hidden_layers, num_local_experts, num_experts_per_tok (or
    experts_per_token), hidden_size, intermediate_size, swiglu_limit, swiglu_alpha,
    quantization_config.quant_method. Original names: num_hidden_layers, num_experts,
    experts_per_token, hidden_size, intermediate_size, swiglu_limit (alpha is fixed at 1.702).
    """
    num_layers: int
    num_experts: int
    experts_per_token: int
    hidden_size: int
    intermediate_size: int
    swiglu_limit: float = DEFAULT_SWIGLU_LIMIT
    swiglu_alpha: float = DEFAULT_SWIGLU_ALPHA
    quant_method: str | None = "mxfp4"

    def __post_init__(self):
        for name in ("num_layers", "num_experts", "experts_per_token", "hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoEConfig.{name}: expected a positive int, found {value!r}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"MoEConfig: experts_per_token {self.experts_per_token} exceeds "
                             f"num_experts {self.num_experts}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % BLOCK_SIZE:
                raise ValueError(f"MoEConfig.{name}: expected a multiple of the MXFP4 block size "
                                 f"{BLOCK_SIZE}, found {getattr(self, name)}")

    @classmethod
    def from_dict(cls, raw: dict, source: str = CONFIG_FILE) -> "MoEConfig":
        """Build from a parsed config.json (either naming). Raises CheckpointError naming `source`."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        quant = raw.get("quantization_config")
        quant_method = quant.get("quant_method") if isinstance(quant, dict) else None
        if quant_method is None and "num_experts" in raw and "num_local_experts" not in raw:
            quant_method = "mxfp4"          # original layout: MXFP4 by construction, no quantization_config
        if quant_method is not None and quant_method != "mxfp4":
            raise CheckpointError(f"{source}: quantization_config.quant_method: expected 'mxfp4', "
                                  f"found {shown(quant_method)}")
        kwargs = dict(
            num_layers=_config_value(raw, ("num_hidden_layers",), source),
            num_experts=_config_value(raw, ("num_local_experts", "num_experts"), source),
            experts_per_token=_config_value(raw, ("num_experts_per_tok", "experts_per_token",
                                                  "num_experts_per_token"), source),
            hidden_size=_config_value(raw, ("hidden_size",), source),
            intermediate_size=_config_value(raw, ("intermediate_size",), source),
            swiglu_limit=_positive_number(raw, "swiglu_limit", DEFAULT_SWIGLU_LIMIT, source),
            swiglu_alpha=_positive_number(raw, "swiglu_alpha", DEFAULT_SWIGLU_ALPHA, source),
            quant_method=quant_method,
        )
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise CheckpointError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path, roots: tuple[Path, ...] | None = None) -> "MoEConfig":
        """Read config.json (size, nesting and symbolic links bounded as `read_json` says; roots:
        the folders it may link into, default its own folder)."""
        path = Path(path)
        raw = read_json(path, "config", roots or link_roots(path.parent))
        return cls.from_dict(raw, source=str(path))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint shape of each required `LayerTensors` field under this config."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        return {
            "w13_blocks": (e, 2 * i, h // BLOCK_SIZE, BYTES_PER_BLOCK),
            "w13_scales": (e, 2 * i, h // BLOCK_SIZE),
            "w13_bias": (e, 2 * i),
            "w2_blocks": (e, h, i // BLOCK_SIZE, BYTES_PER_BLOCK),
            "w2_scales": (e, h, i // BLOCK_SIZE),
            "w2_bias": (e, h),
            "router_weight": (e, h),
            "router_bias": (e,),
        }


# ---- safetensors headers and lazy reads --------------------------------------------------------

def _read_header(file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """Parse a safetensors header: {name: (dtype, shape, nbytes)}. Checks that every tensor's
    bytes lie inside the file, so truncated and corrupt files fail here, by name."""
    size = file.stat().st_size
    if size < 8:
        raise CheckpointError(f"{file}: truncated safetensors file: expected at least 8 bytes "
                              f"(the header length), found {size}")
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file: the length field says "
                                  f"{header_len} header bytes, the file has {size - 8} after it")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{file}: corrupt safetensors file: header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors file: expected a JSON object header, "
                              f"found {type(header).__name__}")
    data_size = size - 8 - header_len
    tensors = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        fields_ok = isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()
        dtype_name = entry.get("dtype") if fields_ok else None
        shape = entry.get("shape") if fields_ok else None
        offsets = entry.get("data_offsets") if fields_ok else None
        if not (isinstance(dtype_name, str) and _is_int_list(shape) and _is_int_list(offsets) and len(offsets) == 2):
            raise CheckpointError(f"{file}: corrupt safetensors file: tensor {name}: expected dtype (a string), "
                                  f"shape (a list of ints >= 0) and data_offsets ([begin, end] ints >= 0), "
                                  f"found {shown(entry)}")
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name}: unsupported dtype {shown(dtype_name)} "
                                  f"(expected one of {sorted(_SAFETENSORS_DTYPES)})")
        dtype, shape, (begin, end) = _SAFETENSORS_DTYPES[dtype_name], tuple(shape), offsets
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes:
            raise CheckpointError(f"{file}: corrupt safetensors file: tensor {name} {dtype_name} {list(shape)} "
                                  f"needs {nbytes} bytes, its data_offsets [{begin}, {end}] span {end - begin}")
        if end > data_size:
            raise CheckpointError(f"{file}: truncated safetensors file: tensor {name} needs bytes up to "
                                  f"{end} of the data section, the file holds only {data_size}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, shape, nbytes)
    # The tensors must tile the data section in order, as safetensors writes them: a gap or an
    # overlap means offsets that point at other bytes than the writer's.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CheckpointError(f"{file}: corrupt safetensors file: tensor {name} starts at byte {begin} of the "
                                  f"data section, expected {position} (the end of the tensor before it)")
        position = end
    if position != data_size:
        raise CheckpointError(f"{file}: corrupt safetensors file: expected a data section of {position} bytes "
                              f"(the end of the last tensor), found {data_size}")
    return tensors


def _is_int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


class _FileHandles:
    """Open safetensors handles, one per file, opened on first use and kept until close().

    identities: {file: `_file_identity`} as the headers were read. Every `get` compares the file
    with it, so a shard replaced or rewritten since it was opened fails by name instead of being
    read under the old header's offsets. (Shards are memory-mapped: a file truncated *during* a
    read still kills the process with SIGBUS; no check before the read can see that.)
    """

    def __init__(self, identities: dict[Path, tuple] | None = None):
        self._handles: dict[Path, Any] = {}
        self._identities = identities or {}
        self._lock = threading.Lock()
        self.closed = False

    def _check_unchanged(self, file: Path) -> None:
        expected = self._identities.get(file)
        if expected is None:
            return
        try:
            found = _file_identity(file)
        except OSError as err:
            raise CheckpointError(f"{file}: the safetensors file is gone since the checkpoint was opened "
                                  f"({err.strerror}); open it again") from None
        if found != expected:
            raise CheckpointError(f"{file}: the safetensors file changed on disk since the checkpoint was opened "
                                  f"(size {expected[2]} -> {found[2]} bytes, or replaced or rewritten); "
                                  f"open it again")

    def get(self, file: Path):
        from safetensors import safe_open

        with self._lock:
            if self.closed:
                raise CheckpointError(f"{file}: the checkpoint was closed; open it again to read")
            self._check_unchanged(file)
            handle = self._handles.get(file)
            if handle is None:
                try:
                    handle = safe_open(str(file), framework="pt", device="cpu")
                except Exception as err:   # safetensors raises its own error type
                    if "mmap" in str(err):
                        raise MemoryError(f"{file}: cannot map the safetensors file ({file.stat().st_size} bytes) "
                                          "into memory: out of memory or address space") from None
                    raise CheckpointError(f"{file}: cannot open safetensors file: {str(err)[:300]}") from None
                self._handles[file] = handle
            return handle

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                handle.__exit__(None, None, None)   # releases the mmap (safe_open has no close())
            self._handles.clear()
            self.closed = True


class TensorRef:
    """One tensor in one safetensors file, read lazily: `read(*index)` reads only the selected
    slices (safetensors `get_slice`), `read_all()` the whole tensor.

    name: tensor name in the checkpoint; file: the .safetensors file; shape, dtype as stored;
    nbytes: the stored size in bytes.
    """

    __slots__ = ("name", "file", "shape", "dtype", "nbytes", "_handles")

    def __init__(self, name: str, file: Path, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int,
                 handles: _FileHandles):
        self.name, self.file, self.shape, self.dtype, self.nbytes = name, file, shape, dtype, nbytes
        self._handles = handles

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"TensorRef({self.name!r}, {list(self.shape)} {self.dtype}, file={self.file.name!r})"

    def _normalize(self, index: tuple) -> list:
        """Check an index of ints and step-1 slices against the shape. Out-of-range bounds are
        errors, not clamped: reading past a dimension's end is the bug a shard loader must not hide."""
        if len(index) > self.ndim:
            raise ValueError(f"{self.file}: tensor {self.name} {list(self.shape)}: {len(index)} indices "
                             f"for {self.ndim} dims")
        out = []
        for dim, (idx, size) in enumerate(zip(index, self.shape)):
            if isinstance(idx, slice):
                if idx.step not in (None, 1):
                    raise ValueError(f"{self.file}: tensor {self.name}: dim {dim}: only step-1 slices "
                                     f"are read, found step {idx.step}")
                start = 0 if idx.start is None else idx.start
                stop = size if idx.stop is None else idx.stop
                start = start + size if start < 0 else start
                stop = stop + size if stop < 0 else stop
                if not 0 <= start <= stop <= size:
                    raise ValueError(f"{self.file}: tensor {self.name}: dim {dim} has size {size}, "
                                     f"slice asks for [{idx.start}:{idx.stop}]")
                out.append(slice(start, stop))
            elif isinstance(idx, int) and not isinstance(idx, bool):
                pos = idx + size if idx < 0 else idx
                if not 0 <= pos < size:
                    raise ValueError(f"{self.file}: tensor {self.name}: dim {dim} has size {size}, "
                                     f"index {idx} is out of range")
                out.append(pos)
            else:
                raise TypeError(f"tensor {self.name}: indices must be ints or slices, found {type(idx).__name__}")
        return out

    def slice_shape(self, *index: slice | int) -> tuple[int, ...]:
        """Shape that `read(*index)` returns (ints drop their dim)."""
        norm = self._normalize(index)
        shape = [s.stop - s.start for s in norm if isinstance(s, slice)]
        return tuple(shape) + tuple(self.shape[len(norm):])

    def slice_nbytes(self, *index: slice | int) -> int:
        """Bytes that `read(*index)` reads."""
        return math.prod(self.slice_shape(*index)) * torch.empty((), dtype=self.dtype).element_size()

    def read(self, *index: slice | int, contiguous: bool = True) -> torch.Tensor:
        """The selected part of the tensor: a CPU tensor of `dtype`, shape `slice_shape(*index)`;
        unselected trailing dims are read whole. Only the selected bytes are read from the file.

        safetensors hands back a view into its private (copy-on-write) memory map of the file.
        contiguous=True (default): a partial selection is copied out, so the result is dense and
        holds only its own bytes. contiguous=False: the view itself, possibly strided, valid while
        the checkpoint is open; for a caller that copies it into place anyway (the loader), which
        saves a second copy. Either way, writing to the result never changes the file.
        """
        norm = self._normalize(index)
        out_shape = self.slice_shape(*index)
        if math.prod(out_shape) == 0:
            return torch.empty(out_shape, dtype=self.dtype)
        handle = self._handles.get(self.file)
        try:
            if not norm:
                out = handle.get_tensor(self.name)
            else:
                out = handle.get_slice(self.name)[tuple(norm)]
        except Exception as err:   # safetensors' own error type; keep file and tensor in the message
            raise CheckpointError(f"{self.file}: cannot read tensor {self.name}: {str(err)[:300]}") from None
        if tuple(out.shape) != out_shape or out.dtype != self.dtype:
            # The file's header now says otherwise than when the checkpoint was opened.
            raise CheckpointError(f"{self.file}: tensor {self.name}: expected {self.dtype} {list(out_shape)} as "
                                  f"the header said when the checkpoint was opened, read {out.dtype} "
                                  f"{list(out.shape)}: the file changed on disk; open it again")
        return out.contiguous() if contiguous else out

    def read_all(self) -> torch.Tensor:
        return self.read()


# ---- layers ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NanScaleReport:
    """NaN (0xFF) scale bytes of one layer: the count over w13 and w2, and the first locations
    (tensor name, index (expert, row, block)). Unpacks as `count, locations`."""
    layer: int
    count: int
    locations: tuple[NanScale, ...]

    def __iter__(self) -> Iterator:
        return iter((self.count, list(self.locations)))

    def __bool__(self) -> bool:
        return self.count > 0

    def describe(self) -> str:
        if not self.count:
            return f"layer {self.layer}: no NaN scale bytes"
        where = "; ".join(loc.describe() for loc in self.locations)
        more = "" if len(self.locations) == self.count else f" (first {len(self.locations)} shown)"
        noun = "NaN scale byte" if self.count == 1 else "NaN scale bytes"
        return f"layer {self.layer}: {self.count} {noun}{more}: {where}"


class SafetensorsTensors:
    """Every tensor of a set of safetensors files by name, each a lazy TensorRef read through one
    set of file handles: what `Checkpoint` and the safetensors format readers
    (`formats.SafetensorsExpertReader`: unfused gpt-oss, compressed-tensors, Quark) share."""

    def _index_tensors(self, tensors: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]],
                       identities: dict[Path, tuple] | None = None) -> None:
        """tensors: name -> (file, dtype, shape, nbytes), as `_collect_tensors` gives them;
        identities: as `_FileHandles` takes them."""
        self._handles = _FileHandles(identities)
        self._refs = {name: TensorRef(name, file, shape, dtype, nbytes, self._handles)
                      for name, (file, dtype, shape, nbytes) in tensors.items()}

    def close(self) -> None:
        """Release the file handles; TensorRefs of this checkpoint cannot be read afterwards."""
        self._handles.close()

    @property
    def names(self) -> list[str]:
        """Every tensor name in the checkpoint (dense ones included), sorted."""
        return sorted(self._refs)

    def __contains__(self, name: str) -> bool:
        return name in self._refs


# ---- opening -----------------------------------------------------------------------------------

def _collect_tensors(folder: Path, roots: tuple[Path, ...] | None = None,
                     identities: dict[Path, tuple] | None = None,
                     ) -> dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]]:
    """name -> (file, dtype, shape, nbytes) from the index's weight_map, or from every
    *.safetensors file's header when there is no index. roots: the folders the files may link
    into (`link_roots`; default the folder's). identities: filled with each file's
    `_file_identity` as its header was read."""
    roots = roots or link_roots(folder)
    identities = {} if identities is None else identities
    index_file = folder / INDEX_FILE
    tensors = {}
    if os.path.lexists(index_file):
        index = read_json(index_file, "safetensors index", roots)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            found = (f"a JSON {type(index).__name__}" if not isinstance(index, dict) else
                     "no weight_map" if weight_map is None else f"a weight_map of type {type(weight_map).__name__}")
            raise CheckpointError(f"{index_file}: expected a JSON object with a 'weight_map' object of tensor "
                                  f"name -> file name, found {found}")
        by_file: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            if not (isinstance(file_name, str) and file_name and Path(file_name).name == file_name
                    and file_name not in (".", "..")):
                raise CheckpointError(f"{index_file}: weight_map maps tensor {shown(name)} to {shown(file_name)}: "
                                      f"expected the name of a safetensors file in {folder}")
            by_file.setdefault(file_name, []).append(name)
        for file_name, names in sorted(by_file.items()):
            file = folder / file_name
            if not os.path.lexists(file):
                raise CheckpointError(f"{index_file}: names file {file_name} (holding {names[0]} and "
                                      f"{len(names) - 1} more tensors), expected at {file}, found no such file")
            checked_file(file, "safetensors file", roots)
            identities[file] = _file_identity(file)
            header = _read_header(file)
            for name in names:
                if name not in header:
                    raise CheckpointError(f"{index_file}: maps tensor {name} to {file_name}, "
                                          f"but {file} has no tensor of that name")
                tensors[name] = (file, *header[name])
        return tensors
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files and no {INDEX_FILE}")
    for file in files:
        checked_file(file, "safetensors file", roots)
        identities[file] = _file_identity(file)
        for name, info in _read_header(file).items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name} is also in {tensors[name][0]}: "
                                      f"expected each tensor in one file")
            tensors[name] = (file, *info)
    return tensors


def open_checkpoint(path: str | Path, *, nan_scales: NanScalePolicy = "report",
                    layout: Layout | Literal["auto"] = "auto") -> Checkpoint | ExpertReader:
    """Open an MXFP4 MoE checkpoint with its format's reader (`mxfp4_moe.formats`) and validate
    every layer's names, dtypes and shapes against its config (headers only; no tensor data is read).

    path: a gpt-oss Hugging Face model folder (one *.safetensors file, or shards with
      model.safetensors.index.json), an `original/` folder, or a model folder holding `original/`
      and no top-level safetensors. Or a checkpoint of another format `formats.open_other_format`
      finds (gpt-oss unfused, by config.json quantization_config.layout "unfused";
      compressed-tensors, Quark, GGUF).
    layout: "auto" (default) opens whichever format the folder is. "hf" or "original" reads
      gpt-oss's fused layout of that name and skips the detection of the other formats, whatever
      config.json says (so it also reads a fused folder whose config wrongly says "unfused"); a
      folder holding the other layout, or per-expert tensors, raises CheckpointError naming a
      tensor found. With "original" a model folder's `original/` is used even when top-level
      files exist.
    nan_scales: "report" (default) leaves NaN scale bytes to `Checkpoint.find_nan_scales(layer)`;
      "error" makes `layer(i)` raise CheckpointError on them.
    Raises CheckpointError (a ValueError) naming file, tensor and expected vs found.
    """
    if nan_scales not in ("report", "error"):
        raise ValueError(f"nan_scales must be 'report' or 'error', got {nan_scales!r}")
    if layout not in ("auto", "hf", "original"):
        raise ValueError(f"layout must be 'auto', 'hf' or 'original', got {layout!r}")
    root = Path(path)
    from .formats import gpt_oss, open_other_format        # the other formats: a module each
    if layout == "auto" and (other := open_other_format(root, nan_scales=nan_scales)) is not None:
        return other
    return gpt_oss.open_checkpoint(root, nan_scales=nan_scales, layout=layout)


# gpt-oss's fused layouts' reader moved to formats/gpt_oss.py, which imports this module; its names
# stay importable from here, looked up on first use (PEP 562) so that neither module needs the other
# loaded first.
_GPT_OSS_NAMES = frozenset({"Checkpoint", "LayerTensors", "Layout", "ORIGINAL_DIR", "layer_tensor_names"})


def __getattr__(name: str):
    if name in _GPT_OSS_NAMES:
        from .formats import gpt_oss
        return getattr(gpt_oss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
