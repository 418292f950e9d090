"""load_layer and narrow_to_source: bit-exact reassembly over TP x EP x placement x alignment,
padding fill, bytes read, the named regressions of FORMAT.md section 3, unfused checkpoints,
and bad shapes.

The reference for every rank is built here from the checkpoint tensors read whole, with the
rank's offset taken as the sum of the previous TP ranks' unpadded shares: if the plan skipped,
overlapped or misplaced a slice, the concatenation would not give back the checkpoint.
"""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from mxfp4_moe.checkpoint import CheckpointError, MoEConfig, layer_tensor_names, open_checkpoint
from mxfp4_moe.loader import PAD_CHANNEL_SCALE, load_layer, narrow_to_source
from mxfp4_moe.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK, E8M0_NAN, PAD_SCALE_E8M0
from mxfp4_moe.sharding import ALIGN_PRESETS, ShardPlan
from mxfp4_moe.synthetic import LayerWeights, hf_config_dict, write_checkpoint
from mxfp4_moe.unfused import open_unfused_checkpoint, unfuse_checkpoint, write_unfused_checkpoint

# Fixtures from conftest.py: one torch thread, and loader destinations poisoned so an element
# the loader forgot to write fails.
pytestmark = pytest.mark.usefixtures("one_torch_thread", "poisoned_loader_destinations")


FIELDS = ("w13_blocks", "w13_scales", "w13_bias", "w2_blocks", "w2_scales", "w2_bias",
          "w13_channel_scale", "w2_channel_scale", "router_weight", "router_bias")


def random_layer(e, h, i, seed):
    """Random checkpoint tensors: every byte value for codes, finite scale bytes around 127,
    bf16 biases and router, float32 channel scales. Returns {field: tensor} (fused layout)."""
    g = torch.Generator().manual_seed(seed)
    u8 = dict(dtype=torch.uint8, generator=g)
    return {
        "w13_blocks": torch.randint(0, 256, (e, 2 * i, h // BLOCK_SIZE, BYTES_PER_BLOCK), **u8),
        "w13_scales": torch.randint(110, 140, (e, 2 * i, h // BLOCK_SIZE), **u8),
        "w13_bias": torch.randn(e, 2 * i, generator=g).to(torch.bfloat16),
        "w2_blocks": torch.randint(0, 256, (e, h, i // BLOCK_SIZE, BYTES_PER_BLOCK), **u8),
        "w2_scales": torch.randint(110, 140, (e, h, i // BLOCK_SIZE), **u8),
        "w2_bias": torch.randn(e, h, generator=g).to(torch.bfloat16),
        "router_weight": torch.randn(e, h, generator=g).to(torch.bfloat16),
        "router_bias": torch.randn(e, generator=g).to(torch.bfloat16),
        "w13_channel_scale": torch.exp2(torch.rand(e, 2 * i, generator=g) * 2 - 1),
        "w2_channel_scale": torch.exp2(torch.rand(e, h, generator=g) * 2 - 1),
    }


def write_with_synthetic(path, tensors, top_k=2, shards=1):
    """A one-layer checkpoint through the project's writer (channel scales written [E, out])."""
    e, two_i, hb, _ = tensors["w13_blocks"].shape
    config = MoEConfig(num_layers=1, num_experts=e, experts_per_token=top_k, hidden_size=hb * BLOCK_SIZE,
                       intermediate_size=two_i // 2)
    write_checkpoint(path, config, [LayerWeights(**tensors)], shards=shards)
    return open_checkpoint(path)


def write_raw(path, tensors, top_k=2):
    """A one-layer HF-layout checkpoint written with safetensors directly, so the w13 channel
    scale can take the [E, 2I, 1] shape the project's writer does not produce."""
    e, two_i, hb, _ = tensors["w13_blocks"].shape
    config = MoEConfig(num_layers=1, num_experts=e, experts_per_token=top_k, hidden_size=hb * BLOCK_SIZE,
                       intermediate_size=two_i // 2)
    path.mkdir(parents=True, exist_ok=True)
    names = layer_tensor_names("hf", 0)
    save_file({names[k]: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config_dict(config)))
    return open_checkpoint(path)


# ---- checkpoints (module scope: written once) ---------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    # E 7 (prime: uneven EP), H 320 (padded by marlin/trtllm/flashinfer), I 736 = 23 blocks
    # (uneven at every TP > 1). w13 channel scale [E, 2I, 1], w2 channel scale [E, H].
    t = random_layer(7, 320, 736, seed=1)
    t["w13_channel_scale"] = t["w13_channel_scale"].unsqueeze(-1)
    return write_raw(tmp_path_factory.mktemp("small"), t), t


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    # gpt-oss sizes (H = I = 2880, 90 blocks) with few experts, sharded over two files.
    t = random_layer(5, 2880, 2880, seed=2)
    return write_with_synthetic(tmp_path_factory.mktemp("gpt_oss"), t, shards=2), t


@pytest.fixture(scope="module")
def deepep(tmp_path_factory):
    # H 2688 (padded to 3072 explicitly), I 3584 = 4 x 896 (padded to 1024 per rank).
    t = random_layer(5, 2688, 3584, seed=3)
    return write_with_synthetic(tmp_path_factory.mktemp("deepep"), t), t


@pytest.fixture(scope="module")
def i1536(tmp_path_factory):
    t = random_layer(3, 256, 1536, seed=4)
    return write_with_synthetic(tmp_path_factory.mktemp("i1536"), t), t


# ---- the reference ------------------------------------------------------------------------------------

def expected_rank(full, plan, offset, n):
    """What the rank holding experts plan.local_experts and I-elements [offset, offset + n) must
    hold, padded to the plan's sizes with the documented fill."""
    ex = list(plan.local_experts)
    el, hp, ip = len(ex), plan.hidden_pad, plan.inter_pad
    e, two_i, hb, _ = full["w13_blocks"].shape
    h = hb * BLOCK_SIZE
    rows = slice(2 * offset, 2 * (offset + n))
    blocks = slice(offset // BLOCK_SIZE, (offset + n) // BLOCK_SIZE)
    out = {
        "w13_blocks": torch.zeros(el, 2 * ip, hp // 2, dtype=torch.uint8),
        "w13_scales": torch.full((el, 2 * ip, hp // BLOCK_SIZE), PAD_SCALE_E8M0, dtype=torch.uint8),
        "w13_bias": torch.zeros(el, 2 * ip),
        "w2_blocks": torch.zeros(el, hp, ip // 2, dtype=torch.uint8),
        "w2_scales": torch.full((el, hp, ip // BLOCK_SIZE), PAD_SCALE_E8M0, dtype=torch.uint8),
        "w2_bias": torch.zeros(el, hp),
        "w13_channel_scale": torch.full((el, 2 * ip), PAD_CHANNEL_SCALE),
        "w2_channel_scale": torch.full((el, hp), PAD_CHANNEL_SCALE),
        "router_weight": torch.zeros(e, hp),
        "router_bias": full["router_bias"].float(),
    }
    out["w13_blocks"][:, :2 * n, :h // 2] = full["w13_blocks"][ex, rows].reshape(el, 2 * n, h // 2)
    out["w13_scales"][:, :2 * n, :hb] = full["w13_scales"][ex, rows]
    out["w13_bias"][:, :2 * n] = full["w13_bias"][ex, rows].float()
    out["w13_channel_scale"][:, :2 * n] = full["w13_channel_scale"][ex, rows].reshape(el, 2 * n)
    out["w2_blocks"][:, :h, :n // 2] = full["w2_blocks"][ex][:, :, blocks].reshape(el, h, n // 2)
    out["w2_scales"][:, :h, :n // BLOCK_SIZE] = full["w2_scales"][ex][:, :, blocks]
    if plan.tp_rank == 0:
        out["w2_bias"][:, :h] = full["w2_bias"][ex].float()
    out["w2_channel_scale"][:, :h] = full["w2_channel_scale"][ex]
    out["router_weight"][:, :h] = full["router_weight"].float()
    return out


def expected_bytes(full, plan, n):
    """Bytes a rank reads: its experts' slices of every expert tensor, the w2 bias on TP rank 0
    only, and the whole router. Written from the tensor sizes, not from the plan's read ranges."""
    el = plan.num_local_experts
    e, two_i, hb, _ = full["w13_blocks"].shape
    h = hb * BLOCK_SIZE
    size = {k: v.element_size() for k, v in full.items()}
    per_expert = (2 * n * h // 2 + 2 * n * hb                      # w13 blocks, scales
                  + 2 * n * size["w13_bias"] + 2 * n * size["w13_channel_scale"]
                  + h * n // 2 + h * n // BLOCK_SIZE               # w2 blocks, scales
                  + h * size["w2_channel_scale"]
                  + (h * size["w2_bias"] if plan.tp_rank == 0 else 0))
    return el * per_expert + e * h * size["router_weight"] + e * size["router_bias"]


def check_all_ranks(checkpoint, full, plans, **load_kwargs):
    """Load every rank; check each against the reference, and that the ranks together hold every
    expert exactly once and every I-element of it exactly once (sum of shares = I)."""
    e, two_i = full["w13_blocks"].shape[:2]
    experts_seen = []
    for ep_rank in range(plans[0].ep_size):
        group = sorted((p for p in plans if p.ep_rank == ep_rank), key=lambda p: p.tp_rank)
        assert len({p.local_experts for p in group}) == 1      # TP ranks of one EP rank share experts
        experts_seen += group[0].local_experts
        offset = 0
        for plan in group:
            w = load_layer(checkpoint, 0, plan, **load_kwargs)
            assert (w.hidden_pad, w.inter_pad, w.hidden) == (plan.hidden_pad, plan.inter_pad, plan.hidden)
            assert (w.tp_rank, w.tp_size, w.ep_rank, w.ep_size) == (plan.tp_rank, plan.tp_size,
                                                                   plan.ep_rank, plan.ep_size)
            assert w.w2_bias_included == (plan.tp_rank == 0)
            assert w.local_experts.tolist() == list(plan.local_experts)
            for g in range(e):
                local = w.expert_map[g].item()
                assert (g in plan.local_experts) == (local >= 0)
                if local >= 0:
                    assert w.local_experts[local].item() == g
            expected = expected_rank(full, plan, offset, w.inter)
            for name in FIELDS:
                got = getattr(w, name)
                assert got.dtype == expected[name].dtype, name
                assert torch.equal(got, expected[name]), f"{name} differs on {plan.describe()}"
            assert w.bytes_read == expected_bytes(full, plan, w.inter), plan.describe()
            layer = checkpoint.layer(0)
            if not hasattr(layer, "experts"):   # fused layout: the plan's roles are LayerTensors fields
                # ... and equal to what the plan's read ranges select, as the reader sizes them.
                planned = sum(getattr(layer, role).slice_nbytes(*index)
                              for role, indexes in plan.read_ranges().items() if getattr(layer, role) is not None
                              for index in indexes)
                assert w.bytes_read == planned, plan.describe()
            assert w.extras["nan_scale_bytes"] == 0
            offset += w.inter
        assert offset == two_i // 2                                 # the shares add up to I
    assert sorted(experts_seen) == list(range(e))


# ---- reassembly -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("align", list(ALIGN_PRESETS))
@pytest.mark.parametrize("placement", ["linear", "round-robin"])
@pytest.mark.parametrize("ep", [1, 2, 3, 4])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_reassembly_small(small, tp, ep, placement, align):
    # Small sizes, the whole grid: 23 blocks split unevenly at every TP > 1, 7 experts unevenly
    # at every EP > 1, H 320 padded by three of the presets.
    checkpoint, full = small
    check_all_ranks(checkpoint, full, ShardPlan.all_ranks(num_experts=7, hidden=320, inter=736, tp_size=tp,
                                                          ep_size=ep, placement=placement, align=align))


@pytest.mark.parametrize("tp, ep, placement, align", [
    (1, 1, "linear", "none"),
    (4, 1, "linear", "triton"),              # 736 x 3, 672 -> 768 each
    (8, 1, "linear", "marlin"),              # 384 x 7, 192; H 2880 -> 3072
    (3, 2, "round-robin", "flashinfer-cutlass"),
    (2, 3, "linear", "trtllm"),              # E 5 over 3 ranks: 2, 2, 1
    (1, 4, "round-robin", "triton"),         # E 5 over 4 ranks: 2, 1, 1, 1
], ids=["tp1", "tp4-triton", "tp8-marlin", "tp3-ep2-rr-flashinfer", "tp2-ep3-trtllm", "ep4-rr"])
def test_reassembly_gpt_oss(gpt_oss, tp, ep, placement, align):
    checkpoint, full = gpt_oss
    check_all_ranks(checkpoint, full, ShardPlan.all_ranks(num_experts=5, hidden=2880, inter=2880, tp_size=tp,
                                                          ep_size=ep, placement=placement, align=align))


@pytest.mark.parametrize("ep", [1, 2])
def test_reassembly_deepep_hidden_pad(deepep, ep):
    # H 2688 -> 3072 (explicit), I 896 per rank -> 1024 (trtllm, 256): both dims padded at once,
    # the combination vLLM PR #37010 broke.
    checkpoint, full = deepep
    plans = ShardPlan.all_ranks(num_experts=5, hidden=2688, inter=3584, tp_size=4, ep_size=ep,
                                align="trtllm", hidden_pad=3072)
    assert {(p.hidden_pad, p.inter, p.inter_pad) for p in plans} == {(3072, 896, 1024)}
    check_all_ranks(checkpoint, full, plans)


def test_reassembly_in_one_byte_reads(small):
    # max_read_bytes=1: every read is one expert; the result must not depend on the chunking.
    checkpoint, full = small
    check_all_ranks(checkpoint, full, ShardPlan.all_ranks(num_experts=7, hidden=320, inter=736, tp_size=3,
                                                          align="marlin"), max_read_bytes=1)


# ---- named regressions ------------------------------------------------------------------------------------

def test_narrow_seed_case_pr39688():
    # vLLM PR #39688's test: parameter (3072, 1024) <- checkpoint (2688, 896), shard dim 1.
    # Narrowing only the hidden dim (PR #37010) fails with "768 must match 704"-style errors;
    # both dims must be narrowed, the top-left equal the checkpoint, the rest stay zero.
    g = torch.Generator().manual_seed(5)
    param = torch.zeros(3072, 1024)
    loaded = torch.randn(2688, 896, generator=g)
    view = narrow_to_source(param, loaded, param="w2_weight", rank=0, tensor="down_proj", shard_dim=1)
    assert view.shape == (2688, 896) and view.data_ptr() == param.data_ptr()
    view.copy_(loaded)
    assert torch.equal(param[:2688, :896], loaded)
    assert not param[2688:].any() and not param[:, 896:].any()


def test_offsets_from_checkpoint_dims_issue_43865(i1536):
    # I 1536, TP 4, padded to 512 per rank: rank r must hold checkpoint rows [768 r, 768 r + 768)
    # of w13 and blocks [12 r, 12 r + 12) of w2, not offsets computed from the padded 512.
    checkpoint, full = i1536
    for r in range(4):
        w = load_layer(checkpoint, 0, ShardPlan.create(num_experts=3, hidden=256, inter=1536, tp_size=4,
                                                       tp_rank=r, align=(32, 256)))
        assert (w.inter, w.inter_pad) == (384, 512)
        want_w13 = full["w13_blocks"][:, 768 * r:768 * (r + 1)].reshape(3, 768, 128)
        assert torch.equal(w.w13_blocks[:, :768, :], want_w13)
        assert not w.w13_blocks[:, 768:].any()
        want_w2 = full["w2_scales"][:, :, 12 * r:12 * (r + 1)]
        assert torch.equal(w.w2_scales[:, :, :12], want_w2)
        if r == 1:
            # The bug's offset (512 per rank) reads other rows: the test tells them apart.
            wrong = full["w13_blocks"][:, 1024:1792].reshape(3, 768, 128)
            assert not torch.equal(w.w13_blocks[:, :768, :], wrong)


@pytest.mark.parametrize("tp, last_share", [(4, 672), (8, 192)], ids=["tp4", "tp8"])
def test_last_rank_rows_present_sglang_9433(gpt_oss, tp, last_share):
    # SGLang PR #9433: the last TP rank lost rows of gpt-oss silently. Its share here is smaller
    # than the others (736 / 384) and must end exactly at the checkpoint's last row and block.
    checkpoint, full = gpt_oss
    w = load_layer(checkpoint, 0, ShardPlan.create(num_experts=5, hidden=2880, inter=2880, tp_size=tp,
                                                   tp_rank=tp - 1, align="triton"))
    assert w.inter == last_share
    start = 2880 - last_share
    assert torch.equal(w.w13_blocks[:, :2 * last_share], full["w13_blocks"][:, 2 * start:].reshape(5, -1, 1440))
    assert torch.equal(w.w13_blocks[:, 2 * last_share - 1], full["w13_blocks"][:, 5759].reshape(5, 1440))
    assert torch.equal(w.w2_scales[:, :, last_share // 32 - 1], full["w2_scales"][:, :, 89])
    assert torch.equal(w.w13_bias[:, :2 * last_share], full["w13_bias"][:, 2 * start:].float())


# ---- narrow_to_source: bad shapes ---------------------------------------------------------------------------

def test_narrow_destination_smaller_names_everything():
    dest = torch.zeros(4, 704, 90)
    with pytest.raises(ValueError) as err:
        narrow_to_source(dest, torch.zeros(4, 768, 90), param="w13_blocks", rank="tp_rank 3 of 4",
                         tensor="model.layers.0.mlp.experts.gate_up_proj_blocks", shard_dim=1)
    msg = str(err.value)
    for part in ("w13_blocks", "tp_rank 3 of 4", "dim 1 (the TP shard dim)", "704", "768",
                 "model.layers.0.mlp.experts.gate_up_proj_blocks"):
        assert part in msg


def test_narrow_ndims_differ():
    with pytest.raises(ValueError, match=r"destination has 3 dims \(2, 8, 4\) but the checkpoint slice has 4 dims"):
        narrow_to_source(torch.zeros(2, 8, 4), torch.zeros(2, 8, 2, 2), param="w2_blocks", rank=1, tensor="t")


def test_narrow_shard_dim_minus_one_is_the_last_dim_not_none():
    # The seed's review: -1 is a valid torch dim, so it must not mean "no shard dim".
    with pytest.raises(ValueError, match=r"dim 2 \(the TP shard dim\) has size 8"):
        narrow_to_source(torch.zeros(2, 3, 8), torch.zeros(2, 3, 9), param="p", rank=0, tensor="t", shard_dim=-1)
    with pytest.raises(ValueError, match=r"dim 2 has size 8"):                 # None: no dim is named
        narrow_to_source(torch.zeros(2, 3, 8), torch.zeros(2, 3, 9), param="p", rank=0, tensor="t")


def test_narrow_equal_shapes_is_identity():
    dest = torch.zeros(3, 5)
    assert narrow_to_source(dest, torch.ones(3, 5), param="p", rank=0, tensor="t") is dest


# ---- load_layer: other cases ---------------------------------------------------------------------------------

def test_plan_for_other_sizes_is_an_error(small):
    checkpoint, _ = small
    with pytest.raises(ValueError, match=r"plan was made for hidden 256 but checkpoint tensor .*gate_up_proj_blocks"):
        load_layer(checkpoint, 0, ShardPlan.create(num_experts=7, hidden=256, inter=736))
    with pytest.raises(ValueError, match=r"plan was made for num_experts 8"):
        load_layer(checkpoint, 0, ShardPlan.create(num_experts=8, hidden=320, inter=736))


def test_empty_rank_allowed_is_all_padding(small):
    # 23 blocks at TP 12: 2 per rank, ranks 0..11 except the last (blocks 22..23) ... rank 11
    # gets 1 block; at TP 16, 2 per rank fills ranks 0..11 and ranks 12..15 own nothing.
    checkpoint, full = small
    plan = ShardPlan.create(num_experts=7, hidden=320, inter=736, tp_size=16, tp_rank=13, allow_empty=True)
    w = load_layer(checkpoint, 0, plan)
    assert w.inter == 0 and w.inter_pad == 64
    assert not w.w13_blocks.any() and not w.w2_blocks.any() and not w.w13_bias.any()
    assert (w.w13_scales == PAD_SCALE_E8M0).all() and (w.w2_scales == PAD_SCALE_E8M0).all()
    # Only the router and the w2 channel scale (not TP-sliced) are read; w2's bias lives on rank 0.
    assert w.bytes_read == 7 * 320 * 2 + 7 * 2 + 7 * 320 * 4


def test_nan_scale_bytes_counted_on_the_rank_that_reads_them(tmp_path):
    t = random_layer(3, 64, 128, seed=6)
    t["w13_scales"][2, 200, 1] = E8M0_NAN        # w13 row 200 = I-element 100: TP rank 1 of 2
    checkpoint = write_with_synthetic(tmp_path / "nan", t)
    counts = [load_layer(checkpoint, 0, p).extras["nan_scale_bytes"]
              for p in ShardPlan.all_ranks(num_experts=3, hidden=64, inter=128, tp_size=2)]
    assert counts == [0, 1]


# ---- unfused checkpoints -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp, ep, placement, align", [
    (1, 1, "linear", "none"), (3, 2, "round-robin", "marlin"), (8, 1, "linear", "trtllm"),
    (4, 3, "linear", "flashinfer-cutlass"),
], ids=["tp1", "tp3-ep2-rr-marlin", "tp8-trtllm", "tp4-ep3-flashinfer"])
def test_unfused_loads_like_fused(small, tmp_path, tp, ep, placement, align):
    # The same bytes written per expert (gate, up, down separately) must load into exactly the
    # weights the fused checkpoint gives: gate row j -> w13 row 2j, up row j -> 2j + 1.
    checkpoint, full = small
    unfused = open_unfused_checkpoint(unfuse_checkpoint(checkpoint, tmp_path / "unfused", shards=3))
    assert unfused.config == checkpoint.config
    plans = ShardPlan.all_ranks(num_experts=7, hidden=320, inter=736, tp_size=tp, ep_size=ep,
                                placement=placement, align=align)
    check_all_ranks(unfused, full, plans)


def test_open_checkpoint_finds_unfused_by_its_config(small, tmp_path):
    # config.json's quantization_config.layout "unfused" is what open_checkpoint (and so verify
    # and load_model) detects: the same reader as open_unfused_checkpoint, the same bytes loaded,
    # rank by rank (E 7 over EP 2, I 23 blocks over TP 3, channel scales, three shards).
    from mxfp4_moe.unfused import UnfusedCheckpoint
    checkpoint, _ = small
    folder = unfuse_checkpoint(checkpoint, tmp_path / "unfused", shards=3)
    with open_checkpoint(folder) as found, open_unfused_checkpoint(folder) as direct:
        assert type(found) is UnfusedCheckpoint and found.layout == "unfused"
        assert (found.config, found.semantics) == (direct.config, direct.semantics)
        for plan in ShardPlan.all_ranks(num_experts=7, hidden=320, inter=736, tp_size=3, ep_size=2, align="marlin"):
            got, want = load_layer(found, 0, plan), load_layer(direct, 0, plan)
            for name in FIELDS:
                assert torch.equal(getattr(got, name), getattr(want, name)), (name, plan.describe())


def test_open_checkpoint_passes_nan_scales_to_the_unfused_reader(tmp_path):
    t = random_layer(2, 64, 64, seed=12)
    t["w2_scales"][1, 5, 0] = E8M0_NAN          # expert 1's down_proj scale, row 5, block 0
    folder = write_unfused_checkpoint(tmp_path / "u", [t], top_k=1)
    with open_checkpoint(folder) as ck:
        report = ck.find_nan_scales(0)
        assert report.count == 1 and report.locations[0].index == (5, 0)
    with open_checkpoint(folder, nan_scales="error") as ck, pytest.raises(
            CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.1\.down_proj\.weight_scale.*NaN"):
        ck.layer(0)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_explicit_fused_layout_on_an_unfused_folder_names_a_per_expert_tensor(tmp_path, layout):
    # layout="hf" / "original" asks for gpt-oss's fused layout and skips the format detection: an
    # unfused folder is refused naming its file and a per-expert tensor, not a missing fused one.
    folder = write_unfused_checkpoint(tmp_path / "u", [random_layer(2, 64, 64, seed=13)], top_k=1)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor model\.layers\.0\.mlp\.experts\.0\..*: "
                                              rf"expected gpt-oss's fused '{layout}' layout .*found per-expert tensors"):
        open_checkpoint(folder, layout=layout)


def test_unfused_config_over_fused_tensors_names_the_fused_tensor(tmp_path):
    # Hostile: the config says "unfused", the file holds gpt-oss's fused tensors. The error names
    # the file and the fused tensor; layout="hf" reads the fused tensors whatever the config says.
    t = random_layer(2, 64, 64, seed=14)
    folder = write_with_synthetic(tmp_path / "fused", t).path
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "layout": "unfused"}
    (folder / "config.json").write_text(json.dumps(config))
    fused_name = layer_tensor_names("hf", 0)["w13_blocks"]
    message = (rf"model\.safetensors: tensor {re.escape(fused_name)}: expected the per-expert \(unfused\) layout "
               rf".*config\.json declares .*found gpt-oss's fused 'hf' layout")
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(folder)
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(fused_name)}: expected the per-expert"):
        open_unfused_checkpoint(folder)
    with open_checkpoint(folder, layout="hf") as ck:
        assert ck.layout == "hf" and torch.equal(ck.layer(0).w13_blocks.read_all(), t["w13_blocks"])


def test_one_fused_layer_in_an_unfused_checkpoint_is_named(tmp_path):
    # Hostile: layer 0 per expert, layer 1 fused, under an "unfused" config.
    layers = [random_layer(2, 64, 64, seed=15), random_layer(2, 64, 64, seed=16)]
    folder = write_unfused_checkpoint(tmp_path / "u", layers, top_k=1)
    from safetensors.torch import load_file
    tensors = {n: v for n, v in load_file(str(folder / "model.safetensors")).items() if ".layers.1." not in n}
    tensors.update({layer_tensor_names("hf", 1)[k]: v.contiguous() for k, v in layers[1].items()})
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.experts\.gate_up_proj_blocks: "
                                              r"expected the per-expert \(unfused\) layout "
                                              r"\(model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight\)"):
        open_checkpoint(folder)


def test_per_expert_tensors_under_a_config_without_the_layout_name_a_tensor(tmp_path):
    # Hostile, the reverse: per-expert tensors, but config.json does not say "unfused", so the
    # fused reader gets the folder. It names a per-expert tensor and the key to set;
    # open_unfused_checkpoint still opens the folder whatever its config says.
    folder = write_unfused_checkpoint(tmp_path / "u", [random_layer(2, 64, 64, seed=17)], top_k=1)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["layout"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.experts\.0\..*"
                                              r"found per-expert tensors; .*set quantization_config\.layout to 'unfused'"):
        open_checkpoint(folder)
    with open_unfused_checkpoint(folder) as ck:
        assert ck.layout == "unfused"


def test_unfused_names_and_interleave(tmp_path):
    t = random_layer(2, 64, 96, seed=7)
    folder = write_unfused_checkpoint(tmp_path / "u", [t], top_k=1)
    ck = open_unfused_checkpoint(folder)
    gate = ck.layer(0).experts[1].gate.weight
    assert gate.name == "model.layers.0.mlp.experts.1.gate_proj.weight" and gate.shape == (96, 32)
    # Independently: gate j of the fused tensor is its row 2j.
    assert torch.equal(gate.read_all(), t["w13_blocks"][1, 0::2].reshape(96, 32))
    w = load_layer(ck, 0, ShardPlan.create(num_experts=2, hidden=64, inter=96))
    assert torch.equal(w.w13_blocks[1, 1::2], t["w13_blocks"][1, 1::2].reshape(96, 32))


def test_unfused_router_without_bias_gives_zeros(tmp_path):
    t = random_layer(2, 64, 64, seed=8)
    del t["router_bias"]
    ck = open_unfused_checkpoint(write_unfused_checkpoint(tmp_path / "u", [t], top_k=1))
    w = load_layer(ck, 0, ShardPlan.create(num_experts=2, hidden=64, inter=64))
    assert torch.equal(w.router_bias, torch.zeros(2))


def test_unfused_bad_shape_and_missing_tensor(tmp_path):
    t = random_layer(2, 64, 64, seed=9)
    folder = write_unfused_checkpoint(tmp_path / "u", [t], top_k=1)
    from safetensors.torch import load_file
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.experts.1.down_proj.weight_scale"
    tensors[name] = torch.zeros(64, 3, dtype=torch.uint8)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name}: expected torch.uint8 shape \[64, 2\], found torch.uint8 \[64, 3\]"):
        open_unfused_checkpoint(folder)
    del tensors[name]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is missing"):
        open_unfused_checkpoint(folder)


def test_unfused_without_biases_gives_zero_biases(tmp_path):
    # Generic MoE checkpoints often have no expert biases: the loader must write zeros, not
    # leave the (poisoned) destination as it was.
    t = random_layer(3, 64, 128, seed=10)
    del t["w13_bias"], t["w2_bias"]
    ck = open_unfused_checkpoint(write_unfused_checkpoint(tmp_path / "u", [t], top_k=1))
    for plan in ShardPlan.all_ranks(num_experts=3, hidden=64, inter=128, tp_size=2, align="marlin"):
        w = load_layer(ck, 0, plan)
        assert torch.equal(w.w13_bias, torch.zeros(3, 2 * plan.inter_pad))
        assert torch.equal(w.w2_bias, torch.zeros(3, plan.hidden_pad))


def test_unfused_bias_on_gate_but_not_up_is_an_error(tmp_path):
    t = random_layer(2, 64, 64, seed=11)
    folder = write_unfused_checkpoint(tmp_path / "u", [t], top_k=1)
    from safetensors.torch import load_file
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.mlp.experts.1.up_proj.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"biases must be present on every expert's gate and up"):
        open_unfused_checkpoint(folder)
