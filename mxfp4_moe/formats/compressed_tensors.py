"""compressed-tensors MXFP4 checkpoints (llm-compressor's MXFP4A16 scheme, format
"mxfp4-pack-quantized") of Qwen3-MoE: the reader, and a writer of tiny ones for tests.

Facts (compressed-tensors 0.20.1: `compressors/mxfp4/base.py`, `compressors/mx_utils.py`,
`compressors/nvfp4/helpers.py::pack_fp4_to_uint8`, `quantization/quant_scheme.py` MXFP4A16;
llm-compressor 0.14 `modeling/moe/linear_experts.py` (per-expert gate/up/down Linears); vLLM's
`compressed_tensors_moe.py` and `qwen3_moe.py` expert mapping read the same names;
tests/test_formats.py checks them against the package where it is installed):

  model.layers.L.mlp.experts.E.{gate_proj,up_proj}.weight_packed  uint8 [I, H/2]
      two E2M1 codes per byte, column 2k in the low nibble, 2k + 1 in the high one
  model.layers.L.mlp.experts.E.{gate_proj,up_proj}.weight_scale   uint8 [I, H/32]
      E8M0, 127 + floor(log2 scale)
  model.layers.L.mlp.experts.E.down_proj.weight_packed / .weight_scale  uint8 [H, I/2] / [H, I/32]
  model.layers.L.mlp.gate.weight  float [E, H]: the router, no bias
  No biases, no global scale, no zero point (symmetric).

config.json: Qwen3-MoE keys (num_hidden_layers, num_experts (or transformers 5's num_local_experts),
num_experts_per_tok, hidden_size,
moe_intermediate_size, norm_topk_prob: transformers' default False when absent) and
quantization_config {quant_method "compressed-tensors", format "mxfp4-pack-quantized",
config_groups: {name: {weights: {num_bits 4, type "float", strategy "group", group_size 32,
symmetric true}}}}. Semantics: `semantics.qwen_moe(norm_topk_prob)`. Every layer must be sparse
(decoder_sparse_step 1, no mlp_only_layers), as in Qwen3-30B-A3B; others are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..checkpoint import CONFIG_FILE, CheckpointError, MoEConfig, _collect_tensors, link_roots, read_json
from ..mxfp4 import BLOCK_SIZE
from ..semantics import qwen_moe
from . import PROJECTIONS, SafetensorsExpertReader, UnfusedExpert, UnfusedLayerTensors, UnfusedProjection

QUANT_METHOD = "compressed-tensors"
MXFP4_FORMAT = "mxfp4-pack-quantized"
# What compressed-tensors' MXFP4 group weights are (quant_scheme.py MXFP4A16; vLLM's _is_mxfp4
# checks the same fields).
_WEIGHT_ARGS = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": BLOCK_SIZE, "symmetric": True}


def expert_prefix(layer: int, expert: int) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}."


def router_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def _quant_config(raw: dict) -> dict | None:
    quant = raw.get("quantization_config") if isinstance(raw, dict) else None
    return quant if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD else None


def detect(path: Path) -> bool:
    """Whether `path` is a folder whose config.json names compressed-tensors quantization."""
    config_file = path / CONFIG_FILE
    if not (path.is_dir() and config_file.is_file()):
        return False
    try:
        return _quant_config(read_json(config_file, "config", link_roots(path))) is not None
    except CheckpointError:
        return False                         # open_checkpoint's own reading reports it


def read_config(raw: dict, source: str) -> tuple[MoEConfig, bool]:
    """(MoEConfig, norm_topk_prob) from a Qwen3-MoE config.json holding compressed-tensors MXFP4."""
    quant = _quant_config(raw)
    fmt = quant.get("format")
    groups = quant.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{source}: quantization_config.config_groups: expected at least one group, found "
                              f"{groups!r}")
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        group_format = group.get("format", fmt) if isinstance(group, dict) else None
        wrong = {k: (v, (weights or {}).get(k)) for k, v in _WEIGHT_ARGS.items() if (weights or {}).get(k) != v}
        if group_format != MXFP4_FORMAT or wrong:
            raise CheckpointError(f"{source}: quantization_config.config_groups.{name}: expected format "
                                  f"{MXFP4_FORMAT!r} with weights {_WEIGHT_ARGS}, found format {group_format!r}"
                                  + (f", weights (expected, found) {wrong}" if wrong else ""))
    return qwen_moe_config(raw, source, QUANT_METHOD)


def qwen_moe_config(raw: dict, source: str, quant_method: str) -> tuple[MoEConfig, bool]:
    """(MoEConfig, norm_topk_prob) from a Qwen2/3-MoE config.json's own keys; every layer sparse."""
    if raw.get("mlp_only_layers") or raw.get("decoder_sparse_step", 1) != 1:
        raise CheckpointError(f"{source}: mlp_only_layers {raw.get('mlp_only_layers')} / decoder_sparse_step "
                              f"{raw.get('decoder_sparse_step')}: expected every layer sparse (no dense MLP layers)")
    # Qwen's config.json says num_experts; transformers 5 writes the same value as num_local_experts.
    num_experts = raw.get("num_experts", raw.get("num_local_experts"))
    missing = [k for k in ("num_hidden_layers", "num_experts_per_tok", "hidden_size", "moe_intermediate_size")
               if k not in raw] + (["num_experts"] if num_experts is None else [])
    if missing:
        raise CheckpointError(f"{source}: missing Qwen3-MoE config keys {missing}")
    try:
        config = MoEConfig(num_layers=raw["num_hidden_layers"], num_experts=num_experts,
                           experts_per_token=raw["num_experts_per_tok"], hidden_size=raw["hidden_size"],
                           intermediate_size=raw["moe_intermediate_size"], quant_method=quant_method)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None
    return config, bool(raw.get("norm_topk_prob", False))


class CompressedTensorsCheckpoint(SafetensorsExpertReader):
    """An opened compressed-tensors MXFP4 checkpoint (see the module docstring)."""

    layout = QUANT_METHOD

    def _build_layer(self, i: int) -> UnfusedLayerTensors:
        experts = []
        for e in range(self.config.num_experts):
            projs = [UnfusedProjection(weight=self._ref(expert_prefix(i, e) + proj + ".weight_packed"),
                                       weight_scale=self._ref(expert_prefix(i, e) + proj + ".weight_scale"))
                     for proj in PROJECTIONS]
            experts.append(UnfusedExpert(*projs))
        return UnfusedLayerTensors(i, experts, self._ref(router_name(i)), None)


def open_checkpoint(path: Path, *, nan_scales: str = "report") -> CompressedTensorsCheckpoint:
    config_file = path / CONFIG_FILE
    raw = read_json(config_file, "config", link_roots(path))     # bounded, and inside the folder
    config, norm_topk_prob = read_config(raw, str(config_file))
    return CompressedTensorsCheckpoint(path, config, qwen_moe(norm_topk_prob), _collect_tensors(path), nan_scales)


# ---- writing (tests' inputs) ------------------------------------------------------------------

def quantization_config(ignore: Sequence[str] = ("lm_head",)) -> dict:
    """The quantization_config compressed-tensors' `update_config` writes for MXFP4A16
    (the keys of compressed-tensors 0.20.1's `update_config` output)."""
    return {"quant_method": QUANT_METHOD, "format": MXFP4_FORMAT,
            "config_groups": {"group_0": {"format": MXFP4_FORMAT, "targets": ["Linear"],
                                          "weights": {**_WEIGHT_ARGS, "dynamic": False, "scale_dtype": "torch.uint8"},
                                          "input_activations": None, "output_activations": None}},
            "ignore": list(ignore), "quantization_status": "compressed", "kv_cache_scheme": None,
            "sparsity_config": {}, "transform_config": {}, "global_compression_ratio": None,
            "moe_sparsity_config": None, "version": "0.20.1"}


def layer_tensors(layer: int, fused: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's compressed-tensors tensors from fused gpt-oss-layout ones (w13_blocks
    [E, 2I, H/32, 16] with rows interleaved 2j gate / 2j + 1 up, w13_scales, w2_blocks, w2_scales,
    router_weight [E, H]); the packing is the same (low nibble = even column), so the bytes move as
    they are. Biases are not written: the format has none."""
    out = {}
    for e in range(fused["w13_blocks"].shape[0]):
        p = expert_prefix(layer, e)
        for proj, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
            out[p + proj + ".weight_packed"] = fused["w13_blocks"][e, rows].flatten(-2)
            out[p + proj + ".weight_scale"] = fused["w13_scales"][e, rows]
        out[p + "down_proj.weight_packed"] = fused["w2_blocks"][e].flatten(-2)
        out[p + "down_proj.weight_scale"] = fused["w2_scales"][e]
    out[router_name(layer)] = fused["router_weight"].to(torch.bfloat16)
    return {k: v.contiguous() for k, v in out.items()}


def write_checkpoint(path: str | Path, layers: Sequence[Mapping[str, torch.Tensor]], *, top_k: int,
                     norm_topk_prob: bool = True, extra_config: Mapping | None = None) -> Path:
    """Write a tiny Qwen3-MoE compressed-tensors MXFP4 checkpoint (one safetensors file) from each
    layer's fused tensors (see `layer_tensors`). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    e, two_i, h_blocks, _ = layers[0]["w13_blocks"].shape
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
              "num_hidden_layers": len(layers), "num_experts": e, "num_experts_per_tok": top_k,
              "hidden_size": h_blocks * BLOCK_SIZE, "moe_intermediate_size": two_i // 2,
              "norm_topk_prob": norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": [],
              "hidden_act": "silu", "quantization_config": quantization_config(), **(extra_config or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    tensors = {}
    for i, fused in enumerate(layers):
        tensors.update(layer_tensors(i, fused))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder
