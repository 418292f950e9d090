"""An independent oracle for our checkpoint layout: a tiny synthetic checkpoint written by
`mxfp4_moe.synthetic` must load in Hugging Face transformers (its own MXFP4 reader, dequantizing
on CPU), and what transformers holds must equal what our reader and `dequantize` give.

transformers stores the experts transposed: gate_up_proj [E, H, 2I], down_proj [E, I, H]
(`x @ W`), against our checkpoint orientation [E, out, in] (`x @ W.T`).
Tolerances: parameters are compared exactly (MXFP4 values are exact in bf16 and float32); the MoE
block output in float32 within 1e-5 relative Frobenius error (same math, different summation order).
"""

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the oracle needs Hugging Face transformers (pip install 'mxfp4-moe[test]')")

from mxfp4_moe.checkpoint import open_checkpoint  # noqa: E402
from mxfp4_moe.mxfp4 import dequantize  # noqa: E402
from mxfp4_moe.reference import reference_moe  # noqa: E402
from mxfp4_moe.routing import route  # noqa: E402
from mxfp4_moe.synthetic import DenseSpec, make_synthetic_checkpoint  # noqa: E402
from mxfp4_moe.weights import ExpertWeights  # noqa: E402

# Tiny but not square (H != I) and an odd expert count, so a transposed or swapped axis cannot
# go unnoticed; top_k 2 of 5.
NUM_LAYERS, NUM_EXPERTS, HIDDEN, INTER, TOP_K = 2, 5, 64, 96, 2


def _load(path, dtype):
    from transformers import GptOssForCausalLM, Mxfp4Config

    model, info = GptOssForCausalLM.from_pretrained(
        path, quantization_config=Mxfp4Config(dequantize=True), dtype=dtype, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="module", params=[1, 3], ids=["one-file", "3-shards"])
def tiny_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle") / f"shards{request.param}"
    return make_synthetic_checkpoint(path, num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS, hidden=HIDDEN,
                                     intermediate=INTER, top_k=TOP_K, seed=11, shards=request.param,
                                     full_model=True, dense=DenseSpec(vocab_size=128))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_transformers_loads_our_checkpoint_with_equal_experts_and_router(tiny_checkpoint, dtype):
    model, info = _load(tiny_checkpoint, dtype)
    # Every tensor we wrote is one transformers expects, and none it expects is missing.
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")
    with open_checkpoint(tiny_checkpoint) as ckpt:
        assert model.config.num_local_experts == ckpt.config.num_experts
        assert model.config.num_experts_per_tok == ckpt.config.experts_per_token
        for n in range(NUM_LAYERS):
            layer = ckpt.layer(n)
            mlp = model.model.layers[n].mlp
            w13 = dequantize(layer.w13_blocks.read_all(), layer.w13_scales.read_all(), torch.float32)  # [E, 2I, H]
            w2 = dequantize(layer.w2_blocks.read_all(), layer.w2_scales.read_all(), torch.float32)     # [E, H, I]
            assert mlp.experts.gate_up_proj.shape == (NUM_EXPERTS, HIDDEN, 2 * INTER)
            assert mlp.experts.down_proj.shape == (NUM_EXPERTS, INTER, HIDDEN)
            assert mlp.experts.gate_up_proj.dtype == dtype
            torch.testing.assert_close(mlp.experts.gate_up_proj.float(), w13.transpose(1, 2), rtol=0, atol=0)
            torch.testing.assert_close(mlp.experts.down_proj.float(), w2.transpose(1, 2), rtol=0, atol=0)
            # Biases and router are bf16 in the file: exact in either model dtype.
            for ours, theirs in ((layer.w13_bias, mlp.experts.gate_up_proj_bias),
                                 (layer.w2_bias, mlp.experts.down_proj_bias),
                                 (layer.router_weight, mlp.router.weight),
                                 (layer.router_bias, mlp.router.bias)):
                torch.testing.assert_close(theirs.float(), ours.read_all().float(), rtol=0, atol=0)


def test_transformers_moe_block_matches_our_reference(tiny_checkpoint):
    """The whole MoE block (router, top-k softmax, interleaved clamped SwiGLU, weighted sum) as
    transformers runs it equals our reader + route + reference_moe on the same input: pins the
    gate/up interleave and the bias placement, not only the bytes."""
    model, _ = _load(tiny_checkpoint, torch.float32)
    torch.manual_seed(5)
    x = torch.randn(37, HIDDEN)     # 37 tokens: odd, several per expert
    with open_checkpoint(tiny_checkpoint) as ckpt, torch.no_grad():
        for n in range(NUM_LAYERS):
            layer = ckpt.layer(n)
            e = NUM_EXPERTS
            weights = ExpertWeights(
                w13_blocks=layer.w13_blocks.read_all().reshape(e, 2 * INTER, HIDDEN // 2),
                w13_scales=layer.w13_scales.read_all(),
                w13_bias=layer.w13_bias.read_all().float(),
                w2_blocks=layer.w2_blocks.read_all().reshape(e, HIDDEN, INTER // 2),
                w2_scales=layer.w2_scales.read_all(),
                w2_bias=layer.w2_bias.read_all().float(),
                router_weight=layer.router_weight.read_all().float(),
                router_bias=layer.router_bias.read_all().float(),
                hidden=HIDDEN, inter=INTER, local_experts=torch.arange(e), expert_map=torch.arange(e),
                top_k=ckpt.config.experts_per_token, swiglu_alpha=ckpt.config.swiglu_alpha,
                swiglu_limit=ckpt.config.swiglu_limit)
            weights.validate()
            topk_weights, topk_ids = route(x, weights.router_weight, weights.router_bias, TOP_K)
            ours = reference_moe(x, weights, topk_weights, topk_ids, torch.float32)
            theirs, _ = model.model.layers[n].mlp(x.unsqueeze(0))
            theirs = theirs.reshape(ours.shape)
            rel = (theirs - ours).norm() / ours.norm()
            assert rel < 1e-5, f"layer {n}: relative Frobenius error {rel:.3g}"
