"""Triton kernels: the stable sort of routed (token, slot) pairs by local expert that
`routing.routing_metadata` needs, as a counting sort in three small launches instead of the
dozen that torch.sort, the searchsorted, the inverse scatter and the gathers take (RESULTS.md
3.4). Launched by `expert_sort.py`; nothing else calls them.

Keys: pair r (flat index t * k + j) of global expert g gets key expert_map[g] (or g), and key
E_local when that is negative (another rank's expert): those sort after every local pair.
The pairs are cut into chunks of BLOCK_R; for chunk c and key e:

    histogram:  counts[c, e]  = pairs of chunk c with key e                    (one program a chunk)
    scan:       start[c, e]   = first sorted row of key e + pairs of key e in chunks < c
                offsets[e]    = first sorted row of key e, e = 0 .. E_local    (one program)
    scatter:    pair r of chunk c with key e goes to start[c, e] + (pairs of key e before r in
                chunk c): a stable counting sort                               (one program a chunk)

When every pair fits in one chunk (decode sizes), `_sort_one_chunk` does all three and the tile
schedule (`_tile_schedule._schedule_tiles`) in one program: routing metadata is then one kernel
instead of four (`_sort_one_chunk_kernel`), or the end of the one-launch router's.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._tile_schedule import _schedule_tiles


@triton.jit
def _chunk_keys(ids_ptr, map_ptr, rows, num_local, chunk, HAS_MAP: tl.constexpr, BLOCK_R: tl.constexpr):
    """Flat pair indices of `chunk` and their keys (-1 past the last pair: matches no key)."""
    r = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = r < rows
    ids = tl.load(ids_ptr + r, mask=mask, other=0)
    if HAS_MAP:
        local = tl.load(map_ptr + ids, mask=mask, other=-1)
    else:
        local = ids
    key = tl.where(local < 0, num_local, local)
    return r, tl.where(mask, key, -1)


@triton.jit
def _store_sorted(r, pos, mask, weights_ptr, sorted_slot_ptr, sorted_token_ptr, sorted_weight_ptr, inverse_ptr,
                  top_k, HAS_WEIGHTS: tl.constexpr):
    """Pair r (flat index t * k + j) goes to sorted row pos: its slot, token and weight there,
    and pos in the inverse permutation."""
    tl.store(sorted_slot_ptr + pos, r, mask=mask)
    tl.store(sorted_token_ptr + pos, r // top_k, mask=mask)
    tl.store(inverse_ptr + r, pos, mask=mask)
    if HAS_WEIGHTS:
        tl.store(sorted_weight_ptr + pos, tl.load(weights_ptr + r, mask=mask, other=0.0), mask=mask)


@triton.jit
def _histogram_kernel(ids_ptr, map_ptr, counts_ptr, rows, num_local,
                      HAS_MAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    _, key = _chunk_keys(ids_ptr, map_ptr, rows, num_local, chunk, HAS_MAP, BLOCK_R)
    e = tl.arange(0, BLOCK_E)
    one_hot = (key[:, None] == e[None, :]).to(tl.int32)
    tl.store(counts_ptr + chunk * BLOCK_E + e, tl.sum(one_hot, axis=0))


@triton.jit
def _scan_kernel(counts_ptr, start_ptr, offsets_ptr, num_chunks, num_local,
                 MAX_CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """MAX_CHUNKS: a power of two >= num_chunks (a compile-time loop bound, so that a new token
    count compiles again only when it doubles; Triton's interpreter also needs one)."""
    e = tl.arange(0, BLOCK_E)
    totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, MAX_CHUNKS, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        counts = tl.load(counts_ptr + c[:, None] * BLOCK_E + e[None, :], mask=(c < num_chunks)[:, None], other=0)
        totals += tl.sum(counts, axis=0)
    running = tl.cumsum(totals, 0) - totals                  # first sorted row of each key
    tl.store(offsets_ptr + e, running, mask=e <= num_local)
    for c0 in range(0, MAX_CHUNKS, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < num_chunks)[:, None]
        counts = tl.load(counts_ptr + c[:, None] * BLOCK_E + e[None, :], mask=mask, other=0)
        before = tl.cumsum(counts, 0) - counts               # in earlier chunks of this block
        tl.store(start_ptr + c[:, None] * BLOCK_E + e[None, :], running[None, :] + before, mask=mask)
        running += tl.sum(counts, axis=0)


@triton.jit
def _scatter_kernel(ids_ptr, map_ptr, weights_ptr, start_ptr, sorted_slot_ptr, sorted_token_ptr, sorted_weight_ptr,
                    inverse_ptr, rows, num_local, top_k,
                    HAS_MAP: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    r, key = _chunk_keys(ids_ptr, map_ptr, rows, num_local, chunk, HAS_MAP, BLOCK_R)
    mask = r < rows
    e = tl.arange(0, BLOCK_E)
    one_hot = (key[:, None] == e[None, :]).to(tl.int32)
    earlier = tl.cumsum(one_hot, 0) - one_hot                # same-key pairs before r in the chunk
    start = tl.load(start_ptr + chunk * BLOCK_E + e)
    pos = tl.sum(one_hot * (start[None, :] + earlier), axis=1)
    _store_sorted(r, pos, mask, weights_ptr, sorted_slot_ptr, sorted_token_ptr, sorted_weight_ptr, inverse_ptr,
                  top_k, HAS_WEIGHTS)


@triton.jit
def _sort_one_chunk_kernel(ids_ptr, map_ptr, weights_ptr, sorted_slot_ptr, sorted_token_ptr, sorted_weight_ptr,
                           inverse_ptr, offsets_ptr, counts_ptr, tile_expert_ptr, tile_row_start_ptr,
                           rows, num_local, top_k, num_tiles,
                           HAS_MAP: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                           TILE_STEPS: tl.constexpr, PDL: tl.constexpr):
    """`_sort_one_chunk` in a launch of its own. PDL: launched as a programmatic dependent launch
    (`_grid_dependency.py`): wait for the router's ids first."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    _sort_one_chunk(ids_ptr, map_ptr, weights_ptr, sorted_slot_ptr, sorted_token_ptr, sorted_weight_ptr,
                    inverse_ptr, offsets_ptr, counts_ptr, tile_expert_ptr, tile_row_start_ptr,
                    rows, num_local, top_k, num_tiles, HAS_MAP, HAS_WEIGHTS, BLOCK_R, BLOCK_E, BLOCK_M, BLOCK_T,
                    TILE_STEPS)


@triton.jit
def _sort_one_chunk(ids_ptr, map_ptr, weights_ptr, sorted_slot_ptr, sorted_token_ptr, sorted_weight_ptr,
                    inverse_ptr, offsets_ptr, counts_ptr, tile_expert_ptr, tile_row_start_ptr,
                    rows, num_local, top_k, num_tiles,
                    HAS_MAP: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, TILE_STEPS: tl.constexpr):
    """rows <= BLOCK_R: histogram, scan and scatter of the one chunk, then the tile schedule, in
    one program: the outputs of `_histogram_kernel` .. `_scatter_kernel` and
    `_tile_schedule_kernel`, the same values. TILE_STEPS: a power of two >= num_tiles / BLOCK_T
    (a compile-time loop bound, as the interpreter needs). Also the last step of the one-launch
    router (`_router_topk._router_gemv_topk_kernel`), on the ids it has just written."""
    r, key = _chunk_keys(ids_ptr, map_ptr, rows, num_local, 0, HAS_MAP, BLOCK_R)
    mask = r < rows
    e = tl.arange(0, BLOCK_E)
    one_hot = (key[:, None] == e[None, :]).to(tl.int32)
    totals = tl.sum(one_hot, axis=0)
    first = tl.cumsum(totals, 0) - totals                    # first sorted row of each key
    tl.store(offsets_ptr + e, first, mask=e <= num_local)
    earlier = tl.cumsum(one_hot, 0) - one_hot                # same-key pairs before r
    pos = tl.sum(one_hot * (first[None, :] + earlier), axis=1)
    _store_sorted(r, pos, mask, weights_ptr, sorted_slot_ptr, sorted_token_ptr, sorted_weight_ptr, inverse_ptr,
                  top_k, HAS_WEIGHTS)
    local = e < num_local
    counts = tl.where(local, totals, 0)
    tl.store(counts_ptr + e, counts, mask=local)
    for step in range(TILE_STEPS):
        _schedule_tiles(first, counts, local, tile_expert_ptr, tile_row_start_ptr, num_local, num_tiles,
                        step * BLOCK_T, BLOCK_M, BLOCK_E, BLOCK_T)
