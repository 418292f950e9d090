"""Probe: what bounds the fragment-order ("rs") kernel? Times its default launches with parts of
the K loop taken out, by variants of `kernels/_moe_matmul_rs.py` (every variant but `base`
computes wrong results on purpose: only its time counts):

    base        the module as it is (its output must match the launcher's: `base_rel_diff`)
    no_decode   each weight word becomes its four bf16 pairs by four plain ALU instructions
                instead of the decode's fifteen (the words and scale words are still loaded
                and still feed the wgmma)
    no_x_copy   no cp.async of the tile's x rows (the wgmma reads whatever the ring holds)
    no_x_sync   no proxy fence and CTA barrier before each step's wgmma (the copies stay;
                racy, timing only)
and their combinations ("+"). With every part but the weight loads and the wgmma taken out,
what is left is the floor of this loop structure. Every launch copies x by cp.async, the path
these edits take apart (w2 otherwise reads its sorted rows by TMA from 64-wide K steps).

    python -m benchmarks.probes.probe_rs_parts --out DIR               # GPU: DIR/probe_rs_parts.json
    python -m benchmarks.probes.probe_rs_parts --sass                  # any machine: registers and K-loop
                                                                # SASS instructions of each variant
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

import torch


RS_SOURCE = Path(__file__).resolve().parents[2] / "kernels" / "_moe_matmul_rs.py"
VARIANTS = ("base", "no_decode", "no_x_copy", "no_x_sync", "no_x_copy+no_x_sync",
            "no_decode+no_x_copy+no_x_sync")

# The decode's inline PTX ($0..$3 out; $4 the word, $6 its scale word, $8 the byte selector)
# replaced by one instruction per output, each reading the word, so nothing is dead code.
_CHEAP_PTX = '''_PAIRS_PTX: gl.constexpr = gl.constexpr("""
xor.b32 $0, $4, $6;
xor.b32 $1, $4, $8;
or.b32 $2, $4, $6;
and.b32 $3, $4, $8;
""")'''
_EDITS = {
    "no_decode": (re.compile(r'_PAIRS_PTX: gl\.constexpr = gl\.constexpr\(f""".*?"""\)', re.S), _CHEAP_PTX),
    "no_x_copy": ("        _copy_x_step(x_smems[i].index(buffer), x_ptrs[i], masks_xm[i], offs_xk, K_X, step, "
                  "BLOCK_K, EVEN_K, valid)", "        pass"),
    "no_x_sync": ("    async_copy.wait_group(STAGES - 3)\n    fence_async_shared()\n    cta_barrier()",
                  "    async_copy.wait_group(STAGES - 3)"),
}


def variant_source(name: str) -> str:
    """The source of `_moe_matmul_rs.py` with the parts `name` lists ("+"-joined) taken out."""
    src = RS_SOURCE.read_text()
    for part in name.split("+"):
        if part == "base":
            continue
        old, new = _EDITS[part]
        if isinstance(old, re.Pattern):
            src, count = old.subn(lambda _: new, src)
        else:
            count = src.count(old)
            src = src.replace(old, new)
        if count != 1:
            raise RuntimeError(f"probe_rs_parts: the edit {part!r} matched {count} places in {RS_SOURCE} "
                               "(the kernel changed: update _EDITS)")
    return src


def variant_kernels(tmp: Path) -> dict:
    """Each variant's `_moe_matmul_rs_kernel`, from its own module (imports made absolute)."""
    kernels = {}
    for name in VARIANTS:
        path = tmp / f"rs_parts_{name.replace('+', '_')}.py"
        path.write_text(variant_source(name).replace("from .", "from mxfp4_moe.kernels."))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        kernels[name] = module._moe_matmul_rs_kernel
    return kernels


def sass_report(kernels: dict) -> int:
    """Compile every variant's default configs at the gpt-oss shapes for sm_90 (no GPU needed)."""
    from mxfp4_moe.kernels.moe_matmul import default_config
    from mxfp4_moe.kernels.tools.sm90_report import compile_variant, resource_report
    for block_m in (16, 64, 128):
        for op, n, swiglu in (("w13", 5760, True), ("w2", 2880, False)):
            config = default_config(block_m, n, 2880, swiglu=swiglu, sm90=True, fragments=True)
            for name, kernel in kernels.items():
                compiled = compile_variant(config, k=2880, n=n, swiglu=swiglu, atomic=not swiglu, rs_kernel=kernel)
                report = resource_report(compiled, config)
                print(json.dumps({"op": op, "block_m": block_m, "variant": name,
                                  **{key: report[key] for key in ("registers", "local_bytes", "shared_bytes",
                                                                  "loop_instructions",
                                                                  "instructions_per_element")}}), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="32:512,128:2048,128:32,32:8192", help="E:T,...")
    p.add_argument("--sass", action="store_true", help="compile for sm_90 and report; no GPU needed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args()
    launcher = importlib.import_module("mxfp4_moe.kernels.moe_matmul")
    launcher.rs_x_descriptor = lambda x, config: None          # launches: the cp.async x ring
    launcher.rs_x_tma_block = lambda config: None              # --sass compiles: the same
    kernels = variant_kernels(Path(tempfile.mkdtemp(prefix="probe_rs_parts_")))
    if args.sass:
        return sass_report(kernels)

    from benchmarks.common import record, routed_points, start_probe, time_graph

    from mxfp4_moe.kernels.moe_matmul import moe_matmul, pick_block_m
    from mxfp4_moe.kernels.fragment_layout import to_fragment_order
    from mxfp4_moe.routing import routing_metadata
    rs_module = importlib.import_module("mxfp4_moe.kernels._moe_matmul_rs")   # the module the launcher reads
    launcher_kernel = rs_module._moe_matmul_rs_kernel
    header = start_probe(args.out, variants=list(VARIANTS))
    rows = []
    fragments = {}
    for experts, tokens, w, x, topk_w, topk_ids in routed_points(args.points):
        if experts not in fragments:
            fragments = {experts: {"w13": to_fragment_order(w.w13_blocks, w.w13_scales),
                                   "w2": to_fragment_order(w.w2_blocks, w.w2_scales)}}
        frag = fragments[experts]
        meta = routing_metadata(topk_ids, w.expert_map, experts, pick_block_m(tokens * 4, experts), topk_w)
        swiglu = (w.swiglu_alpha, w.swiglu_limit)
        act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu, fragments=frag["w13"])
        calls = {"w13": lambda: moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu,
                                           fragments=frag["w13"]),
                 "w2": lambda: moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, gather=False,
                                          apply_row_weight=True, combine="atomic", n_out=2880,
                                          fragments=frag["w2"])}
        for op, fn in calls.items():
            row = {"experts": experts, "tokens": tokens, "op": op, "block_m": meta.block_m}
            expected = fn().float()
            for name, kernel in kernels.items():
                rs_module._moe_matmul_rs_kernel = kernel
                try:
                    if name == "base":     # w2's fp32 atomics sum in any order: not bit for bit there
                        got = fn().float()
                        row["base_rel_diff"] = ((got - expected).norm() / expected.norm()).item()
                    row[name] = time_graph(fn)
                finally:
                    rs_module._moe_matmul_rs_kernel = launcher_kernel
            record(row, rows, args.out / "probe_rs_parts.json", header)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
