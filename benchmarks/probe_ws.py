"""Probe (GPU): the warp-specialized Gluon kernel ("sm90_ws") against the default large-tile
launches, at gpt-oss shapes (H = I = 2880, top-4) and T where the tiles hold 64 or more rows.
Each variant must agree with the default launch (relative Frobenius difference < 1e-2, as in
bench_moe's sweep) before its time counts; a variant that does not finish within the process's
time limit shows up as a missing line (run it under `timeout`).

With --parts, the "sm90_ws" kernel is also timed with parts removed by source edits (results
wrong on purpose, only the time counts): no_decode (the decoder warps store zeros instead of
decoding), no_store (nor stores the tile), no_scale_loads (the decoder reuses the first step's
scale bytes: no global loads in its loop), no_x (the loader copies no x rows), no_words (nor
weight words), no_mma (the wgmma warps skip the wgmma), and combinations.

    python benchmarks/probe_ws.py --out DIR [--parts]     # writes DIR/probe_ws.json
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
from bench_moe import SWEEP_AGREEMENT, git_commit, time_graph  # noqa: E402

from mxfp4_moe.kernels import MatmulConfig, moe_matmul, pick_block_m  # noqa: E402
from mxfp4_moe.moe import random_expert_weights  # noqa: E402
from mxfp4_moe.routing import route, routing_metadata  # noqa: E402

launcher = importlib.import_module("mxfp4_moe.kernels.moe_matmul")
ws_module = importlib.import_module("mxfp4_moe.kernels._moe_matmul_sm90_ws")

PART_EDITS = {
    "no_decode": ("w = _decode_tile(words.to(gl.uint32, bitcast=True), scales)",
                  "w = gl.zeros([BLOCK_N, BLOCK_K], gl.bfloat16, "
                  "layout=gl.BlockedLayout([1, 8], [4, 8], [DECODE_WARPS, 1], [1, 0]))"),
    "no_scale_loads": ("next_scales = gl.load(s_ptrs + (ki + 1) * G,\n"
                       "                                      mask=w_row_mask & ((ki + 1) * G + offs_g < K // _BLOCK_SIZE)"
                       "[None, :, None],\n                                      other=0)",
                       "next_scales = scales"),
    "no_store": ("w_smem.index(slot).store(w)", "pass"),
    "no_x": ("async_copy.async_copy_global_to_shared(x_smem.index(stage), x_ptrs + ki * BLOCK_K, mask=x_mask)",
             "pass"),
    "no_words": ("mbarrier.expect(words_ready.index(stage), words_desc.block_type.nbytes)\n"
                 "                tma.async_copy_global_to_shared(words_desc, [words_row, ki * (BLOCK_K // _CODES_PER_WORD)],\n"
                 "                                                words_ready.index(stage), words_smem.index(stage))",
                 "mbarrier.arrive(words_ready.index(stage), count=1)"),
    "no_mma": ("acc = warpgroup_mma(x_smem.index(stage), w_smem.index(slot).permute((1, 0)), acc, is_async=True)",
               "acc = acc"),
}


PART_VARIANTS = ("no_scale_loads", "no_decode", "no_mma", "no_decode+no_mma", "no_decode+no_store+no_mma",
                 "no_x", "no_decode+no_mma+no_x", "no_decode+no_store+no_mma+no_x", "no_decode+no_mma+no_words",
                 "no_decode+no_store+no_mma+no_x+no_words")


def part_variant(name: str, tmp: Path):
    """The sm90_ws kernel with the parts in `name` ("a+b") removed."""
    src = Path(ws_module.__file__).read_text()
    for part in name.split("+"):
        old, new = PART_EDITS[part]
        assert old in src, part
        src = src.replace(old, new)
    path = tmp / f"ws_{name.replace('+', '_')}.py"
    path.write_text(src.replace("from ._", "from mxfp4_moe.kernels._"))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module._moe_matmul_sm90_ws_kernel


def probe_parts(args, header) -> list[dict]:
    tmp = Path(tempfile.mkdtemp())
    base_kernel = ws_module._moe_matmul_sm90_ws_kernel
    kernels = {"base": base_kernel}
    for name in PART_VARIANTS:
        kernels[name] = part_variant(name, tmp)
    rows = []
    w, _ = random_expert_weights(32, 2880, 2880, top_k=4, seed=32, device="cuda", dense=False)
    x = torch.randn(8192, 2880, device="cuda").to(torch.bfloat16)
    topk_w, topk_ids = route(x, w.router_weight, w.router_bias, 4)
    meta = routing_metadata(topk_ids, w.expert_map, 32, 128, topk_w)
    swiglu = (w.swiglu_alpha, w.swiglu_limit)
    act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu)
    base_partitions = dict(launcher.WS_PARTITIONS)
    for label, fields, overrides in PART_CONFIGS:
        cfg = MatmulConfig(128, *fields)
        calls = {"w13": lambda: moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu, config=cfg),
                 "w2": lambda: moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, gather=False,
                                          apply_row_weight=True, combine="atomic", n_out=2880, config=cfg)}
        launcher.WS_PARTITIONS.update({**base_partitions, **overrides})
        for op, fn in calls.items():
            row = {"experts": 32, "tokens": 8192, "op": op, "variant": label, "config": list(cfg.__dict__.values())}
            for name, kernel in kernels.items():
                ws_module._moe_matmul_sm90_ws_kernel = kernel
                try:
                    row[name] = time_graph(fn)
                except Exception as exc:
                    row[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                finally:
                    ws_module._moe_matmul_sm90_ws_kernel = base_kernel
            print(json.dumps(row), flush=True)
            rows.append(row)
        launcher.WS_PARTITIONS.clear()
        launcher.WS_PARTITIONS.update(base_partitions)
    return rows


PART_CONFIGS = [
    ("ws s4", (128, 64, False, 8, 4, "sm90_ws"), {}),
]

# (label, config fields after block_m, WS_PARTITIONS overrides)
VARIANTS = [
    ("ws s4", (128, 64, False, 8, 4, "sm90_ws"), {}),
    ("ws s3 bk128", (128, 128, False, 8, 3, "sm90_ws"), {}),
    ("ws s3 bk128 w3", (128, 128, False, 8, 3, "sm90_ws"), {"W_STAGES": 3}),
    ("sm90 bk128 s2", (128, 128, False, 8, 2, "sm90"), {}),
    ("sm90 bk128 s3", (128, 128, False, 8, 3, "sm90"), {}),
    ("sm90 bk64 s6", (128, 64, False, 8, 6, "sm90"), {}),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--points", default="32:512,32:2048,32:8192,128:2048,128:8192")
    p.add_argument("--parts", action="store_true", help="also time the sm90_ws kernel with parts removed")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"device": torch.cuda.get_device_name(), "commit": git_commit()}
    print(json.dumps(header), flush=True)
    rows = probe_parts(args, header) if args.parts else []
    (args.out / "probe_ws.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    weights = {}
    base_partitions = dict(launcher.WS_PARTITIONS)
    for point in filter(None, args.points.split(",")):
        experts, tokens = map(int, point.split(":"))
        if experts not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            weights[experts], _ = random_expert_weights(experts, 2880, 2880, top_k=4, seed=experts, device="cuda",
                                                        dense=False)
        w = weights[experts]
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, w.hidden, generator=gen, device="cuda").to(torch.bfloat16)
        topk_w, topk_ids = route(x, w.router_weight, w.router_bias, w.top_k)
        block_m = pick_block_m(tokens * w.top_k, w.num_local_experts)
        swiglu = (w.swiglu_alpha, w.swiglu_limit)
        for op in ("w13", "w2"):
            metas = {}

            def meta_for(bm):
                if bm not in metas:
                    metas[bm] = routing_metadata(topk_ids, w.expert_map, w.num_local_experts, bm, topk_w)
                return metas[bm]

            act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta_for(block_m), swiglu=swiglu)

            def launch(m, **kw):
                if op == "w13":
                    return lambda: moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, m, swiglu=swiglu, **kw)
                return lambda: moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, m, gather=False,
                                          apply_row_weight=True, combine="atomic", n_out=w.hidden, **kw)

            ref = launch(meta_for(block_m))().float()
            default_ms = time_graph(launch(meta_for(block_m)))
            row = {"experts": experts, "tokens": tokens, "op": op, "block_m": block_m, "default_ms": default_ms}
            print(json.dumps(row), flush=True)
            rows.append(row)
            for label, fields, overrides in VARIANTS:
                bm = block_m if block_m >= 64 else 64
                if fields[3] == 8 and bm < 128:
                    continue
                cfg = MatmulConfig(bm, *fields)
                launcher.WS_PARTITIONS.clear()
                launcher.WS_PARTITIONS.update({**base_partitions, **overrides})
                r = {"experts": experts, "tokens": tokens, "op": op, "variant": label, "config": list(cfg.__dict__.values())}
                try:
                    fn = launch(meta_for(bm), config=cfg)
                    out = fn().float()
                    torch.cuda.synchronize()
                    diff = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    r["rel_diff"] = diff
                    if diff <= SWEEP_AGREEMENT:
                        r["ms"] = time_graph(fn)
                        r["speedup"] = default_ms / r["ms"]
                except Exception as exc:
                    r["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    launcher.WS_PARTITIONS.clear()
                    launcher.WS_PARTITIONS.update(base_partitions)
                print(json.dumps(r), flush=True)
                rows.append(r)
                (args.out / "probe_ws.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
