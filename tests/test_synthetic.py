"""The checkpoint writer and synthetic checkpoints: determinism by seed, shapes and config
fields, dequantized weights against the float weights they came from, and write -> read round
trips (float input, pre-quantized input, channel scales, shards), read back with our reader and
with safetensors' own loader.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from mxfp4_moe.checkpoint import MoEConfig, layer_tensor_names, open_checkpoint
from mxfp4_moe.mxfp4 import E8M0_NAN, dequantize, e8m0_to_float, quantize
from mxfp4_moe.synthetic import (LayerWeights, make_synthetic_checkpoint, synthetic_expert_weights,
                                 synthetic_layer, write_checkpoint)

E, H, I, LAYERS = 4, 64, 96, 2
SMALL = dict(num_layers=LAYERS, num_experts=E, hidden=H, intermediate=I, top_k=2)
FIELDS = ("w13_blocks", "w13_scales", "w13_bias", "w2_blocks", "w2_scales", "w2_bias",
          "router_weight", "router_bias")


def _all_tensors(path) -> dict:
    with open_checkpoint(path) as ckpt:
        return {(n, f): getattr(ckpt.layer(n), f).read_all() for n in range(ckpt.config.num_layers) for f in FIELDS}


# ---- determinism and shapes ------------------------------------------------------------------

def test_same_seed_gives_identical_files(tmp_path):
    a = make_synthetic_checkpoint(tmp_path / "a", seed=7, **SMALL)
    b = make_synthetic_checkpoint(tmp_path / "b", seed=7, **SMALL)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


def test_different_seed_gives_different_weights(tmp_path):
    a = _all_tensors(make_synthetic_checkpoint(tmp_path / "a", seed=7, **SMALL))
    b = _all_tensors(make_synthetic_checkpoint(tmp_path / "b", seed=8, **SMALL))
    for key in a:
        assert not torch.equal(a[key], b[key]), key


def test_layers_and_experts_differ_from_each_other(tmp_path):
    t = _all_tensors(make_synthetic_checkpoint(tmp_path / "a", seed=0, **SMALL))
    assert not torch.equal(t[(0, "w13_blocks")], t[(1, "w13_blocks")])
    blocks = t[(0, "w2_blocks")]
    assert all(not torch.equal(blocks[0], blocks[e]) for e in range(1, E))


@pytest.mark.parametrize("layout, shards", [("hf", 3), ("original", 1), ("original", 2)],
                         ids=["hf-3-shards", "original", "original-2-shards"])
def test_seed_gives_same_tensors_whatever_layout_or_sharding(tmp_path, layout, shards):
    base = _all_tensors(make_synthetic_checkpoint(tmp_path / "base", seed=4, **SMALL))
    other = _all_tensors(make_synthetic_checkpoint(tmp_path / "o", seed=4, layout=layout, shards=shards, **SMALL))
    assert base.keys() == other.keys()
    for key in base:
        assert torch.equal(base[key], other[key]), key


def test_hf_config_json_fields(tmp_path):
    path = make_synthetic_checkpoint(tmp_path / "m", swiglu_limit=6.5, **SMALL)
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "gpt_oss"
    assert raw["quantization_config"]["quant_method"] == "mxfp4"
    assert "model.layers.*.mlp.router" in raw["quantization_config"]["modules_to_not_convert"]
    assert (raw["num_hidden_layers"], raw["num_local_experts"], raw["num_experts_per_tok"],
            raw["experts_per_token"], raw["hidden_size"], raw["intermediate_size"], raw["swiglu_limit"]) == \
           (LAYERS, E, 2, 2, H, I, 6.5)


def test_original_config_json_fields(tmp_path):
    path = make_synthetic_checkpoint(tmp_path / "m", layout="original", **SMALL)
    raw = json.loads((path / "config.json").read_text())
    assert (raw["num_hidden_layers"], raw["num_experts"], raw["experts_per_token"]) == (LAYERS, E, 2)
    assert "quantization_config" not in raw and "num_local_experts" not in raw and "swiglu_alpha" not in raw


def test_shapes_and_dtypes_as_written(tmp_path):
    path = make_synthetic_checkpoint(tmp_path / "m", **SMALL)
    tensors = load_file(str(path / "model.safetensors"))      # safetensors' reader, not ours
    names = layer_tensor_names("hf", 1)
    assert tensors[names["w13_blocks"]].shape == (E, 2 * I, H // 32, 16)
    assert tensors[names["w13_scales"]].shape == (E, 2 * I, H // 32)
    assert tensors[names["w2_blocks"]].shape == (E, H, I // 32, 16)
    assert tensors[names["w2_scales"]].shape == (E, H, I // 32)
    assert tensors[names["w13_bias"]].dtype == torch.bfloat16 and tensors[names["w13_bias"]].shape == (E, 2 * I)
    assert tensors[names["router_weight"]].dtype == torch.bfloat16
    assert tensors[names["w13_blocks"]].dtype == torch.uint8
    assert len(tensors) == 8 * LAYERS                            # MoE tensors only without full_model


def test_sharded_hf_files_and_index(tmp_path):
    path = make_synthetic_checkpoint(tmp_path / "m", shards=3, **SMALL)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in range(3)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    union = {}
    for f in files:
        union.update(load_file(str(path / f)))
    assert set(index["weight_map"]) == set(union)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in union.values())


def test_more_shards_than_tensors_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="shards=17 exceeds the 16 tensors to write"):
        make_synthetic_checkpoint(tmp_path / "m", shards=17, **SMALL)


# ---- the generated weights -------------------------------------------------------------------

def test_dequantized_weights_close_to_the_generated_floats(tmp_path):
    """Each stored expert dequantizes to within MXFP4's error of `synthetic_expert_weights`.

    Bound per element (floor scale, RNE): with scale s = 2**(floor(log2 amax) - 2), amax/s is in
    [4, 8); the grid step at the top is 2 so rounding errs by at most 1*s, and saturation (values
    in (6, 8)) by at most 2*s: |x - q| <= 2*s. Relative Frobenius error of Gaussian-like blocks
    under MXFP4 is about 0.1; 0.2 is the bound written down here.
    """
    path = make_synthetic_checkpoint(tmp_path / "m", seed=9, **SMALL)
    with open_checkpoint(path) as ckpt:
        for n in range(LAYERS):
            layer = ckpt.layer(n)
            for e in range(E):
                w13, w2 = synthetic_expert_weights(9, n, e, H, I)
                for w, blocks, scales in ((w13, layer.w13_blocks, layer.w13_scales), (w2, layer.w2_blocks, layer.w2_scales)):
                    b, s = blocks.read(e), scales.read(e)
                    q = dequantize(b, s, torch.float32)
                    assert q.shape == w.shape
                    bound = 2 * e8m0_to_float(s).repeat_interleave(32, dim=-1)
                    assert bool(((w - q).abs() <= bound).all()), f"layer {n} expert {e}"
                    rel = float((w - q).norm() / w.norm())
                    assert 0 < rel < 0.2, f"layer {n} expert {e}: relative error {rel}"


def test_gate_and_up_rows_are_interleaved():
    """Row 2j is gate j, row 2j+1 is up j; up is drawn half as large, so odd rows are smaller."""
    w13, _ = synthetic_expert_weights(0, 0, 0, 256, 256)
    gate_rms = w13[0::2].pow(2).mean().sqrt()
    up_rms = w13[1::2].pow(2).mean().sqrt()
    assert 1.6 < float(gate_rms / up_rms) < 2.5


def test_scale_bytes_vary(tmp_path):
    """Per-row gains spread the block scales over several exponents (realistic, and needed for
    tests that would miss a scale applied to the wrong row)."""
    layer = synthetic_layer(MoEConfig(1, E, 2, H, I), 0, seed=1)
    assert layer.w13_scales.unique().numel() >= 4
    assert layer.w2_scales.unique().numel() >= 4


# ---- write -> read round trips ---------------------------------------------------------------

def _float_layer(config, g):
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    return LayerWeights(w13=torch.randn(e, 2 * i, h, generator=g), w2=torch.randn(e, h, i, generator=g) * 3,
                        w13_bias=torch.randn(e, 2 * i, generator=g), w2_bias=torch.randn(e, h, generator=g),
                        router_weight=torch.randn(e, h, generator=g), router_bias=torch.randn(e, generator=g),
                        w13_channel_scale=torch.rand(e, 2 * i, generator=g) + 0.5,
                        w2_channel_scale=torch.rand(e, h, generator=g) + 0.5)


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize("scale_rounding", ["floor", "round_up"])
def test_round_trip_from_float_weights(tmp_path, layout, scale_rounding):
    config = MoEConfig(num_layers=2, num_experts=3, experts_per_token=2, hidden_size=32, intermediate_size=64,
                       swiglu_limit=5.0, swiglu_alpha=1.5)
    g = torch.Generator().manual_seed(123)
    layers = [_float_layer(config, g) for _ in range(config.num_layers)]
    path = write_checkpoint(tmp_path / "m", config, layers, layout=layout, shards=2, scale_rounding=scale_rounding)
    with open_checkpoint(path) as ckpt:
        assert ckpt.config == config
        assert ckpt.layout == layout
        for n, lw in enumerate(layers):
            layer = ckpt.layer(n)
            for proj in ("w13", "w2"):
                blocks, scales = quantize(getattr(lw, proj), scale_rounding=scale_rounding)
                assert torch.equal(getattr(layer, f"{proj}_blocks").read_all(), blocks)
                assert torch.equal(getattr(layer, f"{proj}_scales").read_all(), scales)
            for field in ("w13_bias", "w2_bias", "router_weight", "router_bias"):
                assert torch.equal(getattr(layer, field).read_all(), getattr(lw, field).to(torch.bfloat16)), field
            for field in ("w13_channel_scale", "w2_channel_scale"):
                assert torch.equal(getattr(layer, field).read_all(), getattr(lw, field)), field


def test_round_trip_from_quantized_blocks_including_nan_scale(tmp_path):
    """Pre-quantized bytes are written as given, a NaN scale byte included (the reader then reports it)."""
    config = MoEConfig(num_layers=1, num_experts=E, experts_per_token=2, hidden_size=H, intermediate_size=I)
    lw = synthetic_layer(config, 0, seed=2)
    lw.w2_scales[1, 2, 0] = E8M0_NAN
    path = write_checkpoint(tmp_path / "m", config, [lw])
    with open_checkpoint(path) as ckpt:
        layer = ckpt.layer(0)
        for field in ("w13_blocks", "w13_scales", "w2_blocks", "w2_scales"):
            assert torch.equal(getattr(layer, field).read_all(), getattr(lw, field)), field
        report = ckpt.find_nan_scales(0)
        assert report.count == 1 and report.locations[0].index == (1, 2, 0)


def test_writer_rejects_wrong_shapes(tmp_path):
    config = MoEConfig(num_layers=1, num_experts=E, experts_per_token=2, hidden_size=H, intermediate_size=I)
    lw = synthetic_layer(config, 0)
    lw.router_bias = torch.zeros(E + 1)
    with pytest.raises(ValueError, match=r"layer 0 router_bias: expected shape \[4\], found \[5\]"):
        write_checkpoint(tmp_path / "m", config, [lw])


def test_writer_rejects_float_and_blocks_together(tmp_path):
    config = MoEConfig(num_layers=1, num_experts=E, experts_per_token=2, hidden_size=H, intermediate_size=I)
    lw = synthetic_layer(config, 0)
    lw.w13 = torch.randn(E, 2 * I, H)
    with pytest.raises(ValueError, match="layer 0 w13: give float weights or blocks/scales, not both"):
        write_checkpoint(tmp_path / "m", config, [lw])


def test_writer_rejects_wrong_layer_count(tmp_path):
    config = MoEConfig(num_layers=2, num_experts=E, experts_per_token=2, hidden_size=H, intermediate_size=I)
    with pytest.raises(ValueError, match=r"expected 2 LayerWeights \(config.num_layers\), found 1"):
        write_checkpoint(tmp_path / "m", config, [synthetic_layer(config, 0)])


def test_full_model_adds_dense_tensors(tmp_path):
    path = make_synthetic_checkpoint(tmp_path / "m", full_model=True, **SMALL)
    names = set(load_file(str(path / "model.safetensors")))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.sinks",
                 "model.layers.0.post_attention_layernorm.weight"):
        assert name in names
    with open_checkpoint(path) as ckpt:        # the reader ignores dense tensors but can hand them out
        assert ckpt.tensor("lm_head.weight").shape == (256, H)
