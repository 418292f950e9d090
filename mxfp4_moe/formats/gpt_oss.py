"""gpt-oss's own checkpoint layouts, fused (each projection stacked over the experts): the reader
(`Checkpoint`, an `ExpertReader` whose `layer(i)` gives `LayerTensors`), the tensor names of both
layouts, and the opening of a Hugging Face or original/ folder.

Tensor names per layer N (E experts, hidden H, intermediate I):

  field              Hugging Face layout                                original layout (original/)
  w13_blocks         model.layers.N.mlp.experts.gate_up_proj_blocks     block.N.mlp.mlp1_weight.blocks
  w13_scales         model.layers.N.mlp.experts.gate_up_proj_scales     block.N.mlp.mlp1_weight.scales
  w13_bias           model.layers.N.mlp.experts.gate_up_proj_bias       block.N.mlp.mlp1_bias
  w2_blocks          model.layers.N.mlp.experts.down_proj_blocks        block.N.mlp.mlp2_weight.blocks
  w2_scales          model.layers.N.mlp.experts.down_proj_scales        block.N.mlp.mlp2_weight.scales
  w2_bias            model.layers.N.mlp.experts.down_proj_bias          block.N.mlp.mlp2_bias
  router_weight      model.layers.N.mlp.router.weight                   block.N.mlp.gate.weight
  router_bias        model.layers.N.mlp.router.bias                     block.N.mlp.gate.bias
  w13_channel_scale  model.layers.N.mlp.experts.gate_up_proj_channel_scale  block.N.mlp.mlp1_weight.channel_scale
  w2_channel_scale   model.layers.N.mlp.experts.down_proj_channel_scale     block.N.mlp.mlp2_weight.channel_scale

The two channel-scale tensors are this project's optional extension (per-output-channel float
multipliers, [E, rows] or [E, rows, 1]); gpt-oss checkpoints do not have them.

The per-expert ("unfused") gpt-oss layout is `gpt_oss_unfused.py`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from ..checkpoint import (_FLOAT_DTYPES, CONFIG_FILE, INDEX_FILE, CheckpointError, MoEConfig, NanScalePolicy,
                          NanScaleReport, SafetensorsTensors, TensorRef, _collect_tensors, link_roots)
from ..mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK, NanScale, find_nan_scales as _find_nan_scale_bytes
from ..semantics import GPT_OSS
from . import ExpertReader

Layout = Literal["hf", "original"]

ORIGINAL_DIR = "original"
# Read scale bytes at most this many at a time when looking for NaN scales.
_SCAN_CHUNK_BYTES = 64 * 1024 * 1024


_LAYER_FIELDS = ("w13_blocks", "w13_scales", "w13_bias", "w2_blocks", "w2_scales", "w2_bias",
                 "router_weight", "router_bias")
_OPTIONAL_FIELDS = ("w13_channel_scale", "w2_channel_scale")

_HF_SUFFIXES = {
    "w13_blocks": "experts.gate_up_proj_blocks", "w13_scales": "experts.gate_up_proj_scales",
    "w13_bias": "experts.gate_up_proj_bias", "w2_blocks": "experts.down_proj_blocks",
    "w2_scales": "experts.down_proj_scales", "w2_bias": "experts.down_proj_bias",
    "router_weight": "router.weight", "router_bias": "router.bias",
    "w13_channel_scale": "experts.gate_up_proj_channel_scale",
    "w2_channel_scale": "experts.down_proj_channel_scale",
}
_ORIGINAL_SUFFIXES = {
    "w13_blocks": "mlp1_weight.blocks", "w13_scales": "mlp1_weight.scales", "w13_bias": "mlp1_bias",
    "w2_blocks": "mlp2_weight.blocks", "w2_scales": "mlp2_weight.scales", "w2_bias": "mlp2_bias",
    "router_weight": "gate.weight", "router_bias": "gate.bias",
    "w13_channel_scale": "mlp1_weight.channel_scale", "w2_channel_scale": "mlp2_weight.channel_scale",
}
_LAYER_PREFIX = {"hf": "model.layers.{}.mlp.", "original": "block.{}.mlp."}
_LAYER_NAME_RE = {"hf": re.compile(r"^model\.layers\.(\d+)\.mlp\.(experts|router)\."),
                  "original": re.compile(r"^block\.(\d+)\.mlp\.(mlp[12]_|gate\.)")}
# Expert tensors of the Hugging Face naming: fused (experts.gate_up_proj_blocks) or per expert
# (experts.0.gate_proj.weight: gpt_oss_unfused, compressed-tensors, Quark).
_FUSED_EXPERTS_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.[a-z_]+$")
_PER_EXPERT_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")


def layer_tensor_names(layout: Layout, layer: int) -> dict[str, str]:
    """The checkpoint tensor name of each `LayerTensors` field (optional ones included) for one layer."""
    if layout not in _LAYER_PREFIX:
        raise ValueError(f"layout must be 'hf' or 'original', got {layout!r}")
    suffixes = _HF_SUFFIXES if layout == "hf" else _ORIGINAL_SUFFIXES
    prefix = _LAYER_PREFIX[layout].format(layer)
    return {field: prefix + suffix for field, suffix in suffixes.items()}


# ---- layers ------------------------------------------------------------------------------------

@dataclass
class LayerTensors:
    """One layer's MoE tensors in checkpoint layout (validated against the config):

    w13_blocks [E, 2I, H/32, 16] uint8 (gate/up rows interleaved: 2j gate, 2j+1 up; low nibble = even k)
    w13_scales [E, 2I, H/32] uint8 (E8M0)      w13_bias [E, 2I] float (bf16 in gpt-oss)
    w2_blocks  [E, H, I/32, 16] uint8           w2_scales [E, H, I/32] uint8    w2_bias [E, H] float
    router_weight [E, H] float                  router_bias [E] float
    w13_channel_scale [E, 2I] or [E, 2I, 1] float, or None;  w2_channel_scale [E, H] or [E, H, 1], or None
    """
    index: int
    w13_blocks: TensorRef
    w13_scales: TensorRef
    w13_bias: TensorRef
    w2_blocks: TensorRef
    w2_scales: TensorRef
    w2_bias: TensorRef
    router_weight: TensorRef
    router_bias: TensorRef
    w13_channel_scale: TensorRef | None = None
    w2_channel_scale: TensorRef | None = None

    def tensors(self) -> dict[str, TensorRef]:
        """The present tensors by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "index" and getattr(self, f.name) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())


class Checkpoint(SafetensorsTensors, ExpertReader):
    """An opened gpt-oss checkpoint, fused layout: the `ExpertReader` whose `layer(i)` gives
    `LayerTensors` (each projection stacked over the experts). Use as a context manager or call
    close(); file handles are opened on first read and kept.

    path: folder holding the safetensors files read (the `original/` folder for that layout)
    layout: "hf" or "original"; config: MoEConfig; semantics: gpt-oss's; files: the safetensors
    files, sorted; config_file: the config.json read; nan_scales: "report" or "error".
    """

    def __init__(self, path: Path, layout: Layout, config: MoEConfig, config_file: Path,
                 tensors: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]],
                 nan_scales: NanScalePolicy, identities: dict[Path, tuple] | None = None):
        self.layout: Layout = layout
        self.config_file = config_file
        self._index_tensors(tensors, identities)
        super().__init__(path, config, GPT_OSS, sorted({ref.file for ref in self._refs.values()}), nan_scales)
        self._check_no_extra_layers()

    # -- plumbing --
    def __repr__(self) -> str:
        return (f"Checkpoint({str(self.path)!r}, layout={self.layout!r}, layers={self.config.num_layers}, "
                f"experts={self.config.num_experts}, files={len(self.files)})")

    def tensor(self, name: str) -> TensorRef:
        """Any tensor by name (dense tensors included)."""
        if name not in self._refs:
            raise CheckpointError(f"{self.path}: no tensor named {name} in {[f.name for f in self.files]}")
        return self._refs[name]

    # -- layers --
    def _build_layer(self, index: int) -> LayerTensors:
        names = layer_tensor_names(self.layout, index)
        refs = {}
        for field in _LAYER_FIELDS:
            if names[field] not in self._refs:
                raise CheckpointError(
                    f"{self.path}: layer {index}: tensor {names[field]} is missing (expected "
                    f"{list(self.config.expected_shapes()[field])}; config {self.config_file.name} has "
                    f"num_hidden_layers={self.config.num_layers}; files: {[f.name for f in self.files]})")
            refs[field] = self._refs[names[field]]
        for field in _OPTIONAL_FIELDS:
            refs[field] = self._refs.get(names[field])
        return LayerTensors(index=index, **refs)

    def _check_layer(self, layer: LayerTensors) -> None:
        cfg = self.config
        where = (f"(config {self.config_file}: num_experts={cfg.num_experts}, hidden_size={cfg.hidden_size}, "
                 f"intermediate_size={cfg.intermediate_size})")
        for proj in ("w13", "w2"):
            blocks, scales = getattr(layer, f"{proj}_blocks"), getattr(layer, f"{proj}_scales")
            if blocks.dtype != torch.uint8 or blocks.ndim != 4 or blocks.shape[-1] != BYTES_PER_BLOCK:
                raise CheckpointError(
                    f"{blocks.file}: tensor {blocks.name}: expected uint8 [E, rows, K/32, {BYTES_PER_BLOCK}] "
                    f"(two E2M1 codes per byte, {BLOCK_SIZE} per block), found {blocks.dtype} {list(blocks.shape)}")
            if scales.dtype != torch.uint8 or scales.shape != blocks.shape[:-1]:
                raise CheckpointError(
                    f"{scales.file}: tensor {scales.name}: expected uint8 {list(blocks.shape[:-1])} "
                    f"(the shape of {blocks.name} without its last dim), found {scales.dtype} {list(scales.shape)}")
        for field, shape in cfg.expected_shapes().items():
            ref = getattr(layer, field)
            if ref.dtype not in _FLOAT_DTYPES and field not in ("w13_blocks", "w13_scales", "w2_blocks", "w2_scales"):
                raise CheckpointError(f"{ref.file}: tensor {ref.name}: expected a float dtype "
                                      f"(bfloat16, float16 or float32), found {ref.dtype}")
            if ref.shape != shape:
                raise CheckpointError(f"{ref.file}: tensor {ref.name}: expected shape {list(shape)} "
                                      f"{where}, found {list(ref.shape)}")
        for field, rows in (("w13_channel_scale", 2 * cfg.intermediate_size), ("w2_channel_scale", cfg.hidden_size)):
            ref = getattr(layer, field)
            if ref is None:
                continue
            allowed = ((cfg.num_experts, rows), (cfg.num_experts, rows, 1))
            if ref.dtype not in _FLOAT_DTYPES or ref.shape not in allowed:
                raise CheckpointError(f"{ref.file}: tensor {ref.name}: expected a float tensor of shape "
                                      f"{list(allowed[0])} or {list(allowed[1])} {where}, "
                                      f"found {ref.dtype} {list(ref.shape)}")

    def _check_no_extra_layers(self) -> None:
        pattern = _LAYER_NAME_RE[self.layout]
        for name, ref in self._refs.items():
            m = pattern.match(name)
            if m and int(m.group(1)) >= self.config.num_layers:
                raise CheckpointError(
                    f"{ref.file}: tensor {name} belongs to layer {m.group(1)}, but config {self.config_file} "
                    f"has num_hidden_layers={self.config.num_layers} (layers 0..{self.config.num_layers - 1})")

    def layer(self, i: int) -> LayerTensors:
        """Layer i's tensors. With nan_scales="error", the first call for a layer reads its scale
        tensors whole and raises CheckpointError on a NaN (0xFF) byte, naming tensor, expert, row, block."""
        return super().layer(i)

    def _layer_count_source(self) -> str:
        return f" (num_hidden_layers={self.config.num_layers} in {self.config_file})"

    def _nan_scale_error(self, report: NanScaleReport, i: int) -> CheckpointError:
        loc = report.locations[0]
        ref = self._refs[loc.tensor]
        noun = "NaN scale byte" if report.count == 1 else "NaN scale bytes"
        return CheckpointError(f"{ref.file}: {loc.describe()}: expected finite E8M0 scales, found "
                               f"{report.count} {noun} in layer {i} (open with nan_scales='report' to read it anyway)")

    def find_nan_scales(self, layer: int, *, limit: int | None = 100) -> NanScaleReport:
        """Scan layer `layer`'s w13 and w2 scale tensors for NaN bytes (0xFF), a few experts at a
        time. Returns the count and the first `limit` locations, index (expert, row, block)."""
        n = self.config.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise CheckpointError(f"{self.path}: layer index {layer!r} out of range: expected 0..{n - 1}")
        tensors = self._layers[layer]
        count, locations = 0, []
        for ref in (tensors.w13_scales, tensors.w2_scales):
            per_expert = max(1, ref.nbytes // max(1, ref.shape[0]))
            step = max(1, _SCAN_CHUNK_BYTES // per_expert)
            for start in range(0, ref.shape[0], step):
                stop = min(ref.shape[0], start + step)
                room = None if limit is None else max(0, limit - len(locations))
                found, where = _find_nan_scale_bytes(ref.read(slice(start, stop)), ref.name, limit=room)
                count += found
                locations += [NanScale(w.tensor, (w.index[0] + start, *w.index[1:])) for w in where]
        return NanScaleReport(layer, count, tuple(locations))


# ---- opening -----------------------------------------------------------------------------------

def _has_safetensors(folder: Path) -> bool:
    return folder.is_dir() and (any(folder.glob("*.safetensors")) or os.path.lexists(folder / INDEX_FILE))


def _detect_layout(names, folder: Path) -> Layout:
    hf = any(_LAYER_NAME_RE["hf"].match(n) for n in names)
    original = any(_LAYER_NAME_RE["original"].match(n) for n in names)
    if hf and original:
        raise CheckpointError(f"{folder}: holds MoE tensors of both layouts (model.layers.N.mlp.* and "
                              f"block.N.mlp.*); expected one")
    if not (hf or original):
        raise CheckpointError(f"{folder}: no MoE expert tensors found: expected names like "
                              f"model.layers.0.mlp.experts.gate_up_proj_blocks (Hugging Face) or "
                              f"block.0.mlp.mlp1_weight.blocks (original)")
    return "hf" if hf else "original"


def _refuse_per_expert(tensors: dict, layout: Layout | Literal["auto"], config_file: Path) -> None:
    """Raise CheckpointError naming a tensor where the Hugging Face naming holds per-expert MoE
    tensors and no fused ones: the layer would otherwise fail on a missing fused tensor, which
    does not say what the folder holds."""
    if any(_FUSED_EXPERTS_RE.match(n) for n in tensors):
        return
    name = min((n for n in tensors if _PER_EXPERT_RE.match(n)), default=None)
    if name is None:
        return
    if layout != "auto":
        asked = f"gpt-oss's fused {layout!r} layout (asked for by layout={layout!r})"
        fix = "open with layout='auto' to read a format that config.json declares"
    else:
        asked = "gpt-oss's fused layout (no other format claims the folder)"
        fix = (f"for per-expert gpt-oss tensors (mxfp4_moe.unfused), set quantization_config.layout to 'unfused' "
               f"in {config_file}")
    raise CheckpointError(f"{tensors[name][0]}: tensor {name}: expected {asked}, with tensors such as "
                          f"{layer_tensor_names('hf', 0)['w13_blocks']}, found per-expert tensors; {fix}")


def open_checkpoint(root: Path, *, nan_scales: NanScalePolicy = "report",
                    layout: Layout | Literal["auto"] = "auto") -> Checkpoint:
    """Open a gpt-oss checkpoint folder in either fused layout: what `checkpoint.open_checkpoint`
    (which checks `nan_scales` and `layout`, and documents them) does when no other format claims
    `root`. Validates every layer's names, dtypes and shapes against config.json (headers only)."""
    if not root.exists():
        raise CheckpointError(f"{root}: checkpoint folder does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root}: expected a checkpoint folder, found a file")
    folder = root
    original_dir = root / ORIGINAL_DIR
    if _has_safetensors(original_dir) and (layout == "original" or not _has_safetensors(root)):
        folder = original_dir
    if not _has_safetensors(folder):
        raise CheckpointError(f"{root}: no *.safetensors files (nor {INDEX_FILE}) in the folder"
                              + (f" or in {original_dir}" if folder == root else ""))
    roots = link_roots(root)
    identities: dict[Path, tuple] = {}
    tensors = _collect_tensors(folder, roots, identities)
    found_layout = _detect_layout(tensors, folder)
    config_file = folder / CONFIG_FILE
    if not os.path.lexists(config_file) and folder != root and os.path.lexists(root / CONFIG_FILE):
        config_file = root / CONFIG_FILE
    if found_layout == "hf":
        _refuse_per_expert(tensors, layout, config_file)
    if layout != "auto" and found_layout != layout:
        raise CheckpointError(f"{folder}: expected the {layout!r} layout, found tensors of the {found_layout!r} layout")
    if not os.path.lexists(config_file):
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}: expected the model config next to the safetensors files")
    config = MoEConfig.from_file(config_file, roots)
    return Checkpoint(folder, found_layout, config, config_file, tensors, nan_scales, identities)
