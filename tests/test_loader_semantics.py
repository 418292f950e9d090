"""Sharding preserves the layer's function: in float64, the TP ranks' partial outputs (w2 bias on
rank 0 only) sum to the unsharded output, and the EP ranks' outputs sum to it too, whatever the
padding. The unsharded load itself is checked against the MoE formula of FORMAT.md section 2
evaluated straight on the checkpoint's tensors.

Tolerance: 1e-9 relative (Frobenius), float64 throughout. Sharding only reorders the sum over
the intermediate dim (and adds exact zeros from padding), so the differences are float64
rounding, around 1e-15.
"""

import pytest
import torch

from mxfp4_moe.checkpoint import open_checkpoint
from mxfp4_moe.loader import load_layer
from mxfp4_moe.mxfp4 import dequantize
from mxfp4_moe.reference import reference_moe
from mxfp4_moe.routing import route
from mxfp4_moe.sharding import ShardPlan
from mxfp4_moe.synthetic import make_synthetic_checkpoint

E, H, I, TOP_K, TOKENS = 6, 320, 736, 2, 24       # I = 23 blocks: uneven at every TP > 1
RTOL = 1e-9


# Fixtures from conftest.py: one torch thread, and loader destinations poisoned so an element
# the loader forgot to write fails.
pytestmark = pytest.mark.usefixtures("one_torch_thread", "poisoned_loader_destinations")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_synthetic_checkpoint(tmp_path_factory.mktemp("sem"), num_layers=1, num_experts=E, hidden=H,
                                     intermediate=I, top_k=TOP_K, seed=11, channel_scales=True)
    return open_checkpoint(path)


@pytest.fixture(scope="module")
def tokens():
    return torch.randn(TOKENS, H, generator=torch.Generator().manual_seed(12), dtype=torch.float64)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def formula_from_checkpoint(checkpoint, x, topk_weights, topk_ids):
    """FORMAT.md's MoE forward on the checkpoint tensors read whole (no plan, no padding), float64."""
    t = {k: v.read_all() for k, v in checkpoint.layer(0).tensors().items()}
    cfg = checkpoint.config
    w13 = dequantize(t["w13_blocks"], t["w13_scales"], torch.float64)          # [E, 2I, H]
    w2 = dequantize(t["w2_blocks"], t["w2_scales"], torch.float64)             # [E, H, I]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for tok in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = topk_ids[tok, k].item()
            h = (w13[e] @ x[tok]) * t["w13_channel_scale"][e].double() + t["w13_bias"][e].double()
            gate = h[0::2].clamp(max=cfg.swiglu_limit)
            up = h[1::2].clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
            a = gate * torch.sigmoid(cfg.swiglu_alpha * gate) * (up + 1)
            o = (w2[e] @ a) * t["w2_channel_scale"][e].double() + t["w2_bias"][e].double()
            out[tok] += topk_weights[tok, k].double() * o
    return out


@pytest.fixture(scope="module")
def unsharded(checkpoint, tokens):
    w = load_layer(checkpoint, 0, ShardPlan.create(num_experts=E, hidden=H, inter=I))
    topk_weights, topk_ids = route(tokens, w.router_weight, w.router_bias, TOP_K)
    return topk_weights, topk_ids, reference_moe(tokens, w, topk_weights, topk_ids, torch.float64)


def test_unsharded_load_matches_the_formula(checkpoint, tokens, unsharded):
    topk_weights, topk_ids, y = unsharded
    assert rel_err(y, formula_from_checkpoint(checkpoint, tokens, topk_weights, topk_ids)) < RTOL
    # Not a vacuous comparison: the layer's output is far from zero and uses several experts.
    assert y.norm() > 1 and topk_ids.unique().numel() >= 4


@pytest.mark.parametrize("tp, ep, placement, align, hidden_pad", [
    (2, 1, "linear", "none", None),
    (4, 1, "linear", "triton", None),                    # 192 x 3, 160: padded to 192
    (8, 1, "linear", "marlin", None),                    # 96 x 7, 64; H 320 -> 512
    (3, 1, "linear", "flashinfer-cutlass", None),
    (1, 4, "linear", "trtllm", None),                    # E 6 over 4: 2, 2, 1, 1
    (1, 4, "round-robin", "none", None),
    (3, 2, "round-robin", "trtllm", 1024),               # TP x EP, explicit hidden pad
    (4, 3, "linear", (64, 256), None),
], ids=["tp2", "tp4-triton", "tp8-marlin", "tp3-flashinfer", "ep4-trtllm", "ep4-rr",
        "tp3-ep2-rr-hidden-pad", "tp4-ep3-explicit-align"])
def test_ranks_sum_to_unsharded(checkpoint, tokens, unsharded, tp, ep, placement, align, hidden_pad):
    topk_weights, topk_ids, y = unsharded
    total = torch.zeros_like(y)
    biases = 0
    for plan in ShardPlan.all_ranks(num_experts=E, hidden=H, inter=I, tp_size=tp, ep_size=ep,
                                    placement=placement, align=align, hidden_pad=hidden_pad):
        w = load_layer(checkpoint, 0, plan)
        # Each rank routes with its own (replicated, padded) router: the same choice everywhere.
        rank_weights, rank_ids = route(tokens, w.router_weight, w.router_bias, TOP_K)
        assert torch.equal(rank_ids, topk_ids) and torch.equal(rank_weights, topk_weights)
        total += reference_moe(tokens, w, topk_weights, topk_ids, torch.float64)
        biases += w.w2_bias_included
    assert biases == ep                          # w2's bias once per EP group's TP sum
    assert rel_err(total, y) < RTOL


def test_one_tp_rank_alone_is_not_the_layer(checkpoint, tokens, unsharded):
    # The comparison above can fail: a single TP rank's partial sum is far from the full output.
    topk_weights, topk_ids, y = unsharded
    w = load_layer(checkpoint, 0, ShardPlan.create(num_experts=E, hidden=H, inter=I, tp_size=2, tp_rank=1))
    assert rel_err(reference_moe(tokens, w, topk_weights, topk_ids, torch.float64), y) > 0.1
