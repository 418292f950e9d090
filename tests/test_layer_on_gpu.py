"""The MoE layer on a GPU (bf16 kernels): against transformers' GptOssMLP and the float32
reference at gpt-oss and small shapes, one copy of the expert weights on Hopper, CUDA-graph capture
(`CUDAGraphMoE` included) and torch.compile. Run on a CUDA machine with `pytest -m gpu`; skipped
elsewhere. Tolerance: relative Frobenius error < 5e-3 (bf16).
"""

import pytest
import torch

from mxfp4_moe.moe import MXFP4MoE
from mxfp4_moe.synthetic import random_expert_weights
from mxfp4_moe.routing import route

pytestmark = pytest.mark.gpu

TOL_BF16 = 5e-3


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("tokens", [64, 512])
def test_layer_vs_transformers_gpt_oss_mlp(tokens):
    pytest.importorskip("transformers")
    from mxfp4_moe.verify.oracle import build_transformers_moe
    E, H, I, k = 32, 2880, 2880, 4
    weights, _ = random_expert_weights(E, H, I, top_k=k, seed=tokens, device="cuda", dense=False)
    mlp = build_transformers_moe(weights, device="cuda")
    x = torch.randn(tokens, H, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        expected = mlp(x.float().unsqueeze(0))[0][0]
    y = MXFP4MoE(weights, backend="auto")(x)
    assert y.dtype == torch.bfloat16
    err = rel_err(y, expected)
    print(f"layer vs GptOssMLP T={tokens}: {err:.2e}")
    assert err < TOL_BF16


def test_layer_cuda_graph_replay_matches_eager():
    # No host synchronisation in forward: it captures into a CUDA graph, and replays agree.
    weights, _ = random_expert_weights(32, 2880, 2880, top_k=4, seed=1, device="cuda", dense=False)
    layer = MXFP4MoE(weights, backend="triton", combine="slots")
    x = torch.randn(100, 2880, device="cuda").to(torch.bfloat16)
    eager = layer(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(x)
    x.copy_(torch.randn(100, 2880, device="cuda").to(torch.bfloat16))
    graph.replay()
    assert rel_err(captured, layer(x)) < 1e-6   # slots combine: deterministic
    assert rel_err(captured, eager) > 1e-2      # new input really used


def test_layer_keeps_one_copy_of_the_expert_weights_on_hopper():
    # The default on Hopper: only the fragment-order copy stays (the checkpoint-order tensors are
    # freed once the caller drops them), the layer computes the same as one that keeps both,
    # and checkpoint_weights() rebuilds the checkpoint bytes exactly.
    from mxfp4_moe.moe import CHECKPOINT_ORDER_TENSORS
    from mxfp4_moe.reference import reference_moe
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the fragment-order copy is built on Hopper only")
    E, H, I = 32, 2880, 2880

    def build(keep):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        weights, _ = random_expert_weights(E, H, I, top_k=4, seed=11, device="cuda", dense=False)
        layer = MXFP4MoE(weights, backend="triton", keep_checkpoint_order=keep)
        del weights
        torch.cuda.synchronize()
        return layer, torch.cuda.memory_allocated() - before

    lean, lean_bytes = build(None)
    both, both_bytes = build(True)
    assert lean.fragments is not None and not lean.holds_checkpoint_order and both.holds_checkpoint_order
    checkpoint_bytes = sum(getattr(both.weights, name).numel() for name in CHECKPOINT_ORDER_TENSORS)
    print(f"layer memory: {lean_bytes / 2**20:.0f} MiB (fragment copy only) vs {both_bytes / 2**20:.0f} MiB "
          f"(both); checkpoint-order tensors {checkpoint_bytes / 2**20:.0f} MiB")
    assert abs((both_bytes - lean_bytes) - checkpoint_bytes) < 0.01 * checkpoint_bytes
    rebuilt = lean.checkpoint_weights()
    for name in CHECKPOINT_ORDER_TENSORS:
        assert torch.equal(getattr(rebuilt, name), getattr(both.weights, name)), name
    x = torch.randn(512, H, generator=torch.Generator(device="cuda").manual_seed(2), device="cuda")
    y_lean, y_both = lean(x), both(x)                 # float32 tokens: the lean layer casts them to bf16
    assert y_lean.dtype == torch.float32
    assert rel_err(y_lean, y_both) < 1e-3            # the same kernels; fp32 atomic order differs
    topk_w, topk_ids = route(x, both.weights.router_weight, both.weights.router_bias, 4,
                             router_weight_bf16=lean.router_weight_bf16)     # as forward routes
    ref = reference_moe(x.bfloat16().float(), rebuilt, topk_w, topk_ids, torch.float32)
    assert rel_err(y_lean, ref) < TOL_BF16


def test_graphed_layer_matches_the_layer_and_returns_fresh_tensors():
    # CUDAGraphMoE at bucket edges and past them (eager there), against the layer itself and a
    # float32 reference on the same routing; outputs must not alias the graph's buffer.
    from mxfp4_moe.graphs import CUDAGraphMoE
    from mxfp4_moe.reference import reference_moe
    weights, _ = random_expert_weights(32, 2880, 2880, top_k=4, seed=7, device="cuda", dense=False)
    layer = MXFP4MoE(weights, backend="triton", combine="slots")     # deterministic sum
    graphed = CUDAGraphMoE(layer, max_tokens=64)
    gen = torch.Generator(device="cuda").manual_seed(5)
    for tokens in (1, 3, 16, 17, 64, 65):
        x = torch.randn(tokens, 2880, generator=gen, device="cuda").to(torch.bfloat16)
        got = graphed(x)
        assert got.shape == (tokens, 2880) and got.dtype == torch.bfloat16
        topk_w, topk_ids = route(x, weights.router_weight, weights.router_bias, 4,
                                 router_weight_bf16=layer.router_weight_bf16)
        ref = reference_moe(x.float(), layer.checkpoint_weights(), topk_w, topk_ids, torch.float32)
        assert rel_err(got, ref) < TOL_BF16, tokens
        assert rel_err(got, layer(x)) < 5e-3, tokens        # other bucket size: other tiles, same sums
        if tokens > 64:
            assert torch.equal(got, layer(x))                  # past the buckets: the layer itself
    assert graphed.captured == (1, 4, 16, 32, 64)
    first_x = torch.randn(5, 2880, generator=gen, device="cuda").to(torch.bfloat16)
    first = graphed(first_x)
    kept = first.clone()
    graphed(torch.randn(6, 2880, generator=gen, device="cuda").to(torch.bfloat16))    # same bucket (8)
    assert torch.equal(first, kept)
    assert torch.equal(graphed(first_x), kept)               # zeroed tail rows: the same answer again


# Small and odd layer shapes (E, H, I, top_k, H_pad, I_pad): K loops of one step or a few, w2
# split-K down to one step per program, rows that fill no 16-row group, and TP shards.
SMALL_LAYERS = [
    pytest.param((1, 32, 32, 1, 32, 32), id="E1-H32-I32-one-block-each"),
    pytest.param((4, 64, 64, 2, 64, 64), id="E4-H64-I64-one-64-step"),
    pytest.param((4, 96, 64, 4, 96, 64), id="E4-H96-I64"),
    pytest.param((4, 64, 96, 2, 64, 128), id="E4-H64-I96-pad128"),
    pytest.param((4, 128, 128, 1, 128, 128), id="E4-H128-I128-top1"),
    pytest.param((8, 160, 96, 4, 160, 96), id="E8-H160-I96"),
    pytest.param((4, 64, 2880, 2, 64, 2880), id="E4-H64-I2880"),
    pytest.param((4, 2880, 64, 4, 2880, 64), id="E4-H2880-I64"),
    pytest.param((8, 256, 256, 2, 256, 256), id="E8-H256-I256"),
    pytest.param((8, 288, 352, 4, 288, 384), id="builtin-checkpoint-H288-I352-pad384"),
    # gpt-oss shards at high TP: I = 2880 / 90 = 32 per rank (one block), and TP 32's last ranks
    # with 2 blocks padded to the Triton alignment's 64 (a single K step of w2).
    pytest.param((32, 2880, 32, 4, 2880, 32), id="gpt-oss-20b-TP90-I32"),
    pytest.param((128, 2880, 64, 4, 2880, 64), id="gpt-oss-120b-TP32-I64"),
]


@pytest.mark.parametrize("shape", SMALL_LAYERS)
def test_layer_at_small_shapes_every_token_count(shape):
    # The whole layer (default kernels: "rs" on Hopper) against the float32 reference at every
    # token count from decode to prefill, and no kernel fell back to the portable one: each
    # fast kernel compiled and ran (the short-K-loop crash was a compile failure at T = 1).
    from mxfp4_moe.kernels.moe_matmul import kernel_fallbacks
    from mxfp4_moe.reference import reference_moe
    E, H, I, k, H_pad, I_pad = shape
    weights, _ = random_expert_weights(E, H, I, top_k=k, hidden_pad=H_pad, inter_pad=I_pad, seed=E + H + I,
                                       tp_rank=1 if I < 2880 and H == 2880 else 0, device="cuda", dense=False)
    layer = MXFP4MoE(weights, backend="triton")
    if torch.cuda.get_device_capability()[0] == 9:
        assert layer.fragments is not None         # the Hopper default: the "rs" kernel runs
    rebuilt = layer.checkpoint_weights()
    fallbacks_before = len(kernel_fallbacks())
    for tokens in (1, 2, 7, 40, 300):
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, H, generator=gen, device="cuda").to(torch.bfloat16)
        y = layer(x)
        topk_w, topk_ids = route(x, weights.router_weight, weights.router_bias, k,
                                 router_weight_bf16=layer.router_weight_bf16)
        ref = reference_moe(x.float(), rebuilt, topk_w, topk_ids, torch.float32)
        assert y.shape == (tokens, H) and y.dtype == torch.bfloat16
        err = rel_err(y, ref)
        assert err < TOL_BF16, (tokens, err)
    assert kernel_fallbacks()[fallbacks_before:] == []


@pytest.mark.parametrize("shape", [SMALL_LAYERS[0], SMALL_LAYERS[3], SMALL_LAYERS[5]],
                         ids=["E4-H64-I2880", "builtin", "gpt-oss-120b-TP32-I64"])
def test_layer_with_the_decode_experiments_on(shape, monkeypatch):
    # The one-launch router (its GEMM, top-k and expert sort in one launch) and w2's weights asked
    # into L2 during w13 (the "rs" kernel's L2_PREFETCH), both off by default until measured:
    # against the float32 reference at decode token counts, eager and through an eager plan.
    from mxfp4_moe import moe, routing
    from mxfp4_moe.kernels.moe_matmul import kernel_fallbacks
    from mxfp4_moe.reference import reference_moe
    monkeypatch.setattr(routing, "ONE_LAUNCH_ROUTER_ON_CUDA", True)
    monkeypatch.setattr(moe, "L2_PREFETCH_MAX_ROWS", 64)
    E, H, I, k, H_pad, I_pad = shape
    weights, _ = random_expert_weights(E, H, I, top_k=k, hidden_pad=H_pad, inter_pad=I_pad, seed=E + H + I + 1,
                                       tp_rank=1 if I < 2880 and H == 2880 else 0, device="cuda", dense=False)
    layer = MXFP4MoE(weights, backend="triton")
    rebuilt = layer.checkpoint_weights()
    fallbacks_before = len(kernel_fallbacks())
    for tokens in (1, 2, 7, 16):
        x = torch.randn(tokens, H, generator=torch.Generator(device="cuda").manual_seed(tokens),
                        device="cuda").to(torch.bfloat16)
        topk_w, topk_ids = route(x, weights.router_weight, weights.router_bias, k,
                                 router_weight_bf16=layer.router_weight_bf16)
        ref = reference_moe(x.float(), rebuilt, topk_w, topk_ids, torch.float32)
        for _ in range(3):                  # the plan's recording call, then two replays
            assert rel_err(layer(x), ref) < TOL_BF16, tokens
    assert kernel_fallbacks()[fallbacks_before:] == []


def test_layer_under_torch_compile_reduce_overhead_matches_eager():
    # The layer is one custom op to torch.compile (`mxfp4_moe.custom_ops`): it traces with no
    # graph break and CUDA-graph mode ("reduce-overhead") captures and replays it. The slots
    # combine is deterministic, so replays equal the eager output bit for bit.
    weights, _ = random_expert_weights(32, 2880, 2880, top_k=4, seed=5, device="cuda", dense=False)
    layer = MXFP4MoE(weights, backend="triton", combine="slots")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    for tokens in (1, 64):
        x = torch.randn(tokens, 2880, generator=torch.Generator(device="cuda").manual_seed(tokens),
                        device="cuda").to(torch.bfloat16)
        eager = layer(x)
        for _ in range(3):                      # warm-up, capture, replay
            out = compiled(x).clone()
        assert torch.equal(out, eager), tokens
