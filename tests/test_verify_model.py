"""`python -m mxfp4_moe.verify CHECKPOINT --model`: the whole-model check passes on a full
checkpoint, fails on a planted bug in our MoE block, and is a usage error (exit 2) where it
cannot run."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="the model check needs Hugging Face transformers")

from mxfp4_moe import verify  # noqa: E402
from mxfp4_moe.integrations import transformers as integration  # noqa: E402
from mxfp4_moe.synthetic import DenseSpec, make_synthetic_checkpoint  # noqa: E402

MODEL = dict(num_layers=2, num_experts=4, hidden=64, intermediate=96, top_k=2, seed=5,
             dense=DenseSpec(vocab_size=128))
FAST = ["--backend", "torch", "--tokens", "8", "--quiet"]


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("full") / "m", full_model=True, **MODEL)


def _model_check(report_path):
    [check] = [c for c in json.loads(report_path.read_text())["checks"] if c["check"] == "model"]
    return check


def _run_model_check(folder, tmp_path, exit_code: int) -> dict:
    """verify --model (FAST) on `folder`, which must exit with `exit_code`; its model check's entry
    of the JSON report."""
    report = tmp_path / "r.json"
    assert verify.main([str(folder), "--model", *FAST, "--json", str(report)]) == exit_code
    return _model_check(report)


def _planted(monkeypatch, plant):
    """Every layer load_model loads goes through plant(weights) first: a bug planted in our MoE block."""
    real_load_layer = integration.load_layer

    def load_layer(*args, **kwargs):
        weights = real_load_layer(*args, **kwargs)
        plant(weights)
        return weights

    monkeypatch.setattr(integration, "load_layer", load_layer)


def _swap_gate_up(weights, names=("w13_blocks", "w13_scales")):
    for name in names:                               # (rows interleaved: 2j gate, 2j + 1 up)
        t = getattr(weights, name)
        t.copy_(t.view(t.shape[0], -1, 2, *t.shape[2:]).flip(2).reshape(t.shape))


def test_model_check_passes_and_reports_its_figures(full_model, tmp_path):
    check = _run_model_check(full_model, tmp_path, verify.EXIT_OK)
    figures = check["figures"]
    assert check["status"] == "PASS"
    assert set(figures["rel_err"]) == {"1", "7", "32"}
    assert max(figures["rel_err"].values()) <= 1e-4 and set(figures["tolerance"].values()) == {1e-4}
    assert figures["ids"] == figures["reference_ids"] and len(figures["ids"]) == 16
    assert figures["first_difference"] is None


def test_model_check_fails_on_swapped_gate_and_up(full_model, tmp_path, monkeypatch):
    # gpt-oss interleaves w13's rows: 2j gate, 2j+1 up. A loader that swapped them would still
    # give finite, plausible outputs; the model check must catch it.
    _planted(monkeypatch, lambda weights: _swap_gate_up(weights, names=("w13_blocks", "w13_scales", "w13_bias")))
    check = _run_model_check(full_model, tmp_path, verify.EXIT_CHECK_FAILED)
    assert check["status"] == "FAIL"
    assert max(check["figures"]["rel_err"].values()) > 1e-2


def test_model_check_without_dense_weights_is_exit_2(tmp_path, capsys):
    moe_only = make_synthetic_checkpoint(tmp_path / "moe", **MODEL)
    assert verify.main([str(moe_only), "--model", *FAST]) == verify.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    # 2 layers x (q, k, v, o weights and biases, sinks, 2 norms) + embedding, final norm, lm_head
    assert "no dense weights (25 tensors missing" in err


def test_model_check_on_the_original_layout_is_exit_2(tmp_path, capsys):
    original = make_synthetic_checkpoint(tmp_path / "orig", layout="original", full_model=True, **MODEL)
    assert verify.main([str(original), "--model", *FAST]) == verify.EXIT_BAD_INPUT
    assert "original layout, which transformers cannot load" in capsys.readouterr().err


def test_model_check_is_off_by_default(full_model, tmp_path):
    report = tmp_path / "r.json"
    assert verify.main([str(full_model), *FAST, "--json", str(report)]) == verify.EXIT_OK
    assert not [c for c in json.loads(report.read_text())["checks"] if c["check"] == "model"]


def test_model_check_under_torchrun_is_exit_2(full_model, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert verify.main([str(full_model), "--model", *FAST]) == verify.EXIT_BAD_INPUT
    assert "--model runs in one process" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_model_check_in_bf16_is_judged_against_float32(full_model, tmp_path):
    # Both bf16 models against transformers' float32 one; tokens routed differently at a router
    # near-tie are counted and left out, none of them may be far from a tie.
    report = tmp_path / "r.json"
    assert verify.main([str(full_model), "--model", "--backend", "torch", "--dtype", "bfloat16", "--tokens", "8",
                        "--quiet", "--json", str(report)]) == verify.EXIT_OK
    figures = _model_check(report)["figures"]
    assert figures["reference"] == "transformers float32" and not figures["routing_problems"]
    for seq in ("1", "7", "32"):
        assert figures["rel_err"][seq] <= figures["tolerance"][seq]
        assert figures["tolerance"][seq] == pytest.approx(2 * figures["reference_rel_err"][seq] + 2e-3)
        assert 0 <= figures["tokens_excluded"][seq] <= 0.75 * 8 * int(seq)


def _routings(batch, seq, layers, experts, disagreements):
    """Synthetic routings of two models ("fp32", "ours"), top-1 of `experts`: every token goes to
    expert 0 with a clear margin, except at each (b, s, layer, gap) of `disagreements`, where
    "ours" picks expert 1 and the float32 logits of experts 0 and 1 lie `gap` apart."""
    tokens = batch * seq
    fp32 = [(torch.zeros(tokens, 1, dtype=torch.int64), torch.tensor([[2.0] + [0.0] * (experts - 1)] * tokens))
            for _ in range(layers)]
    ours = [(ids.clone(), logits.clone()) for ids, logits in fp32]
    for b, s, layer, gap in disagreements:
        t = b * seq + s
        fp32[layer][1][t, 1] = 2.0 - gap
        ours[layer][0][t, 0] = 1
    return {"fp32": fp32, "ours": ours}


def test_a_disagreement_far_from_a_tie_fails_the_routing():
    from mxfp4_moe.verify import model_check
    left, problems = model_check.undisturbed_tokens(_routings(2, 6, 2, 4, [(1, 2, 1, 0.4)]), 2, 6)
    assert len(problems) == 1 and "sequence 1 token 2" in problems[0] and "not a near-tie" in problems[0]


def test_a_near_tie_leaves_out_its_later_tokens_and_what_it_explains():
    # A near-tie at token 1 in layer 0 reaches tokens 1.. of its sequence through layer 1's
    # attention: a disagreement there at token 4, far from a tie, is its consequence, not a bug.
    # The same far disagreement in the other sequence, which no near-tie precedes, is judged.
    from mxfp4_moe.verify import model_check
    ties = [(0, 1, 0, 0.01), (0, 4, 1, 0.4)]
    left, problems = model_check.undisturbed_tokens(_routings(2, 6, 2, 4, ties), 2, 6)
    assert problems == []
    assert left.view(2, 6).tolist() == [[True] + [False] * 5, [True] * 6]
    left, problems = model_check.undisturbed_tokens(_routings(2, 6, 2, 4, ties + [(1, 4, 1, 0.4)]), 2, 6)
    assert len(problems) == 1 and "sequence 1 token 4" in problems[0]
    # A far disagreement in the same layer as the near-tie is not its consequence (the MoE output
    # of layer 0 reaches other tokens only from layer 1 on), nor one at an earlier token.
    for far in [(0, 3, 0, 0.4), (0, 0, 1, 0.4)]:
        _, problems = model_check.undisturbed_tokens(_routings(2, 6, 2, 4, [(0, 1, 0, 0.01), far]), 2, 6)
        assert len(problems) == 1, far


# ---- Qwen3-MoE in compressed-tensors MXFP4 ------------------------------------------------------
# The reference is transformers' Qwen3MoeForCausalLM loading the files through compressed-tensors
# (CompressedTensorsConfig(dequantize=True)); it keeps the experts in bf16, which the float32
# reference casts exactly (model_check's docstring).

@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    pytest.importorskip("compressed_tensors", reason="the Qwen3-MoE reference is transformers + compressed-tensors")
    from mxfp4_moe.synthetic_formats import make_qwen3_moe_model_checkpoint
    # norm_topk_prob False: the setting under which a flipped renormalisation shows.
    return make_qwen3_moe_model_checkpoint(tmp_path_factory.mktemp("qwen3") / "m", norm_topk_prob=False, seed=1)


def test_qwen3_moe_reference_is_float32_with_the_files_values(qwen_model):
    from mxfp4_moe.verify import model_check
    folder, expected = qwen_model
    reference = model_check._reference_model(folder, "qwen3_moe", torch.device("cpu"), torch.float32)
    want = dict(expected.named_parameters())
    for name, param in reference.named_parameters():
        assert param.dtype == torch.float32, name
        assert torch.equal(param, want[name]), name


def test_model_check_passes_on_qwen3_moe(qwen_model, tmp_path):
    folder, _ = qwen_model
    check = _run_model_check(folder, tmp_path, verify.EXIT_OK)
    figures = check["figures"]
    assert check["status"] == "PASS"
    assert max(figures["rel_err"].values()) <= 1e-5          # the same float32 values: measured ~3e-7
    assert figures["ids"] == figures["reference_ids"] and figures["first_difference"] is None


def _flip_norm_topk_prob(weights):
    weights.norm_topk_prob = not weights.norm_topk_prob


def _scores_before_softmax(weights):
    weights.router_scoring = "topk_softmax"          # gpt-oss's order instead of Qwen's softmax_topk


@pytest.mark.parametrize("plant", [_swap_gate_up, _flip_norm_topk_prob, _scores_before_softmax],
                         ids=["gate-up-swapped", "norm_topk_prob-flipped", "router-order-swapped"])
def test_model_check_fails_on_a_planted_qwen3_moe_bug(qwen_model, tmp_path, monkeypatch, plant):
    folder, _ = qwen_model
    _planted(monkeypatch, plant)
    check = _run_model_check(folder, tmp_path, verify.EXIT_CHECK_FAILED)
    assert check["status"] == "FAIL"
    assert max(check["figures"]["rel_err"].values()) > 1e-3


def test_model_check_on_qwen3_moe_experts_alone_is_exit_2(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from mxfp4_moe.synthetic_formats import make_format_checkpoint
    folder, _ = make_format_checkpoint(tmp_path / "ct", "compressed-tensors")
    assert verify.main([str(folder), "--model", *FAST]) == verify.EXIT_BAD_INPUT
    assert "has no dense weights" in capsys.readouterr().err
