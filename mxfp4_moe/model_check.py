"""verify's `model` check: the whole model as `integrations.transformers.load_model` builds it
(our loader, our MoE blocks) against transformers' own model of the same checkpoint with the
experts dequantized (`Mxfp4Config(dequantize=True)`: its reader, its dequantization, its MoE).

Two comparisons on seeded token ids:
- logits at a few sequence lengths (1 included: a decode step). In float32, relative Frobenius
  error under FLOAT32_TOLERANCE. In bf16 / fp16 both models carry their own rounding noise, whose
  size depends on the model (its depth, its weights' scale) more than on any bound we could fix,
  so the reference there is transformers' float32 model: our error against it must be no larger
  than LOW_PRECISION_FACTOR x transformers' own bf16 (fp16) model's, plus LOW_PRECISION_SLACK;
- greedy decoding of GREEDY_TOKENS tokens. When the ids differ, the report names the first step
  and the reference's logit gap there (its top token against ours): a gap within the logit noise
  measured on the prompt is a near-tie, which rounding alone explains, and passes; a larger one
  is a bug.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def dense_weights_problem(checkpoint) -> str:
    """Why `checkpoint` cannot be checked as a whole model ("" when it can)."""
    from .integrations.transformers import missing_dense_tensors
    missing = missing_dense_tensors(checkpoint)
    if missing:
        return (f"{checkpoint.path} has no dense weights ({len(missing)} tensors missing, e.g. {missing[0]}): "
                "the model check needs a full checkpoint (embeddings, attention, norms, unembedding), "
                "not the MoE layers alone")
    if checkpoint.layout == "original":
        return (f"{checkpoint.path} is in the original layout, which transformers cannot load, so it has no "
                "independent reference; check the Hugging Face layout folder of the same model (load_model "
                "itself reads both)")
    return ""


def _reference_model(path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()       # (its note that MXFP4 on this device means dequantizing)
    logging.disable_progress_bar()      # (verify draws its own)
    try:
        model = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=dtype, attn_implementation="eager")
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    # (loaded on the CPU and moved: a device_map would need accelerate, which we do not require)
    return model.to(device).eval()


def _greedy(model, prompt: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    out = model.generate(prompt, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, prompt.shape[1]:].tolist(), [step[0].float() for step in out.logits]


def check_model(path: str | Path, device: torch.device, dtype: torch.dtype, backend: str, seed: int,
                **load_kwargs) -> CheckResult:
    """The `model` row of verify's report (see the module docstring)."""
    from .integrations.transformers import load_model
    ours = load_model(path, device=device, dtype=dtype, backend=backend, progress=False, **load_kwargs)
    theirs = _reference_model(Path(path), device, dtype)
    exact = _reference_model(Path(path), device, torch.float32) if dtype != torch.float32 else None
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (PROMPTS, max(max(SEQUENCE_LENGTHS), GREEDY_PROMPT)), generator=g).to(device)
    errors, bounds, vs_float32, noise = {}, {}, {}, 0.0
    with torch.no_grad():
        for seq in SEQUENCE_LENGTHS:
            got, ref = ours(prompt[:, :seq]).logits.float(), theirs(prompt[:, :seq]).logits.float()
            errors[seq] = rel_err(got, ref)
            noise = max(noise, (got - ref).abs().max().item())
            if exact is None:
                bounds[seq] = FLOAT32_TOLERANCE
            else:
                truth = exact(prompt[:, :seq]).logits.float()
                vs_float32[seq] = (rel_err(got, truth), rel_err(ref, truth))
                errors[seq] = vs_float32[seq][0]
                bounds[seq] = LOW_PRECISION_FACTOR * vs_float32[seq][1] + LOW_PRECISION_SLACK
        ours_ids, _ = _greedy(ours, prompt[:1, :GREEDY_PROMPT])
        ref_ids, ref_logits = _greedy(theirs, prompt[:1, :GREEDY_PROMPT])
    logits_ok = all(errors[seq] <= bounds[seq] for seq in SEQUENCE_LENGTHS)
    first = next((i for i, (a, b) in enumerate(zip(ours_ids, ref_ids)) if a != b), None)
    figures = {"dtype": str(dtype).removeprefix("torch."), "backend": ours.model.layers[0].mlp.moe.backend,
               "rel_err": {str(seq): err for seq, err in errors.items()},
               "tolerance": {str(seq): bound for seq, bound in bounds.items()},
               "reference": "transformers float32" if exact is not None else "transformers (same dtype)",
               "greedy_tokens": GREEDY_TOKENS, "ids": ours_ids, "reference_ids": ref_ids,
               "first_difference": first, "logit_noise": noise}
    if exact is not None:
        figures["reference_rel_err"] = {str(seq): pair[1] for seq, pair in vs_float32.items()}
    errs = ", ".join(f"{errors[seq]:.1e} (<= {bounds[seq]:.1e}) at {seq}" for seq in SEQUENCE_LENGTHS)
    against = (f"transformers float32 (its {figures['dtype']} model: "
               + ", ".join(f"{pair[1]:.1e}" for pair in vs_float32.values()) + ")") if exact is not None \
        else f"transformers {figures['dtype']}"
    summary = f"logits of {PROMPTS} sequences vs {against}, dequantized experts: rel err {errs} tokens; "
    if first is None:
        summary += f"greedy {GREEDY_TOKENS} tokens identical"
        greedy_ok = True
    else:
        step = ref_logits[first]
        gap = (step[ref_ids[first]] - step[ours_ids[first]]).item()
        greedy_ok = gap <= noise
        figures["logit_gap"] = gap
        summary += (f"greedy ids differ from step {first} (reference logit gap {gap:.3g} there, "
                    f"{'within' if greedy_ok else 'above'} the logit noise {noise:.3g}: "
                    f"{'a near-tie' if greedy_ok else 'not a near-tie'})")
    return CheckResult("model", None, None, logits_ok and greedy_ok, summary, figures)
