"""Routing metadata for the grouped GEMM: sort by expert, counts, offsets, tiles, inverse."""

import pytest
import torch
from compile_script import run_compiler_script

from mxfp4_moe.routing import max_tiles, route, routing_metadata


def _check_invariants(meta, topk_ids, expert_map, num_local):
    tokens, k = topk_ids.shape
    rows = tokens * k
    flat = topk_ids.reshape(-1).long()
    local = expert_map.long()[flat] if expert_map is not None else flat
    # counts: independent recount per expert
    expected_counts = torch.stack([(local == e).sum() for e in range(num_local)]).to(torch.int32)
    assert torch.equal(meta.expert_counts, expected_counts)
    assert torch.equal(meta.expert_offsets[1:], torch.cumsum(expected_counts, 0).to(torch.int32))
    assert int(meta.expert_offsets[0]) == 0
    n_local = int((local >= 0).sum())
    assert int(meta.expert_offsets[-1]) == n_local
    assert int(meta.expert_counts.sum()) + int((local < 0).sum()) == rows
    # inverse is a permutation and inverts sorted_slot
    assert torch.equal(torch.sort(meta.inverse.long()).values, torch.arange(rows))
    assert torch.equal(meta.inverse.long()[meta.sorted_slot.long()], torch.arange(rows))
    assert torch.equal(meta.sorted_token.long(), meta.sorted_slot.long() // k)
    # sorted rows: expert of each row matches its segment; stable (slot index ascending inside)
    offs = meta.expert_offsets.tolist()
    for e in range(num_local):
        seg = meta.sorted_slot.long()[offs[e]:offs[e + 1]]
        assert bool((local[seg] == e).all())
        assert bool((seg[1:] > seg[:-1]).all())
    assert bool((local[meta.sorted_slot.long()[n_local:]] < 0).all())
    # tiles: each local row covered exactly once, by a tile of its own expert
    covered = torch.zeros(rows, dtype=torch.int64)
    bm = meta.block_m
    assert meta.max_tiles == max_tiles(rows, num_local, bm)
    seen_idle = False
    for te, start in zip(meta.tile_expert.tolist(), meta.tile_row_start.tolist()):
        if te < 0:
            seen_idle = True
            continue
        assert not seen_idle, "real tiles must come before idle ones"
        end = min(start + bm, offs[te + 1])
        assert offs[te] <= start < end
        covered[start:end] += 1
    assert torch.equal(covered[:n_local], torch.ones(n_local, dtype=torch.int64))
    assert int(covered[n_local:].sum()) == 0


@pytest.mark.parametrize("tokens,k,num_experts,block_m", [
    (0, 4, 8, 16),        # no tokens
    (1, 4, 8, 16),        # decode: most experts empty
    (7, 2, 4, 16),        # T*k < block_m
    (33, 4, 8, 16),       # T not a multiple of the block
    (257, 4, 32, 64),     # several tiles per expert
])
def test_invariants_random_routing(tokens, k, num_experts, block_m):
    gen = torch.Generator().manual_seed(tokens * 31 + k)
    logits = torch.randn(tokens, num_experts, generator=gen)
    topk_ids = torch.topk(logits, k, dim=-1).indices
    meta = routing_metadata(topk_ids, None, num_experts, block_m)
    _check_invariants(meta, topk_ids, None, num_experts)


def test_all_tokens_to_one_expert():
    topk_ids = torch.full((50, 1), 3, dtype=torch.int64)
    meta = routing_metadata(topk_ids, None, 4, 16)
    _check_invariants(meta, topk_ids, None, 4)
    assert meta.expert_counts.tolist() == [0, 0, 0, 50, ] and int((meta.tile_expert == 3).sum()) == 4


def test_expert_parallel_drops_non_local():
    # 8 global experts, this rank holds 2, 5, 7 (round-robin-like): other pairs are dropped.
    expert_map = torch.full((8,), -1, dtype=torch.int32)
    expert_map[torch.tensor([2, 5, 7])] = torch.arange(3, dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)
    topk_ids = torch.topk(torch.randn(40, 8, generator=gen), 2, dim=-1).indices
    meta = routing_metadata(topk_ids, expert_map, 3, 16, torch.rand(40, 2, generator=gen))
    _check_invariants(meta, topk_ids, expert_map, 3)
    assert meta.sorted_weight is not None and meta.sorted_weight.shape == (80,)


def test_sorted_weight_follows_rows():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 32, generator=gen)
    weights, ids = route(x, torch.randn(6, 32, generator=gen), torch.randn(6, generator=gen), 3)
    meta = routing_metadata(ids, None, 6, 16, weights)
    assert torch.equal(meta.sorted_weight, weights.reshape(-1)[meta.sorted_slot.long()])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="power of two"):
        routing_metadata(torch.zeros(2, 2, dtype=torch.int64), None, 4, 24)
    with pytest.raises(ValueError, match="topk_ids must be"):
        routing_metadata(torch.zeros(4, dtype=torch.int64), None, 4, 16)


@pytest.mark.parametrize("num_experts,block_m,max_count", [
    (1, 16, 40),          # one expert, several tiles
    (8, 16, 3),           # mostly one partial tile each, some empty
    (130, 32, 70),        # more experts than one 128-wide block of tiles; E not a power of two
])
def test_tile_schedule_kernel_matches_torch(num_experts, block_m, max_count):
    # The Triton tile schedule (run here by the interpreter) against the torch version, on
    # random counts with empty experts; idle tiles past the last real one included.
    from mxfp4_moe.kernels.tile_schedule import tile_schedule
    from mxfp4_moe.routing import tile_schedule_torch
    gen = torch.Generator().manual_seed(num_experts)
    counts = torch.randint(0, max_count + 1, (num_experts,), generator=gen)
    counts[::3] = 0
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    n_tiles = max_tiles(int(counts.sum()), num_experts, block_m)
    got = tile_schedule(offsets, n_tiles, block_m)
    want = tile_schedule_torch(offsets, n_tiles, block_m)
    for name, g, w in zip(("counts", "tile_expert", "tile_row_start"), got, want):
        assert g.dtype == torch.int32 and torch.equal(g, w), name
    assert torch.equal(got[0], counts.to(torch.int32))


def _random_routing(tokens: int, top_k: int, num_experts: int, local: list[int] | None, weights: bool):
    """Distinct random experts per token, optional routing weights, and the expert map of a rank
    holding `local` (None: all experts). Returns (topk_ids, topk_weights, expert_map, num_local)."""
    gen = torch.Generator().manual_seed(tokens + num_experts)
    topk_ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]) \
        if tokens else torch.zeros(0, top_k, dtype=torch.int64)
    topk_w = torch.rand(tokens, top_k, generator=gen) if weights else None
    if local is None:
        return topk_ids, topk_w, None, num_experts
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[local] = torch.arange(len(local), dtype=torch.int32)
    return topk_ids, topk_w, expert_map, max(1, len(local))


@pytest.mark.parametrize("tokens,top_k,num_experts,local,weights", [
    (0, 4, 8, None, True),            # no tokens
    (1, 4, 128, None, True),          # decode: one chunk, most experts empty
    (300, 4, 32, None, False),        # several chunks (128 pairs each at 32 experts)
    (1100, 4, 128, None, True),       # 4400 pairs in 64-pair chunks: 69 chunks, two scan steps
    (257, 2, 12, [1, 4, 5, 11], True),  # expert parallelism: pairs of other ranks sort last
    (50, 3, 6, [], True),             # this rank holds no routed expert: every pair dropped
])
def test_expert_sort_kernel_matches_torch(tokens, top_k, num_experts, local, weights):
    # The Triton counting sort (run here by the interpreter) against torch's stable sort,
    # exactly: same order within each expert (token order), same offsets, same inverse.
    from mxfp4_moe.kernels.expert_sort import expert_sort
    from mxfp4_moe.routing import expert_sort_torch
    topk_ids, topk_w, expert_map, num_local = _random_routing(tokens, top_k, num_experts, local, weights)
    got = expert_sort(topk_ids, expert_map, num_local, topk_w)
    want = expert_sort_torch(topk_ids, expert_map, num_local, topk_w)
    names = ("sorted_slot", "sorted_token", "sorted_weight", "inverse", "offsets")
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and torch.equal(g, w), name
    if tokens:
        assert torch.equal(torch.sort(got[0].long()).values, torch.arange(tokens * top_k))   # a permutation


@pytest.mark.parametrize("tokens,num_experts,local,block_m,weights", [
    (0, 128, None, 16, True),           # no tokens: every tile idle
    (1, 128, None, 16, True),           # decode: 4 pairs, one launch (a 16-tile schedule step)
    (5, 128, None, 16, True),           # 20 tiles: a 32-tile schedule step
    (16, 128, None, 16, False),         # 64 pairs: the most one chunk holds at 128 experts
    (17, 128, None, 16, True),          # 68 pairs: two chunks, the four-launch path
    (40, 32, None, 32, True),           # 160 pairs in one chunk of 256 at 32 experts
    (9, 12, [1, 4, 5, 11], 16, True),   # expert parallelism: other ranks' pairs sort last
    (64, 6, [], 16, True),              # no local expert routed: all pairs dropped, 256 pairs
    (300, 1, None, 16, True),           # one expert, 1200 pairs: 76 tiles, several tile steps
])
def test_sort_and_schedule_matches_torch(tokens, num_experts, local, block_m, weights):
    # routing_metadata's Triton path (run here by the interpreter), on both sides of the switch
    # to one launch (sort and tile schedule), against the torch twins: every field equal, exactly.
    from mxfp4_moe.kernels.expert_sort import _chunking, sort_and_schedule
    from mxfp4_moe.routing import expert_sort_torch, tile_schedule_torch
    top_k = min(4, num_experts)
    topk_ids, topk_w, expert_map, num_local = _random_routing(tokens, top_k, num_experts, local, weights)
    rows = tokens * top_k
    n_tiles = max_tiles(rows, num_local, block_m)
    got = sort_and_schedule(topk_ids, expert_map, num_local, topk_w, n_tiles, block_m)
    want = expert_sort_torch(topk_ids, expert_map, num_local, topk_w)
    want = (*want, *tile_schedule_torch(want[4], n_tiles, block_m))
    names = ("sorted_slot", "sorted_token", "sorted_weight", "inverse", "offsets", "counts", "tile_expert",
             "tile_row_start")
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and torch.equal(g, w), name
    one_chunk = _chunking(rows, num_local)[2] == 1
    assert one_chunk == (rows <= {128: 64, 32: 256}.get(num_local, rows)), (rows, num_local)


def test_exact_bf16_and_the_cpu_route_ignore_inexact_weights():
    # A router weight read from a bf16 checkpoint has a bf16 copy; a float32 one with more bits
    # has none. Off the GPU the bf16 copy changes nothing: the logits stay float32 products.
    from mxfp4_moe.routing import exact_bf16
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 32, generator=gen)
    assert exact_bf16(weight) is None
    exact = weight.bfloat16().float()
    assert torch.equal(exact_bf16(exact), exact.bfloat16())
    x = torch.randn(5, 32, generator=gen).bfloat16()
    bias = torch.randn(6, generator=gen)
    plain = route(x, exact, bias, 2)
    given = route(x, exact, bias, 2, router_weight_bf16=exact.bfloat16())
    assert torch.equal(plain[1], given[1]) and torch.equal(plain[0], given[0])


def test_routing_kernels_compile_for_sm90():
    # The interpreter runs the routing kernels in CI, but does not compile them: compile each for
    # the H100 (no GPU needed) at the sizes the launchers pick at E = 128 and E = 32, so that an
    # edit the interpreter accepts and the compiler rejects fails here and not on the device.
    script = (
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from mxfp4_moe.kernels import _expert_sort as s, _tile_schedule as t\n"
        "types = {'rows': 'i32', 'num_local': 'i32', 'top_k': 'i32', 'num_tiles': 'i32', 'num_chunks': 'i32',\n"
        "         'num_experts': 'i32', 'ids_ptr': '*i64', 'weights_ptr': '*fp32', 'sorted_weight_ptr': '*fp32'}\n"
        "for block_e, block_r in ((256, 64), (64, 256)):\n"
        "    sizes = dict(HAS_MAP=True, HAS_WEIGHTS=True, BLOCK_R=block_r, BLOCK_E=block_e, BLOCK_M=16, BLOCK_T=128,\n"
        "                 TILE_STEPS=2, MAX_CHUNKS=block_r, BLOCK_C=block_r)\n"
        "    for k in (s._histogram_kernel, s._scan_kernel, s._scatter_kernel, s._sort_one_chunk_kernel,\n"
        "              t._tile_schedule_kernel):\n"
        "        const = {n: v for n, v in sizes.items() if n in k.arg_names}\n"
        "        sig = {n: 'constexpr' if n in const else types.get(n, '*i32') for n in k.arg_names}\n"
        "        triton.compile(ASTSource(fn=k, signature=sig, constexprs=const), target=GPUTarget('cuda', 90, 32),\n"
        "                       options={'num_warps': 8})\n"
        "        print(k.__name__, block_e)\n"
        "from mxfp4_moe.kernels import _router_topk as r\n"
        "k = r._router_topk_kernel\n"
        "for block_e, block_t in ((128, 32), (32, 128)):\n"
        "    const = dict(TOP_K=4, BLOCK_K=4, BLOCK_T=block_t, BLOCK_E=block_e)\n"
        "    types = {'ids_ptr': '*i64', 'tokens': 'i32', 'num_experts': 'i32', 'stride_t': 'i32'}\n"
        "    sig = {n: 'constexpr' if n in const else types.get(n, '*fp32') for n in k.arg_names}\n"
        "    triton.compile(ASTSource(fn=k, signature=sig, constexprs=const), target=GPUTarget('cuda', 90, 32),\n"
        "                   options={'num_warps': 4})\n"
        "    print(k.__name__, block_e)\n"
        "k = r._router_gemv_topk_kernel\n"
        "for weight, sort in (('*bf16', False), ('*fp32', False), ('*bf16', True)):\n"
        "    const = dict(TOP_K=4, BLOCK_K=4, BLOCK_T=16, BLOCK_E=128, BLOCK_EP=32, BLOCK_H=64, STEPS=4, SPLITS=12,\n"
        "                 SORT=sort, HAS_MAP=True, SORT_BLOCK_R=64, SORT_BLOCK_E=256, BLOCK_M=16, SCHEDULE_BLOCK_T=128,\n"
        "                 TILE_STEPS=1, PDL=True)\n"
        "    types = {'x_ptr': '*bf16', 'w_ptr': weight, 'ticket_ptr': '*i32', 'ids_ptr': '*i64', 'map_ptr': '*i32',\n"
        "             'weights_ptr': '*fp32', 'sorted_weight_ptr': '*fp32', 'partial_ptr': '*fp32', 'bias_ptr': '*fp32'}\n"
        "    sig = {n: 'constexpr' if n in const else types.get(n, 'i32' if not n.endswith('_ptr') else '*i32')\n"
        "           for n in k.arg_names}\n"
        "    triton.compile(ASTSource(fn=k, signature=sig, constexprs=const), target=GPUTarget('cuda', 90, 32),\n"
        "                   options={'num_warps': 8 if sort else 4, 'launch_pdl': True})\n"
        "    print(k.__name__, weight)\n")
    stdout = run_compiler_script("-c", script)
    assert len(stdout.split()) == 2 * 2 * 5 + 2 * 2 + 3 * 2, stdout


def _torch_topk_softmax(logits, bias, k):
    top, ids = torch.topk(logits + bias, k, dim=-1)
    return torch.softmax(top, dim=-1), ids


@pytest.mark.parametrize("tokens,num_experts,top_k", [(0, 8, 2), (1, 128, 4), (7, 6, 6), (33, 32, 4),
                                                      (300, 128, 4), (65, 12, 1), (9, 5, 3)])
def test_router_topk_kernel_matches_torch(tokens, num_experts, top_k):
    # The fused bias + top-k + softmax (run here by the interpreter) against torch.topk and
    # torch.softmax on random logits (no ties): the same experts in the same order, the same
    # weights to float32 rounding; outputs poisoned first (a row the kernel skips fails).
    from mxfp4_moe.kernels.router_topk import router_topk
    gen = torch.Generator().manual_seed(tokens + num_experts)
    logits = torch.randn(tokens, num_experts + 3, generator=gen)[:, :num_experts]    # a row stride != E
    bias = torch.randn(num_experts, generator=gen)
    out = (torch.full((tokens, top_k), float("nan")), torch.full((tokens, top_k), -1, dtype=torch.int64))
    weights, ids = router_topk(logits, bias, top_k, out=out)
    assert weights is out[0] and ids is out[1]
    want_weights, want_ids = _torch_topk_softmax(logits, bias, top_k)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)


def test_router_topk_kernel_ties_infinities_and_nan():
    # Equal logits: the lower expert id first. A row of -inf: still k distinct experts (NaN
    # weights, as torch.softmax gives). A NaN logit: chosen first, as torch.topk does, and the
    # row's weights NaN, so it cannot pass for a routing. No id is ever out of range.
    from mxfp4_moe.kernels.router_topk import router_topk
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, -1.0],
                           [float("-inf")] * 6,
                           [0.5, 2.0, float("nan"), 1.0, -2.0, 0.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    bias = torch.zeros(6)
    weights, ids = router_topk(logits, bias, 3)
    assert ids[0].tolist() == [1, 2, 4] and torch.allclose(weights[0], torch.full((3,), 1 / 3))
    assert sorted(ids[1].tolist()) == [0, 1, 2] and torch.isnan(weights[1]).all()
    assert ids[2, 0].item() == 2 and len(set(ids[2].tolist())) == 3 and torch.isnan(weights[2]).all()
    assert ids[3].tolist() == [0, 1, 2]
    assert bool(((ids >= 0) & (ids < 6)).all())
    with pytest.raises(ValueError, match="top_k"):
        router_topk(logits, bias, 7)
    with pytest.raises(ValueError, match="float32"):
        router_topk(logits.double(), bias, 2)


def test_route_uses_the_fused_topk_where_triton_runs():
    # Under the interpreter (and on CUDA) route takes the fused kernel; its result equals the
    # torch path's on the same logits.
    from mxfp4_moe.routing import _use_triton
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(20, 64, generator=gen), torch.randn(8, 64, generator=gen), torch.randn(8, generator=gen)
    weights, ids = route(x, weight, bias, 4)
    want_weights, want_ids = _torch_topk_softmax(x @ weight.T, bias, 4)
    assert _use_triton(x.device)              # the CPU tests run under TRITON_INTERPRET=1
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tokens,num_experts,hidden,top_k", [(1, 128, 2880, 4), (5, 32, 2880, 4), (16, 6, 96, 6),
                                                             (3, 4, 64, 2), (2, 200, 160, 3)])
def test_one_launch_router_matches_float64(tokens, num_experts, hidden, top_k):
    # The router GEMM, bias, top-k and softmax in one launch, its hidden columns split over
    # programs whose partial sums the last one adds: against float64 logits on random inputs,
    # with outputs poisoned before a second run of the same recorded launch (same workspace and
    # ticket counter, which the kernel must have put back to zero).
    from mxfp4_moe.kernels.launches import record_launches
    from mxfp4_moe.kernels.router_topk import router_gemv_topk
    gen = torch.Generator().manual_seed(tokens * num_experts)
    x = torch.randn(tokens, hidden, generator=gen)
    weight = torch.randn(num_experts, hidden + 32, generator=gen)[:, :hidden + 16]     # wider than x, row stride
    bias = torch.randn(num_experts, generator=gen)
    with record_launches() as launches:
        weights, ids = router_gemv_topk(x, weight, bias, top_k)
    logits = x.double() @ weight[:, :hidden].double().T + bias.double()
    want_top, want_ids = torch.topk(logits, top_k, dim=-1)
    for _ in range(2):
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights.double(), torch.softmax(want_top, dim=-1), rtol=1e-5, atol=1e-6)
        weights.fill_(float("nan"))
        ids.fill_(-1)
        (launch,) = launches
        launch.replay()
    assert int(launch.values[launch.parameter_names.index("ticket_ptr")].item()) == 0


def test_one_launch_router_refuses_what_it_cannot_take():
    from mxfp4_moe.kernels.router_topk import ROUTER_GEMV_MAX_TOKENS, router_gemv_topk
    x, weight, bias = torch.randn(2, 64), torch.randn(8, 64), torch.randn(8)
    for bad in ((torch.randn(ROUTER_GEMV_MAX_TOKENS + 1, 64), weight, bias, 2), (x, weight[:, :32], bias, 2),
                (x, weight.bfloat16(), bias, 2), (x, weight, bias.double(), 2), (x, weight, bias, 9)):
        with pytest.raises(ValueError, match="router_gemv_topk"):
            router_gemv_topk(*bad)


@pytest.mark.parametrize("tokens,num_experts,hidden,local,block_m", [
    (1, 128, 2880, None, 16),           # decode at gpt-oss-120b's expert count
    (16, 128, 160, None, 16),           # 64 pairs: the most one sort program holds at 128 experts
    (3, 32, 96, None, 32),
    (16, 256, 64, None, 16),            # 64 pairs over 256 experts: two chunks, the sort's own launches
    (7, 12, 64, [1, 4, 5, 11], 16),     # expert parallelism: other ranks' pairs sort last
    (5, 6, 64, [], 16),                 # no local expert: every pair dropped
])
def test_route_with_metadata_in_one_launch_matches_route_then_metadata(tokens, num_experts, hidden, local, block_m):
    # The one-launch router's last program also sorting the pairs and laying out the tiles
    # (`router_gemv_topk_sort`, taken wherever the sort fits one program) against `route` then
    # `routing_metadata` on the same inputs, with the sort's outputs poisoned before a replay of
    # the recorded launch: every field equal, exactly.
    from mxfp4_moe.kernels.expert_sort import fits_one_chunk
    from mxfp4_moe.kernels.launches import record_launches
    from mxfp4_moe.routing import route_with_metadata
    top_k = 4
    gen = torch.Generator().manual_seed(tokens * num_experts + hidden)
    x = torch.randn(tokens, hidden, generator=gen)
    weight, bias = torch.randn(num_experts, hidden, generator=gen), torch.randn(num_experts, generator=gen)
    if local is None:
        expert_map, num_local = None, num_experts
    else:
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(len(local), dtype=torch.int32)
        num_local = max(1, len(local))
    with record_launches() as launches:
        topk_w, topk_ids, meta = route_with_metadata(x, weight, bias, top_k, router_weight_bf16=None,
                                                      expert_map=expert_map, num_local_experts=num_local,
                                                      block_m=block_m)
    fused = fits_one_chunk(tokens * top_k, num_local)
    assert len(launches) == (1 if fused else 5), [launch.kernel.__name__ for launch in launches]   # router, sort, schedule
    want_w, want_ids = route(x, weight, bias, top_k)
    want = routing_metadata(want_ids, expert_map, num_local, block_m, want_w)
    fields = ("sorted_token", "sorted_slot", "sorted_weight", "inverse", "expert_counts", "expert_offsets",
              "tile_expert", "tile_row_start")
    for replay in (False, True):
        if replay:
            for name in fields:
                getattr(meta, name).fill_(-7)
            topk_w.fill_(float("nan"))
            launches[0].replay()
            if not fused:
                for launch in launches[1:]:
                    launch.replay()
        assert torch.equal(topk_ids, want_ids)
        torch.testing.assert_close(topk_w, want_w, rtol=1e-5, atol=1e-6)
        for name in fields:
            got, expected = getattr(meta, name), getattr(want, name)
            assert got.dtype == expected.dtype and torch.equal(got, expected), name
