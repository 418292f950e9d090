"""Token-sharded expert parallelism (`mxfp4_moe.expert_dispatch`) on CPU with gloo, over loopback.

One launch of real processes per world size (2 and 4) runs every case below on a padded
synthetic checkpoint: each rank passes only its own slice of one random token batch to
`TokenShardedMXFP4MoE`, and the whole batch to the replicated-token `DistributedMXFP4MoE` on the
same weights. The tests check each rank's output against the replicated layer's rows for its
tokens and against an independent single-process float64 reference, and the rows each rank sent
and received against counts derived here from the reference routing and the shard plans.

gloo in torch 2.13 (what these tests run): `all_to_all_single` with uneven and zero-row splits
works, and so do `batch_isend_irecv`, `all_gather` and `all_reduce`; the list `all_to_all`
rejects chunks of different sizes, so the layer never uses it ("p2p" is the fallback).
"""

import os

import pytest
import torch

from mxfp4_moe import distributed as D
from mxfp4_moe.checkpoint import open_checkpoint
from mxfp4_moe.expert_dispatch import DispatchCounts, TokenShardedMXFP4MoE, exchange_rows
from mxfp4_moe.loader import load_layer
from mxfp4_moe.moe import MXFP4MoE
from mxfp4_moe.reference import reference_moe
from mxfp4_moe.routing import route
from mxfp4_moe.sharding import ShardPlan
from mxfp4_moe.synthetic import make_synthetic_checkpoint

# E 5: EP 2 linear holds 3 + 2 experts, EP 4 linear 2 + 1 + 1 + 1, round-robin (0, 2, 4) + (1, 3);
# H 96 padded to 128, I 224 = 7 blocks (TP 2: 4 + 3, padded to 128): padding on H and I.
CKPT = dict(num_layers=1, num_experts=5, hidden=96, intermediate=224, top_k=2, seed=23)
ALIGN = (64, 64)
# A router bias no token's logits (about N(0, 1)) overcome: the experts given it receive nothing.
STARVE_BIAS = -30.0
# Against the float64 reference: float32 sums over a few ranks, as test_distributed's bound.
REFERENCE_TOLERANCE = 1e-5
# Against the replicated layer on the same weights: both run the same float32 expert math on the
# same rows; what differs is the order of the float32 sums (the router and expert GEMMs see
# batches of other sizes, and the combine adds the ranks' rows in another order). Measured on
# this CPU: bit-identical at EP only (a token's two partials add the same either way), 4e-8 at
# TP 2 x EP 2 (four partials, summed in another order).
REPLICATED_TOLERANCE = 1e-6

# name: case. tokens: this case's token count on each rank (the global batch is their sum, rank r
# holding the r-th slice); starve: experts no token picks (STARVE_BIAS).
CASES = {
    2: {
        "ep2_uneven_tokens": dict(tp=1, ep=2, tokens=(7, 12)),
        "ep2_p2p_fallback": dict(tp=1, ep=2, tokens=(7, 12), exchange="p2p"),
        "ep2_round_robin_rank1_has_no_tokens": dict(tp=1, ep=2, tokens=(13, 0), placement="round-robin"),
        # Experts 3 and 4 (all of rank 1's) receive nothing, so rank 1 receives no rows.
        "ep2_rank1_receives_nothing": dict(tp=1, ep=2, tokens=(6, 5), starve=(3, 4)),
        # The Triton kernels (Triton's interpreter on a CPU) on the received rows.
        "ep2_triton": dict(tp=1, ep=2, tokens=(3, 5), backend="triton"),
    },
    4: {
        # 2 + 1 + 1 + 1 experts; rank 3's only expert starved: it sends rows but receives none,
        # and rank 1 has no tokens of its own.
        "ep4_uneven_experts": dict(tp=1, ep=4, tokens=(5, 0, 9, 3), starve=(4,)),
        "ep4_uneven_experts_p2p": dict(tp=1, ep=4, tokens=(5, 0, 9, 3), starve=(4,), exchange="p2p"),
        "ep4_round_robin": dict(tp=1, ep=4, tokens=(8, 2, 6, 4), placement="round-robin"),
        # Each token goes to both TP ranks of its experts' EP rank; TP rank 1 adds no w2 bias.
        "tp2_ep2": dict(tp=2, ep=2, tokens=(4, 6, 0, 5)),
    },
}
ALL_CASES = [(name, world) for world, cases in CASES.items() for name in cases]


def _case(world: int, name: str) -> dict:
    return {"placement": "linear", "backend": "torch", "exchange": "all-to-all", "starve": (), **CASES[world][name]}


def _tokens(n: int) -> torch.Tensor:
    return torch.randn(n, CKPT["hidden"], generator=torch.Generator().manual_seed(100 + n))


def _worker(ckpt: str, out_dir: str, world: int, device_kind: str = "cpu") -> None:
    """One rank: every case of this world size, in turn, on the same process group (gloo on the
    CPU; NCCL on GPUs, where the Triton kernels run in bf16 whatever the case's backend)."""
    import torch.distributed as dist
    env = D.torchrun_env()
    device = D.rank_device(env.local_rank, device_kind)
    D.init_process_group(device, timeout_s=120)
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in CASES[world]:
        case = _case(world, name)
        groups = D.MoEGroups.from_world(case["tp"], case["ep"])
        replicated = D.DistributedMXFP4MoE.from_checkpoint(ckpt, 0, groups=groups, align=ALIGN,
                                                           placement=case["placement"], device=device,
                                                           backend="auto" if device.type == "cuda" else case["backend"])
        replicated.weights.router_bias[list(case["starve"])] = STARVE_BIAS
        sharded = TokenShardedMXFP4MoE.from_replicated(replicated, exchange=case["exchange"])
        tokens = case["tokens"]
        x_all = _tokens(sum(tokens)).to(device=device, dtype=dtype)
        start = sum(tokens[:env.rank])
        mine = slice(start, start + tokens[env.rank])
        y = sharded(x_all[mine])
        counts = sharded.last_counts
        # What MXFP4GptOssMLP calls: the same output, and this rank's routing weights.
        y_again, router_scores = sharded.forward_with_router_scores(x_all[mine])
        torch.save({"y": y.cpu(), "y_replicated": replicated(x_all)[mine].cpu(), "counts": counts,
                    "owner_ep": sharded.owner_ep.cpu(), "backend": sharded.backend,
                    "y_again": y_again.cpu(), "router_scores": router_scores.cpu()},
                   os.path.join(out_dir, f"{name}.rank{env.rank}.pt"))
    if world == 2 and device.type == "cpu":
        _duplicate_expert_layout(ckpt, out_dir, device)
    dist.destroy_process_group()


def _duplicate_expert_layout(ckpt: str, out_dir: str, device: torch.device) -> None:
    """EP 2 where rank 1 claims rank 0's first two experts: 0 and 1 held twice, 3 and 4 by no one.
    Every rank must refuse it (after the gather, so no rank is left waiting)."""
    from dataclasses import replace
    import torch.distributed as dist
    groups = D.MoEGroups.from_world(1, 2)
    layer = D.DistributedMXFP4MoE.from_checkpoint(ckpt, 0, groups=groups, align=ALIGN, device=device, backend="torch")
    if groups.ep_rank == 1:
        layer.local.weights = replace(layer.weights, local_experts=torch.tensor([0, 1]))
    try:
        TokenShardedMXFP4MoE.from_replicated(layer)
        message = None
    except ValueError as exc:
        message = str(exc)
    torch.save(message, os.path.join(out_dir, f"duplicate.rank{dist.get_rank()}.pt"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("dispatch") / "ckpt", **CKPT)


@pytest.fixture(scope="module")
def run_dir(ckpt, tmp_path_factory):
    """The folder of every rank's saved results, from one spawn per world size."""
    out = tmp_path_factory.mktemp("ranks")
    for world in CASES:
        D.spawn_local(_worker, world, (str(ckpt), str(out), world))
    return out


@pytest.fixture(scope="module")
def runs(run_dir):
    """{case name: [rank 0 result, rank 1 result, ...]}."""
    return {name: [torch.load(run_dir / f"{name}.rank{r}.pt", weights_only=False) for r in range(world)]
            for name, world in ALL_CASES}


@pytest.fixture(scope="module")
def full_layer(ckpt):
    with open_checkpoint(ckpt) as c:
        plan = ShardPlan.create(num_experts=CKPT["num_experts"], hidden=CKPT["hidden"], inter=CKPT["intermediate"])
        return load_layer(c, 0, plan)


def _reference(full, case, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 output [sum(tokens), H], topk_ids) of the whole batch in one process, on the
    tokens as the ranks got them (rounded to `dtype`)."""
    router_bias = full.router_bias.clone()
    router_bias[list(case["starve"])] = STARVE_BIAS
    x = _tokens(sum(case["tokens"])).to(dtype).float()
    topk_weights, topk_ids = route(x, full.router_weight, router_bias, CKPT["top_k"])
    return reference_moe(x.double(), full, topk_weights, topk_ids, torch.float64), topk_ids


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name,world", ALL_CASES, ids=[n for n, _ in ALL_CASES])
def test_token_sharded_output_matches_replicated_layer_and_reference(runs, full_layer, name, world):
    case = _case(world, name)
    ref64, _ = _reference(full_layer, case)
    start = 0
    for rank, (r, n) in enumerate(zip(runs[name], case["tokens"])):
        assert r["y"].shape == (n, CKPT["hidden"]) and r["y"].dtype == torch.float32, (name, rank)
        if n:
            assert _rel(r["y"], ref64[start:start + n]) <= REFERENCE_TOLERANCE, (name, rank)
            assert _rel(r["y"], r["y_replicated"]) <= REPLICATED_TOLERANCE, (name, rank)
        start += n
    if case["backend"] == "triton":
        assert {r["backend"] for r in runs[name]} == {"triton"}


@pytest.mark.parametrize("name,world", ALL_CASES, ids=[n for n, _ in ALL_CASES])
def test_router_scores_are_this_ranks_routing_weights(runs, full_layer, name, world):
    case = _case(world, name)
    router_bias = full_layer.router_bias.clone()
    router_bias[list(case["starve"])] = STARVE_BIAS
    x = _tokens(sum(case["tokens"]))
    topk_weights, _ = route(x, full_layer.router_weight, router_bias, CKPT["top_k"])
    start = 0
    for rank, (r, n) in enumerate(zip(runs[name], case["tokens"])):
        assert torch.equal(r["y_again"], r["y"]), (name, rank)
        torch.testing.assert_close(r["router_scores"], topk_weights[start:start + n], rtol=1e-6, atol=1e-7)
        start += n


def test_an_expert_held_twice_is_refused_on_every_rank(run_dir):
    for rank in range(2):
        message = torch.load(run_dir / f"duplicate.rank{rank}.pt", weights_only=False)
        assert message is not None and "exactly one EP rank" in message, message
        assert "expert 0 is held by ep_rank 0 tp_rank 0, ep_rank 1 tp_rank 0" in message, message
        assert "expert 4 is held by no rank" in message, message


@pytest.mark.parametrize("name,world", ALL_CASES, ids=[n for n, _ in ALL_CASES])
def test_rows_sent_and_received_follow_the_routing(runs, full_layer, name, world):
    case = _case(world, name)
    tp, ep = case["tp"], case["ep"]
    plans = ShardPlan.all_ranks(tp_size=tp, ep_size=ep, num_experts=CKPT["num_experts"], hidden=CKPT["hidden"],
                                inter=CKPT["intermediate"], placement=case["placement"], align=ALIGN)
    owner = {g: p.ep_rank for p in plans for g in p.local_experts}
    _, topk_ids = _reference(full_layer, case)
    results = runs[name]
    for r in results:
        assert r["owner_ep"].tolist() == [owner[g] for g in range(CKPT["num_experts"])]
    start = 0
    for rank, n in enumerate(case["tokens"]):
        # Each token once to every rank of each EP rank that holds one of its experts.
        expected = [0] * world
        for ids in topk_ids[start:start + n].tolist():
            for e in {owner[g] for g in ids}:
                for t in range(tp):
                    expected[e * tp + t] += 1
        counts = results[rank]["counts"]
        assert isinstance(counts, DispatchCounts) and counts.rank == rank
        assert list(counts.send_rows) == expected, (name, rank)
        start += n
    for d in range(world):          # what d received from s is what s sent to d
        assert [results[s]["counts"].send_rows[d] for s in range(world)] == list(results[d]["counts"].recv_rows)


def test_every_named_edge_case_happens(runs):
    # The cases above are only worth something if their edges occur in the runs.
    def recv(name, rank):
        return sum(runs[name][rank]["counts"].recv_rows)
    assert recv("ep2_rank1_receives_nothing", 1) == 0 and recv("ep4_uneven_experts", 3) == 0
    assert sum(runs["ep4_uneven_experts"][3]["counts"].send_rows) > 0          # it still sends its tokens
    assert runs["ep4_uneven_experts"][1]["y"].shape[0] == 0 and recv("ep4_uneven_experts", 1) > 0
    assert runs["ep2_round_robin_rank1_has_no_tokens"][1]["y"].shape[0] == 0
    for name, results in runs.items():
        # a token whose two experts share a rank goes there once: fewer rows than pairs
        pairs = sum(r["y"].shape[0] for r in results) * CKPT["top_k"] * _case(len(results), name)["tp"]
        assert sum(sum(r["counts"].send_rows) for r in results) < pairs, name


# ---- NCCL on GPUs --------------------------------------------------------------------------------

# bf16 kernels against the float64 reference: verify's bf16 kernel bound (checks.KERNEL_TOLERANCE).
# Against the replicated layer the same: its partials are rounded to bf16 before the all-reduce,
# the dispatched ones are summed in float32.
NCCL_TOLERANCE = 1e-2


@pytest.mark.gpu
def test_nccl_token_sharded_matches_replicated_and_reference(ckpt, full_layer, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs for NCCL between processes, found {torch.cuda.device_count()}")
    worlds = [w for w in CASES if w <= torch.cuda.device_count()]
    for world in worlds:
        D.spawn_local(_worker, world, (str(ckpt), str(tmp_path), world, "cuda"))
    for world in worlds:
        for name in CASES[world]:
            case = _case(world, name)
            results = [torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=False) for r in range(world)]
            ref64, _ = _reference(full_layer, case, torch.bfloat16)
            start = 0
            for rank, (r, n) in enumerate(zip(results, case["tokens"])):
                assert r["y"].shape == (n, CKPT["hidden"]) and r["y"].dtype == torch.bfloat16, (name, rank)
                assert r["backend"] == "triton", (name, rank)
                if n:
                    assert _rel(r["y"], ref64[start:start + n]) <= NCCL_TOLERANCE, (name, rank)
                    assert _rel(r["y"], r["y_replicated"]) <= NCCL_TOLERANCE, (name, rank)
                start += n
            for d in range(world):
                assert [results[s]["counts"].send_rows[d] for s in range(world)] == list(results[d]["counts"].recv_rows)


# ---- no processes -------------------------------------------------------------------------------

def test_bytes_moved_counts_only_other_ranks():
    counts = DispatchCounts(rank=1, send_rows=(3, 5, 0, 2), recv_rows=(1, 7, 4, 0))
    moved = counts.bytes_moved(hidden=64, x_bytes=2, out_bytes=2, top_k=4)
    # dispatch: rows 3 + 0 + 2 (own 5 excluded), each 64 bf16 values + 4 int32 ids + 4 float32 weights
    assert moved["dispatch"] == 5 * (64 * 2 + 4 * 8)
    # combine: the rows received from others (1 + 4 + 0) go back, 64 bf16 values each
    assert moved["combine"] == 5 * 64 * 2
    assert moved["counts"] == 3 * 8 and moved["total"] == moved["dispatch"] + moved["combine"] + moved["counts"]


def test_construction_errors_name_the_problem():
    from mxfp4_moe.synthetic import random_expert_weights
    weights, _ = random_expert_weights(4, 64, 64, top_k=2, seed=0)
    local = MXFP4MoE(weights, backend="torch")
    groups = D.MoEGroups(tp_size=1, ep_size=2, tp_rank=0, ep_rank=0, group=object())
    with pytest.raises(ValueError, match="exchange must be one of"):
        TokenShardedMXFP4MoE(local, groups, exchange="alltoall")
    with pytest.raises(ValueError, match="one group over all"):
        TokenShardedMXFP4MoE(local, D.MoEGroups(tp_size=1, ep_size=2, tp_rank=0, ep_rank=0))
    with pytest.raises(ValueError, match="weights are for tp_rank 0 of 1, ep_rank 0 of 1"):
        TokenShardedMXFP4MoE(local, groups)
    with pytest.raises(ValueError, match="method must be one of"):
        exchange_rows(torch.zeros(1, 4), [1], [1], method="nccl")


# ---- the benchmark's gloo smoke --------------------------------------------------------------------

def test_benchmark_smoke_on_gloo(tmp_path):
    # benchmarks.bench_expert_dispatch end to end at its tiny size: both schemes on 2 ranks,
    # outputs within tolerance (exit 0), the JSON's rows and byte counts filled in.
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).parents[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.bench_expert_dispatch", "--device", "cpu", "--tiny", "--nproc", "2",
           "--tokens", "1,4", "--iters", "1", "--backend", "torch", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "crossover" in proc.stdout
    data = json.loads((tmp_path / "bench_expert_dispatch_n2.json").read_text())
    assert data["header"]["process_group"] == "gloo"
    assert [r["tokens_per_rank"] for r in data["rows"]] == [1, 4]
    for r in data["rows"]:
        assert r["passed"] and r["dispatch_bytes"] > 0 and r["replicated_bytes"] > 0
        # the ranks' counts agree: what rank 1 sent to rank 0 is what rank 0 received from it
        assert r["ranks"][1]["send_rows"][0] == r["ranks"][0]["recv_rows"][1]
