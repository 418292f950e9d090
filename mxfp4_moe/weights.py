"""`ExpertWeights`: one MoE layer's weights for one rank, in the padded layout the kernels use.

The loader produces it, the kernels, the torch reference and the MoE module consume it. It holds
no logic beyond shape checks and a few derived views.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .mxfp4 import BLOCK_SIZE


@dataclass
class ExpertWeights:
    """One layer, one rank. E_local experts; sizes padded for the kernel.

    w13 (gate/up, fused, rows interleaved: row 2j = gate j, row 2j+1 = up j):
      w13_blocks [E_local, 2 * inter_pad, hidden_pad // 2] uint8, low nibble = even k
      w13_scales [E_local, 2 * inter_pad, hidden_pad // 32] uint8 (E8M0)
      w13_bias   [E_local, 2 * inter_pad] float32
    w2 (down):
      w2_blocks  [E_local, hidden_pad, inter_pad // 2] uint8
      w2_scales  [E_local, hidden_pad, inter_pad // 32] uint8
      w2_bias    [E_local, hidden_pad] float32 (zeros on TP ranks other than 0: added once)
    optional per-output-channel weight scales (multiply the matmul output, before the bias):
      w13_channel_scale [E_local, 2 * inter_pad] float32 or None
      w2_channel_scale  [E_local, hidden_pad] float32 or None
    router (replicated on every rank):
      router_weight [num_experts, hidden_pad] float32, router_bias [num_experts] float32

    Padding holds zero codes, zero biases, and scale byte PAD_SCALE_E8M0 (finite).
    `hidden`/`inter` are the unpadded sizes (`inter` is this rank's TP share of the checkpoint's
    intermediate size); `local_experts` are the global ids of the E_local experts, in order, and
    `expert_map[g]` is the local index of global expert g, or -1 when it lives on another rank.
    """

    w13_blocks: torch.Tensor
    w13_scales: torch.Tensor
    w13_bias: torch.Tensor
    w2_blocks: torch.Tensor
    w2_scales: torch.Tensor
    w2_bias: torch.Tensor
    router_weight: torch.Tensor
    router_bias: torch.Tensor
    hidden: int
    inter: int
    local_experts: torch.Tensor
    expert_map: torch.Tensor
    top_k: int
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    activation: str = "swiglu_oai"
    """The expert activation on the interleaved w13 rows (`semantics.ACTIVATIONS`)."""
    router_scoring: str = "topk_softmax"
    """How the router turns logits into the k weights (`semantics.ROUTER_SCORINGS`)."""
    norm_topk_prob: bool = True
    """"softmax_topk" only: renormalise the k probabilities to sum 1."""
    w13_channel_scale: torch.Tensor | None = None
    w2_channel_scale: torch.Tensor | None = None
    w2_bias_included: bool = True
    """False on TP ranks other than 0, whose w2_bias is zero so the sum over ranks adds it once."""
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    bytes_read: int = 0
    """Bytes this rank read from the checkpoint to build these weights."""
    extras: dict = field(default_factory=dict)

    @property
    def semantics(self):
        """The family's MoE semantics these weights run with (`semantics.MoESemantics`)."""
        from .semantics import MoESemantics
        return MoESemantics(activation=self.activation, swiglu_alpha=self.swiglu_alpha,
                            swiglu_limit=self.swiglu_limit, router=self.router_scoring,
                            norm_topk_prob=self.norm_topk_prob)

    # ---- derived sizes ----
    @property
    def num_local_experts(self) -> int:
        return self.w13_blocks.shape[0]

    @property
    def num_experts(self) -> int:
        return self.expert_map.shape[0]

    @property
    def hidden_pad(self) -> int:
        return self.w2_blocks.shape[1]

    @property
    def inter_pad(self) -> int:
        return self.w13_blocks.shape[1] // 2

    @property
    def device(self) -> torch.device:
        # (the bias, not the blocks: a layer that keeps only its fragment-order copy of the expert
        # weights holds shape-only meta tensors for the blocks and scales; `MXFP4MoE`)
        return self.w13_bias.device

    def validate(self) -> None:
        """Check the shapes and dtypes against each other; raise ValueError naming the tensor."""
        e, hp, ip = self.num_local_experts, self.hidden_pad, self.inter_pad
        expected = {
            "w13_blocks": ((e, 2 * ip, hp // 2), torch.uint8),
            "w13_scales": ((e, 2 * ip, hp // BLOCK_SIZE), torch.uint8),
            "w13_bias": ((e, 2 * ip), torch.float32),
            "w2_blocks": ((e, hp, ip // 2), torch.uint8),
            "w2_scales": ((e, hp, ip // BLOCK_SIZE), torch.uint8),
            "w2_bias": ((e, hp), torch.float32),
            "router_weight": ((self.num_experts, hp), torch.float32),
            "router_bias": ((self.num_experts,), torch.float32),
        }
        if self.w13_channel_scale is not None:
            expected["w13_channel_scale"] = ((e, 2 * ip), torch.float32)
        if self.w2_channel_scale is not None:
            expected["w2_channel_scale"] = ((e, hp), torch.float32)
        for name, (shape, dtype) in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"ExpertWeights.{name}: expected {shape} {dtype}, found {tuple(t.shape)} {t.dtype}")
        if hp % BLOCK_SIZE or ip % BLOCK_SIZE:
            raise ValueError(f"ExpertWeights: hidden_pad {hp} and inter_pad {ip} must be multiples of {BLOCK_SIZE}")
        if not (0 < self.hidden <= hp and 0 <= self.inter <= ip):
            raise ValueError(f"ExpertWeights: unpadded sizes hidden {self.hidden}, inter {self.inter} "
                             f"exceed padded {hp}, {ip}")
        from .semantics import ACTIVATIONS, ROUTER_SCORINGS
        if self.activation not in ACTIVATIONS or self.router_scoring not in ROUTER_SCORINGS:
            raise ValueError(f"ExpertWeights: activation {self.activation!r} / router_scoring "
                             f"{self.router_scoring!r}: expected one of {ACTIVATIONS} / {ROUTER_SCORINGS}")
        if self.local_experts.numel() != e:
            raise ValueError(f"ExpertWeights.local_experts has {self.local_experts.numel()} ids for {e} experts")

    def check_tokens(self, x: torch.Tensor, caller: str, rows: str = "") -> None:
        """Raise ValueError unless x is [T, hidden] or [T, hidden_pad] on the weights' device
        (caller names the call in the message, rows what x's rows are, when that helps)."""
        if x.dim() != 2 or x.shape[1] not in (self.hidden, self.hidden_pad):
            what = f"x ({rows})" if rows else "x"
            raise ValueError(f"{caller}: {what} must be [tokens, {self.hidden}] (or [tokens, "
                             f"{self.hidden_pad}] padded), got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"{caller}: x is on {x.device}, the weights on {self.device}")

    def to(self, device: torch.device | str) -> "ExpertWeights":
        """A copy with every tensor moved to `device`."""
        moved = {}
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return replace(self, **moved)
