"""AMD Quark MXFP4 checkpoints (`quant_method: "quark"`, OCP MX fp4 weights): the reader, for
Qwen3-MoE and gpt-oss models, and a writer of tiny ones for tests.

Facts (amd-quark 0.13, read in its source: the package's torch side imports scipy and more, so
the tests cannot run it): `torch/utils/pack.py::Pack_fp4.pack` puts element 2k in the low nibble
(the reorder flag is unused for fp4); `torch/export/constants.py` names the scale `weight_scale`
and the static activation scale `input_scale` beside the packed `weight`;
`torch/utils/numerics.py::to_e8m0_uint8` stores 127 + round(log2 scale);
`torch/utils/llm/module_replacement/quark_experts.py::QuarkGptOssExperts` gives each gpt-oss
expert an `nn.Linear` gate_up_proj (rows interleaved: forward takes `gate_up[..., ::2]` as gate)
and down_proj, both with biases. vLLM's `quark.py::_is_w_ocp_mx_a_x` accepts the same weight spec.

  Qwen3-MoE: model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight   uint8 [out, in/2]
             ....weight_scale uint8 [out, in/32]; router model.layers.L.mlp.gate.weight; no biases
  gpt-oss:   model.layers.L.mlp.experts.E.gate_up_proj.{weight, weight_scale, bias}  [2I, H/2],
             [2I, H/32], [2I] (row 2j gate j, 2j + 1 up j); ...experts.E.down_proj.{weight,
             weight_scale, bias}; router model.layers.L.mlp.router.{weight, bias}

config.json: the family's own keys (Qwen3-MoE as in `compressed_tensors`; gpt-oss:
num_local_experts, num_experts_per_tok, intermediate_size, swiglu_limit) and quantization_config
{quant_method "quark", global_quant_config: {weight: {dtype "fp4", qscheme "per_group",
group_size 32, scale_format "e8m0", ...}, input_tensors: ...}}. Activation quantization
(`input_tensors`, per-expert `input_scale`) is not applied: activations stay in the compute
dtype, as for the MXFP4A16 schemes. Per-layer overrides (`layer_quant_config`) are not read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..checkpoint import CONFIG_FILE, CheckpointError, MoEConfig, _collect_tensors, link_roots, read_json
from ..mxfp4 import BLOCK_SIZE
from ..semantics import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT, MoESemantics, qwen_moe
from . import PROJECTIONS, SafetensorsExpertReader, UnfusedExpert, UnfusedLayerTensors, UnfusedProjection
from .compressed_tensors import qwen_moe_config

QUANT_METHOD = "quark"
Family = str                     # "qwen3_moe" or "gpt_oss" (config.json model_type)
FAMILIES = ("qwen3_moe", "gpt_oss")
# The weight spec MXFP4 needs (vLLM's _is_w_ocp_mx_a_x checks the same fields).
_WEIGHT_SPEC = {"dtype": "fp4", "qscheme": "per_group", "group_size": BLOCK_SIZE, "scale_format": "e8m0"}


def expert_prefix(layer: int, expert: int) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}."


def router_names(layer: int, family: Family) -> tuple[str, str | None]:
    if family == "gpt_oss":
        return f"model.layers.{layer}.mlp.router.weight", f"model.layers.{layer}.mlp.router.bias"
    return f"model.layers.{layer}.mlp.gate.weight", None


def detect(path: Path) -> bool:
    config_file = path / CONFIG_FILE
    if not (path.is_dir() and config_file.is_file()):
        return False
    try:
        quant = read_json(config_file, "config", link_roots(path)).get("quantization_config")
    except (CheckpointError, AttributeError):
        return False
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def read_config(raw: dict, source: str) -> tuple[MoEConfig, MoESemantics, Family]:
    weight = (raw["quantization_config"].get("global_quant_config") or {}).get("weight") or {}
    wrong = {k: (v, weight.get(k)) for k, v in _WEIGHT_SPEC.items() if weight.get(k) != v}
    if wrong:
        raise CheckpointError(f"{source}: quantization_config.global_quant_config.weight: expected MXFP4 "
                              f"{_WEIGHT_SPEC}, found (expected, found) {wrong}")
    family = raw.get("model_type")
    if family == "gpt_oss":
        try:
            config = MoEConfig(num_layers=raw["num_hidden_layers"], num_experts=raw["num_local_experts"],
                               experts_per_token=raw["num_experts_per_tok"], hidden_size=raw["hidden_size"],
                               intermediate_size=raw["intermediate_size"],
                               swiglu_limit=float(raw.get("swiglu_limit", GPT_OSS_SWIGLU_LIMIT)),
                               swiglu_alpha=float(raw.get("swiglu_alpha", GPT_OSS_SWIGLU_ALPHA)),
                               quant_method=QUANT_METHOD)
        except KeyError as err:
            raise CheckpointError(f"{source}: missing gpt-oss config key {err}") from None
        except ValueError as err:
            raise CheckpointError(f"{source}: {err}") from None
        return config, MoESemantics(swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit), family
    if family in ("qwen3_moe", "qwen2_moe"):
        config, norm_topk_prob = qwen_moe_config(raw, source, QUANT_METHOD)
        return config, qwen_moe(norm_topk_prob), "qwen3_moe"
    raise CheckpointError(f"{source}: model_type {family!r}: the Quark reader reads MoE models of types "
                          f"{FAMILIES}")


class InterleavedRows:
    """The gate (parity 0) or up (parity 1) rows of one expert's interleaved gate_up tensor
    [2I, ...], as a tensor [I, ...] of its own: rows [a, b) read rows [2a, 2b) of the file (both
    halves) and keep every other one."""

    def __init__(self, ref, parity: int):
        self._ref, self._parity = ref, parity
        self.name, self.file, self.dtype = f"{ref.name}[{parity}::2]", ref.file, ref.dtype
        self.shape = (ref.shape[0] // 2, *ref.shape[1:])
        self.nbytes = ref.nbytes // 2

    def read(self, *index: slice, contiguous: bool = True) -> torch.Tensor:
        rows = index[0] if index else slice(None)
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"tensor {self.name}: rows must be a step-1 slice, found {rows!r}")
        a, b, _ = rows.indices(self.shape[0])
        out = self._ref.read(slice(2 * a, 2 * max(a, b)), *index[1:], contiguous=False)[self._parity::2]
        return out.contiguous() if contiguous else out

    def read_all(self) -> torch.Tensor:
        return self.read()


class QuarkCheckpoint(SafetensorsExpertReader):
    """An opened Quark MXFP4 checkpoint of a Qwen3-MoE or gpt-oss model (module docstring)."""

    layout = QUANT_METHOD

    def __init__(self, path: Path, config: MoEConfig, semantics: MoESemantics, family: Family, tensors: dict,
                 nan_scales: str):
        self.family = family
        super().__init__(path, config, semantics, tensors, nan_scales)

    def _proj(self, prefix: str, bias: bool) -> UnfusedProjection:
        return UnfusedProjection(weight=self._ref(prefix + ".weight"), weight_scale=self._ref(prefix + ".weight_scale"),
                                 bias=self._ref(prefix + ".bias") if bias else None)

    def _build_layer(self, i: int) -> UnfusedLayerTensors:
        experts = []
        for e in range(self.config.num_experts):
            p = expert_prefix(i, e)
            if self.family == "gpt_oss":
                fused = self._proj(p + "gate_up_proj", bias=True)
                gate, up = (UnfusedProjection(*(InterleavedRows(ref, parity) for ref in
                                                (fused.weight, fused.weight_scale, fused.bias)))
                            for parity in (0, 1))
                experts.append(UnfusedExpert(gate, up, self._proj(p + "down_proj", bias=True)))
            else:
                experts.append(UnfusedExpert(*(self._proj(p + proj, bias=False) for proj in PROJECTIONS)))
        weight, bias = router_names(i, self.family)
        return UnfusedLayerTensors(i, experts, self._ref(weight), self._ref(bias) if bias else None)


def open_checkpoint(path: Path, *, nan_scales: str = "report") -> QuarkCheckpoint:
    config_file = path / CONFIG_FILE
    raw = read_json(config_file, "config", link_roots(path))     # bounded, and inside the folder
    config, semantics, family = read_config(raw, str(config_file))
    return QuarkCheckpoint(path, config, semantics, family, _collect_tensors(path), nan_scales)


# ---- writing (tests' inputs) ------------------------------------------------------------------

def quantization_config() -> dict:
    """A Quark MXFP4 W4A16 quantization_config (the fields `config.py::OCP_MXSpec.to_dict` writes
    that a reader looks at, and the export block vLLM requires)."""
    weight = {**_WEIGHT_SPEC, "ch_axis": -1, "scale_calculation_mode": "even", "scale_type": "float",
              "round_method": "half_even", "is_dynamic": False, "observer_cls": "PerBlockMXObserver"}
    return {"quant_method": QUANT_METHOD, "global_quant_config": {"weight": weight, "input_tensors": None,
                                                                   "output_tensors": None, "bias": None},
            "layer_quant_config": {}, "layer_type_quant_config": {}, "kv_cache_quant_config": {},
            "exclude": ["lm_head", "*.gate", "*.router"], "quant_mode": "eager_mode",
            "export": {"kv_cache_group": [], "pack_method": "reorder", "weight_format": "real_quantized"}}


def layer_tensors(layer: int, fused: Mapping[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """One layer's Quark tensors from fused gpt-oss-layout ones (w13_blocks [E, 2I, H/32, 16]
    rows interleaved, w13_scales, w2_blocks, w2_scales, router_weight; for gpt-oss also w13_bias,
    w2_bias, router_bias). Packing is the same (low nibble = even element): bytes move as they are;
    floats are written in bf16."""
    out = {}
    bf16 = torch.bfloat16
    for e in range(fused["w13_blocks"].shape[0]):
        p = expert_prefix(layer, e)
        if family == "gpt_oss":
            out[p + "gate_up_proj.weight"] = fused["w13_blocks"][e].flatten(-2)
            out[p + "gate_up_proj.weight_scale"] = fused["w13_scales"][e]
            out[p + "gate_up_proj.bias"] = fused["w13_bias"][e].to(bf16)
            out[p + "down_proj.bias"] = fused["w2_bias"][e].to(bf16)
        else:
            for proj, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
                out[p + proj + ".weight"] = fused["w13_blocks"][e, rows].flatten(-2)
                out[p + proj + ".weight_scale"] = fused["w13_scales"][e, rows]
        out[p + "down_proj.weight"] = fused["w2_blocks"][e].flatten(-2)
        out[p + "down_proj.weight_scale"] = fused["w2_scales"][e]
    weight, bias = router_names(layer, family)
    out[weight] = fused["router_weight"].to(bf16)
    if bias:
        out[bias] = fused["router_bias"].to(bf16)
    return {k: v.contiguous() for k, v in out.items()}


def write_checkpoint(path: str | Path, layers: Sequence[Mapping[str, torch.Tensor]], *, top_k: int,
                     family: Family = "qwen3_moe", norm_topk_prob: bool = True) -> Path:
    """Write a tiny Quark MXFP4 checkpoint of `family` (one safetensors file). Returns the folder."""
    from safetensors.torch import save_file

    if family not in FAMILIES:
        raise ValueError(f"write_checkpoint: family must be one of {FAMILIES}, got {family!r}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    e, two_i, h_blocks, _ = layers[0]["w13_blocks"].shape
    common = {"num_hidden_layers": len(layers), "num_experts_per_tok": top_k, "hidden_size": h_blocks * BLOCK_SIZE,
              "quantization_config": quantization_config()}
    if family == "gpt_oss":
        config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "num_local_experts": e,
                  "intermediate_size": two_i // 2, "swiglu_limit": GPT_OSS_SWIGLU_LIMIT, **common}
    else:
        config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": e,
                  "moe_intermediate_size": two_i // 2, "norm_topk_prob": norm_topk_prob, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "hidden_act": "silu", **common}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    tensors = {}
    for i, fused in enumerate(layers):
        tensors.update(layer_tensors(i, fused, family))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder
