"""Gluon kernel for Hopper (sm_90): the grouped MXFP4 matmul with the decoded weights as the
wgmma's register operand, read from weights re-arranged once into fragment order
(`fragment_layout.py`). Same fused gather / bias / scale / SwiGLU / routing weight / scatter
as `_moe_matmul.py` (the epilogue is `_moe_matmul_sm90._store_tile`).

It computes y.T = W @ x.T: each warp owns 16 weight rows (a warpgroup 64, the wgmma's M side;
or 32, two wgmmas on the same x rows) and the tile's tokens are the wgmma's N side (16..256; an
expert's last tile can run narrower, as power-of-two pieces sharing one decoded fragment: see
WIDTH_STEP). In fragment order, the 16 bytes a thread
loads for one K step of 64 are exactly the codes of its A fragment (rows g and g + 8 of its
warp's 16, k = 2 t + {0, 1, 8, 9} + 16 i), so the weights go global memory -> registers ->
decode -> wgmma with no shared-memory round trip, no layout change and no CTA barrier for them.
Only the tile's x rows pass through shared memory (a ring of STAGES buffers; cp.async, or
TMA where the rows need no gather and the K step is 64: X_TMA, w2 from 64-row tiles):

    step k:  words and scale words of step k + PREFETCH - 1: plain loads into registers
             decode step k's words (loaded PREFETCH - 1 steps ago) into the A fragment
             wait for step k's x rows (cp.async group), proxy fence, barrier
             wgmma(A, x_smem[k % STAGES].T), and wait for it
             cp.async x rows of step k + STAGES - 2 into the buffer step k - 2 read

By default each step's wgmma is retired before the next decode, so the decode and the tensor
cores overlap across warps and programs, not within a warp: ptxas before CUDA 13.3 may reuse the
register operand of a wgmma still in flight (triton issue #9433; a first version that left one
wgmma in flight with a single fragment had 44-80 such writes per step in the SASS).
PIPELINE_MMA alternates two fragments so that step k's wgmma runs during step k + 1's decode;
`sm90_report.rs_wgmma_hazards` finds no hazard in it, but the second fragment's registers halve
the programs per SM and it measured slower (`MatmulConfig.pipeline_mma`). SPLIT_K splits the K
steps of a tile over programs (w2's atomic combine adds their partial sums). bf16 only, GPU only
(Gluon has no interpreter). Launched by `moe_matmul.py` when `MatmulConfig.kernel == "rs"`.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from ._compat import cp_async_load, cta_barrier, tma_async_load
from ._grid_dependency import gdc_launch_dependents_gluon, gdc_wait_gluon
from ._moe_matmul import _BLOCK_SIZE
from ._moe_matmul_sm90 import _program_tile, _store_tile, _tile_rows, _x_row_pointers
from .fragment_layout import BF16_MANTISSA_BITS, LAST_PAIR_MASKS, LAST_PAIR_ROTATIONS, PAIR_MASK, PAIR_ROTATIONS

_LANES: gl.constexpr = gl.constexpr(32)
_ROW_GROUPS: gl.constexpr = gl.constexpr(8)     # lane // 4: row g (and g + 8) of the warp's 16
_K_PAIRS: gl.constexpr = gl.constexpr(4)        # lane % 4: k pair t of each 8 k


# One call: fragment word $4 ($5: the same word; inline asm packs two elements per call), the
# word of 4 stored scale bytes $6 ($7 the same) and the prmt selector $8 ($9) that picks this
# word's byte -> pair registers $0..$3, each 2 bf16 weights (k, k + 1). The scale byte s = b + 126
# becomes the bf16 pair (2 ** (b - 1), 2 ** (b - 1)) = (s << 7, s << 7); each pair is a rotation
# and a mask of the word (pair 3: two rotations), times that (`fragment_layout`).
_PAIRS_PTX: gl.constexpr = gl.constexpr(f"""
{{
.reg .b32 ra, rb, sc, zero;
mov.b32 zero, 0;
prmt.b32 sc, $6, zero, $8;
shl.b32 sc, sc, {BF16_MANTISSA_BITS};
and.b32 $0, $4, {PAIR_MASK:#x};
shf.l.wrap.b32 $1, $4, $4, {PAIR_ROTATIONS[1]};
and.b32 $1, $1, {PAIR_MASK:#x};
shf.l.wrap.b32 $2, $4, $4, {PAIR_ROTATIONS[2]};
and.b32 $2, $2, {PAIR_MASK:#x};
shf.l.wrap.b32 ra, $4, $4, {LAST_PAIR_ROTATIONS[0]};
shf.l.wrap.b32 rb, $4, $4, {LAST_PAIR_ROTATIONS[1]};
and.b32 rb, rb, {LAST_PAIR_MASKS[1]:#x};
lop3.b32 $3, ra, {LAST_PAIR_MASKS[0]:#x}, rb, 0xEA;
mul.rn.bf16x2 $0, $0, sc;
mul.rn.bf16x2 $1, $1, sc;
mul.rn.bf16x2 $2, $2, sc;
mul.rn.bf16x2 $3, $3, sc;
}}
""")
_BYTES_PER_WORD: gl.constexpr = gl.constexpr(4)
# prmt selector: byte i of the first operand into bytes 0 and 2, zeros (byte 4) into 1 and 3
_SPREAD_BYTE: gl.constexpr = gl.constexpr(0x4040)
_SPREAD_STEP: gl.constexpr = gl.constexpr(0x0101)


@gluon.jit
def _decode_fragment(words, scale_words, dot_layout: gl.constexpr):
    """words [W, 32, J4, 4] int32 (J = 4 J4 words per lane) and scale_words [W, 32, J4] int32
    (4 stored scale bytes each, byte i for word 4 j4 + i) of one K step in fragment order (W
    blocks of 16 weight rows; `fragment_layout`) -> the wgmma A fragment [16 W, 16 J] bf16 in
    `dot_layout`, exact. The layout change at the end moves no data (asserted)."""
    W: gl.constexpr = words.shape[0]
    J4: gl.constexpr = words.shape[2]
    u = words.to(gl.uint32, bitcast=True)
    sw = scale_words[:, :, :, None]
    byte = gl.arange(0, _BYTES_PER_WORD,
                     layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, words.type.layout))))
    sel = (_SPREAD_BYTE + _SPREAD_STEP * byte)[None, None, None, :]
    # p_i[..., h] = the weight at k offset 8 i + h of the word's 8
    p0, p1, p2, p3 = gl.inline_asm_elementwise(
        _PAIRS_PTX, "=r,=r,=r,=r,r,r,r,r,r,r", [gl.join(u, u), gl.join(sw, sw), gl.join(sel, sel)],
        dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16), is_pure=True, pack=2)
    v = gl.join(gl.join(p0, p1), gl.join(p2, p3))                   # [W, 32, J4, 4, h, i_lo, i_hi]
    v = v.reshape(W, _ROW_GROUPS, _K_PAIRS, J4 * 2, 2, 2, 2, 2)     # [W, g, t, kblock, half, h, i_lo, i_hi]
    v = gl.permute(v, (0, 4, 1, 3, 7, 6, 2, 5))                     # [W, half, g, kblock, i_hi, i_lo, t, h]
    v = v.reshape(W * 16, J4 * 2 * _BLOCK_SIZE)
    return gl.convert_layout(v, dot_layout, assert_trivial=True)


@gluon.jit
def _load_step(words_ptrs, scale_ptrs, row_mask, step, NUM_K: gl.constexpr, STEP_WORDS: gl.constexpr,
               STEP_SCALES: gl.constexpr, ROW_MASK: gl.constexpr, STREAM: gl.constexpr):
    """One K step's fragment-order words and scale words. Steps past the last one reload the
    last (their values are never used: no mask needed along K). STREAM: read them as lines the
    L2 may drop first (each is read once)."""
    step = gl.minimum(step, NUM_K - 1)
    EVICTION: gl.constexpr = "evict_first" if STREAM else ""
    if ROW_MASK:
        words = gl.load(words_ptrs + step * STEP_WORDS, mask=row_mask[:, :, :, None], eviction_policy=EVICTION)
        scale_words = gl.load(scale_ptrs + step * STEP_SCALES, mask=row_mask, eviction_policy=EVICTION)
    else:
        words = gl.load(words_ptrs + step * STEP_WORDS, eviction_policy=EVICTION)
        scale_words = gl.load(scale_ptrs + step * STEP_SCALES, eviction_policy=EVICTION)
    return words, scale_words


# One thread (the program's first) asks the L2 for [$1, $1 + $2): a bulk prefetch, whose lines
# are kept ahead of streamed ones (evict last). $0 is a register the instruction never writes.
_PREFETCH_L2_PTX: gl.constexpr = gl.constexpr("""
{
.reg .pred first;
.reg .u32 tid;
.reg .b64 policy;
mov.u32 tid, %tid.x;
setp.eq.u32 first, tid, 0;
createpolicy.fractional.L2::evict_last.b64 policy, 1.0;
@first cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, policy;
}
// dummy $0
""")


@gluon.jit
def _prefetch_slice_to_l2(base_ptr, bytes_per_expert, expert, part, parts):
    """Ask the L2 for part `part` of `parts` of expert `expert`'s bytes_per_expert bytes from
    base_ptr (a uint8 or int32 tensor, experts contiguous; bytes_per_expert a multiple of 16)."""
    chunk = (bytes_per_expert // parts + 15) // 16 * 16
    start = part * chunk
    size = gl.minimum(chunk, bytes_per_expert - start)
    if size > 0:
        address = base_ptr.to(gl.pointer_type(gl.int8)) + expert.to(gl.int64) * bytes_per_expert + start
        gl.inline_asm_elementwise(_PREFETCH_L2_PTX, "=r,l,r", [address, size], dtype=gl.int32, is_pure=False,
                                  pack=1)


@gluon.jit
def _copy_x_step(x_stage, x_ptrs, mask_xm, offs_xk, K_X, step, BLOCK_K: gl.constexpr, EVEN_K: gl.constexpr,
                 valid=True):
    """cp.async of the tile's x rows for one K step (columns >= K_X, and every column unless
    `valid`, read as zero)."""
    if EVEN_K:
        cp_async_load(x_stage, x_ptrs + step * BLOCK_K, mask=mask_xm[:, None] & valid)
    else:
        x_mask = mask_xm[:, None] & ((step * BLOCK_K + offs_xk) < K_X)[None, :] & valid
        cp_async_load(x_stage, x_ptrs + step * BLOCK_K, mask=x_mask)


@gluon.jit
def _next_fragment(queue, words_ptrs, scale_ptrs, row_mask, load_step, NUM_K: gl.constexpr, STEP_WORDS: gl.constexpr,
                   STEP_SCALES: gl.constexpr, ROW_MASK: gl.constexpr, STREAM: gl.constexpr, dot_layout: gl.constexpr):
    """Start the loads of step `load_step` (PREFETCH - 1 ahead), decode the oldest step in the
    queue: (A fragment, the queue moved on by one)."""
    queue = queue + (_load_step(words_ptrs, scale_ptrs, row_mask, load_step, NUM_K, STEP_WORDS, STEP_SCALES,
                                ROW_MASK, STREAM),)
    words, scale_words = queue[0]
    return _decode_fragment(words, scale_words, dot_layout), queue[1:]


@gluon.jit
def _wait_x_step(STAGES: gl.constexpr):
    """This step's x rows in shared memory, visible to the wgmma: this thread's copies landed,
    proxy fence, then the barrier (everyone's landed; every warp is past the previous step's
    wait, so the buffer two steps back is free)."""
    async_copy.wait_group(STAGES - 3)
    fence_async_shared()
    cta_barrier()


@gluon.jit
def _refill_x_step(x_smems, x_ptrs, masks_xm, offs_xk, K_X, first, ki, AHEAD: gl.constexpr, STEPS, LOOP_STEPS,
                   STAGES: gl.constexpr, BLOCK_K: gl.constexpr, EVEN_K: gl.constexpr):
    """cp.async of local step kn = ki + AHEAD's x rows (every piece of the tile) into the buffer
    step kn - STAGES read, zeros for a step the loop runs past this program's STEPS (kn <
    LOOP_STEPS), and one commit group either way. No copy is emitted at all where no kn can be
    below LOOP_STEPS (ki >= 0): in a one-iteration loop the compiler folds kn to a constant, and
    Triton fails to lower the dead copy that `kn < LOOP_STEPS` would leave (the short-K crash)."""
    if LOOP_STEPS > AHEAD:
        kn = ki + AHEAD
        if kn < LOOP_STEPS:
            _copy_x_pieces(x_smems, x_ptrs, masks_xm, offs_xk, K_X, kn % STAGES, first + kn, BLOCK_K, EVEN_K,
                           kn < STEPS)
    async_copy.commit_group()


@gluon.jit
def _moe_matmul_rs_kernel(
        x_ptr, stride_xm, x_desc,
        words_ptr, s_ptr, row_groups,
        bias_ptr, stride_be,
        cs_ptr, stride_cse,
        y_ptr, stride_ym,
        gather_ptr, scatter_ptr, row_weight_ptr,
        expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
        N, K_X, N_OUT,
        alpha, limit,
        next_words_ptr, next_scales_ptr, next_expert_words, next_expert_scales,
        NUM_K: gl.constexpr, LAYOUT_STEPS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        BLOCK_K: gl.constexpr, STAGES: gl.constexpr, PREFETCH: gl.constexpr, SPLIT_K: gl.constexpr,
        PIPELINE_MMA: gl.constexpr, EVEN_K: gl.constexpr, ROW_MASK: gl.constexpr, WIDTH_STEP: gl.constexpr,
        GATHER: gl.constexpr, SCATTER: gl.constexpr, ATOMIC: gl.constexpr,
        HAS_BIAS: gl.constexpr, HAS_CHANNEL_SCALE: gl.constexpr, SWIGLU: gl.constexpr,
        ROW_WEIGHT: gl.constexpr, X_TMA: gl.constexpr, L2_PREFETCH: gl.constexpr, PDL: gl.constexpr,
        num_warps: gl.constexpr):
    """One program: BLOCK_M sorted rows of one expert x BLOCK_N weight rows (16 * num_warps, or
    a multiple: each warp then holds several 16-row blocks, every one a wgmma of its own on the
    same x rows).

    words_ptr: int32 [E, row_groups, LAYOUT_STEPS, 32, 4], s_ptr: the uint8 [E, row_groups,
    LAYOUT_STEPS, 8, 4] scales read as int32 (`fragment_layout.FragmentWeights`, contiguous;
    steps of 64 k, so a step of BLOCK_K = 64 J4 reads J4 of them); row_groups = ceil(N / 16);
    NUM_K = ceil(K / BLOCK_K). EVEN_K: K_X == NUM_K * BLOCK_K (no column mask on x). ROW_MASK:
    row_groups is not a multiple of BLOCK_N / 16. SPLIT_K (ATOMIC without SWIGLU only): program
    (., ., s) sums K steps [s * STEPS, (s + 1) * STEPS) (STEPS = ceil(NUM_K / SPLIT_K)) into y by
    atomic adds, the bias from s = 0 only. WIDTH_STEP (> 0): a tile of r rows (fewer than
    BLOCK_M only in an expert's last tile) runs ceil(r / WIDTH_STEP) * WIDTH_STEP columns wide on
    the wgmma's N side, in pieces of powers of two (80 = 64 + 16: one decode, two wgmmas per K
    step), instead of BLOCK_M. X_TMA (no GATHER, not PIPELINE_MMA): the x rows come by TMA through
    x_desc (a box of [BLOCK_M, BLOCK_K] per step, the pieces read its rows), else x_desc is unused
    (None) and they come by cp.async. Unit strides along K (x), along N (bias, channel scale) and
    along the output columns; the launcher checks. L2_PREFETCH: the next matmul's weights of the
    same experts (fragment-order words and scale bytes, next_expert_words / next_expert_scales
    bytes per expert from next_words_ptr / next_scales_ptr) are asked into L2 while this one runs,
    a slice per program of each expert's first tile, and this kernel's own weights are read as
    streamed (evict first) so that they do not push those out; unused when off."""
    STEPS: gl.constexpr = (NUM_K + SPLIT_K - 1) // SPLIT_K
    if PDL:
        # Launched as a programmatic dependent launch: wait for the kernel before (whose outputs,
        # the routing metadata or x, are read below), then let the next one start its own wait.
        gdc_wait_gluon()
        gdc_launch_dependents_gluon()
    pid_n = gl.program_id(0)
    tile, expert = _program_tile(tile_expert_ptr)
    split = gl.program_id(2)
    if expert < 0:
        return  # past the last real tile
    row_start, row_end = _tile_rows(expert_offsets_ptr, tile_row_start_ptr, tile, expert)
    if L2_PREFETCH:
        if row_start == gl.load(expert_offsets_ptr + expert):        # (the expert's first tile)
            _prefetch_slice_to_l2(next_words_ptr, next_expert_words, expert, pid_n, gl.num_programs(0))
            _prefetch_slice_to_l2(next_scales_ptr, next_expert_scales, expert, pid_n, gl.num_programs(0))
    args = (x_ptr, stride_xm, x_desc, words_ptr, s_ptr, row_groups, bias_ptr, stride_be, cs_ptr, stride_cse, y_ptr,
            stride_ym, gather_ptr, scatter_ptr, row_weight_ptr, N, K_X, N_OUT, alpha, limit, pid_n, split, expert,
            row_start, row_end)
    if WIDTH_STEP > 0:
        # The tile's rows rounded up to a multiple of WIDTH_STEP: one code path per width.
        rows = gl.minimum(row_end - row_start, BLOCK_M)
        for c in gl.static_range(1, BLOCK_M // WIDTH_STEP + 1):
            if (rows > (c - 1) * WIDTH_STEP) & (rows <= c * WIDTH_STEP):
                _rs_tile(*args, NUM_K, LAYOUT_STEPS, _width_pieces(c * WIDTH_STEP), BLOCK_N, BLOCK_K, STAGES,
                         PREFETCH, STEPS, PIPELINE_MMA, EVEN_K, ROW_MASK, GATHER, SCATTER, ATOMIC, HAS_BIAS,
                         HAS_CHANNEL_SCALE, SWIGLU, ROW_WEIGHT, X_TMA, L2_PREFETCH, num_warps)
    else:
        _rs_tile(*args, NUM_K, LAYOUT_STEPS, (BLOCK_M,), BLOCK_N, BLOCK_K, STAGES, PREFETCH, STEPS, PIPELINE_MMA,
                 EVEN_K, ROW_MASK, GATHER, SCATTER, ATOMIC, HAS_BIAS, HAS_CHANNEL_SCALE, SWIGLU, ROW_WEIGHT,
                 X_TMA, L2_PREFETCH, num_warps)


@gluon.constexpr_function
def _width_pieces(width):
    """A tile width as the powers of two it is made of, largest first (96 -> (64, 32)): one
    accumulator and one wgmma per piece."""
    return tuple(1 << bit for bit in reversed(range(int(width).bit_length())) if int(width) >> bit & 1)


@gluon.constexpr_function
def _piece_starts(pieces):
    """The first tile row of each piece."""
    return tuple(sum(pieces[:i]) for i in range(len(pieces)))


@gluon.constexpr_function
def _mma_layout(width, num_warps):
    """The accumulator layout of a piece `width` columns wide: one m64nWIDTHk16 wgmma per
    warpgroup, a warp's 16 weight rows each."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, width, 16])


@gluon.constexpr_function
def _x_smem_layout(width, block_k):
    """The shared-memory layout of one K step of a piece's x rows, [width, block_k] bf16."""
    return gl.NVMMASharedLayout.get_default_for([width, block_k], gl.bfloat16)


@gluon.jit
def _zero_accumulator(BLOCK_N: gl.constexpr, WIDTH: gl.constexpr, num_warps: gl.constexpr):
    """A zero fp32 accumulator of a piece [BLOCK_N, WIDTH] (WIDTH as a constexpr, which a
    tuple element is not)."""
    return gl.zeros((BLOCK_N, WIDTH), dtype=gl.float32, layout=_mma_layout(WIDTH, num_warps))


@gluon.jit
def _x_pieces(x_ptr, stride_xm, gather_ptr, row_start, row_end, PIECES: gl.constexpr, STAGES: gl.constexpr,
              BLOCK_K: gl.constexpr, x_layout: gl.constexpr, GATHER: gl.constexpr):
    """Per piece of the tile (`_width_pieces`): its x ring in shared memory [STAGES, piece,
    BLOCK_K] and its rows' pointers and row mask (`_x_row_pointers`), as three tuples; and the
    column offsets."""
    STARTS: gl.constexpr = _piece_starts(PIECES)
    smems = ()
    ptrs = ()
    masks = ()
    for i in gl.static_range(len(PIECES)):
        smems = smems + (gl.allocate_shared_memory(gl.bfloat16, [STAGES, PIECES[i], BLOCK_K],
                                                   _x_smem_layout(PIECES[i], BLOCK_K)),)
        piece_ptrs, piece_mask, offs_xk = _x_row_pointers(x_ptr, stride_xm, gather_ptr, row_start + STARTS[i],
                                                          row_end, PIECES[i], BLOCK_K, x_layout, GATHER)
        ptrs = ptrs + (piece_ptrs,)
        masks = masks + (piece_mask,)
    return smems, ptrs, masks, offs_xk


@gluon.jit
def _copy_x_pieces(x_smems, x_ptrs, masks_xm, offs_xk, K_X, buffer, step, BLOCK_K: gl.constexpr,
                   EVEN_K: gl.constexpr, valid=True):
    """`_copy_x_step` for every piece of the tile, into ring buffer `buffer`."""
    for i in gl.static_range(len(x_smems)):
        _copy_x_step(x_smems[i].index(buffer), x_ptrs[i], masks_xm[i], offs_xk, K_X, step, BLOCK_K, EVEN_K, valid)


@gluon.jit
def _x_buffers(x_smems, buffer):
    """Each piece's x rows in ring buffer `buffer` (cp.async path: a ring per piece)."""
    out = ()
    for i in gl.static_range(len(x_smems)):
        out = out + (x_smems[i].index(buffer),)
    return out


@gluon.jit
def _x_ring_buffers(x_ring, buffer, PIECES: gl.constexpr):
    """Each piece's x rows in ring buffer `buffer` (TMA path: one ring of [BLOCK_M, BLOCK_K]
    buffers, the pieces its consecutive rows)."""
    STARTS: gl.constexpr = _piece_starts(PIECES)
    out = ()
    for i in gl.static_range(len(PIECES)):
        out = out + (x_ring.index(buffer).slice(STARTS[i], PIECES[i]),)
    return out


@gluon.jit
def _tma_x_step(x_desc, x_ring, x_ready, row_start, buffer, step, BLOCK_K: gl.constexpr):
    """One TMA copy of the tile's x rows (sorted rows, no gather: BLOCK_M of them from row_start,
    whatever the tile's width) for K step `step` into ring buffer `buffer`, counted on
    x_ready[buffer]. Rows and columns past x's end arrive as zeros; rows of the next expert land
    in wgmma columns that the epilogue never stores."""
    bar = x_ready.index(buffer)
    mbarrier.expect(bar, x_desc.block_type.nbytes)
    tma_async_load(x_desc, [row_start, step * BLOCK_K], bar, x_ring.index(buffer))


@gluon.jit
def _fragment_per_piece(a, accs):
    """The A fragment `a` in each piece's operand layout: the same registers (asserted), one
    value per wgmma for the wait's deps."""
    out = ()
    for i in gl.static_range(len(accs)):
        out = out + (gl.convert_layout(a, gl.DotOperandLayout(operand_index=0, parent=accs[i].type.layout,
                                                              k_width=2), assert_trivial=True),)
    return out


@gluon.jit
def _mma_pieces(a, x_buffers, accs):
    """Start one wgmma per piece, accs[i] += a @ x_buffers[i].T, all on the same A fragment:
    (the accumulators in flight, the fragments they read, for the wait's deps)."""
    a_used = _fragment_per_piece(a, accs)
    out = ()
    for i in gl.static_range(len(accs)):
        out = out + (warpgroup_mma(a_used[i], x_buffers[i].permute((1, 0)), accs[i], is_async=True),)
    return out, a_used


@gluon.jit
def _retire_mma(accs, a_used, num_outstanding: gl.constexpr):
    """warpgroup_mma_wait(num_outstanding) keeping every piece's accumulator and A fragment
    alive: (accumulators, A fragments)."""
    done = warpgroup_mma_wait(num_outstanding=num_outstanding, deps=accs + a_used)
    return done[:len(accs)], done[len(accs):]


@gluon.jit
def _rs_tile(x_ptr, stride_xm, x_desc, words_ptr, s_ptr, row_groups, bias_ptr, stride_be, cs_ptr, stride_cse, y_ptr,
             stride_ym, gather_ptr, scatter_ptr, row_weight_ptr, N, K_X, N_OUT, alpha, limit, pid_n, split, expert,
             row_start, row_end,
             NUM_K: gl.constexpr, LAYOUT_STEPS: gl.constexpr, PIECES: gl.constexpr, BLOCK_N: gl.constexpr,
             BLOCK_K: gl.constexpr,
             STAGES: gl.constexpr, PREFETCH: gl.constexpr, STEPS: gl.constexpr, PIPELINE_MMA: gl.constexpr,
             EVEN_K: gl.constexpr, ROW_MASK: gl.constexpr, GATHER: gl.constexpr, SCATTER: gl.constexpr,
             ATOMIC: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_CHANNEL_SCALE: gl.constexpr, SWIGLU: gl.constexpr,
             ROW_WEIGHT: gl.constexpr, X_TMA: gl.constexpr, L2_PREFETCH: gl.constexpr, num_warps: gl.constexpr):
    """The K loop and epilogue of one program of `_moe_matmul_rs_kernel`, sum(PIECES) columns
    wide on the wgmma's N side: one accumulator per piece (a power of two), each K step's
    decoded fragment shared by the pieces' wgmmas."""
    ROW_BLOCKS: gl.constexpr = BLOCK_N // 16                  # 16-row blocks: warp w holds w, w + num_warps, ...
    J4: gl.constexpr = BLOCK_K // 16 // _BYTES_PER_WORD
    STEP_WORDS: gl.constexpr = J4 * _LANES * _BYTES_PER_WORD      # J4 layout steps of 64 k
    STEP_SCALES: gl.constexpr = J4 * _ROW_GROUPS
    STARTS: gl.constexpr = _piece_starts(PIECES)
    dot_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=_mma_layout(PIECES[0], num_warps),
                                                   k_width=2)
    # A warp per 16 weight rows (wrapping round the warps, as the wgmma's operand does), a lane
    # per fragment slot, 4 words (16 bytes) per 64 k.
    words_layout: gl.constexpr = gl.BlockedLayout([1, 1, J4, _BYTES_PER_WORD], [1, _LANES, 1, 1],
                                                  [num_warps, 1, 1, 1], [3, 2, 1, 0])
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

    first = split * STEPS                          # this program's first K step
    if X_TMA:
        x_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    else:
        x_smems, x_ptrs, masks_xm, offs_xk = _x_pieces(x_ptr, stride_xm, gather_ptr, row_start, row_end, PIECES,
                                                       STAGES, BLOCK_K, x_layout, GATHER)
    expert64 = expert.to(gl.int64)

    # This thread's words and scale words of step 0; step s is + s * STEP_WORDS / STEP_SCALES.
    w3: gl.constexpr = gl.SliceLayout(3, words_layout)
    group = pid_n * ROW_BLOCKS + gl.arange(0, ROW_BLOCKS, layout=gl.SliceLayout(1, gl.SliceLayout(2, w3)))
    lane = gl.arange(0, _LANES, layout=gl.SliceLayout(0, gl.SliceLayout(2, w3)))
    word4 = gl.arange(0, J4, layout=gl.SliceLayout(0, gl.SliceLayout(1, w3)))
    byte = gl.arange(0, _BYTES_PER_WORD, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, words_layout))))
    first_step = (expert64 * row_groups + group) * LAYOUT_STEPS
    lane_words = (lane * _BYTES_PER_WORD)[None, :, None] + (word4 * (_LANES * _BYTES_PER_WORD))[None, None, :]
    words_ptrs = ((words_ptr + (first_step * (_LANES * _BYTES_PER_WORD))[:, None, None] + lane_words)[:, :, :, None]
                  + byte[None, None, None, :])
    scale_ptrs = (s_ptr.to(gl.pointer_type(gl.int32)) + (first_step * _ROW_GROUPS)[:, None, None]
                  + (lane // _K_PAIRS)[None, :, None] + (word4 * _ROW_GROUPS)[None, None, :])
    row_mask = (group < row_groups)[:, None, None]

    # Prologue: x rows of the first STAGES - 2 steps in flight (cp.async: one commit group per
    # step, empty past the last step; TMA: counted on the step's mbarrier); the weights of the
    # first PREFETCH - 1 steps in registers.
    if X_TMA:
        x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(x_ready.index(st), count=1)
        fence_async_shared()
    for st in gl.static_range(STAGES - 2):
        if X_TMA:
            if st < STEPS:
                _tma_x_step(x_desc, x_ring, x_ready, row_start, st, first + st, BLOCK_K)
        else:
            if st < STEPS:
                _copy_x_pieces(x_smems, x_ptrs, masks_xm, offs_xk, K_X, st, first + st, BLOCK_K, EVEN_K)
            async_copy.commit_group()
    queue = ()
    for st in gl.static_range(PREFETCH - 1):
        queue = queue + (_load_step(words_ptrs, scale_ptrs, row_mask, first + st, NUM_K, STEP_WORDS, STEP_SCALES,
                                    ROW_MASK, L2_PREFETCH),)

    accs = ()
    for i in gl.static_range(len(PIECES)):
        accs = accs + (_zero_accumulator(BLOCK_N, PIECES[i], num_warps),)
    if PIPELINE_MMA:
        # Two steps per iteration, each step's A fragment its own value: step k's wgmma runs while
        # step k + 1 decodes, and retires at step k + 1's wait (which keeps its A alive until then).
        LOOP_STEPS: gl.constexpr = 2 * ((STEPS + 1) // 2)     # an odd STEPS gets a zero step
        a1 = gl.zeros((BLOCK_N, BLOCK_K), dtype=gl.bfloat16, layout=dot_layout)
        a1_used = _fragment_per_piece(a1, accs)
        for kp in range(LOOP_STEPS // 2):
            ki = 2 * kp
            a0, queue = _next_fragment(queue, words_ptrs, scale_ptrs, row_mask, first + ki + PREFETCH - 1,
                                       NUM_K, STEP_WORDS, STEP_SCALES, ROW_MASK, L2_PREFETCH, dot_layout)
            _wait_x_step(STAGES)
            accs, a0_used = _mma_pieces(a0, _x_buffers(x_smems, ki % STAGES), accs)
            accs, a1_used = _retire_mma(accs, a1_used, 1)
            _refill_x_step(x_smems, x_ptrs, masks_xm, offs_xk, K_X, first, ki, STAGES - 2, STEPS, LOOP_STEPS,
                           STAGES, BLOCK_K, EVEN_K)
            a1, queue = _next_fragment(queue, words_ptrs, scale_ptrs, row_mask, first + ki + PREFETCH, NUM_K,
                                       STEP_WORDS, STEP_SCALES, ROW_MASK, L2_PREFETCH, dot_layout)
            _wait_x_step(STAGES)
            accs, a1_used = _mma_pieces(a1, _x_buffers(x_smems, (ki + 1) % STAGES), accs)
            accs, a0_used = _retire_mma(accs, a0_used, 1)
            _refill_x_step(x_smems, x_ptrs, masks_xm, offs_xk, K_X, first, ki, STAGES - 1, STEPS, LOOP_STEPS,
                           STAGES, BLOCK_K, EVEN_K)
        accs, a1_used = _retire_mma(accs, a1_used, 0)
    else:
        for ki in range(STEPS):
            a, queue = _next_fragment(queue, words_ptrs, scale_ptrs, row_mask, first + ki + PREFETCH - 1, NUM_K,
                                      STEP_WORDS, STEP_SCALES, ROW_MASK, L2_PREFETCH, dot_layout)
            if X_TMA:
                # Step ki's rows have landed; the barrier: every warp is past step ki - 1, whose
                # wgmma it retired, so the buffer of step ki - 2 is free for the refill below.
                mbarrier.wait(x_ready.index(ki % STAGES), (ki // STAGES) & 1)
                cta_barrier()
                x_buffers = _x_ring_buffers(x_ring, ki % STAGES, PIECES)
            else:
                _wait_x_step(STAGES)
                x_buffers = _x_buffers(x_smems, ki % STAGES)
            accs, a_used = _mma_pieces(a, x_buffers, accs)
            # Retire them before the next step's decode: ptxas 12.8 would reuse the registers of `a`
            # while they run (triton#9433; a wait of 1 gave 44-80 such writes per step in the SASS).
            accs, a_used = _retire_mma(accs, a_used, 0)
            if X_TMA:
                if STEPS > STAGES - 2:          # as in `_refill_x_step`: no dead copy in a folded loop
                    kn = ki + STAGES - 2
                    if kn < STEPS:
                        _tma_x_step(x_desc, x_ring, x_ready, row_start, kn % STAGES, first + kn, BLOCK_K)
            else:
                _refill_x_step(x_smems, x_ptrs, masks_xm, offs_xk, K_X, first, ki, STAGES - 2, STEPS, STEPS, STAGES,
                               BLOCK_K, EVEN_K)
    if X_TMA:
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(x_ready.index(st))
    else:
        async_copy.wait_group(0)

    for i in gl.static_range(len(PIECES)):
        _store_tile(gl.permute(accs[i], (1, 0)), pid_n, expert64, row_start + STARTS[i], row_end, bias_ptr, stride_be,
                    split == 0, cs_ptr, stride_cse, y_ptr, stride_ym, scatter_ptr, row_weight_ptr, N, N_OUT, alpha,
                    limit, PIECES[i], BLOCK_N, SCATTER, ATOMIC, HAS_BIAS, HAS_CHANNEL_SCALE, SWIGLU, ROW_WEIGHT,
                    num_warps)
