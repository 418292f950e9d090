"""Tiny synthetic checkpoints in the other formats (`mxfp4_moe.formats`): the same seeded layers
`synthetic.synthetic_layer` makes for gpt-oss, written as compressed-tensors (Qwen3-MoE) or GGUF
(gpt-oss). The tests' inputs: no downloads. `dense_reference` is the MoE those files mean,
computed from the dequantized weights and the format's semantics, independently of the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from .checkpoint import MoEConfig
from .mxfp4 import dequantize
from .semantics import GPT_OSS, MoESemantics, activate, qwen_moe, score
from .synthetic import LayerWeights, synthetic_layer

Format = Literal["compressed-tensors", "gguf"]
FORMATS: tuple[str, ...] = ("compressed-tensors", "gguf")


def _fused(layer: LayerWeights) -> dict[str, torch.Tensor]:
    return {name: getattr(layer, name) for name in ("w13_blocks", "w13_scales", "w13_bias", "w2_blocks", "w2_scales",
                                                    "w2_bias", "router_weight", "router_bias")}


def format_semantics(fmt: str, norm_topk_prob: bool = False) -> MoESemantics:
    return qwen_moe(norm_topk_prob) if fmt == "compressed-tensors" else GPT_OSS


def make_format_checkpoint(path: str | Path, fmt: Format, *, num_layers: int = 1, num_experts: int = 4,
                           hidden: int = 64, intermediate: int = 96, top_k: int = 2, seed: int = 0,
                           norm_topk_prob: bool = False) -> tuple[Path, list[LayerWeights]]:
    """Write a synthetic checkpoint of `fmt` under `path` (a folder; GGUF: `path`/model.gguf).
    Returns (what to open, the layers written). compressed-tensors drops the biases (the format
    has none) and stores the router in bf16; GGUF keeps biases and router in float32."""
    from .formats import compressed_tensors, gguf
    config = MoEConfig(num_layers=num_layers, num_experts=num_experts, experts_per_token=top_k,
                       hidden_size=hidden, intermediate_size=intermediate)
    layers = [synthetic_layer(config, i, seed=seed) for i in range(num_layers)]
    folder = Path(path)
    if fmt == "compressed-tensors":
        for layer in layers:          # what the file holds, so the layers describe it exactly
            layer.router_weight = layer.router_weight.bfloat16().float()
            layer.router_bias = torch.zeros_like(layer.router_bias)
            layer.w13_bias = torch.zeros_like(layer.w13_bias)
            layer.w2_bias = torch.zeros_like(layer.w2_bias)
        target = compressed_tensors.write_checkpoint(folder, [_fused(lw) for lw in layers], top_k=top_k,
                                                     norm_topk_prob=norm_topk_prob)
    elif fmt == "gguf":
        target = gguf.write_checkpoint(folder / "model.gguf", [_fused(lw) for lw in layers], top_k=top_k)
    else:
        raise ValueError(f"make_format_checkpoint: fmt must be one of {FORMATS}, got {fmt!r}")
    return target, layers


def dense_reference(x: torch.Tensor, layer: LayerWeights, semantics: MoESemantics, top_k: int) -> torch.Tensor:
    """The MoE output [T, H] float64 of one layer: router logits (+ bias), `semantics.score`, each
    chosen expert's dequantized w13 (interleaved rows) + bias, `semantics.activate`, w2 + bias,
    weighted sum."""
    x = x.double()
    logits = (x @ layer.router_weight.double().T + layer.router_bias.double()).float()
    weights, ids = score(logits, top_k, semantics.router, semantics.norm_topk_prob)
    w13 = dequantize(layer.w13_blocks, layer.w13_scales, torch.float64)          # [E, 2I, H]
    w2 = dequantize(layer.w2_blocks, layer.w2_scales, torch.float64)             # [E, H, I]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = int(ids[t, j])
            h = w13[e] @ x[t] + layer.w13_bias[e].double()
            a = activate(h, semantics.activation, semantics.swiglu_alpha, semantics.swiglu_limit)
            out[t] += float(weights[t, j]) * (w2[e] @ a + layer.w2_bias[e].double())
    return out
