"""The shard plan: which experts, which 32-wide blocks of the intermediate dim, and which padded
sizes one rank of a TP x EP layout owns, and which ranges of each checkpoint tensor it reads.

No tensors are touched here; `mxfp4_moe.loader` follows the plan. Sizes carry the encoding in
their names: `hidden`, `inter` are unpadded (checkpoint) sizes, `hidden_pad`, `inter_pad` padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch

from .mxfp4 import BLOCK_SIZE

Placement = Literal["linear", "round-robin"]
AlignSpec = Union[str, tuple[int, int]]

ALIGN_PRESETS: dict[str, tuple[int, int]] = {
    # name: (h_align, i_align), the multiples each engine rounds H and per-rank I up to
    # (FORMAT.md section 3). "none" is the MXFP4 block itself: no padding beyond it.
    "none": (BLOCK_SIZE, BLOCK_SIZE),
    "triton": (BLOCK_SIZE, 64),            # Triton on CUDA: I per rank to 64, H unpadded
    "marlin": (256, 128),
    "flashinfer-cutlass": (128, 128),
    "trtllm": (256, 256),
}

PLACEMENTS = ("linear", "round-robin")

# Roles of the fused (gpt-oss) checkpoint tensors, as LayerTensors names them, with their
# dimensions: E experts, H hidden, I intermediate (checkpoint sizes).
#   w13_blocks [E, 2I, H/32, 16]  w13_scales [E, 2I, H/32]  w13_bias [E, 2I]
#   w2_blocks  [E, H, I/32, 16]   w2_scales  [E, H, I/32]   w2_bias  [E, H]
#   w13_channel_scale [E, 2I] or [E, 2I, 1]   w2_channel_scale [E, H] or [E, H, 1]
#   router_weight [E, H]   router_bias [E]
SHARD_DIMS: dict[str, int | None] = {
    # The checkpoint dimension each role is TP-sliced along; None: not sliced (read whole, or
    # only its local experts). w13 is column-parallel (its 2I output rows), w2 row-parallel
    # (its I/32 input blocks); H is never sliced.
    "w13_blocks": 1, "w13_scales": 1, "w13_bias": 1, "w13_channel_scale": 1,
    "w2_blocks": 2, "w2_scales": 2, "w2_bias": None, "w2_channel_scale": None,
    "router_weight": None, "router_bias": None,
}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ShardPlan: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"ShardPlan: {name} must be >= {minimum}, got {value}")
    return value


def resolve_align(align: AlignSpec) -> tuple[int, int]:
    """An alignment preset name or an explicit `(h_align, i_align)` -> `(h_align, i_align)`.

    Both must be positive multiples of the block size (32): padded sizes stay whole blocks.
    """
    if isinstance(align, str):
        if align not in ALIGN_PRESETS:
            raise ValueError(f"ShardPlan: unknown alignment preset {align!r}; expected one of "
                             f"{sorted(ALIGN_PRESETS)} or a tuple (h_align, i_align)")
        return ALIGN_PRESETS[align]
    if not (isinstance(align, (tuple, list)) and len(align) == 2):
        raise ValueError(f"ShardPlan: align must be a preset name or (h_align, i_align), got {align!r}")
    h_align, i_align = (_check_int(n, v, 1) for n, v in zip(("h_align", "i_align"), align))
    for name, value in (("h_align", h_align), ("i_align", i_align)):
        if value % BLOCK_SIZE:
            raise ValueError(f"ShardPlan: {name} must be a multiple of the MXFP4 block size "
                             f"{BLOCK_SIZE}, got {value}")
    return h_align, i_align


def tp_block_range(num_blocks: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The 32-wide intermediate blocks `[start, stop)` TP rank `tp_rank` owns, split as vLLM does:
    `ceil(num_blocks / tp_size)` per rank, so later ranks may get fewer, or none."""
    per_rank = -(-num_blocks // tp_size)
    start = min(tp_rank * per_rank, num_blocks)
    return start, min(start + per_rank, num_blocks)


def expert_placement(num_experts: int, ep_size: int, ep_rank: int, placement: Placement) -> tuple[int, ...]:
    """Global ids of the experts EP rank `ep_rank` holds, ascending.

    linear: a contiguous range; with base = E // ep and rem = E % ep, the first rem ranks get
      base + 1 experts: rank r starts at r * base + min(r, rem).
    round-robin: r, r + ep, r + 2 ep, ...
    """
    if placement == "linear":
        base, rem = divmod(num_experts, ep_size)
        start = ep_rank * base + min(ep_rank, rem)
        return tuple(range(start, start + base + (1 if ep_rank < rem else 0)))
    if placement == "round-robin":
        return tuple(range(ep_rank, num_experts, ep_size))
    raise ValueError(f"ShardPlan: placement must be one of {PLACEMENTS}, got {placement!r}")


@dataclass(frozen=True)
class ShardPlan:
    """One rank's share of one MoE layer. Build it with `ShardPlan.create`.

    Sizes (checkpoint E experts, H hidden, I intermediate):
      hidden        H, never sliced by TP
      hidden_pad    H rounded up to h_align, or the explicit padded size (DeepEP: 2688 -> 3072)
      inter_total   the checkpoint's I
      inter         this rank's unpadded share of I: (block_stop - block_start) * 32
      inter_pad     ceil(I / 32 / tp) * 32 rounded up to i_align: the same on every TP rank (the
                    largest share, padded), so every rank's tensors have one shape and a rank
                    with a smaller share (the last) carries the extra padding
    Intermediate blocks `[block_start, block_stop)` of I/32 are this rank's (elements
    `[inter_start, inter_stop)`, w13 rows `[2 * inter_start, 2 * inter_stop)`: gate/up rows are
    interleaved, so a contiguous row range keeps each gate/up pair together).
    Experts: `local_experts` are the global ids held here, ascending; `expert_map[g]` is the local
    index of global expert g, or -1 when another EP rank holds it. Under TP x EP, EP picks the
    experts and TP slices I within each.
    """

    num_experts: int
    hidden: int
    hidden_pad: int
    inter_total: int
    inter: int
    inter_pad: int
    tp_size: int
    tp_rank: int
    ep_size: int
    ep_rank: int
    placement: Placement
    h_align: int
    i_align: int
    block_start: int
    block_stop: int
    local_experts: tuple[int, ...]
    allow_empty: bool = False

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def create(cls, *, num_experts: int, hidden: int, inter: int, tp_size: int = 1, tp_rank: int = 0,
               ep_size: int = 1, ep_rank: int = 0, placement: Placement = "linear",
               align: AlignSpec = "none", hidden_pad: int | None = None,
               allow_empty: bool = False) -> "ShardPlan":
        """The plan for TP rank `tp_rank` of `tp_size` and EP rank `ep_rank` of `ep_size`.

        num_experts, hidden, inter: the checkpoint's E, H and I (H and I multiples of 32).
        align: a preset name from ALIGN_PRESETS ("none", "triton", "marlin",
          "flashinfer-cutlass", "trtllm") or an explicit (h_align, i_align), multiples of 32.
        hidden_pad: an explicit padded hidden size (>= hidden, a multiple of 32); overrides
          h_align.
        allow_empty: accept a rank that owns no intermediate blocks or no experts (its tensors
          are all padding); without it such a plan raises ValueError.
        Raises ValueError (TypeError for non-integers) naming the argument and the bad value.
        """
        for name, value, minimum in (("num_experts", num_experts, 1), ("hidden", hidden, 1),
                                     ("inter", inter, 1), ("tp_size", tp_size, 1),
                                     ("ep_size", ep_size, 1), ("tp_rank", tp_rank, 0),
                                     ("ep_rank", ep_rank, 0)):
            _check_int(name, value, minimum)
        for name, value in (("hidden", hidden), ("inter", inter)):
            if value % BLOCK_SIZE:
                raise ValueError(f"ShardPlan: the checkpoint's {name} size {value} is not a multiple "
                                 f"of the MXFP4 block size {BLOCK_SIZE}")
        if tp_rank >= tp_size:
            raise ValueError(f"ShardPlan: tp_rank {tp_rank} out of range for tp_size {tp_size} "
                             f"(expected 0..{tp_size - 1})")
        if ep_rank >= ep_size:
            raise ValueError(f"ShardPlan: ep_rank {ep_rank} out of range for ep_size {ep_size} "
                             f"(expected 0..{ep_size - 1})")
        if placement not in PLACEMENTS:
            raise ValueError(f"ShardPlan: placement must be one of {PLACEMENTS}, got {placement!r}")
        h_align, i_align = resolve_align(align)

        if hidden_pad is None:
            hidden_pad = _round_up(hidden, h_align)
        else:
            _check_int("hidden_pad", hidden_pad, 1)
            if hidden_pad < hidden or hidden_pad % BLOCK_SIZE:
                raise ValueError(f"ShardPlan: hidden_pad {hidden_pad} must be >= hidden {hidden} and a "
                                 f"multiple of {BLOCK_SIZE}")

        num_blocks = inter // BLOCK_SIZE
        block_start, block_stop = tp_block_range(num_blocks, tp_size, tp_rank)
        if block_stop == block_start and not allow_empty:
            per_rank = -(-num_blocks // tp_size)
            used = -(-num_blocks // per_rank)
            raise ValueError(
                f"ShardPlan: tp_rank {tp_rank} of {tp_size} would own no intermediate blocks: I = {inter} "
                f"is {num_blocks} blocks of {BLOCK_SIZE}, split {per_rank} per rank, which fills only "
                f"ranks 0..{used - 1}; use tp_size <= {used}, or pass allow_empty=True")
        inter_pad = _round_up(-(-num_blocks // tp_size) * BLOCK_SIZE, i_align)

        local = expert_placement(num_experts, ep_size, ep_rank, placement)
        if not local and not allow_empty:
            raise ValueError(f"ShardPlan: ep_rank {ep_rank} of {ep_size} would hold no experts "
                             f"(num_experts {num_experts}, placement {placement!r}); use ep_size <= "
                             f"{num_experts}, or pass allow_empty=True")
        return cls(num_experts=num_experts, hidden=hidden, hidden_pad=hidden_pad, inter_total=inter,
                   inter=(block_stop - block_start) * BLOCK_SIZE, inter_pad=inter_pad,
                   tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=ep_rank,
                   placement=placement, h_align=h_align, i_align=i_align,
                   block_start=block_start, block_stop=block_stop, local_experts=local,
                   allow_empty=allow_empty)

    @classmethod
    def all_ranks(cls, *, tp_size: int = 1, ep_size: int = 1, **kwargs) -> list["ShardPlan"]:
        """Every rank's plan, ordered by (ep_rank, tp_rank): global rank = ep_rank * tp_size + tp_rank.

        kwargs are `create`'s other arguments (num_experts, hidden, inter, placement, align, ...).
        """
        return [cls.create(tp_size=tp_size, tp_rank=t, ep_size=ep_size, ep_rank=e, **kwargs)
                for e in range(ep_size) for t in range(tp_size)]

    # ---- derived ----------------------------------------------------------------------------

    @property
    def num_local_experts(self) -> int:
        return len(self.local_experts)

    @property
    def inter_start(self) -> int:
        """First element of I this rank owns (checkpoint coordinates)."""
        return self.block_start * BLOCK_SIZE

    @property
    def inter_stop(self) -> int:
        return self.block_stop * BLOCK_SIZE

    @property
    def w13_rows(self) -> slice:
        """This rank's rows of the checkpoint's interleaved w13 [E, 2I, ...]: [2a, 2b)."""
        return slice(2 * self.inter_start, 2 * self.inter_stop)

    @property
    def w2_blocks_range(self) -> slice:
        """This rank's blocks along the checkpoint's w2 input dim [E, H, I/32, ...]."""
        return slice(self.block_start, self.block_stop)

    @property
    def includes_w2_bias(self) -> bool:
        """w2's bias is added once over the TP ranks' sum: it lives on TP rank 0 only."""
        return self.tp_rank == 0

    @property
    def expert_map(self) -> torch.Tensor:
        """[num_experts] int64: local index of each global expert, -1 where it lives elsewhere."""
        emap = torch.full((self.num_experts,), -1, dtype=torch.int64)
        if self.local_experts:
            emap[list(self.local_experts)] = torch.arange(self.num_local_experts, dtype=torch.int64)
        return emap

    def expert_runs(self) -> tuple[tuple[int, int, int], ...]:
        """The local experts as contiguous runs `(global_start, global_stop, local_start)`:
        one run for linear placement, one per expert for round-robin with ep > 1."""
        runs: list[list[int]] = []
        for local, g in enumerate(self.local_experts):
            if runs and runs[-1][1] == g:
                runs[-1][1] = g + 1
            else:
                runs.append([g, g + 1, local])
        return tuple((a, b, c) for a, b, c in runs)

    def describe(self) -> str:
        """A short label naming the rank, for error messages: 'tp_rank 3 of 4, ep_rank 0 of 1'."""
        return f"tp_rank {self.tp_rank} of {self.tp_size}, ep_rank {self.ep_rank} of {self.ep_size}"

    def read_ranges(self) -> dict[str, tuple[tuple[slice, ...], ...]]:
        """What this rank reads of each fused checkpoint tensor (roles as in SHARD_DIMS).

        For each role, one index per contiguous run of local experts (see `expert_runs`), each a
        tuple of slices over the tensor's leading dims (dims not listed are read whole). All
        offsets are in the checkpoint's own (unpadded) coordinates. w2_bias is read on TP rank 0
        only (an empty tuple elsewhere); the router is replicated: every rank reads all of it.
        """
        runs = [slice(a, b) for a, b, _ in self.expert_runs()]
        rows, blocks, whole = self.w13_rows, self.w2_blocks_range, slice(None)
        return {
            "w13_blocks": tuple((e, rows) for e in runs),
            "w13_scales": tuple((e, rows) for e in runs),
            "w13_bias": tuple((e, rows) for e in runs),
            "w13_channel_scale": tuple((e, rows) for e in runs),
            "w2_blocks": tuple((e, whole, blocks) for e in runs),
            "w2_scales": tuple((e, whole, blocks) for e in runs),
            "w2_bias": tuple((e,) for e in runs) if self.includes_w2_bias else (),
            "w2_channel_scale": tuple((e,) for e in runs),
            "router_weight": ((whole,),),
            "router_bias": ((whole,),),
        }
