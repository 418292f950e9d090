"""Routing on a GPU: the Triton counting sort against torch's stable sort, exactly, and the bf16
router GEMM against float32 routing. Run on a CUDA machine with `pytest -m gpu`; skipped elsewhere.
"""

import pytest
import torch

from mxfp4_moe.routing import route

pytestmark = pytest.mark.gpu


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("tokens,num_experts,local", [(1, 128, None), (4, 128, None), (5, 128, None),
                                                      (16, 128, None), (64, 32, None),
                                                      (8192, 128, None), (8192, 32, None),
                                                      (3000, 128, list(range(0, 128, 3)))])
def test_expert_sort_matches_torch_on_gpu(tokens, num_experts, local):
    # The Triton counting sort of routing_metadata against torch's stable sort, exactly, at
    # gpt-oss sizes (32768 pairs: 128 chunks at 128 experts) and under expert parallelism.
    from mxfp4_moe.kernels.expert_sort import expert_sort, sort_and_schedule
    from mxfp4_moe.routing import expert_sort_torch, max_tiles, tile_schedule_torch
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    logits = torch.randn(tokens, num_experts, generator=gen, device="cuda")
    topk_w, topk_ids = torch.topk(logits, 4, dim=-1)
    expert_map, num_local = None, num_experts
    if local is not None:
        expert_map = torch.full((num_experts,), -1, dtype=torch.int64, device="cuda")
        expert_map[local] = torch.arange(len(local), device="cuda")
        num_local = len(local)
    got = expert_sort(topk_ids, expert_map, num_local, topk_w.softmax(-1))
    want = expert_sort_torch(topk_ids, expert_map, num_local, topk_w.softmax(-1))
    for name, g, w in zip(("sorted_slot", "sorted_token", "sorted_weight", "inverse", "offsets"), got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name
    # routing_metadata's path: up to 16 tokens at 128 experts and 64 at 32, the sort and the
    # tile schedule in one launch (a schedule step of 16, 32 or 64 tiles).
    n_tiles = max_tiles(tokens * 4, num_local, 16)
    got = sort_and_schedule(topk_ids, expert_map, num_local, topk_w.softmax(-1), n_tiles, 16)
    want = (*want, *tile_schedule_torch(want[4], n_tiles, 16))
    for name, g, w in zip(("sorted_slot", "sorted_token", "sorted_weight", "inverse", "offsets", "counts",
                           "tile_expert", "tile_row_start"), got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w), name


def test_route_bf16_gemm_matches_float32():
    # On the GPU, bf16 x and a bf16-exact router weight route through one bf16 GEMM with float32
    # output: the same exact products as the float32 path, summed in another order.
    from mxfp4_moe.routing import _bf16_gemm_fp32_out, exact_bf16
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(128, 2880, generator=gen, device="cuda") / 2880 ** 0.5).bfloat16().float()
    bias = torch.randn(128, generator=gen, device="cuda")
    x = torch.randn(8192, 2880, generator=gen, device="cuda").bfloat16()
    assert _bf16_gemm_fp32_out(x.device), "torch.mm(..., out_dtype=torch.float32) is missing: route stays float32"
    fast_w, fast_ids = route(x, weight, bias, 4, router_weight_bf16=exact_bf16(weight))
    ref_w, ref_ids = route(x, weight, bias, 4)
    same = (fast_ids == ref_ids).all(-1)
    assert same.float().mean() > 0.999          # a near-tie may swap two experts' order
    assert rel_err(fast_w[same], ref_w[same]) < 1e-5


@pytest.mark.parametrize("num_experts", [32, 128])
@pytest.mark.parametrize("bf16_weight", [True, False])
def test_one_launch_router_matches_float64_on_gpu(num_experts, bf16_weight, monkeypatch):
    # At up to 16 tokens route runs the router GEMM and the top-k in one launch (bf16 operands
    # with a bf16-exact weight, float32 otherwise): against float64 logits of the same values,
    # every token whose k-th and next logits are not within float32 rounding of each other.
    from mxfp4_moe import routing
    from mxfp4_moe.routing import exact_bf16, one_launch_router
    monkeypatch.setattr(routing, "ONE_LAUNCH_ROUTER_ON_CUDA", True)
    gen = torch.Generator(device="cuda").manual_seed(num_experts)
    weight = (torch.randn(num_experts, 2880, generator=gen, device="cuda") / 2880 ** 0.5).bfloat16().float()
    bias = torch.randn(num_experts, generator=gen, device="cuda")
    for tokens in (1, 2, 7, 16):
        x = torch.randn(tokens, 2880, generator=gen, device="cuda").bfloat16()
        assert one_launch_router(x, num_experts)
        for _ in range(2):          # the ticket counter is back at zero after each launch
            got_w, got_ids = route(x, weight, bias, 4, router_weight_bf16=exact_bf16(weight) if bf16_weight else None)
        logits = x.double() @ weight.double().T + bias.double()
        top, ids = torch.topk(logits, 5, dim=-1)
        clear = (top[:, 3] - top[:, 4]) > 1e-4
        assert torch.equal(got_ids[clear], ids[clear, :4])
        assert rel_err(got_w[clear], torch.softmax(top[clear, :4], -1)) < 1e-5
