"""`load_model` on a compressed-tensors MXFP4 Qwen3-MoE checkpoint: a tiny whole model
(`synthetic_formats.make_qwen3_moe_model_checkpoint`: experts and attention projections MXFP4,
the rest bf16) against transformers' float32 Qwen3MoeForCausalLM holding the values the files
mean. Tolerance: 1e-5 relative error of the float32 logits (the same values, sums in another
order: measured ~3e-7)."""

import json
import shutil
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from mxfp4_moe.checkpoint import CheckpointError  # noqa: E402
from mxfp4_moe.integrations.qwen3_moe import MXFP4Qwen3MoeBlock  # noqa: E402
from mxfp4_moe.integrations.transformers import load_model  # noqa: E402
from mxfp4_moe.synthetic_formats import make_qwen3_moe_model_checkpoint  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    # norm_topk_prob False: the setting under which the router's order of softmax and top-k shows.
    return make_qwen3_moe_model_checkpoint(tmp_path_factory.mktemp("qwen3") / "model", norm_topk_prob=False, seed=1)


def _logits(model, seed=0):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_load_model_matches_transformers_on_the_dequantized_weights(qwen):
    folder, reference = qwen
    model = load_model(folder, device="cpu", dtype=torch.float32, backend="torch", progress=False)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert all(isinstance(layer.mlp, MXFP4Qwen3MoeBlock) for layer in model.model.layers)
    assert model.model.layers[0].mlp.moe.weights.activation == "silu"
    got, want = _logits(model), _logits(reference)
    assert rel_err(got, want) < TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_wrong_norm_topk_prob_is_caught(qwen, tmp_path):
    # The same files with norm_topk_prob flipped: the routing weights are renormalised, the
    # logits must move well beyond the tolerance.
    folder, reference = qwen
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    raw = json.loads((folder / "config.json").read_text())
    raw["norm_topk_prob"] = True
    (flipped / "config.json").write_text(json.dumps(raw))
    shutil.copy(folder / "model.safetensors", flipped / "model.safetensors")   # (a link out of the folder is refused)
    model = load_model(flipped, device="cpu", dtype=torch.float32, backend="torch", progress=False)
    assert rel_err(_logits(model), _logits(reference)) > 1e-3


def test_compressed_tensors_decompresses_the_file_to_the_same_weights(qwen):
    # An independent reader: transformers with compressed-tensors 0.20.1 (CompressedTensorsConfig
    # dequantize=True) loads the synthetic file; every parameter must equal the reference's (it
    # keeps the experts in bf16, which holds every MXFP4 value exactly).
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig, Qwen3MoeForCausalLM
    folder, reference = qwen
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = dict(reference.named_parameters())
    params = dict(theirs.named_parameters())
    assert params.keys() == ours.keys()
    for name, param in params.items():
        assert torch.equal(param.float(), ours[name]), name


@pytest.mark.parametrize("change, message", [
    ({"self": 1}, "config key 'self'"),                                   # a TypeError inside transformers before
    ({"vocab_size": 2 ** 34}, r"vocab_size: expected an int in \[1, 2147483647\]"),   # 4 TB allocated before
    ({"num_attention_heads": 0}, r"num_attention_heads: expected an int"),
    ({"to_dict": 3}, "would replace Qwen3MoeConfig's method"),
])
def test_hostile_qwen3_config_is_a_checkpoint_error(qwen, tmp_path, change, message):
    # The same checks as gpt-oss's config (issue 26), before transformers sees the values.
    folder, _ = qwen
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = json.loads((folder / "config.json").read_text())
    raw.update(change)
    (bad / "config.json").write_text(json.dumps(raw))
    shutil.copy(folder / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_model(bad, device="cpu", dtype=torch.float32, backend="torch", progress=False)
