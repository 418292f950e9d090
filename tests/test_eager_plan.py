"""The layer's eager plans (`mxfp4_moe.eager_plan`): a call replayed from the launches an earlier
call recorded gives what the ordinary path gives, on new inputs, whatever the workspace held, at
every token count and key; where no plan applies the ordinary path runs; a failed replay falls
back with one warning. On the CPU the kernels run in Triton's interpreter (float32), where a
replay goes through `kernel[grid]` and the interpreter's order of atomic adds is fixed, so the
planned and ordinary outputs must be equal bit for bit; the `gpu` tests replay the compiled
kernels in bf16 and compare both paths with the float32 reference.
"""

import warnings

import pytest
import torch

from mxfp4_moe import eager_plan
from mxfp4_moe.kernels import launches as launches_module
from mxfp4_moe.moe import MXFP4MoE
from mxfp4_moe.reference import reference_moe
from mxfp4_moe.routing import route
from mxfp4_moe.synthetic import random_expert_weights

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def layers(experts: int, hidden: int, top_k: int, seed: int = 0, **kwargs):
    """(a layer with plans, a layer without) on the same weights."""
    weights, _ = random_expert_weights(experts, hidden, hidden, top_k=top_k, seed=seed, device=DEVICE, dense=False)
    make = lambda plans: MXFP4MoE(weights, backend="triton", compute_dtype=DTYPE, eager_plans=plans, **kwargs)
    return make(True), make(False)


def reference(layer, x):
    w = layer.checkpoint_weights()
    topk_weights, topk_ids = route(x.float(), w.router_weight, w.router_bias, w.top_k)
    return reference_moe(x.float(), w, topk_weights, topk_ids)


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def workspace_tensors(layer, plan):
    """Every tensor the plan's launches hold that is not one of the layer's weights (nor its bf16
    copy of the router's) nor the x or the logits of the recording call (which each replay swaps
    for its own), nor the one-launch router's ticket counter."""
    constant = {id(t) for t in vars(layer.weights).values() if isinstance(t, torch.Tensor)}
    constant.add(id(layer.router_weight_bf16))      # the one-launch router reads this copy
    for copy in (layer.fragments or {}).values():
        constant |= {id(t) for t in vars(copy).values() if isinstance(t, torch.Tensor)}
    seen = {}
    for launch, x_positions, logits_positions in plan.launches:
        for position, (name, value) in enumerate(zip(launch.parameter_names, launch.values)):
            if position in x_positions or position in logits_positions or name == "ticket_ptr":
                continue        # (the one-launch router's ticket is state its kernel resets, not workspace)
            if isinstance(value, torch.Tensor) and id(value) not in constant:
                seen[id(value)] = value
    return list(seen.values())


def poison(tensors):
    for t in tensors:
        t.fill_(float("nan") if t.is_floating_point() else -1)


def agree(planned, plain):
    if ON_GPU:                      # fp32 atomic adds in another order: bf16 rounding apart
        assert rel_err(planned, plain) < 1e-2
    else:
        assert torch.equal(planned, plain)


@pytest.mark.parametrize("experts,hidden,top_k,token_counts", [
    (8, 64, 2, (1, 3, 1, 3, 7)),          # one-launch router and sort
    (8, 64, 2, (20, 20)),                 # the router's GEMM in torch, its logits swapped in
    (128, 32, 2, (40, 40)),               # 80 pairs at 128 experts: the four-launch sort
])
def test_replays_equal_the_ordinary_path_on_new_inputs(experts, hidden, top_k, token_counts):
    planned, plain = layers(experts, hidden, top_k)
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, device=DEVICE, generator=generator).to(DTYPE)
        out = planned(x)
        agree(out, plain(x))
        assert rel_err(out, reference(plain, x)) < (2e-2 if ON_GPU else 1e-5)
    assert sorted(key[0] for key in planned._eager_plans) == sorted(set(token_counts))
    assert not plain._eager_plans


def test_every_workspace_tensor_is_rewritten_each_call():
    planned, plain = layers(8, 64, 2, seed=3)
    x = torch.randn(5, 64, device=DEVICE).to(DTYPE)
    planned(x)
    (plan,) = planned._eager_plans.values()
    assert plan.replayable and len(plan.launches) >= 3     # the router (sorting too), w13, w2
    for _ in range(2):
        poison(workspace_tensors(planned, plan))
        x = torch.randn(5, 64, device=DEVICE).to(DTYPE)
        agree(planned(x), plain(x))


def test_outputs_are_fresh_tensors():
    planned, _ = layers(8, 64, 2)
    x = torch.randn(2, 64, device=DEVICE).to(DTYPE)
    first, scores = planned.forward_with_router_scores(x)
    kept, kept_scores = first.clone(), scores.clone()
    second, second_scores = planned.forward_with_router_scores(torch.randn(2, 64, device=DEVICE).to(DTYPE))
    assert torch.equal(first, kept) and torch.equal(scores, kept_scores)
    assert not torch.equal(first, second)
    assert torch.allclose(second_scores.float().sum(1), torch.ones(2, device=DEVICE), atol=1e-2)


def test_keys_alignment_width_and_calls_without_a_plan():
    planned, plain = layers(8, 64, 2)
    buffer = torch.randn(3 * 64 + 1, device=DEVICE).to(DTYPE)
    aligned = buffer[:192].view(3, 64)
    shifted = buffer[1:].view(3, 64)           # data pointer off 16-byte alignment
    for x in (aligned, shifted, aligned):
        agree(planned(x), plain(x))
    assert {key[2] for key in planned._eager_plans} == {True, False}
    before = len(planned._eager_plans)
    for x in (torch.randn(64, 6, device=DEVICE).to(DTYPE).T,           # not contiguous
              torch.randn(eager_plan.MAX_PLANNED_TOKENS + 1, 64, device=DEVICE).to(DTYPE),
              torch.randn(2, 64, device=DEVICE).to(torch.float16 if DTYPE != torch.float16 else torch.float32)):
        agree(planned(x), plain(x))
    assert len(planned._eager_plans) == before


def test_inference_mode_gets_its_own_plan():
    # A workspace made under inference mode cannot be zeroed outside it, nor the other way round.
    planned, plain = layers(8, 64, 2)
    x = torch.randn(2, 64, device=DEVICE).to(DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with torch.inference_mode():
                agree(planned(x), plain(x))
            agree(planned(x), plain(x))
    assert sorted(key[4] for key in planned._eager_plans) == [False, True]


def test_plans_are_bounded_and_follow_replaced_weights():
    planned, plain = layers(8, 64, 2)
    for tokens in range(1, eager_plan.MAX_PLANS + 3):
        planned(torch.randn(tokens, 64, device=DEVICE).to(DTYPE))
    assert [key[0] for key in planned._eager_plans] == list(range(3, eager_plan.MAX_PLANS + 3))
    other, _ = random_expert_weights(8, 64, 64, top_k=2, seed=9, device=DEVICE, dense=False)
    x = torch.randn(3, 64, device=DEVICE).to(DTYPE)
    planned.weights = plain.weights = other
    agree(planned(x), plain(x))
    assert planned._eager_plans[next(reversed(planned._eager_plans))].weights is other


def test_a_failed_replay_falls_back_with_one_warning(monkeypatch):
    planned, plain = layers(8, 64, 2)
    x = torch.randn(2, 64, device=DEVICE).to(DTYPE)
    planned(x)

    def broken(self, replaced=None):
        raise TypeError("launcher signature changed")
    monkeypatch.setattr(launches_module.RecordedLaunch, "replay", broken)
    with pytest.warns(RuntimeWarning, match="launcher signature changed"):
        agree(planned(x), plain(x))
    assert planned.eager_plans is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agree(planned(x), plain(x))


def test_a_call_whose_launches_cannot_be_replayed_keeps_the_ordinary_path(monkeypatch):
    planned, plain = layers(8, 64, 2)
    grouped_matmuls = planned.grouped_matmuls
    # x copied before the matmuls see it: the recording finds no matmul launch that reads x itself.
    monkeypatch.setattr(planned, "grouped_matmuls", lambda x, *rest: grouped_matmuls(x.clone(), *rest))
    for _ in range(3):
        x = torch.randn(3, 64, device=DEVICE).to(DTYPE)
        agree(planned(x), plain(x))
    (plan,) = planned._eager_plans.values()
    assert not plan.replayable and plan.sums is None


def test_a_launch_that_cannot_be_recorded_leaves_the_call_unharmed(monkeypatch):
    planned, plain = layers(8, 64, 2)

    def undescribable(self, *args):
        raise TypeError("a kernel object this module does not know")
    monkeypatch.setattr(launches_module.RecordedLaunch, "__init__", undescribable)
    for _ in range(2):
        x = torch.randn(3, 64, device=DEVICE).to(DTYPE)
        agree(planned(x), plain(x))
    (plan,) = planned._eager_plans.values()
    assert not plan.replayable


def test_a_recording_holds_only_its_own_threads_launches():
    import threading
    from mxfp4_moe.kernels.router_topk import router_topk
    logits, bias = torch.randn(2, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    with launches_module.record_launches() as recorded:
        other = threading.Thread(target=router_topk, args=(logits, bias, 2))
        other.start()
        other.join()
        router_topk(logits, bias, 2)
    assert len(recorded) == 1


def test_the_compiled_graphs_op_runs_without_plans():
    # torch.compile's graphs call the layer through this op, possibly while CUDA-graph trees warm
    # up: a plan's workspace must not be allocated there.
    planned, plain = layers(8, 64, 2)
    x = torch.randn(2, 64, device=DEVICE).to(DTYPE)
    out, scores = torch.ops.mxfp4_moe.moe_forward(x, planned.op_name)
    agree(out, plain(x))
    assert not planned._eager_plans


def test_default_is_on_for_cuda_only():
    weights, _ = random_expert_weights(4, 64, 64, top_k=2, seed=0, device=DEVICE, dense=False)
    assert MXFP4MoE(weights, backend="triton", compute_dtype=DTYPE).eager_plans is ON_GPU
    assert MXFP4MoE(weights, backend="torch").eager_plans is False


@pytest.mark.gpu
@pytest.mark.parametrize("one_launch_router", [False, True])
@pytest.mark.parametrize("fragment_order", [None, False])     # the "rs" kernel, and the "sm90" one
@pytest.mark.parametrize("experts", [32, 128])
def test_gpt_oss_shapes_on_the_gpu(experts, fragment_order, one_launch_router, monkeypatch):
    from mxfp4_moe import routing
    monkeypatch.setattr(routing, "ONE_LAUNCH_ROUTER_ON_CUDA", one_launch_router)
    planned, plain = layers(experts, 2880, 4, seed=experts, fragment_order=fragment_order)
    for tokens in (1, 2, 8, 33, 64, 8):
        x = torch.randn(tokens, 2880, device="cuda").to(torch.bfloat16)
        for _ in range(2):                  # the recording call, then a replay
            out = planned(x)
        expected = reference(plain, x)
        assert rel_err(out, expected) < 5e-3
        assert rel_err(plain(x), expected) < 5e-3
        (plan,) = [p for key, p in planned._eager_plans.items() if key[0] == tokens]
        assert plan.replayable and all(launch.compiled is not None for launch, _, _ in plan.launches)
        poison(workspace_tensors(planned, plan))
        assert rel_err(planned(x), expected) < 5e-3


@pytest.mark.gpu
def test_replays_under_a_launch_hook_and_on_another_stream():
    from triton import knobs
    planned, plain = layers(32, 2880, 4, seed=5)
    x = torch.randn(4, 2880, device="cuda").to(torch.bfloat16)
    planned(x)
    seen = []
    hook = lambda metadata: seen.append(metadata)
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert rel_err(planned(x), plain(x)) < 1e-2
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) >= 4                  # the hook saw the replayed launches
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = planned(x)
    torch.cuda.current_stream().wait_stream(stream)
    assert rel_err(out, plain(x)) < 1e-2
    assert len({key[3] for key in planned._eager_plans}) == 2
