"""Probe (GPU): is the compiled decode step's logits gap to eager (bench_model, 24-layer random bf16 model) noise or a bug?

On one random gpt-oss-shaped checkpoint (bench_model's writer), the same prompt and the same fed
tokens through a StaticCache decode (bench_model.static_cache), logits of every step from:

    eager_bf16       load_model in bf16, eager (our kernels)
    compiled_bf16    the same model under torch.compile (default mode)
    eager_fp32       load_model in float32 with the torch reference MoE: the yardstick
    full_eager_bf16 / full_compiled_bf16   the bf16 model with every layer full attention (no
                     sliding window), to tell the window's mask from the rest

Reported: each pair's relative Frobenius difference over all steps, the first step's alone, and
greedy ids of 16 steps, eager against compiled (first differing step and the eager logit gap
between its top two there). If compiled sits as far from float32 as eager does, the gap between
them is bf16 noise amplified by the random model; if compiled is much farther, it is a bug.

    python -m benchmarks.probes.probe_compiled_logits --out DIR [--layers 24] [--model 20b]
    python -m benchmarks.probes.probe_compiled_logits --tiny --layers 2 --out DIR   # CPU harness check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks import bench_model as bm
from mxfp4_moe.integrations.transformers import load_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def decode(model, step, prompt, tokens, device, greedy: bool):
    """Logits [steps, vocab] of a StaticCache decode after an eager prefill of `prompt`; with
    greedy, each step is fed the previous step's argmax instead of `tokens`."""
    key = bm.cache_keyword(model)
    cache = bm.static_cache(model, prompt.shape[1] + len(tokens))
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{key: cache},
                **bm.static_step_kwargs(model, 0, prompt.shape[1], 1, device))
    nxt = out.logits[:, -1:].argmax(-1)
    logits = []
    for i in range(len(tokens)):
        feed = nxt if greedy else tokens[i]
        out = step(input_ids=feed, use_cache=True, **{key: cache},
                   **bm.static_step_kwargs(model, prompt.shape[1] + i, 1, 1, device))
        row = out.logits[0, -1].float().clone()
        logits.append(row)
        nxt = row.argmax().view(1, 1)
    return torch.stack(logits)


def all_full_attention(model) -> None:
    # (the model still builds the sliding mask, from config.sliding_window; no layer reads it)
    model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
    for layer in model.model.layers:
        attn = layer.self_attn
        if hasattr(attn, "sliding_window"):
            attn.sliding_window = None
        if hasattr(layer, "attention_type"):
            layer.attention_type = "full_attention"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", choices=sorted(bm.SHAPES), default="20b")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/probe_compiled_logits"))
    p.add_argument("--tiny", action="store_true", help="a CPU check of the harness (bench_model's tiny shapes, "
                                                     "the aot_eager compiler backend)")
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    compile_kwargs = {"backend": "aot_eager"} if args.tiny else {}
    args.out.mkdir(parents=True, exist_ok=True)
    shape = (bm.TINY_SHAPES if args.tiny else bm.SHAPES)[args.model]
    path = args.workdir / "ckpt"
    t = time.perf_counter()
    bm.write_random_checkpoint(path, shape, args.layers, device, seed=0)
    print(f"written in {time.perf_counter() - t:.1f} s", flush=True)
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, shape.dense.vocab_size, (1, args.prompt), generator=gen).to(device)
    tokens = torch.randint(0, shape.dense.vocab_size, (args.steps, 1, 1), generator=gen).to(device)
    logits, result = {}, {"commit": bm.git_commit(), "model": shape.label(args.layers), "steps": args.steps}

    model = load_model(path, device=device, dtype=torch.float32, backend="torch", progress=False)
    logits["eager_fp32"] = decode(model, model, prompt, tokens, device, greedy=False)
    del model
    bm.free_memory(device)

    model = load_model(path, device=device, progress=False, **({"backend": "torch"} if args.tiny else {}))
    logits["eager_bf16"] = decode(model, model, prompt, tokens, device, greedy=False)
    greedy_eager = decode(model, model, prompt, tokens, device, greedy=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False, **compile_kwargs)
    logits["compiled_bf16"] = decode(model, compiled, prompt, tokens, device, greedy=False)
    greedy_compiled = decode(model, compiled, prompt, tokens, device, greedy=True)
    all_full_attention(model)
    torch._dynamo.reset()
    logits["full_eager_bf16"] = decode(model, model, prompt, tokens, device, greedy=False)
    compiled = torch.compile(model, dynamic=False, **compile_kwargs)
    logits["full_compiled_bf16"] = decode(model, compiled, prompt, tokens, device, greedy=False)
    del model, compiled
    torch._dynamo.reset()
    bm.free_memory(device)

    pairs = [("eager_bf16", "eager_fp32"), ("compiled_bf16", "eager_fp32"), ("compiled_bf16", "eager_bf16"),
             ("full_compiled_bf16", "full_eager_bf16"), ("full_eager_bf16", "eager_bf16")]
    result["pairs"] = [{"a": a, "b": b, "rel_all_steps": rel(logits[a], logits[b]),
                        "rel_first_step": rel(logits[a][0], logits[b][0]),
                        "argmax_equal_steps": int((logits[a].argmax(-1) == logits[b].argmax(-1)).sum())}
                       for a, b in pairs]
    ids_e, ids_c = greedy_eager.argmax(-1), greedy_compiled.argmax(-1)
    differ = (ids_e != ids_c).nonzero()
    greedy = {"eager_ids": ids_e.tolist(), "compiled_ids": ids_c.tolist()}
    if len(differ):
        first = int(differ[0])
        top2 = greedy_eager[first].topk(2).values
        greedy.update(first_differing_step=first, eager_top2_gap=float(top2[0] - top2[1]),
                      eager_logit_scale=float(greedy_eager[first].abs().max()))
    result["greedy"] = greedy
    for row in result["pairs"]:
        print(f"{row['a']:>20} vs {row['b']:<16} rel {row['rel_all_steps']:.3e} (step 0 {row['rel_first_step']:.3e}), "
              f"argmax equal {row['argmax_equal_steps']}/{args.steps}", flush=True)
    print("greedy:", json.dumps(greedy), flush=True)
    (args.out / "probe_compiled_logits.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
