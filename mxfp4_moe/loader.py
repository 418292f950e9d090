"""The expert loader: follow a `ShardPlan` to build one layer's `ExpertWeights` for one rank.

Each checkpoint slice is read from disk on its own (only this rank's bytes) and copied into the
top-left corner of its preallocated, padded destination, narrowed along every dimension where the
destination is larger (`narrow_to_source`). Offsets into the checkpoint come from the plan, which
computes them from the checkpoint's own sizes, never from padded ones.

Padding fill (what every element outside the checkpoint's slice holds):
  weight blocks       0x00: zero codes in both nibbles, so padded weights are +0
  block scales        PAD_SCALE_E8M0 (2**0 = 1.0): finite, so zero codes times it stay 0. Byte 0
                      would do too; 0xFF would not: it is NaN, and NaN * 0 = NaN
  biases              0.0
  per-channel scales  1.0: finite and neutral; a padded output channel is 0 * 1.0 = 0
  router weight       0.0 on padded hidden columns (padded activations are zero anyway)
So padded hidden columns contribute nothing to any dot product, padded intermediate channels
come out of SwiGLU as 0 (gate = up = 0 gives 0 * sigmoid(0) * 1 = 0), and padded hidden outputs
are sliced off.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .formats import UnfusedLayerTensors
from .mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK, E8M0_NAN, PAD_SCALE_E8M0
from .semantics import GPT_OSS
from .sharding import SHARD_DIMS, ShardPlan
from .weights import ExpertWeights

PAD_CHANNEL_SCALE = 1.0
"""Per-output-channel weight scale written into padding (see the module docstring)."""

DEFAULT_MAX_READ_BYTES = 64 * 1024 * 1024
"""Largest single read: a run of experts is read in chunks of at most this many bytes (at least
one expert), so the loader's temporary stays bounded whatever the layer's size. Also the size of
each pinned staging buffer to a GPU, where 64 MiB measured fastest (benchmarks/RESULTS.md 2.1)."""


class TensorSource(Protocol):
    """What the loader needs of a checkpoint tensor (`checkpoint.TensorRef` is one)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self, *index: slice, contiguous: bool = True) -> torch.Tensor: ...


# ---- narrowing ------------------------------------------------------------------------------

def narrow_to_source(dest: torch.Tensor, source, *, param: str, rank: str | int, tensor: str,
                     shard_dim: int | None = None) -> torch.Tensor:
    """Narrow `dest` to `source`'s shape, keeping its top-left corner: a view of `dest`.

    dest: the (padded) destination, any dtype; source: a tensor, or anything with `.shape`,
    with the same number of dims. Every dimension where dest is larger is narrowed to
    `[0, source size)` (hidden and intermediate padding alike: narrowing only one padded dim is
    vLLM PR #37010's bug). param, rank, tensor: the destination's name, the rank (a label such as
    `plan.describe()`), and the checkpoint tensor, for the error message. shard_dim: the dim the
    TP split runs along, named in messages; None when there is none. Negative values count from
    the end as in torch (-1 is the last dim, not "none").

    Raises ValueError naming param, rank, dimension, both sizes and the checkpoint tensor where
    the ndims differ or dest is smaller than source in some dimension.
    """
    src_shape = tuple(source.shape)
    dst_shape = tuple(dest.shape)
    where = f"{param} on rank {rank} from checkpoint tensor {tensor}"
    if len(src_shape) != len(dst_shape):
        raise ValueError(f"{where}: the destination has {len(dst_shape)} dims {dst_shape} but the "
                         f"checkpoint slice has {len(src_shape)} dims {src_shape}")
    if shard_dim is not None:
        if not -len(dst_shape) <= shard_dim < len(dst_shape):
            raise ValueError(f"{where}: shard_dim {shard_dim} out of range for {len(dst_shape)} dims")
        shard_dim %= len(dst_shape)
    for dim, (d, s) in enumerate(zip(dst_shape, src_shape)):
        if d < s:
            role = " (the TP shard dim)" if dim == shard_dim else ""
            raise ValueError(f"{where}: destination dim {dim}{role} has size {d}, smaller than the "
                             f"checkpoint slice's {s} (destination {dst_shape}, slice {src_shape})")
    for dim, (d, s) in enumerate(zip(dst_shape, src_shape)):
        if d > s:
            dest = dest.narrow(dim, 0, s)
    return dest


# ---- copying --------------------------------------------------------------------------------

def _resolve(index: Sequence[slice], shape: Sequence[int]) -> list[int]:
    """Sizes selected by `index` (leading dims) followed by the remaining full dims."""
    sizes = [len(range(*s.indices(n))) for s, n in zip(index, shape)]
    return sizes + list(shape[len(index):])


class _Copier:
    """Reads slices through TensorSource.read in bounded chunks and copies them into place,
    counting the bytes read and the NaN scale bytes met."""

    def __init__(self, plan: ShardPlan, max_read_bytes: int, staging: "_PinnedStaging | None" = None):
        self.plan = plan
        self.max_read_bytes = max_read_bytes
        self.staging = staging
        self.bytes_read = 0
        self.nan_scale_bytes = 0

    def read(self, ref: TensorSource, index: Sequence[slice], *, scales: bool = False) -> torch.Tensor:
        # The loader copies every slice into its destination: take the reader's view as it is
        # (possibly strided, e.g. w2's TP share of each row) rather than a dense copy first.
        src = ref.read(*index, contiguous=False)
        self.bytes_read += src.numel() * src.element_size()
        # 0xFF is both the NaN byte and the largest uint8: a max() (fast, vectorized) rules it out,
        # and only a slice that holds one pays for counting.
        if scales and src.numel() and int(src.max()) == E8M0_NAN:
            self.nan_scale_bytes += int(torch.count_nonzero(src == E8M0_NAN))
        return src

    def copy(self, ref: TensorSource, src: torch.Tensor, dest: torch.Tensor, param: str,
             shard_dim: int | None) -> None:
        target = narrow_to_source(dest, src, param=param, rank=self.plan.describe(), tensor=ref.name,
                                  shard_dim=shard_dim)
        if self.staging is None:
            target.copy_(src)
        else:
            self.staging.copy(src, target)

    def copy_experts(self, ref: TensorSource, role: str, dest: torch.Tensor, *,
                     flatten_blocks: bool = False, squeeze_last: bool = False) -> None:
        """Copy this rank's part of a fused per-expert tensor `ref` [E, ...] into `dest` [E_local, ...].

        Follows `plan.read_ranges()[role]`, one contiguous run of experts at a time, in chunks
        of whole experts of at most max_read_bytes. flatten_blocks: the source is
        [n, rows, K/32, 16] and becomes [n, rows, K/2]; squeeze_last: [n, rows, 1] -> [n, rows].

        Where one expert's selection is a contiguous byte range of the file but several experts'
        are not (w13 rows under TP), experts are read one at a time: a contiguous read comes
        back as a view of the reader's memory map, so its bytes are copied once, straight into
        the destination, instead of into a temporary first.
        """
        runs = self.plan.expert_runs()
        indexes = self.plan.read_ranges()[role]
        assert len(indexes) in (0, len(runs)), (role, indexes, runs)
        for (g_start, g_stop, l_start), index in zip(runs, indexes):
            sizes = _resolve(index, ref.shape)
            per_expert = ref.dtype.itemsize
            for n in sizes[1:]:
                per_expert *= n
            if per_expert == 0:
                continue                                   # an empty TP share: nothing to read
            partial = [d for d in range(1, len(sizes)) if sizes[d] != ref.shape[d]]
            one_expert_contiguous = len(partial) == 1 and all(
                sizes[d] == ref.shape[d] for d in range(partial[0] + 1, len(sizes)))
            step = 1 if one_expert_contiguous else max(1, self.max_read_bytes // per_expert)
            for c_start in range(g_start, g_stop, step):
                c_stop = min(g_stop, c_start + step)
                src = self.read(ref, (slice(c_start, c_stop), *index[1:]), scales=role.endswith("_scales"))
                if flatten_blocks:
                    src = src.reshape(*src.shape[:-2], src.shape[-2] * src.shape[-1])
                if squeeze_last:
                    src = src.reshape(src.shape[:-1])
                local = slice(l_start + c_start - g_start, l_start + c_stop - g_start)
                self.copy(ref, src, dest[local], role, SHARD_DIMS[role])


class _PinnedStaging:
    """Host-to-device copies through two pinned buffers: the CPU copies one slice from the
    memory-mapped file into a free buffer while the GPU's copy engine still moves the previous
    one, instead of a pageable copy that the driver stages (and waits on) chunk by chunk."""

    def __init__(self, buffer_bytes: int):
        self.buffers = [torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.in_flight: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def copy(self, src: torch.Tensor, target: torch.Tensor) -> None:
        nbytes = src.numel() * src.element_size()
        if nbytes > self.buffers[0].numel() or nbytes % src.element_size():
            target.copy_(src)                      # larger than a buffer (never for a planned read)
            return
        i, self.turn = self.turn, 1 - self.turn
        if self.in_flight[i] is not None:
            self.in_flight[i].synchronize()        # the buffer's previous copy has left it
        staged = self.buffers[i][:nbytes].view(src.dtype).view(src.shape)
        staged.copy_(src)
        target.copy_(staged, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.in_flight[i] = event

    def finish(self) -> None:
        for event in self.in_flight:
            if event is not None:
                event.synchronize()


def _check_fused_shapes(tensors, plan: ShardPlan) -> None:
    """Take E, H, I from the checkpoint tensors themselves and check them against the plan."""
    e, rows, h_blocks, _ = tensors.w13_blocks.shape
    found = {"num_experts": e, "hidden": h_blocks * BLOCK_SIZE, "inter": rows // 2}
    planned = {"num_experts": plan.num_experts, "hidden": plan.hidden, "inter": plan.inter_total}
    for key in found:
        if found[key] != planned[key]:
            raise ValueError(f"load_layer: the plan was made for {key} {planned[key]} but checkpoint "
                             f"tensor {tensors.w13_blocks.name} {tuple(tensors.w13_blocks.shape)} has "
                             f"{key} {found[key]} ({plan.describe()})")
    w2_expected = (e, found["hidden"], found["inter"] // BLOCK_SIZE, BYTES_PER_BLOCK)
    if tuple(tensors.w2_blocks.shape) != w2_expected:
        raise ValueError(f"load_layer: checkpoint tensor {tensors.w2_blocks.name} has shape "
                         f"{tuple(tensors.w2_blocks.shape)}, expected {w2_expected} to match "
                         f"{tensors.w13_blocks.name}")
    for role, out in (("w13_channel_scale", rows), ("w2_channel_scale", found["hidden"])):
        ref = getattr(tensors, role, None)
        if ref is not None and tuple(ref.shape) not in ((e, out), (e, out, 1)):
            raise ValueError(f"load_layer: per-channel scale {ref.name} has shape {tuple(ref.shape)}, "
                             f"expected ({e}, {out}) or ({e}, {out}, 1)")


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialized storage for a destination (tests replace this to poison it, so an element
    the loader forgot to write fails their comparisons)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _fill_outside(t: torch.Tensor, covered: tuple[int, ...], value) -> None:
    """Fill every element of `t` outside the top-left box `[0, covered[d])` of each dim d.

    The outside is the union over d of {index: index[j] < covered[j] for j < d, index[d] >=
    covered[d]}: disjoint slabs, so each padded element is written once and no copied one is.
    `covered` may be shorter than t.ndim (later dims are then inside the box).
    """
    for d, c in enumerate(covered):
        if c < t.shape[d]:
            t[tuple(slice(0, covered[j]) for j in range(d)) + (slice(c, None),)].fill_(value)


def _allocate(plan: ShardPlan, device, *, w13_channel: bool, w2_channel: bool, w13_bias: bool = True,
              w2_bias: bool = True, router_bias: bool = True) -> dict[str, torch.Tensor | None]:
    """The padded destinations, uninitialized where the checkpoint's slices will be copied and
    filled with the documented padding values everywhere else.

    The copied region of each tensor is its top-left box: this rank's experts, 2 * plan.inter
    w13 rows (plan.inter w2 elements) and plan.hidden columns (rows) - exactly what the reads
    cover. A tensor the checkpoint lacks (w13_bias, w2_bias, router_bias = False; w2's bias on
    TP ranks other than 0) is padding whole. Filling only the padding, rather than zeroing
    everything and then copying over most of it, saves a pass over the rank's memory.
    """
    e, hp, ip, ne = plan.num_local_experts, plan.hidden_pad, plan.inter_pad, plan.num_experts
    h, n = plan.hidden, plan.inter
    u8, f32 = torch.uint8, torch.float32
    nothing = (0,)
    specs = {   # role: (shape, dtype, fill, covered box)
        "w13_blocks": ((e, 2 * ip, hp // 2), u8, 0, (e, 2 * n, h // 2)),
        "w13_scales": ((e, 2 * ip, hp // BLOCK_SIZE), u8, PAD_SCALE_E8M0, (e, 2 * n, h // BLOCK_SIZE)),
        "w13_bias": ((e, 2 * ip), f32, 0.0, (e, 2 * n) if w13_bias else nothing),
        "w2_blocks": ((e, hp, ip // 2), u8, 0, (e, h, n // 2)),
        "w2_scales": ((e, hp, ip // BLOCK_SIZE), u8, PAD_SCALE_E8M0, (e, h, n // BLOCK_SIZE)),
        "w2_bias": ((e, hp), f32, 0.0, (e, h) if w2_bias and plan.includes_w2_bias else nothing),
        "w13_channel_scale": ((e, 2 * ip), f32, PAD_CHANNEL_SCALE, (e, 2 * n)),
        "w2_channel_scale": ((e, hp), f32, PAD_CHANNEL_SCALE, (e, h)),
        "router_weight": ((ne, hp), f32, 0.0, (ne, h)),
        "router_bias": ((ne,), f32, 0.0, (ne,) if router_bias else nothing),
    }
    dest: dict[str, torch.Tensor | None] = {}
    for role, (shape, dtype, fill, covered) in specs.items():
        if (role == "w13_channel_scale" and not w13_channel) or (role == "w2_channel_scale" and not w2_channel):
            dest[role] = None
            continue
        dest[role] = _empty(shape, dtype, device)
        _fill_outside(dest[role], covered, fill)
    return dest


def _load_fused(tensors, plan: ShardPlan, dest: dict, copier: _Copier) -> None:
    """gpt-oss layout: w13 rows interleaved in the checkpoint already, the kernel's layout."""
    copier.copy_experts(tensors.w13_blocks, "w13_blocks", dest["w13_blocks"], flatten_blocks=True)
    copier.copy_experts(tensors.w13_scales, "w13_scales", dest["w13_scales"])
    copier.copy_experts(tensors.w13_bias, "w13_bias", dest["w13_bias"])
    copier.copy_experts(tensors.w2_blocks, "w2_blocks", dest["w2_blocks"], flatten_blocks=True)
    copier.copy_experts(tensors.w2_scales, "w2_scales", dest["w2_scales"])
    copier.copy_experts(tensors.w2_bias, "w2_bias", dest["w2_bias"])
    for role in ("w13_channel_scale", "w2_channel_scale"):
        ref = getattr(tensors, role, None)
        if ref is not None:
            copier.copy_experts(ref, role, dest[role], squeeze_last=len(ref.shape) == 3)


def _load_unfused(tensors: UnfusedLayerTensors, plan: ShardPlan, dest: dict, copier: _Copier) -> None:
    """Per-expert gate/up/down tensors (see `mxfp4_moe.unfused`), interleaved into the kernel's
    fused w13 on the way: gate row j goes to w13 row 2j, up row j to row 2j + 1."""
    a, b = plan.inter_start, plan.inter_stop
    rows = slice(a, b)                                       # this rank's gate (or up) rows
    blocks = plan.w2_blocks_range                            # its blocks of down's input dim
    down_bytes = slice(a // 2, b // 2)                       # ... as packed bytes of down's rows
    ip, hp = plan.inter_pad, plan.hidden_pad
    for local, g in enumerate(plan.local_experts):
        ex = tensors.experts[g]
        if b > a:
            # View w13 [2 I_pad, ...] as [I_pad, 2, ...]: [:, 0] is the gate rows, [:, 1] the up rows.
            pairs = {
                "w13_blocks": dest["w13_blocks"][local].view(ip, 2, hp // 2),
                "w13_scales": dest["w13_scales"][local].view(ip, 2, hp // BLOCK_SIZE),
                "w13_bias": dest["w13_bias"][local].view(ip, 2),
            }
            if dest["w13_channel_scale"] is not None:
                pairs["w13_channel_scale"] = dest["w13_channel_scale"][local].view(ip, 2)
            for half, proj in enumerate((ex.gate, ex.up)):
                for role, ref, is_scale in (("w13_blocks", proj.weight, False),
                                            ("w13_scales", proj.weight_scale, True),
                                            ("w13_bias", proj.bias, False),
                                            ("w13_channel_scale", proj.channel_scale, False)):
                    if ref is None or role not in pairs:
                        continue
                    src = copier.read(ref, (rows,), scales=is_scale)
                    if role == "w13_channel_scale":
                        src = src.reshape(src.shape[0])
                    copier.copy(ref, src, pairs[role][:, half], role, 0)
            down = ex.down
            copier.copy(down.weight, copier.read(down.weight, (slice(None), down_bytes)),
                        dest["w2_blocks"][local], "w2_blocks", 1)
            copier.copy(down.weight_scale, copier.read(down.weight_scale, (slice(None), blocks), scales=True),
                        dest["w2_scales"][local], "w2_scales", 1)
        down = ex.down
        if down.bias is not None and plan.includes_w2_bias:
            copier.copy(down.bias, copier.read(down.bias, ()), dest["w2_bias"][local], "w2_bias", None)
        if down.channel_scale is not None and dest["w2_channel_scale"] is not None:
            src = copier.read(down.channel_scale, ())
            copier.copy(down.channel_scale, src.reshape(src.shape[0]), dest["w2_channel_scale"][local],
                        "w2_channel_scale", None)


def load_layer(checkpoint, layer: int, plan: ShardPlan, device: torch.device | str = "cpu", *,
               max_read_bytes: int = DEFAULT_MAX_READ_BYTES, pinned_staging: bool | None = None) -> ExpertWeights:
    """Build layer `layer`'s expert weights for the rank `plan` describes.

    checkpoint: a `formats.ExpertReader`, whatever its format: gpt-oss fused (`checkpoint.Checkpoint`,
      HF or original names) or unfused (`unfused.UnfusedCheckpoint`, per-expert gate/up/down),
      compressed-tensors, Quark, GGUF; anything with `.config` (a MoEConfig) and `.layer(i)` returning
      LayerTensors or UnfusedLayerTensors serves, and its `.semantics` (default gpt-oss's) goes
      into the weights' activation and router scoring.
    Returns ExpertWeights on `device` in the padded kernel layout (E_local = plan's local
    experts, I_pad = plan.inter_pad, H_pad = plan.hidden_pad):
      w13_blocks [E_local, 2*I_pad, H_pad/2] uint8, w13_scales [E_local, 2*I_pad, H_pad/32] uint8,
      w13_bias [E_local, 2*I_pad] float32 (rows interleaved: 2j gate, 2j+1 up);
      w2_blocks [E_local, H_pad, I_pad/2] uint8, w2_scales [E_local, H_pad, I_pad/32] uint8,
      w2_bias [E_local, H_pad] float32, checkpoint values on TP rank 0, zeros elsewhere
      (`w2_bias_included` says which);
      w13_channel_scale [E_local, 2*I_pad] / w2_channel_scale [E_local, H_pad] float32 when the
      checkpoint has per-output-channel scales ([E, out] or [E, out, 1]), else None;
      router_weight [E, H_pad] float32 and router_bias [E] float32, replicated.
    Padding holds the fill the module docstring documents. Only this rank's slices are read,
    at most `max_read_bytes` at a time; `bytes_read` counts them. `extras` holds the plan and
    `nan_scale_bytes`, the number of 0xFF (NaN) scale bytes among the bytes read.
    pinned_staging: copy to a CUDA device through two pinned host buffers of max_read_bytes,
      overlapping the read of one slice with the transfer of the last (`_PinnedStaging`).
      None: on for a CUDA device (benchmarks/RESULTS.md 2).
    """
    if not isinstance(plan, ShardPlan):
        raise TypeError(f"load_layer: plan must be a ShardPlan, got {type(plan).__name__}")
    if max_read_bytes < 1:
        raise ValueError(f"load_layer: max_read_bytes must be positive, got {max_read_bytes}")
    config = checkpoint.config
    semantics = getattr(checkpoint, "semantics", GPT_OSS)     # the format readers' MoE family
    tensors = checkpoint.layer(layer)
    unfused = isinstance(tensors, UnfusedLayerTensors)
    if unfused:
        tensors.check_sizes(num_experts=plan.num_experts, hidden=plan.hidden, inter=plan.inter_total)
        w13_channel, w2_channel = tensors.has_channel_scales()
        w13_bias, w2_bias = tensors.has_biases()
        router_bias = tensors.router_bias is not None
    else:
        _check_fused_shapes(tensors, plan)
        w13_channel = getattr(tensors, "w13_channel_scale", None) is not None
        w2_channel = getattr(tensors, "w2_channel_scale", None) is not None
        w13_bias = w2_bias = router_bias = True
    dest = _allocate(plan, device, w13_channel=w13_channel, w2_channel=w2_channel, w13_bias=w13_bias,
                     w2_bias=w2_bias, router_bias=router_bias)
    device = torch.device(device)
    if pinned_staging is None:
        pinned_staging = device.type == "cuda"
    if pinned_staging and device.type != "cuda":
        raise ValueError(f"load_layer: pinned_staging needs a CUDA device, got {device}")
    staging = _PinnedStaging(max_read_bytes) if pinned_staging else None
    copier = _Copier(plan, max_read_bytes, staging)
    if unfused:
        _load_unfused(tensors, plan, dest, copier)
    else:
        _load_fused(tensors, plan, dest, copier)
    for role in ("router_weight", "router_bias"):
        ref = getattr(tensors, role)
        if ref is None:
            continue                     # an unfused checkpoint's router may have no bias: zeros
        if tuple(ref.shape[:1]) != (plan.num_experts,) or tuple(ref.shape[1:]) not in ((), (plan.hidden,)):
            raise ValueError(f"load_layer: router tensor {ref.name} has shape {tuple(ref.shape)}, expected "
                             f"({plan.num_experts}, {plan.hidden}) for the weight or ({plan.num_experts},) "
                             "for the bias")
        copier.copy(ref, copier.read(ref, (slice(None),)), dest[role], role, None)
    if staging is not None:
        staging.finish()                 # the last slices are in flight; the buffers must outlive them

    weights = ExpertWeights(
        w13_blocks=dest["w13_blocks"], w13_scales=dest["w13_scales"], w13_bias=dest["w13_bias"],
        w2_blocks=dest["w2_blocks"], w2_scales=dest["w2_scales"], w2_bias=dest["w2_bias"],
        router_weight=dest["router_weight"], router_bias=dest["router_bias"],
        hidden=plan.hidden, inter=plan.inter,
        local_experts=torch.tensor(plan.local_experts, dtype=torch.int64, device=device),
        expert_map=plan.expert_map.to(device),
        top_k=config.experts_per_token, swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit,
        activation=semantics.activation, router_scoring=semantics.router, norm_topk_prob=semantics.norm_topk_prob,
        w13_channel_scale=dest["w13_channel_scale"], w2_channel_scale=dest["w2_channel_scale"],
        w2_bias_included=plan.includes_w2_bias,
        tp_rank=plan.tp_rank, tp_size=plan.tp_size, ep_rank=plan.ep_rank, ep_size=plan.ep_size,
        bytes_read=copier.bytes_read,
        extras={"plan": plan, "nan_scale_bytes": copier.nan_scale_bytes},
    )
    weights.validate()
    return weights
