"""Multi-process TP / EP (`mxfp4_moe.distributed`) on CPU with gloo, over loopback only.

Two launches of real processes (2 and 4 ranks, torch.multiprocessing spawn) run every layout of
one world size on a padded synthetic checkpoint; the tests below check their saved results:
the combined output against the single-process float64 reference, and each rank's bytes read
against the plan's read ranges, computed here from the safetensors header alone. One test runs
the real `torchrun -m mxfp4_moe.verify` command line.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mxfp4_moe import distributed as D
from mxfp4_moe import verify
from mxfp4_moe.checkpoint import open_checkpoint
from mxfp4_moe.loader import load_layer
from mxfp4_moe.moe import MXFP4MoE
from mxfp4_moe.reference import reference_moe
from mxfp4_moe.routing import route
from mxfp4_moe.sharding import ShardPlan
from mxfp4_moe.synthetic import make_synthetic_checkpoint

# E 5 (EP 2 linear: 3 + 2 experts), H 96 (padded to 128 by h_align 64), I 224 = 7 blocks:
# TP 2 -> 4 + 3 blocks (128, 96 -> I_pad 128); TP 4 -> 2, 2, 2, 1 blocks (the last rank gets
# half, padded to 64). Padding on both H and I at every layout.
CKPT = dict(num_layers=1, num_experts=5, hidden=96, intermediate=224, top_k=2, seed=11)
ALIGN = (64, 64)
TOKENS = 24
# float32 partial sums over at most 4 ranks against the float64 reference: the MoE's own float32
# rounding (about 1e-7 relative) times a few; the kernels' float32 bound in verify.
TOLERANCE = 1e-5

# name: (tp, ep, placement, backend); grouped by world size, one launch per world size.
LAYOUTS = {
    2: {"tp2": (2, 1, "linear", "torch"), "ep2": (1, 2, "linear", "torch"),
        "ep2_round_robin": (1, 2, "round-robin", "torch"),
        # One tiny case through the Triton kernels (Triton's interpreter on a CPU).
        "tp2_triton": (2, 1, "linear", "triton")},
    4: {"tp4": (4, 1, "linear", "torch"), "tp2_ep2": (2, 2, "linear", "torch")},
}
TRITON_TOKENS = 8

ROLE_NAMES = {  # checkpoint tensor of each role in ShardPlan.read_ranges (HF layout, layer 0)
    "w13_blocks": "gate_up_proj_blocks", "w13_scales": "gate_up_proj_scales", "w13_bias": "gate_up_proj_bias",
    "w2_blocks": "down_proj_blocks", "w2_scales": "down_proj_scales", "w2_bias": "down_proj_bias",
}
DTYPE_BYTES = {"U8": 1, "BF16": 2, "F16": 2, "F32": 4}


def _tokens(n: int) -> torch.Tensor:
    return torch.randn(n, CKPT["hidden"], generator=torch.Generator().manual_seed(5))


def _worker(ckpt: str, out_dir: str, layouts: dict) -> None:
    """One rank: every layout of this world size, in turn, on the same process group."""
    import torch.distributed as dist
    env = D.torchrun_env()
    device = D.rank_device(env.local_rank, "cpu")
    D.init_process_group(device, timeout_s=120)
    for name, (tp, ep, placement, backend) in layouts.items():
        groups = D.MoEGroups.from_world(tp, ep)
        layer = D.DistributedMXFP4MoE.from_checkpoint(ckpt, 0, groups=groups, align=ALIGN, placement=placement,
                                                      device=device, backend=backend)
        x = _tokens(TRITON_TOKENS if backend == "triton" else TOKENS)
        y = layer(x)
        torch.save({"y": y, "plan": layer.plan, "bytes_read": layer.load_stats.bytes_read,
                    "planned_bytes": layer.load_stats.planned_bytes, "backend": layer.backend,
                    "groups": (groups.tp_rank, groups.ep_rank)},
                   os.path.join(out_dir, f"{name}.rank{env.rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("dist") / "ckpt", **CKPT)


@pytest.fixture(scope="module")
def runs(ckpt, tmp_path_factory):
    """{layout name: [rank 0 result, rank 1 result, ...]} from one spawn per world size."""
    out = tmp_path_factory.mktemp("ranks")
    for world, layouts in LAYOUTS.items():
        D.spawn_local(_worker, world, (str(ckpt), str(out), layouts))
    return {name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(world)]
            for world, layouts in LAYOUTS.items() for name in layouts}


@pytest.fixture(scope="module")
def reference(ckpt):
    """Single-process float64 reference output for each token count."""
    with open_checkpoint(ckpt) as c:
        plan = ShardPlan.create(num_experts=CKPT["num_experts"], hidden=CKPT["hidden"], inter=CKPT["intermediate"])
        full = load_layer(c, 0, plan)
    out = {}
    for n in (TOKENS, TRITON_TOKENS):
        x = _tokens(n)
        topk_weights, topk_ids = route(x, full.router_weight, full.router_bias, CKPT["top_k"])
        out[n] = {"ref64": reference_moe(x.double(), full, topk_weights, topk_ids, torch.float64),
                  "single": MXFP4MoE(full, backend="torch")(x)}
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _expected_bytes(ckpt, plan: ShardPlan) -> int:
    """What the plan's read ranges cover, from the safetensors header's shapes and dtypes only."""
    total = 0
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        for role, indexes in plan.read_ranges().items():
            if role.startswith("router"):
                name = f"model.layers.0.mlp.router.{role.split('_')[1]}"
            elif role in ROLE_NAMES:
                name = f"model.layers.0.mlp.experts.{ROLE_NAMES[role]}"
            else:
                continue                                # per-channel scales: not in this checkpoint
            sl = f.get_slice(name)
            shape, itemsize = sl.get_shape(), DTYPE_BYTES[sl.get_dtype()]
            for index in indexes:
                sizes = [len(range(*s.indices(n))) for s, n in zip(index, shape)] + list(shape[len(index):])
                total += math.prod(sizes) * itemsize
    return total


ALL_LAYOUTS = [(name, world) for world, layouts in LAYOUTS.items() for name in layouts]


@pytest.mark.parametrize("name,world", ALL_LAYOUTS, ids=[n for n, _ in ALL_LAYOUTS])
def test_combined_output_matches_single_process_reference(runs, reference, name, world):
    results = runs[name]
    tokens = results[0]["y"].shape[0]
    ref = reference[tokens]
    for rank, r in enumerate(results):
        assert r["y"].shape == (tokens, CKPT["hidden"])
        assert _rel(r["y"], ref["ref64"]) <= TOLERANCE, (name, rank)
        assert _rel(r["y"], ref["single"]) <= TOLERANCE, (name, rank)
    # Every rank returns the same combined output (one all-reduce hands all of them the sum).
    for r in results[1:]:
        torch.testing.assert_close(r["y"], results[0]["y"], rtol=0, atol=0)
    if name == "tp2_triton":
        assert {r["backend"] for r in results} == {"triton"}


@pytest.mark.parametrize("name,world", ALL_LAYOUTS, ids=[n for n, _ in ALL_LAYOUTS])
def test_each_rank_reads_only_its_share(runs, ckpt, name, world):
    tp, ep, placement, _ = LAYOUTS[world][name]
    plans = ShardPlan.all_ranks(tp_size=tp, ep_size=ep, num_experts=CKPT["num_experts"], hidden=CKPT["hidden"],
                                inter=CKPT["intermediate"], placement=placement, align=ALIGN)
    whole = _expected_bytes(ckpt, ShardPlan.create(num_experts=CKPT["num_experts"], hidden=CKPT["hidden"],
                                                   inter=CKPT["intermediate"]))
    for rank, r in enumerate(results := runs[name]):
        # global rank = ep_rank * tp + tp_rank (ShardPlan.all_ranks order)
        assert r["plan"] == plans[rank] and r["groups"] == (rank % tp, rank // tp)
        expected = _expected_bytes(ckpt, plans[rank])
        assert r["bytes_read"] == expected, (name, rank)
        assert r["planned_bytes"] == expected, (name, rank)
        assert r["bytes_read"] < whole, (name, rank)       # a share, not the whole layer
    # The shares add up to the layer once, plus the replicated router on every other rank.
    router = (CKPT["num_experts"] * CKPT["hidden"] + CKPT["num_experts"]) * 2
    assert sum(r["bytes_read"] for r in results) == whole + (world - 1) * router


def test_padding_is_present_at_every_layout(runs):
    # The cases above are only worth something if the shards carry padding on H and I.
    for name, results in runs.items():
        for r in results:
            plan = r["plan"]
            assert plan.hidden_pad > plan.hidden, name
            if name.startswith("tp"):
                assert any(p["plan"].inter_pad > p["plan"].inter for p in results), name


# ---- the launch environment, no processes --------------------------------------------------------

def test_torchrun_env_absent_partial_and_bad():
    assert D.torchrun_env({}) is None
    assert D.torchrun_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == D.LaunchEnv(3, 4, 1)
    with pytest.raises(D.DistributedSetupError, match="LOCAL_RANK missing"):
        D.torchrun_env({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(D.DistributedSetupError, match="out of range"):
        D.torchrun_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})
    with pytest.raises(D.DistributedSetupError, match="integers"):
        D.torchrun_env({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"})


def test_rank_coords_follow_shard_plan_order():
    plans = ShardPlan.all_ranks(tp_size=3, ep_size=2, num_experts=4, hidden=64, inter=96)
    assert [D.rank_coords(r, 3, 2) for r in range(6)] == [(p.tp_rank, p.ep_rank) for p in plans]
    with pytest.raises(D.DistributedSetupError, match="tp 3 x ep 2 = 6"):
        D.check_world(4, 3, 2)


@pytest.mark.parametrize("rank", [0, 1], ids=["rank0_prints", "rank1_silent"])
def test_verify_world_size_mismatch_exits_2(ckpt, monkeypatch, capsys, rank):
    # torchrun started 2 processes but the layout asks for tp 2 x ep 2 = 4: every rank exits 2
    # before touching the process group; only rank 0 says why.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    assert verify.main([str(ckpt), "--tp", "2", "--ep", "2"]) == verify.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    if rank == 0:
        assert "WORLD_SIZE 2" in err and "--tp 2 --ep 2" in err
    else:
        assert err == ""


# ---- the real command line -------------------------------------------------------------------------

def test_torchrun_verify_end_to_end(ckpt, tmp_path):
    report = tmp_path / "report.json"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(D.free_port()), "-m", "mxfp4_moe.verify", str(ckpt), "--tp", "2", "--align", "64,64",
           "--backend", "torch", "--tokens", "16", "--json", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK:") == 1 and "FAIL" not in proc.stdout       # rank 0 alone prints
    assert "torchrun, 2 processes (gloo)" in proc.stdout
    data = json.loads(report.read_text())
    assert data["schema"] == verify.REPORT_SCHEMA and data["exit_code"] == 0
    assert data["checkpoint"]["distributed"]["world_size"] == 2
    shards = [c for c in data["checks"] if c["check"] == "sharding" and c["rank"] is not None]
    assert [c["rank"] for c in shards] == [0, 1]
    for c in shards:
        assert c["passed"] and c["figures"]["bytes_read"] == c["figures"]["planned_bytes"] > 0
        assert c["figures"]["peak_mem_kind"] == "peak_rss" and c["figures"]["peak_mem_bytes"] > 0
        assert c["figures"]["load_s"] > 0
    per_rank = [c for c in data["checks"] if c["check"] == "consistency" and c["rank"] is not None]
    assert len(per_rank) == 2 and all(c["figures"]["single_rel_err"] <= TOLERANCE for c in per_rank)
