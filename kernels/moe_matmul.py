"""Launcher for the grouped MXFP4 matmul: `moe_matmul` checks the arguments (`_check_arguments`),
settles the config and the decode, allocates the output and launches the kernel the config
names (`_moe_matmul.py`, `_moe_matmul_sm90.py`, `_moe_matmul_rs.py`; `_launch_*`). The torch twin
with the same signature is `mxfp4_moe.reference.reference_moe_matmul`.

The rest of the matmul's host side lives beside it, one job a module: the block configs and tuned
defaults (`moe_matmul_configs.py`), whether a kernel can run a call here (`moe_matmul_support.py`)
and the fallback of a default fast kernel that fails to compile (`moe_matmul_fallbacks.py`).
Callers import their names from here as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import triton

from . import _device
from ._compat import LAUNCH_OPTIONS
from .launches import launch
from ._device import interpreting, on_hopper  # noqa: F401  (callers import them from here)
from ._format import BLOCK_SIZE
from ._grid_dependency import pdl_launch
from ._moe_matmul import _moe_matmul_kernel
from .fragment_layout import FragmentWeights
from .moe_matmul_configs import MatmulConfig, default_config, pick_block_m, rs_constexprs  # noqa: F401
from .moe_matmul_fallbacks import (KernelFallback, ShapeClass, checkpoint_order, fall_back,  # noqa: F401
                                   fallback_for, first_line, kernel_fallbacks)
from .moe_matmul_support import (_rs_unsupported, _sm90_unsupported, _words_descriptor,  # noqa: F401
                                 _words_tma_problem, pick_dequant, rs_x_descriptor, rs_x_tma_block, words_aligned,
                                 words_tma_block)
from .routing_metadata import RoutingMetadata

Combine = Literal["none", "atomic", "slots"]
Dequant = Literal["auto", "bytes", "words", "ptx"]
DEQUANT_MODES = ("bytes", "words", "ptx")
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The gated activations `_moe_matmul.py`'s epilogue implements (its ACTIVATION constexpr): the
# names `mxfp4_moe.semantics.ACTIVATIONS` gives them (tests/test_import_graph.py checks both agree).
ACTIVATIONS = ("swiglu_oai", "silu")


def moe_matmul(x: torch.Tensor, blocks: torch.Tensor, scales_e8m0: torch.Tensor, bias: torch.Tensor | None,
               meta: RoutingMetadata, *, channel_scale: torch.Tensor | None = None, gather: bool = True,
               swiglu: tuple[float, float] | None = None, apply_row_weight: bool = False,
               combine: Combine = "none", n_out: int | None = None,
               compute_dtype: torch.dtype = torch.bfloat16, config: MatmulConfig | None = None,
               out: torch.Tensor | None = None, dequant: Dequant = "auto",
               unsafe_pipelined_rs_mma: bool = False, fragments: FragmentWeights | None = None,
               activation: str = "swiglu_oai", l2_prefetch: FragmentWeights | None = None) -> torch.Tensor:
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
    out: a tensor to write into (returned): for combine="none" [R, n_out] compute_dtype; for
       "atomic" [T, n_out] float32 that the kernel adds into, zeroed by the caller. Zeroing it
       before an earlier launch (the layer zeroes its sums before routing) keeps the memset out
       from between w13 and w2, where it would stop w2 from starting during w13's tail.
    dequant: how the kernel decodes the weights, all exact: "bytes" (one code at a time, any
       dtype), "words" (uint32 words in plain Triton), "ptx" (uint32 words through inline PTX; bf16,
       GPU only); "words"/"ptx" need `words_aligned(blocks)`. "auto": `pick_dequant`.
    fragments: the same weights in fragment order (`fragment_layout.to_fragment_order`), which
       the "rs" kernel reads instead of blocks / scales_e8m0 (those are still checked); other
       kernels ignore them.
    l2_prefetch: the next matmul's weights in fragment order (w2's, during w13): the "rs" kernel
       asks the L2 for the routed experts' share of them while it runs, and streams its own
       weights past them (`_moe_matmul_rs_kernel`'s L2_PREFETCH); other kernels ignore it. For
       decode sizes, where every expert has one tile and the next weights fit the L2 beside this
       kernel's stream.
    unsafe_pipelined_rs_mma: for benchmarks only. With swapped operands, let the matrix
       instructions run across K steps the way Triton 3.6 pipelines them, which races with the
       next step's decode (triton issue #9433, see `_moe_matmul_kernel`); measures the fix's cost.
    Scale bytes above 240 (weights beyond 2**113) are outside the kernel's decode range.
    """
    n, k, n_out = _check_arguments(x, blocks, scales_e8m0, bias, meta, channel_scale=channel_scale, gather=gather,
                                   swiglu=swiglu, apply_row_weight=apply_row_weight, combine=combine, n_out=n_out,
                                   compute_dtype=compute_dtype, fragments=fragments, activation=activation)
    shape_only = blocks.is_meta          # checkpoint order dropped: only `fragments` hold the weights
    explicit = config is not None
    sm90_other = {"scales_e8m0": scales_e8m0, "bias": bias, "channel_scale": channel_scale, "out": out}
    config = _config_for_call(config, x, blocks, fragments, meta, n, k, swiglu is not None, combine, compute_dtype,
                              dequant, sm90_other)
    dequant = _checked_dequant(dequant, compute_dtype, blocks)
    if config.block_m != meta.block_m:
        raise ValueError(f"moe_matmul: config.block_m {config.block_m} != routing metadata block_m {meta.block_m}")
    y = _output(out, combine, meta, n_out, compute_dtype, x.device)
    tokens, rows = meta.num_tokens, meta.num_rows
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
                     compute_dtype, dequant, unsafe_pipelined_rs_mma, act, l2_prefetch)
    shape_class = ShapeClass(config, n, k, x.shape[1], swiglu is not None, combine, gather, act)
    fallback = None if explicit else fallback_for(shape_class)
    if fallback is None:
        try:
            _LAUNCHERS[config.kernel](launch, config)
        except Exception as error:          # a compile failure, or a launch this Triton/GPU refuses
            problem = f"{type(error).__name__}: {first_line(error)}"
            if explicit or config.kernel == "triton":
                raise RuntimeError(f"moe_matmul: the {config.kernel!r} kernel cannot run {shape_class.describe()} "
                                   f"with {config}: {problem}") from error
            fallback = fall_back(shape_class, problem, shape_only)
    if fallback is not None:
        if shape_only:
            blocks, scales_e8m0 = checkpoint_order(fragments)
            dequant = pick_dequant(compute_dtype, blocks)
        launch = dataclasses.replace(launch, blocks=blocks, scales_e8m0=scales_e8m0, dequant=dequant)
        _LAUNCHERS["triton"](launch, fallback.config)
        fallback.calls += 1
    if combine == "slots":
        return y.view(tokens, meta.top_k, n_out).sum(1, dtype=torch.float32)
    return y


def _check_arguments(x: torch.Tensor, blocks: torch.Tensor, scales_e8m0: torch.Tensor, bias: torch.Tensor | None,
                     meta: RoutingMetadata, *, channel_scale: torch.Tensor | None, gather: bool,
                     swiglu: tuple[float, float] | None, apply_row_weight: bool, combine: str, n_out: int | None,
                     compute_dtype: torch.dtype, fragments: FragmentWeights | None,
                     activation: str) -> tuple[int, int, int]:
    """`moe_matmul`'s arguments checked against each other (dtypes, shapes, devices, modes; the
    config and the decode are checked once chosen): raises ValueError naming the argument, or
    returns the weight's (N, K) and the output columns n_out."""
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
    return n, k, n_out


def _check_weight(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"moe_matmul: {name} expected {tuple(shape)} {dtype}, found {tuple(t.shape)} {t.dtype}")
    if t.device != device:
        raise ValueError(f"moe_matmul: {name} is on {t.device}, x on {device}")


def _config_for_call(config: MatmulConfig | None, x: torch.Tensor, blocks: torch.Tensor,
                     fragments: FragmentWeights | None, meta: RoutingMetadata, n: int, k: int, swiglu: bool,
                     combine: str, compute_dtype: torch.dtype, dequant: str,
                     sm90_other: dict[str, torch.Tensor | None]) -> MatmulConfig:
    """The config this call runs: the caller's, checked (raises ValueError with the reason its
    kernel cannot run the call), or `_pick_config`'s. sm90_other: the tensors besides x that the
    Gluon kernels read (by name, None when absent)."""
    shape_only = blocks.is_meta
    sm90_dequant = "ptx" if dequant == "auto" else dequant     # what "auto" resolves to where sm90 can run
    split_k_ok = combine == "atomic" and not swiglu            # split-K partial sums meet in the atomic adds
    if config is None:
        config = _pick_config(x, blocks, fragments, meta, n, k, swiglu, split_k_ok, compute_dtype,
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
    return config


def _pick_config(x: torch.Tensor, blocks: torch.Tensor, fragments: FragmentWeights | None, meta: RoutingMetadata,
                 n: int, k: int, swiglu: bool, split_k_ok: bool, compute_dtype: torch.dtype, sm90_dequant: str,
                 sm90_other: dict) -> MatmulConfig:
    """`moe_matmul`'s config when the caller gives none: `default_config` for this call, stepping
    down from "rs" to "sm90" to the Triton kernel where the faster one cannot take the call."""
    shape_only = blocks.is_meta
    mean_rows = meta.num_rows / max(1, meta.num_local_experts)
    sm90 = compute_dtype == torch.bfloat16 and _device.on_hopper(x.device)
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


def _checked_dequant(dequant: str, compute_dtype: torch.dtype, blocks: torch.Tensor) -> str:
    """The decode this call runs ("auto" resolved by `pick_dequant`), checked against the
    weights' alignment, the dtype and the device."""
    if dequant == "auto":
        dequant = pick_dequant(compute_dtype, blocks)
    elif dequant not in DEQUANT_MODES:
        raise ValueError(f"moe_matmul: dequant must be 'auto' or one of {DEQUANT_MODES}, got {dequant!r}")
    if dequant != "bytes" and not words_aligned(blocks):
        raise ValueError(f"moe_matmul: dequant={dequant!r} reads blocks as 4-byte words: needs stride 1 along K "
                         f"and 4-byte aligned rows, found strides {tuple(blocks.stride())}")
    if dequant == "ptx" and (compute_dtype != torch.bfloat16 or _device.interpreting()):
        raise ValueError(f"moe_matmul: dequant='ptx' needs compute_dtype bfloat16 on a GPU (got {compute_dtype}"
                         f"{', under the interpreter' if _device.interpreting() else ''})")
    return dequant


def _output(out: torch.Tensor | None, combine: str, meta: RoutingMetadata, n_out: int, compute_dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """The tensor the kernel writes: `out` (checked) or a new one, zeroed where the kernel adds."""
    tokens, rows = meta.num_tokens, meta.num_rows
    if out is not None:
        if combine == "slots":
            raise ValueError("moe_matmul: out= is for combine='none' or 'atomic'")
        shape, dtype = ((rows, n_out), compute_dtype) if combine == "none" else ((tokens, n_out), torch.float32)
        _check_weight("out", out, shape, dtype, device)
        return out
    if combine == "none":
        return torch.empty((rows, n_out), dtype=compute_dtype, device=device)
    if combine == "atomic":
        return torch.zeros((tokens, n_out), dtype=torch.float32, device=device)
    return torch.zeros((rows, n_out), dtype=compute_dtype, device=device)


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
    l2_prefetch: FragmentWeights | None = None


def _refuse_other_activations(a: _Launch, kernel: str) -> None:
    """The Gluon kernels' epilogue is gpt-oss's clamped SwiGLU only: raise for any other
    activation, so a default config falls back to the portable Triton kernel (`fall_back`,
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
    launch(_moe_matmul_rs_kernel, grid,      # unit strides along the last dims (checked by moe_matmul)
        a.x, a.x.stride(0), x_desc,
        fw.words, fw.scales, fw.row_groups,
        bias, bias.stride(0),
        cs, cs.stride(0),
        a.y, a.y.stride(0),
        *a.routing, *_l2_prefetch_arguments(a.l2_prefetch, dummy),
        **rs_constexprs(config, fw.row_groups, fw.k_steps, fw.k, a.x.shape[1]),
        X_TMA=x_desc is not None, L2_PREFETCH=a.l2_prefetch is not None, PDL=pdl,
        **{name: a.fused[name] for name in ("GATHER", "SCATTER", "ATOMIC", "HAS_BIAS", "HAS_CHANNEL_SCALE",
                                            "SWIGLU", "ROW_WEIGHT")},
        num_warps=config.num_warps, launch_pdl=pdl, **LAUNCH_OPTIONS)


def _l2_prefetch_arguments(weights: FragmentWeights | None, dummy: torch.Tensor) -> tuple:
    """The "rs" kernel's next_words_ptr, next_scales_ptr, next_expert_words, next_expert_scales:
    bytes per expert of each (`dummy` and zeros, unread, without a prefetch)."""
    if weights is None:
        return dummy, dummy, 0, 0
    per_expert = lambda t: t[0].numel() * t.element_size()
    return weights.words, weights.scales, per_expert(weights.words), per_expert(weights.scales)


def _launch_sm90(a: _Launch, config: MatmulConfig) -> None:
    _refuse_other_activations(a, "sm90")
    from ._moe_matmul_sm90 import _moe_matmul_sm90_kernel
    bias = a.bias if a.bias is not None else a.blocks
    cs = a.channel_scale if a.channel_scale is not None else a.blocks
    words_desc, rows_per_expert = _words_descriptor(a.blocks, config)
    grid = (triton.cdiv(a.blocks.shape[1], config.block_n), a.max_tiles)
    launch(_moe_matmul_sm90_kernel, grid,    # unit strides along the last dims (checked by moe_matmul)
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
    launch(_moe_matmul_kernel, grid,
        x, x.stride(0), x.stride(1),
        blocks, blocks.stride(0), blocks.stride(1), blocks.stride(2),
        scales, scales.stride(0), scales.stride(1), scales.stride(2),
        bias, bias.stride(0), bias.stride(1),
        cs, cs.stride(0), cs.stride(1),
        a.y, a.y.stride(0), a.y.stride(1),
        *a.routing, SWAP_AB=config.swap_ab, EVEN_K=(a.fused["K"] % config.block_k == 0 and x.shape[1] == a.fused["K"]),
        COMPUTE_DTYPE=_tl_dtype(a.compute_dtype), DEQUANT=a.dequant,
        RETIRE_MMA_EACH_STEP=config.swap_ab and not _device.interpreting() and not a.unsafe_pipelined_rs_mma,
        ACTIVATION=a.activation, num_stages=config.num_stages, **a.fused, **_block_constexprs(config), **LAUNCH_OPTIONS)


def _block_constexprs(config: MatmulConfig) -> dict:
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps)


_LAUNCHERS = {"rs": _launch_rs, "sm90": _launch_sm90, "triton": _launch_triton}


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
