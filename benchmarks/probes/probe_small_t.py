"""Probe (GPU): what bounds the Triton kernel at small T? Times the default small-T launches with
parts of the K loop removed, by source variants of `kernels/_moe_matmul.py` (results are wrong
on purpose, only the time counts):

    base         the kernel as it is
    no_decode    packed words reinterpreted as bf16 instead of decoded (the E2M1 decode's cost)
    no_scales    the scale bytes of step 0 reused in every step (the per-step scale loads' cost)
    neither      both removed
and the floor of the timing harness (a graph holding one trivial kernel).

    python -m benchmarks.probes.probe_small_t --out DIR        # writes DIR/probe_small_t.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import git_commit, gpt_oss_weights, time_graph
from mxfp4_moe.kernels.moe_matmul import pick_block_m
from mxfp4_moe.routing import route, routing_metadata

launcher = importlib.import_module("mxfp4_moe.kernels.moe_matmul")

SOURCE = Path(launcher.__file__).with_name("_moe_matmul.py")
DECODE = "w = _dequant_mxfp4_words(packed, scale_bytes, BLOCK_N, BLOCK_K, COMPUTE_DTYPE, DEQUANT == \"ptx\")"
RAW = "w = _raw_bits(packed, BLOCK_N, BLOCK_K)"
SCALE_LOAD = "        next_scales = tl.load(s_ptrs, mask=mask_ks, other=0)\n        if EVEN_K:"
SCALE_REUSE = "        next_scales = scale_bytes\n        if EVEN_K:"
RAW_FN = '''

@triton.jit
def _raw_bits(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    lo = (words & 0x7FFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    hi = ((words >> 16) & 0x7FFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    w = tl.join(lo, hi)
    w = tl.join(w, w)
    w = tl.join(w, w)
    return w.reshape(BLOCK_N, BLOCK_K)
'''


def variant(name: str, tmp: Path):
    src = SOURCE.read_text()
    for part in name.split("+"):
        if part == "no_decode":
            assert DECODE in src
            src = src.replace(DECODE, RAW) + RAW_FN
        elif part == "no_scales":
            assert SCALE_LOAD in src
            src = src.replace(SCALE_LOAD, SCALE_REUSE)
    path = tmp / f"variant_{name.replace('+', '_')}.py"
    path.write_text(src.replace("from .", "from mxfp4_moe.kernels."))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module._moe_matmul_kernel


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    names = ["base", "no_decode", "no_scales", "no_decode+no_scales"]
    kernels = {n: (launcher._moe_matmul_kernel if n == "base" else variant(n, tmp)) for n in names}
    one = torch.zeros(1, device="cuda")
    out = {"commit": git_commit(), "device": torch.cuda.get_device_name(),
           "floor_ms": time_graph(lambda: one.add_(1.0)), "points": []}
    print(json.dumps(out), flush=True)
    for experts, tokens in ((128, 1), (128, 8), (128, 32), (128, 128), (32, 8), (32, 32)):
        w = gpt_oss_weights(experts)
        x = torch.randn(tokens, 2880, device="cuda").to(torch.bfloat16)
        topk_w, topk_ids = route(x, w.router_weight, w.router_bias, 4)
        meta = routing_metadata(topk_ids, w.expert_map, experts, pick_block_m(tokens * 4, experts), topk_w)
        act = launcher.moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta,
                                  swiglu=(w.swiglu_alpha, w.swiglu_limit))
        calls = {
            "w13": lambda: launcher.moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta,
                                               swiglu=(w.swiglu_alpha, w.swiglu_limit)),
            "w2": lambda: launcher.moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, gather=False,
                                              apply_row_weight=True, combine="atomic", n_out=2880),
        }
        for op, fn in calls.items():
            row = {"experts": experts, "tokens": tokens, "op": op}
            for name, kernel in kernels.items():
                launcher._moe_matmul_kernel = kernel
                try:
                    row[name] = time_graph(fn)
                finally:
                    launcher._moe_matmul_kernel = kernels["base"]
            out["points"].append(row)
            print(json.dumps(row), flush=True)
            (args.out / "probe_small_t.json").write_text(json.dumps(out, indent=1))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
