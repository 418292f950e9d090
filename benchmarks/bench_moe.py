"""Benchmark the MXFP4 MoE kernels at gpt-oss sizes on a CUDA GPU.

For E in {128 (gpt-oss-120b), 32 (gpt-oss-20b)}, H = I = 2880, top-4, T in a sweep: GPU time of
w13 + SwiGLU, w2 + combine and the whole layer (CUDA-graph replay with L2 flushed between
replays by triton.testing.do_bench, median; and eager), TFLOP/s, GB/s of the weight bytes of
the experts hit, and the share of a roofline whose ceilings (HBM read bandwidth of a streaming
read kernel, bf16 matmul) are measured in the same run. Side by side: torch._grouped_mm on
bf16-dequantized weights and, at small T, the torch reference layer. Routing comes from random
router logits.

    python -m benchmarks.bench_moe --out DIR [--experts 128 32] [--tokens 1 8 ...] [--no-sweep]
Writes DIR/out_moe.json, DIR/results_moe.md and DIR/moe.png.

    python -m benchmarks.bench_moe --render-only DIR/out_moe.json --tk-json 128=TK128.json 32=TK32.json --out DIR
Rebuilds those three files from a saved out_moe.json without timing anything (no GPU needed); with
--tk-json (here or in a timing run) each (E, T) row also gets OpenAI triton_kernels' times from
the tk_results.json that the anchors' bench_tk.py wrote in the same device call, on the same
roofline. benchmarks/bench_vs_anchors.sh runs the whole comparison in one call.

    python -m benchmarks.bench_moe --ab --out DIR [--experts ...] [--tokens ...]
Times w13 + SwiGLU and w2 + combine with each dequantization path ("bytes": one code at a time,
"ptx": inline PTX on uint32 words) at the default configs, plus a few other configs with "ptx";
writes DIR/ab_dequant.json and DIR/ab_dequant.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from benchmarks.common import HIDDEN, INTER, SWEEP_AGREEMENT, TOP_K, git_commit, time_eager, time_graph
from mxfp4_moe.kernels.moe_matmul import MatmulConfig, default_config, moe_matmul, pick_block_m
from mxfp4_moe.kernels.moe_matmul import on_hopper
from mxfp4_moe.moe import MXFP4MoE
from mxfp4_moe.synthetic import random_expert_weights
from mxfp4_moe.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK, dequantize
from mxfp4_moe.routing import route, routing_metadata


@triton.jit
def _stream_read_kernel(src_ptr, folded_ptr, numel, steps, BLOCK: tl.constexpr):
    """Reads src[0:numel] (int32 words) once and writes one word per program, so the loads cannot
    be dropped. At each step the programs read neighbouring BLOCKs, then all move on by the
    grid's width: the whole grid sweeps the buffer front to back, as HBM pages like."""
    pid = tl.program_id(0)
    grid_stride = tl.num_programs(0) * BLOCK
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    folded = tl.zeros([BLOCK], dtype=tl.int32)
    for _ in range(steps):
        # ".cg": cached in L2 only, the path a weight stream takes (read once, no reuse in L1)
        folded += tl.load(src_ptr + offs, mask=offs < numel, other=0, cache_modifier=".cg")
        offs += grid_stride
    tl.store(folded_ptr + pid, tl.sum(folded, axis=0))


# Buffer sizes of the read-bandwidth measurement: about the expert bytes of T = 1 (4 experts of
# w13, 35 MB: one launch's ramp-up dominates), of all 128 experts of w13 (1.1 GB) and a 4 GiB
# stream; the floor uses the best rate at 1 GiB or more (READ_CEILING_MIN_MIB).
READ_SIZES_MIB = (35, 1128, 4096)
READ_CEILING_MIN_MIB = 1024
READ_BLOCKS = (2048, 4096)              # int32 words per program per step: 32 or 64 bytes a thread
READ_PROGRAMS_PER_SM = (4, 8, 16)       # 8 warps a program: 8 fill an SM's 64 warps, 16 two rounds


def read_bandwidth(size_mib: int) -> dict:
    """Best HBM read rate over a few launch shapes for a buffer of `size_mib` MiB, CUDA-graph
    replay with L2 flushed (time_graph): {"MiB", "GBps", "block", "programs_per_sm", "ms"}."""
    numel = size_mib * (1 << 20) // 4
    src = torch.randint(0, 1 << 30, (numel,), dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(src.device).multi_processor_count
    best = None
    for block in READ_BLOCKS:
        for per_sm in READ_PROGRAMS_PER_SM:
            programs = min(sms * per_sm, triton.cdiv(numel, block))
            steps = triton.cdiv(numel, programs * block)
            assert numel + programs * block < 2 ** 31, "int32 offsets of _stream_read_kernel overflow"
            folded = torch.empty(programs, dtype=torch.int32, device="cuda")
            ms = time_graph(lambda: _stream_read_kernel[(programs,)](src, folded, numel, steps, BLOCK=block,
                                                                     num_warps=8))
            gbps = numel * 4 / (ms * 1e-3) / 1e9
            if best is None or gbps > best["GBps"]:
                best = {"MiB": size_mib, "GBps": gbps, "block": block, "programs_per_sm": per_sm, "ms": ms}
    return best


def ceilings() -> dict:
    """The roofline's ceilings, measured now: HBM read bandwidth per buffer size and the one the
    floor uses (the best at READ_CEILING_MIN_MIB or more), and the bf16 matmul rate."""
    by_size = []
    for mib in READ_SIZES_MIB:
        by_size.append(read_bandwidth(mib))
        torch.cuda.empty_cache()                # give the buffer back before the next, larger one
    read_gbps = max(r["GBps"] for r in by_size if r["MiB"] >= READ_CEILING_MIN_MIB)
    a = torch.randn(8192, 8192, device="cuda").bfloat16()
    b = torch.randn(8192, 8192, device="cuda").bfloat16()
    t = do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
    mm_tflops = 2 * 8192 ** 3 / (t * 1e-3) / 1e12
    return {"read_GBps": read_gbps, "read_by_size": by_size, "bf16_matmul_TFLOPs": mm_tflops}


def mxfp4_weight_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one expert's MXFP4 matrix [out, in] as the checkpoint stores it: per block of
    BLOCK_SIZE inputs, BYTES_PER_BLOCK bytes of E2M1 codes and one E8M0 scale byte."""
    return out_features * (in_features // BLOCK_SIZE) * (BYTES_PER_BLOCK + 1)


def roofline_floor_ms(weight_bytes: float, flops: float, ceil: dict) -> float:
    """The roofline floor of the anchors' README: max(weight bytes touched / HBM read bandwidth,
    FLOPs / bf16 matmul rate), in ms, on the ceilings `ceil` measured in the same run."""
    return max(weight_bytes / (ceil["read_GBps"] * 1e9), flops / (ceil["bf16_matmul_TFLOPs"] * 1e12)) * 1e3


def candidates(block_m: int, n: int, k: int, swiglu: bool, mean_rows: float,
               kernel: str = "all", fragments: bool = False, rows: int | None = None) -> list[MatmulConfig]:
    """The default first, then alternatives (the best is reported beside the default) of the
    Triton kernel (swapped operands are right at every tile size since it retires each K step's
    wgmma, triton#9433) and the Gluon "sm90" kernel (swapped at small tiles); `kernel` keeps
    the alternatives of one kernel only ("all": both)."""
    d = default_config(block_m, n, k, swiglu=swiglu, sm90=on_hopper(torch.device("cuda")), mean_rows=mean_rows,
                       fragments=fragments, rows=rows)
    C = MatmulConfig
    if block_m <= 32:
        alts = [C(block_m, 64, 64, True, 4, 4), C(block_m, 64, 128, True, 4, 4), C(block_m, 128, 64, True, 4, 4),
                C(block_m, 128, 128, True, 4, 3), C(block_m, 256, 64, True, 8, 3),
                C(block_m, 64, 128, True, 4, 6, "sm90"), C(block_m, 64, 128, True, 4, 4, "sm90"),
                C(block_m, 64, 64, True, 4, 8, "sm90"), C(block_m, 64, 256, True, 4, 4, "sm90"),
                C(block_m, 64, 256, True, 4, 3, "sm90"), C(block_m, 128, 128, True, 8, 4, "sm90")]
    elif block_m == 64:
        alts = [C(64, 128, 64, False, 4, 3), C(64, 128, 64, True, 4, 3), C(64, 64, 64, True, 4, 4),
                C(64, 128, 64, False, 4, 3, "sm90"), C(64, 256, 64, False, 4, 3, "sm90"),
                C(64, 128, 64, False, 4, 4, "sm90"), C(64, 128, 128, False, 4, 3, "sm90"),
                C(64, 64, 128, True, 4, 4, "sm90"), C(64, 128, 128, True, 8, 4, "sm90")]
    elif block_m == 128:
        alts = [C(128, 128, 64, False, 8, 3), C(128, 128, 64, False, 4, 4), C(128, 128, 64, True, 4, 3),
                C(128, 128, 64, False, 8, 3, "sm90"), C(128, 128, 64, False, 4, 3, "sm90"),
                C(128, 256, 64, False, 8, 3, "sm90"), C(128, 128, 64, False, 8, 4, "sm90"),
                C(128, 256, 64, False, 8, 4, "sm90")]
    else:
        alts = [C(block_m, 128, 64, True, 8, 3), C(block_m, 128, 64, False, 8, 3, "sm90"),
                C(block_m, 256, 64, False, 8, 3, "sm90")]
    if fragments:       # the fragment-order kernel
        alts += [C(block_m, 64, 64, True, 4, 4, "rs", 3), C(block_m, 64, 128, True, 4, 4, "rs", 2),
                 C(block_m, 128, 64, True, 8, 4, "rs", 3)]
    out = [d]
    for c in alts:
        if c not in out and (kernel == "all" or c.kernel == kernel):
            out.append(c)
    return out


def block_m_candidates(block_m: int) -> list[int]:
    """The picked block_m first, then its neighbours in 16..256."""
    return [block_m] + [b for b in (block_m // 2, block_m * 2) if 16 <= b <= 256]


def bench_point(w, layer, w13_bf16, w2_bf16, tokens: int, ceil: dict, with_reference: bool, sweep: bool = True,
                sweep_kernel: str = "all") -> dict:
    """One token count: the default launches (with `layer.fragments`, the weights in fragment
    order, when the layer holds them), the sweep, the checkpoint-order default beside a
    fragment-order one, the layer, torch._grouped_mm and (small T) the torch reference."""
    fragments = layer.fragments or {}
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, w.hidden, generator=gen, device="cuda").to(torch.bfloat16)
    topk_w, topk_ids = route(x, w.router_weight, w.router_bias, w.top_k)
    rows = tokens * w.top_k
    mean_rows = rows / w.num_local_experts
    block_m = pick_block_m(rows, w.num_local_experts)
    meta = routing_metadata(topk_ids, w.expert_map, w.num_local_experts, block_m, topk_w)
    hit = int((meta.expert_counts > 0).sum())
    hp, ip, h, i = w.hidden_pad, w.inter_pad, w.hidden, w.inter
    swiglu = (w.swiglu_alpha, w.swiglu_limit)
    res = {"tokens": tokens, "experts": w.num_local_experts, "block_m": block_m, "experts_hit": hit}

    def op_stats(name, ms, flops, weight_bytes):
        floor_ms = roofline_floor_ms(weight_bytes, flops, ceil)
        res[name] = {"ms": ms, "TFLOPs": flops / (ms * 1e-3) / 1e12, "weight_GBps": weight_bytes / (ms * 1e-3) / 1e9,
                     "floor_ms": floor_ms, "roofline_frac": floor_ms / ms, "weight_bytes": weight_bytes,
                     "flops": flops}

    # The floor counts the weight bytes touched as the anchors' README does: the experts hit, at
    # the checkpoint's sizes. Not counted, as the README does not: the padding of our layout (zero
    # at H = I = 2880) and the biases (0.3% of a matrix), both ours to pay, and the activations,
    # which move no floor at these shapes: at most 3% of the weight bytes where the weight term
    # binds, and where the FLOP term binds, weights plus activations still read in less time.
    wb13, wb2 = hit * mxfp4_weight_bytes(2 * i, h), hit * mxfp4_weight_bytes(h, i)
    fl13, fl2 = 2 * rows * 2 * i * h, 2 * rows * h * i

    act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu, fragments=fragments.get("w13"))
    metas = {bm: meta if bm == block_m else routing_metadata(topk_ids, w.expert_map, w.num_local_experts, bm, topk_w)
             for bm in (block_m_candidates(block_m) if sweep else [block_m])}
    res["tiles"] = {bm: int((m.tile_expert >= 0).sum()) for bm, m in metas.items()}
    best = {}
    reference_out = {"w13": None, "w2": None}       # the first (default) config's output per op

    def launch(op: str, m, **kw):
        """One grouped matmul of the layer as the benchmark times it: w13 + SwiGLU from the
        tokens, or w2 + routing weight + atomic combine from w13's output."""
        kw.setdefault("fragments", fragments.get(op))
        if op == "w13":
            return lambda: moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, m, swiglu=swiglu, **kw)
        return lambda: moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, m, gather=False, apply_row_weight=True,
                                  combine="atomic", n_out=h, **kw)

    for op, n, k in (("w13", 2 * ip, hp), ("w2", hp, ip)):
        timings = []
        for bm, meta_bm in metas.items():
            for cfg in candidates(bm, n, k, op == "w13", mean_rows, sweep_kernel,
                                  fragments=bool(fragments), rows=rows)[:None if sweep else 1]:
                fn = launch(op, meta_bm, config=cfg)
                try:
                    # A config must compute what the default computes (another summation order:
                    # bf16-rounding differences only) before its time counts.
                    out = fn().float()
                    if reference_out[op] is None:
                        reference_out[op] = out
                    diff = ((out - reference_out[op]).norm() / reference_out[op].norm().clamp_min(1e-30)).item()
                    if not diff <= SWEEP_AGREEMENT:
                        print(f"  config {cfg} disagrees with the default: rel diff {diff:.2e}", flush=True)
                        continue
                    timings.append((time_graph(fn), cfg))
                except Exception as exc:  # a config that does not fit (shared memory) is skipped
                    print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        res[op + "_sweep"] = [[ms, list(cfg.__dict__.values())] for ms, cfg in timings]
        hopper = on_hopper(torch.device("cuda"))
        default_cfg = default_config(block_m, n, k, swiglu=op == "w13", sm90=hopper, mean_rows=mean_rows,
                                     fragments=bool(fragments), rows=rows)
        if default_cfg.kernel == "rs":
            # The checkpoint-order default beside it (same run): what fragment order gains.
            old_cfg = default_config(block_m, n, k, swiglu=op == "w13", sm90=hopper, mean_rows=mean_rows)
            res[op + "_checkpoint_order_ms"] = time_graph(launch(op, metas[block_m], config=old_cfg))
        if default_cfg.kernel == "sm90":
            # The Triton kernel's default beside it: what the Gluon kernel gains.
            triton_cfg = default_config(block_m, n, k, swiglu=op == "w13", mean_rows=mean_rows)
            res[op + "_triton_kernel_ms"] = time_graph(launch(op, metas[block_m], config=triton_cfg))
        if default_cfg.swap_ab and default_cfg.kernel == "triton":
            # What retiring each K step's wgmma costs: the default config pipelined as Triton 3.6
            # would (racy, triton#9433; timed only, its output is not used).
            res[op + "_unsafe_pipelined_ms"] = time_graph(launch(op, metas[block_m], config=default_cfg,
                                                                 unsafe_pipelined_rs_mma=True))
        is_default = bool(timings) and timings[0][1] == default_cfg
        default_ms = timings[0][0] if is_default else float("nan")
        best_ms, best_cfg = min(timings, key=lambda t: t[0])
        best[op] = best_cfg
        fl, wb = (fl13, wb13) if op == "w13" else (fl2, wb2)
        op_stats(op, default_ms, fl, wb)
        op_stats(op + "_best", best_ms, fl, wb)
        res[op + "_best"]["config"] = best_cfg.__dict__
    res["w2_slots_ms"] = time_graph(lambda: moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, gather=False,
                                                       apply_row_weight=True, combine="slots", n_out=h))
    res["routing_metadata_ms"] = time_graph(lambda: routing_metadata(topk_ids, w.expert_map, w.num_local_experts,
                                                                     block_m, topk_w))
    res["layer_combine"] = layer.combine_for(tokens)
    res["layer_fragment_order"] = layer.fragments is not None
    op_stats("layer", time_graph(lambda: layer(x)), fl13 + fl2, wb13 + wb2)
    res["layer"]["eager_ms"] = time_eager(lambda: layer(x))
    # torch._grouped_mm on bf16 weights, rows already gathered and sorted (favours the baseline)
    local = int(meta.expert_offsets[-1])
    x_sorted = x[meta.sorted_token[:local].long()]
    act_sorted = act[:local].contiguous()
    offs = meta.expert_offsets[1:].to(torch.int32)
    try:
        g13 = time_graph(lambda: torch._grouped_mm(x_sorted, w13_bf16.transpose(1, 2), offs=offs))
        g2 = time_graph(lambda: torch._grouped_mm(act_sorted, w2_bf16.transpose(1, 2), offs=offs))
        res["grouped_mm_bf16"] = {"w13_ms": g13, "w2_ms": g2,
                                  "speedup_w13": g13 / res["w13"]["ms"], "speedup_w2": g2 / res["w2"]["ms"]}
    except Exception as exc:
        res["grouped_mm_bf16"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if with_reference:
        ref = MXFP4MoE(w, backend="torch")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ref(x)
        start.record()
        for _ in range(3):
            ref(x)
        end.record()
        torch.cuda.synchronize()
        res["torch_reference_eager_ms"] = start.elapsed_time(end) / 3
    return res


def ab_alternatives(block_m: int, swiglu: bool) -> list[MatmulConfig]:
    """Configs besides the default worth timing once the decode is cheap (larger K steps)."""
    if block_m <= 32:
        return [MatmulConfig(block_m, 64, 128, True, 4, 4), MatmulConfig(block_m, 128, 64, True, 4, 4)]
    if block_m == 64:
        return [MatmulConfig(64, 128, 128, False, 4, 3)]
    return [MatmulConfig(128, 128, 64, False, 4, 3) if swiglu else MatmulConfig(128, 128, 64, False, 8, 3),
            MatmulConfig(128, 128, 128, False, 8, 3)]


def ab_point(w, tokens: int) -> list[dict]:
    """w13 and w2 times per dequantization path at one token count (see the module doc)."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, w.hidden, generator=gen, device="cuda").to(torch.bfloat16)
    topk_w, topk_ids = route(x, w.router_weight, w.router_bias, w.top_k)
    block_m = pick_block_m(tokens * w.top_k, w.num_local_experts)
    meta = routing_metadata(topk_ids, w.expert_map, w.num_local_experts, block_m, topk_w)
    swiglu = (w.swiglu_alpha, w.swiglu_limit)
    act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu)
    rows = []
    for op, n, k in (("w13", 2 * w.inter_pad, w.hidden_pad), ("w2", w.hidden_pad, w.inter_pad)):
        default = default_config(block_m, n, k, swiglu=op == "w13")     # the Triton kernel's decodes
        runs = [("bytes", default), ("ptx", default)] + [("ptx", c) for c in ab_alternatives(block_m, op == "w13")
                                                          if c != default]
        for dequant, cfg in runs:
            if op == "w13":
                fn = lambda cfg=cfg, d=dequant: moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta,
                                                           swiglu=swiglu, config=cfg, dequant=d)
            else:
                fn = lambda cfg=cfg, d=dequant: moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta,
                                                           gather=False, apply_row_weight=True, combine="atomic",
                                                           n_out=w.hidden, config=cfg, dequant=d)
            try:
                ms = time_graph(fn)
            except Exception as exc:  # a config that does not fit (shared memory) is skipped
                print(f"  {op} {dequant} {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            rows.append({"experts": w.num_local_experts, "tokens": tokens, "op": op, "dequant": dequant,
                         "default": cfg == default, "config": list(cfg.__dict__.values()), "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def ab_markdown(rows: list[dict], header: dict) -> str:
    lines = ["# Dequantization A/B", "", f"device: {header['device']}; torch {header['torch']}; triton "
             f"{header['triton']}; commit {header['commit']}", f"command: `{header['command']}`", "",
             "Times in ms (CUDA-graph replay, L2 flushed, median); `x` = bytes time / this time.", "",
             "| E | T | op | dequant | config (bm, bn, bk, swap, warps, stages) | default | ms | x |",
             "|---|---|---|---|---|---|---|---|"]
    base = {(r["experts"], r["tokens"], r["op"]): r["ms"] for r in rows if r["dequant"] == "bytes"}
    for r in rows:
        ref = base.get((r["experts"], r["tokens"], r["op"]), float("nan"))
        lines.append(f"| {r['experts']} | {r['tokens']} | {r['op']} | {r['dequant']} | {tuple(r['config'])} | "
                     f"{'yes' if r['default'] else ''} | {r['ms']:.3f} | {ref / r['ms']:.2f} |")
    return "\n".join(lines) + "\n"


# triton_kernels' launches in bench_tk.py's tk_results.json that do what ours do: w13 with the
# token gather and the fused SwiGLU, w2 with the scatter, gate weights and top-k reduce. bench_tk
# names each by its scale layout's num_warps, "(w4)" or "(w8)", and times one per T (both with
# --alt-warps: then the faster counts).
TK_KERNELS = {"w13": re.compile(r"mx_w13_gather_swiglu\(w\d+\)"), "w2": re.compile(r"mx_w2_scatter\(w\d+\)")}


def parse_tk_spec(spec: str) -> tuple[int, Path]:
    """--tk-json's "E=PATH" -> (E, PATH): tk_results.json does not record E."""
    experts, sep, path = spec.partition("=")
    if not sep or not experts.isdigit() or not path:
        raise ValueError(f"--tk-json: expected E=PATH (the expert count bench_tk.py ran with, then its "
                         f"tk_results.json; the file does not record E), got {spec!r}")
    return int(experts), Path(path)


def load_tk_results(path: Path, experts: int, hidden: int = HIDDEN, inter: int = INTER,
                    top_k: int = TOP_K) -> dict:
    """Read bench_tk.py's tk_results.json ({"device", "torch", "triton", "results": [{"T", "kernel",
    "ms_graph", "tflops_graph", "wbytes_MB", ...}]}) of a run at `experts` experts. Returns
    {"path", "device", "torch", "triton", "times": {T: {"w13" | "w2": {"ms", "experts_hit", "kernel"}}}}
    with the CUDA-graph times (L2 flushed, median: our method). Checks that it ran at our shapes:
    its weight bytes are a whole number (<= E) of experts of H x 2I (w13) or I x H (w2), and its
    FLOPs are 2 * T * top_k * N * K."""
    data = json.loads(path.read_text())
    per_expert = {"w13": mxfp4_weight_bytes(2 * inter, hidden), "w2": mxfp4_weight_bytes(hidden, inter)}
    times: dict[int, dict] = {}
    for entry in data["results"]:
        for op, name in TK_KERNELS.items():
            if not name.fullmatch(entry["kernel"]) or entry.get("ms_graph") is None:
                continue
            tokens, where = entry["T"], f"{path}: {entry['kernel']} at T = {entry['T']}"
            hit = entry["wbytes_MB"] * 1e6 / per_expert[op]
            if abs(hit - round(hit)) > 1e-3 or not 0 < round(hit) <= experts:
                raise ValueError(f"{where} read {entry['wbytes_MB']} MB: expected 1 to {experts} experts of "
                                 f"{per_expert[op]} bytes (H = {hidden}, I = {inter}), found {hit:.3f}")
            n_out, n_in = (2 * inter, hidden) if op == "w13" else (hidden, inter)
            flops = 2 * tokens * top_k * n_out * n_in
            tk_flops = entry["tflops_graph"] * 1e12 * entry["ms_graph"] * 1e-3
            if not math.isclose(tk_flops, flops, rel_tol=1e-6):
                raise ValueError(f"{where} counts {tk_flops:.4g} FLOPs: expected {flops:.4g} "
                                 f"(top-{top_k}, H = {hidden}, I = {inter})")
            known = times.setdefault(tokens, {}).get(op)
            if known is None or entry["ms_graph"] < known["ms"]:
                times[tokens][op] = {"ms": entry["ms_graph"], "experts_hit": round(hit), "kernel": entry["kernel"]}
    return {"path": str(path), "device": data.get("device"), "torch": data.get("torch"),
            "triton": data.get("triton"), "times": times}


def attach_tk(results: list[dict], header: dict, tk_by_experts: dict[int, dict]) -> None:
    """Give each row of `results` that triton_kernels timed at its (E, T) a "triton_kernels" entry:
    per op its time, experts hit, roofline floor and share on this run's ceilings (its own experts
    hit: its router logits are not ours), and speedup = its time / ours. Records the sources in
    header["triton_kernels"]."""
    hidden, inter = header["shape"]["hidden"], header["shape"]["inter"]
    per_expert = {"w13": mxfp4_weight_bytes(2 * inter, hidden), "w2": mxfp4_weight_bytes(hidden, inter)}
    header["triton_kernels"] = {str(e): {key: value for key, value in tk.items() if key != "times"}
                                for e, tk in tk_by_experts.items()}
    for r in results:
        r.pop("triton_kernels", None)            # a re-render replaces what an earlier one attached
        timed = tk_by_experts.get(r["experts"], {"times": {}})["times"].get(r["tokens"], {})
        entry = {}
        for op, tk in timed.items():
            floor_ms = roofline_floor_ms(tk["experts_hit"] * per_expert[op], r[op]["flops"], header["ceilings"])
            entry[op] = {**tk, "floor_ms": floor_ms, "roofline_frac": floor_ms / tk["ms"],
                         "speedup": tk["ms"] / r[op]["ms"]}
        if entry:
            r["triton_kernels"] = entry


def fmt_us(ms: float) -> str:
    """A time in ms as microseconds to three figures or so, as the anchors' README writes them."""
    if ms is None or math.isnan(ms):
        return "-"
    us = ms * 1e3
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def fmt_time_share(ms: float, floor_ms: float) -> str:
    """"time (share of the floor)", e.g. "24.6 (32%)"."""
    if ms is None or math.isnan(ms):
        return "-"
    return f"{fmt_us(ms)} ({floor_ms / ms:.0%})"


def roofline_table(results: list[dict], header: dict) -> list[str]:
    """The comparison of the anchors' README: per (E, T) the floor, our time and triton_kernels'
    (where attached) with their shares of the floor, for w13 and w2; markdown lines."""
    ceil, shape = header["ceilings"], header["shape"]
    with_tk = any("triton_kernels" in r for r in results)
    sizes = ", ".join(f"{r['GBps'] / 1e3:.2f} TB/s at {r['MiB']} MiB" for r in ceil["read_by_size"])
    lines = [f"## Against the roofline{' and triton_kernels' if with_tk else ''}", "",
             f"GPU time in us (CUDA-graph replay, L2 flushed, median), bf16 activations, H = {shape['hidden']}, "
             f"I = {shape['inter']}, top-{shape['top_k']}; in brackets the share of the roofline floor (floor / time).",
             "",
             f"floor = max(weight bytes touched / {ceil['read_GBps'] / 1e3:.2f} TB/s HBM read, FLOPs / "
             f"{ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s bf16 matmul), both measured in this run (read: a Triton "
             f"streaming read, the best at {READ_CEILING_MIN_MIB} MiB or more; {sizes}; bf16 matmul: "
             f"torch 8192^3). Weight bytes touched = experts hit x one expert's MXFP4 codes and E8M0 scales "
             f"(w13: 2I x H, w2: H x I, checkpoint sizes; biases, layout padding and activations not counted); "
             f"FLOPs = 2 x T x top-k x N x K.", "",
             "ours: w13 + bias + SwiGLU (token rows gathered in the kernel) and w2 + bias + routing weight + "
             "atomic combine into [T, H] (`moe_matmul`, default configs)."]
    if with_tk:
        sources = "; ".join(f"E = {e}: {src['path']} (triton {src['triton']}, torch {src['torch']}"
                            + ("" if src["device"] == header["device"] else f", **on another device: {src['device']}**")
                            + ")" for e, src in header["triton_kernels"].items())
        lines.append("tk: OpenAI triton_kernels `matmul_ogs` (the anchors' bench_tk.py), MXFP4 weights in its Hopper "
                     "layouts: w13 + gather + fused SwiGLU and w2 + scatter + gate weights + top-k reduce, no bias, "
                     f"its own random router logits. From {sources}.")
        lines += ["", "`x` = tk time / ours (>1: ours faster). `hit` = experts hit, ours / tk's where they differ: "
                  "then tk's share is of its own floor.", "",
                  "| E | T | hit | w13 floor | ours w13 | tk w13 | w13 x | w2 floor | ours w2 | tk w2 | w2 x |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["", "| E | T | hit | w13 floor | ours w13 | w2 floor | ours w2 | layer floor | ours layer |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ours = [fmt_us(r["w13"]["floor_ms"]), fmt_time_share(r["w13"]["ms"], r["w13"]["floor_ms"]),
                fmt_us(r["w2"]["floor_ms"]), fmt_time_share(r["w2"]["ms"], r["w2"]["floor_ms"])]
        if not with_tk:
            cells = [*ours, fmt_us(r["layer"]["floor_ms"]), fmt_time_share(r["layer"]["ms"], r["layer"]["floor_ms"])]
            lines.append(f"| {r['experts']} | {r['tokens']} | {r['experts_hit']} | " + " | ".join(cells) + " |")
            continue
        tk = r.get("triton_kernels", {})
        hits = {tk[op]["experts_hit"] for op in tk} - {r["experts_hit"]}
        hit = f"{r['experts_hit']}" + "".join(f" / {h}" for h in sorted(hits))
        cells = []
        for op, (floor, mine) in zip(("w13", "w2"), (ours[:2], ours[2:])):
            theirs = tk.get(op)
            cells += [floor, mine, fmt_time_share(theirs["ms"], theirs["floor_ms"]) if theirs else "-",
                      f"{theirs['speedup']:.2f}" if theirs else "-"]
        lines.append(f"| {r['experts']} | {r['tokens']} | {hit} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: list[dict], header: dict) -> str:
    lines = ["# MXFP4 MoE benchmark", "",
             f"device: {header['device']}; torch {header['torch']}; triton {header['triton']}; "
             f"commit {header['commit']}", f"command: `{header['command']}`"]
    if header.get("render_command"):
        lines.append(f"rendered by: `{header['render_command']}`")
    lines += ["", *roofline_table(results, header), "", "## All figures", "",
              "Times in ms (CUDA-graph replay, L2 flushed, median). `gmm x` = torch._grouped_mm bf16 time / ours "
              "(>1: we are faster). roof = roofline floor (above) / time. triton_kernels, where timed in the same "
              "call, is in the table above.", "",
              "`ckpt` = the checkpoint-order default, same run (where the default reads fragment order).", "",
              "| E | T | bm | hit | w13+swiglu | roof | gmm x | best w13 | ckpt w13 | w2+combine | roof "
              "| gmm x | best w2 | ckpt w2 | w2 slots | layer | layer eager | layer TFLOP/s | weight GB/s "
              "| torch ref |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in results:
        g = r.get("grouped_mm_bf16", {})
        lines.append(
            f"| {r['experts']} | {r['tokens']} | {r['block_m']} | {r['experts_hit']} | {r['w13']['ms']:.3f} | "
            f"{r['w13']['roofline_frac']:.2f} | {g.get('speedup_w13', nan):.2f} | {r['w13_best']['ms']:.3f} | "
            f"{r.get('w13_checkpoint_order_ms', nan):.3f} | "
            f"{r['w2']['ms']:.3f} | "
            f"{r['w2']['roofline_frac']:.2f} | {g.get('speedup_w2', nan):.2f} | {r['w2_best']['ms']:.3f} | "
            f"{r.get('w2_checkpoint_order_ms', nan):.3f} | "
            f"{r['w2_slots_ms']:.3f} | "
            f"{r['layer']['ms']:.3f} | {r['layer']['eager_ms']:.3f} | {r['layer']['TFLOPs']:.0f} | "
            f"{r['layer']['weight_GBps']:.0f} | {r.get('torch_reference_eager_ms', float('nan')):.2f} |")
    lines += ["", "Best configs found (block_m, block_n, block_k, swap_ab, warps, stages, kernel, prefetch):", ""]
    for r in results:
        lines.append(f"- E={r['experts']} T={r['tokens']}: w13 {tuple(r['w13_best']['config'].values())} "
                     f"{r['w13_best']['ms']:.3f} ms; w2 {tuple(r['w2_best']['config'].values())} {r['w2_best']['ms']:.3f} ms; "
                     f"tiles per block_m {r.get('tiles')}; routing metadata {r.get('routing_metadata_ms', float('nan')):.3f} ms; "
                     f"layer combine {r.get('layer_combine')}")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, header: dict | None = None) -> None:
    """Per matmul, time against tokens for each E: ours, triton_kernels when its times are attached
    (the same run), torch._grouped_mm on bf16 weights when timed, and the roofline floor (weight
    bytes touched over the measured read rate, or FLOPs over the measured matmul rate). The title
    names the device and commit: figures from other cards or runs never share a picture."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {128: "tab:blue", 32: "tab:orange"}
    for ax, op in zip(axes, ("w13", "w2")):
        for e in sorted({r["experts"] for r in results}, reverse=True):
            rs = [r for r in results if r["experts"] == e]
            ts = [r["tokens"] for r in rs]
            color = colors.get(e)
            ax.plot(ts, [r[op]["ms"] for r in rs], "o-", color=color, label=f"mxfp4_moe, E = {e}")
            tk = [(r["tokens"], r["triton_kernels"][op]["ms"]) for r in rs if op in r.get("triton_kernels", {})]
            if tk:
                ax.plot(*zip(*tk), "s--", color=color, alpha=0.7, label=f"triton_kernels, E = {e}")
            if all(op + "_ms" in r.get("grouped_mm_bf16", {}) for r in rs):
                ax.plot(ts, [r["grouped_mm_bf16"][op + "_ms"] for r in rs], "x:", color=color, alpha=0.5,
                        label=f"torch._grouped_mm on bf16 weights, E = {e}")
            ax.plot(ts, [r[op]["floor_ms"] for r in rs], "-", color=color, linewidth=3, alpha=0.25,
                    label=f"roofline floor, E = {e}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (top-4, H = I = 2880)")
        ax.set_ylabel("ms (CUDA graph, L2 flushed)")
        ax.set_title(op + (" + SwiGLU" if op == "w13" else " + combine"))
        ax.legend(fontsize=7)
    if header:
        ceil = header.get("ceilings", {})
        fig.suptitle(f"{header.get('device', '?')}, commit {header.get('commit', '?')}: read "
                     f"{ceil.get('read_GBps', float('nan')) / 1e3:.2f} TB/s, bf16 matmul "
                     f"{ceil.get('bf16_matmul_TFLOPs', float('nan')):.0f} TFLOP/s, both measured in the run",
                     fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(results: list[dict], header: dict, tk_by_experts: dict[int, dict], out: Path) -> None:
    """Attach triton_kernels' times (if any), then write out/out_moe.json, out/results_moe.md and
    out/moe.png, and print the markdown."""
    if tk_by_experts:
        attach_tk(results, header, tk_by_experts)
        for e, src in header["triton_kernels"].items():
            if src["device"] != header["device"]:
                print(f"warning: triton_kernels E = {e} ran on {src['device']}, ours on {header['device']}",
                      file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "out_moe.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    md = markdown(results, header)
    (out / "results_moe.md").write_text(md)
    plot(results, out / "moe.png", header)
    print(md, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"),
                   help="folder for results_moe.md, out_moe.json and moe.png (default benchmarks/out, git-ignored)")
    p.add_argument("--experts", type=int, nargs="+", default=[128, 32])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048, 8192])
    p.add_argument("--no-sweep", action="store_true",
                   help="time the default block configs only (the config sweep takes most of the run)")
    p.add_argument("--sweep-kernel", choices=("all", "triton", "sm90", "rs"), default="all",
                   help="sweep the alternatives of one kernel only (the default config is always timed)")
    p.add_argument("--ab", action="store_true", help="time the dequantization paths against each other")
    p.add_argument("--tk-json", nargs="+", default=[], metavar="E=PATH",
                   help="tk_results.json of the anchors' bench_tk.py run with --E E on the same device in the same "
                        "call, one per E (the file does not record E): adds triton_kernels' w13 and w2 times, "
                        "shares of the roofline and speedups to each (E, T) row")
    p.add_argument("--render-only", type=Path, metavar="JSON",
                   help="time nothing: rebuild results_moe.md, moe.png and out_moe.json in --out from this saved "
                        "out_moe.json (with --tk-json: adding triton_kernels' times); needs no GPU")
    args = p.parse_args(argv)
    command = "python -m benchmarks.bench_moe " + " ".join(argv if argv is not None else sys.argv[1:])
    tk_by_experts = {}
    for spec in args.tk_json:      # read before any timing, so a bad file fails at once
        experts, path = parse_tk_spec(spec)
        if experts in tk_by_experts:
            raise ValueError(f"--tk-json: two files for E = {experts}: {tk_by_experts[experts]['path']} and {path}")
        tk_by_experts[experts] = load_tk_results(path, experts)
    if args.render_only:
        saved = json.loads(args.render_only.read_text())
        if "read_GBps" not in saved["header"].get("ceilings", {}):
            raise ValueError(f"{args.render_only}: no measured HBM read ceiling (header.ceilings.read_GBps): "
                             f"written by a bench_moe.py older than the read-bandwidth roofline; time it again")
        saved["header"]["render_command"] = command
        write_report(saved["results"], saved["header"], tk_by_experts, args.out)
        return 0
    if not torch.cuda.is_available():
        print("bench_moe needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "commit": git_commit(), "command": command,
              "shape": {"hidden": HIDDEN, "inter": INTER, "top_k": TOP_K}}
    print(json.dumps(header), flush=True)
    if args.ab:
        rows = []
        for e in args.experts:
            w, _ = random_expert_weights(e, HIDDEN, INTER, top_k=TOP_K, seed=e, device="cuda", dense=False)
            for t in args.tokens:
                rows += ab_point(w, t)
                (args.out / "ab_dequant.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
            del w
            torch.cuda.empty_cache()
        md = ab_markdown(rows, header)
        (args.out / "ab_dequant.md").write_text(md)
        print(md, flush=True)
        return 0
    header["ceilings"] = ceilings()
    print(json.dumps(header["ceilings"]), flush=True)
    results = []
    for e in args.experts:
        t0 = time.time()
        w, _ = random_expert_weights(e, HIDDEN, INTER, top_k=TOP_K, seed=e, device="cuda", dense=False)
        w13_bf16 = dequantize(w.w13_blocks, w.w13_scales, torch.bfloat16)
        w2_bf16 = dequantize(w.w2_blocks, w.w2_scales, torch.bfloat16)
        layer = MXFP4MoE(w, backend="triton")      # weights also in fragment order on a Hopper GPU
        print(f"E={e}: weights ready in {time.time() - t0:.1f}s (fragment order: {layer.fragments is not None})",
              flush=True)
        for t in args.tokens:
            r = bench_point(w, layer, w13_bf16, w2_bf16, t, header["ceilings"], with_reference=t <= 8,
                            sweep=not args.no_sweep, sweep_kernel=args.sweep_kernel)
            results.append(r)
            print(json.dumps(r), flush=True)
            (args.out / "out_moe.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
        del w, layer, w13_bf16, w2_bf16
        torch.cuda.empty_cache()
    write_report(results, header, tk_by_experts, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
