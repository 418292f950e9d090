"""Whole models: `integrations.transformers.load_model` / `replace_moe` against transformers' own
model of the same checkpoint with the experts dequantized (`Mxfp4Config(dequantize=True)`),
an independent reader and MoE implementation.

Bound: float32 logits within 1e-5 relative Frobenius error. Both sides dequantize MXFP4
exactly (every E2M1 value times a power of two is a float32) and compute in float32; what
differs is the order of float32 sums (routing GEMM, expert accumulation, the top-k sum), about
1e-7 per layer, and the logits of this two-layer model measure about 2e-7. Greedy decoding must
give the same ids.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="the model integration needs Hugging Face transformers")

from mxfp4_moe.checkpoint import CheckpointError, open_checkpoint  # noqa: E402
from mxfp4_moe.distributed import init_process_group, spawn_local  # noqa: E402
from mxfp4_moe.integrations.transformers import (MXFP4GptOssMLP, load_model, replace_moe,  # noqa: E402
                                                 shard_plan)
from mxfp4_moe.synthetic import DenseSpec, make_synthetic_checkpoint  # noqa: E402

LOGITS_TOLERANCE = 1e-5
# Not square (H != I), an odd expert count, I = 3 blocks of 32 (TP 2 splits it 2 + 1, padded).
MODEL = dict(num_layers=2, num_experts=5, hidden=64, intermediate=96, top_k=2, seed=3, full_model=True,
             dense=DenseSpec(vocab_size=128))
PROMPT = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
NEW_TOKENS = 16


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"hf": make_synthetic_checkpoint(root / "hf", **MODEL),
            "hf-3-shards": make_synthetic_checkpoint(root / "hf3", shards=3, **MODEL),
            "original": make_synthetic_checkpoint(root / "original", layout="original", **MODEL)}


def _transformers_model(path):
    from transformers import GptOssForCausalLM, Mxfp4Config
    model = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def reference(checkpoints):
    """transformers' dequantized model of the HF-layout checkpoint: logits at sequence lengths
    1 and 9, and 16 greedy tokens. The original-layout checkpoint holds the same model (the same
    seed gives the same tensors under either layout's names)."""
    model = _transformers_model(checkpoints["hf"])
    with torch.no_grad():
        return {"logits": {seq: model(PROMPT[:, :seq]).logits for seq in (1, 9)},
                "greedy": model.generate(PROMPT[:1], max_new_tokens=NEW_TOKENS, do_sample=False)}


def _check_against_reference(model, reference):
    with torch.no_grad():
        for seq, expected in reference["logits"].items():
            logits = model(PROMPT[:, :seq]).logits
            assert logits.shape == expected.shape
            assert _rel(logits, expected) < LOGITS_TOLERANCE, f"sequence length {seq}"
        greedy = model.generate(PROMPT[:1], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(greedy, reference["greedy"])


@pytest.mark.parametrize("layout", ["hf", "hf-3-shards", "original"])
def test_load_model_matches_transformers_dequantized_model(checkpoints, reference, layout):
    model = load_model(checkpoints[layout], device="cpu", dtype=torch.float32, backend="torch", progress=False)
    for layer in model.model.layers:
        assert isinstance(layer.mlp, MXFP4GptOssMLP)
    # The experts are the checkpoint's MXFP4 bytes, never a float copy: no parameter holds them.
    assert not [name for name, _ in model.named_parameters() if "experts" in name or "mlp" in name]
    assert model.model.layers[0].mlp.moe.weights.w13_blocks.dtype == torch.uint8
    _check_against_reference(model, reference)


def test_load_model_unpadded_plan(checkpoints, reference):
    with open_checkpoint(checkpoints["hf"]) as ckpt:
        plan = shard_plan(ckpt, align="none")
    model = load_model(checkpoints["hf"], device="cpu", dtype=torch.float32, backend="torch", plan=plan,
                       progress=False)
    assert model.model.layers[1].mlp.moe.weights.inter_pad == 96
    _check_against_reference(model, reference)


def test_block_returns_what_gpt_oss_mlp_returns(checkpoints):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    ours = load_model(checkpoints["hf"], device="cpu", dtype=torch.float32, backend="torch", progress=False)
    theirs = _transformers_model(checkpoints["hf"])
    assert isinstance(theirs.model.layers[0].mlp, GptOssMLP)
    x = torch.randn(2, 5, MODEL["hidden"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, scores = ours.model.layers[0].mlp(x)
        ref_out, ref_scores = theirs.model.layers[0].mlp(x)
    assert out.shape == ref_out.shape == x.shape and scores.shape == ref_scores.shape
    assert _rel(out, ref_out) < LOGITS_TOLERANCE
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_interpreter_kernels_on_the_tiny_model(checkpoints, reference):
    # Our Triton kernels (through the interpreter, float32) inside the model.
    pytest.importorskip("triton", reason="the kernels need Triton (CI runs this file without it too)")
    model = load_model(checkpoints["hf"], device="cpu", dtype=torch.float32, backend="triton", progress=False)
    assert model.model.layers[0].mlp.moe.backend == "triton"
    with torch.no_grad():
        logits = model(PROMPT[:, :9]).logits
    # The kernels round their operands to float32 too, with their own summation order.
    assert _rel(logits, reference["logits"][9]) < 1e-4


def test_replace_moe_on_a_built_model(checkpoints, reference):
    model = _transformers_model(checkpoints["hf"])
    assert replace_moe(model, checkpoints["original"], backend="torch", progress=False) is model
    assert all(isinstance(layer.mlp, MXFP4GptOssMLP) for layer in model.model.layers)
    _check_against_reference(model, reference)


def test_replace_moe_rejects_a_checkpoint_of_other_sizes(checkpoints, tmp_path):
    other = make_synthetic_checkpoint(tmp_path / "other", **{**MODEL, "num_experts": 4})
    model = _transformers_model(checkpoints["hf"])
    with pytest.raises(ValueError, match=r"num_local_experts = 5, but checkpoint .* has 4"):
        replace_moe(model, other, backend="torch", progress=False)


def test_a_checkpoint_without_dense_weights_is_a_clear_error(tmp_path):
    moe_only = make_synthetic_checkpoint(tmp_path / "moe", **{**MODEL, "full_model": False})
    with pytest.raises(CheckpointError, match=r"no dense weights .* model.embed_tokens.weight"):
        load_model(moe_only, device="cpu", dtype=torch.float32, backend="torch", progress=False)


def _unfused_full_model(source, folder):
    """The full model at `source` (Hugging Face layout), its experts written per expert
    (`mxfp4_moe.unfused`) and its dense tensors and config (quantization_config.layout "unfused")
    beside them."""
    import json

    from safetensors.torch import load_file, save_file

    from mxfp4_moe.unfused import unfuse_checkpoint
    with open_checkpoint(source) as ckpt:
        unfuse_checkpoint(ckpt, folder)
    dense = {name: t for file in sorted(source.glob("*.safetensors"))
             for name, t in load_file(str(file)).items() if ".mlp." not in name}
    save_file(dense, str(folder / "dense.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "layout": "unfused"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_load_model_reads_an_unfused_checkpoint(checkpoints, reference, tmp_path):
    # open_checkpoint finds the per-expert layout by config.json, whose dense tensors keep the
    # Hugging Face names: the same model as the fused checkpoint, within the same bound.
    folder = _unfused_full_model(checkpoints["hf"], tmp_path / "unfused")
    model = load_model(folder, device="cpu", dtype=torch.float32, backend="torch", progress=False)
    assert all(isinstance(layer.mlp, MXFP4GptOssMLP) for layer in model.model.layers)
    _check_against_reference(model, reference)


def test_a_sharded_plan_needs_torch_distributed(checkpoints):
    with open_checkpoint(checkpoints["hf"]) as ckpt:
        plan = shard_plan(ckpt, tp_size=2, tp_rank=0)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        load_model(checkpoints["hf"], device="cpu", dtype=torch.float32, backend="torch", plan=plan, progress=False)


def test_block_compiles_in_one_graph_and_matches_eager(checkpoints):
    model = load_model(checkpoints["hf"], device="cpu", dtype=torch.float32, backend="torch", progress=False)
    block = model.model.layers[0].mlp
    x = torch.randn(1, 3, MODEL["hidden"], generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    with torch.no_grad():
        compiled_out, compiled_scores = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
        out, scores = block(x)
    assert torch.equal(compiled_out, out) and torch.equal(compiled_scores, scores)


# ---- TP / EP over gloo processes --------------------------------------------------------------

def _sharded_worker(path: str, out: str, tp: int, ep: int) -> None:
    import torch.distributed as dist
    init_process_group(torch.device("cpu"))
    try:
        rank = dist.get_rank()
        with open_checkpoint(path) as ckpt:
            plan = shard_plan(ckpt, tp_size=tp, tp_rank=rank % tp, ep_size=ep, ep_rank=rank // tp)
        model = load_model(path, device="cpu", dtype=torch.float32, backend="torch", plan=plan, progress=False)
        weights = model.model.layers[0].mlp.moe.weights
        with torch.no_grad():
            result = {"logits": model(PROMPT).logits,
                      "greedy": model.generate(PROMPT[:1], max_new_tokens=NEW_TOKENS, do_sample=False),
                      "local_experts": weights.local_experts.tolist(), "inter": weights.inter}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "ep2", "tp2xep2"])
def test_sharded_model_gives_the_single_process_logits(checkpoints, reference, tmp_path, tp, ep):
    spawn_local(_sharded_worker, tp * ep, (str(checkpoints["hf"]), str(tmp_path), tp, ep))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(tp * ep)]
    single = load_model(checkpoints["hf"], device="cpu", dtype=torch.float32, backend="torch", progress=False)
    with torch.no_grad():
        expected = single(PROMPT).logits
    # Each rank really held a shard: the EP ranks split the experts, the TP ranks the intermediate blocks.
    experts = [set(result["local_experts"]) for result in results]
    assert set().union(*experts) == set(range(MODEL["num_experts"]))
    assert all(len(e) < MODEL["num_experts"] for e in experts) or ep == 1
    assert [result["inter"] for result in results] == [64, 32] * ep if tp == 2 else [96] * ep
    for rank, result in enumerate(results):
        assert _rel(result["logits"], expected) < LOGITS_TOLERANCE, f"rank {rank}"
        assert torch.equal(result["greedy"], reference["greedy"]), f"rank {rank}"
