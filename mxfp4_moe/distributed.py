"""Multi-process tensor and expert parallelism on torch.distributed: one process per rank, each
loading only its own shard of an MoE layer (through `ShardPlan` and `load_layer`), and the
combine that turns the ranks' partial outputs into the layer's output on every rank.

Rank mapping (as `ShardPlan.all_ranks`): global rank = ep_rank * tp_size + tp_rank. Tokens are
replicated: every rank gets the same x [T, H] and returns the same y [T, H].
"""

from __future__ import annotations

import datetime
import os
import resource
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.distributed as dist

from .moe import Backend, MXFP4MoE
from .sharding import AlignSpec, Placement, ShardPlan
from .weights import ExpertWeights

TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
Combine = Literal["all-reduce"]


class DistributedSetupError(ValueError):
    """A launch that cannot work: world size, ranks or devices do not match the layout."""


# ---- the launch environment -------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or `spawn_local`) tells a process: its global rank, the world size and its
    rank on this host (which picks its GPU)."""
    rank: int
    world_size: int
    local_rank: int


def torchrun_env(environ: dict | None = None) -> LaunchEnv | None:
    """The launch environment from WORLD_SIZE, RANK and LOCAL_RANK, or None when none of them is set
    (a plain single-process run). Raises DistributedSetupError when only some are set or they are
    not integers in range."""
    environ = os.environ if environ is None else environ
    present = [k for k in TORCHRUN_ENV if k in environ]
    if not present:
        return None
    missing = [k for k in TORCHRUN_ENV if k not in environ]
    if missing:
        raise DistributedSetupError(f"torchrun environment incomplete: {', '.join(present)} set but "
                                    f"{', '.join(missing)} missing")
    try:
        values = {k: int(environ[k]) for k in TORCHRUN_ENV}
    except ValueError:
        raise DistributedSetupError("torchrun environment: WORLD_SIZE, RANK and LOCAL_RANK must be integers, "
                                    f"found {', '.join(f'{k}={environ[k]!r}' for k in TORCHRUN_ENV)}") from None
    if values["WORLD_SIZE"] < 1 or not 0 <= values["RANK"] < values["WORLD_SIZE"] or values["LOCAL_RANK"] < 0:
        raise DistributedSetupError(f"torchrun environment out of range: WORLD_SIZE={values['WORLD_SIZE']}, "
                                    f"RANK={values['RANK']}, LOCAL_RANK={values['LOCAL_RANK']}")
    return LaunchEnv(rank=values["RANK"], world_size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])


def rank_coords(rank: int, tp_size: int, ep_size: int) -> tuple[int, int]:
    """Global rank -> (tp_rank, ep_rank), with global rank = ep_rank * tp_size + tp_rank."""
    if not 0 <= rank < tp_size * ep_size:
        raise DistributedSetupError(f"rank {rank} out of range for tp {tp_size} x ep {ep_size} = "
                                    f"{tp_size * ep_size} ranks")
    return rank % tp_size, rank // tp_size


def check_world(world_size: int, tp_size: int, ep_size: int) -> None:
    """Raise DistributedSetupError unless world_size == tp_size * ep_size."""
    if world_size != tp_size * ep_size:
        raise DistributedSetupError(f"the world has {world_size} processes (WORLD_SIZE) but the layout needs "
                                    f"tp {tp_size} x ep {ep_size} = {tp_size * ep_size}; launch "
                                    f"torchrun --nproc-per-node {tp_size * ep_size} or change --tp/--ep")


def rank_device(local_rank: int, device: str | torch.device | None = None) -> torch.device:
    """This process's device: cuda:LOCAL_RANK on a GPU machine (or when `device` names cuda, with
    or without an index: the index is replaced by LOCAL_RANK), cpu when `device` is cpu or there
    is no GPU. Raises DistributedSetupError when LOCAL_RANK has no GPU."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind != "cuda":
        return torch.device(kind)
    if not torch.cuda.is_available():
        raise DistributedSetupError("a CUDA device was asked for but CUDA is not available here")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedSetupError(f"LOCAL_RANK {local_rank} has no GPU: this host has {count} "
                                    f"(launch at most {count} processes per node)")
    return torch.device("cuda", local_rank)


def init_process_group(device: torch.device, *, timeout_s: float = 600.0) -> str:
    """Initialise the default process group from the environment (MASTER_ADDR, MASTER_PORT,
    WORLD_SIZE, RANK, as torchrun sets them): NCCL for a CUDA device (after making it current),
    gloo otherwise. Returns the backend name. Does nothing when already initialised."""
    if dist.is_initialized():
        return dist.get_backend()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return backend


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(local_rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                       "RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    fn(*args)


def spawn_local(fn: Callable, world_size: int, args: tuple = (), *, port: int | None = None) -> None:
    """Run `fn(*args)` in `world_size` fresh processes on this host, with the environment torchrun
    would give them (MASTER_ADDR 127.0.0.1, a free port, WORLD_SIZE, RANK = LOCAL_RANK). `fn` must
    be importable by name (a module-level function). One host only, so gloo and NCCL's bootstrap
    stay on the loopback interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME = lo unless set).
    Raises when any process fails."""
    import torch.multiprocessing as mp
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    mp.start_processes(_spawn_entry, args=(fn, world_size, port or free_port(), args), nprocs=world_size,
                       join=True, start_method="spawn")


# ---- groups -----------------------------------------------------------------------------------

@dataclass
class MoEGroups:
    """The process groups of one TP x EP MoE layout and this process's place in it.

    group: one group spanning all tp_size * ep_size ranks (the combine is one all-reduce over
      it); None when the layout is given as separate tp_group and ep_group (then the combine is
      an all-reduce over each in turn).
    """
    tp_size: int
    ep_size: int
    tp_rank: int
    ep_rank: int
    group: object | None = None
    tp_group: object | None = None
    ep_group: object | None = None

    @property
    def rank(self) -> int:
        """Rank within the layout: ep_rank * tp_size + tp_rank."""
        return self.ep_rank * self.tp_size + self.tp_rank

    @classmethod
    def from_world(cls, tp_size: int, ep_size: int = 1, group=None) -> "MoEGroups":
        """The whole default world (or `group`) is the layout: its size must be tp_size * ep_size;
        this process's rank in it gives (tp_rank, ep_rank)."""
        group = group if group is not None else dist.group.WORLD
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        check_world(world, tp_size, ep_size)
        tp_rank, ep_rank = rank_coords(rank, tp_size, ep_size)
        return cls(tp_size=tp_size, ep_size=ep_size, tp_rank=tp_rank, ep_rank=ep_rank, group=group)

    @classmethod
    def from_groups(cls, tp_group=None, ep_group=None) -> "MoEGroups":
        """Separate TP and EP groups (None: size 1); ranks are each group's own ranks."""
        def size_rank(g):
            return (1, 0) if g is None else (dist.get_world_size(g), dist.get_rank(g))
        (tp_size, tp_rank), (ep_size, ep_rank) = size_rank(tp_group), size_rank(ep_group)
        return cls(tp_size=tp_size, ep_size=ep_size, tp_rank=tp_rank, ep_rank=ep_rank,
                   tp_group=tp_group, ep_group=ep_group)

    def combine_groups(self) -> list:
        if self.group is not None:
            return [self.group] if self.tp_size * self.ep_size > 1 else []
        return [g for g, n in ((self.tp_group, self.tp_size), (self.ep_group, self.ep_size)) if n > 1]


# ---- measurements -------------------------------------------------------------------------------

def planned_read_bytes(plan: ShardPlan, tensors) -> int:
    """Bytes a rank following `plan` reads of a fused checkpoint layer `tensors` (LayerTensors):
    the sum over `plan.read_ranges()` of each slice's element count times the element size.
    Roles absent from the checkpoint (per-channel scales) count zero."""
    total = 0
    for role, indexes in plan.read_ranges().items():
        ref = getattr(tensors, role, None)
        if ref is None:
            continue
        for index in indexes:
            total += ref.slice_nbytes(*index)
    return total


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated since the last `reset_peak_memory` on a GPU
    ("cuda_max_allocated"), else the process's peak resident set size since it started
    ("peak_rss": includes the interpreter and torch themselves)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "peak_rss"


@dataclass
class LoadStats:
    """What loading one rank's shard cost: bytes read from disk, the bytes the plan says it should
    read (None for unfused checkpoints), and the wall time of the load."""
    bytes_read: int
    planned_bytes: int | None
    load_s: float
    extras: dict = field(default_factory=dict)


# ---- the layer ------------------------------------------------------------------------------------

class DistributedMXFP4MoE(torch.nn.Module):
    """The gpt-oss MoE layer split over TP x EP processes; every rank returns the full output.

    Each rank holds one `MXFP4MoE` on its own shard (its experts, its blocks of the intermediate
    dim, padded), computes its partial output and the ranks' partials are summed by an
    all-reduce (the w2 bias lives on TP rank 0 only, so it is added once per expert). Build it
    with `from_checkpoint` (loads only this rank's shard) or from already loaded weights.

    forward(x [T, H], identical on every rank: tokens are replicated) -> y [T, H] in x's dtype,
    identical on every rank. The partials are reduced in x's dtype (bf16 on a GPU, as engines do).
    Every rank of the layout must call forward together (it is a collective).

    Combine: with replicated tokens every rank already computes only the (token, expert) pairs of
    its own experts, so no dispatch is needed; the one all-reduce moves 2 (n-1)/n x T x H values
    per rank, which a return all-to-all followed by the all-gather that replicates the output
    cannot beat. An all-to-all dispatch pays off when tokens are sharded over the EP ranks (data-
    parallel attention): `expert_dispatch.TokenShardedMXFP4MoE` does that on this layer's shard.
    """

    def __init__(self, weights: ExpertWeights, groups: MoEGroups, backend: Backend = "auto",
                 compute_dtype: torch.dtype | None = None, combine: Combine = "all-reduce",
                 load_stats: LoadStats | None = None):
        super().__init__()
        if combine != "all-reduce":
            raise ValueError(f"DistributedMXFP4MoE: combine must be 'all-reduce', got {combine!r}")
        if (weights.tp_rank, weights.tp_size, weights.ep_rank, weights.ep_size) != \
                (groups.tp_rank, groups.tp_size, groups.ep_rank, groups.ep_size):
            raise ValueError(f"DistributedMXFP4MoE: weights are for tp_rank {weights.tp_rank} of {weights.tp_size}, "
                             f"ep_rank {weights.ep_rank} of {weights.ep_size}, but this process is tp_rank "
                             f"{groups.tp_rank} of {groups.tp_size}, ep_rank {groups.ep_rank} of {groups.ep_size}")
        self.local = MXFP4MoE(weights, backend=backend, compute_dtype=compute_dtype)
        self.groups = groups
        self.combine = combine
        self.load_stats = load_stats

    @property
    def weights(self) -> ExpertWeights:
        return self.local.weights

    @property
    def backend(self) -> str:
        return self.local.backend

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.local.compute_dtype

    @classmethod
    def from_checkpoint(cls, checkpoint, layer: int, *, groups: MoEGroups | None = None, tp_size: int | None = None,
                        ep_size: int | None = None, align: AlignSpec = "none", placement: Placement = "linear",
                        hidden_pad: int | None = None, device: torch.device | str | None = None,
                        backend: Backend = "auto", compute_dtype: torch.dtype | None = None,
                        combine: Combine = "all-reduce") -> "DistributedMXFP4MoE":
        """Load this rank's shard of layer `layer` and build the layer.

        checkpoint: a path, or an open `checkpoint.Checkpoint` (or another `formats.ExpertReader`).
        groups: the layout; default `MoEGroups.from_world(tp_size, ep_size)` (tp_size defaults to
          the world size / ep_size, ep_size to 1). align, placement, hidden_pad: as
          `ShardPlan.create`. device: default this process's current device (cuda:current on
          NCCL, cpu on gloo). Only this rank's slices are read from disk; `load_stats` records
          the bytes read, the bytes the plan predicts and the load time.
        """
        from .checkpoint import open_checkpoint
        from .loader import load_layer
        if groups is None:
            world = dist.get_world_size()
            ep_size = ep_size or 1
            tp_size = tp_size or max(1, world // ep_size)
            groups = MoEGroups.from_world(tp_size, ep_size)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend() == "nccl" else torch.device("cpu"))
        owned = not hasattr(checkpoint, "layer")
        ckpt = open_checkpoint(checkpoint) if owned else checkpoint
        try:
            cfg = ckpt.config
            plan = ShardPlan.create(num_experts=cfg.num_experts, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
                                    tp_size=groups.tp_size, tp_rank=groups.tp_rank, ep_size=groups.ep_size,
                                    ep_rank=groups.ep_rank, placement=placement, align=align, hidden_pad=hidden_pad)
            start = time.perf_counter()
            weights = load_layer(ckpt, layer, plan, device=device)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            load_s = time.perf_counter() - start
            tensors = ckpt.layer(layer)
            planned = planned_read_bytes(plan, tensors) if hasattr(tensors, "w13_blocks") else None
        finally:
            if owned:
                ckpt.close()
        stats = LoadStats(bytes_read=weights.bytes_read, planned_bytes=planned, load_s=load_s)
        return cls(weights, groups, backend=backend, compute_dtype=compute_dtype, combine=combine, load_stats=stats)

    @property
    def plan(self) -> ShardPlan | None:
        return self.weights.extras.get("plan")

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's own share of the output, before the combine: [T, H] in x's dtype."""
        return self.local(x)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum `partial` [T, H] over the layout's ranks and return the sum (in place when
        `partial` is contiguous; a strided view, such as the [:, :H] columns of a padded
        [T, H_pad] buffer, is copied first: torch's gloo reduces a view's storage, not its
        elements, and gives wrong values without an error)."""
        partial = partial.contiguous()
        for group in self.groups.combine_groups():
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
        return partial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.partial(x))

    def forward_with_router_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, and the routing weights [T, k] (the same on every rank: tokens and router
        are replicated)."""
        partial, router_scores = self.local.forward_with_router_scores(x)
        return self.reduce(partial), router_scores


# ---- small collectives for the CLI and the benchmark --------------------------------------------

def all_ok(ok: bool, device: torch.device) -> bool:
    """True when `ok` holds on every rank (an all-reduce MIN): lets all ranks leave together when
    one of them met an error, instead of the others waiting in the next collective."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_object(obj, src: int = 0, device: torch.device | None = None):
    """`obj` from rank `src` on every rank (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=device)
    return box[0]


def gather_objects(obj, device: torch.device | None = None) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    if device is not None and device.type == "cuda":
        # NCCL gathers through the current device; keep it explicit.
        torch.cuda.set_device(device)
    dist.gather_object(obj, out, dst=0)
    return out
