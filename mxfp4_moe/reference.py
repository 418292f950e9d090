"""The pure-torch reference MoE: dequantize, per-expert matmul, the family's activation
(`semantics.activate`: gpt-oss SwiGLU or SiLU-gated), weighted sum.

Every fast path (the Triton kernels, the distributed layer) is checked against these functions;
tests, `verify` and the benchmarks import them from here and nowhere else.
"""

from __future__ import annotations

import torch

from .mxfp4 import dequantize
from .semantics import activate
from .weights import ExpertWeights


def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss SwiGLU on interleaved gate/up: [..., 2N] -> [..., N].

    gate = h[..., 0::2] clamped above at `limit`; up = h[..., 1::2] clamped to [-limit, limit];
    out = gate * sigmoid(alpha * gate) * (up + 1).
    """
    return activate(h, "swiglu_oai", alpha, limit)


def _pad_hidden(x: torch.Tensor, hidden_pad: int) -> torch.Tensor:
    if x.shape[-1] == hidden_pad:
        return x
    if x.shape[-1] > hidden_pad:
        raise ValueError(f"x has hidden size {x.shape[-1]}, larger than the weights' padded {hidden_pad}")
    return torch.nn.functional.pad(x, (0, hidden_pad - x.shape[-1]))


def reference_expert_mlp(x: torch.Tensor, weights: ExpertWeights, local_expert: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One expert's MLP on its rows: x [n, H or H_pad] -> [n, H_pad] in `dtype` (bias included,
    routing weight not applied)."""
    x = _pad_hidden(x, weights.hidden_pad).to(dtype)
    e = local_expert
    w13 = dequantize(weights.w13_blocks[e], weights.w13_scales[e], dtype)      # [2*I_pad, H_pad]
    h = x @ w13.T
    if weights.w13_channel_scale is not None:
        h = h * weights.w13_channel_scale[e].to(dtype)
    h = h + weights.w13_bias[e].to(dtype)
    a = activate(h, weights.activation, weights.swiglu_alpha, weights.swiglu_limit)   # [n, I_pad]
    w2 = dequantize(weights.w2_blocks[e], weights.w2_scales[e], dtype)        # [H_pad, I_pad]
    o = a @ w2.T
    if weights.w2_channel_scale is not None:
        o = o * weights.w2_channel_scale[e].to(dtype)
    return o + weights.w2_bias[e].to(dtype)


def reference_moe(x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The MoE layer on already-routed tokens, in `dtype` (float32 or float64).

    x: [T, H] (or [T, H_pad], padding zero); topk_weights: [T, k]; topk_ids: [T, k] global ids.
    Returns [T, H] in `dtype`: sum over the token's k experts of weight * expert_mlp(x). Experts
    not on this rank (expert_map == -1) contribute nothing, so summing the EP ranks' outputs
    gives the full layer; under TP each rank returns its partial sum (w2 bias on rank 0 only).
    """
    tokens = x.shape[0]
    out = torch.zeros((tokens, weights.hidden_pad), dtype=dtype, device=x.device)
    expert_map = weights.expert_map.to(x.device)
    local_ids = expert_map[topk_ids]                                          # [T, k], -1 = elsewhere
    for e in range(weights.num_local_experts):
        token_idx, slot = (local_ids == e).nonzero(as_tuple=True)
        if token_idx.numel() == 0:
            continue
        o = reference_expert_mlp(x[token_idx], weights, e, dtype)
        out.index_add_(0, token_idx, o * topk_weights[token_idx, slot].to(dtype).unsqueeze(-1))
    return out[:, :weights.hidden]


def reference_moe_matmul(x: torch.Tensor, blocks: torch.Tensor, scales_e8m0: torch.Tensor,
                         bias: torch.Tensor | None, meta, *, channel_scale: torch.Tensor | None = None,
                         gather: bool = True, swiglu: tuple[float, float] | None = None,
                         apply_row_weight: bool = False, combine: str = "none", n_out: int | None = None,
                         compute_dtype: torch.dtype = torch.bfloat16, config=None,
                         out: torch.Tensor | None = None, activation: str = "swiglu_oai") -> torch.Tensor:
    """Torch twin of `mxfp4_moe.kernels.moe_matmul` (same arguments, same output shapes and
    dtypes), computed in float32 from the dequantized weights. `meta` is a
    `routing.RoutingMetadata`; `config` is accepted and ignored. With `swiglu` = (alpha, limit),
    `activation` picks the function on the interleaved gate/up columns (`semantics.activate`). Rows the kernel leaves unwritten
    (combine="none", pairs dropped to other ranks) are zero here.
    """
    n_experts, n, k_half = blocks.shape
    k = 2 * k_half
    n_full = n // 2 if swiglu is not None else n
    n_out = n_full if n_out is None else n_out
    rows = meta.num_rows
    offsets = meta.expert_offsets.tolist()
    src = meta.sorted_token.long() if gather else torch.arange(rows, device=x.device)
    h_all = torch.zeros((rows, n_full), dtype=torch.float32, device=x.device)
    for e in range(n_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            continue
        xe = _pad_hidden(x[src[lo:hi]].float(), k)
        h = xe @ dequantize(blocks[e], scales_e8m0[e], torch.float32).T
        if channel_scale is not None:
            h = h * channel_scale[e]
        if bias is not None:
            h = h + bias[e]
        if swiglu is not None:
            h = activate(h, activation, *swiglu)
        if apply_row_weight:
            h = h * meta.sorted_weight[lo:hi, None]
        h_all[lo:hi] = h
    h_all = h_all[:, :n_out]
    if combine == "none":
        if out is not None:
            out.copy_(h_all)
            return out
        return h_all.to(compute_dtype)
    out = torch.zeros((meta.num_tokens, n_out), dtype=torch.float32, device=x.device)
    local = offsets[-1]
    out.index_add_(0, meta.sorted_token[:local].long(), h_all[:local])
    return out

