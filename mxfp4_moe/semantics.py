"""What differs between MoE families, as data: the expert activation, whether the experts have
biases, and how the router turns logits into the k weights. Readers say which semantics their
checkpoint implies; the torch reference, the routing and the kernels' constexprs follow it.

Families (transformers 5.25: models/{gpt_oss,qwen3_moe,qwen2_moe}/modeling_*.py):

  family     activation                                             router
  gpt-oss    "swiglu_oai": gate clamp(max=limit), up clamp(+-limit), "topk_softmax": logits + bias,
             gate * sigmoid(alpha * gate) * (up + 1); biases        top-k, softmax over the k
  Qwen3-MoE  "silu": silu(gate) * up; no biases                     "softmax_topk": softmax over
  Qwen2-MoE                                                          all E (float32), top-k, divided
                                                                     by their sum if norm_topk_prob

Weight layout, the same for every activation: w13 rows are interleaved, row 2j = gate j, row
2j + 1 = up j (gpt-oss's own order). Readers of families that store gate and up apart (Qwen's
`gate_proj` / `up_proj`) interleave them on load. One layout means one TP slicing (a contiguous
w13 row range keeps each gate/up pair on one rank), one kernel epilogue split and one fragment
order; only the function applied to each (gate, up) pair differs.

Shared experts (Qwen2-MoE, DeepSeek) are dense and stay in the host model, outside this layer.
Note: "softmax_topk" with norm_topk_prob equals "topk_softmax" without a bias (the softmax over
all E, restricted to the top k and renormalised, is the softmax of the top-k logits): only
norm_topk_prob=False (or a router bias) tells the two orders apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Activation = Literal["swiglu_oai", "silu"]
RouterScoring = Literal["topk_softmax", "softmax_topk"]
ACTIVATIONS: tuple[str, ...] = ("swiglu_oai", "silu")
ROUTER_SCORINGS: tuple[str, ...] = ("topk_softmax", "softmax_topk")

GPT_OSS_SWIGLU_ALPHA = 1.702
GPT_OSS_SWIGLU_LIMIT = 7.0


@dataclass(frozen=True)
class MoESemantics:
    """One family's MoE semantics.

    activation: "swiglu_oai" (gpt-oss: uses swiglu_alpha, swiglu_limit) or "silu" (SiLU-gated:
      silu(gate) * up; alpha and limit unused). Both on interleaved w13 rows (module docstring).
    has_bias: whether the checkpoint's experts have w13/w2 biases (absent ones load as zeros).
    router: "topk_softmax" or "softmax_topk"; norm_topk_prob: renormalise the k probabilities
      of "softmax_topk" to sum 1 (ignored by "topk_softmax", whose weights always sum to 1).
    """
    activation: Activation = "swiglu_oai"
    swiglu_alpha: float = GPT_OSS_SWIGLU_ALPHA
    swiglu_limit: float = GPT_OSS_SWIGLU_LIMIT
    has_bias: bool = True
    router: RouterScoring = "topk_softmax"
    norm_topk_prob: bool = True

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoESemantics.activation: expected one of {ACTIVATIONS}, found {self.activation!r}")
        if self.router not in ROUTER_SCORINGS:
            raise ValueError(f"MoESemantics.router: expected one of {ROUTER_SCORINGS}, found {self.router!r}")


GPT_OSS = MoESemantics()


def qwen_moe(norm_topk_prob: bool) -> MoESemantics:
    """Qwen2/Qwen3-MoE (and Mixtral-style) experts: SiLU-gated, no biases, softmax then top-k."""
    return MoESemantics(activation="silu", has_bias=False, router="softmax_topk", norm_topk_prob=norm_topk_prob)


def activate(h: torch.Tensor, activation: str, alpha: float = GPT_OSS_SWIGLU_ALPHA,
             limit: float = GPT_OSS_SWIGLU_LIMIT) -> torch.Tensor:
    """The expert activation on interleaved gate/up columns: h [..., 2N] -> [..., N], h's dtype."""
    gate, up = h[..., 0::2], h[..., 1::2]
    if activation == "swiglu_oai":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return gate * torch.sigmoid(alpha * gate) * (up + 1)
    if activation == "silu":
        return gate * torch.sigmoid(gate) * up
    raise ValueError(f"activate: expected an activation in {ACTIVATIONS}, found {activation!r}")


def score(logits: torch.Tensor, top_k: int, router: str, norm_topk_prob: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] float32 (bias already added) -> (weights [T, k] float32, ids [T, k]
    int64), in torch. "topk_softmax": softmax over the k largest logits. "softmax_topk": softmax
    over all E, the k largest probabilities, divided by their sum when norm_topk_prob."""
    if router == "topk_softmax":
        top_logits, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top_logits, dim=-1), ids
    if router == "softmax_topk":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
    raise ValueError(f"score: expected a router scoring in {ROUTER_SCORINGS}, found {router!r}")
