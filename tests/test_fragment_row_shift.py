"""The prototype that takes every E8M0 scale byte into fragment order (`prototype_row_shift.
shift_rows_into_range`: a per-row power of two moved out of the K loop into the epilogue's channel
scale), on the CPU: the kernel's decode (emulated in torch) times the row scale against
`mxfp4.dequantize` for all 256 bytes, the exactness check, and the same algebra through the
Triton kernel in the interpreter (bit for bit). The "rs" kernel itself runs only on a Hopper GPU
(`benchmarks/probes/probe_sm90_place.py` checks it there against the "sm90" kernel).
"""

import pytest
import torch

from mxfp4_moe import mxfp4
from mxfp4_moe.kernels import fragment_layout as fl
from mxfp4_moe.kernels import prototype_row_shift as row_shift
from mxfp4_moe.kernels.moe_matmul import moe_matmul, pick_block_m
from mxfp4_moe.kernels.fragment_layout import to_fragment_order
from mxfp4_moe.synthetic import random_expert_weights
from mxfp4_moe.routing import routing_metadata


def _nonzero_codes(shape, gen):
    """Random packed codes with a non-zero magnitude in both nibbles (so no block is all zero)."""
    codes = torch.randint(1, 8, shape + (2,), generator=gen) | (torch.randint(0, 2, shape + (2,), generator=gen) << 3)
    return (codes[..., 0] | codes[..., 1] << 4).to(torch.uint8)


def test_every_scale_byte_decodes_exactly_after_the_row_shift():
    # One row per byte b (0..254, then 255 = NaN in three rows): block 0 has scale b, block 1
    # scale max(b - 128, 0) (the widest span that stays exact), block 2 zero codes (+0 and -0)
    # at byte 0, which the shift clamps (exact: its weights are zero whatever the scale).
    gen = torch.Generator().manual_seed(0)
    finite = torch.arange(0, mxfp4.E8M0_NAN, dtype=torch.int16)
    n = finite.numel() + 3
    scales = torch.zeros(1, n, 3, dtype=torch.int16)
    scales[0, :finite.numel(), 0] = finite
    scales[0, :finite.numel(), 1] = (finite - fl.MAX_SCALE_BYTE).clamp(min=0)
    scales[0, finite.numel():, 0] = torch.tensor([200, 100, 0])
    scales[0, finite.numel():, 1] = mxfp4.E8M0_NAN
    scales = scales.to(torch.uint8)
    blocks = _nonzero_codes((1, n, 48), gen)
    blocks[:, :, 32:] = torch.randint(0, 2, (1, n, 16), generator=gen, dtype=torch.uint8) * 0x88     # +-0 codes
    assert fl.fragment_order_problem(scales) != "" and row_shift.row_shift_problem(blocks, scales) == ""

    shifted, row_scale = row_shift.shift_rows_into_range(scales)
    assert shifted.dtype == torch.uint8 and int(shifted.max()) <= fl.MAX_SCALE_BYTE
    assert fl.fragment_order_problem(shifted) == ""
    expected_shift = (finite - fl.MAX_SCALE_BYTE).clamp(min=0)
    assert torch.equal(row_scale[0, :finite.numel()], torch.ldexp(torch.ones(finite.numel()), expected_shift.int()))
    assert torch.isnan(row_scale[0, finite.numel():]).all()

    decoded = fl.dequantize_fragments(to_fragment_order(blocks, shifted)) * row_scale[..., None]
    expected = mxfp4.dequantize(blocks, scales, torch.float32).view(1, n, 96)
    rows = slice(0, finite.numel())
    # Equal bit for bit, infinities included (6 * 2 ** 127 overflows float32 in both).
    assert torch.equal(decoded[:, rows], expected[:, rows])
    assert torch.isinf(expected[:, rows]).any()
    assert torch.isnan(expected[:, finite.numel():]).any(-1).all() and torch.isnan(decoded[:, finite.numel():]).all()


def test_a_clamped_block_with_codes_is_reported():
    gen = torch.Generator().manual_seed(1)
    blocks = _nonzero_codes((2, 16, 32), gen)
    scales = torch.full((2, 16, 2), 120, dtype=torch.uint8)
    scales[1, 5] = torch.tensor([250, 250 - fl.MAX_SCALE_BYTE - 1], dtype=torch.uint8)     # span 129
    problem = row_shift.row_shift_problem(blocks, scales)
    assert "expert 1, row 5, block 1" in problem and "row max 250" in problem
    blocks[1, 5, 16:] = 0                       # the clamped block all zero: exact again
    assert row_shift.row_shift_problem(blocks, scales) == ""
    scales[1, 5, 0] = mxfp4.E8M0_NAN             # a NaN row: its outputs are NaN whatever the rest
    blocks[1, 5, 16:] = 0x11
    assert row_shift.row_shift_problem(blocks, scales) == ""


@pytest.mark.parametrize("with_channel_scale", [False, True], ids=["no-channel-scale", "channel-scale"])
def test_row_shift_through_the_kernel_is_bit_exact(with_channel_scale):
    # Scale bytes up to 240 (the checkpoint-order kernels' range) on some rows, one NaN byte per
    # weight: the Triton kernel on the shifted scales with channel_scale = row scale (times the
    # layer's own) gives the same bits as on the original ones, NaN columns included. Row spans
    # stay small, so no product falls below float32's normal range (where the shift could round).
    E, H, I, T, k = 3, 64, 64, 9, 2
    weights, _ = random_expert_weights(E, H, I, top_k=k, seed=5, channel_scales=with_channel_scale)
    gen = torch.Generator().manual_seed(5)
    big = {}
    for name in ("w13_scales", "w2_scales"):
        s = getattr(weights, name).clone()
        rows = torch.rand(s.shape[:2], generator=gen) < 0.3
        s[rows] = (s[rows].to(torch.int16) + 240 - int(s.max())).to(torch.uint8)   # row max 240
        s[1, 3, 0] = mxfp4.E8M0_NAN
        big[name] = s
    x = torch.randn(T, H, generator=gen)
    logits = torch.randn(T, E, generator=gen)
    topk_v, topk_ids = torch.topk(logits, k, dim=-1)
    topk_ids[0, 0] = 1                           # expert 1 (the NaN rows) has rows
    meta = routing_metadata(topk_ids, None, E, pick_block_m(T * k, E), torch.softmax(topk_v, -1))

    def both(x, blocks, scales, bias, channel_scale, **kw):
        """(the kernel on the original scales, the kernel on the shifted ones with the row scale)"""
        plain = moe_matmul(x, blocks, scales, bias, meta, channel_scale=channel_scale, compute_dtype=torch.float32,
                           **kw)
        assert row_shift.row_shift_problem(blocks, scales) == ""
        shifted, row_scale = row_shift.shift_rows_into_range(scales)
        combined = row_scale if channel_scale is None else row_scale * channel_scale
        moved = moe_matmul(x, blocks, shifted, bias, meta, channel_scale=combined, compute_dtype=torch.float32, **kw)
        return plain, moved

    # w13 without SwiGLU: whether a NaN survives SwiGLU's clamps differs between Triton releases
    # (3.9's interpreter clamps it away), and the row scale acts before them either way.
    pre, pre_shifted = both(x, weights.w13_blocks, big["w13_scales"], weights.w13_bias, weights.w13_channel_scale)
    torch.testing.assert_close(pre_shifted, pre, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(pre).any() and not torch.isnan(pre).all()
    act = torch.randn(pre.shape[0], I, generator=gen)      # w2 on finite inputs: its own NaN row only
    y, y_shifted = both(act, weights.w2_blocks, big["w2_scales"], weights.w2_bias, weights.w2_channel_scale,
                        gather=False, apply_row_weight=True, combine="atomic", n_out=H)
    torch.testing.assert_close(y_shifted, y, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(y).any() and not torch.isnan(y).all()
