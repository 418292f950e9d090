"""Triton kernel: grouped MXFP4 matmul over expert-sorted rows, with the gather of input rows,
the bias / per-channel scale, an optional gpt-oss SwiGLU, the routing weight and the scatter
(plain store or fp32 atomic add) fused. Launched by `moe_matmul.py`; nothing else calls it.
"""

import triton
import triton.language as tl

from mxfp4_moe import mxfp4

_NIBBLE_BITS: tl.constexpr = tl.constexpr(mxfp4.NIBBLE_BITS)
_NIBBLE_MASK: tl.constexpr = tl.constexpr(mxfp4.NIBBLE_MASK)
_E2M1_SIGN_BIT: tl.constexpr = tl.constexpr(mxfp4.E2M1_SIGN_BIT)
_MAGNITUDE_MASK: tl.constexpr = tl.constexpr(mxfp4.E2M1_SIGN_BIT - 1)
_BLOCK_SIZE: tl.constexpr = tl.constexpr(mxfp4.BLOCK_SIZE)
_E8M0_NAN: tl.constexpr = tl.constexpr(mxfp4.E8M0_NAN)
# An E2M1 code's 3 magnitude bits `e1 e0 m` placed at fp16 bits 11..9 read as an fp16 whose
# exponent field is e and whose top mantissa bit is m: that fp16 equals the E2M1 value times
# 2 ** -(15 - 1) (fp16 bias 15, E2M1 bias 1), normals and the subnormal 0.5 alike.
_FP16_SIGN_SHIFT: tl.constexpr = tl.constexpr(15 - 3)     # E2M1 sign bit 3 -> fp16 bit 15
_FP16_MAG_SHIFT: tl.constexpr = tl.constexpr(10 - 1)      # E2M1 bit 0 (m) -> fp16 bit 9
_FP16_REBIAS: tl.constexpr = tl.constexpr(15 - 1)         # undo the 2 ** -14 above
_FP32_MANTISSA_BITS: tl.constexpr = tl.constexpr(23)


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
        COMPUTE_DTYPE: tl.constexpr):
    """One program: one tile of up to BLOCK_M sorted rows of one expert x BLOCK_N weight rows.

    Row r of the tile reads x[gather[r]] (or x[r]) [K_X valid columns, zero beyond], multiplies
    by dequant(W[e])[n, :].T over K, then bias/scale, SwiGLU (output column n // 2), routing
    weight, and writes y[scatter[r]] (or y[r]) columns < N_OUT, by store or fp32 atomic add.
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
    offs_ks = tl.arange(0, BLOCK_K // _BLOCK_SIZE)
    expert64 = expert.to(tl.int64)
    x_ptrs = x_ptr + x_rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + expert64 * stride_we + offs_n[:, None] * stride_wn + offs_kb[None, :] * stride_wk
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
        else:
            x = tl.load(x_ptrs, mask=mask_m[:, None] & (k0 + offs_k < K_X)[None, :], other=0.0)
            mask_kb = (k0 // 2 + offs_kb) < K // 2
            packed = tl.load(w_ptrs, mask=mask_n[:, None] & mask_kb[None, :], other=0)
        w = _dequant_mxfp4(packed, scale_bytes, BLOCK_N, BLOCK_K, COMPUTE_DTYPE)
        x = x.to(COMPUTE_DTYPE)
        if SWAP_AB:
            if COMPUTE_DTYPE == tl.float32:
                acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(x), acc)
        else:
            if COMPUTE_DTYPE == tl.float32:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += (BLOCK_K // 2) * stride_wk
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
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
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
