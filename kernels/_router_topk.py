"""Triton kernels of the gpt-oss router, launched by `router_topk.py`: its top-k after the GEMM in
one launch (router bias, top-k of the E logits, softmax over the k chosen), where torch takes
three launches (RESULTS.md 3.4); and at decode sizes the GEMM and the top-k in one launch.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._expert_sort import _sort_one_chunk


@triton.jit
def _router_topk_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, tokens, num_experts, stride_t,
                        TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_E: tl.constexpr, PDL: tl.constexpr):
    """Program i: tokens i * BLOCK_T .. + BLOCK_T. logits [tokens, E] float32 (row stride
    stride_t, unit column stride) + bias [E] -> ids [tokens, TOP_K] int64 (largest first; the
    lowest expert id among equal logits) and weights [tokens, TOP_K] float32 (softmax over the
    TOP_K chosen logits). A NaN logit counts as the largest, as in torch.topk, and makes its
    token's weights NaN; every id is a distinct expert < E whatever the logits."""
    if PDL:         # a programmatic dependent launch (`_grid_dependency.py`): the logits first
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    mask_t = t < tokens
    mask_e = e < num_experts
    logits = tl.load(logits_ptr + t[:, None].to(tl.int64) * stride_t + e[None, :],
                     mask=mask_t[:, None] & mask_e[None, :], other=0.0)
    logits += tl.load(bias_ptr + e, mask=mask_e, other=0.0)[None, :]
    _store_topk_softmax(logits, t, mask_t, e, mask_e, weights_ptr, ids_ptr, TOP_K, BLOCK_K, BLOCK_T, BLOCK_E)


@triton.jit
def _router_gemv_topk_kernel(x_ptr, stride_xt, w_ptr, stride_we, bias_ptr, partial_ptr, ticket_ptr,
                             weights_ptr, ids_ptr, tokens, num_experts, hidden,
                             map_ptr, sorted_slot_ptr, sorted_token_ptr, sorted_weight_ptr, inverse_ptr, offsets_ptr,
                             counts_ptr, tile_expert_ptr, tile_row_start_ptr, num_local, num_tiles,
                             TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_E: tl.constexpr, BLOCK_EP: tl.constexpr, BLOCK_H: tl.constexpr,
                             STEPS: tl.constexpr, SPLITS: tl.constexpr, SORT: tl.constexpr, HAS_MAP: tl.constexpr,
                             SORT_BLOCK_R: tl.constexpr, SORT_BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                             SCHEDULE_BLOCK_T: tl.constexpr, TILE_STEPS: tl.constexpr, PDL: tl.constexpr):
    """The router's GEMM and `_router_topk_kernel`'s work in one launch, for at most BLOCK_T
    tokens. Program (s, b) sums x[:, h] * w[e, h] for the BLOCK_EP experts e of block b over its
    STEPS * BLOCK_H hidden columns (exact products, float32 sums, in w's dtype: x is converted to
    it) into its columns of partial[s] [BLOCK_T, BLOCK_E]; the program that finishes last (a
    ticket counter, back to 0 when it is done) adds the SPLITS partial sums in order of s, so the
    logits do not depend on which program ran when, then the bias, the top-k and the softmax as
    `_router_topk_kernel` does. Splitting the experts as well as the hidden columns keeps that
    last program's read (SPLITS * tokens * BLOCK_E floats) small at 128 experts and more.
    w [E, >= hidden] with row stride stride_we; partial: SPLITS * BLOCK_T * BLOCK_E float32.
    SORT: that program then sorts the pairs by local expert and lays out the tile schedule
    (`_expert_sort._sort_one_chunk` on the ids and weights it has just written; the sort's
    pointers and sizes are unused otherwise), so that the routing metadata takes no launch of
    its own."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    split = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    mask_t = t < tokens
    e_block = tl.program_id(1) * BLOCK_EP + tl.arange(0, BLOCK_EP)
    acc = tl.zeros((BLOCK_T, BLOCK_EP), dtype=tl.float32)
    for step in range(STEPS):
        h = (split * STEPS + step) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = h < hidden
        xs = tl.load(x_ptr + t[:, None] * stride_xt + h[None, :], mask=mask_t[:, None] & mask_h[None, :], other=0.0)
        ws = tl.load(w_ptr + e_block[:, None] * stride_we + h[None, :],
                     mask=(e_block < num_experts)[:, None] & mask_h[None, :], other=0.0)
        acc = tl.dot(xs.to(ws.dtype), tl.trans(ws), acc, input_precision="ieee")
    tl.store(partial_ptr + (split * BLOCK_T + t[:, None]) * BLOCK_E + e_block[None, :], acc, mask=mask_t[:, None])
    # Release the partial sums, and learn whether every other program has released its own. The
    # ticket is one thread's atomic: the barrier first puts every thread's stores before it (the
    # release then covers them), and the value comes back to all threads through shared memory.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == SPLITS * tl.num_programs(1) - 1:
        e = tl.arange(0, BLOCK_E)
        mask_e = e < num_experts
        logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for other in range(SPLITS):
            tile = (other * BLOCK_T + t[:, None]) * BLOCK_E + e[None, :]
            logits += tl.load(partial_ptr + tile, mask=mask_t[:, None], other=0.0, cache_modifier=".cg")
        logits += tl.load(bias_ptr + e, mask=mask_e, other=0.0)[None, :]
        _store_topk_softmax(logits, t, mask_t, e, mask_e, weights_ptr, ids_ptr, TOP_K, BLOCK_K, BLOCK_T, BLOCK_E)
        if SORT:
            tl.debug_barrier()          # every thread's ids and weights stored before any is read back
            _sort_one_chunk(ids_ptr, map_ptr, weights_ptr, sorted_slot_ptr, sorted_token_ptr, sorted_weight_ptr,
                            inverse_ptr, offsets_ptr, counts_ptr, tile_expert_ptr, tile_row_start_ptr,
                            tokens * TOP_K, num_local, TOP_K, num_tiles, HAS_MAP, True, SORT_BLOCK_R,
                            SORT_BLOCK_E, BLOCK_M, SCHEDULE_BLOCK_T, TILE_STEPS)
        tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _store_topk_softmax(logits, t, mask_t, e, mask_e, weights_ptr, ids_ptr, TOP_K: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """logits [BLOCK_T, BLOCK_E] (bias added) of tokens t -> ids [tokens, TOP_K] int64 and weights
    [tokens, TOP_K] float32, as `_router_topk_kernel`'s docstring says."""
    # Selection key: NaN above everything; experts past E and experts already chosen never win.
    key = tl.where(logits != logits, float("inf"), logits)
    open_slot = mask_e[None, :] & (t >= 0)[:, None]          # [BLOCK_T, BLOCK_E]
    k = tl.arange(0, BLOCK_K)
    chosen_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    chosen = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(open_slot, key, float("-inf")), axis=1)
        # the lowest open expert holding the best key (one always does: E - j >= 1 are open)
        winner = tl.min(tl.where(open_slot & (key == best[:, None]), e[None, :], BLOCK_E), axis=1)
        is_winner = e[None, :] == winner[:, None]
        value = tl.sum(tl.where(is_winner, logits, 0.0), axis=1)
        chosen_ids = tl.where(k[None, :] == j, winner[:, None], chosen_ids)
        chosen = tl.where(k[None, :] == j, value[:, None], chosen)
        open_slot = open_slot & ~is_winner
    top = tl.sum(tl.where(k[None, :] == 0, chosen, 0.0), axis=1)           # the largest chosen logit
    p = tl.where(k[None, :] < TOP_K, tl.exp(chosen - top[:, None]), 0.0)
    weights = p / tl.sum(p, axis=1)[:, None]
    out = t[:, None].to(tl.int64) * TOP_K + k[None, :]
    mask_out = mask_t[:, None] & (k[None, :] < TOP_K)
    tl.store(ids_ptr + out, chosen_ids.to(tl.int64), mask=mask_out)
    tl.store(weights_ptr + out, weights, mask=mask_out)
