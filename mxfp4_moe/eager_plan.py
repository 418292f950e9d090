"""The MoE layer's eager call at decode sizes, replayed from a plan instead of re-decided.

At T <= 64 tokens an eager call of `MXFP4MoE` (outside any CUDA graph or compile) costs the host
several times the GPU's work: the routing and matmul launchers check their arguments, pick a
config and allocate, and Triton binds and specialises each launch (benchmarks/RESULTS.md 3.3).
None of that changes between two calls with the same token count. So the first call at a token
count runs the layer's ordinary path while `kernels.launches.record_launches` keeps its launches, and
keeps the tensors those launches wrote (the routing metadata, the activation, the float32 sum)
as the plan's workspace. Later calls zero the sum and replay the launches through the compiled
kernels with only x swapped in; where the router's GEMM runs in torch rather than in the first
launch (above 16 tokens, and on CUDA while `routing.ONE_LAUNCH_ROUTER_ON_CUDA` is off), they
compute its logits and swap those in too.

This is sound because every workspace tensor is rewritten by the launches before it is read on
each call (the same property that lets `graphs.CUDAGraphMoE` capture the layer; the one-launch
router's ticket counter is state its kernel returns to zero), and because
a plan is keyed on everything that could change a launch's specialisation: the token count, x's
width and 16-byte alignment, and the CUDA stream (workspaces are not shared between streams).
A plan holds on to its layer's weight tensors: it is used only while the layer's `weights` and
fragment copy are the objects it was recorded with. Like `CUDAGraphMoE`, a layer's plans serve one
host thread at a time on a given stream: two threads interleaving calls on one stream would
interleave their writes to the same workspace.
"""

from __future__ import annotations

import warnings

import torch

from . import kernel_api
from .routing import one_launch_router, route_with_metadata, router_logits, routing_metadata

MAX_PLANNED_TOKENS = 64
"""Token counts up to this get plans: decode sizes, where the host cost dominates; a plan's
workspace grows with T (about 0.05 MB per token at H = I = 2880, top-4)."""
MAX_PLANS = 8
"""Plans kept per layer (the oldest goes first): a decode loop needs one per batch size."""


def planned_call(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output in x's dtype, routing weights [T, k] float32, the plan's workspace) of `layer`
    (whose `eager_plans` is on) on x from its plan for x's key, recording the plan on the first
    call; None where no plan applies (the caller runs the ordinary path): a call this path does
    not cover, while a CUDA graph is being captured, or a key whose launches cannot be replayed."""
    key = _plan_key(layer, x)
    if key is None:
        return None
    plans = layer._eager_plans
    plan = plans.get(key)
    if plan is not None and plan.weights is layer.weights and plan.fragments is layer.fragments:
        if not plan.replayable:
            return None
        try:
            return plan(x)
        except Exception as error:      # a Triton whose launcher differs: the ordinary path still runs
            layer.eager_plans = False
            first_line = str(error).split("\n")[0]
            warnings.warn(f"MXFP4MoE: replaying the recorded launches failed ({type(error).__name__}: {first_line}); "
                          "this layer's eager calls take the ordinary path from now on", RuntimeWarning, stacklevel=4)
            return None
    plan = EagerPlan(layer, x)
    result = plan.results()             # the recording call's own, copied out of the workspace
    if not plan.replayable:             # (the key stays, so that it is not recorded again; its memory goes)
        plan.launches, plan.sums, plan.topk_weights = [], None, None
    plans.pop(key, None)
    plans[key] = plan
    while len(plans) > MAX_PLANS:
        plans.pop(next(iter(plans)))
    return result


def _plan_key(layer, x: torch.Tensor) -> tuple | None:
    """The key of x's plan, or None where this path does not cover the call."""
    tokens = x.shape[0]
    if not (0 < tokens <= MAX_PLANNED_TOKENS and x.dtype == layer.compute_dtype
            and x.is_contiguous() and layer.weights.router_scoring == "topk_softmax"
            and layer.combine_for(tokens) == "atomic"):
        return None
    stream = None
    if x.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None     # (a graph captured whole records the launches itself)
        stream = torch.cuda.current_stream(x.device).cuda_stream
    # (inference mode in the key: a workspace made under it cannot be zeroed outside it)
    return tokens, x.shape[1], x.data_ptr() % 16 == 0, stream, torch.is_inference_mode_enabled()


class EagerPlan:
    """One layer's launches at one key (`_plan_key`), and the workspace they write."""

    def __init__(self, layer, x: torch.Tensor):
        w = layer.weights
        self.weights, self.fragments = w, layer.fragments
        # The router weight narrowed to x's width once (`router_logits` narrows it on every call).
        narrow = lambda weight: weight[:, :x.shape[1]] if weight is not None else None
        self.router_weight, self.router_weight_bf16 = narrow(w.router_weight), narrow(layer.router_weight_bf16)
        self.out_dtype = x.dtype
        # At the smallest T the router's GEMM is one of the recorded launches; above, it runs in
        # torch on every call, and its logits are swapped into the recorded top-k launch.
        self.computes_logits = not one_launch_router(x, w.router_weight.shape[0])
        logits = router_logits(x, self.router_weight, self.router_weight_bf16) if self.computes_logits else None
        sums = layer.zeroed_sums(x)                             # [T, H] float32
        with kernel_api.record_launches() as launches:
            if self.computes_logits:
                self.topk_weights, topk_ids = kernel_api.router_topk(logits, w.router_bias.float(), w.top_k)
                meta = routing_metadata(topk_ids, w.expert_map, w.num_local_experts,
                                        layer.block_m_for(x.shape[0]), self.topk_weights)
            else:               # (the router's launch also sorts the pairs where they fit one program)
                self.topk_weights, _, meta = route_with_metadata(
                    x, w.router_weight, w.router_bias, w.top_k, router_weight_bf16=layer.router_weight_bf16,
                    expert_map=w.expert_map, num_local_experts=w.num_local_experts,
                    block_m=layer.block_m_for(x.shape[0]))
            self.sums = layer.grouped_matmuls(x, meta, sums)
        # Where x and the logits enter the launches. x must enter the first matmul itself (and
        # the router's launch where that holds the GEMM): a copy made in torch would be replayed
        # stale. The last launch must be the only one that adds into the sums (zeroed before the
        # first). Anything else: the ordinary path runs.
        if None in launches:            # (a launch `record_launches` could not describe)
            launches = []
        self.launches = [(launch, launch.positions_of(x), launch.positions_of(logits) if self.computes_logits else [])
                         for launch in launches]
        adders = [i for i, launch in enumerate(launches) if launch.positions_of(self.sums)]
        readers_of_x = sum(1 for _, x_positions, _ in self.launches if x_positions)
        self.replayable = (bool(launches) and self.sums.dtype == torch.float32 and adders == [len(launches) - 1]
                           and readers_of_x == (1 if self.computes_logits else 2))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.sums.zero_()           # (first: a memset between two launches would stop the second starting early)
        logits = router_logits(x, self.router_weight, self.router_weight_bf16) if self.computes_logits else None
        for launch, x_positions, logits_positions in self.launches:
            replaced = {p: x for p in x_positions}
            replaced.update((p, logits) for p in logits_positions)
            launch.replay(replaced)
        return self.results()

    def results(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the output in x's dtype, a new tensor; the routing weights, the workspace itself:
        `MXFP4MoE.eager_forward_with_router_scores` copies them)."""
        return self.sums.to(self.out_dtype, copy=True), self.topk_weights
