"""Routing for the gpt-oss router: logits = x @ W_r.T + b_r, top-k experts per token, softmax
over the k chosen. Shared by every backend, so the kernels and the reference route identically.
"""

from __future__ import annotations

import torch


def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, top_k: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts.

    x: [T, H] (or [T, H_pad] with zero padding); router_weight: [E, H_pad]; router_bias: [E].
    Returns (topk_weights [T, k] float32, summing to 1 per token; topk_ids [T, k] int64, global ids).
    Logits are computed in float32 whatever x's dtype.
    """
    if x.dim() != 2:
        raise ValueError(f"route expects x as [tokens, hidden], got shape {tuple(x.shape)}")
    num_experts = router_weight.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    hidden = x.shape[1]
    if hidden > router_weight.shape[1]:
        raise ValueError(f"x has hidden size {hidden} but the router weight only {router_weight.shape[1]}")
    # Padded router columns are zero, so narrowing the weight to x's width changes nothing.
    logits = x.float() @ router_weight[:, :hidden].float().T + router_bias.float()
    top_logits, topk_ids = torch.topk(logits, top_k, dim=-1)
    topk_weights = torch.softmax(top_logits, dim=-1)
    return topk_weights, topk_ids
