"""ShardPlan: the TP block split, expert placement, alignment presets and bad plans.

Expected numbers are written out by hand from FORMAT.md section 3 (vLLM's split and the engines'
alignments), not recomputed with the plan's own formulas.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mxfp4_moe.sharding import ALIGN_PRESETS, ShardPlan, expert_placement, tp_block_range

GPT_OSS = dict(num_experts=128, hidden=2880, inter=2880)


def _inters(tp_size, **kw):
    return [p.inter for p in ShardPlan.all_ranks(tp_size=tp_size, **kw)]


# ---- the TP split of I in 32-wide blocks ---------------------------------------------------------

@pytest.mark.parametrize("tp, expected", [
    (1, [2880]),
    (2, [1440, 1440]),                       # 90 blocks: 45 each
    (3, [960, 960, 960]),
    (4, [736, 736, 736, 672]),               # ceil(90/4) = 23 blocks; the last rank gets 21
    (8, [384] * 7 + [192]),                  # ceil(90/8) = 12 blocks; the last rank gets 6
], ids=["tp1", "tp2", "tp3", "tp4-last-rank-fewer", "tp8-last-rank-fewer"])
def test_gpt_oss_block_split(tp, expected):
    assert _inters(tp, **GPT_OSS) == expected


def test_gpt_oss_block_ranges_tp4():
    plans = ShardPlan.all_ranks(tp_size=4, **GPT_OSS)
    assert [(p.block_start, p.block_stop) for p in plans] == [(0, 23), (23, 46), (46, 69), (69, 90)]
    # Interleaved gate/up: rank owning I-elements [a, b) reads w13 rows [2a, 2b).
    assert [p.w13_rows for p in plans] == [slice(0, 1472), slice(1472, 2944), slice(2944, 4416),
                                           slice(4416, 5760)]


def test_offsets_come_from_checkpoint_dims_not_padded_sizes():
    # vLLM issue #43865: I 1536 at TP 4, padded to 512 per rank. Rank r's slice starts at
    # r * 384 (the checkpoint's share), not r * 512 (the padded size).
    plans = ShardPlan.all_ranks(num_experts=4, hidden=256, inter=1536, tp_size=4, align=(32, 256))
    assert {p.inter_pad for p in plans} == {512}
    assert [(p.inter_start, p.inter_stop) for p in plans] == [(0, 384), (384, 768), (768, 1152), (1152, 1536)]
    assert [p.read_ranges()["w2_blocks"][0][2] for p in plans] == [slice(0, 12), slice(12, 24),
                                                                   slice(24, 36), slice(36, 48)]


# ---- padding presets --------------------------------------------------------------------------------

@pytest.mark.parametrize("align, hidden_pad, inter_pad", [
    ("none", 2880, 736),                     # just the block: 736 is 23 blocks
    ("triton", 2880, 768),                   # I per rank to 64, H unpadded (FORMAT.md's example)
    ("marlin", 3072, 768),                   # H to 256, I to 128
    ("flashinfer-cutlass", 2944, 768),       # H and I to 128: 2880 -> 23 * 128
    ("trtllm", 3072, 768),                   # H and I to 256
    ((64, 512), 2880, 1024),                 # explicit (h_align, i_align)
], ids=lambda v: str(v))
def test_alignment_presets_gpt_oss_tp4(align, hidden_pad, inter_pad):
    for plan in ShardPlan.all_ranks(tp_size=4, align=align, **GPT_OSS):
        assert (plan.hidden, plan.hidden_pad, plan.inter_pad) == (2880, hidden_pad, inter_pad)
    # Every TP rank has the same padded size: the last rank (672) carries the extra padding.
    assert ShardPlan.create(tp_size=4, tp_rank=3, align=align, **GPT_OSS).inter == 672


def test_preset_table():
    assert ALIGN_PRESETS == {"none": (32, 32), "triton": (32, 64), "marlin": (256, 128),
                             "flashinfer-cutlass": (128, 128), "trtllm": (256, 256)}


def test_explicit_hidden_pad_deepep():
    # The DeepEP case: H 2688 padded to 3072; I 896 per rank (TP 4 of 3584) padded to 1024.
    plan = ShardPlan.create(num_experts=8, hidden=2688, inter=3584, tp_size=4, tp_rank=3,
                            align="trtllm", hidden_pad=3072)
    assert (plan.hidden, plan.hidden_pad, plan.inter, plan.inter_pad) == (2688, 3072, 896, 1024)
    assert plan.w13_rows == slice(2 * 2688, 2 * 3584)


# ---- expert placement --------------------------------------------------------------------------------

@pytest.mark.parametrize("placement, expected", [
    ("linear", [(0, 1, 2), (3, 4, 5), (6, 7), (8, 9)]),           # 10 % 4 = 2: ranks 0, 1 get one more
    ("round-robin", [(0, 4, 8), (1, 5, 9), (2, 6), (3, 7)]),
], ids=["linear-E10-ep4", "round-robin-E10-ep4"])
def test_placement_uneven(placement, expected):
    plans = ShardPlan.all_ranks(num_experts=10, hidden=64, inter=64, ep_size=4, placement=placement)
    assert [p.local_experts for p in plans] == expected


def test_expert_map_and_runs():
    plan = ShardPlan.create(num_experts=10, hidden=64, inter=64, ep_size=4, ep_rank=1, placement="round-robin")
    assert plan.expert_map.tolist() == [-1, 0, -1, -1, -1, 1, -1, -1, -1, 2]
    assert plan.expert_map.dtype == torch.int64
    assert plan.expert_runs() == ((1, 2, 0), (5, 6, 1), (9, 10, 2))
    linear = ShardPlan.create(num_experts=10, hidden=64, inter=64, ep_size=4, ep_rank=1)
    assert linear.expert_runs() == ((3, 6, 0),)
    assert linear.expert_map.tolist() == [-1, -1, -1, 0, 1, 2, -1, -1, -1, -1]


def test_tp_times_ep():
    # EP picks the experts, TP slices I within them; global rank = ep_rank * tp_size + tp_rank.
    plans = ShardPlan.all_ranks(num_experts=6, hidden=64, inter=128, tp_size=2, ep_size=3)
    assert [(p.ep_rank, p.tp_rank, p.local_experts, p.inter_start, p.inter_stop) for p in plans] == [
        (0, 0, (0, 1), 0, 64), (0, 1, (0, 1), 64, 128), (1, 0, (2, 3), 0, 64), (1, 1, (2, 3), 64, 128),
        (2, 0, (4, 5), 0, 64), (2, 1, (4, 5), 64, 128)]
    assert [p.includes_w2_bias for p in plans] == [True, False] * 3


def test_read_ranges_w2_bias_on_tp_rank0_only():
    r0, r1 = ShardPlan.all_ranks(num_experts=4, hidden=64, inter=128, tp_size=2)
    assert r0.read_ranges()["w2_bias"] == ((slice(0, 4),),)
    assert r1.read_ranges()["w2_bias"] == ()
    assert r1.read_ranges()["router_weight"] == ((slice(None),),)   # replicated on every rank


@settings(max_examples=200, deadline=None)
@given(blocks=st.integers(1, 200), tp=st.integers(1, 16), experts=st.integers(1, 40), ep=st.integers(1, 8),
       placement=st.sampled_from(["linear", "round-robin"]))
def test_every_block_and_expert_owned_exactly_once(blocks, tp, experts, ep, placement):
    owned_blocks = []
    for r in range(tp):
        start, stop = tp_block_range(blocks, tp, r)
        assert stop - start <= -(-blocks // tp)
        owned_blocks += range(start, stop)
    assert owned_blocks == list(range(blocks))                  # in order, no gap, no overlap
    owned_experts = sorted(g for r in range(ep) for g in expert_placement(experts, ep, r, placement))
    assert owned_experts == list(range(experts))
    counts = [len(expert_placement(experts, ep, r, placement)) for r in range(ep)]
    assert max(counts) - min(counts) <= 1


# ---- bad plans: each a clear error -----------------------------------------------------------------

BASE = dict(num_experts=8, hidden=256, inter=512)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tp_size=4, tp_rank=4), r"tp_rank 4 out of range for tp_size 4 \(expected 0..3\)"),
    (dict(tp_size=2, tp_rank=-1), r"tp_rank must be >= 0, got -1"),
    (dict(ep_size=3, ep_rank=3), r"ep_rank 3 out of range for ep_size 3"),
    (dict(tp_size=0), r"tp_size must be >= 1"),
    (dict(placement="random"), r"placement must be one of"),
    (dict(align="cutlass"), r"unknown alignment preset 'cutlass'"),
    (dict(align=(32, 48)), r"i_align must be a multiple of the MXFP4 block size 32, got 48"),
    (dict(hidden_pad=224), r"hidden_pad 224 must be >= hidden 256"),
    (dict(hidden_pad=272), r"hidden_pad 272 must be >= hidden 256 and a multiple of 32"),
    (dict(hidden=250), r"hidden size 250 is not a multiple of the MXFP4 block size 32"),
    (dict(inter=100), r"inter size 100 is not a multiple"),
    # I = 512 is 16 blocks; at TP 12 that is 2 per rank, filling ranks 0..7 only.
    (dict(tp_size=12, tp_rank=9), r"tp_rank 9 of 12 would own no intermediate blocks.*ranks 0..7.*allow_empty"),
    (dict(ep_size=9, ep_rank=8), r"ep_rank 8 of 9 would hold no experts"),
], ids=["tp-rank-too-big", "tp-rank-negative", "ep-rank-too-big", "tp-size-zero", "bad-placement",
        "bad-preset", "align-not-block-multiple", "hidden-pad-too-small", "hidden-pad-not-block-multiple",
        "hidden-not-block-multiple", "inter-not-block-multiple", "rank-without-blocks", "rank-without-experts"])
def test_bad_plans(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShardPlan.create(**{**BASE, **kwargs})


def test_non_int_rank_is_type_error():
    with pytest.raises(TypeError, match="tp_rank must be an int"):
        ShardPlan.create(**BASE, tp_size=2, tp_rank=1.0)


def test_allow_empty_rank():
    plan = ShardPlan.create(**BASE, tp_size=12, tp_rank=9, allow_empty=True)
    assert (plan.inter, plan.inter_pad) == (0, 64)       # all padding, same shape as its peers
    assert plan.w13_rows == slice(1024, 1024)
    empty_ep = ShardPlan.create(**BASE, ep_size=9, ep_rank=8, allow_empty=True)
    assert empty_ep.local_experts == () and empty_ep.read_ranges()["w13_blocks"] == ()
    assert (empty_ep.expert_map == -1).all()
