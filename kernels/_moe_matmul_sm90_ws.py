"""Warp-specialized, persistent Gluon kernel for Hopper (sm_90): the grouped MXFP4 matmul of
`_moe_matmul.py` (same fused gather / bias / scale / SwiGLU / routing weight / scatter) for tiles
of 64 rows and more, with the weight decode on warps of its own.

Why: in `_moe_matmul_sm90.py` one instruction stream decodes step k + 1, waits for step k's
wgmma, synchronises the whole CTA twice and issues the copies, so on an H200 the decode, the
wgmma and the copies add up instead of overlapping (RESULTS.md section 3). Here three groups of
warps run side by side and meet only at mbarriers in shared memory:

    loader  (LOAD_WARPS):  weight words by TMA (one thread, mbarrier with byte count) and the
                           tile's x rows by cp.async (gathered; one arrive per thread when its
                           copies land) into a ring of STAGES buffers
    decoder (DECODE_WARPS): words -> bf16 weight tile (the inline-PTX decode) into a ring of
                           W_STAGES buffers
    mma     (num_warps, the default group): wgmma of each x buffer and weight tile, then the
                           epilogue (bias, scale, SwiGLU, routing weight, store or atomic add)

Each ring slot has a "ready" barrier (the producer signals) and an "empty" one (the consumer
releases it); the step counter runs on across tiles, so the copies and decode of the next tile
start while the mma warps run this tile's epilogue. Persistent: one program per SM walks the
(expert tile, N tile) grid with N fastest; grid entries past the last real tile are skipped.

Not swapped (the wgmma's row side is the token rows: BLOCK_M a multiple of 16 * num_warps),
bf16 only, GPU only (Gluon has no interpreter). Launched by `moe_matmul.py` for
`MatmulConfig.kernel == "sm90_ws"`.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from ._moe_matmul import _BLOCK_SIZE, _CODES_PER_WORD
from ._moe_matmul_sm90 import _WORDS_PER_BLOCK, _decode_tile


@gluon.jit
def _tile_of(t, grid_n):
    """Grid entry t -> (expert tile, N tile): N fastest, so programs that run together share
    the x rows of one tile and the weights of one expert."""
    return t // grid_n, t % grid_n


@gluon.jit
def _load_partition(x_ptr, stride_xm, gather_ptr, words_desc, rows_per_expert,
                    expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
                    x_smem, words_smem, x_ready, x_empty, words_ready, words_empty,
                    K_X, num_entries, grid_n,
                    K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                    STAGES: gl.constexpr, GATHER: gl.constexpr, LOAD_WARPS: gl.constexpr):
    NUM_K: gl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [LOAD_WARPS, 1], [1, 0])
    offs_xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
    it = 0
    for t in range(gl.program_id(0), num_entries, gl.num_programs(0)):
        m_tile, n_tile = _tile_of(t, grid_n)
        expert = gl.load(tile_expert_ptr + m_tile)
        if expert >= 0:
            row_start = gl.load(tile_row_start_ptr + m_tile)
            row_end = gl.load(expert_offsets_ptr + expert + 1)
            offs_xm = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
            mask_xm = offs_xm < row_end
            if GATHER:
                x_rows = gl.load(gather_ptr + offs_xm, mask=mask_xm, other=0)
            else:
                x_rows = offs_xm
            # Row starts are 16-byte aligned (the launcher checks): tell the compiler, which does
            # not carry the arguments' alignment into a partition, so cp.async moves 16 bytes.
            row_offs = gl.multiple_of(x_rows.to(gl.int64) * stride_xm, 8)
            x_ptrs = x_ptr + row_offs[:, None] + offs_xk[None, :]
            words_row = expert * rows_per_expert + n_tile * BLOCK_N
            for ki in range(NUM_K):
                stage = it % STAGES
                free_phase = ((it // STAGES) & 1) ^ 1      # passes at once on the ring's first lap
                mbarrier.wait(words_empty.index(stage), free_phase)
                mbarrier.expect(words_ready.index(stage), words_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(words_desc, [words_row, ki * (BLOCK_K // _CODES_PER_WORD)],
                                                words_ready.index(stage), words_smem.index(stage))
                mbarrier.wait(x_empty.index(stage), free_phase)
                # Whole 8-column (16-byte) chunks are in or out: K_X is a multiple of 8.
                x_mask = mask_xm[:, None] & ((ki * BLOCK_K + offs_xk) // 8 < K_X // 8)[None, :]
                async_copy.async_copy_global_to_shared(x_smem.index(stage), x_ptrs + ki * BLOCK_K, mask=x_mask)
                async_copy.mbarrier_arrive(x_ready.index(stage), increment_count=False)
                it += 1


@gluon.jit
def _decode_partition(s_ptr, stride_se, stride_sn, expert_offsets_ptr, tile_expert_ptr,
                      words_smem, w_smem, words_ready, words_empty, w_ready, w_empty,
                      N, num_entries, grid_n,
                      K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      STAGES: gl.constexpr, W_STAGES: gl.constexpr, DECODE_WARPS: gl.constexpr):
    NUM_K: gl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    G: gl.constexpr = BLOCK_K // _BLOCK_SIZE
    # Each thread decodes one 32-code block (4 words from shared memory, one scale byte) per row it holds.
    w_layout: gl.constexpr = gl.BlockedLayout([1, 1, _WORDS_PER_BLOCK], [32 // G, G, 1], [DECODE_WARPS, 1, 1],
                                              [2, 1, 0])
    words_layout: gl.constexpr = gl.BlockedLayout([1, _WORDS_PER_BLOCK], [32 // G, G], [DECODE_WARPS, 1], [1, 0])
    offs_g = gl.arange(0, G, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_layout)))
    it = 0
    for t in range(gl.program_id(0), num_entries, gl.num_programs(0)):
        m_tile, n_tile = _tile_of(t, grid_n)
        expert = gl.load(tile_expert_ptr + m_tile)
        if expert >= 0:
            offs_wn = n_tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_layout)))
            s_ptrs = ((s_ptr + expert.to(gl.int64) * stride_se + offs_wn.to(gl.int64) * stride_sn)[:, None, None]
                      + offs_g[None, :, None])
            w_row_mask = (offs_wn < N)[:, None, None]
            scales = gl.load(s_ptrs, mask=w_row_mask & (offs_g < K // _BLOCK_SIZE)[None, :, None], other=0)
            for ki in range(NUM_K):
                stage = it % STAGES
                # Next step's scale bytes (too narrow for the copy engines) while this step decodes.
                next_scales = gl.load(s_ptrs + (ki + 1) * G,
                                      mask=w_row_mask & ((ki + 1) * G + offs_g < K // _BLOCK_SIZE)[None, :, None],
                                      other=0)
                mbarrier.wait(words_ready.index(stage), (it // STAGES) & 1)
                words = words_smem.index(stage).load(words_layout)
                gl.thread_barrier()                                # every decoder thread has its words
                mbarrier.arrive(words_empty.index(stage), count=1)
                words = gl.convert_layout(words.reshape(BLOCK_N, G, _WORDS_PER_BLOCK), w_layout)
                w = _decode_tile(words.to(gl.uint32, bitcast=True), scales)
                slot = it % W_STAGES
                mbarrier.wait(w_empty.index(slot), ((it // W_STAGES) & 1) ^ 1)
                w_smem.index(slot).store(w)
                fence_async_shared()                               # st.shared before the wgmma reads it
                gl.thread_barrier()
                mbarrier.arrive(w_ready.index(slot), count=1)
                scales = next_scales
                it += 1


@gluon.jit
def _mma_partition(x_smem, w_smem, x_ready, x_empty, w_ready, w_empty,
                   bias_ptr, stride_be, cs_ptr, stride_cse, y_ptr, stride_ym,
                   scatter_ptr, row_weight_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
                   N, N_OUT, alpha, limit, num_entries, grid_n,
                   K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                   STAGES: gl.constexpr, W_STAGES: gl.constexpr,
                   SCATTER: gl.constexpr, ATOMIC: gl.constexpr, HAS_BIAS: gl.constexpr,
                   HAS_CHANNEL_SCALE: gl.constexpr, SWIGLU: gl.constexpr, ROW_WEIGHT: gl.constexpr,
                   MMA_WARPS: gl.constexpr):
    NUM_K: gl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[MMA_WARPS, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    epi_layout: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [MMA_WARPS, 1], [1, 0])
    it = 0
    for t in range(gl.program_id(0), num_entries, gl.num_programs(0)):
        m_tile, n_tile = _tile_of(t, grid_n)
        expert = gl.load(tile_expert_ptr + m_tile)
        if expert >= 0:
            acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
            for ki in range(NUM_K):
                stage = it % STAGES
                slot = it % W_STAGES
                mbarrier.wait(x_ready.index(stage), (it // STAGES) & 1)
                mbarrier.wait(w_ready.index(slot), (it // W_STAGES) & 1)
                fence_async_shared()           # the x rows came by cp.async (generic proxy) -> wgmma
                acc = warpgroup_mma(x_smem.index(stage), w_smem.index(slot).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))    # this warpgroup's step it - 1 done
                gl.thread_barrier()                                          # ... and every warpgroup's
                if ki > 0:
                    mbarrier.arrive(x_empty.index((it - 1) % STAGES), count=1)
                    mbarrier.arrive(w_empty.index((it - 1) % W_STAGES), count=1)
                it += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            gl.thread_barrier()
            mbarrier.arrive(x_empty.index((it - 1) % STAGES), count=1)
            mbarrier.arrive(w_empty.index((it - 1) % W_STAGES), count=1)

            # Epilogue (as `_moe_matmul_sm90_kernel`), while the other warps fill the rings for the next tile.
            row_start = gl.load(tile_row_start_ptr + m_tile)
            row_end = gl.load(expert_offsets_ptr + expert + 1)
            expert64 = expert.to(gl.int64)
            out = gl.convert_layout(acc, epi_layout)
            offs_m = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, epi_layout))
            mask_m = offs_m < row_end
            offs_n = n_tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, epi_layout))
            mask_n = offs_n < N
            if HAS_CHANNEL_SCALE:
                cs = gl.load(cs_ptr + expert64 * stride_cse + offs_n, mask=mask_n, other=0.0)
                out = out * cs[None, :]
            if HAS_BIAS:
                bias = gl.load(bias_ptr + expert64 * stride_be + offs_n, mask=mask_n, other=0.0)
                out = out + bias[None, :]
            if SWIGLU:
                gate, up = gl.split(out.reshape(BLOCK_M, BLOCK_N // 2, 2))
                gate = gl.minimum(gate, limit)
                up = gl.minimum(gl.maximum(up, -limit), limit)
                out = gl.convert_layout(gate / (1.0 + gl.exp(-alpha * gate)) * (up + 1.0), epi_layout)
                offs_out = n_tile * (BLOCK_N // 2) + gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(0, epi_layout))
            else:
                offs_out = offs_n
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
def _moe_matmul_sm90_ws_kernel(
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
        num_entries, grid_n,
        K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
        STAGES: gl.constexpr, W_STAGES: gl.constexpr, LOAD_WARPS: gl.constexpr, DECODE_WARPS: gl.constexpr,
        LOAD_REGS: gl.constexpr, DECODE_REGS: gl.constexpr,
        GATHER: gl.constexpr, SCATTER: gl.constexpr, ATOMIC: gl.constexpr,
        HAS_BIAS: gl.constexpr, HAS_CHANNEL_SCALE: gl.constexpr, SWIGLU: gl.constexpr,
        ROW_WEIGHT: gl.constexpr, num_warps: gl.constexpr):
    """Persistent: program p runs grid entries p, p + num_programs, ... of the
    [max_tiles x grid_n] (expert tile, N tile) grid (num_entries of them). Arguments as
    `_moe_matmul_sm90_kernel` (words_desc over [E * rows_per_expert, K // 8] int32 words, block
    [BLOCK_N, BLOCK_K // 8]; unit strides along K, N and the output columns)."""
    x_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.bfloat16)
    w_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.bfloat16)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_smem_layout)
    words_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BLOCK_K // _CODES_PER_WORD],
                                           words_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [W_STAGES, BLOCK_N, BLOCK_K], w_smem_layout)
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    x_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    words_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    words_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(x_ready.index(st), count=LOAD_WARPS * 32)     # one cp.async arrive per loader thread
        mbarrier.init(x_empty.index(st), count=1)
        mbarrier.init(words_ready.index(st), count=1)
        mbarrier.init(words_empty.index(st), count=1)
    for st in gl.static_range(W_STAGES):
        mbarrier.init(w_ready.index(st), count=1)
        mbarrier.init(w_empty.index(st), count=1)
    fence_async_shared()

    gl.warp_specialize([
        (_mma_partition, (x_smem, w_smem, x_ready, x_empty, w_ready, w_empty,
                          bias_ptr, stride_be, cs_ptr, stride_cse, y_ptr, stride_ym,
                          scatter_ptr, row_weight_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
                          N, N_OUT, alpha, limit, num_entries, grid_n,
                          K, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, W_STAGES,
                          SCATTER, ATOMIC, HAS_BIAS, HAS_CHANNEL_SCALE, SWIGLU, ROW_WEIGHT, num_warps)),
        (_load_partition, (x_ptr, stride_xm, gather_ptr, words_desc, rows_per_expert,
                           expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
                           x_smem, words_smem, x_ready, x_empty, words_ready, words_empty,
                           K_X, num_entries, grid_n, K, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, GATHER, LOAD_WARPS)),
        (_decode_partition, (s_ptr, stride_se, stride_sn, expert_offsets_ptr, tile_expert_ptr,
                             words_smem, w_smem, words_ready, words_empty, w_ready, w_empty,
                             N, num_entries, grid_n, K, BLOCK_N, BLOCK_K, STAGES, W_STAGES, DECODE_WARPS)),
    ], [LOAD_WARPS, DECODE_WARPS], [LOAD_REGS, DECODE_REGS])
