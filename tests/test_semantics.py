"""The MoE families' semantics (`mxfp4_moe.semantics`): the activations and router scorings in
torch, the portable kernel's "silu" epilogue against the reference (TRITON_INTERPRET=1, set by
conftest), and the Gluon kernels' refusal of it (their fallback runs on the CPU too: the refusal
comes before any Gluon code).

Tolerances as in test_kernels.py: relative Frobenius error 1e-5 in float32, 2e-3 in float16.
"""

import dataclasses
import importlib
import warnings

import pytest
import torch

from mxfp4_moe import semantics
from mxfp4_moe.kernels.moe_matmul import MatmulConfig, moe_matmul, pick_block_m
from mxfp4_moe.moe import MXFP4MoE
from mxfp4_moe.synthetic import random_expert_weights
from mxfp4_moe.reference import reference_moe, reference_moe_matmul, swiglu
from mxfp4_moe.routing import route, routing_metadata

# The launcher module itself (the package re-exports its function under the same name).
moe_matmul_module = importlib.import_module("mxfp4_moe.kernels.moe_matmul")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output: an element was not written"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def silu_weights(num_experts, hidden, inter, *, top_k=2, seed=0, norm_topk_prob=False, **kw):
    """Random weights with Qwen-style semantics: SiLU-gated experts, no biases, softmax then top-k."""
    weights, dense = random_expert_weights(num_experts, hidden, inter, top_k=top_k, seed=seed, **kw)
    weights = dataclasses.replace(weights, activation="silu", router_scoring="softmax_topk",
                                  norm_topk_prob=norm_topk_prob, w13_bias=torch.zeros_like(weights.w13_bias),
                                  w2_bias=torch.zeros_like(weights.w2_bias),
                                  router_bias=torch.zeros_like(weights.router_bias))
    weights.validate()
    return weights, dense


def test_gpt_oss_swiglu_is_the_formula_bit_for_bit():
    # The gpt-oss activation is FORMAT.md section 2's formula, op for op (same rounding).
    h = 4 * torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    gate = h[:, 0::2].clamp(max=7.0)
    up = h[:, 1::2].clamp(min=-7.0, max=7.0)
    expected = gate * torch.sigmoid(1.702 * gate) * (up + 1)
    assert torch.equal(semantics.activate(h, "swiglu_oai", 1.702, 7.0), expected)
    assert torch.equal(swiglu(h, 1.702, 7.0), expected)


def test_silu_gated_is_silu_of_gate_times_up_unclamped():
    # transformers' Qwen3MoeExperts: act_fn(gate) * up with act_fn = silu, no clamp, no +1.
    h = 20 * torch.randn(3, 64, generator=torch.Generator().manual_seed(1))     # beyond gpt-oss's limit 7
    expected = torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2]
    torch.testing.assert_close(semantics.activate(h, "silu"), expected, rtol=1e-6, atol=1e-6)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="activation"):
        semantics.MoESemantics(activation="gelu")
    with pytest.raises(ValueError, match="router"):
        semantics.MoESemantics(router="sigmoid")
    with pytest.raises(ValueError, match="activation"):
        moe_matmul(torch.zeros(1, 32), torch.zeros(1, 2, 16, dtype=torch.uint8), torch.zeros(1, 2, 1, dtype=torch.uint8),
                   None, routing_metadata(torch.zeros(1, 1, dtype=torch.long), None, 1, 16), activation="gelu")


def test_softmax_topk_renormalised_equals_topk_softmax():
    # softmax over all E restricted to the top k and divided by their sum = softmax of the top-k
    # logits: with norm_topk_prob (and no bias) the two orders agree, only rounding apart.
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    w_a, ids_a = semantics.score(logits, 3, "topk_softmax")
    w_b, ids_b = semantics.score(logits, 3, "softmax_topk", norm_topk_prob=True)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(w_a, w_b, rtol=1e-6, atol=1e-7)


def test_softmax_topk_without_renormalisation_keeps_the_full_softmax_mass():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    weights, ids = semantics.score(logits, 3, "softmax_topk", norm_topk_prob=False)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(weights, probs.gather(1, ids))
    assert (weights.sum(-1) < 1 - 1e-3).all()      # the other 5 experts' mass is not given back


def test_route_follows_the_scoring():
    gen = torch.Generator().manual_seed(4)
    x, rw, rb = torch.randn(9, 64, generator=gen), torch.randn(8, 64, generator=gen), torch.zeros(8)
    weights, ids = route(x, rw, rb, 2, scoring="softmax_topk", norm_topk_prob=False)
    probs = torch.softmax(x @ rw.T, -1)
    top, top_ids = torch.topk(probs, 2, -1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(weights, top, rtol=1e-5, atol=1e-6)


SILU_CASES = [
    # id: E, H, I, H_pad, I_pad, T, k, dtype
    pytest.param(4, 64, 64, 64, 64, 7, 2, torch.float32, id="unpadded-T7-fp32"),
    pytest.param(4, 96, 64, 128, 96, 19, 2, torch.float16, id="padded-H-and-I-T19-tail-fp16"),
]


@pytest.mark.parametrize("E,H,I,H_pad,I_pad,T,k,dtype", SILU_CASES)
def test_silu_epilogue_against_reference(E, H, I, H_pad, I_pad, T, k, dtype, nan_like):
    weights, _ = silu_weights(E, H, I, hidden_pad=H_pad, inter_pad=I_pad, top_k=k, seed=T)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(dtype)
    topk_w, topk_ids = route(x.float(), weights.router_weight, weights.router_bias, k, scoring="softmax_topk",
                             norm_topk_prob=False)
    meta = routing_metadata(topk_ids, weights.expert_map, E, pick_block_m(T * k, E), topk_w)
    local = int(meta.expert_offsets[-1])
    kw = dict(swiglu=(weights.swiglu_alpha, weights.swiglu_limit), compute_dtype=dtype)
    args13 = (weights.w13_blocks, weights.w13_scales, None, meta)
    act = moe_matmul(x, *args13, activation="silu", out=nan_like(torch.empty(T * k, I_pad, dtype=dtype)), **kw)
    act_ref = reference_moe_matmul(x, *args13, activation="silu", **kw)
    assert rel_err(act[:local], act_ref[:local]) < TOL[dtype]
    # The gpt-oss epilogue on the same weights differs: the constexpr really switches.
    act_oai = reference_moe_matmul(x, *args13, **kw)
    assert rel_err(act_oai[:local], act_ref[:local]) > 0.1
    args2 = (weights.w2_blocks, weights.w2_scales, None, meta)
    y = moe_matmul(act, *args2, gather=False, apply_row_weight=True, combine="atomic", n_out=H, compute_dtype=dtype)
    y_ref = reference_moe_matmul(act_ref, *args2, gather=False, apply_row_weight=True, combine="atomic", n_out=H,
                                 compute_dtype=dtype)
    assert rel_err(y, y_ref) < TOL[dtype]


def test_layer_with_qwen_semantics_triton_matches_torch():
    # The whole layer: softmax-then-top-k routing (not renormalised) and SiLU experts, the triton
    # backend (interpreter) against the torch reference backend; expert parallel, this rank 1 of 2.
    weights, _ = silu_weights(4, 64, 64, top_k=2, seed=5, local_experts=[2, 3])
    x = torch.randn(11, 64, generator=torch.Generator().manual_seed(5))
    y_triton = MXFP4MoE(weights, backend="triton").eager_forward(x)
    y_torch = MXFP4MoE(weights, backend="torch").eager_forward(x)
    assert rel_err(y_triton, y_torch) < TOL[torch.float32]
    topk_w, topk_ids = route(x, weights.router_weight, weights.router_bias, 2, scoring="softmax_topk",
                             norm_topk_prob=False)
    assert rel_err(y_torch, reference_moe(x, weights, topk_w, topk_ids)) < 1e-6


def test_gluon_launchers_refuse_other_activations():
    launch = moe_matmul_module._Launch(*([None] * 9), fused={"SWIGLU": True}, compute_dtype=torch.bfloat16,
                                       dequant="ptx", unsafe_pipelined_rs_mma=False, activation="silu")
    for kernel in ("sm90", "rs"):
        with pytest.raises(NotImplementedError, match="swiglu_oai"):
            moe_matmul_module._LAUNCHERS[kernel](launch, None)
    # w2's launch has no activation step: nothing to refuse (it gets as far as the missing tensors).
    with pytest.raises(AttributeError):
        moe_matmul_module._launch_sm90(dataclasses.replace(launch, fused={"SWIGLU": False}),
                                       MatmulConfig(64, 128, 64, False, kernel="sm90"))


def test_default_gluon_config_falls_back_once_for_silu(monkeypatch):
    # As on a Hopper GPU, where the default config of a 64-row tile is the "sm90" Gluon kernel:
    # for "silu" it refuses, and the portable kernel runs that shape class, with one warning.
    monkeypatch.setattr(importlib.import_module("mxfp4_moe.kernels.moe_matmul_fallbacks"), "_FALLBACKS", {})
    sm90 = MatmulConfig(16, 32, 64, True, kernel="sm90")
    monkeypatch.setattr(moe_matmul_module, "_pick_config", lambda *args: sm90)
    weights, _ = silu_weights(2, 64, 64, top_k=1, seed=6)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
    meta = routing_metadata(torch.tensor([[0], [1], [1], [0], [1]]), None, 2, 16, torch.ones(5, 1))
    kw = dict(swiglu=(1.702, 7.0), activation="silu", compute_dtype=torch.float32)
    args = (weights.w13_blocks, weights.w13_scales, None, meta)
    with pytest.warns(RuntimeWarning, match="'sm90' kernel cannot run .* w13 \\+ silu"):
        first = moe_matmul(x, *args, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # the second call: no second warning
        second = moe_matmul(x, *args, **kw)
    ref = reference_moe_matmul(x, *args, **kw)
    assert rel_err(first, ref) < TOL[torch.float32] and torch.equal(first, second)
    (fallback,) = moe_matmul_module.kernel_fallbacks()
    assert fallback.kernel == "sm90" and fallback.calls == 2 and "NotImplementedError" in fallback.error


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 512], ids=["T1", "T64", "T512-gluon-tiles"])
def test_silu_layer_on_the_gpu_bf16(tokens):
    # bf16 on the GPU: at 512 tokens x top-2 over 8 experts the tiles are 128 rows, where the
    # defaults pick the "sm90" Gluon kernel: w13 must fall back (silu), w2 may keep it. Tolerance
    # as tests/test_kernels_on_gpu.py: 5e-3 relative Frobenius error against the float32 reference.
    weights, _ = silu_weights(8, 512, 256, top_k=2, seed=tokens, device="cuda")
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens)).cuda().bfloat16()
    layer = MXFP4MoE(weights, backend="triton")
    assert layer.fragments is None                      # the "rs" kernel has no silu epilogue
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = layer(x)
    topk_w, topk_ids = route(x, weights.router_weight, weights.router_bias, 2, scoring="softmax_topk",
                             norm_topk_prob=False)
    ref = reference_moe(x.float(), weights, topk_w, topk_ids)
    assert rel_err(y.float(), ref) < 5e-3
    for fallback in moe_matmul_module.kernel_fallbacks():
        if "silu" in fallback.shape:
            assert "NotImplementedError" in fallback.error
