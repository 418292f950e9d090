"""`mxfp4_moe.graphs` on the CPU: the token buckets and the errors. Capture and replay need a
GPU (tests/test_layer_on_gpu.py)."""

import pytest

from mxfp4_moe.graphs import CUDAGraphMoE, default_buckets, pick_bucket


def test_default_buckets_are_powers_of_two_up_to_max_tokens():
    assert default_buckets(1) == (1,)
    assert default_buckets(8) == (1, 2, 4, 8)
    assert default_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        default_buckets(0)


def test_pick_bucket_takes_the_smallest_that_holds_the_call():
    buckets = (1, 2, 4, 100)
    assert [pick_bucket(buckets, t) for t in (0, 1, 2, 3, 4, 5, 100, 101)] == [None, 1, 2, 4, 4, 100, 100, None]


def test_graphs_need_a_cuda_layer_that_can_be_captured():
    from mxfp4_moe.moe import MXFP4MoE
    from mxfp4_moe.synthetic import random_expert_weights
    w, _ = random_expert_weights(4, 64, 64, top_k=2, dense=False)
    with pytest.raises(ValueError, match="need the layer on a CUDA device; its weights are on cpu"):
        CUDAGraphMoE(MXFP4MoE(w, backend="torch"))
