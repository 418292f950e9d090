"""Whole models on a GPU: `load_model`'s bf16 model (our Triton kernels) against transformers'
model of the same checkpoint with the experts dequantized to bf16 (`Mxfp4Config(dequantize=True)`,
eager attention), both against transformers' float32 model; and torch.compile of one MoE block and
of the whole model (reduce-overhead). Run with `pytest -m gpu tests/test_model_on_gpu.py`; skipped
without CUDA.

Logits bound, bf16 models: relative Frobenius error below LOGITS_BOUND = 3e-2. Every bf16 model
rounds its activations to bf16 between operations, 2**-8 relative at most per rounding (about
2**-9.8 RMS); through the 2 layers' norms, projections, softmax, experts and residual adds the
logits of this model carry about 7e-3 of it per token (a CPU run of these checks: transformers'
bf16 model and ours with the torch backend against float32; a float32 model on the same weights
sits at about 1e-7, tests/test_transformers_model.py). 3e-2 leaves room for that noise, not for a wrong
weight, scale, bias or route, which move the logits by O(1e-1). So that the bound measures
bf16 noise and not a bug of ours, ours-vs-float32 must be comparable to transformers' own
bf16-vs-float32 error: at most 2x it plus SLACK = 2e-3.

Routing near-ties: a token whose router logits for its k-th and (k+1)-th experts differ by less
than the bf16 noise may be routed to another expert by each model (transformers' bf16 router
rounds the logits themselves to bf16; ours sums them in float32). Its output then legitimately
differs by a sizeable part of an expert's contribution (~1e-1 of its logits), and so, through
the next layers' attention, do the later tokens of its sequence (up to ~5e-2 each, seen on a
CPU run of these checks); one such token would dominate the Frobenius error. So the errors are
taken over the tokens no disagreement reaches: a token routed differently by some model in some
layer is left out, and with it, when that is not the last layer, the later tokens of its
sequence. Each disagreement must be a near-tie: the float32 router logits of the experts the
models disagree on lie within model_check.ROUTER_TIE = 0.05 of each other (router logits here are about
N(0, 1); rounding moves them by at most ~1e-2, while neighbouring logits of 8 experts are
typically ~0.3 apart); a bug in routing or weights gives disagreements far from ties. At least a
quarter of the tokens (4 sequences of 16) must be left.

Greedy decoding: 16 tokens equal to the bf16 reference's; where they differ, the first differing
step must be a near-tie: the float32 model's logits of the two tokens within GREEDY_TIE = 0.1 of
its logits' RMS (about 3x the per-logit noise the logits bound allows), or ours and the bf16
reference routing some token of the prefix differently, every such disagreement a router
near-tie (as above).

torch.compile: one `MXFP4GptOssMLP` under fullgraph=True runs the same custom op and kernels
as eager, so with the deterministic "slots" combine the output is bitwise equal. The whole model
under mode="reduce-overhead" is compared in float32 (dense part; the MoE kernels compute in
bf16 either way): inductor fuses and reorders the float32 dense ops (~1e-6 relative), which the
MoE's bf16 rounding of its input can turn into one bf16 ulp on a few elements; so within
COMPILED_TOLERANCE = 1e-3, far below any routing or weight error and immune to router flips
(float32 router logits move by ~1e-6).
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformers", reason="the model integration needs Hugging Face transformers")

from mxfp4_moe.verify import model_check  # noqa: E402
from mxfp4_moe.integrations.transformers import load_model  # noqa: E402
from mxfp4_moe.synthetic import make_synthetic_checkpoint  # noqa: E402

pytestmark = pytest.mark.gpu

LOGITS_BOUND = 3e-2
SLACK = 2e-3
GREEDY_TIE = 0.1
COMPILED_TOLERANCE = 1e-3
MODEL = dict(num_layers=2, num_experts=8, hidden=256, intermediate=256, top_k=4, seed=5, full_model=True)
VOCAB = 256                      # DenseSpec's default
PROMPT = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
NEW_TOKENS = 16
# Where the models run, and our layer's backend: module globals, so the checks can be exercised
# on a CPU (device cpu, backend torch) by a script; the tests themselves need CUDA.
DEVICE = "cuda"
BACKEND = "auto"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- the models --------------------------------------------------------------------------------

def transformers_model(path, dtype: torch.dtype):
    """transformers' own model of the checkpoint, experts dequantized to `dtype`, eager attention."""
    import importlib.util
    from transformers import GptOssForCausalLM, Mxfp4Config
    # device_map needs accelerate (the GPU image has it); without it the model loads on the CPU first.
    placement = {"device_map": DEVICE} if importlib.util.find_spec("accelerate") else {}
    model = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True), dtype=dtype,
                                              attn_implementation="eager", **placement)
    return model.to(DEVICE).eval()


def build_models(path) -> dict:
    return {"ours": load_model(path, device=DEVICE, backend=BACKEND, progress=False),
            "bf16": transformers_model(path, torch.bfloat16),
            "fp32": transformers_model(path, torch.float32)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("gpu_model") / "hf", **MODEL)


@pytest.fixture(scope="module")
def models(checkpoint):
    return build_models(checkpoint)


# ---- routing -----------------------------------------------------------------------------------

def forward_with_routing(model, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    return model_check.forward_with_routing(model, ids.to(DEVICE))


first_disagreement = model_check.first_disagreement


def undisturbed_tokens(routings: dict, batch: int, seq: int) -> torch.Tensor:
    """The tokens no routing disagreement reaches; every disagreement must be a near-tie and
    enough tokens must be left (`model_check.undisturbed_tokens`)."""
    left, problems = model_check.undisturbed_tokens(routings, batch, seq)
    assert not problems, problems
    return left


# ---- (1) bf16 logits and greedy decoding -------------------------------------------------------

@pytest.mark.parametrize("seq", [1, 16], ids=["decode-1-token", "prefill-16"])
def test_bf16_logits_against_transformers_dequantized_and_float32(models, seq):
    ids = PROMPT[:, :seq]
    logits, routings = {}, {}
    for name, model in models.items():
        logits[name], routings[name] = forward_with_routing(model, ids)
    left = undisturbed_tokens(routings, *ids.shape)
    flat = {name: value.reshape(-1, value.shape[-1])[left.to(value.device)] for name, value in logits.items()}
    ours_theirs = _rel(flat["ours"], flat["bf16"])
    ours_fp32 = _rel(flat["ours"], flat["fp32"])
    theirs_fp32 = _rel(flat["bf16"], flat["fp32"])
    print(f"seq {seq}: {int(left.sum())}/{left.numel()} tokens left; ours vs transformers bf16 "
          f"{ours_theirs:.2e}, ours vs float32 {ours_fp32:.2e}, transformers bf16 vs float32 {theirs_fp32:.2e}")
    assert ours_theirs < LOGITS_BOUND
    # The premise: transformers' bf16 model is itself within the bound of float32 (bf16 noise only).
    assert theirs_fp32 < LOGITS_BOUND
    assert ours_fp32 <= 2 * theirs_fp32 + SLACK


def greedy_divergence_is_a_near_tie(models, ours_ids: torch.Tensor, ref_ids: torch.Tensor) -> str:
    """Why the first differing greedy step is legitimate ("" if it is not)."""
    step = int((ours_ids[0] != ref_ids[0]).nonzero()[0])
    prefix = ref_ids[:, :step]
    fp32_logits, _ = forward_with_routing(models["fp32"], prefix)
    last = fp32_logits[0, -1]
    ours_token, ref_token = int(ours_ids[0, step]), int(ref_ids[0, step])
    gap = abs(last[ours_token] - last[ref_token]).item() / last.pow(2).mean().sqrt().item()
    if gap < GREEDY_TIE:
        return f"step {step}: float32 logits of tokens {ours_token} and {ref_token} within {gap:.3f} of their RMS"
    routings = {name: forward_with_routing(models[name], prefix)[1] for name in ("ours", "bf16", "fp32")}
    found = [f for f in (first_disagreement(routings, t, names=("ours", "bf16")) for t in range(step)) if f is not None]
    if found and all(spread < model_check.ROUTER_TIE for _, spread in found):
        return (f"step {step}: ours and the reference route {len(found)} token(s) of the prefix differently, each at a "
                f"router near-tie (spreads {', '.join(f'{spread:.3f}' for _, spread in found)})")
    return ""


def test_greedy_tokens_match_the_bf16_reference(models):
    prompt = PROMPT[:1, :9].to(DEVICE)
    with torch.no_grad():
        ours = models["ours"].generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        ref = models["bf16"].generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours.shape == ref.shape == (1, 9 + NEW_TOKENS)
    if torch.equal(ours, ref):
        return
    why = greedy_divergence_is_a_near_tie(models, ours.cpu(), ref.cpu())
    print(f"greedy ids differ: {why}")
    assert why, f"greedy ids differ at a step that is no near-tie: ours {ours.tolist()}, bf16 reference {ref.tolist()}"


# ---- (2) one block under torch.compile ---------------------------------------------------------

def test_compiled_block_in_one_graph_equals_eager(checkpoint):
    # "slots" combine: a deterministic sum of each token's k expert outputs, so the compiled
    # block (the same custom op, the same kernels) must agree bit for bit; fullgraph=True makes
    # any graph break inside the block an error.
    model = load_model(checkpoint, device=DEVICE, backend=BACKEND, combine="slots", progress=False)
    block = model.model.layers[0].mlp
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):           # the second input checks the compiled block reads its input
            x = torch.randn(2, 7, MODEL["hidden"], generator=gen, device=DEVICE).to(torch.bfloat16)
            out, scores = compiled(x)
            expected_out, expected_scores = block(x)
            assert out.dtype == torch.bfloat16 and out.shape == x.shape
            assert torch.equal(out, expected_out)
            assert torch.equal(scores, expected_scores)


# ---- (3) the whole model under reduce-overhead -------------------------------------------------

def static_cache(model, max_cache_len: int):
    """A StaticCache with full-length layers also for the sliding ones (whose own static cache
    counts its length in a Python int in transformers 5.24, which a compiled step specializes
    on); the sliding layers' mask still applies the window."""
    import copy
    from transformers import StaticCache
    config = copy.deepcopy(model.config)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    config.sliding_window = None
    return StaticCache(config=config, max_cache_len=max_cache_len)


def step_kwargs(model, cache, start: int, length: int, batch: int) -> dict:
    import inspect
    params = inspect.signature(model.forward).parameters
    positions = torch.arange(start, start + length, device=DEVICE)
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True,
              "position_ids": positions.unsqueeze(0).expand(batch, length)}
    if "cache_position" in params:
        kwargs["cache_position"] = positions
    return kwargs


@pytest.fixture(scope="module")
def float32_model(checkpoint):
    return load_model(checkpoint, device=DEVICE, dtype=torch.float32, backend=BACKEND, combine="slots", progress=False)


@pytest.fixture
def cudagraphs_or_error():
    # A skipped CUDA graph (a CPU tensor, a mutated input, dynamic shapes) raises instead of
    # silently running the compiled graph without one.
    import torch._inductor.config as inductor_config
    with inductor_config.patch({"triton.cudagraph_or_error": True}):
        yield


@torch.no_grad()
def test_model_under_reduce_overhead_gives_eager_logits(float32_model, cudagraphs_or_error):
    # A fixed [4, 8] forward without a cache: the calls after the first two replay the graph.
    model = float32_model
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead")
    for call, ids in enumerate([PROMPT[:, :8]] * 4 + [PROMPT[:, 8:]]):     # the last: new tokens, same shape
        ids = ids.to(DEVICE)
        expected = model(ids, use_cache=False).logits
        got = compiled(ids, use_cache=False).logits.clone()
        err = _rel(got, expected)
        assert err < COMPILED_TOLERANCE, f"call {call}: {err:.2e}"


@torch.no_grad()
def test_decode_step_under_reduce_overhead_gives_eager_logits(float32_model, cudagraphs_or_error):
    # Decode steps of one token per sequence on a StaticCache (the same shapes every step), the
    # eager model and the compiled one each on its own cache after the same eager prefill.
    model = float32_model
    prompt, steps = PROMPT[:, :8].to(DEVICE), 5
    tokens = torch.randint(0, VOCAB, (steps, prompt.shape[0], 1), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    caches = {name: static_cache(model, prompt.shape[1] + steps) for name in ("eager", "compiled")}
    for cache in caches.values():
        model(prompt, **step_kwargs(model, cache, 0, prompt.shape[1], prompt.shape[0]))
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    for i in range(steps):
        start = prompt.shape[1] + i
        batch = prompt.shape[0]
        expected = model(tokens[i], **step_kwargs(model, caches["eager"], start, 1, batch)).logits
        got = compiled(tokens[i], **step_kwargs(model, caches["compiled"], start, 1, batch)).logits.clone()
        err = _rel(got, expected)
        assert err < COMPILED_TOLERANCE, f"step {i}: {err:.2e}"
