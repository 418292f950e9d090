"""Gluon kernel for Hopper (sm_90): the grouped MXFP4 matmul of `_moe_matmul.py` (same
arguments, same fused gather / bias / scale / SwiGLU / routing weight / scatter), written so that
the weight decode of one K step runs while the tensor cores multiply the step before.

Why a second kernel: in `_moe_matmul.py` Triton 3.6 finishes each step's wgmma before the next
step's decode (the decoded tile lives in registers or in one shared buffer), so the CUDA cores
and the tensor cores take turns. Here the pipeline is written out (S = num_stages):

    step k:  wait for step k's weight words (TMA, mbarrier) and x rows (cp.async group)
             read this thread's words, decode -> bf16 -> w_smem[k % 2]        (CUDA cores)
             proxy fence, barrier
             wgmma of x_smem[k % S] and w_smem[k % 2], asynchronously          (tensor cores)
             wait until only that wgmma is in flight (step k - 1 retired), barrier
             TMA words and cp.async x rows of step k + S - 1 into the stage step k - 1 used
    (scale bytes, too narrow for either copy, are plain loads one step ahead, issued after the
    fence)

so step k + 1's decode overlaps step k's wgmma, and S - 1 steps of weight words are in flight.
The weight words come by TMA: one thread issues a step's copy and an mbarrier counts its bytes,
which keeps the issue work off the decoding threads (faster than per-thread cp.async: RESULTS.md
3.4). Both operands of the wgmma come from shared memory (no register operand,
hence none of the register race of triton#9433).

SWAP_AB (few rows per expert): the wgmma computes y.T = W @ x.T, so the tile's weight rows fill
its 64-row side and the tokens its narrow side (8..256 wide); BLOCK_N must then be a multiple of
16 * num_warps. Otherwise BLOCK_M must be. No default takes it: the Triton kernel's swapped
tiles measured faster (RESULTS.md 3.4). bf16 only, GPU only (Gluon has no
interpreter).
Launched by `moe_matmul.py` when `MatmulConfig.kernel == "sm90"`; measurements in
benchmarks/RESULTS.md section 3.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                               warpgroup_mma_wait)

from ._compat import cp_async_load, cta_barrier, tma_async_load
from ._moe_matmul import (_BF16_MANTISSA_BITS, _BF16_NAN_BITS, _BF16_POW2_MIN_BITS, _BLOCK_SIZE, _CODES_PER_WORD,
                          _E2M1_BF16_PTX, _E8M0_NAN, _NIBBLE_BITS)

_WORDS_PER_BLOCK: gl.constexpr = gl.constexpr(32 // 8)      # uint32 words per 32-code block


@gluon.jit
def _decode_tile(words, scale_bytes):
    """words [BN, G, 4] uint32 (G = BLOCK_K // 32 blocks of 4 words, code k % 8 in nibble k % 8),
    scale_bytes [BN, G, 1] uint8 E8M0 -> [BN, G * 32] bf16, exact (the inline-PTX decode of
    `_moe_matmul._dequant_mxfp4_words`)."""
    BN: gl.constexpr = words.shape[0]
    G: gl.constexpr = words.shape[1]
    b = scale_bytes.to(gl.int16)
    bits = gl.where(b == 0, _BF16_POW2_MIN_BITS, b << _BF16_MANTISSA_BITS)
    bits = gl.where(b == _E8M0_NAN, _BF16_NAN_BITS, bits)
    scale = bits.to(gl.int16).to(gl.bfloat16, bitcast=True)
    scale = gl.join(scale, scale).broadcast_to(BN, G, _WORDS_PER_BLOCK, 2)      # [BN, G, 4, 2]
    pair = gl.join(words, words >> _NIBBLE_BITS)                       # [BN, G, 4, 2]
    p0, p1, p2, p3 = gl.inline_asm_elementwise(
        _E2M1_BF16_PTX, "=r,=r,=r,=r,r,r,r", [pair, scale],
        dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16), is_pure=True, pack=2)
    # parts[t][n, g, j, p] = code 2 t + p of word 4 g + j, i.e. k = 32 g + 8 j + 2 t + p
    w = gl.join(gl.join(p0, p2), gl.join(p1, p3))                      # [BN, G, 4, p, t_hi, t_lo]
    w = gl.permute(w, (0, 1, 2, 4, 5, 3))
    return w.reshape(BN, G * _BLOCK_SIZE)


@gluon.jit
def _copy_step(x_stage, x_ptrs, mask_xm, offs_xk, K_X, words_desc, words_row, words_stage, bar, step,
               BLOCK_K: gl.constexpr):
    """Start the copies of one K step: the weight words by TMA (completion counted on `bar`;
    words past K arrive as zero codes) and the tile's x rows by cp.async (columns >= K_X read as
    zero; the caller commits the group)."""
    mbarrier.expect(bar, words_desc.block_type.nbytes)
    tma_async_load(words_desc, [words_row, step * (BLOCK_K // _CODES_PER_WORD)], bar, words_stage)
    x_mask = mask_xm[:, None] & ((step * BLOCK_K + offs_xk) < K_X)[None, :]
    cp_async_load(x_stage, x_ptrs + step * BLOCK_K, mask=x_mask)


@gluon.jit
def _moe_matmul_sm90_kernel(
        x_ptr, stride_xm,
        words_desc, rows_per_expert,
        s_ptr, stride_se, stride_sn,
        bias_ptr, stride_be,
        cs_ptr, stride_cse,
        y_ptr, stride_ym,
        gather_ptr, scatter_ptr, row_weight_ptr,
        expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
        N, K_X, N_OUT,
        alpha, limit,
        K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
        STAGES: gl.constexpr, SWAP_AB: gl.constexpr,
        GATHER: gl.constexpr, SCATTER: gl.constexpr, ATOMIC: gl.constexpr,
        HAS_BIAS: gl.constexpr, HAS_CHANNEL_SCALE: gl.constexpr, SWIGLU: gl.constexpr,
        ROW_WEIGHT: gl.constexpr, num_warps: gl.constexpr):
    """One program: BLOCK_M sorted rows of one expert x BLOCK_N weight rows (as
    `_moe_matmul_kernel`). words_desc: a TMA descriptor over the packed codes as int32 words
    [E * rows_per_expert, K // 8] (expert e's row n at e * rows_per_expert + n), block
    [BLOCK_N, BLOCK_K // 8]; rows past N of a tile's expert are read (the next expert's, or
    zeros) and their outputs dropped. Unit strides along K (x, scales), along N (bias, channel
    scale) and along the output columns; the launcher checks."""
    G: gl.constexpr = BLOCK_K // _BLOCK_SIZE
    NUM_K: gl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    # Layouts. Weights: each thread reads one 32-code block (4 words, 16 bytes) of a row from
    # shared memory, and loads its scale byte. x: 8 bf16 (16 bytes) per thread and cp.async.
    w_layout: gl.constexpr = gl.BlockedLayout([1, 1, _WORDS_PER_BLOCK], [32 // G, G, 1], [num_warps, 1, 1], [2, 1, 0])
    words_layout: gl.constexpr = gl.BlockedLayout([1, _WORDS_PER_BLOCK], [32 // G, G], [num_warps, 1], [1, 0])
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    if SWAP_AB:     # acc [BLOCK_N, BLOCK_M] = W @ x.T
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_M, 16])
    else:           # acc [BLOCK_M, BLOCK_N] = x @ W.T
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
    x_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.bfloat16)
    w_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.bfloat16)

    pid_n = gl.program_id(0)
    tile, expert = _program_tile(tile_expert_ptr)
    if expert < 0:
        return  # past the last real tile
    row_start, row_end = _tile_rows(expert_offsets_ptr, tile_row_start_ptr, tile, expert)
    x_ptrs, mask_xm, offs_xk = _x_row_pointers(x_ptr, stride_xm, gather_ptr, row_start, row_end, BLOCK_M, BLOCK_K,
                                               x_layout, GATHER)
    expert64 = expert.to(gl.int64)

    # The tile's first row in the words descriptor; scale bytes [BLOCK_N, G, 1] of one K step.
    words_row = expert * rows_per_expert + pid_n * BLOCK_N
    offs_wn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_layout)))
    mask_wn = offs_wn < N
    offs_g = gl.arange(0, G, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_layout)))
    s_ptrs = (s_ptr + expert64 * stride_se + offs_wn.to(gl.int64) * stride_sn)[:, None, None] + offs_g[None, :, None]
    w_row_mask = mask_wn[:, None, None]

    x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_smem_layout)
    words_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BLOCK_K // _CODES_PER_WORD],
                                           words_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, BLOCK_K], w_smem_layout)
    words_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(words_ready.index(st), count=1)
    fence_async_shared()

    # Prologue: the first STAGES - 1 steps in flight (one cp.async commit group per step, empty
    # past the last step); scale bytes of step 0 in registers.
    for st in gl.static_range(STAGES - 1):
        if st < NUM_K:
            _copy_step(x_smem.index(st), x_ptrs, mask_xm, offs_xk, K_X, words_desc, words_row,
                       words_smem.index(st), words_ready.index(st), st, BLOCK_K)
        async_copy.commit_group()
    scales = gl.load(s_ptrs, mask=w_row_mask & (offs_g < K // _BLOCK_SIZE)[None, :, None], other=0)

    if SWAP_AB:
        acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=mma_layout)
    else:
        acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
    for ki in range(NUM_K):
        stage = ki % STAGES
        mbarrier.wait(words_ready.index(stage), (ki // STAGES) & 1)    # step ki's words have landed
        async_copy.wait_group(STAGES - 2)          # this thread's x copies of step ki have landed
        words = words_smem.index(stage).load(words_layout)
        words = gl.convert_layout(words.reshape(BLOCK_N, G, _WORDS_PER_BLOCK), w_layout)
        # w_smem[ki % 2] was last read by step ki - 2's wgmma, retired (every warpgroup) in step ki - 1.
        w_smem.index(ki % 2).store(_decode_tile(words.to(gl.uint32, bitcast=True), scales))
        fence_async_shared()
        cta_barrier()                        # every thread's x rows and w tile are in place
        # Step ki + 1's scale bytes (too narrow for the copy engines: plain loads), issued after
        # the proxy fence, which waits for every load in flight (issued before it, the load's
        # latency stalled each step: ncu, benchmarks/data/ncu_h200_0581c53.md).
        scales = gl.load(s_ptrs + (ki + 1) * G,
                         mask=w_row_mask & ((ki + 1) * G + offs_g < K // _BLOCK_SIZE)[None, :, None], other=0)
        if SWAP_AB:
            acc = warpgroup_mma(w_smem.index(ki % 2), x_smem.index(stage).permute((1, 0)), acc, is_async=True)
        else:
            acc = warpgroup_mma(x_smem.index(stage), w_smem.index(ki % 2).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))   # this warpgroup's step ki - 1 done
        cta_barrier()                        # ... and every warpgroup's: its buffers are free
        kn = ki + STAGES - 1                       # into the stage step ki - 1 used
        # (Statically none when the prologue issued every step: a one-step loop folds kn to a
        # constant, and Triton 3.6 fails to lower the dead copies that leaves.)
        if NUM_K > STAGES - 1:
            if kn < NUM_K:
                _copy_step(x_smem.index(kn % STAGES), x_ptrs, mask_xm, offs_xk, K_X, words_desc, words_row,
                           words_smem.index(kn % STAGES), words_ready.index(kn % STAGES), kn, BLOCK_K)
        async_copy.commit_group()
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(words_ready.index(st))

    if SWAP_AB:
        acc = gl.permute(acc, (1, 0))
    _store_tile(acc, pid_n, expert64, row_start, row_end, bias_ptr, stride_be, True, cs_ptr, stride_cse,
                y_ptr, stride_ym, scatter_ptr, row_weight_ptr, N, N_OUT, alpha, limit,
                BLOCK_M, BLOCK_N, SCATTER, ATOMIC, HAS_BIAS, HAS_CHANNEL_SCALE, SWIGLU, ROW_WEIGHT, num_warps)


@gluon.jit
def _store_tile(acc, pid_n, expert64, row_start, row_end, bias_ptr, stride_be, with_bias, cs_ptr, stride_cse,
                y_ptr, stride_ym, scatter_ptr, row_weight_ptr, N, N_OUT, alpha, limit,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SCATTER: gl.constexpr, ATOMIC: gl.constexpr,
                HAS_BIAS: gl.constexpr, HAS_CHANNEL_SCALE: gl.constexpr, SWIGLU: gl.constexpr,
                ROW_WEIGHT: gl.constexpr, num_warps: gl.constexpr):
    """The epilogue of the Gluon kernels: acc [BLOCK_M, BLOCK_N] fp32 (tile rows x weight rows,
    any layout) -> channel scale, bias, SwiGLU, routing weight -> y rows (store or fp32 atomic
    add), as `_moe_matmul_kernel` does. with_bias (runtime): add the bias (HAS_BIAS) here; split-K
    programs other than the first leave it out."""
    # Epilogue in a plain blocked layout, VEC output columns per thread: with SwiGLU, 8 gate/up
    # pairs per thread become 8 adjacent bf16 (one 16-byte store, and no second layout change);
    # otherwise 16-byte stores or 4-wide fp32 atomics (faster than 2 columns per thread for w2:
    # RESULTS.md 3.5).
    VEC: gl.constexpr = 4 if ATOMIC else 8
    if SWIGLU:      # 8 gate/up pairs per thread: after SwiGLU, 8 adjacent bf16 (16 bytes)
        acc_layout: gl.constexpr = gl.BlockedLayout([1, 2 * VEC], [16, 2], [num_warps, 1], [1, 0])
    else:
        COL_THREADS: gl.constexpr = 8 if BLOCK_N >= 8 * VEC else BLOCK_N // VEC
        acc_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // COL_THREADS, COL_THREADS], [num_warps, 1],
                                                    [1, 0])
    acc = gl.convert_layout(acc, acc_layout)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    mask_n = offs_n < N
    if HAS_CHANNEL_SCALE:
        cs = gl.load(cs_ptr + expert64 * stride_cse + offs_n, mask=mask_n, other=0.0)
        acc = acc * cs[None, :]
    if HAS_BIAS:
        bias = gl.load(bias_ptr + expert64 * stride_be + offs_n, mask=mask_n & with_bias, other=0.0)
        acc = acc + bias[None, :]
    if SWIGLU:
        gate, up = gl.split(acc.reshape(BLOCK_M, BLOCK_N // 2, 2))
        gate = gl.minimum(gate, limit)
        up = gl.minimum(gl.maximum(up, -limit), limit)
        out = gate / (1.0 + gl.exp(-alpha * gate)) * (up + 1.0)
        out_layout: gl.constexpr = out.type.layout
        offs_out = pid_n * (BLOCK_N // 2) + gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(0, out_layout))
    else:
        out = acc
        out_layout: gl.constexpr = acc_layout
        offs_out = offs_n
    offs_m = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    mask_m = offs_m < row_end
    if ROW_WEIGHT:
        rw = gl.load(row_weight_ptr + offs_m, mask=mask_m, other=0.0)
        out = out * rw[:, None]
    if SCATTER:
        y_rows = gl.load(scatter_ptr + offs_m, mask=mask_m, other=0)
    else:
        y_rows = offs_m
    y_ptrs = y_ptr + y_rows.to(gl.int64)[:, None] * stride_ym + offs_out[None, :]
    mask_y = mask_m[:, None] & (offs_out < N_OUT)[None, :]
    if ATOMIC:
        gl.atomic_add(y_ptrs, out, mask=mask_y, sem="relaxed")
    else:
        gl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_y)


@gluon.jit
def _program_tile(tile_expert_ptr):
    """This program's tile (grid axis 1 of both Gluon kernels) and its expert, -1 for a program
    past the last real tile (the routing metadata pads tile_expert to its worst-case length)."""
    tile = gl.program_id(1)
    return tile, gl.load(tile_expert_ptr + tile)


@gluon.jit
def _tile_rows(expert_offsets_ptr, tile_row_start_ptr, tile, expert):
    """A real tile's first sorted row and its expert's end: its rows are [row_start,
    min(row_end, row_start + BLOCK_M))."""
    return gl.load(tile_row_start_ptr + tile), gl.load(expert_offsets_ptr + expert + 1)


@gluon.jit
def _x_row_pointers(x_ptr, stride_xm, gather_ptr, row_start, row_end, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                    x_layout: gl.constexpr, GATHER: gl.constexpr):
    """The tile's x rows (row r reads x[gather[r]], or x[r]) for the cp.async copies of the Gluon
    kernels: (pointers [BLOCK_M, BLOCK_K] to the first K step's columns, row mask [BLOCK_M],
    column offsets [BLOCK_K]), in `x_layout`."""
    offs_xm = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
    mask_xm = offs_xm < row_end
    if GATHER:
        x_rows = gl.load(gather_ptr + offs_xm, mask=mask_xm, other=0)
    else:
        x_rows = offs_xm
    offs_xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
    x_ptrs = x_ptr + x_rows.to(gl.int64)[:, None] * stride_xm + offs_xk[None, :]
    return x_ptrs, mask_xm, offs_xk
