"""Per-expert ("unfused") gpt-oss MXFP4 checkpoints, the layout of generic OCP-MX MoE checkpoints:
separate gate, up and down projections per expert. The reader (`UnfusedCheckpoint`, an
`ExpertReader` with gpt-oss's semantics) gives lazy `TensorRef`s, and a writer makes small ones for
tests; `mxfp4_moe.loader` interleaves them into the kernel's fused w13.

Tensor names per layer N and expert e (H hidden, I intermediate; weights oriented [out, in]
like nn.Linear, packed two E2M1 codes per byte along `in`, low nibble = even element):

  model.layers.N.mlp.experts.e.gate_proj.weight        uint8 [I, H/2]
  model.layers.N.mlp.experts.e.gate_proj.weight_scale  uint8 [I, H/32]   (E8M0)
  model.layers.N.mlp.experts.e.up_proj.weight          uint8 [I, H/2]
  model.layers.N.mlp.experts.e.up_proj.weight_scale    uint8 [I, H/32]
  model.layers.N.mlp.experts.e.down_proj.weight        uint8 [H, I/2]
  model.layers.N.mlp.experts.e.down_proj.weight_scale  uint8 [H, I/32]
  optional, per projection: .bias float [out]; .channel_scale float [out] or [out, 1]
    (per-output-channel multiplier, the project's extension, as in gpt_oss.py)
  model.layers.N.mlp.router.weight  float [E, H];  model.layers.N.mlp.router.bias  float [E]
    (the bias is optional: generic MoE routers have none; the loader then uses zeros)

config.json: the gpt-oss keys `MoEConfig.from_dict` reads (num_hidden_layers, num_local_experts,
num_experts_per_tok, hidden_size, intermediate_size, swiglu_limit, swiglu_alpha) and
`quantization_config: {"quant_method": "mxfp4", "layout": "unfused"}`. A projection has a bias
(or a channel scale) for every expert of the layer or for none. `checkpoint.open_checkpoint` finds
the format by that layout key (`detect`); `open_unfused_checkpoint` opens a folder as unfused
whatever its config says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..checkpoint import (CONFIG_FILE, INDEX_FILE, CheckpointError, MoEConfig, NanScalePolicy, _collect_tensors,
                          link_roots, read_json)
from ..mxfp4 import BLOCK_SIZE
from ..semantics import GPT_OSS
from . import PROJECTIONS, SafetensorsExpertReader, UnfusedExpert, UnfusedLayerTensors, UnfusedProjection
from .gpt_oss import layer_tensor_names

UNFUSED_LAYOUT = "unfused"


def expert_prefix(layer: int, expert: int) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}."


def router_names(layer: int) -> tuple[str, str]:
    return f"model.layers.{layer}.mlp.router.weight", f"model.layers.{layer}.mlp.router.bias"


def _declares_unfused(raw) -> bool:
    """Whether a parsed config.json says quantization_config.layout "unfused"."""
    quant = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(quant, dict) and quant.get("layout") == UNFUSED_LAYOUT


def detect(path: Path) -> bool:
    """Whether `path` is a folder whose config.json says quantization_config.layout "unfused"."""
    config_file = path / CONFIG_FILE
    if not (path.is_dir() and config_file.is_file()):
        return False
    try:
        return _declares_unfused(read_json(config_file, "config", link_roots(path)))
    except CheckpointError:
        return False                         # open_checkpoint's own reading reports it


class UnfusedCheckpoint(SafetensorsExpertReader):
    """An opened unfused checkpoint: `path`, `layout` ("unfused"), `config` (MoEConfig), `files`,
    `semantics` (gpt-oss's) and `layer(i) -> UnfusedLayerTensors`. Close it (or use `with`) to
    release file handles."""

    layout = UNFUSED_LAYOUT

    def __init__(self, path: Path, config: MoEConfig, tensors: dict, identities: dict | None = None,
                 nan_scales: NanScalePolicy = "report"):
        super().__init__(path, config, GPT_OSS, tensors, nan_scales, identities)

    def _build_layer(self, i: int) -> UnfusedLayerTensors:
        experts = []
        for e in range(self.config.num_experts):
            projs = []
            for proj in PROJECTIONS:
                p = expert_prefix(i, e) + proj
                projs.append(UnfusedProjection(
                    weight=self._ref(p + ".weight"), weight_scale=self._ref(p + ".weight_scale"),
                    bias=self._ref(p + ".bias", required=False),
                    channel_scale=self._ref(p + ".channel_scale", required=False)))
            experts.append(UnfusedExpert(*projs))
        w_name, b_name = router_names(i)
        return UnfusedLayerTensors(i, experts, self._ref(w_name), self._ref(b_name, required=False))


def open_unfused_checkpoint(path: str | Path, *, nan_scales: NanScalePolicy = "report") -> UnfusedCheckpoint:
    """Open an unfused checkpoint folder (config.json plus one or more *.safetensors, with
    model.safetensors.index.json when sharded), whether or not its config says layout "unfused".
    Reads headers only; checks every tensor's shape and dtype against the config; raises
    CheckpointError naming file, tensor, expected vs found. nan_scales: as `checkpoint.open_checkpoint`."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a checkpoint folder")
    roots, identities = link_roots(folder), {}
    config_file = folder / CONFIG_FILE
    raw = read_json(config_file, "config", roots)
    config = MoEConfig.from_dict(raw, source=str(config_file))
    tensors = _collect_tensors(folder, roots, identities)
    _refuse_fused(tensors, config, config_file, _declares_unfused(raw))
    return UnfusedCheckpoint(folder, config, tensors, identities, nan_scales)


# `formats.open_other_format` opens each format it detects by the module's `open_checkpoint`.
open_checkpoint = open_unfused_checkpoint


def _refuse_fused(tensors: dict, config: MoEConfig, config_file: Path, declared: bool) -> None:
    """Raise CheckpointError naming the tensor where a layer has gpt-oss's fused MoE tensors in
    place of the per-expert ones: the reader would otherwise name only a missing per-expert tensor."""
    for i in range(config.num_layers):
        expected = expert_prefix(i, 0) + "gate_proj.weight"
        if expected in tensors:
            continue
        for fused_layout in ("hf", "original"):
            name = layer_tensor_names(fused_layout, i)["w13_blocks"]
            if name not in tensors:
                continue
            if declared:
                source = f"that {config_file} declares (quantization_config.layout 'unfused')"
                fix = (f"for a fused checkpoint, remove that key or open it with "
                       f"open_checkpoint(path, layout={fused_layout!r})")
            else:
                source = "that open_unfused_checkpoint reads"
                fix = "open a fused one with checkpoint.open_checkpoint(path)"
            raise CheckpointError(f"{tensors[name][0]}: tensor {name}: expected the per-expert (unfused) layout "
                                  f"({expected}) {source}, found gpt-oss's fused {fused_layout!r} layout; {fix}")


# ---- writing (for tests and examples) ----------------------------------------------------------

def unfuse_layer(layer: int, fused: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split one layer's fused gpt-oss tensors into unfused per-expert ones (names above).

    fused: w13_blocks [E, 2I, H/32, 16] uint8 (rows interleaved: 2j gate, 2j+1 up), w13_scales
    [E, 2I, H/32], w2_blocks [E, H, I/32, 16], w2_scales [E, H, I/32], router_weight [E, H];
    optional w13_bias [E, 2I], w2_bias [E, H], router_bias [E], w13_channel_scale [E, 2I(, 1)],
    w2_channel_scale [E, H(, 1)]. Returns name -> contiguous tensor.
    """
    out: dict[str, torch.Tensor] = {}
    w13_blocks, w13_scales = fused["w13_blocks"], fused["w13_scales"]
    w2_blocks, w2_scales = fused["w2_blocks"], fused["w2_scales"]
    for e in range(w13_blocks.shape[0]):
        p = expert_prefix(layer, e)
        for proj, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
            out[p + proj + ".weight"] = w13_blocks[e, rows].flatten(-2)           # [I, H/2]
            out[p + proj + ".weight_scale"] = w13_scales[e, rows]                  # [I, H/32]
            if fused.get("w13_bias") is not None:
                out[p + proj + ".bias"] = fused["w13_bias"][e, rows]
            if fused.get("w13_channel_scale") is not None:
                out[p + proj + ".channel_scale"] = fused["w13_channel_scale"][e, rows]
        out[p + "down_proj.weight"] = w2_blocks[e].flatten(-2)                      # [H, I/2]
        out[p + "down_proj.weight_scale"] = w2_scales[e]                            # [H, I/32]
        if fused.get("w2_bias") is not None:
            out[p + "down_proj.bias"] = fused["w2_bias"][e]
        if fused.get("w2_channel_scale") is not None:
            out[p + "down_proj.channel_scale"] = fused["w2_channel_scale"][e]
    w_name, b_name = router_names(layer)
    out[w_name] = fused["router_weight"]
    if fused.get("router_bias") is not None:
        out[b_name] = fused["router_bias"]
    return {k: v.contiguous() for k, v in out.items()}


def write_unfused_checkpoint(path: str | Path, layers: Sequence[Mapping[str, torch.Tensor]], *,
                             top_k: int, swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702,
                             shards: int = 1) -> Path:
    """Write an unfused checkpoint folder from each layer's fused tensors (see `unfuse_layer`).

    shards > 1 spreads the tensors over `model-0000i-of-0000N.safetensors` files with a
    model.safetensors.index.json. Returns the folder.
    """
    from safetensors.torch import save_file

    if not layers:
        raise ValueError("write_unfused_checkpoint: expected at least one layer")
    if shards < 1:
        raise ValueError(f"write_unfused_checkpoint: shards must be >= 1, got {shards}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    e, two_i, h_blocks, _ = layers[0]["w13_blocks"].shape
    config = {
        "model_type": "mxfp4_moe_unfused", "num_hidden_layers": len(layers), "num_local_experts": e,
        "num_experts_per_tok": top_k, "hidden_size": h_blocks * BLOCK_SIZE,
        "intermediate_size": two_i // 2, "swiglu_limit": swiglu_limit, "swiglu_alpha": swiglu_alpha,
        "quantization_config": {"quant_method": "mxfp4", "layout": UNFUSED_LAYOUT},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    tensors: dict[str, torch.Tensor] = {}
    for i, fused in enumerate(layers):
        tensors.update(unfuse_layer(i, fused))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file_name = f"model-{s:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / file_name))
        weight_map.update({n: file_name for n in part})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder


def unfuse_checkpoint(checkpoint, path: str | Path, *, shards: int = 1) -> Path:
    """Write a fused `checkpoint.Checkpoint` out as an unfused checkpoint holding the same bytes."""
    layers = []
    for i in range(checkpoint.config.num_layers):
        layer = checkpoint.layer(i)
        layers.append({name: ref.read_all() for name, ref in layer.tensors().items()})
    cfg = checkpoint.config
    return write_unfused_checkpoint(path, layers, top_k=cfg.experts_per_token, swiglu_limit=cfg.swiglu_limit,
                                    swiglu_alpha=cfg.swiglu_alpha, shards=shards)
