"""The checkpoint reader: both layouts, one file and shards, folder discovery, both config
namings, lazy slice reads, and one named test per kind of bad input (each checks that the
CheckpointError names the file or tensor and says what was expected and found).

Bad checkpoints are made by rewriting a good one with safetensors' own `save_file`, so the files
under test do not depend on our writer.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mxfp4_moe.checkpoint import (CheckpointError, LayerTensors, MoEConfig, TensorRef, layer_tensor_names,
                                  open_checkpoint)
from mxfp4_moe.mxfp4 import E8M0_NAN
from mxfp4_moe.synthetic import make_synthetic_checkpoint
from safetensors_edit import assert_refused  # (tests/ is on sys.path)

# Small and not square: E=4, H=64 (2 blocks), I=96 (3 blocks), so H and I cannot be confused.
E, H, I, LAYERS = 4, 64, 96, 2
SMALL = dict(num_layers=LAYERS, num_experts=E, hidden=H, intermediate=I, top_k=2, seed=3)
FIELDS = ("w13_blocks", "w13_scales", "w13_bias", "w2_blocks", "w2_scales", "w2_bias",
          "router_weight", "router_bias")


@pytest.fixture(scope="module")
def hf_one(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("hf_one") / "model", **SMALL)


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("hf_sharded") / "model", shards=4, **SMALL)


@pytest.fixture(scope="module")
def original_model(tmp_path_factory):
    """A model folder holding only original/ (two files, no index), as a partial download leaves it."""
    root = tmp_path_factory.mktemp("orig") / "gpt-oss"
    make_synthetic_checkpoint(root / "original", layout="original", shards=2, **SMALL)
    return root


def _read_layer(layer: LayerTensors) -> dict:
    return {f: getattr(layer, f).read_all() for f in FIELDS}


def _assert_same_layers(path_a, path_b):
    with open_checkpoint(path_a) as a, open_checkpoint(path_b) as b:
        assert a.config == b.config
        for n in range(LAYERS):
            ta, tb = _read_layer(a.layer(n)), _read_layer(b.layer(n))
            for f in FIELDS:
                assert torch.equal(ta[f], tb[f]), f"layer {n} {f}"


# ---- good checkpoints ------------------------------------------------------------------------

def test_hf_one_file_layout_config_and_shapes(hf_one):
    with open_checkpoint(hf_one) as ckpt:
        assert ckpt.layout == "hf"
        assert [f.name for f in ckpt.files] == ["model.safetensors"]
        assert ckpt.config == MoEConfig(num_layers=LAYERS, num_experts=E, experts_per_token=2, hidden_size=H,
                                        intermediate_size=I, swiglu_limit=7.0, swiglu_alpha=1.702,
                                        quant_method="mxfp4")
        layer = ckpt.layer(1)
        assert layer.index == 1
        expected = {"w13_blocks": ((E, 2 * I, H // 32, 16), torch.uint8), "w13_scales": ((E, 2 * I, H // 32), torch.uint8),
                    "w13_bias": ((E, 2 * I), torch.bfloat16), "w2_blocks": ((E, H, I // 32, 16), torch.uint8),
                    "w2_scales": ((E, H, I // 32), torch.uint8), "w2_bias": ((E, H), torch.bfloat16),
                    "router_weight": ((E, H), torch.bfloat16), "router_bias": ((E,), torch.bfloat16)}
        for field, (shape, dtype) in expected.items():
            ref = getattr(layer, field)
            assert (ref.shape, ref.dtype) == (shape, dtype), field
            assert ref.name == layer_tensor_names("hf", 1)[field]
            assert ref.read_all().shape == shape
        assert layer.w13_channel_scale is None and layer.w2_channel_scale is None


def test_hf_sharded_with_index_reads_the_same_tensors(hf_one, hf_sharded):
    with open_checkpoint(hf_sharded) as ckpt:
        assert len(ckpt.files) == 4
        assert len({getattr(ckpt.layer(n), f).file for n in range(LAYERS) for f in FIELDS}) > 1
    _assert_same_layers(hf_one, hf_sharded)


def test_model_folder_holding_only_original(original_model, hf_one):
    with open_checkpoint(original_model) as ckpt:
        assert ckpt.layout == "original"
        assert ckpt.path == original_model / "original"
        assert len(ckpt.files) == 2          # two files, no index: found by scanning headers
        assert ckpt.layer(0).w13_blocks.name == "block.0.mlp.mlp1_weight.blocks"
    _assert_same_layers(original_model, hf_one)         # same seed: the same bytes under other names
    _assert_same_layers(original_model / "original", hf_one)


def test_model_folder_with_both_layouts_prefers_hf_unless_asked(tmp_path):
    root = make_synthetic_checkpoint(tmp_path / "m", **SMALL)
    make_synthetic_checkpoint(root / "original", layout="original", **SMALL)
    with open_checkpoint(root) as ckpt:
        assert ckpt.layout == "hf"
    with open_checkpoint(root, layout="original") as ckpt:
        assert ckpt.layout == "original" and ckpt.path == root / "original"


def test_original_folder_without_config_uses_parent_config(tmp_path):
    root = make_synthetic_checkpoint(tmp_path / "m", **SMALL)
    make_synthetic_checkpoint(root / "original", layout="original", **SMALL)
    (root / "original" / "config.json").unlink()
    with open_checkpoint(root, layout="original") as ckpt:
        assert ckpt.config_file == root / "config.json"
        assert ckpt.config.num_experts == E


def test_channel_scales_present(tmp_path):
    path = make_synthetic_checkpoint(tmp_path / "cs", channel_scales=True, **SMALL)
    with open_checkpoint(path) as ckpt:
        layer = ckpt.layer(0)
        assert layer.w13_channel_scale.shape == (E, 2 * I)
        assert layer.w2_channel_scale.shape == (E, H)
        assert layer.w13_channel_scale.name == "model.layers.0.mlp.experts.gate_up_proj_channel_scale"
        assert bool((layer.w13_channel_scale.read_all() > 0).all())


def test_channel_scale_with_trailing_unit_dim_is_accepted(hf_one, tmp_path):
    names = layer_tensor_names("hf", 0)
    cs = torch.rand(E, 2 * I, 1) + 0.5
    path = _rewrite(hf_one, tmp_path / "cs3", replace={names["w13_channel_scale"]: cs})
    with open_checkpoint(path) as ckpt:
        assert torch.equal(ckpt.layer(0).w13_channel_scale.read_all(), cs)
        assert ckpt.layer(1).w13_channel_scale is None


# ---- config naming ---------------------------------------------------------------------------

def test_config_hf_naming():
    raw = {"num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
           "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0,
           "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": []}}
    assert MoEConfig.from_dict(raw) == MoEConfig(24, 32, 4, 2880, 2880, 7.0, 1.702, "mxfp4")


def test_config_hf_naming_with_only_experts_per_token_and_custom_alpha():
    raw = {"num_hidden_layers": 2, "num_local_experts": 8, "experts_per_token": 2, "hidden_size": 64,
           "intermediate_size": 96, "swiglu_limit": 5.0, "swiglu_alpha": 1.5,
           "quantization_config": {"quant_method": "mxfp4"}}
    cfg = MoEConfig.from_dict(raw)
    assert (cfg.experts_per_token, cfg.swiglu_limit, cfg.swiglu_alpha) == (2, 5.0, 1.5)


def test_config_original_naming():
    # The keys of gpt-oss-120b's original/config.json (no quantization_config, no alpha).
    raw = {"num_hidden_layers": 36, "num_experts": 128, "experts_per_token": 4, "vocab_size": 201088,
           "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
           "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
           "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
           "rope_ntk_alpha": 1, "rope_ntk_beta": 32}
    assert MoEConfig.from_dict(raw) == MoEConfig(36, 128, 4, 2880, 2880, 7.0, 1.702, "mxfp4")


def test_config_missing_key():
    with pytest.raises(CheckpointError, match=r"cfg\.json: missing config key: expected one of \['num_local_experts', 'num_experts'\]"):
        MoEConfig.from_dict({"num_hidden_layers": 2, "experts_per_token": 2, "hidden_size": 64,
                             "intermediate_size": 64}, source="cfg.json")


def test_config_keys_that_disagree():
    with pytest.raises(CheckpointError, match="disagree"):
        MoEConfig.from_dict({"num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 4,
                             "experts_per_token": 2, "hidden_size": 64, "intermediate_size": 64})


def test_config_sizes_not_multiple_of_block():
    with pytest.raises(CheckpointError, match="hidden_size: expected a multiple of the MXFP4 block size 32, found 72"):
        MoEConfig.from_dict({"num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 4,
                             "hidden_size": 72, "intermediate_size": 64})


def test_config_quant_method_not_mxfp4(hf_one, tmp_path):
    path = _rewrite(hf_one, tmp_path / "q", config_update={"quantization_config": {"quant_method": "fp8"}})
    assert_refused(path, r"config\.json: quantization_config\.quant_method: expected 'mxfp4', found 'fp8'")


# ---- lazy reads ------------------------------------------------------------------------------

SLICES = [
    pytest.param((slice(1, 3),), id="experts-1-3"),
    pytest.param((slice(0, E), slice(32, 64)), id="row-range"),
    pytest.param((slice(None), slice(None), slice(1, 2)), id="one-block-column"),
    pytest.param((2, slice(5, 9)), id="int-drops-dim"),
    pytest.param((slice(-2, None), slice(-3, -1)), id="negative-bounds"),
    pytest.param((slice(1, 1),), id="empty"),
]


@pytest.mark.parametrize("index", SLICES)
@pytest.mark.parametrize("field", ["w13_blocks", "w13_scales", "w2_blocks", "w13_bias"])
def test_slice_read_equals_slice_of_full_read(hf_sharded, field, index):
    with open_checkpoint(hf_sharded) as ckpt:
        ref = getattr(ckpt.layer(1), field)
        index = index[:ref.ndim]        # the 2-d bias takes the first two indices
        full = ref.read_all()
        part = ref.read(*index)
        assert torch.equal(part, full[index])
        assert part.is_contiguous()             # a dense copy, not a strided view of the file map
        assert ref.slice_shape(*index) == tuple(full[index].shape)
        assert ref.slice_nbytes(*index) == full[index].numel() * full.element_size()


def test_slice_read_uses_get_slice_not_a_whole_read(hf_one, monkeypatch):
    """A rank's slice must come from safetensors' get_slice, never from reading the tensor whole."""
    with open_checkpoint(hf_one) as ckpt:
        ref = ckpt.layer(0).w2_blocks
        handle = ckpt._handles.get(ref.file)
        calls = []

        class Spy:
            def get_slice(self, name):
                calls.append(("get_slice", name))
                return handle.get_slice(name)

            def get_tensor(self, name):
                calls.append(("get_tensor", name))
                return handle.get_tensor(name)

        monkeypatch.setattr(ckpt._handles, "get", lambda file: Spy())
        part = ref.read(slice(1, 2), slice(0, 32))
        assert calls == [("get_slice", ref.name)]
        assert part.shape == (1, 32, I // 32, 16)


@pytest.mark.parametrize("index, message", [
    pytest.param((slice(0, E + 1),), r"dim 0 has size 4, slice asks for \[0:5\]", id="past-the-end"),
    pytest.param((slice(0, 4, 2),), "only step-1 slices", id="step-2"),
    pytest.param((E,), "dim 0 has size 4, index 4 is out of range", id="int-out-of-range"),
    pytest.param((0, 0, 0, 0, 0), "5 indices for 4 dims", id="too-many-indices"),
])
def test_bad_slices_are_rejected_not_clamped(hf_one, index, message):
    with open_checkpoint(hf_one) as ckpt:
        with pytest.raises(ValueError, match=message):
            ckpt.layer(0).w13_blocks.read(*index)


def test_read_after_close_raises(hf_one):
    with open_checkpoint(hf_one) as ckpt:
        ref = ckpt.layer(0).router_bias
        assert isinstance(ref, TensorRef) and ref.read_all().shape == (E,)
    with pytest.raises(CheckpointError, match="closed"):
        ref.read_all()


# ---- bad input: one named test each ----------------------------------------------------------

def _rewrite(src, dst, *, replace=None, drop=(), config_update=None):
    """Copy checkpoint folder `src` (one file) to `dst` with tensors replaced, added or dropped and
    config.json keys updated; written with safetensors' own save_file."""
    tensors = load_file(str(src / "model.safetensors"))
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.update(config_update or {})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_missing_folder(tmp_path):
    assert_refused(tmp_path / "nope", r"nope: checkpoint folder does not exist")


def test_path_is_a_file(hf_one):
    assert_refused(hf_one / "config.json", "expected a checkpoint folder, found a file")


def test_no_safetensors_files(hf_one, tmp_path):
    (tmp_path / "empty").mkdir()
    shutil.copy(hf_one / "config.json", tmp_path / "empty")
    assert_refused(tmp_path / "empty", r"empty: no \*\.safetensors files")


def test_index_names_absent_file(hf_sharded, tmp_path):
    path = shutil.copytree(hf_sharded, tmp_path / "m")
    (path / "model-00002-of-00004.safetensors").unlink()
    assert_refused(path, r"model\.safetensors\.index\.json: names file model-00002-of-00004"
                         r"\.safetensors .*found no such file")


def test_index_maps_tensor_to_wrong_file(hf_sharded, tmp_path):
    path = shutil.copytree(hf_sharded, tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.router.bias"
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(path, f"maps tensor {name} to {other}, but .* has no tensor of that name")


def test_truncated_file(hf_one, tmp_path):
    path = shutil.copytree(hf_one, tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])     # the last tensor loses its tail
    assert_refused(path, r"model\.safetensors: truncated safetensors file: tensor .* needs "
                         r"bytes up to \d+ of the data section, the file holds only \d+")


def test_truncated_inside_header(hf_one, tmp_path):
    path = shutil.copytree(hf_one, tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:50])
    assert_refused(path, r"corrupt or truncated safetensors file: the length field says \d+ "
                         r"header bytes, the file has 42 after it")


def test_file_shorter_than_length_field(hf_one, tmp_path):
    path = shutil.copytree(hf_one, tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x01\x02\x03")
    assert_refused(path, "expected at least 8 bytes .*found 3")


def test_corrupt_header(hf_one, tmp_path):
    path = shutil.copytree(hf_one, tmp_path / "m")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:12] = b"\xff\xfe{["                                  # not UTF-8 JSON any more
    (path / "model.safetensors").write_bytes(bytes(data))
    assert_refused(path, r"model\.safetensors: corrupt safetensors file: header is not valid JSON")


def test_tensor_missing_for_a_layer(hf_one, tmp_path):
    name = "model.layers.1.mlp.experts.down_proj_scales"
    path = _rewrite(hf_one, tmp_path / "m", drop=[name])
    assert_refused(path, rf"layer 1: tensor {name} is missing \(expected \[4, 64, 3\]")


def test_config_has_more_layers_than_the_files(hf_one, tmp_path):
    path = _rewrite(hf_one, tmp_path / "m", config_update={"num_hidden_layers": 3})
    assert_refused(path, "layer 2: tensor model.layers.2.mlp.experts.gate_up_proj_blocks is missing")


def test_config_has_fewer_layers_than_the_files(hf_one, tmp_path):
    path = _rewrite(hf_one, tmp_path / "m", config_update={"num_hidden_layers": 1})
    assert_refused(path, r"belongs to layer 1, but config .* has num_hidden_layers=1")


def test_blocks_not_uint8(hf_one, tmp_path):
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    blocks = load_file(str(hf_one / "model.safetensors"))[name]
    path = _rewrite(hf_one, tmp_path / "m", replace={name: blocks.view(torch.int8)})
    assert_refused(path, rf"model\.safetensors: tensor {name}: expected uint8 \[E, rows, K/32, 16\]"
                         r".*found torch\.int8 \[4, 192, 2, 16\]")


def test_blocks_last_dim_not_16(hf_one, tmp_path):
    name = "model.layers.1.mlp.experts.down_proj_blocks"
    blocks = load_file(str(hf_one / "model.safetensors"))[name]
    path = _rewrite(hf_one, tmp_path / "m", replace={name: blocks.reshape(E, H, 2 * I // 32, 8)})
    assert_refused(path, rf"tensor {name}: expected uint8 .*found torch\.uint8 \[4, 64, 6, 8\]")


def test_scales_shape_not_blocks_without_last_dim(hf_one, tmp_path):
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"
    scales = load_file(str(hf_one / "model.safetensors"))[name]
    path = _rewrite(hf_one, tmp_path / "m", replace={name: scales[:, :-2].contiguous()})
    assert_refused(path, rf"tensor {name}: expected uint8 \[4, 192, 2\] \(the shape of "
                         r".*gate_up_proj_blocks without its last dim\), found torch\.uint8 \[4, 190, 2\]")


def test_expert_count_inconsistent_with_config(hf_one, tmp_path):
    path = _rewrite(hf_one, tmp_path / "m", config_update={"num_local_experts": 6})
    assert_refused(path, r"gate_up_proj_blocks: expected shape \[6, 192, 2, 16\] "
                         r"\(config .*num_experts=6.*found \[4, 192, 2, 16\]")


def test_hidden_size_inconsistent_with_config(hf_one, tmp_path):
    path = _rewrite(hf_one, tmp_path / "m", config_update={"hidden_size": 96})
    assert_refused(path, r"expected shape \[4, 192, 3, 16\] .*hidden_size=96.*found \[4, 192, 2, 16\]")


def test_intermediate_size_inconsistent_with_config(hf_one, tmp_path):
    path = _rewrite(hf_one, tmp_path / "m", config_update={"intermediate_size": 64})
    assert_refused(path, r"expected shape \[4, 128, 2, 16\] .*intermediate_size=64.*found \[4, 192, 2, 16\]")


def test_router_shape_inconsistent(hf_one, tmp_path):
    name = "model.layers.1.mlp.router.weight"
    path = _rewrite(hf_one, tmp_path / "m", replace={name: torch.zeros(E, H + 32, dtype=torch.bfloat16)})
    assert_refused(path, rf"tensor {name}: expected shape \[4, 64\] .*found \[4, 96\]")


def test_bias_not_float(hf_one, tmp_path):
    name = "model.layers.0.mlp.experts.down_proj_bias"
    path = _rewrite(hf_one, tmp_path / "m", replace={name: torch.zeros(E, H, dtype=torch.int32)})
    assert_refused(path, rf"tensor {name}: expected a float dtype .*found torch\.int32")


def test_channel_scale_bad_shape(hf_one, tmp_path):
    name = layer_tensor_names("hf", 0)["w2_channel_scale"]
    path = _rewrite(hf_one, tmp_path / "m", replace={name: torch.ones(E, H, 2)})
    assert_refused(path, rf"tensor {name}: expected a float tensor of shape \[4, 64\] or "
                         r"\[4, 64, 1\] .*found torch\.float32 \[4, 64, 2\]")


def test_layer_index_out_of_range(hf_one):
    with open_checkpoint(hf_one) as ckpt:
        for bad in (LAYERS, -1):
            with pytest.raises(CheckpointError, match=rf"layer index {bad} out of range: expected 0\.\.1"):
                ckpt.layer(bad)


def test_missing_config(hf_one, tmp_path):
    path = shutil.copytree(hf_one, tmp_path / "m")
    (path / "config.json").unlink()
    assert_refused(path, "no config.json")


def test_config_not_json(hf_one, tmp_path):
    path = shutil.copytree(hf_one, tmp_path / "m")
    (path / "config.json").write_text("{not json")
    assert_refused(path, r"config\.json: config is not valid JSON")


def test_no_moe_tensors(hf_one, tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(8, 64)}, str(tmp_path / "m" / "model.safetensors"))
    shutil.copy(hf_one / "config.json", tmp_path / "m")
    assert_refused(tmp_path / "m", "no MoE expert tensors found")


# ---- NaN scale bytes -------------------------------------------------------------------------

# Where the NaN bytes go: (tensor field, expert, row, block). Expert 3 is the last expert and
# block 2 the last of w2's 3 blocks, so off-by-one in the scan would miss them.
NAN_SPOTS = [("w13_scales", 0, 5, 1), ("w13_scales", 3, 191, 0), ("w2_scales", 3, 17, 2)]


@pytest.fixture(scope="module")
def nan_checkpoint(hf_one, tmp_path_factory):
    tensors = load_file(str(hf_one / "model.safetensors"))
    names = layer_tensor_names("hf", 1)
    replace = {}
    for field, e, r, b in NAN_SPOTS:
        scales = replace.get(names[field], tensors[names[field]].clone())
        scales[e, r, b] = E8M0_NAN
        replace[names[field]] = scales
    return _rewrite(hf_one, tmp_path_factory.mktemp("nan") / "m", replace=replace)


def test_nan_scales_reported_by_default(nan_checkpoint):
    names = layer_tensor_names("hf", 1)
    with open_checkpoint(nan_checkpoint) as ckpt:
        ckpt.layer(1)                                   # "report": reading is allowed
        assert ckpt.find_nan_scales(0).count == 0
        report = ckpt.find_nan_scales(1)
        count, locations = report
        assert count == 3
        assert [(loc.tensor, loc.index) for loc in locations] == [
            (names[field], (e, r, b)) for field, e, r, b in NAN_SPOTS]
        assert "expert 3, row 17, block 2" in report.describe()
        assert ckpt.find_nan_scales(1, limit=1).count == 3
        assert len(ckpt.find_nan_scales(1, limit=1).locations) == 1


def test_nan_scales_rejected_with_error_policy(nan_checkpoint):
    with open_checkpoint(nan_checkpoint, nan_scales="error") as ckpt:
        ckpt.layer(0)                                   # clean layer: fine
        with pytest.raises(CheckpointError, match=r"model\.safetensors: model\.layers\.1\.mlp\.experts\.gate_up_proj_scales: "
                                                  r"NaN scale byte 0xFF at expert 0, row 5, block 1: expected finite "
                                                  r"E8M0 scales, found 3 NaN scale bytes in layer 1"):
            ckpt.layer(1)


def test_nan_scale_policy_must_be_known(hf_one):
    with pytest.raises(ValueError, match="nan_scales must be 'report' or 'error'"):
        open_checkpoint(hf_one, nan_scales="ignore")
