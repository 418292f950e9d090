"""Triton kernels: the stable sort of routed (token, slot) pairs by local expert that
`routing.routing_metadata` needs, as a counting sort in three small launches (torch.sort, the
searchsorted, the inverse scatter and the gathers were about a dozen launches: 0.04-0.12 ms per
layer on an H100/H200). Launched by `expert_sort.py`; nothing else calls them.

Keys: pair r (flat index t * k + j) of global expert g gets key expert_map[g] (or g), and key
E_local when that is negative (another rank's expert): those sort after every local pair.
The pairs are cut into chunks of BLOCK_R; for chunk c and key e:

    histogram:  counts[c, e]  = pairs of chunk c with key e                    (one program a chunk)
    scan:       start[c, e]   = first sorted row of key e + pairs of key e in chunks < c
                offsets[e]    = first sorted row of key e, e = 0 .. E_local    (one program)
    scatter:    pair r of chunk c with key e goes to start[c, e] + (pairs of key e before r in
                chunk c): a stable counting sort                               (one program a chunk)
"""

import triton
import triton.language as tl


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
    tl.store(sorted_slot_ptr + pos, r, mask=mask)
    tl.store(sorted_token_ptr + pos, r // top_k, mask=mask)
    tl.store(inverse_ptr + r, pos, mask=mask)
    if HAS_WEIGHTS:
        tl.store(sorted_weight_ptr + pos, tl.load(weights_ptr + r, mask=mask, other=0.0), mask=mask)
