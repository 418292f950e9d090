"""transformers as an independent oracle: run its own MoE block for the weights' family on our
dequantized weights: `GptOssMLP` (gpt-oss semantics) or `Qwen3MoeSparseMoeBlock` (SiLU-gated
experts, softmax then top-k: `semantics.qwen_moe`).

Needs the optional dependency transformers (`pip install "mxfp4-moe[transformers]"`).
"""

from __future__ import annotations

import torch

from ..mxfp4 import dequantize
from ..weights import ExpertWeights


def _require_transformers():
    try:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    except ImportError as exc:
        raise ImportError("the transformers oracle needs transformers: pip install 'mxfp4-moe[transformers]'") from exc
    return GptOssConfig, GptOssMLP


def build_transformers_moe(weights: ExpertWeights, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A float32 transformers MoE block on `device` holding `weights` dequantized (unsharded
    weights only: one rank holding every expert and the whole intermediate size): `GptOssMLP`,
    or `Qwen3MoeSparseMoeBlock` for the "silu" activation. transformers stores gpt-oss experts
    transposed (gate_up_proj [E, H, 2I] interleaved, down_proj [E, I, H]) and Qwen3-MoE's as
    gate_up_proj [E, 2I, H] = cat(gate, up), down_proj [E, H, I]."""
    if weights.num_local_experts != weights.num_experts or weights.tp_size != 1:
        raise ValueError("build_transformers_moe needs unsharded weights (tp 1, every expert local); "
                         f"got {weights.num_local_experts} of {weights.num_experts} experts at tp {weights.tp_size}")
    if weights.activation == "silu":
        return _build_qwen3_moe(weights, device)
    if weights.router_scoring != "topk_softmax":
        raise ValueError(f"build_transformers_moe: no transformers block for activation {weights.activation!r} "
                         f"with router {weights.router_scoring!r}")
    GptOssConfig, GptOssMLP = _require_transformers()
    hidden, inter = weights.hidden, weights.inter
    config = GptOssConfig(num_local_experts=weights.num_experts, num_experts_per_tok=weights.top_k,
                          hidden_size=hidden, intermediate_size=inter, swiglu_limit=weights.swiglu_limit,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          vocab_size=32)
    config.swiglu_alpha = weights.swiglu_alpha
    config._experts_implementation = "eager"      # transformers' own per-expert loop, no hub kernels
    with torch.device(device):
        mlp = GptOssMLP(config).float()
    w = weights.to(device)
    with torch.no_grad():
        w13 = dequantize(w.w13_blocks, w.w13_scales, torch.float32)[:, :2 * inter, :hidden]
        w2 = dequantize(w.w2_blocks, w.w2_scales, torch.float32)[:, :hidden, :inter]
        mlp.experts.gate_up_proj.copy_(w13.transpose(1, 2))
        mlp.experts.gate_up_proj_bias.copy_(w.w13_bias[:, :2 * inter])
        mlp.experts.down_proj.copy_(w2.transpose(1, 2))
        mlp.experts.down_proj_bias.copy_(w.w2_bias[:, :hidden])
        mlp.router.weight.copy_(w.router_weight[:, :hidden])
        mlp.router.bias.copy_(w.router_bias)
    return mlp


def _build_qwen3_moe(weights: ExpertWeights, device) -> torch.nn.Module:
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError as exc:
        raise ImportError("the transformers oracle needs transformers: pip install 'mxfp4-moe[transformers]'") from exc
    if weights.router_scoring != "softmax_topk":
        raise ValueError(f"build_transformers_moe: Qwen3MoeSparseMoeBlock routes softmax then top-k, the weights "
                         f"say {weights.router_scoring!r}")
    if any(bool(t.any()) for t in (weights.w13_bias, weights.w2_bias, weights.router_bias)):
        raise ValueError("build_transformers_moe: Qwen3MoeSparseMoeBlock has no biases, these weights have some")
    hidden, inter = weights.hidden, weights.inter
    config = Qwen3MoeConfig(num_experts=weights.num_experts, num_experts_per_tok=weights.top_k, hidden_size=hidden,
                            moe_intermediate_size=inter, norm_topk_prob=weights.norm_topk_prob,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            vocab_size=32)
    config._experts_implementation = "eager"
    with torch.device(device):
        block = Qwen3MoeSparseMoeBlock(config).float()
    w = weights.to(device)
    with torch.no_grad():
        w13 = dequantize(w.w13_blocks, w.w13_scales, torch.float32)[:, :2 * inter, :hidden]
        block.experts.gate_up_proj.copy_(torch.cat((w13[:, 0::2], w13[:, 1::2]), dim=1))   # our rows interleaved
        block.experts.down_proj.copy_(dequantize(w.w2_blocks, w.w2_scales, torch.float32)[:, :hidden, :inter])
        block.gate.weight.copy_(w.router_weight[:, :hidden])
    return block


def transformers_moe_forward(x: torch.Tensor, weights: ExpertWeights, config=None) -> torch.Tensor:
    """transformers' MoE block on x [T, H] (float32, CPU): routing and experts. Returns [T, H] float32."""
    mlp = build_transformers_moe(weights)
    with torch.no_grad():
        out = mlp(x.detach().float().cpu().unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out)[0]
