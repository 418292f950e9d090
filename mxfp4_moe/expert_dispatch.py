"""Expert parallelism with the tokens sharded over the ranks (data-parallel attention): each rank
brings only its own tokens, routes them, sends each token once to every rank that holds one of
its experts (counts first, then the rows), runs its experts on the rows it received and sends
the results back, to be summed on the token's own rank.

This module owns the dispatch (who gets which token), the exchange (torch.distributed's
all-to-all, or point-to-point sends where a build lacks it) and the combine. The expert math is
the local `MXFP4MoE.experts` (the Triton kernels or the torch reference), unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from .distributed import DistributedMXFP4MoE, MoEGroups
from .moe import MXFP4MoE
from .routing import route

Exchange = Literal["all-to-all", "p2p"]
EXCHANGES = ("all-to-all", "p2p")
# Per dispatched row, beside its hidden values: the token's k global expert ids (int32) and k
# routing weights (float32, sent as their int32 bit patterns in the same buffer).
META_BYTES_PER_SLOT = 4 + 4


# ---- the exchange -------------------------------------------------------------------------------

def exchange_rows(send: torch.Tensor, send_rows: list[int], recv_rows: list[int], group=None,
                  method: Exchange = "all-to-all") -> torch.Tensor:
    """Rows [sum(send_rows), ...] laid out by destination rank (the first send_rows[0] go to rank
    0 of `group`, ...) -> the rows every rank sent here, [sum(recv_rows), ...], by source rank.

    method "all-to-all": one `all_to_all_single` with uneven splits (NCCL; gloo in torch 2.13,
      zero-row splits included). "p2p": one `batch_isend_irecv` of the non-empty chunks, for a
      build whose backend lacks the uneven all-to-all (gloo's list `all_to_all` rejects chunks
      of different sizes). Both move the same bytes. A collective: every rank of `group` calls
      it together, and send_rows / recv_rows must agree across ranks (`exchange_counts`).
    """
    if method not in EXCHANGES:
        raise ValueError(f"exchange_rows: method must be one of {EXCHANGES}, got {method!r}")
    # gloo sends a strided view's storage rather than its elements (README, torchrun section).
    send = send.contiguous()
    out = send.new_empty((sum(recv_rows), *send.shape[1:]))
    if method == "all-to-all":
        dist.all_to_all_single(out, send, recv_rows, send_rows, group=group)
        return out
    rank = dist.get_rank(group)
    send_chunks, recv_chunks = send.split(send_rows), out.split(recv_rows)
    ops = []
    for peer, (chunk_out, chunk_in) in enumerate(zip(send_chunks, recv_chunks)):
        if peer == rank:
            chunk_in.copy_(chunk_out)
            continue
        peer_global = peer if group is None else dist.get_global_rank(group, peer)
        if chunk_out.numel():
            ops.append(dist.P2POp(dist.isend, chunk_out, peer_global, group=group))
        if chunk_in.numel():
            ops.append(dist.P2POp(dist.irecv, chunk_in, peer_global, group=group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return out


def exchange_counts(send_rows: torch.Tensor, group=None, method: Exchange = "all-to-all") -> torch.Tensor:
    """send_rows [world] int64 (rows this rank sends to each rank) -> recv_rows [world] int64
    (rows each rank sends here): entry r of every rank's vector goes to rank r."""
    world = send_rows.shape[0]
    return exchange_rows(send_rows, [1] * world, [1] * world, group, method)


# ---- what one forward moved ---------------------------------------------------------------------

@dataclass(frozen=True)
class DispatchCounts:
    """Rows one forward exchanged, per rank of the layout in rank order (this rank included: its
    own chunk is a local copy). send_rows[d]: this rank's tokens sent to rank d (each at most
    once); recv_rows[s]: rank s's tokens received here. The combine returns the same rows."""
    rank: int
    send_rows: tuple[int, ...]
    recv_rows: tuple[int, ...]

    def bytes_moved(self, hidden: int, x_bytes: int, out_bytes: int, top_k: int) -> dict[str, int]:
        """Bytes this rank put on the wire (own chunk excluded): "dispatch" (rows of `hidden`
        values of `x_bytes` each, plus the k ids and weights), "combine" (the rows back, of
        `out_bytes` values), "counts" (the int64 counts), and their "total"."""
        peers = [n for d, n in enumerate(self.send_rows) if d != self.rank]
        peers_back = [n for s, n in enumerate(self.recv_rows) if s != self.rank]
        dispatch = sum(peers) * (hidden * x_bytes + top_k * META_BYTES_PER_SLOT)
        combine = sum(peers_back) * hidden * out_bytes
        counts = 8 * (len(self.send_rows) - 1)
        return {"dispatch": dispatch, "combine": combine, "counts": counts, "total": dispatch + combine + counts}


# ---- the layer ----------------------------------------------------------------------------------

def expert_owners(local: MXFP4MoE, groups: MoEGroups) -> torch.Tensor:
    """[num_experts] int64 on the weights' device: the EP rank holding each global expert, from an
    all-gather of every rank's local experts (so any placement works: linear, round-robin,
    uneven counts). Raises ValueError unless each expert lives on exactly one EP rank, and on
    every TP rank of it. A collective over `groups.group`."""
    w = local.weights
    num_experts, world = w.num_experts, groups.tp_size * groups.ep_size
    held = torch.zeros(num_experts, dtype=torch.int64, device=w.device)
    held[w.local_experts.to(w.device)] = 1
    gathered = [torch.empty_like(held) for _ in range(world)]
    dist.all_gather(gathered, held, group=groups.group)
    # held_by[e, t, g]: ep rank e, tp rank t holds global expert g (rank = e * tp + t)
    held_by = torch.stack(gathered).reshape(groups.ep_size, groups.tp_size, num_experts).bool().cpu()
    per_tp = held_by.sum(0)                                                   # [tp, E]
    bad = (per_tp != 1).any(0).nonzero().flatten().tolist()
    if bad or not (held_by == held_by[:, :1]).all():
        def holders(g: int) -> str:
            pairs = held_by[:, :, g].nonzero().tolist()
            return ", ".join(f"ep_rank {e} tp_rank {t}" for e, t in pairs) or "no rank"
        where = ("; ".join(f"expert {g} is held by {holders(g)}" for g in bad[:4]) +
                 (f" and {len(bad) - 4} more experts are wrong" if len(bad) > 4 else "")
                 if bad else "the TP ranks of one EP rank hold different experts")
        raise ValueError(f"TokenShardedMXFP4MoE: every expert must live on exactly one EP rank, and on all its "
                         f"TP ranks; {where}")
    return held_by[:, 0].int().argmax(0).to(device=w.device, dtype=torch.int64)


class TokenShardedMXFP4MoE(torch.nn.Module):
    """The gpt-oss MoE layer with expert parallelism and the tokens sharded over the ranks.

    forward(x [T, H] or [T, H_pad]: this rank's tokens only; T may differ between ranks, and be
    0) -> y [T, H] in x's dtype: the layer's output for those tokens, the same values (within
    rounding) as the replicated-token `DistributedMXFP4MoE` gives for them.

    Per forward, on every rank of the layout (global rank = ep_rank * tp + tp_rank):
      1. route: top-k of this rank's tokens (the router is replicated);
      2. dispatch: token t goes, once, to every rank holding (its TP slice of) any of its k
         experts, with its k ids and routing weights; counts go first (an all-to-all of one
         int64 per rank, then a host copy of them: the row exchange needs its sizes), then
         the rows;
      3. experts: the local `MXFP4MoE.experts` on the received rows, which drops the pairs of
         experts held elsewhere and sums the local ones weighted by their routing weights (the
         same fused epilogue the replicated layer runs: the weights travel with the token, so a
         token with two experts on one rank comes back as one row, not two);
      4. combine: the results go back the same way and each token's rows (one per rank it
         visited) are summed on its own rank in float32, then cast to x's dtype (an index_add_:
         on CUDA its atomics may add a token's rows in another order from run to run, as the
         layer's own "atomic" combine does).
    Ranks that receive no rows and experts that receive none run nothing but the exchange.

    exchange: "all-to-all" (`all_to_all_single` with uneven splits: NCCL, and gloo in torch 2.13)
      or "p2p" (`batch_isend_irecv`: the fallback for a backend without it). See `exchange_rows`.
    Construction is a collective (every rank gathers who holds which expert); so is forward.
    `last_counts` holds the `DispatchCounts` of the latest forward.
    """

    def __init__(self, local: MXFP4MoE, groups: MoEGroups, exchange: Exchange = "all-to-all"):
        super().__init__()
        if exchange not in EXCHANGES:
            raise ValueError(f"TokenShardedMXFP4MoE: exchange must be one of {EXCHANGES}, got {exchange!r}")
        if groups.group is None and groups.tp_size * groups.ep_size > 1:
            raise ValueError("TokenShardedMXFP4MoE: the layout must be one group over all tp_size * ep_size ranks "
                             "(MoEGroups.from_world), not separate TP and EP groups: tokens move between any two ranks")
        w = local.weights
        if (w.tp_rank, w.tp_size, w.ep_rank, w.ep_size) != (groups.tp_rank, groups.tp_size, groups.ep_rank,
                                                            groups.ep_size):
            raise ValueError(f"TokenShardedMXFP4MoE: weights are for tp_rank {w.tp_rank} of {w.tp_size}, ep_rank "
                             f"{w.ep_rank} of {w.ep_size}, but this process is tp_rank {groups.tp_rank} of "
                             f"{groups.tp_size}, ep_rank {groups.ep_rank} of {groups.ep_size}")
        self.local = local
        self.groups = groups
        self.exchange = exchange
        self.owner_ep = expert_owners(local, groups)                           # [E] int64
        self.last_counts: DispatchCounts | None = None

    @classmethod
    def from_replicated(cls, layer: DistributedMXFP4MoE, exchange: Exchange = "all-to-all") -> "TokenShardedMXFP4MoE":
        """The same shard (weights, backend, compute dtype: no copy) behind the token dispatch."""
        return cls(layer.local, layer.groups, exchange=exchange)

    @classmethod
    def from_checkpoint(cls, checkpoint, layer: int, *, exchange: Exchange = "all-to-all",
                        **kwargs) -> "TokenShardedMXFP4MoE":
        """Load this rank's shard as `DistributedMXFP4MoE.from_checkpoint(checkpoint, layer,
        **kwargs)` does (only its slices read), and dispatch tokens to it."""
        return cls.from_replicated(DistributedMXFP4MoE.from_checkpoint(checkpoint, layer, **kwargs), exchange)

    @property
    def weights(self):
        return self.local.weights

    @property
    def backend(self) -> str:
        return self.local.backend

    @property
    def world_size(self) -> int:
        return self.groups.tp_size * self.groups.ep_size

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's tokens x [T, H(_pad)] -> (topk_weights [T, k] float32, topk_ids [T, k] int64)."""
        w = self.weights
        w.check_tokens(x, f"TokenShardedMXFP4MoE.forward on rank {self.groups.rank}", "this rank's tokens")
        if x.shape[0] == 0:
            return (torch.empty(0, w.top_k, dtype=torch.float32, device=x.device),
                    torch.empty(0, w.top_k, dtype=torch.int64, device=x.device))
        return route(x, w.router_weight, w.router_bias, w.top_k, router_weight_bf16=self.local.router_weight_bf16)

    def destinations(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [T, k] -> [T, world] bool: whether token t goes to rank d (every TP rank of
        each EP rank holding one of its experts)."""
        g = self.groups
        wanted = torch.zeros(topk_ids.shape[0], g.ep_size, dtype=torch.bool, device=topk_ids.device)
        wanted.scatter_(1, self.owner_ep[topk_ids], True)
        return wanted.repeat_interleave(g.tp_size, dim=1)       # rank = ep_rank * tp + tp_rank

    def experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Dispatch, the experts, the combine, on already-routed tokens: x [T, H(_pad)], topk_* [T, k]
        -> [T, H] in x's dtype. A collective."""
        group, method = self.groups.group, self.exchange
        hidden, top_k = self.weights.hidden, topk_ids.shape[1]
        wanted = self.destinations(topk_ids)                                   # [T, world]
        # Rows ordered by destination rank, then token: the layout exchange_rows sends.
        dest, token = wanted.T.nonzero(as_tuple=True)
        send_counts = wanted.sum(0)
        recv_counts = exchange_counts(send_counts, group, method)
        send_rows, recv_rows = send_counts.tolist(), recv_counts.tolist()       # (the one host sync)
        meta = torch.cat([topk_ids[token].to(torch.int32), topk_weights[token].float().view(torch.int32)], dim=1)
        recv_x = exchange_rows(x[token], send_rows, recv_rows, group, method)
        recv_meta = exchange_rows(meta, send_rows, recv_rows, group, method)
        recv_ids = recv_meta[:, :top_k].long()
        recv_weights = recv_meta[:, top_k:].contiguous().view(torch.float32)
        out = self.local.experts(recv_x, recv_weights, recv_ids)              # [R, H] x.dtype
        back = exchange_rows(out, recv_rows, send_rows, group, method)        # [S, H], as sent
        y = torch.zeros(x.shape[0], hidden, dtype=torch.float32, device=x.device)
        y.index_add_(0, token, back.float())
        self.last_counts = DispatchCounts(rank=self.groups.rank, send_rows=tuple(send_rows),
                                          recv_rows=tuple(recv_rows))
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, *self.route(x))

    def forward_with_router_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, and this rank's tokens' routing weights [T, k] in x's dtype (what
        `integrations.transformers.MXFP4GptOssMLP` expects of its layer)."""
        topk_weights, topk_ids = self.route(x)
        return self.experts(x, topk_weights, topk_ids), topk_weights.to(x.dtype)
