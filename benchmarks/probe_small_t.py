"""Probe (GPU): what bounds the Triton kernel at small T? Times the default small-T launches with
parts of the K loop removed, by source variants of `kernels/_moe_matmul.py` (results are wrong
on purpose, only the time counts):

    base         the kernel as it is
    no_decode    packed words reinterpreted as bf16 instead of decoded (the E2M1 decode's cost)
    no_scales    the scale bytes of step 0 reused in every step (the per-step scale loads' cost)
    neither      both removed
and the floor of the timing harness (a graph holding one trivial kernel). With --layout: the
same launches (default and a few other configs of the Triton kernel) on the checkpoint's
row-major weights and on the K-blocked copy (`kernels.k_blocked`).

    python benchmarks/probe_small_t.py --out DIR             # writes DIR/probe_small_t.json
    python benchmarks/probe_small_t.py --layout --out DIR    # writes DIR/probe_layout.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import git_commit, time_graph  # noqa: E402

from mxfp4_moe.kernels import pick_block_m  # noqa: E402
from mxfp4_moe.moe import random_expert_weights  # noqa: E402
from mxfp4_moe.routing import route, routing_metadata  # noqa: E402

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
    p.add_argument("--layout", action="store_true", help="row-major against K-blocked weights")
    p.add_argument("--fragment", action="store_true", help="the Gluon fragment kernel against the default")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.layout:
        return layout_probe(args.out)
    if args.fragment:
        return fragment_probe(args.out)
    tmp = Path(tempfile.mkdtemp())
    names = ["base", "no_decode", "no_scales", "no_decode+no_scales"]
    kernels = {n: (launcher._moe_matmul_kernel if n == "base" else variant(n, tmp)) for n in names}
    one = torch.zeros(1, device="cuda")
    out = {"commit": git_commit(), "device": torch.cuda.get_device_name(),
           "floor_ms": time_graph(lambda: one.add_(1.0)), "points": []}
    print(json.dumps(out), flush=True)
    for experts, tokens in ((128, 1), (128, 8), (128, 32), (128, 128), (32, 8), (32, 32)):
        w, _ = random_expert_weights(experts, 2880, 2880, top_k=4, seed=experts, device="cuda", dense=False)
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


def layout_probe(out_dir: Path) -> int:
    from mxfp4_moe.kernels import MatmulConfig, k_blocked
    C = MatmulConfig
    out = {"commit": git_commit(), "device": torch.cuda.get_device_name(), "points": []}
    for experts, tokens in ((128, 1), (128, 8), (128, 32), (128, 128), (128, 512), (128, 2048), (32, 8), (32, 128),
                            (32, 512), (32, 8192)):
        w, _ = random_expert_weights(experts, 2880, 2880, top_k=4, seed=experts, device="cuda", dense=False)
        b13, s13 = k_blocked(w.w13_blocks, w.w13_scales)
        b2, s2 = k_blocked(w.w2_blocks, w.w2_scales)
        x = torch.randn(tokens, 2880, device="cuda").to(torch.bfloat16)
        topk_w, topk_ids = route(x, w.router_weight, w.router_bias, 4)
        bm = pick_block_m(tokens * 4, experts)
        meta = routing_metadata(topk_ids, w.expert_map, experts, bm, topk_w)
        swiglu = (w.swiglu_alpha, w.swiglu_limit)
        act = launcher.moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu)
        configs = [None, C(bm, 64, 128, bm <= 32, 4, 4), C(bm, 128, 64, bm <= 32, 4, 4), C(bm, 64, 64, bm <= 32, 4, 6)]
        if bm >= 64:
            configs = [launcher.default_config(bm, 5760, 2880, swiglu=True)]      # the Triton kernel's
        for op in ("w13", "w2"):
            for cfg in configs:
                row = {"experts": experts, "tokens": tokens, "op": op, "config": cfg and list(cfg.__dict__.values())}
                for layout, (blk, sc) in (("row_major", (w.w13_blocks, w.w13_scales) if op == "w13" else
                                           (w.w2_blocks, w.w2_scales)),
                                          ("k_blocked", (b13, s13) if op == "w13" else (b2, s2))):
                    if op == "w13":
                        fn = lambda: launcher.moe_matmul(x, blk, sc, w.w13_bias, meta, swiglu=swiglu, config=cfg)
                    else:
                        fn = lambda: launcher.moe_matmul(act, blk, sc, w.w2_bias, meta, gather=False,
                                                         apply_row_weight=True, combine="atomic", n_out=2880,
                                                         config=cfg)
                    try:
                        row[layout] = time_graph(fn)
                    except Exception as exc:
                        row[layout] = f"{type(exc).__name__}: {str(exc)[:120]}"
                out["points"].append(row)
                print(json.dumps(row), flush=True)
                (out_dir / "probe_layout.json").write_text(json.dumps(out, indent=1))
        torch.cuda.empty_cache()
    return 0


def fragment_call(x, blocks, scales, bias, meta, *, block_n, num_warps, stages, prefetch, swiglu=None,
                  w2=False, n_out=None):
    """One launch of `_moe_matmul_sm90_fragment_kernel` (blocks in `fragment_order`): w13 + SwiGLU
    from the tokens into sorted rows, or (w2=True) w2 + routing weight + atomic combine."""
    import triton
    from mxfp4_moe.kernels._moe_matmul_sm90 import _moe_matmul_sm90_fragment_kernel
    e, n, k_half = blocks.shape
    if w2:
        y = torch.zeros((meta.num_tokens, n_out), dtype=torch.float32, device=x.device)
        scatter, rw = meta.sorted_token, meta.sorted_weight
    else:
        n_out = n // 2 if swiglu else n
        y = torch.empty((meta.num_rows, n_out), dtype=torch.bfloat16, device=x.device)
        scatter, rw = meta.sorted_token, meta.expert_offsets
    alpha, limit = swiglu if swiglu else (0.0, 0.0)
    grid = (triton.cdiv(n, block_n), meta.max_tiles)
    _moe_matmul_sm90_fragment_kernel[grid](
        x, x.stride(0), blocks, blocks.stride(0), blocks.stride(1), scales, scales.stride(0), scales.stride(1),
        bias, bias.stride(0), bias, bias.stride(0), y, y.stride(0),
        meta.sorted_token, scatter, rw, meta.expert_offsets, meta.tile_expert, meta.tile_row_start,
        n, x.shape[1], n_out, float(alpha), float(limit),
        K=2 * k_half, BLOCK_M=meta.block_m, BLOCK_N=block_n, STAGES=stages, PREFETCH=prefetch,
        GATHER=not w2, SCATTER=w2, ATOMIC=w2, HAS_BIAS=True, HAS_CHANNEL_SCALE=False, SWIGLU=bool(swiglu),
        ROW_WEIGHT=w2, num_warps=num_warps)
    return y


def fragment_probe(out_dir: Path) -> int:
    from mxfp4_moe.reference import reference_moe_matmul
    frag = launcher.fragment_order
    out = {"commit": git_commit(), "device": torch.cuda.get_device_name(), "points": []}
    variants = [dict(block_n=64, num_warps=4, stages=4, prefetch=2), dict(block_n=64, num_warps=4, stages=4, prefetch=3),
                dict(block_n=64, num_warps=4, stages=3, prefetch=1), dict(block_n=128, num_warps=8, stages=4, prefetch=2)]
    for experts, tokens in ((128, 1), (128, 8), (128, 32), (128, 128), (128, 512), (32, 8), (32, 32), (32, 128)):
        w, _ = random_expert_weights(experts, 2880, 2880, top_k=4, seed=experts, device="cuda", dense=False)
        f13, f2 = frag(w.w13_blocks), frag(w.w2_blocks)
        x = torch.randn(tokens, 2880, device="cuda").to(torch.bfloat16)
        topk_w, topk_ids = route(x, w.router_weight, w.router_bias, 4)
        meta = routing_metadata(topk_ids, w.expert_map, experts, pick_block_m(tokens * 4, experts), topk_w)
        local = int(meta.expert_offsets[-1])
        swiglu = (w.swiglu_alpha, w.swiglu_limit)
        act = launcher.moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu)
        ref13 = reference_moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu,
                                     compute_dtype=torch.float32)
        kw2 = dict(gather=False, apply_row_weight=True, combine="atomic", n_out=2880)
        ref2 = reference_moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, compute_dtype=torch.float32, **kw2)
        row = {"experts": experts, "tokens": tokens, "block_m": meta.block_m,
               "w13_default": time_graph(lambda: launcher.moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta,
                                                                     swiglu=swiglu)),
               "w2_default": time_graph(lambda: launcher.moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta,
                                                                    **kw2))}
        for v in variants:
            name = "bn{block_n}_w{num_warps}_s{stages}_p{prefetch}".format(**v)
            try:
                f13_call = lambda: fragment_call(x, f13, w.w13_scales, w.w13_bias, meta, swiglu=swiglu, **v)
                f2_call = lambda: fragment_call(act, f2, w.w2_scales, w.w2_bias, meta, w2=True, n_out=2880, **v)
                o13, o2 = f13_call(), f2_call()
                row[name] = {"w13": time_graph(f13_call), "w2": time_graph(f2_call),
                             "w13_err": float((o13[:local].float() - ref13[:local]).norm() / ref13[:local].norm()),
                             "w2_err": float((o2 - ref2).norm() / ref2.norm())}
            except Exception as exc:
                row[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out["points"].append(row)
        print(json.dumps(row), flush=True)
        (out_dir / "probe_fragment.json").write_text(json.dumps(out, indent=1))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
