"""Hostile and damaged checkpoints (issue 26), one named test per case: what a stranger's upload or
a half-written copy can hold. Each ends in a CheckpointError naming the file and tensor (or config
key) and saying what was expected and found, never in a silent wrong load or a foreign exception.
"""

import json
from pathlib import Path

import pytest
import torch

from mxfp4_moe.checkpoint import CONFIG_FILE, INDEX_FILE, CheckpointError, open_checkpoint
from mxfp4_moe.synthetic import DenseSpec, make_synthetic_checkpoint
from safetensors_edit import (assert_refused, merge_first_two_dims_in_header,  # (tests/ is on sys.path)
                              read_header, write_header)

# The model: original-layout qkv of 4 q heads + 2 x 2 kv heads of 16 = 128 rows.
FULL = dict(num_layers=2, num_experts=4, hidden=64, intermediate=64, top_k=2, seed=5, full_model=True,
            dense=DenseSpec(vocab_size=128))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _load_model(path):
    pytest.importorskip("transformers", reason="load_model needs Hugging Face transformers")
    from mxfp4_moe.integrations.transformers import load_model
    return load_model(path, device="cpu", dtype=torch.float32, progress=False)


# ---- silent wrong loads -----------------------------------------------------------------------

def test_original_layout_qkv_rows_must_total_the_configs_heads(tmp_path):
    # num_key_value_heads 1 instead of 2: q 64 + k 16 + v 16 = 96 of the 128 rows; the old code
    # took k from rows 64:80, v from 80:96 and dropped the rest.
    path = make_synthetic_checkpoint(tmp_path / "m", layout="original", **FULL)
    _edit_config(path, num_key_value_heads=1)
    with pytest.raises(CheckpointError) as err:
        _load_model(path)
    msg = str(err.value)
    assert "block.0.attn.qkv." in msg and "expected shape [96" in msg and "found [128" in msg
    assert "4 + 2 x 1 heads of 16" in msg


def test_dense_tensor_of_integer_dtype_is_refused(tmp_path):
    # BF16 -> I16 in the header: the same byte count, so the reader's header checks pass; the old
    # code cast the integers to floats.
    path = make_synthetic_checkpoint(tmp_path / "m", **FULL)
    file = path / "model.safetensors"
    header, data = read_header(file)
    header["model.embed_tokens.weight"]["dtype"] = "I16"
    write_header(file, header, data)
    with pytest.raises(CheckpointError) as err:
        _load_model(path)
    msg = str(err.value)
    assert "model.safetensors" in msg and "model.embed_tokens.weight" in msg and "found torch.int16" in msg


def test_absurd_vocab_size_is_refused_before_allocation(tmp_path):
    # vocab_size 2**34: the old code allocated the 4 TB embedding before any shape check.
    path = make_synthetic_checkpoint(tmp_path / "m", **FULL)
    _edit_config(path, vocab_size=2 ** 34)
    with pytest.raises(CheckpointError, match=rf"config\.json: vocab_size: expected an int in \[1, 2147483647\], "
                                              rf"found {2 ** 34}"):
        _load_model(path)


def test_dense_tensor_of_wrong_shape_is_refused_before_allocation(tmp_path):
    # A vocab_size in range that the checkpoint's embedding [128, 64] does not have.
    path = make_synthetic_checkpoint(tmp_path / "m", **FULL)
    _edit_config(path, vocab_size=2 ** 24)
    with pytest.raises(CheckpointError) as err:
        _load_model(path)
    msg = str(err.value)
    assert "model.safetensors: tensor model.embed_tokens.weight" in msg
    assert f"expected shape [{2 ** 24}, 64]" in msg and "found [128, 64]" in msg


# ---- config.json and the index ----------------------------------------------------------------

SMALL = dict(num_layers=2, num_experts=4, hidden=64, intermediate=64, top_k=2, seed=5)


@pytest.fixture
def sharded(tmp_path):
    return make_synthetic_checkpoint(tmp_path / "m", shards=2, **SMALL)


@pytest.mark.parametrize("name", [CONFIG_FILE, INDEX_FILE])
def test_json_nested_200000_deep_is_refused(sharded, name):
    # json.loads recursed into a RecursionError.
    (sharded / name).write_text("[" * 200_000 + "]" * 200_000)
    assert_refused(sharded, rf"{name}: .* is nested more than 32 levels deep")


@pytest.mark.parametrize("name", [CONFIG_FILE, INDEX_FILE])
def test_json_nested_40_deep_is_refused(sharded, name):
    # Deep enough to be no checkpoint's, shallow enough for the parser: the depth bound itself.
    value = {"weight_map": {}} if name == INDEX_FILE else json.loads((sharded / name).read_text())
    value["deep"] = json.loads("[" * 40 + "]" * 40)
    (sharded / name).write_text(json.dumps(value))
    assert_refused(sharded, rf"{name}: .* is nested more than 32 levels deep")


@pytest.mark.parametrize("name", [CONFIG_FILE, INDEX_FILE])
def test_json_larger_than_16_mib_is_refused_unparsed(sharded, name):
    # A sparse 8 GiB file: the old reader read it whole (MemoryError). Only 16 MiB + 1 byte is read.
    with open(sharded / name, "r+b") as f:
        f.truncate(8 * 2 ** 30)
    assert_refused(sharded, rf"{name}: expected a .* of at most 16777216 bytes, found a larger file")


def test_swiglu_limit_beyond_float32_is_refused(sharded):
    # 1e39 passed as a finite float64, then overflowed converting to float32 in the reference.
    _edit_config(sharded, swiglu_limit=1e39)
    assert_refused(sharded, r"config.json: swiglu_limit: expected a number > 0 and at most "
                            r"3\.403e\+38 \(float32\), found 1e\+39")


# ---- files named *.safetensors that are not files ---------------------------------------------

@pytest.fixture
def one_file(tmp_path):
    return make_synthetic_checkpoint(tmp_path / "m", **SMALL)


def test_directory_named_safetensors_is_refused(one_file):
    (one_file / "extra.safetensors").mkdir()
    assert_refused(one_file, r"extra\.safetensors: expected a safetensors file, found a directory")


def test_broken_symlink_named_safetensors_is_refused(one_file):
    (one_file / "extra.safetensors").symlink_to(one_file / "gone.bin")
    assert_refused(one_file, r"extra\.safetensors: expected a safetensors file, found a broken "
                             r"symbolic link \(to .*gone\.bin\)")


def test_symlink_loop_named_safetensors_is_refused(one_file):
    (one_file / "extra.safetensors").symlink_to(one_file / "extra.safetensors")
    assert_refused(one_file, r"extra\.safetensors: expected a safetensors file, found a symbolic "
                             r"link loop")


def test_index_naming_a_directory_is_refused(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "sub.safetensors"
    (sharded / "sub.safetensors").mkdir()
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    assert_refused(sharded, r"sub\.safetensors: expected a safetensors file, found a directory")


# ---- symbolic links: the policy ---------------------------------------------------------------

def test_config_linked_outside_the_folder_is_refused_unread(one_file, monkeypatch):
    # /proc/self/environ was read (and a parse error could quote it). Now it is not opened at all.
    monkeypatch.setenv("MXFP4_SECRET_FOR_TEST", "hunter2-do-not-echo")
    (one_file / CONFIG_FILE).unlink()
    (one_file / CONFIG_FILE).symlink_to("/proc/self/environ")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(one_file)
    msg = str(err.value)
    assert "a symbolic link to /proc/" in msg and "outside the checkpoint folder" in msg
    assert "hunter2" not in msg


def test_shard_linked_outside_the_folder_is_refused(one_file, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (one_file / "model.safetensors").rename(elsewhere / "model.safetensors")
    (one_file / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    assert_refused(one_file, r"model\.safetensors: a symbolic link to .*elsewhere.*outside the "
                             r"checkpoint folder")


def test_links_inside_the_folder_are_followed(one_file):
    (one_file / "model.safetensors").rename(one_file / "data.bin")
    (one_file / "model.safetensors").symlink_to("data.bin")
    with open_checkpoint(one_file) as ckpt:
        assert ckpt.layer(0).w13_blocks.read_all().shape == (4, 128, 2, 16)


def _hf_cache(source: Path, cache: Path) -> Path:
    """The Hugging Face cache layout of `source`: models--org--name/snapshots/<rev>/<file> linked
    to ../../blobs/<hash> (relative links, as huggingface_hub writes them)."""
    entry = cache / "models--org--model"
    blobs, snapshot = entry / "blobs", entry / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for n, file in enumerate(sorted(source.iterdir())):
        blob = blobs / f"{n:040x}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


def test_hugging_face_cache_layout_loads(sharded, tmp_path):
    snapshot = _hf_cache(sharded, tmp_path / "hub")
    with open_checkpoint(sharded) as a, open_checkpoint(snapshot) as b:
        assert a.config == b.config
        for n in range(a.config.num_layers):
            for field, ref in a.layer(n).tensors().items():
                assert torch.equal(ref.read_all(), getattr(b.layer(n), field).read_all()), (n, field)


# ---- the file changes after open_checkpoint ---------------------------------------------------

def test_shard_rewritten_after_open_fails_by_name(one_file):
    # Another shape under the same name, same bytes: the old reader hit an assert (and under
    # python -O returned a tensor of the wrong shape).
    file = one_file / "model.safetensors"
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    with open_checkpoint(one_file) as ckpt:
        merge_first_two_dims_in_header(file, name)
        with pytest.raises(CheckpointError, match=r"model\.safetensors: the safetensors file changed on disk since "
                                                  r"the checkpoint was opened"):
            ckpt.layer(0).w13_blocks.read_all()


def test_read_of_a_changed_header_fails_even_with_the_same_identity(one_file, monkeypatch):
    # The second line of defence, where the file's size and time did not move: no assert.
    import mxfp4_moe.checkpoint as checkpoint
    file = one_file / "model.safetensors"
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    with open_checkpoint(one_file) as ckpt:
        merge_first_two_dims_in_header(file, name)
        monkeypatch.setattr(checkpoint._FileHandles, "_check_unchanged", lambda self, f: None)
        with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks: "
                                                  r"expected torch\.uint8 \[4, 128, 2, 16\] as the header said"):
            ckpt.layer(0).w13_blocks.read_all()


# ---- load_model hands config.json to transformers only once it is checked ----------------------

@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("full") / "m", **FULL)


@pytest.mark.parametrize("key, value, message", [
    ("rope_scaling", "x", r"rope_scaling: expected null or an object, found 'x'"),
    ("vocab_size", "128", r"vocab_size: expected an int in \[1, 2147483647\], found '128'"),
    ("num_attention_heads", 0, r"num_attention_heads: expected an int in \[1, 2147483647\], found 0"),
    ("self", 1, r"config key 'self': expected a name of letters"),
    ("head_dim", -16, r"head_dim: expected an int in \[1, 2147483647\], found -16"),
    ("num_key_value_heads", 3, r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("to_dict", 1, r"config key 'to_dict' would replace GptOssConfig's method"),
    ("layer_types", ["full_attention"], r"layer_types: expected a list of num_hidden_layers = 2 entries"),
    ("sliding_window", None, r"sliding_window: expected an int in \[1, 2147483647\], found None"),
], ids=["rope_scaling_string", "vocab_size_string", "zero_heads", "key_self", "negative_head_dim",
        "kv_heads_not_dividing", "method_name_key", "layer_types_short", "sliding_window_null"])
def test_load_model_checks_the_config_before_transformers(full_model, tmp_path, key, value, message):
    import shutil
    path = tmp_path / "m"
    shutil.copytree(full_model, path)
    _edit_config(path, **{key: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        _load_model(path)


def test_original_layout_with_hugging_face_config_names_loads_the_same_model(tmp_path):
    # open_checkpoint read the HF names; load_model's conversion then looked for 'num_experts'
    # (KeyError). The HF-named config is handed to transformers as it is.
    pytest.importorskip("transformers")
    original = make_synthetic_checkpoint(tmp_path / "o", layout="original", **FULL)
    hf = make_synthetic_checkpoint(tmp_path / "h", **FULL)
    renamed = tmp_path / "renamed"
    import shutil
    shutil.copytree(original, renamed)
    shutil.copy(hf / CONFIG_FILE, renamed / CONFIG_FILE)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _load_model(original)(ids).logits
        got = _load_model(renamed)(ids).logits
    assert torch.equal(got, expected)


def test_original_folder_linked_outside_is_refused(tmp_path):
    # The original/ folder itself a link out of the model folder: its files resolve outside.
    elsewhere = make_synthetic_checkpoint(tmp_path / "elsewhere", layout="original", **SMALL)
    model = tmp_path / "model"
    model.mkdir()
    (model / "original").symlink_to(elsewhere)
    assert_refused(model, r"original/model\.safetensors: a symbolic link to .*elsewhere.*"
                          r"outside the checkpoint folder")


def test_hugging_face_cache_original_folder_loads(tmp_path):
    # snapshots/<rev>/original/<file> -> ../../../blobs/<hash>, as huggingface_hub writes it.
    source = make_synthetic_checkpoint(tmp_path / "src", layout="original", **SMALL)
    entry = tmp_path / "hub" / "models--org--model"
    (entry / "blobs").mkdir(parents=True)
    snapshot = entry / "snapshots" / "0123abcd"
    (snapshot / "original").mkdir(parents=True)
    for n, file in enumerate(sorted(source.iterdir())):
        (entry / "blobs" / f"{n:040x}").write_bytes(file.read_bytes())
        (snapshot / "original" / file.name).symlink_to(Path("../../../blobs") / f"{n:040x}")
    with open_checkpoint(snapshot) as ckpt, open_checkpoint(source) as intact:
        assert ckpt.layout == "original" and ckpt.config == intact.config
        assert torch.equal(ckpt.layer(1).w2_blocks.read_all(), intact.layer(1).w2_blocks.read_all())


def test_load_model_names_a_failed_dense_allocation(tmp_path, monkeypatch):
    # to_empty is where the dense weights are allocated: a failure there says what and how much.
    pytest.importorskip("transformers")
    path = make_synthetic_checkpoint(tmp_path / "m", **FULL)

    def no_memory(self, *, device, recurse=True):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 65536 bytes")
    monkeypatch.setattr(torch.nn.Module, "to_empty", no_memory)
    with pytest.raises(MemoryError, match=r"load_model: cannot allocate the dense weights \(0\.00 GiB of "
                                          r"torch\.float32 on cpu\) for .*: DefaultCPUAllocator"):
        _load_model(path)
