"""MXFP4MoE: the triton backend (interpreter on CPU) against the torch reference backend and
against transformers' GptOssMLP on the same dequantized weights; backend choice and errors.

Tolerances (relative Frobenius error): float32 everywhere 1e-5 (same math, other summation
order); float16 kernels 3e-3 (fp16 activations and SwiGLU output, ~2**-11 relative each).
"""

import pytest
import torch

from mxfp4_moe.moe import MXFP4MoE, resolve_backend
from mxfp4_moe.synthetic import random_expert_weights
from mxfp4_moe.reference import reference_moe
from mxfp4_moe.routing import route


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("E,H,I,H_pad,I_pad,T,local,dtype,tol", [
    pytest.param(4, 64, 64, 64, 64, 7, None, torch.float32, 1e-5, id="small-fp32"),
    pytest.param(8, 96, 96, 128, 128, 33, None, torch.float16, 3e-3, id="padded-H-I-fp16"),
    pytest.param(8, 64, 64, 64, 64, 33, [0, 3, 4], torch.float32, 1e-5, id="EP-3-of-8-local"),
    pytest.param(4, 64, 64, 64, 64, 0, None, torch.float32, 0.0, id="T0"),
])
def test_triton_backend_matches_torch_backend(E, H, I, H_pad, I_pad, T, local, dtype, tol):
    weights, _ = random_expert_weights(E, H, I, hidden_pad=H_pad, inter_pad=I_pad, top_k=4, local_experts=local,
                                       seed=E + T)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    fast = MXFP4MoE(weights, backend="triton", compute_dtype=dtype)
    ref = MXFP4MoE(weights, backend="torch")
    y = fast(x)
    assert y.shape == (T, H) and y.dtype == x.dtype
    if T:
        assert rel_err(y, ref(x)) < tol
        y_slots = MXFP4MoE(weights, backend="triton", compute_dtype=dtype, combine="slots")(x)
        assert rel_err(y_slots, ref(x)) < tol


def test_torch_backend_matches_transformers_gpt_oss_mlp():
    pytest.importorskip("transformers")
    from mxfp4_moe.verify.oracle import build_transformers_moe
    E, H, I, k, T = 8, 64, 96, 4, 13
    weights, _ = random_expert_weights(E, H, I, hidden_pad=128, inter_pad=128, top_k=k, seed=7)
    mlp = build_transformers_moe(weights)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = mlp(x.unsqueeze(0))[0][0]
    assert rel_err(MXFP4MoE(weights, backend="torch")(x), expected) < 1e-5
    assert rel_err(MXFP4MoE(weights, backend="triton", compute_dtype=torch.float32)(x), expected) < 1e-5


def test_experts_entry_on_given_routing_matches_reference():
    weights, _ = random_expert_weights(4, 64, 64, top_k=2, seed=9, channel_scales=True)
    x = torch.randn(17, 64, generator=torch.Generator().manual_seed(9))
    topk_w, topk_ids = route(x, weights.router_weight, weights.router_bias, 2)
    y = MXFP4MoE(weights, backend="triton", compute_dtype=torch.float32).experts(x, topk_w, topk_ids)
    assert rel_err(y, reference_moe(x, weights, topk_w, topk_ids, torch.float64)) < 1e-5


def test_from_checkpoint_matches_torch_backend(tmp_path):
    from mxfp4_moe.synthetic import make_synthetic_checkpoint
    path = make_synthetic_checkpoint(tmp_path / "ckpt", num_layers=1, num_experts=4, hidden=64,
                                     intermediate=64, top_k=2, seed=4)
    fast = MXFP4MoE.from_checkpoint(path, 0, backend="triton", compute_dtype=torch.float32)
    ref = MXFP4MoE.from_checkpoint(path, 0, backend="torch")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    assert rel_err(fast(x), ref(x)) < 1e-5


def test_backend_choice_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("cuda", cpu)
    weights, _ = random_expert_weights(4, 64, 64, top_k=2)
    with pytest.raises(ValueError, match=r"x must be \[tokens, 64\]"):
        MXFP4MoE(weights, backend="torch")(torch.randn(3, 65))


def test_auto_combine_is_atomic():
    # "auto": fp32 atomics at every T (faster than per-slot rows since the w2 kernel got faster;
    # "slots" stays available for a deterministic sum).
    weights, _ = random_expert_weights(4, 64, 64, top_k=4, seed=0)
    layer = MXFP4MoE(weights, backend="torch")
    assert layer.combine == "auto"
    assert layer.combine_for(1) == layer.combine_for(10 ** 6) == "atomic"
    assert MXFP4MoE(weights, backend="torch", combine="slots").combine_for(1) == "slots"
    with pytest.raises(ValueError, match="combine"):
        MXFP4MoE(weights, backend="torch", combine="sum")


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_sums_are_zeroed_before_the_first_launch(tokens, monkeypatch):
    # w2 adds into float32 sums: they must be made (a memset on a GPU) before the routing's
    # launches, never between w13 and w2, where the memset would keep w2's programmatic dependent
    # launch from starting during w13's tail. The routing at decode sizes is one launch (router
    # GEMM, top-k and sort) under the interpreter; at 40 tokens the router's GEMM runs in torch.
    from mxfp4_moe.kernels.launches import record_launches
    weights, _ = random_expert_weights(8, 64, 64, top_k=2, seed=tokens)
    layer = MXFP4MoE(weights, backend="triton", compute_dtype=torch.float32, eager_plans=False)
    launches_before_sums = []
    zeroed_sums = layer.zeroed_sums
    monkeypatch.setattr(layer, "zeroed_sums", lambda x: launches_before_sums.append(len(launches)) or zeroed_sums(x))
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
    with record_launches() as launches:
        y = layer(x)
    names = [launch.kernel.__name__ for launch in launches]
    assert launches_before_sums == [0], names
    assert names[-2:] == ["_moe_matmul_kernel", "_moe_matmul_kernel"]       # w13, then w2 (adding into the sums)
    assert names[0] == ("_router_gemv_topk_kernel" if tokens <= 16 else "_router_topk_kernel"), names
    assert len(names) == (3 if tokens <= 16 else 4), names     # the routing in one launch, or top-k then sort
    assert rel_err(y, MXFP4MoE(weights, backend="torch")(x)) < 1e-5
