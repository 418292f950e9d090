"""verify's `model` check: the whole model as `integrations.transformers.load_model` builds it
(our loader, our MoE blocks) against transformers' own model of the same checkpoint with the
experts dequantized: its reader, its dequantization, its MoE.

- gpt-oss (Hugging Face layout): `GptOssForCausalLM` with `Mxfp4Config(dequantize=True)`.
- gpt-oss as a GGUF file: transformers' own GGUF loader fails on gpt-oss's rope keys (5.25),
  so the reference is the same model in the Hugging Face layout (`--reference FOLDER`), loaded as
  above. It checks our GGUF reading (re-packed MXFP4 experts, dense tensors through gguf's
  dequantize, the config from the metadata) where the twin holds the GGUF's values.
- Qwen3-MoE in compressed-tensors MXFP4: `Qwen3MoeForCausalLM` with
  `CompressedTensorsConfig(dequantize=True)` (the compressed-tensors package decompresses). It
  keeps the experts in bf16 whatever dtype is asked for; bf16 holds every MXFP4 value exactly
  (E2M1 has one mantissa bit, bf16 seven, and float32's exponent range) for scale bytes up to
  252, so the float32 reference casts those expert tensors to float32, exactly, and runs
  transformers' eager expert loop on them: the same values in float32, as for gpt-oss.

Routing near-ties: in bf16 a token whose router logits for its k-th and (k+1)-th experts lie
within the rounding noise may be routed to another expert by each model. Its logits then differ
by a sizeable part of an expert's contribution, and through attention so do the later tokens of
its sequence: legitimate, and one such token would decide the Frobenius error. So the errors are
taken over the tokens no routing disagreement reaches (`undisturbed_tokens`), every disagreement
that no earlier one explains must be a near-tie (the float32 model's router logits of the
disputed experts within ROUTER_TIE), and at least MIN_LEFT of the tokens must be left; the report
counts the tokens left out.

Two comparisons on seeded token ids:
- logits at a few sequence lengths (1 included: a decode step). In float32, relative Frobenius
  error under FLOAT32_TOLERANCE. In bf16 / fp16 both models carry their own rounding noise, whose
  size depends on the model (its depth, its weights' scale) more than on any bound we could fix,
  so the reference there is transformers' float32 model: our error against it must be no larger
  than LOW_PRECISION_FACTOR x transformers' own bf16 (fp16) model's, plus LOW_PRECISION_SLACK;
- greedy decoding of GREEDY_TOKENS tokens. When the ids differ, the report names the first step
  and the reference's logit gap there (its top token against ours): a gap within twice the logit
  noise measured on the prompt (each of the two logits may move by the noise) is a near-tie,
  which rounding alone explains, and passes; a larger one is a bug.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .checks import CheckResult, rel_err

SEQUENCE_LENGTHS = (1, 7, 32)
# Sequences per logits comparison. In bf16 a token whose router logits nearly tie may go to
# another expert in each model, moving its logits by ~1e-1 relative: legitimate, and over 8
# sequences it weighs a third of that in the Frobenius error, not all of it.
PROMPTS = 8
GREEDY_TOKENS = 16
GREEDY_PROMPT = 8
# float32: both models dequantize exactly and differ only in the order of float32 sums (about
# 1e-7 per layer on the synthetic models; the bound leaves room for deeper ones).
FLOAT32_TOLERANCE = 1e-4
# bf16 / fp16: ours rounds once per matmul, transformers at every op; at most twice its error
# against float32 (and the slack for a model whose bf16 error is near zero). The built-in model
# measured 5.3e-2 at one token against transformers' bf16 model (H200, c26bb0e): bf16 noise of
# two models, not a bound to hard-code.
LOW_PRECISION_FACTOR, LOW_PRECISION_SLACK = 2.0, 2e-3


# Router logits are about N(0, 1) on gpt-oss-style weights; bf16 rounding moves them by ~1e-2,
# while neighbouring logits of 8 or more experts lie ~0.3 apart: a bug routes far from ties.
ROUTER_TIE = 0.05
MIN_LEFT = 0.25


# ---- routing disagreements ---------------------------------------------------------------------

@torch.no_grad()
def forward_with_routing(model, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """A model's logits [B, S, V] float32 and, per layer, (expert ids [T, k] sorted, float32
    router logits [T, E]) as it routed each token (T = B * S), seen at its MoE block's input.
    Works for our `MXFP4GptOssMLP` / `MXFP4Qwen3MoeBlock` and transformers' `GptOssMLP` /
    `Qwen3MoeSparseMoeBlock`."""
    from ..integrations.qwen3_moe import MXFP4Qwen3MoeBlock
    from ..integrations.transformers import MXFP4GptOssMLP
    from ..routing import route
    routing = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x.reshape(-1, x.shape[-1])
        if isinstance(module, (MXFP4GptOssMLP, MXFP4Qwen3MoeBlock)):
            layer = getattr(module.moe, "local", module.moe)      # (a DistributedMXFP4MoE holds an MXFP4MoE)
            w = layer.weights
            # The call the layer itself makes (deterministic), so these are the experts it used.
            _, expert_ids = route(x, w.router_weight, w.router_bias, w.top_k,
                                  router_weight_bf16=layer.router_weight_bf16, scoring=w.router_scoring,
                                  norm_topk_prob=w.norm_topk_prob)
            logits = x.float() @ w.router_weight[:, :x.shape[1]].float().T + w.router_bias.float()
        else:
            # transformers' routers return (router logits, scores, ids): ids come last. gpt-oss's
            # is `router` with a bias, Qwen3-MoE's `gate` without one.
            router = module.router if hasattr(module, "router") else module.gate
            expert_ids = router(x)[-1]
            bias = router.bias.float() if getattr(router, "bias", None) is not None else None
            logits = F.linear(x.float(), router.weight.float(), bias)
        routing.append((expert_ids.sort(-1).values.cpu(), logits.cpu()))

    handles = [layer.mlp.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        logits = model(ids).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, routing


def first_disagreement(routings: dict, token: int, names=None) -> tuple[int, float] | None:
    """The first layer where the models `names` (default all) route `token` differently, and the
    spread of the float32 model's (routings["fp32"]) router logits over the disputed experts;
    None where they agree in every layer."""
    names = list(routings) if names is None else list(names)
    for layer in range(len(routings["fp32"])):
        sets = [set(routings[n][layer][0][token].tolist()) for n in names]
        disputed = set().union(*sets) - set.intersection(*sets)
        if disputed:
            values = routings["fp32"][layer][1][token][sorted(disputed)]
            return layer, (values.max() - values.min()).item()
    return None


def undisturbed_tokens(routings: dict, batch: int, seq: int) -> tuple[torch.Tensor, list[str]]:
    """([batch * seq] bool: the tokens no routing disagreement reaches, problems): a problem is
    a disagreement that is no near-tie and that no earlier one can explain, or fewer than
    MIN_LEFT of the tokens left.

    A disagreement at token s' in layer L' changes that token's residual stream, which the
    attention of every later layer mixes into the tokens s >= s' of its sequence: a token s that
    the models then route differently in a layer L > L' may be far from any tie and still be
    rounding's consequence, so it is left out, not judged.
    """
    layers = len(routings["fp32"])
    left = torch.ones(batch, seq, dtype=torch.bool)
    problems = []
    for b in range(batch):
        earliest_layer = None           # the lowest layer of a disagreement at this or an earlier token
        for s in range(seq):
            found = first_disagreement(routings, b * seq + s)
            if found is None:
                continue
            layer, spread = found
            downstream = earliest_layer is not None and earliest_layer < layer
            if spread >= ROUTER_TIE and not downstream:
                problems.append(f"sequence {b} token {s} is routed differently in layer {layer}, with the disputed "
                                f"experts' float32 router logits {spread:.3f} apart: not a near-tie")
            earliest_layer = layer if earliest_layer is None else min(earliest_layer, layer)
            # Through the later layers' attention it reaches every later token of its sequence.
            left[b, s if layer == layers - 1 else slice(s, None)] = False
    if int(left.sum()) < max(1, math.ceil(MIN_LEFT * batch * seq)):
        problems.append(f"only {int(left.sum())} of {batch * seq} tokens are left by the routing near-ties")
    return left.reshape(-1), problems


def dense_weights_problem(checkpoint, reference: str | Path | None = None) -> str:
    """Why `checkpoint` cannot be checked as a whole model ("" when it can). `reference`: for a
    GGUF file, the folder of the same model in the Hugging Face layout (None elsewhere)."""
    if checkpoint.layout == "gguf":
        return _gguf_problem(checkpoint, reference)
    if reference is not None:
        return (f"--reference is for GGUF files; {checkpoint.path} holds the {checkpoint.layout!r} layout, which "
                "transformers loads itself")
    if checkpoint.layout == "compressed-tensors":
        return _qwen3_moe_problem(checkpoint)
    if checkpoint.layout not in ("hf", "original"):      # the other formats (`mxfp4_moe.formats`)
        return (f"{checkpoint.path} holds the {checkpoint.layout!r} layout: the model check compares gpt-oss "
                "checkpoints in the Hugging Face layout with transformers' own load; it has no reference for "
                "this format yet")
    from ..integrations.transformers import check_dense_tensors, missing_dense_tensors
    missing = missing_dense_tensors(checkpoint)
    if missing:
        return (f"{checkpoint.path} has no dense weights ({len(missing)} tensors missing, e.g. {missing[0]}): "
                "the model check needs a full checkpoint (embeddings, attention, norms, unembedding), "
                "not the MoE layers alone")
    # Their dtypes and shapes, before transformers' reference model reads them unchecked.
    check_dense_tensors(checkpoint)
    if checkpoint.layout == "original":
        return (f"{checkpoint.path} is in the original layout, which transformers cannot load, so it has no "
                "independent reference; check the Hugging Face layout folder of the same model (load_model "
                "itself reads both)")
    return ""


def _gguf_problem(checkpoint, reference) -> str:
    from ..checkpoint import open_checkpoint
    from ..integrations.transformers import check_dense_tensors, gpt_oss_config, missing_dense_tensors
    if reference is None:
        return (f"{checkpoint.path} is a GGUF file, which transformers' own GGUF loader cannot read for gpt-oss "
                "(its rope keys); give --reference FOLDER: the same model in the Hugging Face layout, which "
                "transformers loads as the reference")
    missing = missing_dense_tensors(checkpoint)
    if missing:
        return (f"{checkpoint.path} has no dense weights ({len(missing)} tensors missing, e.g. {missing[0]}): "
                "the model check needs a whole model, not the MoE layers alone")
    check_dense_tensors(checkpoint)
    with open_checkpoint(reference) as twin:
        if twin.layout != "hf":
            return f"--reference {reference}: expected a gpt-oss checkpoint in the Hugging Face layout, found {twin.layout}"
        problem = dense_weights_problem(twin)
        if problem:
            return f"--reference: {problem}"
        ours, theirs = gpt_oss_config(checkpoint).to_dict(), gpt_oss_config(twin).to_dict()
        keys = ("num_hidden_layers", "num_local_experts", "num_experts_per_tok", "hidden_size", "intermediate_size",
                "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim")
        differ = [f"{k} {ours.get(k)} vs {theirs.get(k)}" for k in keys if ours.get(k) != theirs.get(k)]
        if differ:
            return (f"--reference {reference} is not the model of {checkpoint.path}: " + ", ".join(differ)
                    + " (GGUF metadata vs config.json)")
    return ""


def _qwen3_moe_problem(checkpoint) -> str:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return ("the reference for a compressed-tensors checkpoint is transformers' own load, which needs the "
                "compressed-tensors package: pip install compressed-tensors")
    from ..integrations.qwen3_moe import missing_dense_tensors
    missing = missing_dense_tensors(checkpoint)
    if missing:
        return (f"{checkpoint.path} has no dense weights ({len(missing)} tensors missing, e.g. {missing[0]}): "
                "the model check needs a full checkpoint (embeddings, attention, norms, unembedding), "
                "not the MoE layers alone")
    return ""


def _reference_model(path: Path, family: str, device: torch.device, dtype: torch.dtype):
    """transformers' own model of the checkpoint at `path` (family: the model_type, "gpt_oss" or
    "qwen3_moe"), experts dequantized, in `dtype`."""
    import transformers
    from transformers.utils import logging
    if family == "qwen3_moe":
        cls, quant = transformers.Qwen3MoeForCausalLM, transformers.CompressedTensorsConfig(dequantize=True)
        extra = {"experts_implementation": "eager"}      # its plain per-expert loop, in the weights' dtype
    else:
        cls, quant, extra = transformers.GptOssForCausalLM, transformers.Mxfp4Config(dequantize=True), {}
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()       # (its note that MXFP4 on this device means dequantizing)
    logging.disable_progress_bar()      # (verify draws its own)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # (compressed-tensors' notes on its own config)
            model = cls.from_pretrained(path, quantization_config=quant, dtype=dtype, attn_implementation="eager",
                                        **extra)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    if dtype == torch.float32:
        # compressed-tensors leaves the experts in bf16, which holds their MXFP4 values exactly
        # (module docstring): casting them is exact and makes the whole reference float32.
        model = model.float()
    # (loaded on the CPU and moved: a device_map would need accelerate, which we do not require)
    return model.to(device).eval()


def _greedy(model, prompt: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    out = model.generate(prompt, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, prompt.shape[1]:].tolist(), [step[0].float() for step in out.logits]


def check_model(path: str | Path, device: torch.device, dtype: torch.dtype, backend: str, seed: int,
                reference: str | Path | None = None, **load_kwargs) -> CheckResult:
    """The `model` row of verify's report (see the module docstring). `reference`: the folder
    transformers loads as the reference (default `path`; a GGUF file's Hugging Face twin)."""
    from ..integrations.transformers import load_model
    ours = load_model(path, device=device, dtype=dtype, backend=backend, progress=False, **load_kwargs)
    family = ours.config.model_type                 # "gpt_oss" or "qwen3_moe"
    source = Path(reference if reference is not None else path)
    theirs = _reference_model(source, family, device, dtype)
    exact = _reference_model(source, family, device, torch.float32) if dtype != torch.float32 else None
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (PROMPTS, max(max(SEQUENCE_LENGTHS), GREEDY_PROMPT)), generator=g).to(device)
    errors, bounds, vs_float32, noise, excluded, routing_problems = {}, {}, {}, 0.0, {}, []
    models = {"ours": ours, "theirs": theirs} | ({"fp32": exact} if exact is not None else {})
    with torch.no_grad():
        for seq in SEQUENCE_LENGTHS:
            ids = prompt[:, :seq]
            logits, routings = {}, {}
            for name, model in models.items():
                logits[name], routings[name] = forward_with_routing(model, ids)
            if exact is None:
                routings["fp32"] = routings["theirs"]
            left, problems = undisturbed_tokens(routings, *ids.shape)
            routing_problems += [f"at {seq} tokens: {p}" for p in problems]
            excluded[seq] = int((~left).sum())
            got, ref = (logits[name].reshape(-1, logits[name].shape[-1])[left] for name in ("ours", "theirs"))
            errors[seq] = rel_err(got, ref)
            noise = max(noise, (got - ref).abs().max().item())
            if exact is None:
                bounds[seq] = FLOAT32_TOLERANCE
            else:
                truth = logits["fp32"].reshape(-1, logits["fp32"].shape[-1])[left]
                vs_float32[seq] = (rel_err(got, truth), rel_err(ref, truth))
                errors[seq] = vs_float32[seq][0]
                bounds[seq] = LOW_PRECISION_FACTOR * vs_float32[seq][1] + LOW_PRECISION_SLACK
        ours_ids, _ = _greedy(ours, prompt[:1, :GREEDY_PROMPT])
        ref_ids, ref_logits = _greedy(theirs, prompt[:1, :GREEDY_PROMPT])
    logits_ok = all(errors[seq] <= bounds[seq] for seq in SEQUENCE_LENGTHS) and not routing_problems
    first = next((i for i, (a, b) in enumerate(zip(ours_ids, ref_ids)) if a != b), None)
    figures = {"dtype": str(dtype).removeprefix("torch."), "backend": ours.model.layers[0].mlp.moe.backend,
               "rel_err": {str(seq): err for seq, err in errors.items()},
               "tolerance": {str(seq): bound for seq, bound in bounds.items()},
               "reference": "transformers float32" if exact is not None else "transformers (same dtype)",
               "reference_checkpoint": str(source),
               "tokens_excluded": {str(seq): n for seq, n in excluded.items()}, "routing_problems": routing_problems,
               "greedy_tokens": GREEDY_TOKENS, "ids": ours_ids, "reference_ids": ref_ids,
               "first_difference": first, "logit_noise": noise}
    if exact is not None:
        figures["reference_rel_err"] = {str(seq): pair[1] for seq, pair in vs_float32.items()}
    errs = ", ".join(f"{errors[seq]:.1e} (<= {bounds[seq]:.1e}) at {seq}" for seq in SEQUENCE_LENGTHS)
    against = (f"transformers float32 (its {figures['dtype']} model: "
               + ", ".join(f"{pair[1]:.1e}" for pair in vs_float32.values()) + ")") if exact is not None \
        else f"transformers {figures['dtype']}"
    summary = f"logits of {PROMPTS} sequences vs {against}, dequantized experts: rel err {errs} tokens; "
    if any(excluded.values()):
        summary += ("tokens left out after a routing near-tie: "
                    + ", ".join(f"{n} of {PROMPTS * seq} at {seq}" for seq, n in excluded.items()) + "; ")
    if routing_problems:
        summary += f"{routing_problems[0]}; "
    if first is None:
        summary += f"greedy {GREEDY_TOKENS} tokens identical"
        greedy_ok = True
    else:
        step = ref_logits[first]
        gap = (step[ref_ids[first]] - step[ours_ids[first]]).item()
        # Each logit of ours sits within `noise` of the reference's, so the gap between two
        # tokens can differ by up to twice that between the models.
        greedy_ok = gap <= 2 * noise
        figures["logit_gap"] = gap
        summary += (f"greedy ids differ from step {first} (reference logit gap {gap:.3g} there, "
                    f"{'within' if greedy_ok else 'above'} twice the logit noise {noise:.3g}: "
                    f"{'a near-tie' if greedy_ok else 'not a near-tie'})")
    return CheckResult("model", None, None, logits_ok and greedy_ok, summary, figures)
