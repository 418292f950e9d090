"""The other checkpoint formats (`mxfp4_moe.formats`): compressed-tensors MXFP4 (Qwen3-MoE), GGUF
MXFP4 (gpt-oss), AMD Quark MXFP4 (Qwen3-MoE and gpt-oss) and gpt-oss's per-expert unfused layout,
each opened by `open_checkpoint`. Each fact the readers rely on is pinned against the package that writes the
format, where it is installed (the test says which module); every format is loaded under TP 1/2/3
and EP 2 plans with padding presets and checked against the dequantized reference; planted bugs
(nibble order, gate/up swap, scale byte off by one, router order) must be caught.

Tolerances: the sum of the ranks' float64 reference outputs against `dense_reference` (float64
from the unpadded dequantized weights): 1e-6 relative Frobenius error (the routing weights are
float32: ~1e-7). A planted bug must move it above 1e-2.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from mxfp4_moe import mxfp4
from mxfp4_moe.checkpoint import CheckpointError, open_checkpoint
from mxfp4_moe.formats import compressed_tensors as ct_format
from mxfp4_moe.formats import gguf as gguf_format
from mxfp4_moe.loader import load_layer
from mxfp4_moe.reference import reference_moe
from mxfp4_moe.routing import route
from mxfp4_moe.sharding import ShardPlan
from mxfp4_moe.synthetic import write_checkpoint
from mxfp4_moe.synthetic_formats import FORMATS, dense_reference, make_format_checkpoint
from mxfp4_moe.unfused import UnfusedExpert, UnfusedLayerTensors

pytest.importorskip("gguf")       # the GGUF reader's parser (extra `gguf`)

E, H, I, TOP_K = 4, 64, 96, 2       # I = 3 blocks: TP 3 gives each rank one block
TOL = 1e-6
BUG = 1e-2
LAYOUT = {"compressed-tensors": "compressed-tensors", "gguf": "gguf", "quark-qwen3": "quark", "quark-gpt-oss": "quark",
          "gpt-oss-unfused": "unfused"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{format: (what to open, layers written)}, once per module (tiny: 4 experts, H 64, I 96)."""
    out = {}
    for fmt in FORMATS:
        out[fmt] = make_format_checkpoint(tmp_path_factory.mktemp(fmt.replace("-", "_")), fmt, num_experts=E,
                                          hidden=H, intermediate=I, top_k=TOP_K, seed=7)
    return out


def plans(tp: int, ep: int, align: str) -> list[ShardPlan]:
    return [ShardPlan.create(num_experts=E, hidden=H, inter=I, tp_size=tp, tp_rank=t, ep_size=ep, ep_rank=r,
                             align=align) for r in range(ep) for t in range(tp)]


def sharded_error(ck, layer, plan_list, x) -> float:
    """Relative error of the sum of the ranks' reference outputs (routing as the weights say)
    against the dense reference of the layer written."""
    total = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for plan in plan_list:
        w = load_layer(ck, 0, plan)
        weights, ids = route(x, w.router_weight, w.router_bias, w.top_k, scoring=w.router_scoring,
                             norm_topk_prob=w.norm_topk_prob)
        total += reference_moe(x.double(), w, weights, ids, torch.float64)
    ref = dense_reference(x, layer, ck.semantics, TOP_K)
    return float((total - ref).norm() / ref.norm())


def tokens(seed=0, t=13):
    return torch.randn(t, H, generator=torch.Generator().manual_seed(seed))


# ---- facts, against the writers' own packages ---------------------------------------------------

def test_gguf_block_layout_from_the_gguf_package():
    # gguf 0.19 constants.py: GGML_QUANT_SIZES[MXFP4] = (32 elements, 17 bytes); quants.py MXFP4:
    # byte 0 = E8M0, qs[j] low nibble = element j, high nibble = element j + 16.
    gguf = pytest.importorskip("gguf")
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.MXFP4] == (mxfp4.BLOCK_SIZE, gguf_format.GGUF_BLOCK_BYTES)
    codes = torch.arange(32) % 16                                 # element i holds code i % 16
    qs = (codes[:16] | (codes[16:] << 4)).to(torch.uint8)          # GGUF: j low, j + 16 high
    block = torch.cat((torch.tensor([127], dtype=torch.uint8), qs)).view(1, 17)
    expected = mxfp4.e2m1_lut()[codes]                             # scale 2**0
    got = gguf.quants.dequantize(block.numpy(), gguf.GGMLQuantizationType.MXFP4).reshape(-1)
    assert torch.equal(torch.from_numpy(np.array(got)), expected)
    packed, scales = gguf_format.gguf_to_hf(block)
    assert torch.equal(mxfp4.dequantize(packed, scales.view(1), torch.float32), expected)
    assert torch.equal(gguf_format.hf_to_gguf(packed.view(1, 16), scales), block)


def test_gguf_file_dequantizes_like_the_gpt_oss_weights(checkpoints):
    # The file as gguf's own reader and dequantize see it: gate = w13 rows 0::2, up = 1::2,
    # down = w2, value for value.
    gguf = pytest.importorskip("gguf")
    target, (layer,) = checkpoints["gguf"]
    tensors = {t.name: t for t in gguf.GGUFReader(str(target)).tensors}
    w13 = mxfp4.dequantize(layer.w13_blocks, layer.w13_scales, torch.float32)
    w2 = mxfp4.dequantize(layer.w2_blocks, layer.w2_scales, torch.float32)
    for name, want in (("ffn_gate_exps", w13[:, 0::2]), ("ffn_up_exps", w13[:, 1::2]), ("ffn_down_exps", w2)):
        t = tensors[f"blk.0.{name}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        assert torch.equal(got, want), name


def test_compressed_tensors_packing_from_the_compressed_tensors_package(checkpoints):
    # compressed-tensors 0.20.1: MXFP4PackedCompressor.compression_param_names -> weight_packed,
    # weight_scale; nvfp4/helpers.py pack_fp4_to_uint8 (column 2k low nibble); mx_utils.py
    # compress_mx_scale (127 + floor(log2 scale)); CompressionFormat "mxfp4-pack-quantized".
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import preset_name_to_scheme
    from safetensors.torch import load_file

    assert CompressionFormat.mxfp4_pack_quantized.value == ct_format.MXFP4_FORMAT
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    assert MXFP4PackedCompressor.compression_param_names(scheme)[:2] == ("weight_packed", "weight_scale")
    assert {k: getattr(scheme.weights, k) for k in ("num_bits", "strategy", "group_size", "symmetric")} == {
        "num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": True}
    target, (layer,) = checkpoints["compressed-tensors"]
    stored = load_file(str(target / "model.safetensors"))
    gate_blocks, gate_scales = layer.w13_blocks[1, 0::2], layer.w13_scales[1, 0::2]   # expert 1's gate
    scale = torch.exp2(gate_scales.float() - mxfp4.E8M0_BIAS)                            # [I, H/32]
    values = mxfp4.dequantize(gate_blocks, gate_scales, torch.float32).view(I, H // 32, 32) / scale[..., None]
    assert torch.equal(stored["model.layers.0.mlp.experts.1.gate_proj.weight_packed"],
                       pack_fp4_to_uint8(values.view(I, H)))
    assert torch.equal(stored["model.layers.0.mlp.experts.1.gate_proj.weight_scale"],
                       compress_mx_scale(scale, torch.uint8))
    assert stored["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    assert not any(name.endswith("bias") for name in stored)
    del ct


# ---- reading, sharding, padding -------------------------------------------------------------------

SHARDINGS = [
    pytest.param(1, 1, "none", id="tp1-unpadded"),
    pytest.param(2, 1, "triton", id="tp2-triton-pads-I"),
    pytest.param(3, 1, "marlin", id="tp3-marlin-pads-H-and-I-one-block-per-rank"),
    pytest.param(1, 2, "trtllm", id="ep2-trtllm"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tp,ep,align", SHARDINGS)
def test_sharded_layer_matches_the_dequantized_reference(checkpoints, fmt, tp, ep, align, poisoned_loader_destinations):
    target, (layer,) = checkpoints[fmt]
    with open_checkpoint(target) as ck:
        assert sharded_error(ck, layer, plans(tp, ep, align), tokens(tp + ep)) < TOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_bytes_as_the_gpt_oss_layout(checkpoints, fmt, tmp_path):
    # The same layer written as a gpt-oss Hugging Face checkpoint loads into the same expert
    # blocks and scales, rank by rank (TP 2, padded): the readers' re-packing and gate/up
    # interleave are exact.
    target, layers = checkpoints[fmt]
    from mxfp4_moe.checkpoint import MoEConfig
    config = MoEConfig(num_layers=1, num_experts=E, experts_per_token=TOP_K, hidden_size=H, intermediate_size=I)
    hf = write_checkpoint(tmp_path / "hf", config, layers)
    with open_checkpoint(target) as ck, open_checkpoint(hf) as ref:
        assert ck.layout == LAYOUT[fmt]
        for plan in plans(2, 1, "marlin"):
            got, want = load_layer(ck, 0, plan), load_layer(ref, 0, plan)
            for name in ("w13_blocks", "w13_scales", "w2_blocks", "w2_scales"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (name, plan.describe())
            assert got.activation == ck.semantics.activation and got.router_scoring == ck.semantics.router


def test_semantics_each_format_implies(checkpoints):
    with open_checkpoint(checkpoints["compressed-tensors"][0]) as ck:
        assert (ck.semantics.activation, ck.semantics.router, ck.semantics.has_bias) == ("silu", "softmax_topk", False)
        assert ck.semantics.norm_topk_prob is False          # the writer's default, as Qwen3MoeConfig's
        assert ck.layer(0).router_bias is None and ck.layer(0).experts[0].gate.bias is None
    for fmt in ("gguf", "quark-gpt-oss", "gpt-oss-unfused"):
        with open_checkpoint(checkpoints[fmt][0]) as ck:
            assert (ck.semantics.activation, ck.semantics.router) == ("swiglu_oai", "topk_softmax")
            assert (ck.semantics.swiglu_alpha, ck.semantics.swiglu_limit) == (1.702, 7.0)
            assert (ck.config.num_experts, ck.config.experts_per_token, ck.config.hidden_size,
                    ck.config.intermediate_size) == (E, TOP_K, H, I)
            assert ck.layer(0).router_bias is not None and ck.layer(0).experts[0].down.bias is not None
    with open_checkpoint(checkpoints["quark-qwen3"][0]) as ck:
        assert (ck.semantics.activation, ck.semantics.router, ck.family) == ("silu", "softmax_topk", "qwen3_moe")


def test_compressed_tensors_norm_topk_prob_is_read(tmp_path):
    target, (layer,) = make_format_checkpoint(tmp_path, "compressed-tensors", num_experts=E, hidden=H,
                                              intermediate=I, top_k=TOP_K, seed=3, norm_topk_prob=True)
    with open_checkpoint(target) as ck:
        assert ck.semantics.norm_topk_prob is True
        assert sharded_error(ck, layer, plans(2, 1, "none"), tokens(4)) < TOL


def _with_config(target, raw: dict, folder):
    """`folder`: target's model.safetensors with config.json `raw`."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    shutil.copy(target / "model.safetensors", folder / "model.safetensors")   # (a link out of the folder is refused)
    return folder


def test_compressed_tensors_config_errors_name_the_field(checkpoints, tmp_path):
    target, _ = checkpoints["compressed-tensors"]
    raw = json.loads((target / "config.json").read_text())
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 16
    bad = _with_config(target, raw, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="config_groups.group_0.*group_size"):
        open_checkpoint(bad)


def test_quark_non_mxfp4_weight_spec_is_refused(checkpoints, tmp_path):
    target, _ = checkpoints["quark-qwen3"]
    raw = json.loads((target / "config.json").read_text())
    raw["quantization_config"]["global_quant_config"]["weight"]["scale_format"] = "float"
    bad = _with_config(target, raw, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="global_quant_config.weight.*scale_format"):
        open_checkpoint(bad)


def test_quark_packing_as_its_pack_fp4_writes_it(checkpoints):
    # amd-quark 0.13 torch/utils/pack.py Pack_fp4.pack (its torch side cannot be imported here: it
    # needs scipy and more), restated: code = bits 22..24 of the float32 x / 2**126 (the E2M1
    # magnitude) plus the sign bit; tensor[..., 1] << 4 + tensor[..., 0], element 2k low.
    # export/constants.py: the scale is `weight_scale`, beside the packed `weight`.
    from safetensors.torch import load_file
    target, (layer,) = checkpoints["quark-gpt-oss"]
    stored = load_file(str(target / "model.safetensors"))
    scale = torch.exp2(layer.w13_scales[2].float() - mxfp4.E8M0_BIAS)                     # [2I, H/32]
    values = mxfp4.dequantize(layer.w13_blocks[2], layer.w13_scales[2], torch.float32)
    values = (values.view(2 * I, H // 32, 32) / scale[..., None]).view(2 * I, H)
    bits = (values / 2.0 ** 126).view(torch.int32)
    codes = (((bits >> 22) & 0x07) + ((bits >> 28) & 0x08)).to(torch.uint8).view(2 * I, H // 2, 2)
    packed = (codes[..., 1] << 4) + codes[..., 0]
    assert torch.equal(stored["model.layers.0.mlp.experts.2.gate_up_proj.weight"], packed)
    assert torch.equal(stored["model.layers.0.mlp.experts.2.gate_up_proj.weight_scale"], layer.w13_scales[2])
    assert stored["model.layers.0.mlp.experts.2.gate_up_proj.bias"].shape == (2 * I,)


def test_gguf_other_architecture_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="expected 'gpt-oss'.*found 'llama'"):
        open_checkpoint(tmp_path / "llama.gguf")


def test_nan_scale_is_reported_and_refused_on_request(tmp_path):
    target, layers = make_format_checkpoint(tmp_path / "a", "compressed-tensors", num_experts=E, hidden=H,
                                            intermediate=I, top_k=TOP_K)
    layer = layers[0]
    layer.w2_scales[2, 5, 1] = mxfp4.E8M0_NAN
    ct_format.write_checkpoint(tmp_path / "b", [dataclasses.asdict(layer)], top_k=TOP_K)
    with open_checkpoint(tmp_path / "b") as ck:
        report = ck.find_nan_scales(0)
        assert report.count == 1 and report.locations[0].tensor.endswith("experts.2.down_proj.weight_scale")
        assert report.locations[0].index == (5, 1)
    with open_checkpoint(tmp_path / "b", nan_scales="error") as ck, pytest.raises(CheckpointError, match="NaN"):
        ck.layer(0)


# ---- planted bugs must be caught ------------------------------------------------------------------

class _Shifted:
    """A scale reference whose bytes come back one higher: the scale off by one (a factor 2)."""

    def __init__(self, ref):
        self._ref, self.name, self.file, self.shape, self.dtype = ref, ref.name, ref.file, ref.shape, ref.dtype

    def read(self, *index, contiguous=True):
        return self._ref.read(*index, contiguous=contiguous) + 1


def _swap_gate_up(layer: UnfusedLayerTensors) -> UnfusedLayerTensors:
    return dataclasses.replace(layer, experts=[UnfusedExpert(ex.up, ex.gate, ex.down) for ex in layer.experts])


def _shift_down_scales(layer: UnfusedLayerTensors) -> UnfusedLayerTensors:
    experts = [UnfusedExpert(ex.gate, ex.up, dataclasses.replace(ex.down, weight_scale=_Shifted(ex.down.weight_scale)))
               for ex in layer.experts]
    return dataclasses.replace(layer, experts=experts)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bug", ["gate-up-swapped", "scale-off-by-one"])
def test_planted_reader_bugs_are_caught(checkpoints, fmt, bug, monkeypatch):
    target, (layer,) = checkpoints[fmt]
    with open_checkpoint(target) as ck:
        honest = ck.layer(0)
        planted = _swap_gate_up(honest) if bug == "gate-up-swapped" else _shift_down_scales(honest)
        monkeypatch.setattr(ck, "layer", lambda i: planted)
        assert sharded_error(ck, layer, plans(2, 1, "triton"), tokens(1)) > BUG


def test_planted_gguf_nibble_order_bug_is_caught(checkpoints, monkeypatch):
    # The GGUF codes taken as if they were in the Hugging Face order (no re-pack).
    target, (layer,) = checkpoints["gguf"]

    def no_repack(raw):
        return raw[..., 1:].flatten(-2), raw[..., 0]

    monkeypatch.setattr(gguf_format, "gguf_to_hf", no_repack)
    with open_checkpoint(target) as ck:
        assert sharded_error(ck, layer, plans(1, 1, "none"), tokens(2)) > BUG


def test_planted_compressed_tensors_nibble_swap_is_caught(checkpoints, tmp_path):
    # A writer that put column 2k in the high nibble: the honest reader must not agree with the
    # reference of the intended weights.
    _, (layer,) = checkpoints["compressed-tensors"]
    swapped = dataclasses.replace(layer, w13_blocks=(layer.w13_blocks << 4) | (layer.w13_blocks >> 4))
    target = ct_format.write_checkpoint(tmp_path / "swapped", [dataclasses.asdict(swapped)], top_k=TOP_K)
    with open_checkpoint(target) as ck:
        assert sharded_error(ck, layer, plans(1, 1, "none"), tokens(3)) > BUG


def test_planted_router_order_bug_is_caught(checkpoints, monkeypatch):
    # Qwen3's softmax-then-top-k, not renormalised (the writer's norm_topk_prob False), routed
    # as gpt-oss's top-k-then-softmax: the weights sum to 1 instead of to the top-k mass.
    target, (layer,) = checkpoints["compressed-tensors"]
    with open_checkpoint(target) as ck:
        monkeypatch.setattr(ck, "semantics", dataclasses.replace(ck.semantics, router="topk_softmax"))
        honest_semantics = dataclasses.replace(ck.semantics, router="softmax_topk")
        x = tokens(5)
        total = torch.zeros(x.shape[0], H, dtype=torch.float64)
        w = load_layer(ck, 0, plans(1, 1, "none")[0])
        weights, ids = route(x, w.router_weight, w.router_bias, w.top_k, scoring=w.router_scoring)
        total += reference_moe(x.double(), w, weights, ids, torch.float64)
        ref = dense_reference(x, layer, honest_semantics, TOP_K)
        assert float((total - ref).norm() / ref.norm()) > BUG


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tp,ep,align", SHARDINGS)
def test_each_rank_reads_its_share_of_bytes(checkpoints, fmt, tp, ep, align):
    # The loader's byte count, from the tensor sizes: this rank's gate and up rows and down
    # columns (codes and scale bytes, counted in the Hugging Face encoding: 16 + 1 bytes per block,
    # which for GGUF is the file's 17-byte block), biases (GGUF and unfused float32; w2's on TP
    # rank 0 only) and the whole router (Qwen formats bf16 without a bias; GGUF and unfused
    # float32, Quark gpt-oss bf16, with one).
    target, _ = checkpoints[fmt]
    with open_checkpoint(target) as ck:
        for plan in plans(tp, ep, align):
            n, hb = plan.inter, H // 32
            per_expert = 2 * n * (H // 2 + hb) + H * (n // 2 + n // 32)
            if fmt in ("gguf", "quark-gpt-oss", "gpt-oss-unfused"):
                size = 2 if fmt == "quark-gpt-oss" else 4      # bf16 or float32 biases and router
                per_expert += 2 * n * size + (H * size if plan.tp_rank == 0 else 0)
                router = E * H * size + E * size
            else:
                router = E * H * 2
            w = load_layer(ck, 0, plan)
            assert w.bytes_read == plan.num_local_experts * per_expert + router, plan.describe()


def test_every_format_is_read_through_the_one_reader_interface(checkpoints, tmp_path):
    # Issue 29 item 2: one reader per format behind `ExpertReader`, gpt-oss's own layouts (fused
    # HF and original/, per-expert unfused) included, so the loader and verify speak to one interface.
    from mxfp4_moe.checkpoint import MoEConfig
    from mxfp4_moe.formats import ExpertReader
    from mxfp4_moe.semantics import GPT_OSS
    from mxfp4_moe.unfused import unfuse_checkpoint
    _, layers = checkpoints["gguf"]
    config = MoEConfig(num_layers=1, num_experts=E, experts_per_token=TOP_K, hidden_size=H, intermediate_size=I)
    hf = write_checkpoint(tmp_path / "hf", config, layers)
    original = write_checkpoint(tmp_path / "original", config, layers, layout="original")
    with open_checkpoint(hf) as ck_hf, open_checkpoint(original) as ck_original:
        with open_checkpoint(unfuse_checkpoint(ck_hf, tmp_path / "unfused")) as ck_unfused:
            for ck, layout in ((ck_hf, "hf"), (ck_original, "original"), (ck_unfused, "unfused")):
                assert isinstance(ck, ExpertReader) and (ck.layout, ck.semantics) == (layout, GPT_OSS)
    for fmt in FORMATS:
        with open_checkpoint(checkpoints[fmt][0]) as ck:
            assert isinstance(ck, ExpertReader) and ck.layout == LAYOUT[fmt]


def test_moved_reader_names_stay_importable_from_their_old_modules():
    # checkpoint.py and unfused.py re-export what moved to formats/gpt_oss.py and
    # formats/gpt_oss_unfused.py: the same objects, not copies.
    from mxfp4_moe import checkpoint, unfused
    from mxfp4_moe.formats import gpt_oss, gpt_oss_unfused
    for name in ("Checkpoint", "LayerTensors", "Layout", "ORIGINAL_DIR", "layer_tensor_names"):
        assert getattr(checkpoint, name) is getattr(gpt_oss, name), name
    for name in ("UnfusedCheckpoint", "open_unfused_checkpoint", "unfuse_checkpoint", "write_unfused_checkpoint"):
        assert getattr(unfused, name) is getattr(gpt_oss_unfused, name), name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        getattr(checkpoint, "not_a_name")
