"""The MXFP4 format (OCP Microscaling v1.0): its constants, and pack, unpack, quantize and
dequantize in pure torch (CPU or CUDA). Every other module takes the format's facts from here.

Layout words used throughout the package:
  blocks      packed uint8, two E2M1 codes per byte, low nibble = even element
  scales_e8m0 biased E8M0 bytes, one per 32 elements along the reduction axis
  scale_exp   unbiased int exponent (scale = 2 ** scale_exp)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# ---- the spec's facts ------------------------------------------------------------------------

BLOCK_SIZE = 32
"""Elements sharing one E8M0 scale, along the reduction (input, K) axis."""
BYTES_PER_BLOCK = BLOCK_SIZE // 2
"""Packed bytes per block: two 4-bit codes per byte."""

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""Value of each E2M1 code (the index). Bit layout `s e1 e0 m`; no Inf or NaN."""
E2M1_MAX = 6.0
"""Largest E2M1 magnitude; quantization saturates here."""
E2M1_EMAX = 2
"""Exponent of the largest E2M1 normal (6 = 1.5 * 2**2), subtracted from floor(log2(amax))."""
E2M1_SIGN_BIT = 0x8
NIBBLE_BITS = 4
NIBBLE_MASK = 0x0F
"""Low nibble of a byte holds element 2j, the high nibble element 2j+1."""

E8M0_BIAS = 127
"""E8M0 byte b means 2 ** (b - E8M0_BIAS)."""
E8M0_NAN = 0xFF
"""The one special E8M0 byte: NaN. There is no zero and no infinity."""
E8M0_MIN_EXP = -E8M0_BIAS
E8M0_MAX_EXP = 0xFE - E8M0_BIAS

PAD_SCALE_E8M0 = E8M0_BIAS
"""Scale byte written into padding (2 ** 0 = 1.0): finite, so zero codes times it stay zero.
A 0xFF (NaN) there would turn padding into NaN, since NaN * 0 = NaN."""

# Round-to-nearest-even on the positive E2M1 grid 0, .5, 1, 1.5, 2, 3, 4, 6: the midpoints
# between neighbouring codes, and whether a value exactly on the midpoint goes up (the upper
# code is even) or stays (the lower code is even).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIE_GOES_UP = (False, True, False, True, False, True, False)

ScaleRounding = Literal["floor", "round_up"]
NonFinitePolicy = Literal["error", "nan_scale"]

# Work on at most this many packed bytes at a time, so that dequantizing a 1 GiB tensor needs
# temporaries of a few hundred MiB rather than many GiB.
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024


# ---- codes and scales -----------------------------------------------------------------------

def e2m1_lut(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 E2M1 values as a tensor, indexed by code: [16] `dtype`."""
    return torch.tensor(E2M1_VALUES, dtype=dtype, device=device)


def byte_to_e2m1_pair(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of both codes of every byte: [256, 2] `dtype`; [b, 0] is the low nibble (even element)."""
    byte = torch.arange(256, device=device)
    lut = e2m1_lut(device, dtype)
    return torch.stack((lut[byte & NIBBLE_MASK], lut[byte >> NIBBLE_BITS]), dim=-1)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack E2M1 codes two per byte.

    codes: [..., K] uint8 in 0..15, K even  ->  [..., K // 2] uint8, low nibble = even element.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_e2m1 expects uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even last dimension, got {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > NIBBLE_MASK:
        raise ValueError(f"E2M1 codes must be in 0..{NIBBLE_MASK}, found {int(codes.max())}")
    even, odd = codes[..., 0::2], codes[..., 1::2]
    return even | (odd << NIBBLE_BITS)


def unpack_e2m1(blocks: torch.Tensor) -> torch.Tensor:
    """Unpack bytes into E2M1 codes: [..., N] uint8 -> [..., 2N] uint8 (element 2j = low nibble)."""
    if blocks.dtype != torch.uint8:
        raise TypeError(f"unpack_e2m1 expects uint8 blocks, got {blocks.dtype}")
    low = blocks & NIBBLE_MASK
    high = blocks >> NIBBLE_BITS
    return torch.stack((low, high), dim=-1).flatten(-2)


def e8m0_to_float(scales_e8m0: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode E8M0 scale bytes: b -> 2 ** (b - 127), and 0xFF -> NaN. Same shape, `dtype`.

    Byte 0 is 2 ** -127 (an fp32 subnormal); ldexp keeps it exact where bit tricks would give 0.
    """
    if scales_e8m0.dtype != torch.uint8:
        raise TypeError(f"e8m0_to_float expects uint8 scale bytes, got {scales_e8m0.dtype}")
    exp = scales_e8m0.to(torch.int32) - E8M0_BIAS
    value = torch.ldexp(torch.ones(exp.shape, dtype=torch.float32, device=exp.device), exp)
    value = torch.where(scales_e8m0 == E8M0_NAN, torch.full_like(value, float("nan")), value)
    return value.to(dtype)


def _split_blocks(blocks: torch.Tensor, scales_e8m0: torch.Tensor) -> tuple[torch.Size, int]:
    """Check that blocks and scales agree; return (leading shape, number of 32-element blocks).

    Accepts the checkpoint layout (blocks [..., K/32, 16], scales [..., K/32]) and the flat
    kernel layout (blocks [..., K/2], scales [..., K/32]).
    """
    if blocks.dtype != torch.uint8 or scales_e8m0.dtype != torch.uint8:
        raise TypeError(f"blocks and scales must be uint8, got {blocks.dtype} and {scales_e8m0.dtype}")
    if blocks.dim() == scales_e8m0.dim() + 1 and blocks.shape[:-1] == scales_e8m0.shape:
        if blocks.shape[-1] != BYTES_PER_BLOCK:
            raise ValueError(f"blocks' last dim must be {BYTES_PER_BLOCK}, got shape {tuple(blocks.shape)}")
        return scales_e8m0.shape[:-1], scales_e8m0.shape[-1]
    if (blocks.dim() == scales_e8m0.dim() and blocks.dim() >= 1
            and blocks.shape[:-1] == scales_e8m0.shape[:-1]
            and blocks.shape[-1] == scales_e8m0.shape[-1] * BYTES_PER_BLOCK):
        return scales_e8m0.shape[:-1], scales_e8m0.shape[-1]
    raise ValueError(
        "blocks and scales do not match: expected blocks [..., K/32, 16] with scales [..., K/32], "
        f"or blocks [..., K/2] with scales [..., K/32]; got blocks {tuple(blocks.shape)} and "
        f"scales {tuple(scales_e8m0.shape)}")


def dequantize(blocks: torch.Tensor, scales_e8m0: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
               *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """MXFP4 -> `dtype`, for any leading dims.

    blocks: [..., K/32, 16] uint8 (checkpoint layout) or [..., K/2] uint8 (flat), low nibble = even k
    scales_e8m0: [..., K/32] uint8
    returns [..., K] `dtype`. A NaN scale byte (0xFF) makes its 32 values NaN.

    Works through the rows `chunk_bytes` of packed input at a time, so the float32 temporaries
    stay near 8 * chunk_bytes whatever the tensor's size.
    """
    lead, n_blocks = _split_blocks(blocks, scales_e8m0)
    k = n_blocks * BLOCK_SIZE
    rows = 1
    for d in lead:
        rows *= d
    blocks_flat = blocks.reshape(rows, n_blocks * BYTES_PER_BLOCK)
    scales_2d = scales_e8m0.reshape(rows, n_blocks)
    out = torch.empty((rows, k), dtype=dtype, device=blocks.device)
    # Every E2M1 value times a power of two has at most 2 significant bits, so the product is
    # exact in bf16/fp32/fp64 (same exponent range as the scales); fp16 and others go via fp32.
    work_dtype = dtype if dtype in (torch.bfloat16, torch.float32, torch.float64) else torch.float32
    pair_lut = byte_to_e2m1_pair(blocks.device, work_dtype)               # [256, 2]
    row_bytes = max(1, n_blocks * BYTES_PER_BLOCK)
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        # One table look-up per byte yields its (even, odd) element pair.
        values = torch.nn.functional.embedding(blocks_flat[start:stop].to(torch.int32), pair_lut)
        values = values.view(stop - start, n_blocks, BLOCK_SIZE)
        scale = e8m0_to_float(scales_2d[start:stop], work_dtype).unsqueeze(-1)
        if work_dtype == dtype:
            torch.mul(values, scale, out=out[start:stop].view(stop - start, n_blocks, BLOCK_SIZE))
        else:
            out[start:stop] = (values * scale).view(stop - start, k).to(dtype)
    return out.reshape(*lead, k)


# ---- quantization ---------------------------------------------------------------------------

def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) exactly for positive finite float32 x (subnormals included), as int32."""
    _, exp = torch.frexp(x)          # x = m * 2**exp with m in [0.5, 1)
    return exp.to(torch.int32) - 1


def _ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) exactly for positive finite float32 x, as int32."""
    mant, exp = torch.frexp(x)
    exact_power = mant == 0.5        # x is a power of two: log2 is exact
    return torch.where(exact_power, exp - 1, exp).to(torch.int32)


def _round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round scaled values to E2M1 codes: nearest, ties to even, |v| > 6 saturates to 6.

    v: float32, finite. Returns uint8 codes; the sign bit follows v's sign (so -0 stays -0).
    """
    mag = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for mid, up in zip(_E2M1_MIDPOINTS, _E2M1_TIE_GOES_UP):
        # Each midpoint passed moves one code up; on the midpoint itself, go up only when the
        # upper neighbour is the even code. Past the last midpoint (5) everything is 6: saturation.
        code += (mag >= mid) if up else (mag > mid)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


@dataclass(frozen=True)
class QuantizedMXFP4:
    """Result of `quantize`: blocks [..., K/32, 16] uint8 and scales_e8m0 [..., K/32] uint8."""
    blocks: torch.Tensor
    scales_e8m0: torch.Tensor

    def __iter__(self):
        return iter((self.blocks, self.scales_e8m0))


def quantize(x: torch.Tensor, *, scale_rounding: ScaleRounding = "floor",
             nonfinite: NonFinitePolicy = "error",
             chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> QuantizedMXFP4:
    """Quantize along the last dim to MXFP4 (OCP MX v1.0 section 6.3).

    x: [..., K] float (K % 32 == 0). Returns (blocks [..., K/32, 16] uint8, scales_e8m0 [..., K/32] uint8).

    scale_rounding:
      "floor"    the spec: scale_exp = floor(log2(amax)) - 2; elements above 6 saturate to +-6.
      "round_up" triton_kernels' default: scale = 2 ** ceil(log2(amax / 6)); never saturates.
    Elements round to nearest, ties to even. An all-zero block gets the smallest scale
    (byte 0, 2 ** -127: the clamp of floor(log2(0)) = -inf) and zero codes.
    nonfinite: what a block holding inf or NaN does. "error" raises ValueError naming the first
    such block; "nan_scale" writes scale byte 0xFF (NaN) and zero codes for that block.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"quantize needs a last dim divisible by {BLOCK_SIZE}, got shape {tuple(x.shape)}")
    if scale_rounding not in ("floor", "round_up"):
        raise ValueError(f"scale_rounding must be 'floor' or 'round_up', got {scale_rounding!r}")
    if nonfinite not in ("error", "nan_scale"):
        raise ValueError(f"nonfinite must be 'error' or 'nan_scale', got {nonfinite!r}")
    lead = x.shape[:-1]
    n_blocks = x.shape[-1] // BLOCK_SIZE
    rows = x.numel() // max(1, x.shape[-1])
    x2 = x.reshape(rows, n_blocks, BLOCK_SIZE)
    blocks = torch.empty((rows, n_blocks, BYTES_PER_BLOCK), dtype=torch.uint8, device=x.device)
    scales = torch.empty((rows, n_blocks), dtype=torch.uint8, device=x.device)
    step = max(1, chunk_bytes // max(1, n_blocks * BLOCK_SIZE * 4))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        xs = x2[start:stop].to(torch.float32)
        finite = torch.isfinite(xs).all(dim=-1)                          # [r, n_blocks]
        if nonfinite == "error" and not bool(finite.all()):
            bad = (~finite).nonzero()[0].tolist()
            flat_row = start + bad[0]
            index = tuple(torch.unravel_index(torch.tensor(flat_row), lead)) if lead else ()
            raise ValueError(
                f"quantize: block {bad[1]} of row {tuple(int(i) for i in index)} holds inf or NaN; "
                "pass nonfinite='nan_scale' to encode such blocks with a NaN scale")
        xs = torch.where(finite.unsqueeze(-1), xs, torch.zeros_like(xs))
        amax = xs.abs().amax(dim=-1)
        nonzero = amax > 0
        safe_amax = torch.where(nonzero, amax, torch.ones_like(amax))
        if scale_rounding == "floor":
            scale_exp = _floor_log2(safe_amax) - E2M1_EMAX
        else:
            scale_exp = _ceil_log2(safe_amax / E2M1_MAX)
        scale_exp = torch.where(nonzero, scale_exp, torch.full_like(scale_exp, E8M0_MIN_EXP))
        scale_exp = scale_exp.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
        # x * 2**-scale_exp is exact in float32 (a power-of-two rescale) unless it underflows.
        scaled = torch.ldexp(xs, -scale_exp.unsqueeze(-1))
        codes = _round_to_e2m1(scaled)
        codes = torch.where(finite.unsqueeze(-1), codes, torch.zeros_like(codes))
        blocks[start:stop] = pack_e2m1(codes)
        scale_bytes = (scale_exp + E8M0_BIAS).to(torch.uint8)
        scales[start:stop] = torch.where(finite, scale_bytes, torch.full_like(scale_bytes, E8M0_NAN))
    return QuantizedMXFP4(blocks.reshape(*lead, n_blocks, BYTES_PER_BLOCK), scales.reshape(*lead, n_blocks))


# ---- validation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class NanScale:
    """One NaN (0xFF) scale byte: the tensor it sits in and its index there."""
    tensor: str
    index: tuple[int, ...]

    def describe(self) -> str:
        names = ("expert", "row", "block") if len(self.index) == 3 else tuple(f"dim{i}" for i in range(len(self.index)))
        where = ", ".join(f"{n} {i}" for n, i in zip(names, self.index))
        return f"{self.tensor}: NaN scale byte 0x{E8M0_NAN:02X} at {where}"


def find_nan_scales(scales_e8m0: torch.Tensor, tensor: str = "scales", *, limit: int | None = 100) -> tuple[int, list[NanScale]]:
    """Find NaN scale bytes (0xFF). Returns (how many, the first `limit` of them with their index).

    For expert scales [E, rows, K/32] an index reads (expert, row, block).
    """
    if scales_e8m0.dtype != torch.uint8:
        raise TypeError(f"{tensor}: scale bytes must be uint8, got {scales_e8m0.dtype}")
    is_nan = scales_e8m0 == E8M0_NAN
    count = int(is_nan.sum())
    if count == 0:
        return 0, []
    where = is_nan.nonzero()
    if limit is not None:
        where = where[:limit]
    return count, [NanScale(tensor, tuple(int(i) for i in row)) for row in where.tolist()]
