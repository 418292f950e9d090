"""Triton kernel: grouped MXFP4 matmul over expert-sorted rows, with the gather of input rows,
the bias / per-channel scale, an optional gated activation on interleaved gate/up columns
(ACTIVATION: gpt-oss's clamped SwiGLU or SiLU-gated, `mxfp4_moe.semantics`), the routing weight
and the scatter (plain store or fp32 atomic add) fused. Launched by `moe_matmul.py`; nothing
else calls it.

Three ways to dequantize a weight tile, picked by the DEQUANT constexpr (same values, exactly):
  "bytes"  uint8 tile, one code at a time in int16 / fp16 / fp32 (any compute dtype; the
           interpreter's default)
  "words"  uint32 tile, 8 codes per word, decoded in plain Triton (the interpreter's twin of "ptx")
  "ptx"    uint32 tile through `_E2M1_BF16_PTX` (bf16 on sm_90): ~3.3 SASS instructions per element
"""

import struct

import triton
import triton.language as tl

from . import _format


_NIBBLE_BITS: tl.constexpr = tl.constexpr(_format.NIBBLE_BITS)
_NIBBLE_MASK: tl.constexpr = tl.constexpr(_format.NIBBLE_MASK)
_E2M1_SIGN_BIT: tl.constexpr = tl.constexpr(_format.E2M1_SIGN_BIT)
_MAGNITUDE_MASK: tl.constexpr = tl.constexpr(_format.E2M1_SIGN_BIT - 1)
_BLOCK_SIZE: tl.constexpr = tl.constexpr(_format.BLOCK_SIZE)
_E8M0_NAN: tl.constexpr = tl.constexpr(_format.E8M0_NAN)
# An E2M1 code's 3 magnitude bits `e1 e0 m` placed at fp16 bits 11..9 read as an fp16 whose
# exponent field is e and whose top mantissa bit is m: that fp16 equals the E2M1 value times
# 2 ** -(15 - 1) (fp16 bias 15, E2M1 bias 1), normals and the subnormal 0.5 alike.
_FP16_SIGN_SHIFT: tl.constexpr = tl.constexpr(15 - 3)     # E2M1 sign bit 3 -> fp16 bit 15
_FP16_MAG_SHIFT: tl.constexpr = tl.constexpr(10 - 1)      # E2M1 bit 0 (m) -> fp16 bit 9
_FP16_REBIAS: tl.constexpr = tl.constexpr(15 - 1)         # undo the 2 ** -14 above
_FP32_MANTISSA_BITS: tl.constexpr = tl.constexpr(23)
_CODES_PER_WORD: tl.constexpr = tl.constexpr(32 // _format.NIBBLE_BITS)
# E8M0 byte b -> bf16 2 ** (b - 127): the exponent field is b itself (bf16 and E8M0 share the
# bias), except b = 0 (2 ** -127, the bf16 subnormal with only the top mantissa bit) and NaN.
_BF16_MANTISSA_BITS: tl.constexpr = tl.constexpr(7)
_BF16_POW2_MIN_BITS: tl.constexpr = tl.constexpr(1 << (7 - 1))
_BF16_NAN_BITS: tl.constexpr = tl.constexpr(0x7FC0)


def _bf16_bits(value: float) -> int:
    """bf16 bit pattern of a float that bf16 holds exactly (the top half of its float32 bits)."""
    return struct.unpack("<I", struct.pack("<f", value))[0] >> 16


def _byte_table(values) -> str:
    """Four bytes as one 32-bit PTX immediate, values[0] in the low byte (prmt's byte 0)."""
    return "0x%08X" % sum(v << (8 * i) for i, v in enumerate(values))


# bf16 bits of the 8 E2M1 magnitudes (codes 0..7), split into low and high bytes: prmt looks up
# 4 magnitudes at once, one 3-bit selector nibble per output byte, in two 4-byte registers.
_MAG_BITS = [_bf16_bits(v) for v in _format.E2M1_VALUES[:_format.E2M1_SIGN_BIT]]
_LO = [b & 0xFF for b in _MAG_BITS]
_HI = [b >> 8 for b in _MAG_BITS]

# One call takes two uint32 words x_a ($4), x_b ($5) and their bf16 scales packed in $6 (x_a's
# in the low half); output $t (t = 0..3) is the bf16 pair (code in nibble 2t of x_a, code in
# nibble 2t of x_b) times the scales. Strictly elementwise; `_dequant_mxfp4_words` passes
# x_b = x_a >> 4, so $t holds codes 2t and 2t + 1 of one word, side by side as k runs.
#   m      magnitudes (& 7: prmt reads a selector nibble with bit 3 set as "replicate the sign"),
#          nibble 2j from x_a's nibble 2j, nibble 2j + 1 from x_b's, j = 0..3: then
#          prmt(table, m) yields 4 bytes for (a0, b0, a2, b2) and prmt(table, m >> 16) for
#          (a4, b4, a6, b6)
#   ua, ub x << 4 lifts the sign bit (bit 3) of each even nibble to bit 7 of its byte; one prmt
#          lines the 4 signs up under the 4 high bytes of a look-up
#   last   bytes interleaved (low, high, low, high) into bf16 pairs, times the scales
#          (mul.bf16x2 keeps subnormals: scale 2 ** -127 and products down to 2 ** -128 are exact)
_E2M1_BF16_PTX: tl.constexpr = tl.constexpr(f"""
{{
.reg .b32 ua, ub, m, mh, llo, hlo, lhi, hhi, slo, shi, lt0, lt1, ht0, ht1;
mov.b32 lt0, {_byte_table(_LO[:4])};
mov.b32 lt1, {_byte_table(_LO[4:])};
mov.b32 ht0, {_byte_table(_HI[:4])};
mov.b32 ht1, {_byte_table(_HI[4:])};
shl.b32 ub, $5, 4;
and.b32 m, $4, 0x07070707;
lop3.b32 m, m, ub, 0x70707070, 0xF8;
shr.b32 mh, m, 16;
prmt.b32 llo, lt0, lt1, m;
prmt.b32 hlo, ht0, ht1, m;
prmt.b32 lhi, lt0, lt1, mh;
prmt.b32 hhi, ht0, ht1, mh;
shl.b32 ua, $4, 4;
prmt.b32 slo, ua, ub, 0x5140;
prmt.b32 shi, ua, ub, 0x7362;
lop3.b32 hlo, hlo, slo, 0x80808080, 0xF8;
lop3.b32 hhi, hhi, shi, 0x80808080, 0xF8;
prmt.b32 $0, llo, hlo, 0x5140;
prmt.b32 $1, llo, hlo, 0x7362;
prmt.b32 $2, lhi, hhi, 0x5140;
prmt.b32 $3, lhi, hhi, 0x7362;
mul.rn.bf16x2 $0, $0, $6;
mul.rn.bf16x2 $1, $1, $6;
mul.rn.bf16x2 $2, $2, $6;
mul.rn.bf16x2 $3, $3, $6;
}}
""")


@triton.jit
def _dequant_mxfp4(packed, scale_bytes, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   COMPUTE_DTYPE: tl.constexpr):
    """packed [BLOCK_N, BLOCK_K // 2] uint8 (low nibble = even k), scale_bytes
    [BLOCK_N, BLOCK_K // 32] uint8 E8M0 -> [BLOCK_N, BLOCK_K] COMPUTE_DTYPE, exact."""
    low = packed & _NIBBLE_MASK
    high = packed >> _NIBBLE_BITS
    codes = tl.join(low, high).reshape(BLOCK_N, BLOCK_K).to(tl.int16)   # element 2j = low nibble
    bits = ((codes & _E2M1_SIGN_BIT) << _FP16_SIGN_SHIFT) | ((codes & _MAGNITUDE_MASK) << _FP16_MAG_SHIFT)
    values = bits.to(tl.float16, bitcast=True).to(tl.float32)          # E2M1 * 2**-14, exact
    # Scale 2 ** (b - 127) times 2 ** 14 is the float32 with exponent field b + 14 (mantissa 0);
    # fine for every b a real checkpoint holds (b + 14 > 254 would mean weights above 2**114).
    exp_field = scale_bytes.to(tl.int32) + _FP16_REBIAS
    scale = (exp_field << _FP32_MANTISSA_BITS).to(tl.float32, bitcast=True)
    scale = tl.where(scale_bytes == _E8M0_NAN, float("nan"), scale)
    w = values.reshape(BLOCK_N, BLOCK_K // _BLOCK_SIZE, _BLOCK_SIZE) * scale[:, :, None]
    return w.reshape(BLOCK_N, BLOCK_K).to(COMPUTE_DTYPE)


@triton.jit
def _e2m1_value(codes, scale, COMPUTE_DTYPE: tl.constexpr):
    """E2M1 code in the low nibble of each int32 (higher bits ignored) times a float32 scale ->
    COMPUTE_DTYPE, exact (as in `_dequant_mxfp4`)."""
    bits = (((codes & _E2M1_SIGN_BIT) << _FP16_SIGN_SHIFT) | ((codes & _MAGNITUDE_MASK) << _FP16_MAG_SHIFT))
    values = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (values * scale).to(COMPUTE_DTYPE)


@triton.jit
def _dequant_mxfp4_words(words, scale_bytes, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         COMPUTE_DTYPE: tl.constexpr, USE_PTX: tl.constexpr):
    """words [BLOCK_N, BLOCK_K // 8] uint32 (code k % 8 in nibble k % 8, low nibble first),
    scale_bytes [BLOCK_N, BLOCK_K // 32] uint8 E8M0 -> [BLOCK_N, BLOCK_K] COMPUTE_DTYPE, exact.

    Element p of each pair below is the word shifted right by 4 p, so that nibble 2t of it is
    code 2t + p: decoding nibbles 0, 2, 4, 6 of every element gives parts[t][n, j, p] = value
    of k = 8 j + 2 t + p. USE_PTX (bf16 only, not under the interpreter): one inline-PTX call per
    pair; otherwise plain Triton, one code at a time.
    """
    pair = tl.join(words, words >> _NIBBLE_BITS)                         # [BN, BK/8, 2]
    WORDS_PER_BLOCK: tl.constexpr = _BLOCK_SIZE // _CODES_PER_WORD
    if USE_PTX:
        b = scale_bytes.to(tl.int16)
        bits = tl.where(b == 0, _BF16_POW2_MIN_BITS, b << _BF16_MANTISSA_BITS)
        bits = tl.where(b == _E8M0_NAN, _BF16_NAN_BITS, bits)
        scale = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        exp_field = scale_bytes.to(tl.int32) + _FP16_REBIAS
        scale = (exp_field << _FP32_MANTISSA_BITS).to(tl.float32, bitcast=True)
        scale = tl.where(scale_bytes == _E8M0_NAN, float("nan"), scale)
    scale = tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_K // _BLOCK_SIZE, WORDS_PER_BLOCK))
    scale = scale.reshape(BLOCK_N, BLOCK_K // _CODES_PER_WORD)
    scale = tl.join(scale, scale)                                       # [BN, BK/8, 2]
    if USE_PTX:
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            _E2M1_BF16_PTX, "=r,=r,=r,=r,r,r,r", [pair, scale],
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
    else:
        codes = pair.to(tl.int32)
        p0 = _e2m1_value(codes, scale, COMPUTE_DTYPE)
        p1 = _e2m1_value(codes >> (2 * _NIBBLE_BITS), scale, COMPUTE_DTYPE)
        p2 = _e2m1_value(codes >> (4 * _NIBBLE_BITS), scale, COMPUTE_DTYPE)
        p3 = _e2m1_value(codes >> (6 * _NIBBLE_BITS), scale, COMPUTE_DTYPE)
    # [BN, BK/8, p, t_hi, t_lo] with t = 2 t_hi + t_lo -> k = 8 j + 4 t_hi + 2 t_lo + p
    w = tl.join(tl.join(p0, p2), tl.join(p1, p3))
    w = tl.permute(w, (0, 1, 3, 4, 2))
    return w.reshape(BLOCK_N, BLOCK_K)


@triton.jit
def _moe_matmul_kernel(
        x_ptr, stride_xm, stride_xk,
        w_ptr, stride_we, stride_wn, stride_wk,
        s_ptr, stride_se, stride_sn, stride_sk,
        bias_ptr, stride_be, stride_bn,
        cs_ptr, stride_cse, stride_csn,
        y_ptr, stride_ym, stride_yn,
        gather_ptr, scatter_ptr, row_weight_ptr,
        expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
        N, K_X, N_OUT,
        alpha, limit,
        K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GATHER: tl.constexpr, SCATTER: tl.constexpr, ATOMIC: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_CHANNEL_SCALE: tl.constexpr, SWIGLU: tl.constexpr,
        ROW_WEIGHT: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr,
        COMPUTE_DTYPE: tl.constexpr, DEQUANT: tl.constexpr,
        RETIRE_MMA_EACH_STEP: tl.constexpr, ACTIVATION: tl.constexpr = "swiglu_oai"):
    """One program: one tile of up to BLOCK_M sorted rows of one expert x BLOCK_N weight rows.

    Row r of the tile reads x[gather[r]] (or x[r]) [K_X valid columns, zero beyond], multiplies
    by dequant(W[e])[n, :].T over K, then bias/scale, the gated activation if SWIGLU (output
    column n // 2; ACTIVATION "swiglu_oai" uses alpha and limit, "silu" neither), routing
    weight, and writes y[scatter[r]] (or y[r]) columns < N_OUT, by store or fp32 atomic add.
    DEQUANT "words" / "ptx" read W as uint32 words: stride_wk must be 1 and stride_we, stride_wn
    and w_ptr multiples of 4 bytes (the launcher checks).
    RETIRE_MMA_EACH_STEP (SWAP_AB on the GPU): wait for each K step's matrix instruction before
    the next step. With SWAP_AB the dequantized weights are the wgmma's register operand, and
    Triton 3.6 keeps up to 3 of those instructions in flight across the loop's back edge while
    ptxas 12.8 lets the next step's decode overwrite the registers they still read (triton
    issue #9433: a race, wrong results at 64/128-row tiles; fixed upstream only by a newer
    Triton together with ptxas >= 13.3). `sm90_report.rs_wgmma_hazards` checks the SASS.
    """
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return  # past the last real tile
    row_start = tl.load(tile_row_start_ptr + tile)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    if GATHER:
        x_rows = tl.load(gather_ptr + offs_m, mask=mask_m, other=0)
    else:
        x_rows = offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 2)
    offs_kw = tl.arange(0, BLOCK_K // _CODES_PER_WORD)
    offs_ks = tl.arange(0, BLOCK_K // _BLOCK_SIZE)
    expert64 = expert.to(tl.int64)
    x_ptrs = x_ptr + x_rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    if DEQUANT == "bytes":
        w_ptrs = w_ptr + expert64 * stride_we + offs_n[:, None] * stride_wn + offs_kb[None, :] * stride_wk
    else:
        # Byte offsets of the row starts (multiples of 16 for gpt-oss: the pointer keeps that
        # alignment, so the word loads stay 16 bytes wide), then whole words along K.
        w_rows = (w_ptr + expert64 * stride_we + offs_n * stride_wn).to(tl.pointer_type(tl.uint32))
        w_ptrs = w_rows[:, None] + offs_kw[None, :]
    s_ptrs = s_ptr + expert64 * stride_se + offs_n[:, None] * stride_sn + offs_ks[None, :] * stride_sk
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The scale rows (K // 32 bytes, 2-byte aligned for gpt-oss) are too narrow for the async
    # copies that pipeline the other operands, so they are prefetched by hand one step ahead:
    # the load for step k + 1 is in flight while step k dequantizes and multiplies.
    mask_ks = mask_n[:, None] & (offs_ks < K // _BLOCK_SIZE)[None, :]
    next_scales = tl.load(s_ptrs, mask=mask_ks, other=0)
    for k0 in range(0, K, BLOCK_K):
        scale_bytes = next_scales
        s_ptrs += (BLOCK_K // _BLOCK_SIZE) * stride_sk
        next_ks = offs_ks + (k0 + BLOCK_K) // _BLOCK_SIZE
        mask_ks = mask_n[:, None] & (next_ks < K // _BLOCK_SIZE)[None, :]
        next_scales = tl.load(s_ptrs, mask=mask_ks, other=0)
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            packed = tl.load(w_ptrs, mask=mask_n[:, None], other=0)
        elif DEQUANT == "bytes":
            x = tl.load(x_ptrs, mask=mask_m[:, None] & (k0 + offs_k < K_X)[None, :], other=0.0)
            mask_kb = (k0 // 2 + offs_kb) < K // 2
            packed = tl.load(w_ptrs, mask=mask_n[:, None] & mask_kb[None, :], other=0)
        else:
            x = tl.load(x_ptrs, mask=mask_m[:, None] & (k0 + offs_k < K_X)[None, :], other=0.0)
            mask_kw = (k0 // _CODES_PER_WORD + offs_kw) < K // _CODES_PER_WORD
            packed = tl.load(w_ptrs, mask=mask_n[:, None] & mask_kw[None, :], other=0)
        if DEQUANT == "bytes":
            w = _dequant_mxfp4(packed, scale_bytes, BLOCK_N, BLOCK_K, COMPUTE_DTYPE)
        else:
            w = _dequant_mxfp4_words(packed, scale_bytes, BLOCK_N, BLOCK_K, COMPUTE_DTYPE, DEQUANT == "ptx")
        x = x.to(COMPUTE_DTYPE)
        if SWAP_AB:
            if COMPUTE_DTYPE == tl.float32:
                acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(x), acc)
            if RETIRE_MMA_EACH_STEP:
                # An empty asm that reads and writes acc: the matrix instruction of this step must
                # finish here, before the next step's decode can reuse the registers it reads.
                acc = tl.inline_asm_elementwise("", "=r,0", [acc], dtype=tl.float32, is_pure=False, pack=1)
        else:
            if COMPUTE_DTYPE == tl.float32:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K * stride_xk
        if DEQUANT == "bytes":
            w_ptrs += (BLOCK_K // 2) * stride_wk
        else:
            w_ptrs += BLOCK_K // _CODES_PER_WORD
    if SWAP_AB:
        acc = tl.trans(acc)                                                # [BLOCK_M, BLOCK_N]

    if HAS_CHANNEL_SCALE:
        cs = tl.load(cs_ptr + expert64 * stride_cse + offs_n * stride_csn, mask=mask_n, other=0.0)
        acc = acc * cs[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert64 * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0)
        acc = acc + bias[None, :]
    if SWIGLU:
        # Columns are interleaved gate/up pairs: 2j gate, 2j + 1 up -> output column j.
        gate, up = tl.split(acc.reshape(BLOCK_M, BLOCK_N // 2, 2))
        tl.static_assert(ACTIVATION == "swiglu_oai" or ACTIVATION == "silu")
        if ACTIVATION == "swiglu_oai":
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            out = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
        else:
            out = gate * tl.sigmoid(gate) * up
        offs_out = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    else:
        out = acc
        offs_out = offs_n
    if ROW_WEIGHT:
        rw = tl.load(row_weight_ptr + offs_m, mask=mask_m, other=0.0)
        out = out * rw[:, None]
    if SCATTER:
        y_rows = tl.load(scatter_ptr + offs_m, mask=mask_m, other=0)
    else:
        y_rows = offs_m
    y_ptrs = y_ptr + y_rows.to(tl.int64)[:, None] * stride_ym + offs_out[None, :] * stride_yn
    mask_y = mask_m[:, None] & (offs_out < N_OUT)[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, out, mask=mask_y, sem="relaxed")
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_y)
