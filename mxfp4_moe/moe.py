"""`MXFP4MoE`: the gpt-oss MoE layer on MXFP4 expert weights, and the one place that chooses
between the Triton kernels (`mxfp4_moe.kernels`) and the pure-torch reference (`reference.py`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from . import kernel_api
from .reference import reference_moe
from .eager_plan import planned_call
from .routing import exact_bf16, route, route_with_metadata, routing_metadata
from .weights import ExpertWeights

Backend = Literal["auto", "triton", "torch"]
# The ExpertWeights fields a layer with a fragment-order copy need not keep (`keep_checkpoint_order`).
CHECKPOINT_ORDER_TENSORS = ("w13_blocks", "w13_scales", "w2_blocks", "w2_scales")
Combine = Literal["auto", "atomic", "slots"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" for CUDA weights (when Triton is installed), "torch" elsewhere; check
    that "triton" can run here."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"MXFP4MoE: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and not kernel_api.triton_installed():
            warnings.warn("MXFP4MoE: Triton is not installed, so the layer runs the torch reference "
                          "(slow); `pip install triton` for the kernels", stacklevel=3)
            return "torch"
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not kernel_api.triton_installed():
        raise ImportError("MXFP4MoE: backend='triton' needs Triton, which is not installed: "
                          "`pip install 'triton>=3.6,<3.10'` (Linux), or use backend='torch'")
    if backend == "triton" and device.type != "cuda" and not kernel_api.interpreting():
        raise ValueError(
            f"MXFP4MoE: backend='triton' needs the weights on a CUDA device (they are on {device}); "
            "on a CPU set TRITON_INTERPRET=1 before importing mxfp4_moe.kernels to run the kernels "
            "through Triton's interpreter (slow, for tests), or use backend='torch'")
    return backend


L2_PREFETCH_MAX_ROWS = 0
"""Up to this many routed rows (T * k), w13's launch asks the L2 for the routed experts' w2
weights while it runs (`moe_matmul(l2_prefetch=)`, the "rs" kernel), so that w2 reads them from
L2. Off (0) until measured on a GPU (`benchmarks/probes/probe_layer_ab.py --switch l2_prefetch`);
at decode sizes the two matmuls' weights (about 50 MB at one token, top-4) fill the L2."""


class MXFP4MoE(torch.nn.Module):
    """MoE layer: route, w13 + activation, w2, routing-weighted combine, with the family's
    semantics the weights carry (`ExpertWeights.semantics`: gpt-oss's top-k softmax and clamped
    SwiGLU, or Qwen-style softmax-then-top-k and SiLU-gated experts).

    weights: one rank's `ExpertWeights` (padded layout); the layer runs where they live.
    backend: "triton" (CUDA, or the interpreter under TRITON_INTERPRET=1), "torch" (dequantize,
      per-expert matmul in float32: the reference) or "auto" (triton on CUDA, torch elsewhere).
    compute_dtype: the kernels' operand dtype; default bfloat16 on CUDA, float32 in the
      interpreter (whose bf16 is broken). Ignored by the torch backend.
    combine: how the triton backend sums a token's k expert outputs: "atomic" (fp32 atomic adds
      fused into the w2 epilogue), "slots" (per-slot rows, then a sum: deterministic) or "auto"
      (the default: atomic, faster at every T measured; benchmarks/RESULTS.md 3.4).

    fragment_order: build a copy of the expert weights in fragment order (`kernels.fragment_layout`),
      which the Hopper kernel that feeds decoded weights to the tensor cores from registers reads
      (faster than the checkpoint-order kernels at every T measured, benchmarks/RESULTS.md 3.2).
      None (default): on a Hopper GPU with the triton backend and bf16, when every scale byte is
      within the layout's range and the activation is gpt-oss's (the kernel's only epilogue).
    keep_checkpoint_order: whether the layer also holds the checkpoint-order expert weights
      (blocks and scales) once a fragment-order copy exists. None (default): only when there is
      no fragment copy, so on Hopper the layer holds one copy of the expert weights, not two
      (about half the memory, benchmarks/RESULTS.md 3.3). The layer
      never changes `weights` itself: the dropped tensors are freed when the caller lets go of
      its own references (as `from_checkpoint` does). `self.weights` then holds shape-only (meta
      device) stand-ins for them, and `checkpoint_weights()` rebuilds them exactly from the
      fragment copy.

    eager_plans: whether eager calls of up to `eager_plan.MAX_PLANNED_TOKENS` tokens replay the
      launches the first call at that token count recorded (`eager_plan`), which costs the host
      a fraction of choosing them again. None (default): on CUDA with the triton backend. A plan
      keeps its call's intermediate tensors as workspace (about 0.05 MB per token at gpt-oss
      sizes, at most `eager_plan.MAX_PLANS` plans).

    forward(x [T, H] or [T, H_pad]) -> [T, H] in x's dtype. Under TP it is this rank's partial sum
    (w2 bias only on rank 0); under EP, pairs routed to other ranks' experts contribute nothing.
    Under torch.compile the forward is one custom op (`mxfp4_moe::moe_forward`, `custom_ops.py`),
    so the compiler traces through the layer without a graph break.
    """

    def __init__(self, weights: ExpertWeights, backend: Backend = "auto",
                 compute_dtype: torch.dtype | None = None, combine: Combine = "auto",
                 fragment_order: bool | None = None, keep_checkpoint_order: bool | None = None,
                 eager_plans: bool | None = None):
        super().__init__()
        weights.validate()
        self.weights = weights
        self.backend = resolve_backend(backend, weights.device)
        if compute_dtype is None:
            compute_dtype = torch.bfloat16 if weights.device.type == "cuda" else torch.float32
        self.compute_dtype = compute_dtype
        if combine not in ("auto", "atomic", "slots"):
            raise ValueError(f"MXFP4MoE: combine must be 'auto', 'atomic' or 'slots', got {combine!r}")
        self.combine = combine
        self.router_weight_bf16 = exact_bf16(weights.router_weight)   # None: route in float32
        self.fragments = self._fragments(fragment_order)    # {"w13": ..., "w2": ...} or None
        if keep_checkpoint_order is False and self.fragments is None:
            raise ValueError("MXFP4MoE: keep_checkpoint_order=False needs the fragment-order copy (fragment_order "
                             "True, or None on a Hopper GPU with the triton backend and bf16); without it the "
                             "checkpoint-order weights are the only copy")
        self.eager_plans = (self.backend == "triton" and weights.device.type == "cuda") if eager_plans is None \
            else eager_plans
        self._eager_plans: dict = {}        # plan key -> eager_plan.EagerPlan
        from .custom_ops import register_layer
        self.op_name = register_layer(self)     # what torch.compile's graphs call this layer by
        if self.fragments is not None and not keep_checkpoint_order:
            self.weights = replace(weights, **{name: torch.empty(getattr(weights, name).shape, dtype=torch.uint8,
                                                                 device="meta")
                                               for name in CHECKPOINT_ORDER_TENSORS})

    @property
    def holds_checkpoint_order(self) -> bool:
        """Whether `weights` holds the checkpoint-order blocks and scales (else meta stand-ins)."""
        return not self.weights.w13_blocks.is_meta

    def checkpoint_weights(self) -> ExpertWeights:
        """This layer's weights with the expert blocks and scales in checkpoint order: `weights`
        itself, or when the layer keeps only the fragment copy, a new `ExpertWeights` with them
        rebuilt from it (exact; a new copy of the expert weights in memory)."""
        if self.holds_checkpoint_order:
            return self.weights
        w13_blocks, w13_scales = kernel_api.from_fragment_order(self.fragments["w13"])
        w2_blocks, w2_scales = kernel_api.from_fragment_order(self.fragments["w2"])
        return replace(self.weights, w13_blocks=w13_blocks, w13_scales=w13_scales,
                       w2_blocks=w2_blocks, w2_scales=w2_scales)

    @classmethod
    def from_checkpoint(cls, path: str | Path, layer: int, plan=None, device: torch.device | str = "cpu",
                        backend: Backend = "auto", **kwargs) -> "MXFP4MoE":
        """Load layer `layer` of the checkpoint at `path` for the rank `plan` describes (a
        `sharding.ShardPlan`; default: one rank, Triton alignment) onto `device`."""
        from .checkpoint import open_checkpoint
        from .loader import load_layer
        with open_checkpoint(path) as checkpoint:       # the loader copies: no view outlives the files
            if plan is None:
                from .sharding import ShardPlan
                cfg = checkpoint.config
                plan = ShardPlan.create(num_experts=cfg.num_experts, hidden=cfg.hidden_size,
                                        inter=cfg.intermediate_size, align="triton")
            weights = load_layer(checkpoint, layer, plan, device=device)
        return cls(weights, backend=backend, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # One opaque op for the compiler (`custom_ops`): no graph break inside the layer.
            return torch.ops.mxfp4_moe.moe_forward(x, self.op_name)[0]
        return self.eager_forward(x)

    def forward_with_router_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, and each token's routing weights [T, k] in x's dtype (the "router scores"
        transformers' `GptOssMLP` returns beside its output)."""
        if torch.compiler.is_compiling():
            return torch.ops.mxfp4_moe.moe_forward(x, self.op_name)
        return self.eager_forward_with_router_scores(x)

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` outside torch.compile: route, then `experts`."""
        return self._route_and_run(x)[0]

    def eager_forward_with_router_scores(self, x: torch.Tensor, use_plans: bool = True
                                         ) -> tuple[torch.Tensor, torch.Tensor]:
        y, topk_weights = self._route_and_run(x, use_plans)
        return y, topk_weights.to(x.dtype, copy=True)     # (a copy: an eager plan's weights are its workspace)

    def _route_and_run(self, x: torch.Tensor, use_plans: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, routing weights [T, k] float32): the scores' cast to x's dtype is left to the
        callers that want them, off the plain forward's path. At decode sizes on the triton
        backend, from the layer's recorded launches (`eager_plan`) where they apply."""
        w = self.weights
        w.check_tokens(x, "MXFP4MoE.forward")
        if use_plans and self.eager_plans:
            planned = planned_call(self, x)
            if planned is not None:
                return planned
        if self.backend == "triton" and w.router_scoring == "topk_softmax" and x.shape[0]:
            # (at decode sizes the router's launch also sorts the pairs: `route_with_metadata`)
            sums = self.zeroed_sums(x)
            topk_weights, topk_ids, meta = route_with_metadata(
                x, w.router_weight, w.router_bias, w.top_k, router_weight_bf16=self.router_weight_bf16,
                expert_map=w.expert_map, num_local_experts=w.num_local_experts, block_m=self.block_m_for(x.shape[0]))
            return self.grouped_matmuls(x, meta, sums).to(x.dtype), topk_weights
        topk_weights, topk_ids = route(x, w.router_weight, w.router_bias, w.top_k,
                                       router_weight_bf16=self.router_weight_bf16, scoring=w.router_scoring,
                                       norm_topk_prob=w.norm_topk_prob)
        return self.experts(x, topk_weights, topk_ids), topk_weights

    def _fragments(self, fragment_order: bool | None) -> dict | None:
        """The expert weights in fragment order when asked for (or, for None, when the Hopper
        kernel that reads them would run); raises if asked for and impossible."""
        if fragment_order is False:
            return None
        w = self.weights
        if fragment_order is None and self.backend != "triton":
            return None             # (before the launcher's import: the torch backend runs without Triton)
        # (the fragment layout and the device checks are torch only: no Triton imported here)
        fragment_order_problem, to_fragment_order = kernel_api.fragment_order_problem, kernel_api.to_fragment_order
        hopper = self.backend == "triton" and self.compute_dtype == torch.bfloat16 and kernel_api.on_hopper(w.device)
        if fragment_order is None and not hopper:
            return None             # (before the scale scan below: nothing to build off Hopper)
        if fragment_order is None and w.activation != "swiglu_oai":
            return None             # the "rs" kernel's epilogue is gpt-oss's SwiGLU only
        problems = [f"{name}: {problem}" for name, problem in (("w13_scales", fragment_order_problem(w.w13_scales)),
                                                               ("w2_scales", fragment_order_problem(w.w2_scales)))
                    if problem]
        if fragment_order is None and problems:
            return None
        if problems:
            raise ValueError(f"MXFP4MoE: fragment_order=True, but {'; '.join(problems)}")
        if not hopper:
            raise ValueError("MXFP4MoE: fragment_order=True needs the triton backend with bf16 on a Hopper GPU "
                             f"(backend {self.backend!r}, {self.compute_dtype}, weights on {w.device})")
        return {"w13": to_fragment_order(w.w13_blocks, w.w13_scales),
                "w2": to_fragment_order(w.w2_blocks, w.w2_scales)}

    def combine_for(self, tokens: int) -> str:
        """The combine the triton backend uses for `tokens` tokens ("auto" resolved)."""
        return "atomic" if self.combine == "auto" else self.combine

    def experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The expert part on already-routed tokens: x [T, H(_pad)], topk_* [T, k] -> [T, H] x.dtype."""
        return self.expert_sums(x, topk_weights, topk_ids).to(x.dtype)

    def expert_sums(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """`experts` before the cast to x's dtype: [T, H] as the backend sums (float32 but for
        an empty x)."""
        w = self.weights
        if self.backend == "torch":
            return reference_moe(x, w, topk_weights, topk_ids, torch.float32)
        tokens = x.shape[0]
        if tokens == 0:
            return x.new_zeros((0, w.hidden))
        sums = self.zeroed_sums(x)
        meta = routing_metadata(topk_ids, w.expert_map, w.num_local_experts, self.block_m_for(tokens), topk_weights)
        return self.grouped_matmuls(x, meta, sums)

    def zeroed_sums(self, x: torch.Tensor) -> torch.Tensor:
        """The [T, H] float32 zeros the triton backend's w2 adds each token's expert outputs into,
        made before the routing's launches so that no memset runs between w13 and w2 (there it
        would keep w2's programmatic dependent launch from overlapping w13's tail)."""
        return torch.zeros((x.shape[0], self.weights.hidden), dtype=torch.float32, device=x.device)

    def block_m_for(self, tokens: int) -> int:
        """Rows per tile of the grouped matmuls (and of their routing metadata) at `tokens` tokens."""
        return kernel_api.pick_block_m(tokens * self.weights.top_k, self.weights.num_local_experts)

    def grouped_matmuls(self, x: torch.Tensor, meta, sums: torch.Tensor) -> torch.Tensor:
        """The triton backend's w13 (+ activation) and w2 (+ combine) of x [T, H(_pad)] routed as
        `meta` (`routing.routing_metadata` at `block_m_for(T)`), added into `sums` (`zeroed_sums`;
        returned) where the combine is "atomic"; else a new [T, H] float32 tensor."""
        w = self.weights
        moe_matmul = kernel_api.moe_matmul
        tokens = x.shape[0]
        if self.fragments is not None:
            x = _fragment_kernel_input(x, self.compute_dtype)
        frag = self.fragments or {}
        combine = self.combine_for(tokens)
        l2_prefetch = frag.get("w2") if tokens * w.top_k <= L2_PREFETCH_MAX_ROWS else None
        act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta,
                         channel_scale=w.w13_channel_scale, gather=True,
                         swiglu=(w.swiglu_alpha, w.swiglu_limit), activation=w.activation,
                         compute_dtype=self.compute_dtype, fragments=frag.get("w13"), l2_prefetch=l2_prefetch)
        y = moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta,
                       channel_scale=w.w2_channel_scale, gather=False, apply_row_weight=True,
                       combine=combine, n_out=w.hidden, compute_dtype=self.compute_dtype,
                       fragments=frag.get("w2"), out=sums if combine == "atomic" else None)
        return y


def _fragment_kernel_input(x: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """x [T, H or H_pad] as the fragment-order ("rs") kernel reads it: compute_dtype, contiguous
    (H and H_pad are multiples of 32, as MXFP4 blocks are). With the checkpoint order dropped no
    other kernel could take x as it came."""
    return x.to(compute_dtype).contiguous()
