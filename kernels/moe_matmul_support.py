"""Whether a kernel of the grouped MXFP4 matmul can run a call here, and why not: the weights'
word alignment and the decode it allows (`words_aligned`, `pick_dequant`), the Gluon kernels'
needs (`_gluon_call_problem`, `_sm90_unsupported`, `_rs_unsupported`, `_words_tma_problem`) and
the TMA descriptors those checks vouch for. Each check returns "" or a reason in words: the
launcher raises it for an explicit config and steps down to a portable kernel for a default one.
"""

from __future__ import annotations

import torch

from . import _device
from .fragment_layout import FragmentWeights
from .moe_matmul_configs import MatmulConfig


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
    if compute_dtype == torch.bfloat16 and not _device.interpreting() and words_aligned(blocks):
        return "ptx"
    return "bytes"


def _gluon_call_problem(x: torch.Tensor, compute_dtype: torch.dtype, other: dict[str, torch.Tensor | None]) -> str:
    """Why neither Gluon kernel ("sm90", "rs") can run this call, whatever its config ("" when
    it can): the device, the dtype, and x and the other tensors (by name, None when absent), which
    both read with unit stride along the last dim."""
    if not _device.on_hopper(x.device):
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


# ---- the TMA descriptors (built where the checks above passed) ---------------------------------

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
