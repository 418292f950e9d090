"""The MXFP4 format core, bit-exact: codes, scale bytes, packing, quantize rounding and its edges.

Expected values are derived from the OCP MX v1.0 spec in the comments (or by brute force over the
16 codes), never from the code under test.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxfp4_moe import mxfp4
from mxfp4_moe.mxfp4 import (BLOCK_SIZE, E8M0_NAN, dequantize, e2m1_lut, e8m0_to_float, find_nan_scales,
                             pack_e2m1, quantize, unpack_e2m1)


def _e2m1_from_bits(code: int) -> float:
    """Decode one E2M1 code from its bits `s e1 e0 m` (exponent bias 1), straight from the spec."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp = (code >> 1) & 0b11
    mant = code & 0b1
    if exp == 0:                                   # subnormal: 0.5 * m
        return sign * 0.5 * mant
    return sign * 2.0 ** (exp - 1) * (1 + mant / 2)


def _block(values, scale_exp_hint=None):
    """A [1, 32] float32 block holding `values` then zeros."""
    x = torch.zeros(1, BLOCK_SIZE)
    x[0, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return x


def _roundtrip(values, **kw):
    q = quantize(_block(values), **kw)
    return dequantize(q.blocks, q.scales_e8m0, torch.float32)[0, :len(values)].tolist(), int(q.scales_e8m0[0, 0])


# ---- codes, scales, packing ------------------------------------------------------------------

@pytest.mark.parametrize("code", range(16))
def test_each_e2m1_code_decodes_per_spec(code):
    lut = e2m1_lut()
    expected = _e2m1_from_bits(code)
    assert lut[code].item() == expected
    assert math.copysign(1.0, lut[code].item()) == math.copysign(1.0, expected)   # -0 keeps its sign


def test_all_256_scale_bytes():
    b = torch.arange(256, dtype=torch.uint8)
    got = e8m0_to_float(b, torch.float64)
    for byte in range(255):
        assert got[byte].item() == math.ldexp(1.0, byte - 127), byte
    assert math.isnan(got[255].item())           # 0xFF is the one NaN encoding


def test_scale_byte_zero_is_fp32_subnormal_not_zero():
    # 2**-127 is below float32's smallest normal (2**-126): a bit-shift decode would give 0.
    assert e8m0_to_float(torch.tensor([0], dtype=torch.uint8)).item() == math.ldexp(1.0, -127)


def test_pack_puts_even_element_in_low_nibble():
    codes = torch.tensor([0x3, 0xA, 0xF, 0x1], dtype=torch.uint8)
    assert pack_e2m1(codes).tolist() == [0xA3, 0x1F]


def test_pack_unpack_roundtrip_random():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 5, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_e2m1(pack_e2m1(codes)), codes)


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="0..15"):
        pack_e2m1(torch.tensor([16, 0], dtype=torch.uint8))
    with pytest.raises(ValueError, match="even"):
        pack_e2m1(torch.zeros(3, dtype=torch.uint8))


# ---- dequantize -----------------------------------------------------------------------------

def _random_mxfp4(shape_lead, n_blocks, seed, scale_range=(117, 137)):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape_lead, n_blocks, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(*scale_range, (*shape_lead, n_blocks), generator=g, dtype=torch.uint8)
    return blocks, scales


def _dequantize_elementwise(blocks, scales):
    """Independent slow decode: element k of a row is block k//32, byte (k%32)//2, nibble k%2."""
    lead = scales.shape[:-1]
    n_blocks = scales.shape[-1]
    out = torch.empty(*lead, n_blocks * BLOCK_SIZE, dtype=torch.float64)
    flat_b = blocks.reshape(-1, n_blocks, 16)
    flat_s = scales.reshape(-1, n_blocks)
    flat_o = out.reshape(-1, n_blocks * BLOCK_SIZE)
    for r in range(flat_b.shape[0]):
        for k in range(n_blocks * BLOCK_SIZE):
            byte = int(flat_b[r, k // 32, (k % 32) // 2])
            code = byte & 0xF if k % 2 == 0 else byte >> 4
            flat_o[r, k] = _e2m1_from_bits(code) * math.ldexp(1.0, int(flat_s[r, k // 32]) - 127)
    return out


def test_dequantize_matches_elementwise_decode():
    blocks, scales = _random_mxfp4((2, 3), 2, seed=1)
    expected = _dequantize_elementwise(blocks, scales)
    assert torch.equal(dequantize(blocks, scales, torch.float64), expected)


def test_dequantize_flat_layout_equals_checkpoint_layout():
    blocks, scales = _random_mxfp4((4, 6), 3, seed=2)
    flat = blocks.reshape(4, 6, 3 * 16)
    assert torch.equal(dequantize(flat, scales, torch.float32), dequantize(blocks, scales, torch.float32))


def test_dequantize_chunking_does_not_change_result():
    blocks, scales = _random_mxfp4((5, 7), 4, seed=3)
    whole = dequantize(blocks, scales, torch.float32)
    chunked = dequantize(blocks, scales, torch.float32, chunk_bytes=100)   # 1 row of 64 bytes a chunk
    assert torch.equal(whole, chunked)


def test_dequantize_bf16_is_exact_for_normal_scales():
    # E2M1 values have at most 2 significant bits, so they are exact in bf16 at any in-range scale.
    blocks, scales = _random_mxfp4((3, 8), 2, seed=4, scale_range=(1, 255))
    assert torch.equal(dequantize(blocks, scales, torch.bfloat16).double(), dequantize(blocks, scales, torch.float64))


def test_nan_scale_poisons_only_its_block():
    blocks, scales = _random_mxfp4((2, 2), 3, seed=5)
    scales[1, 0, 2] = E8M0_NAN
    out = dequantize(blocks, scales, torch.float32)
    assert torch.isnan(out[1, 0, 64:96]).all()
    nan_mask = torch.isnan(out)
    nan_mask[1, 0, 64:96] = False
    assert not nan_mask.any()


def test_dequantize_rejects_mismatched_shapes():
    blocks, scales = _random_mxfp4((2,), 3, seed=6)
    with pytest.raises(ValueError, match="do not match"):
        dequantize(blocks, scales[:, :2])
    with pytest.raises(TypeError):
        dequantize(blocks.to(torch.int16), scales)


# ---- quantize: rounding, one named test per round-to-nearest-even tie -------------------------
# Each block below has amax 4, so scale_exp = floor(log2(4)) - 2 = 0: elements are quantized as is.

def test_tie_0p25_rounds_down_to_0():
    # 0.25 lies between 0 (code 0, even) and 0.5 (code 1): ties to the even code, 0.
    assert _roundtrip([4.0, 0.25, -0.25])[0][1:] == [0.0, -0.0]


def test_tie_0p75_rounds_up_to_1():
    # 0.75 lies between 0.5 (code 1) and 1.0 (code 2, even): goes up to 1.
    assert _roundtrip([4.0, 0.75, -0.75])[0][1:] == [1.0, -1.0]


def test_tie_1p25_rounds_down_to_1():
    # 1.25 between 1.0 (code 2, even) and 1.5 (code 3): stays at 1.
    assert _roundtrip([4.0, 1.25, -1.25])[0][1:] == [1.0, -1.0]


def test_tie_1p75_rounds_up_to_2():
    # 1.75 between 1.5 (code 3) and 2.0 (code 4, even): goes to 2.
    assert _roundtrip([4.0, 1.75, -1.75])[0][1:] == [2.0, -2.0]


def test_tie_2p5_rounds_down_to_2():
    # 2.5 between 2 (code 4, even) and 3 (code 5): stays at 2.
    assert _roundtrip([4.0, 2.5, -2.5])[0][1:] == [2.0, -2.0]


def test_tie_3p5_rounds_up_to_4():
    # 3.5 between 3 (code 5) and 4 (code 6, even): goes to 4.
    assert _roundtrip([4.0, 3.5, -3.5])[0][1:] == [4.0, -4.0]


def test_tie_5_rounds_down_to_4():
    # 5 between 4 (code 6, even) and 6 (code 7): stays at 4. amax here is 5, still scale_exp 0.
    assert _roundtrip([5.0, -5.0])[0] == [4.0, -4.0]


def test_values_off_the_ties_round_to_nearest():
    assert _roundtrip([4.0, 0.26, 1.3, 2.6, 3.4, 5.1])[0] == [4.0, 0.5, 1.5, 3.0, 3.0, 6.0]


def test_saturation_floor_scale_clips_to_6():
    # amax 7.5: floor(log2(7.5)) - 2 = 0, so 7.5 / 1 > 6 saturates to 6 (spec section 6.3).
    values, scale_byte = _roundtrip([7.5, -7.9, 1.0])
    assert values == [6.0, -6.0, 1.0] and scale_byte == 127


def test_round_up_scale_never_saturates():
    # round_up: scale = 2**ceil(log2(7.5 / 6)) = 2, so 7.5 / 2 = 3.75 -> 4 (x2 = 8), -7.9 -> -8.
    values, scale_byte = _roundtrip([7.5, -7.9, 1.0], scale_rounding="round_up")
    assert values == [8.0, -8.0, 1.0] and scale_byte == 128


def test_format_md_worked_example():
    # FORMAT.md: block [7, 2.5, 0.25, 5, 1.25, 0...]: FLOOR+RNE [6, 2, 0, 4, 1]; ROUND_UP+RNE [8, 2, 0, 4, 1].
    assert _roundtrip([7, 2.5, 0.25, 5, 1.25])[0] == [6, 2, 0, 4, 1]
    assert _roundtrip([7, 2.5, 0.25, 5, 1.25], scale_rounding="round_up")[0] == [8, 2, 0, 4, 1]


def test_scale_exponent_follows_amax():
    # amax 0.1: floor(log2(0.1)) = -4, scale_exp -6, byte 121; 0.1 * 64 = 6.4 -> saturates to 6.
    values, scale_byte = _roundtrip([0.1])
    assert scale_byte == 127 - 6 and values == [6 * 2.0 ** -6]


def test_all_zero_block_gets_smallest_scale_and_zero_codes():
    q = quantize(torch.zeros(2, 64))
    assert (q.scales_e8m0 == 0).all() and (q.blocks == 0).all()
    assert (dequantize(q.blocks, q.scales_e8m0, torch.float32) == 0).all()


def test_tiny_values_clamp_scale_at_e8m0_minimum():
    # amax 2**-140: floor(log2) - 2 = -142 < -127, so the scale clamps to 2**-127 and values flush to 0.
    values, scale_byte = _roundtrip([2.0 ** -140])
    assert scale_byte == 0 and values == [0.0]


def test_nonfinite_input_raises_by_default():
    x = torch.randn(3, 64)
    x[2, 40] = float("inf")
    with pytest.raises(ValueError, match=r"block 1 of row \(2,\)"):
        quantize(x)


def test_nonfinite_input_gives_nan_scale_when_asked():
    x = torch.randn(2, 64)
    x[1, 3] = float("nan")
    q = quantize(x, nonfinite="nan_scale")
    assert q.scales_e8m0[1, 0] == E8M0_NAN and (q.blocks[1, 0] == 0).all()
    assert (q.scales_e8m0[0] != E8M0_NAN).all() and q.scales_e8m0[1, 1] != E8M0_NAN
    out = dequantize(q.blocks, q.scales_e8m0, torch.float32)
    assert torch.isnan(out[1, :32]).all() and not torch.isnan(out[1, 32:]).any()


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize(torch.randn(4, 33))
    with pytest.raises(TypeError):
        quantize(torch.ones(4, 32, dtype=torch.int32))


@pytest.mark.parametrize("scale_rounding", ["floor", "round_up"])
def test_requantizing_exact_mxfp4_values_gives_same_values(scale_rounding):
    blocks, scales = _random_mxfp4((6, 5), 3, seed=7)
    values = dequantize(blocks, scales, torch.float32)
    q = quantize(values, scale_rounding=scale_rounding)
    assert torch.equal(dequantize(q.blocks, q.scales_e8m0, torch.float32), values)


# ---- property tests: quantize picks the nearest representable value, ties to even ------------

def _check_nearest_even(x: torch.Tensor, scale_rounding: str) -> None:
    """Brute force over the 16 codes: the chosen value is at minimal distance, and a tie picks the
    even code (mantissa bit 0). Scale exponent from Python's math.frexp on the float32 amax."""
    q = quantize(x, scale_rounding=scale_rounding)
    got = dequantize(q.blocks, q.scales_e8m0, torch.float64).reshape(-1, BLOCK_SIZE)
    xb = x.reshape(-1, BLOCK_SIZE).double()
    scale_bytes = q.scales_e8m0.reshape(-1)
    lut = torch.tensor([_e2m1_from_bits(c) for c in range(16)], dtype=torch.float64)
    for r in range(xb.shape[0]):
        amax = float(xb[r].abs().max())
        if amax == 0:
            assert scale_bytes[r] == 0
            continue
        m, e = math.frexp(amax)
        if scale_rounding == "floor":
            exp = e - 1 - 2
        else:
            ratio = float(torch.tensor(amax, dtype=torch.float32) / 6.0)
            m2, e2 = math.frexp(ratio)
            exp = e2 - 1 if m2 == 0.5 else e2
        exp = max(-127, min(127, exp))
        assert int(scale_bytes[r]) == exp + 127
        candidates = lut * math.ldexp(1.0, exp)                       # [16]
        dist = (xb[r].unsqueeze(-1) - candidates).abs()               # [32, 16]
        best = dist.min(dim=-1).values
        chosen = (got[r].unsqueeze(-1) == candidates) & (dist == best.unsqueeze(-1))
        assert chosen.any(dim=-1).all(), f"block {r}: not the nearest value"
        ties = (dist == best.unsqueeze(-1)).sum(-1) > 1
        for k in ties.nonzero().flatten().tolist():
            magnitude = abs(got[r, k].item()) / math.ldexp(1.0, exp)
            code = [abs(v) for v in lut[:8].tolist()].index(magnitude)
            assert code % 2 == 0 or magnitude == 0, f"tie at block {r} element {k} went to odd code {code}"


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       n_blocks=st.integers(1, 3),
       log2_mag=st.integers(-60, 60),
       seed=st.integers(0, 2**31 - 1),
       scale_rounding=st.sampled_from(["floor", "round_up"]))
def test_quantize_is_nearest_even_on_random_inputs(lead, n_blocks, log2_mag, seed, scale_rounding):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_blocks * BLOCK_SIZE, generator=g) * 2.0 ** log2_mag
    _check_nearest_even(x, scale_rounding)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_blocks=st.integers(1, 4))
def test_quantize_dequantize_quantize_is_a_fixed_point(seed, n_blocks):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n_blocks * BLOCK_SIZE, generator=g) * 10
    q = quantize(x)
    values = dequantize(q.blocks, q.scales_e8m0, torch.float32)
    q2 = quantize(values)
    assert torch.equal(dequantize(q2.blocks, q2.scales_e8m0, torch.float32), values)


# ---- NaN scale validation -------------------------------------------------------------------

def test_find_nan_scales_reports_expert_row_block():
    scales = torch.full((3, 4, 5), 120, dtype=torch.uint8)
    scales[2, 1, 4] = E8M0_NAN
    scales[0, 3, 0] = E8M0_NAN
    count, where = find_nan_scales(scales, "model.layers.0.mlp.experts.down_proj_scales")
    assert count == 2
    assert [w.index for w in where] == [(0, 3, 0), (2, 1, 4)]
    assert "expert 2, row 1, block 4" in where[1].describe()
    assert "down_proj_scales" in where[1].describe()


def test_find_nan_scales_none_and_limit():
    scales = torch.full((2, 3), 127, dtype=torch.uint8)
    assert find_nan_scales(scales) == (0, [])
    scales[:] = E8M0_NAN
    count, where = find_nan_scales(scales, limit=2)
    assert count == 6 and len(where) == 2


def test_constants_agree_with_each_other():
    assert mxfp4.BYTES_PER_BLOCK * 2 == BLOCK_SIZE
    assert max(mxfp4.E2M1_VALUES) == mxfp4.E2M1_MAX == 1.5 * 2 ** mxfp4.E2M1_EMAX
    assert mxfp4.PAD_SCALE_E8M0 != E8M0_NAN
