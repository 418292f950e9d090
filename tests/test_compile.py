"""torch.compile through the MoE layer: its forward is one custom op (`mxfp4_moe::moe_forward`)
with a fake implementation, so a compiled model has no graph break inside the layer and gives the
eager layer's output. CPU: the torch backend under the "eager" and "aot_eager" compiler
backends (dynamo's trace, and the fake-tensor trace of AOT autograd); the CUDA-graph mode is in
tests/test_kernels_on_gpu.py.
"""

import operator

import pytest
import torch

from mxfp4_moe.moe import MXFP4MoE
from mxfp4_moe.synthetic import random_expert_weights


@pytest.fixture(scope="module")
def layer():
    weights, _ = random_expert_weights(4, 64, 64, top_k=2, seed=9)
    return MXFP4MoE(weights, backend="torch")


@pytest.mark.parametrize("compiler_backend", ["eager", "aot_eager"])
def test_compiled_layer_has_no_graph_break_and_matches_eager(layer, compiler_backend):
    torch._dynamo.reset()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(layer, fullgraph=True, backend=compiler_backend)     # fullgraph: a break raises
    assert torch.equal(compiled(x), layer(x))
    x2 = torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(compiled(x2), layer(x2))           # the new input is really used


def test_compiled_model_around_the_layer(layer):
    # The layer inside a larger module (a residual block, as in a transformer layer): one graph.
    class Block(torch.nn.Module):
        def __init__(self, moe):
            super().__init__()
            self.norm = torch.nn.LayerNorm(64)
            self.moe = moe

        def forward(self, x):
            return x + self.moe(self.norm(x))

    torch._dynamo.reset()
    block = Block(layer)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    with torch.no_grad():
        assert torch.allclose(torch.compile(block, fullgraph=True, backend="aot_eager")(x), block(x))


def test_the_compiled_graph_holds_the_layer_as_one_op(layer):
    # Not a trace into the routing and the torch reference: the op itself, once, and nothing of
    # the layer's insides (which would be a graph of the reference path, or a break at a kernel).
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    torch.compile(layer, fullgraph=True, backend=record)(x)
    [graph] = graphs
    # (operator.getitem picks the output from the op's (output, router scores) pair)
    targets = [node.target for node in graph.graph.nodes
               if node.op == "call_function" and node.target is not operator.getitem]
    assert targets in ([torch.ops.mxfp4_moe.moe_forward], [torch.ops.mxfp4_moe.moe_forward.default]), targets


def test_fake_implementation_gives_the_output_shape(layer):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(5, 64, dtype=torch.float16)
        y, router_scores = torch.ops.mxfp4_moe.moe_forward(x, layer.op_name)
    assert y.shape == (5, 64) and y.dtype == torch.float16
    assert router_scores.shape == (5, layer.weights.top_k) and router_scores.dtype == torch.float16


def test_op_on_a_layer_that_is_gone_raises():
    weights, _ = random_expert_weights(4, 64, 64, top_k=2, seed=9)
    name = MXFP4MoE(weights, backend="torch").op_name     # the layer is dropped at once
    import gc
    gc.collect()
    with pytest.raises(RuntimeError, match="no MXFP4MoE layer named"):
        torch.ops.mxfp4_moe.moe_forward(torch.randn(2, 64), name)
