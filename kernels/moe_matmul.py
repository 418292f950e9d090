"""Launcher for the grouped MXFP4 matmul (`_moe_matmul.py`): checks the arguments, allocates the
output, picks block sizes and the grid, and launches. The torch twin with the same signature is
`mxfp4_moe.reference.reference_moe_matmul`.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
import triton

from mxfp4_moe.mxfp4 import BLOCK_SIZE      # the format's constants: a leaf module, no cycle
from mxfp4_moe.semantics import ACTIVATIONS  # (a leaf module too)

from ._compat import LAUNCH_OPTIONS
from ._device import cuda_major, interpreting
from ._grid_dependency import pdl_launch
from ._moe_matmul import _moe_matmul_kernel
from .fragment_layout import FragmentWeights

if TYPE_CHECKING:           # routing.py launches kernels from this package: no import back at run time
    from mxfp4_moe.routing import RoutingMetadata

Combine = Literal["none", "atomic", "slots"]
Dequant = Literal["auto", "bytes", "words", "ptx"]
DEQUANT_MODES = ("bytes", "words", "ptx")
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


Kernel = Literal["triton", "sm90", "rs"]


@dataclass(frozen=True)
class MatmulConfig:
    """Block sizes and schedule of one launch; block_m must equal the routing metadata's.

    kernel: "triton" (`_moe_matmul.py`: any GPU and the interpreter), "sm90" (`_moe_matmul_sm90.py`:
      Hopper, bf16, checkpoint order; the decode of a K step overlaps the previous step's wgmma)
      or "rs" (`_moe_matmul_rs.py`: Hopper, bf16, weights in fragment order, passed as
      `moe_matmul(fragments=...)`, decoded into the wgmma's register operand).
    num_stages: "sm90": the copy ring's depth (>= 2, num_stages - 1 steps in flight); "rs": x
      buffers (>= 3, num_stages - 2 steps in flight); "triton": Triton's software pipelining.
    "rs" only: swap_ab, block_n = 16 or 32 * num_warps (weight rows per warp), block_k 64, 128 or
      256; prefetch (>= 1): K steps of weights held in registers (prefetch - 1 loaded ahead);
      split_k: programs per tile along K (w2's atomic combine adds their partial sums);
      pipeline_mma: each step's wgmma runs on during the next step's decode, on a second register
      fragment (correct, but off by default: the extra registers halve the programs per SM);
      width_step (0 = off): an expert's last, partial tile runs on the wgmma's N side only as wide
      as its rows rounded up to width_step (a power of two in [4 * num_warps, block_m)).
    "sm90" only: the wgmma's row side (block_n with swap_ab, else block_m) a multiple of
      16 * num_warps, block_k in 32..256.
    Why the defaults are what they are: benchmarks/RESULTS.md section 3.4.
    """
    block_m: int
    block_n: int
    block_k: int
    swap_ab: bool
    num_warps: int = 4
    num_stages: int = 3
    kernel: Kernel = "triton"
    prefetch: int = 1
    split_k: int = 1
    pipeline_mma: bool = False
    width_step: int = 0


def pick_block_m(num_rows: int, num_local_experts: int) -> int:
    """Rows per tile: a power of two in 16..128.

    The smallest one at or above the mean rows per local expert m, one step larger when that
    leaves many experts needing a second tile (m + 2 * sqrt(m) above it: the counts are roughly
    Poisson, and reading them would synchronise) while the tile is still a small swapped one
    (<= 32 rows): every extra tile reads and dequantizes its expert's weights again
    (RESULTS.md 3.4).
    """
    mean = num_rows / max(1, num_local_experts)
    block_m = 16
    while block_m < 128 and block_m < mean:
        block_m *= 2
    if block_m <= 16 and mean + 2.0 * mean ** 0.5 > block_m:
        block_m *= 2
    return block_m


# The fragment-order kernel's config per tile size: 64-row programs (4 warps) except at 128-row
# tiles, where 8 warps share each x tile; 128-wide K steps up to 32-row tiles, 64 from there;
# from 64 rows, width_step half the tile. At <= 8 routed rows (a few hundred programs) the K loop's
# length bounds the time: w13 takes 256-wide steps, w2 splits K in 4. The fastest of the configs
# measured: RESULTS.md 3.4.
_RS_FEW_ROWS = 8
_RS_FEW_ROWS_CONFIGS = {True: MatmulConfig(16, 64, 256, True, 4, 4, "rs", 2),
                        False: MatmulConfig(16, 64, 128, True, 4, 4, "rs", 2, split_k=4)}
_RS_CONFIGS = {16: MatmulConfig(16, 64, 128, True, 4, 4, "rs", 2),
               32: MatmulConfig(32, 64, 128, True, 4, 4, "rs", 2),
               64: MatmulConfig(64, 64, 64, True, 4, 4, "rs", 2, width_step=32),
               128: MatmulConfig(128, 128, 64, True, 8, 4, "rs", 3, width_step=64)}


def default_config(block_m: int, n: int, k: int, *, swiglu: bool = False, sm90: bool = False,
                   mean_rows: float | None = None, fragments: bool = False, rows: int | None = None) -> MatmulConfig:
    """Block sizes for an [n, k] weight at `block_m` rows per tile (swiglu: the w13 launch;
    mean_rows: routed rows per local expert, rows: routed rows in all, when known; fragments:
    the weights are also in fragment order, and sm90: on a Hopper GPU in bf16 -> the "rs"
    kernel; its split_k > 1 assumes w2's atomic combine, the launcher drops it otherwise).

    With fragments on sm90: `_RS_CONFIGS` by tile size (`_RS_FEW_ROWS_CONFIGS` at <= 8 rows).
    Otherwise: few rows per expert, swap A and B (y.T = W @ x.T) so weight rows fill the MMA's
    wide side; sm90 (a Hopper GPU and bf16) from 64-row tiles up, the "sm90" Gluon kernel, whose
    weight decode overlaps the previous K step's wgmma. The choices are the fastest of the
    sweeps and probes in benchmarks/RESULTS.md (H200 and H100). Under the interpreter, small
    blocks (it runs per program in numpy).
    """
    if interpreting():
        return MatmulConfig(block_m, block_n=32, block_k=64, swap_ab=block_m <= 32, num_warps=4, num_stages=1)
    if sm90 and fragments and block_m in _RS_CONFIGS:
        if block_m == 16 and rows is not None and rows <= _RS_FEW_ROWS:
            return _RS_FEW_ROWS_CONFIGS[swiglu]
        return _RS_CONFIGS[block_m]
    if block_m <= 16 and not swiglu and mean_rows is not None and mean_rows < 1:
        # w2 with fewer rows than experts (T = 1, 8 at E = 128): half the K steps per program
        # (RESULTS.md 3.4).
        return MatmulConfig(block_m, block_n=64, block_k=128, swap_ab=True, num_warps=4, num_stages=4)
    if block_m <= 16:
        return MatmulConfig(block_m, block_n=64, block_k=64, swap_ab=True, num_warps=4, num_stages=4)
    if block_m <= 32:
        # 128 weight rows: two wgmma row blocks share each x tile (RESULTS.md 3.4).
        return MatmulConfig(block_m, block_n=128, block_k=64, swap_ab=True, num_warps=4, num_stages=4)
    if block_m == 64:
        return MatmulConfig(block_m, block_n=128, block_k=64, swap_ab=False, num_warps=4, num_stages=3,
                            kernel="sm90" if sm90 else "triton")
    if sm90:
        # Two warpgroups (64 rows each) share each weight tile; 4 x tiles in flight.
        return MatmulConfig(block_m, block_n=128, block_k=64, swap_ab=False, num_warps=8, num_stages=4,
                            kernel="sm90")
    if not swiglu:
        # w2 at 128-row tiles: 4 warps and 4 stages (still no spills), RESULTS.md 3.4.
        return MatmulConfig(block_m, block_n=128, block_k=64, swap_ab=False, num_warps=4, num_stages=4)
    return MatmulConfig(block_m, block_n=128, block_k=64, swap_ab=False, num_warps=8, num_stages=3)


def words_aligned(blocks: torch.Tensor) -> bool:
    """True when `blocks` [E, N, K // 2] uint8 can be read as uint32 words (dequant "words"/"ptx"):
    unit stride along K, row and expert strides and the data pointer multiples of 4 bytes."""
    word = 4
    return (blocks.stride(2) == 1 and blocks.stride(1) % word == 0 and blocks.stride(0) % word == 0
            and blocks.data_ptr() % word == 0)


def pick_dequant(compute_dtype: torch.dtype, blocks: torch.Tensor) -> str:
    """The dequantization the kernel uses by default: "ptx" for bf16 on the GPU when the weights
    can be read as words (about half the K loop's instructions of "bytes": RESULTS.md 3.4),
    else "bytes"."""
    if compute_dtype == torch.bfloat16 and not interpreting() and words_aligned(blocks):
        return "ptx"
    return "bytes"


def _check_weight(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"moe_matmul: {name} expected {tuple(shape)} {dtype}, found {tuple(t.shape)} {t.dtype}")
    if t.device != device:
        raise ValueError(f"moe_matmul: {name} is on {t.device}, x on {device}")


def moe_matmul(x: torch.Tensor, blocks: torch.Tensor, scales_e8m0: torch.Tensor, bias: torch.Tensor | None,
               meta: RoutingMetadata, *, channel_scale: torch.Tensor | None = None, gather: bool = True,
               swiglu: tuple[float, float] | None = None, apply_row_weight: bool = False,
               combine: Combine = "none", n_out: int | None = None,
               compute_dtype: torch.dtype = torch.bfloat16, config: MatmulConfig | None = None,
               out: torch.Tensor | None = None, dequant: Dequant = "auto",
               unsafe_pipelined_rs_mma: bool = False, fragments: FragmentWeights | None = None,
               activation: str = "swiglu_oai") -> torch.Tensor:
    """Grouped MXFP4 matmul over the expert-sorted rows of `meta`.

    For sorted row r of local expert e: h[r] = x[src(r)] @ dequant(W[e]).T (* channel_scale[e])
    (+ bias[e]) -> SwiGLU if asked (width halves) -> * routing weight if asked -> output.

    x: [T, K_x] (gather=True: row src(r) = meta.sorted_token[r]) or [R, K_x] in sorted row order
       (gather=False); K_x <= K, columns past K_x count as zero (padded hidden). Any float dtype;
       converted to `compute_dtype` in the kernel.
    blocks: [E_local, N, K // 2] uint8, low nibble = even k; scales_e8m0: [E_local, N, K // 32] uint8.
       With `fragments`, both may be shape-only stand-ins on the meta device (a layer that keeps
       only the fragment-order copy); the call then raises if the "rs" kernel cannot run it.
    bias, channel_scale: [E_local, N] float32 or None
    swiglu: (alpha, limit) on interleaved gate/up columns (2j gate, 2j + 1 up), or None: the
       gated activation's step, whose function `activation` names: "swiglu_oai" (gpt-oss's
       clamped SwiGLU, alpha and limit used) or "silu" (silu(gate) * up; both unused). Only the
       portable Triton kernel has "silu": a default config that picks a Gluon kernel ("sm90",
       "rs") falls back to it once per shape class (`kernel_fallbacks`), an explicit one raises.
    apply_row_weight: multiply row r by meta.sorted_weight[r]
    combine: "none"  -> [R, n_out] compute_dtype, sorted row order; rows of pairs dropped to other
                        ranks (r >= expert_offsets[-1]) are left unwritten
             "atomic"-> [T, n_out] float32: each token's rows summed by fp32 atomic adds
             "slots" -> [T, n_out] float32: rows written to their (token, slot) place, then summed
                        over the k slots (deterministic)
    n_out: output columns kept (<= N, or N // 2 with swiglu); default all of them.
    compute_dtype: bfloat16 (GPU), float16 or float32 (the interpreter's bf16 is unusable).
    config: block sizes and kernel (default: `default_config`; for bf16 on a Hopper GPU the "rs"
       kernel when `fragments` are given, else the Gluon "sm90" kernel from 64-row tiles, and the
       Triton kernel where neither can run this call); its block_m must be meta.block_m. A
       default Gluon kernel that fails to compile or launch falls back to the Triton kernel for
       that shape class, with one RuntimeWarning (`kernel_fallbacks`); an explicit config raises.
    out: for combine="none", an [R, n_out] compute_dtype tensor to write into (returned).
    dequant: how the kernel decodes the weights, all exact: "bytes" (one code at a time, any
       dtype), "words" (uint32 words in plain Triton), "ptx" (uint32 words through inline PTX; bf16,
       GPU only); "words"/"ptx" need `words_aligned(blocks)`. "auto": `pick_dequant`.
    fragments: the same weights in fragment order (`fragment_layout.to_fragment_order`), which
       the "rs" kernel reads instead of blocks / scales_e8m0 (those are still checked); other
       kernels ignore them.
    unsafe_pipelined_rs_mma: for benchmarks only. With swapped operands, let the matrix
       instructions run across K steps the way Triton 3.6 pipelines them, which races with the
       next step's decode (triton issue #9433, see `_moe_matmul_kernel`); measures the fix's cost.
    Scale bytes above 240 (weights beyond 2**113) are outside the kernel's decode range.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"moe_matmul: compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_matmul: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if combine not in ("none", "atomic", "slots"):
        raise ValueError(f"moe_matmul: combine must be 'none', 'atomic' or 'slots', got {combine!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"moe_matmul: x must be a 2-D float tensor, got {tuple(x.shape)} {x.dtype}")
    if blocks.dim() != 3:
        raise ValueError(f"moe_matmul: blocks must be [E_local, N, K // 2], got {tuple(blocks.shape)}")
    device = x.device
    shape_only = blocks.is_meta          # checkpoint order dropped: only `fragments` hold the weights
    if shape_only and fragments is None:
        raise ValueError("moe_matmul: blocks is a shape-only (meta) tensor, so the weights must come as "
                         "fragments= (fragment order, read by the 'rs' kernel)")
    if scales_e8m0.is_meta != shape_only:
        raise ValueError(f"moe_matmul: blocks is on {blocks.device} but scales_e8m0 on {scales_e8m0.device}: "
                         "both hold the weights, or both are shape-only (meta) stand-ins")
    weight_device = torch.device("meta") if shape_only else device
    n_experts, n, k_half = blocks.shape
    k = 2 * k_half
    if n_experts != meta.num_local_experts:
        raise ValueError(f"moe_matmul: blocks hold {n_experts} experts, routing metadata {meta.num_local_experts}")
    if k % BLOCK_SIZE:
        raise ValueError(f"moe_matmul: K = {k} (from blocks' last dim {k_half}) must be a multiple of {BLOCK_SIZE}")
    _check_weight("blocks", blocks, (n_experts, n, k_half), torch.uint8, weight_device)
    _check_weight("scales_e8m0", scales_e8m0, (n_experts, n, k // BLOCK_SIZE), torch.uint8, weight_device)
    if bias is not None:
        _check_weight("bias", bias, (n_experts, n), torch.float32, device)
    if channel_scale is not None:
        _check_weight("channel_scale", channel_scale, (n_experts, n), torch.float32, device)
    rows_in = meta.num_tokens if gather else meta.num_rows
    if x.shape[0] != rows_in:
        raise ValueError(f"moe_matmul: x has {x.shape[0]} rows, expected {rows_in} "
                         f"({'tokens' if gather else 'sorted rows T * k'})")
    if x.shape[1] > k:
        raise ValueError(f"moe_matmul: x has {x.shape[1]} columns, more than the weights' K = {k}")
    if apply_row_weight and meta.sorted_weight is None:
        raise ValueError("moe_matmul: apply_row_weight needs routing metadata built with topk_weights")
    n_full = n // 2 if swiglu is not None else n
    if swiglu is not None and n % 2:
        raise ValueError(f"moe_matmul: swiglu needs an even N (interleaved gate/up), got {n}")
    n_out = n_full if n_out is None else n_out
    if not 0 < n_out <= n_full:
        raise ValueError(f"moe_matmul: n_out must be in 1..{n_full}, got {n_out}")
    sm90_other = {"scales_e8m0": scales_e8m0, "bias": bias, "channel_scale": channel_scale, "out": out}
    sm90_dequant = "ptx" if dequant == "auto" else dequant     # what "auto" resolves to where sm90 can run
    split_k_ok = combine == "atomic" and swiglu is None        # split-K partial sums meet in the atomic adds
    explicit = config is not None
    if config is None:
        config = _pick_config(x, blocks, fragments, meta, n, k, swiglu is not None, split_k_ok, compute_dtype,
                              sm90_dequant, sm90_other)
    elif config.kernel == "sm90":
        problem = _sm90_unsupported(x, blocks, config, compute_dtype, sm90_dequant, sm90_other)
        if problem:
            raise ValueError(f"moe_matmul: kernel 'sm90' cannot run this call: {problem}")
    elif config.kernel == "rs":
        problem = _rs_unsupported(x, fragments, n, k, config, compute_dtype, sm90_other, split_k_ok=split_k_ok)
        if problem:
            raise ValueError(f"moe_matmul: kernel 'rs' cannot run this call: {problem}")
    elif config.kernel != "triton":
        raise ValueError(f"moe_matmul: config.kernel must be 'triton', 'sm90' or 'rs', got {config.kernel!r}")
    if shape_only and config.kernel != "rs":
        raise ValueError(f"moe_matmul: the weights are in fragment order only (blocks is a shape-only meta tensor), "
                         f"which only the 'rs' kernel reads (bf16 on a Hopper GPU); this call would run "
                         f"{config.kernel!r} ({config})")
    if dequant == "auto":
        dequant = pick_dequant(compute_dtype, blocks)
    elif dequant not in DEQUANT_MODES:
        raise ValueError(f"moe_matmul: dequant must be 'auto' or one of {DEQUANT_MODES}, got {dequant!r}")
    if dequant != "bytes" and not words_aligned(blocks):
        raise ValueError(f"moe_matmul: dequant={dequant!r} reads blocks as 4-byte words: needs stride 1 along K "
                         f"and 4-byte aligned rows, found strides {tuple(blocks.stride())}")
    if dequant == "ptx" and (compute_dtype != torch.bfloat16 or interpreting()):
        raise ValueError(f"moe_matmul: dequant='ptx' needs compute_dtype bfloat16 on a GPU (got {compute_dtype}"
                         f"{', under the interpreter' if interpreting() else ''})")
    if config.block_m != meta.block_m:
        raise ValueError(f"moe_matmul: config.block_m {config.block_m} != routing metadata block_m {meta.block_m}")

    tokens, rows = meta.num_tokens, meta.num_rows
    if out is not None:
        if combine != "none":
            raise ValueError("moe_matmul: out= is only for combine='none'")
        _check_weight("out", out, (rows, n_out), compute_dtype, device)
        y = out
    elif combine == "none":
        y = torch.empty((rows, n_out), dtype=compute_dtype, device=device)
    elif combine == "atomic":
        y = torch.zeros((tokens, n_out), dtype=torch.float32, device=device)
    else:
        y = torch.zeros((rows, n_out), dtype=compute_dtype, device=device)
    if rows == 0:
        return y if combine != "slots" else y.view(tokens, meta.top_k, n_out).sum(1, dtype=torch.float32)

    scatter = {"none": None, "atomic": meta.sorted_token, "slots": meta.sorted_slot}[combine]
    alpha, limit = swiglu if swiglu is not None else (0.0, 0.0)
    # Arguments every kernel takes: the routing, the sizes, the SwiGLU constants.
    routing = (meta.sorted_token, scatter if scatter is not None else meta.sorted_token,
               meta.sorted_weight if apply_row_weight else meta.expert_offsets,
               meta.expert_offsets, meta.tile_expert, meta.tile_row_start,
               n, x.shape[1], n_out, float(alpha), float(limit))
    fused = dict(K=k, GATHER=gather, SCATTER=scatter is not None, ATOMIC=combine == "atomic",
                 HAS_BIAS=bias is not None, HAS_CHANNEL_SCALE=channel_scale is not None,
                 SWIGLU=swiglu is not None, ROW_WEIGHT=apply_row_weight)
    act = activation if swiglu is not None else "swiglu_oai"     # (no activation step: nothing to refuse)
    launch = _Launch(x, blocks, scales_e8m0, fragments, bias, channel_scale, y, meta.max_tiles, routing, fused,
                     compute_dtype, dequant, unsafe_pipelined_rs_mma, act)
    shape_class = _ShapeClass(config, n, k, x.shape[1], swiglu is not None, combine, gather, act)
    # (No lookup, which hashes the config, until some fallback has been taken.)
    fallback = _FALLBACKS.get(shape_class) if _FALLBACKS and not explicit else None
    if fallback is None:
        try:
            _LAUNCHERS[config.kernel](launch, config)
        except Exception as error:          # a compile failure, or a launch this Triton/GPU refuses
            problem = f"{type(error).__name__}: {_first_line(error)}"
            if explicit or config.kernel == "triton":
                raise RuntimeError(f"moe_matmul: the {config.kernel!r} kernel cannot run {shape_class.describe()} "
                                   f"with {config}: {problem}") from error
            fallback = _fall_back(shape_class, problem, shape_only)
    if fallback is not None:
        if shape_only:
            blocks, scales_e8m0 = _checkpoint_order(fragments)
            dequant = pick_dequant(compute_dtype, blocks)
        launch = dataclasses.replace(launch, blocks=blocks, scales_e8m0=scales_e8m0, dequant=dequant)
        _LAUNCHERS["triton"](launch, fallback.config)
        fallback.calls += 1
    if combine == "slots":
        return y.view(tokens, meta.top_k, n_out).sum(1, dtype=torch.float32)
    return y


def _pick_config(x: torch.Tensor, blocks: torch.Tensor, fragments: FragmentWeights | None, meta: RoutingMetadata,
                 n: int, k: int, swiglu: bool, split_k_ok: bool, compute_dtype: torch.dtype, sm90_dequant: str,
                 sm90_other: dict) -> MatmulConfig:
    """`moe_matmul`'s config when the caller gives none: `default_config` for this call, stepping
    down from "rs" to "sm90" to the Triton kernel where the faster one cannot take the call."""
    shape_only = blocks.is_meta
    mean_rows = meta.num_rows / max(1, meta.num_local_experts)
    sm90 = compute_dtype == torch.bfloat16 and on_hopper(x.device)
    config = default_config(meta.block_m, n, k, swiglu=swiglu, mean_rows=mean_rows, sm90=sm90,
                            fragments=fragments is not None, rows=meta.num_rows)
    if config.split_k > 1 and not split_k_ok:
        config = dataclasses.replace(config, split_k=1)
    rs_problem = _rs_unsupported(x, fragments, n, k, config, compute_dtype, sm90_other,
                                 split_k_ok=split_k_ok) if config.kernel == "rs" else ""
    if rs_problem and shape_only:
        raise ValueError(f"moe_matmul: the weights are in fragment order only (blocks is a shape-only meta "
                         f"tensor), and the 'rs' kernel cannot run this call: {rs_problem}")
    if rs_problem:
        config = default_config(meta.block_m, n, k, swiglu=swiglu, mean_rows=mean_rows, sm90=sm90)
    if config.kernel == "sm90" and _sm90_unsupported(x, blocks, config, compute_dtype, sm90_dequant, sm90_other):
        config = default_config(meta.block_m, n, k, swiglu=swiglu)   # the Triton kernel
    return config


@dataclass(slots=True)
class _Launch:
    """One `moe_matmul` call's tensors and kernel arguments, checked: what each kernel's launcher
    needs besides its config."""
    x: torch.Tensor
    blocks: torch.Tensor
    scales_e8m0: torch.Tensor
    fragments: FragmentWeights | None
    bias: torch.Tensor | None
    channel_scale: torch.Tensor | None
    y: torch.Tensor
    max_tiles: int
    routing: tuple
    fused: dict
    compute_dtype: torch.dtype
    dequant: str
    unsafe_pipelined_rs_mma: bool
    activation: str = "swiglu_oai"


def _refuse_other_activations(a: _Launch, kernel: str) -> None:
    """The Gluon kernels' epilogue is gpt-oss's clamped SwiGLU only: raise for any other
    activation, so a default config falls back to the portable Triton kernel (`_fall_back`,
    one warning per shape class) and an explicit one fails, instead of computing the wrong one."""
    if a.fused["SWIGLU"] and a.activation != "swiglu_oai":
        raise NotImplementedError(f"the {kernel!r} kernel implements only the 'swiglu_oai' activation "
                                  f"(gpt-oss), not {a.activation!r}")


def _launch_rs(a: _Launch, config: MatmulConfig) -> None:
    _refuse_other_activations(a, "rs")
    from ._moe_matmul_rs import _moe_matmul_rs_kernel
    fw = a.fragments
    dummy = fw.words        # any tensor on the device: its pointer is never read when the flag is off
    bias = a.bias if a.bias is not None else dummy
    cs = a.channel_scale if a.channel_scale is not None else dummy
    x_desc = rs_x_descriptor(a.x, config) if not a.fused["GATHER"] else None
    grid = (triton.cdiv(fw.n, config.block_n), a.max_tiles, config.split_k)
    pdl = pdl_launch(a.x.device)
    _moe_matmul_rs_kernel[grid](             # unit strides along the last dims (checked by moe_matmul)
        a.x, a.x.stride(0), x_desc,
        fw.words, fw.scales, fw.row_groups,
        bias, bias.stride(0),
        cs, cs.stride(0),
        a.y, a.y.stride(0),
        *a.routing, **rs_constexprs(config, fw.row_groups, fw.k_steps, fw.k, a.x.shape[1]),
        X_TMA=x_desc is not None, PDL=pdl,
        **{name: a.fused[name] for name in ("GATHER", "SCATTER", "ATOMIC", "HAS_BIAS", "HAS_CHANNEL_SCALE",
                                            "SWIGLU", "ROW_WEIGHT")},
        num_warps=config.num_warps, launch_pdl=pdl, **LAUNCH_OPTIONS)


def _launch_sm90(a: _Launch, config: MatmulConfig) -> None:
    _refuse_other_activations(a, "sm90")
    from ._moe_matmul_sm90 import _moe_matmul_sm90_kernel
    bias = a.bias if a.bias is not None else a.blocks
    cs = a.channel_scale if a.channel_scale is not None else a.blocks
    words_desc, rows_per_expert = _words_descriptor(a.blocks, config)
    grid = (triton.cdiv(a.blocks.shape[1], config.block_n), a.max_tiles)
    _moe_matmul_sm90_kernel[grid](           # unit strides along the last dims (checked by moe_matmul)
        a.x, a.x.stride(0),
        words_desc, rows_per_expert,
        a.scales_e8m0, a.scales_e8m0.stride(0), a.scales_e8m0.stride(1),
        bias, bias.stride(0),
        cs, cs.stride(0),
        a.y, a.y.stride(0),
        *a.routing, STAGES=config.num_stages, SWAP_AB=config.swap_ab, **a.fused, **_block_constexprs(config),
        **LAUNCH_OPTIONS)


def _launch_triton(a: _Launch, config: MatmulConfig) -> None:
    blocks, scales, x = a.blocks, a.scales_e8m0, a.x
    bias = a.bias if a.bias is not None else blocks
    cs = a.channel_scale if a.channel_scale is not None else blocks
    grid = (triton.cdiv(blocks.shape[1], config.block_n), a.max_tiles)
    _moe_matmul_kernel[grid](
        x, x.stride(0), x.stride(1),
        blocks, blocks.stride(0), blocks.stride(1), blocks.stride(2),
        scales, scales.stride(0), scales.stride(1), scales.stride(2),
        bias, bias.stride(0), bias.stride(1),
        cs, cs.stride(0), cs.stride(1),
        a.y, a.y.stride(0), a.y.stride(1),
        *a.routing, SWAP_AB=config.swap_ab, EVEN_K=(a.fused["K"] % config.block_k == 0 and x.shape[1] == a.fused["K"]),
        COMPUTE_DTYPE=_tl_dtype(a.compute_dtype), DEQUANT=a.dequant,
        RETIRE_MMA_EACH_STEP=config.swap_ab and not interpreting() and not a.unsafe_pipelined_rs_mma,
        ACTIVATION=a.activation, num_stages=config.num_stages, **a.fused, **_block_constexprs(config), **LAUNCH_OPTIONS)


def _block_constexprs(config: MatmulConfig) -> dict:
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps)


_LAUNCHERS = {"rs": _launch_rs, "sm90": _launch_sm90, "triton": _launch_triton}


@dataclass
class KernelFallback:
    """A fast kernel that failed for a shape class, and the portable Triton config that runs it
    instead (`kernel_fallbacks`)."""
    failed_config: MatmulConfig     # its kernel: "rs" or "sm90"
    shape: str              # the shape class, in words
    error: str              # the compiler's (or launcher's) first error line
    config: MatmulConfig    # what runs instead (kernel "triton")
    calls: int = 0          # moe_matmul calls it has served

    @property
    def kernel(self) -> str:
        """The kernel that failed."""
        return self.failed_config.kernel

    def as_dict(self) -> dict:
        """JSON-ready: what `verify` reports."""
        return {"kernel": self.kernel, "config": dataclasses.asdict(self.failed_config), "shape": self.shape,
                "error": self.error, "ran": self.config.kernel}


class _ShapeClass(NamedTuple):
    """What a compiled kernel depends on, as far as a fallback goes: one warning and one
    fallback per class."""
    config: MatmulConfig
    n: int
    k: int
    k_x: int                # x's columns
    swiglu: bool
    combine: str
    gather: bool
    activation: str = "swiglu_oai"

    def describe(self) -> str:
        act = "SwiGLU" if self.activation == "swiglu_oai" else self.activation
        role = f"w13 + {act}" if self.swiglu else f"combine {self.combine!r}"
        return (f"[{self.n}, {self.k}] weights (x {self.k_x} wide, {'gathered' if self.gather else 'sorted'} rows, "
                f"{role}) at {self.config.block_m}-row tiles")


_FALLBACKS: dict[_ShapeClass, KernelFallback] = {}      # filled once per class


def kernel_fallbacks() -> list[KernelFallback]:
    """Every fallback taken in this process so far, in order: the shape classes for which a
    default Gluon kernel could not compile or launch and the portable Triton kernel runs instead."""
    return list(_FALLBACKS.values())


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (a CompilationError's own message, not the
    source excerpt it starts with)."""
    text = str(getattr(error, "error_message", None) or error)
    return next((line.strip() for line in text.splitlines() if line.strip()), repr(error))


def _fall_back(shape_class: _ShapeClass, problem: str, shape_only: bool) -> KernelFallback:
    """Record the portable Triton kernel as the fallback for `shape_class` and warn, once per
    class: a fast kernel that cannot compile must not take the layer down."""
    config = shape_class.config
    triton_config = default_config(config.block_m, shape_class.n, shape_class.k, swiglu=shape_class.swiglu)
    fallback = KernelFallback(config, shape_class.describe(), problem, triton_config)
    _FALLBACKS[shape_class] = fallback
    rebuilt = (" The layer holds its weights in fragment order only, so they are rebuilt once in checkpoint "
               "order for it (a second copy in memory)." if shape_only else "")
    warnings.warn(f"mxfp4_moe: the {config.kernel!r} kernel cannot run {fallback.shape} with {config} on Triton "
                  f"{triton.__version__}: {problem}. The portable Triton kernel runs this shape class instead "
                  f"(correct, slower).{rebuilt} Please report it with this message.", RuntimeWarning, stacklevel=3)
    return fallback


_CHECKPOINT_ORDER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _checkpoint_order(fragments: FragmentWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks and scales in checkpoint order rebuilt from `fragments`, once per fragment copy
    (kept while it lives): for the fallback of a layer that dropped its checkpoint-order copy."""
    if fragments not in _CHECKPOINT_ORDER:
        from .fragment_layout import from_fragment_order
        _CHECKPOINT_ORDER[fragments] = from_fragment_order(fragments)
    return _CHECKPOINT_ORDER[fragments]


def on_hopper(device: torch.device) -> bool:
    """Whether `device` is a Hopper GPU (sm_90) outside the interpreter: where the Gluon kernel runs."""
    return device.type == "cuda" and not interpreting() and cuda_major(device) == 9



def rs_constexprs(config: MatmulConfig, row_groups: int, k_steps: int, k: int, k_x: int) -> dict:
    """The "rs" kernel's tiling constexprs for a weight of K = k in fragment order (row_groups,
    k_steps: `FragmentWeights`) and x with k_x columns: what `moe_matmul` launches and what
    `sm90_report` compiles."""
    steps = -(-k // config.block_k)
    return dict(NUM_K=steps, LAYOUT_STEPS=k_steps, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, STAGES=config.num_stages, PREFETCH=config.prefetch, SPLIT_K=config.split_k,
                PIPELINE_MMA=config.pipeline_mma, WIDTH_STEP=config.width_step,
                EVEN_K=k_x == steps * config.block_k and steps % config.split_k == 0,
                ROW_MASK=row_groups % (config.block_n // 16) != 0)


def rs_x_tma_block(config: MatmulConfig):
    """The box of x rows one TMA copy of the "rs" kernel moves per K step when the rows need no
    gather, [block_m, block_k], and its shared-memory layout: (box, layout); None where the kernel
    copies x by cp.async whatever the gather (block_k != 64, whose rows would outgrow TMA's
    128-byte swizzle, or pipeline_mma)."""
    if config.block_k != 64 or config.pipeline_mma:
        return None
    from triton.experimental.gluon import language as gl
    box = [config.block_m, config.block_k]
    return box, gl.NVMMASharedLayout.get_default_for(box, gl.bfloat16)


def rs_x_descriptor(x: torch.Tensor, config: MatmulConfig):
    """The "rs" kernel's TMA descriptor over x [rows, K_x] bf16 read without a gather (w2's
    sorted rows), or None where it copies x by cp.async (`rs_x_tma_block`). `_gluon_call_problem`
    has checked what TMA needs: unit stride along K, 16-byte aligned pointer and row stride."""
    block = rs_x_tma_block(config)
    if block is None:
        return None
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    box, layout = block
    return TensorDescriptor(x, list(x.shape), list(x.stride()), box, layout)


def _gluon_call_problem(x: torch.Tensor, compute_dtype: torch.dtype, other: dict[str, torch.Tensor | None]) -> str:
    """Why neither Gluon kernel ("sm90", "rs") can run this call, whatever its config ("" when
    it can): the device, the dtype, and x and the other tensors (by name, None when absent), which
    both read with unit stride along the last dim."""
    if not on_hopper(x.device):
        return "it needs a Hopper GPU (sm_90), and Gluon kernels do not run under the interpreter"
    if compute_dtype != torch.bfloat16:
        return f"compute_dtype must be bfloat16, got {compute_dtype}"
    if x.dtype != torch.bfloat16 or x.stride(1) != 1 or x.stride(0) % 8 or x.shape[1] % 8 or x.data_ptr() % 16:
        return ("x must be bf16 with unit stride along K, rows and width multiples of 8 elements and a "
                f"16-byte aligned pointer (copied 16 bytes at a time); got {x.dtype} {tuple(x.shape)} "
                f"strides {tuple(x.stride())}")
    for name, t in other.items():
        if t is not None and t.stride(-1) != 1:
            return f"{name} needs unit stride along its last dim, found strides {tuple(t.stride())}"
    return ""


def _sm90_unsupported(x: torch.Tensor, blocks: torch.Tensor, config: MatmulConfig, compute_dtype: torch.dtype,
                      dequant: str, other: dict[str, torch.Tensor | None]) -> str:
    """Why the "sm90" kernel cannot run this call ("" when it can): `_gluon_call_problem`, then
    the config, the weights' TMA layout and the decode."""
    problem = _gluon_call_problem(x, compute_dtype, other)
    if problem:
        return problem
    rows_side = ("block_n", config.block_n) if config.swap_ab else ("block_m", config.block_m)
    if rows_side[1] % (16 * config.num_warps) or config.block_k % 32 or not 32 <= config.block_k <= 256:
        return (f"{rows_side[0]} (the wgmma's row side{' with swap_ab' if config.swap_ab else ''}) must be a "
                f"multiple of 16 * num_warps, and block_k a multiple of 32 in 32..256 (got {config})")
    if config.num_stages < 2:
        return f"num_stages must be >= 2 (got {config})"
    problem = _words_tma_problem(blocks)
    if problem:
        return problem
    if dequant != "ptx":
        return f"it always decodes with inline PTX (dequant 'ptx'), got dequant={dequant!r}"
    return ""


def _rs_unsupported(x: torch.Tensor, fragments: FragmentWeights | None, n: int, k: int, config: MatmulConfig,
                    compute_dtype: torch.dtype, other: dict[str, torch.Tensor | None], split_k_ok: bool = False) -> str:
    """Why the "rs" kernel cannot run this call ("" when it can): weights in fragment order
    matching the config, then `_gluon_call_problem`."""
    if fragments is None:
        return "it reads the weights in fragment order: pass fragments=to_fragment_order(blocks, scales)"
    if (fragments.n, fragments.k) != (n, k):
        return f"fragments hold an [{fragments.n}, {fragments.k}] weight, blocks an [{n}, {k}] one"
    if config.block_k not in (64, 128, 256):
        return f"block_k must be 64, 128 or 256 (1, 2 or 4 steps of the fragment layout); got {config}"
    if not config.swap_ab or config.block_n not in (16 * config.num_warps, 32 * config.num_warps):
        return f"it needs swap_ab and block_n = 16 or 32 * num_warps (16 or 32 weight rows per warp); got {config}"
    if config.num_stages < 3 or config.prefetch < 1 or config.split_k < 1:
        return f"num_stages must be >= 3, prefetch and split_k >= 1 (got {config})"
    step = config.width_step
    if step and (step & (step - 1) or not 4 * config.num_warps <= step < config.block_m):
        return f"width_step must be 0 or a power of two in [4 * num_warps, block_m) (got {config})"
    if config.split_k > 1 and not split_k_ok:
        return f"split_k > 1 needs combine='atomic' without SwiGLU (got {config})"
    if fragments.words.device != x.device or not (fragments.words.is_contiguous() and fragments.scales.is_contiguous()):
        return f"fragments must be contiguous and on {x.device} (they are on {fragments.words.device})"
    return _gluon_call_problem(x, compute_dtype, other)


_TMA_ALIGN = 16     # bytes: TMA needs 16-byte aligned base and row strides


def _words_tma_problem(blocks: torch.Tensor) -> str:
    """Why the Gluon kernel cannot read `blocks` [E, N, K // 2] uint8 through its TMA descriptor
    ("" when it can): the rows must lie in one 2-D array of int32 words (unit stride along K,
    16-byte aligned pointer and row stride, expert stride a whole number of rows)."""
    n_experts, _, _ = blocks.shape
    s_expert, s_row, s_k = blocks.stride()
    if (s_k != 1 or s_row <= 0 or s_row % _TMA_ALIGN or blocks.data_ptr() % _TMA_ALIGN
            or (n_experts > 1 and s_expert % s_row)):
        return (f"blocks must be rows of a 2-D array for TMA: unit stride along K, 16-byte aligned pointer "
                f"and row stride, expert stride a multiple of the row stride (strides {tuple(blocks.stride())}, "
                f"pointer offset {blocks.data_ptr() % _TMA_ALIGN} mod 16)")
    return ""


def words_tma_block(config: MatmulConfig):
    """The block of int32 words one TMA copy of the Gluon kernel moves, [block_n, block_k // 8],
    and its shared-memory layout: (block, layout). The descriptor's type in the kernel's
    signature (launch here, ahead-of-time compile in `sm90_report`)."""
    from triton.experimental.gluon import language as gl
    block = [config.block_n, config.block_k // 8]
    return block, gl.NVMMASharedLayout.get_default_for(block, gl.int32)


def _words_descriptor(blocks: torch.Tensor, config: MatmulConfig):
    """The Gluon kernel's TMA descriptor over `blocks` [E, N, K // 2] uint8 (checked by
    `_words_tma_problem`), read as int32 words [E * rows_per_expert, K // 8] in blocks of
    `words_tma_block(config)`; returns (descriptor, rows_per_expert)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    n_experts, n, k_half = blocks.shape
    s_expert, s_row, _ = blocks.stride()
    rows_per_expert = s_expert // s_row if n_experts > 1 else n
    rows = (n_experts - 1) * rows_per_expert + n
    byte_rows = blocks.as_strided((rows, k_half), (s_row, 1), blocks.storage_offset())
    words = byte_rows.view(torch.int32)
    block, layout = words_tma_block(config)
    return TensorDescriptor(words, list(words.shape), list(words.stride()), block, layout), rows_per_expert


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
