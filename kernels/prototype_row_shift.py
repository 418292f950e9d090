"""Prototype, not used by the layer: every E8M0 scale byte (0..254, and 255 = NaN) brought within
the fragment-order decode (`fragment_layout`, bytes up to MAX_SCALE_BYTE) by a per-row power of two
applied in the epilogue (moe_matmul's channel_scale) instead of the K loop.
`benchmarks/probes/probe_sm90_place.py` measures it on a GPU and tests/test_fragment_row_shift.py
checks it on the CPU; it moves into `fragment_layout` if the layer takes it up.
"""

from __future__ import annotations

import torch

from ._format import BYTES_PER_BLOCK, E2M1_SIGN_BIT, E8M0_NAN, NIBBLE_BITS
from .fragment_layout import MAX_SCALE_BYTE


def shift_rows_into_range(scales_e8m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every E8M0 byte (0..254, and 255 = NaN) within the fragment-order decode through a per-row
    power of two applied in the epilogue, not the K loop.

    scales_e8m0 [E, N, K // 32] uint8 -> (shifted [E, N, K // 32] uint8, every byte in
    0..MAX_SCALE_BYTE; row_scale [E, N] float32). Row (e, n) loses shift = max(0, its largest
    finite byte - MAX_SCALE_BYTE) from every byte (clamped at 0), and row_scale = 2 ** shift, or
    NaN where the row holds a NaN byte (a NaN weight makes every output of its row NaN anyway).
    Passed as moe_matmul's channel_scale (times the layer's own, if any) beside
    to_fragment_order(blocks, shifted), the kernel computes the same numbers: the fp32 sums of
    products scaled by 2 ** -shift, then by 2 ** shift (exact: powers of two commute with the
    rounding). Exact where no block with non-zero codes is clamped (`row_shift_problem`).
    """
    nan = scales_e8m0 == E8M0_NAN
    b = scales_e8m0.to(torch.int16)
    shift = (torch.where(nan, 0, b).amax(-1) - MAX_SCALE_BYTE).clamp(min=0)     # [E, N]
    shifted = torch.where(nan, 0, (b - shift[..., None]).clamp(min=0)).to(torch.uint8)
    row_scale = torch.ldexp(torch.ones(shift.shape, dtype=torch.float32, device=shift.device), shift.to(torch.int32))
    row_scale = torch.where(nan.any(-1), torch.full_like(row_scale, float("nan")), row_scale)
    return shifted, row_scale


def row_shift_problem(blocks: torch.Tensor, scales_e8m0: torch.Tensor) -> str:
    """Why `shift_rows_into_range` would not be exact for these weights ("" when it is): a block
    with a non-zero code whose scale byte is more than MAX_SCALE_BYTE below its row's largest
    finite one (it would be clamped). Zero-code blocks (quantize's all-zero blocks get byte 0)
    and NaN rows are fine. blocks [E, N, K // 2] uint8, scales_e8m0 [E, N, K // 32] uint8."""
    nan = scales_e8m0 == E8M0_NAN
    b = scales_e8m0.to(torch.int16)
    shift = (torch.where(nan, 0, b).amax(-1, keepdim=True) - MAX_SCALE_BYTE).clamp(min=0)
    clamped = (b < shift) & ~nan.any(-1, keepdim=True)
    if not bool(clamped.any()):
        return ""
    n_experts, n, k_half = blocks.shape
    magnitude = (E2M1_SIGN_BIT - 1) * (1 | 1 << NIBBLE_BITS)       # both codes' magnitude bits (-0 is zero)
    nonzero = (blocks.view(n_experts, n, k_half // BYTES_PER_BLOCK, BYTES_PER_BLOCK) & magnitude).any(-1)
    lost = (clamped & nonzero).nonzero()
    if lost.numel() == 0:
        return ""
    e, row, kblock = lost[0].tolist()
    return (f"{lost.shape[0]} block(s) with non-zero codes lie more than {MAX_SCALE_BYTE} scale steps below "
            f"their row's largest scale, e.g. expert {e}, row {row}, block {kblock}: byte "
            f"{int(scales_e8m0[e, row, kblock])}, row max {int(shift[e, row, 0]) + MAX_SCALE_BYTE}")
