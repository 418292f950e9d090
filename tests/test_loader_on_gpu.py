"""Loading a layer onto a GPU through the pinned staging buffers, byte for byte against a CPU load.
Run on a CUDA machine with `pytest -m gpu`; skipped elsewhere.
"""

import pytest
import torch


pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_load_layer_to_the_gpu_through_pinned_staging_is_exact(tmp_path, tp_rank):
    # The pinned double-buffered copy against the plain pageable one and against a CPU load:
    # every tensor byte for byte (padding included), for a TP shard whose w2 reads are strided.
    from mxfp4_moe.checkpoint import open_checkpoint
    from mxfp4_moe.loader import load_layer
    from mxfp4_moe.sharding import ShardPlan
    from mxfp4_moe.synthetic import make_synthetic_checkpoint
    path = make_synthetic_checkpoint(tmp_path / "ckpt", num_layers=1, num_experts=6, hidden=288, intermediate=352,
                                     top_k=2, seed=4)
    plan = ShardPlan.create(num_experts=6, hidden=288, inter=352, tp_size=2, tp_rank=tp_rank, align="triton")
    with open_checkpoint(path) as ckpt:
        # 64 KiB buffers: each holds one expert's w13 (50 KB) or two of w2, so both turn over many times
        staged = load_layer(ckpt, 0, plan, device="cuda", max_read_bytes=65536, pinned_staging=True)
        pageable = load_layer(ckpt, 0, plan, device="cuda", pinned_staging=False)
        cpu = load_layer(ckpt, 0, plan, device="cpu")
    for name in ("w13_blocks", "w13_scales", "w13_bias", "w2_blocks", "w2_scales", "w2_bias", "router_weight",
                 "router_bias"):
        assert torch.equal(getattr(staged, name).cpu(), getattr(cpu, name)), name
        assert torch.equal(getattr(pageable, name).cpu(), getattr(cpu, name)), name
    assert staged.bytes_read == cpu.bytes_read
