"""`load_model` on a gpt-oss GGUF file: a tiny whole model (`synthetic_formats.make_gguf_model_checkpoint`:
MXFP4 experts, dense matrices in F32, F16, BF16 or Q8_0, 1-D tensors F32) against its twin in the
Hugging Face layout holding the same values. Both build the same GptOssForCausalLM from the same
float32 values with the same code, so the logits agree to float32 rounding (measured: bitwise);
the bound 1e-6 relative leaves room for a summation order that differs. Also the facts the GGUF
side rests on (tensor names, metadata keys), pinned against the gguf package, and
`verify --model --reference` on the pair."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the whole model needs Hugging Face transformers")
gguf = pytest.importorskip("gguf", reason="GGUF files are parsed with the gguf package")

from mxfp4_moe import verify  # noqa: E402
from mxfp4_moe.checkpoint import CheckpointError, open_checkpoint  # noqa: E402
from mxfp4_moe.formats import gguf as gguf_format  # noqa: E402
from mxfp4_moe.integrations import transformers as integration  # noqa: E402
from mxfp4_moe.integrations.transformers import MXFP4GptOssMLP, load_model  # noqa: E402
from mxfp4_moe.synthetic_formats import make_gguf_model_checkpoint  # noqa: E402

TOL = 1e-6
DENSE_TYPES = ("F32", "F16", "BF16", "Q8_0")
FAST = ["--backend", "torch", "--tokens", "8", "--quiet"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {t: make_gguf_model_checkpoint(tmp_path_factory.mktemp(t) / "m", dense_type=t, seed=3) for t in DENSE_TYPES}


def _logits(model, seed=0):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- facts, pinned against the gguf package ------------------------------------------------------

def test_dense_tensor_names_are_the_converters_map():
    # gguf 0.19 tensor_mapping.py: get_tensor_name_map(GPT_OSS) is the map llama.cpp's
    # convert_hf_to_gguf.py renames Hugging Face tensors with. The sinks have no suffix there; the
    # gpt-oss converter appends ".weight" (FORMATS_OTHER.md section 3, blk.N.attn_sinks.weight).
    from transformers import GptOssConfig, GptOssForCausalLM
    config = GptOssConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_local_experts=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)
    with torch.device("meta"):
        names = [n for n, _ in GptOssForCausalLM(config).named_parameters() if ".mlp." not in n]
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, 2)
    for name in names:
        stem = name.removesuffix(".weight").removesuffix(".bias")
        suffix = name[len(stem):] or ".weight"
        assert gguf_format.dense_tensor_name(name) == table.get_name(stem) + suffix, name
    assert len(names) == 3 + 2 * 11


def test_metadata_keys_are_gguf_constants(models):
    # gguf 0.19 constants.py: MODEL_ARCH_NAMES[GPT_OSS] and the Keys.LLM / Attention / Rope templates.
    K = gguf.Keys
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT_OSS]
    assert arch == gguf_format.ARCH
    keys = {t.format(arch=arch) for t in (
        K.LLM.CONTEXT_LENGTH, K.LLM.BLOCK_COUNT, K.LLM.EMBEDDING_LENGTH, K.LLM.EXPERT_FEED_FORWARD_LENGTH,
        K.LLM.EXPERT_COUNT, K.LLM.EXPERT_USED_COUNT, K.Attention.HEAD_COUNT, K.Attention.HEAD_COUNT_KV,
        K.Attention.KEY_LENGTH, K.Attention.LAYERNORM_RMS_EPS, K.Attention.SLIDING_WINDOW, K.Rope.FREQ_BASE,
        K.Rope.SCALING_TYPE, K.Rope.SCALING_FACTOR, K.Rope.SCALING_ORIG_CTX_LEN)}
    file, _ = models["BF16"]
    written = set(gguf.GGUFReader(str(file)).fields)
    assert keys <= written, keys - written
    with open_checkpoint(file) as ck:
        read = set()
        real = ck._field
        ck._field = lambda key, default=None: (read.add(key), real(key, default))[1]
        ck.model_config()
    assert read - {f"{arch}.rope.scaling.yarn_beta_fast", f"{arch}.rope.scaling.yarn_beta_slow"} <= keys


# ---- the whole model ----------------------------------------------------------------------------

@pytest.mark.parametrize("dense_type", DENSE_TYPES)
def test_load_model_gguf_matches_the_hugging_face_twin(models, dense_type):
    file, twin = models[dense_type]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(file)).tensors}
    assert types["token_embd.weight"] == types["blk.1.attn_q.weight"] == dense_type       # the type asked for
    assert types["blk.0.attn_norm.weight"] == types["blk.0.attn_sinks.weight"] == "F32"
    ours = load_model(file, device="cpu", dtype=torch.float32, backend="torch", progress=False)
    ref = load_model(twin, device="cpu", dtype=torch.float32, backend="torch", progress=False)
    assert all(isinstance(layer.mlp, MXFP4GptOssMLP) for layer in ours.model.layers)
    for key in ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                "layer_types", "rms_norm_eps", "max_position_embeddings", "rope_parameters"):
        assert getattr(ours.config, key) == getattr(ref.config, key), key
    got, want = _logits(ours), _logits(ref)
    assert _rel(got, want) < TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_load_model_gguf_folder_holding_one_file(models):
    file, twin = models["F32"]
    model = load_model(file.parent, device="cpu", dtype=torch.float32, backend="torch", progress=False)
    ref = load_model(twin, device="cpu", dtype=torch.float32, backend="torch", progress=False)
    assert _rel(_logits(model), _logits(ref)) < TOL


def test_quantized_dense_tensors_really_differ_from_the_original(models):
    # The Q8_0 twin holds the Q8_0 values: the original bf16 weights would give other logits,
    # so the equality above is not the loader ignoring the dense type.
    _, q8_twin = models["Q8_0"]
    _, f32_twin = models["F32"]
    a = load_model(q8_twin, device="cpu", dtype=torch.float32, backend="torch", progress=False)
    b = load_model(f32_twin, device="cpu", dtype=torch.float32, backend="torch", progress=False)
    assert _rel(_logits(a), _logits(b)) > 1e-4


# ---- bad files ----------------------------------------------------------------------------------

def _rewrite(src, dst, *, drop_tensor=None, reshape=None, drop_key=None, to_bf16=()):
    """A copy of GGUF file `src` without one tensor / metadata key, with one tensor's rows cut, or
    with the F32 tensors `to_bf16` in BF16."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), gguf_format.ARCH)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", drop_key):
            continue
        value = field.contents()
        vtype = field.types[0]
        writer.add_key_value(name, value, vtype)
    for t in reader.tensors:
        if t.name == drop_tensor:
            continue
        data = np.array(t.data)
        if t.name == reshape:
            data = data[:-1]
        if t.name in to_bf16:
            bf16 = gguf.GGMLQuantizationType.BF16
            writer.add_tensor(t.name, gguf.quants.quantize(data, bf16), raw_dtype=bf16)
            continue
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_missing_dense_tensor_names_file_and_tensor(models, tmp_path):
    file, _ = models["F16"]
    bad = _rewrite(file, tmp_path / "bad.gguf", drop_tensor="blk.1.attn_k.bias")
    with pytest.raises(CheckpointError, match=r"bad\.gguf.*blk\.1\.attn_k\.bias"):
        load_model(bad, device="cpu", dtype=torch.float32, backend="torch", progress=False)


def test_dense_tensor_of_the_wrong_shape_names_file_tensor_and_shape(models, tmp_path):
    file, _ = models["F16"]
    bad = _rewrite(file, tmp_path / "bad.gguf", reshape="output.weight")
    with pytest.raises(CheckpointError, match=r"bad\.gguf: tensor output\.weight: expected shape \[128, 64\]"):
        load_model(bad, device="cpu", dtype=torch.float32, backend="torch", progress=False)


def test_missing_metadata_key_is_named(models, tmp_path):
    file, _ = models["F16"]
    bad = _rewrite(file, tmp_path / "bad.gguf", drop_key="gpt-oss.attention.head_count")
    with pytest.raises(CheckpointError, match=r"bad\.gguf: metadata key gpt-oss\.attention\.head_count is missing"):
        load_model(bad, device="cpu", dtype=torch.float32, backend="torch", progress=False)


# ---- verify --model ---------------------------------------------------------------------------

def _model_check(report_path):
    [check] = [c for c in json.loads(report_path.read_text())["checks"] if c["check"] == "model"]
    return check


def test_verify_model_on_gguf_passes_against_its_twin(models, tmp_path):
    file, twin = models["BF16"]
    report = tmp_path / "r.json"
    assert verify.main([str(file), "--model", "--reference", str(twin), *FAST, "--json", str(report)]) == verify.EXIT_OK
    check = _model_check(report)
    assert check["status"] == "PASS" and check["figures"]["reference_checkpoint"] == str(twin)
    assert max(check["figures"]["rel_err"].values()) <= 1e-4
    assert check["figures"]["first_difference"] is None


def test_verify_model_on_gguf_fails_on_swapped_gate_and_up(models, tmp_path, monkeypatch):
    file, twin = models["BF16"]
    real_load_layer = integration.load_layer

    def swapped(*args, **kwargs):
        weights = real_load_layer(*args, **kwargs)
        for name in ("w13_blocks", "w13_scales", "w13_bias"):      # (rows interleaved: 2j gate, 2j + 1 up)
            t = getattr(weights, name)
            t.copy_(t.view(t.shape[0], -1, 2, *t.shape[2:]).flip(2).reshape(t.shape))
        return weights

    monkeypatch.setattr(integration, "load_layer", swapped)
    report = tmp_path / "r.json"
    assert verify.main([str(file), "--model", "--reference", str(twin), *FAST, "--json", str(report)]) \
        == verify.EXIT_CHECK_FAILED
    assert max(_model_check(report)["figures"]["rel_err"].values()) > 1e-2


def test_verify_model_on_gguf_without_reference_is_exit_2(models, capsys):
    file, _ = models["BF16"]
    assert verify.main([str(file), "--model", *FAST]) == verify.EXIT_BAD_INPUT
    assert "give --reference FOLDER" in capsys.readouterr().err


def test_verify_model_with_a_reference_of_another_model_is_exit_2(models, tmp_path, capsys):
    from mxfp4_moe.synthetic import DenseSpec, make_synthetic_checkpoint
    file, _ = models["BF16"]
    other = make_synthetic_checkpoint(tmp_path / "other", num_layers=2, num_experts=4, hidden=64, intermediate=96,
                                      top_k=2, full_model=True, dense=DenseSpec(vocab_size=256))
    assert verify.main([str(file), "--model", "--reference", str(other), *FAST]) == verify.EXIT_BAD_INPUT
    assert "vocab_size 128 vs 256" in capsys.readouterr().err


def test_reference_without_model_is_exit_2(models, capsys):
    file, twin = models["BF16"]
    assert verify.main([str(file), "--reference", str(twin), *FAST]) == verify.EXIT_BAD_INPUT
    assert "give --model too" in capsys.readouterr().err


def test_bf16_expert_biases_and_router_read_as_f32(models, tmp_path):
    # llama.cpp's converter may write 2-D float tensors in its --outtype (bf16); the synthetic
    # values are bf16 already, so the BF16 copy must read exactly as the F32 original.
    file, _ = models["F32"]
    names = ("blk.0.ffn_gate_exps.bias", "blk.0.ffn_down_exps.bias", "blk.0.ffn_gate_inp.weight")
    bf16 = _rewrite(file, tmp_path / "bf16.gguf", to_bf16=names)
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(bf16)).tensors if t.name in names} \
        == dict.fromkeys(names, "BF16")
    with open_checkpoint(file) as a, open_checkpoint(bf16) as b:
        la, lb = a.layer(0), b.layer(0)
        assert torch.equal(la.router_weight.read(), lb.router_weight.read())
        for ea, eb in zip(la.experts, lb.experts):
            assert torch.equal(ea.gate.bias.read(), eb.gate.bias.read())
            assert torch.equal(ea.down.bias.read(), eb.down.bias.read())
