"""Probe (GPU): does the "sm90" kernel earn its place beside the Triton kernel and an "rs" taking every scale byte?

Per (E, T), bf16, CUDA-graph GPU time with L2 flushed (`benchmarks.common.time_graph`) of w13 + SwiGLU
and w2 + routing weight + atomic combine, each path on its own copy of the same weights:

    sm90      the "sm90" kernel, checkpoint order: its default config where the checkpoint-order
              default picks it (64- and 128-row tiles), else SM90_SWAPPED (no default there)
    triton    the portable Triton kernel's default config, checkpoint order (what would run
              without "sm90")
    rs        the "rs" kernel's default config on fragment-order weights (the layer's Hopper
              default whenever every scale byte is <= 128)
    rs_shift  "rs" on fragment order built from `prototype_row_shift.shift_rows_into_range`'s scales,
              with its row scale as channel_scale: taking every scale byte (0..254, NaN) into
              fragment order by a per-row power of two in the epilogue (these weights' shifts are
              all 0; the multiply runs all the same)
    rs_shift_mma  the same with the channel scale multiplied into the accumulator in the wgmma's
              layout (2 rows a thread), before the epilogue's layout change: a copy of
              `_moe_matmul_rs.py` edited by CS_IN_MMA_LAYOUT (the kernel's own channel-scale path
              costs w13 10-54 more registers, `--compile-only`)

Every output must agree with triton's (relative Frobenius difference <= benchmarks.common.SWEEP_AGREEMENT)
before its time counts. Then at --check-point, weights with scale bytes lifted past 128 on an
eighth of the rows and one NaN byte: rs_shift(_mma) against sm90, column by column, NaN columns
equal.
Off Hopper (TRITON_INTERPRET=1 with --tiny), the Gluon paths run as the Triton kernel on what
they would read (checkpoint order rebuilt from their fragments): a check of the harness, no
times.

    python -m benchmarks.probes.probe_sm90_place --out DIR   # DIR/probe_sm90_place.json and .md
    TRITON_INTERPRET=1 python -m benchmarks.probes.probe_sm90_place --tiny --out DIR
    python -m benchmarks.probes.probe_sm90_place --compile-only   # its Gluon configs for sm_90, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import triton

from benchmarks.common import SWEEP_AGREEMENT, git_commit, record, time_graph
from mxfp4_moe.kernels.moe_matmul import (MatmulConfig, default_config, interpreting, moe_matmul,
                                          on_hopper, pick_block_m)
from mxfp4_moe.kernels.fragment_layout import from_fragment_order, to_fragment_order
from mxfp4_moe.kernels import fragment_layout, prototype_row_shift
from mxfp4_moe.synthetic import random_expert_weights
from mxfp4_moe.mxfp4 import E8M0_NAN
from mxfp4_moe.reference import reference_moe_matmul
from mxfp4_moe.routing import route, routing_metadata

PATHS = ("sm90", "triton", "rs", "rs_shift", "rs_shift_mma")
GLUON_PATHS = ("sm90", "rs", "rs_shift", "rs_shift_mma")
SHIFT_PATHS = ("rs_shift", "rs_shift_mma")

RS_SOURCE = Path(__file__).resolve().parents[2] / "kernels" / "_moe_matmul_rs.py"
# rs_shift_mma: the channel scale times each piece's accumulator in the wgmma's layout (rows g and
# g + 8 of each 16-row block per thread: a few loads and one multiply per element), not after
# the epilogue's layout change (a full row slice per thread), which then skips it.
CS_IN_MMA_LAYOUT = (
    ("        _store_tile(gl.permute(accs[i], (1, 0)), pid_n,",
     """        acc = accs[i]
        if HAS_CHANNEL_SCALE:
            offs_cs = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc.type.layout))
            cs = gl.load(cs_ptr + expert64 * stride_cse + offs_cs, mask=offs_cs < N, other=0.0)
            acc = acc * cs[:, None]
        _store_tile(gl.permute(acc, (1, 0)), pid_n,"""),
    ("limit, PIECES[i], BLOCK_N, SCATTER, ATOMIC, HAS_BIAS, HAS_CHANNEL_SCALE,",
     "limit, PIECES[i], BLOCK_N, SCATTER, ATOMIC, HAS_BIAS, False,"),
)
_VARIANT = {}


def cs_in_mma_kernel():
    """`_moe_matmul_rs_kernel` from a copy of `_moe_matmul_rs.py` edited by CS_IN_MMA_LAYOUT
    (imports made absolute), built once."""
    if not _VARIANT:
        src = RS_SOURCE.read_text()
        for old, new in CS_IN_MMA_LAYOUT:
            if src.count(old) != 1:
                raise RuntimeError(f"probe_sm90_place: an edit of CS_IN_MMA_LAYOUT matched {src.count(old)} places "
                                   f"in {RS_SOURCE} (the kernel changed: update the edit)")
            src = src.replace(old, new)
        path = Path(tempfile.mkdtemp(prefix="probe_sm90_place_")) / "rs_cs_in_mma.py"
        path.write_text(src.replace("from .", "from mxfp4_moe.kernels."))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        _VARIANT["kernel"] = module._moe_matmul_rs_kernel
    return _VARIANT["kernel"]


def with_rs_kernel(fn, kernel):
    """fn, run with the launcher reading `kernel` as the "rs" kernel (it looks the name up in
    `_moe_matmul_rs` at each launch, graph captures included)."""
    rs_module = importlib.import_module("mxfp4_moe.kernels._moe_matmul_rs")

    def run():
        plain = rs_module._moe_matmul_rs_kernel
        rs_module._moe_matmul_rs_kernel = kernel
        try:
            return fn()
        finally:
            rs_module._moe_matmul_rs_kernel = plain
    return run


def sm90_swapped(block_m: int) -> MatmulConfig:
    """The "sm90" kernel's config where no default picks it (<= 32-row tiles): swapped operands,
    one warpgroup of 64 weight rows, 128-wide K steps (bench_moe's sweep holds it)."""
    return MatmulConfig(block_m, 64, 128, True, 4, 4, "sm90")


def path_configs(block_m: int, n: int, k: int, swiglu: bool, rows: int, experts: int) -> dict:
    """{path: (config, is that kernel's default here)} for one launch (module docstring)."""
    mean_rows = rows / experts
    sm90 = default_config(block_m, n, k, swiglu=swiglu, sm90=True, mean_rows=mean_rows)
    rs = default_config(block_m, n, k, swiglu=swiglu, sm90=True, fragments=True, mean_rows=mean_rows, rows=rows)
    if rs.split_k > 1 and swiglu:           # as the launcher: split-K partial sums only for w2's atomics
        rs = dataclasses.replace(rs, split_k=1)
    return {"sm90": (sm90, True) if sm90.kernel == "sm90" else (sm90_swapped(block_m), False),
            "triton": (default_config(block_m, n, k, swiglu=swiglu, mean_rows=mean_rows), True),
            "rs": (rs, True), "rs_shift": (rs, True), "rs_shift_mma": (rs, True)}


class Weights:
    """One E's expert weights in every order the paths read: checkpoint order, fragment order,
    fragment order of the row-shifted scales and its row scales."""

    def __init__(self, w):
        self.w = w
        self.frag, self.shift_frag, self.row_scale = {}, {}, {}
        for op, blocks, scales in (("w13", w.w13_blocks, w.w13_scales), ("w2", w.w2_blocks, w.w2_scales)):
            self.set_scales(op, blocks, scales)

    def set_scales(self, op: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        setattr(self, op + "_scales", scales)
        problem = prototype_row_shift.row_shift_problem(blocks, scales)
        if problem:
            raise ValueError(f"probe_sm90_place: {op}: {problem}")
        shifted, self.row_scale[op] = prototype_row_shift.shift_rows_into_range(scales)
        self.frag[op] = to_fragment_order(blocks, scales) if not fragment_layout.fragment_order_problem(scales) \
            else None
        self.shift_frag[op] = to_fragment_order(blocks, shifted)


def launch(path: str, config: MatmulConfig, op: str, ws: Weights, x: torch.Tensor, meta, compute_dtype):
    """A closure running one path's launch of `op` (w13 + SwiGLU from tokens x, or w2 + routing
    weight + atomic combine from w13's output x). Where Gluon cannot run (off Hopper), the Triton
    kernel on what the path reads: its checkpoint order (fragments rebuilt back) and channel scale."""
    w = ws.w
    blocks = w.w13_blocks if op == "w13" else w.w2_blocks
    scales, bias = getattr(ws, op + "_scales"), (w.w13_bias if op == "w13" else w.w2_bias)
    fragments = ws.frag[op] if path == "rs" else ws.shift_frag[op] if path in SHIFT_PATHS else None
    channel_scale = ws.row_scale[op] if path in SHIFT_PATHS else None
    gluon = on_hopper(x.device)
    if path in GLUON_PATHS and not gluon:
        if fragments is not None:
            blocks, scales = from_fragment_order(fragments)
        config, fragments = None, None          # the Triton kernel's default (the interpreter's)
    kw = dict(channel_scale=channel_scale, compute_dtype=compute_dtype, config=config, fragments=fragments)

    def fn():
        if op == "w13":
            return moe_matmul(x, blocks, scales, bias, meta, swiglu=(w.swiglu_alpha, w.swiglu_limit), **kw)
        return moe_matmul(x, blocks, scales, bias, meta, gather=False, apply_row_weight=True, combine="atomic",
                          n_out=w.hidden, **kw)
    return with_rs_kernel(fn, cs_in_mma_kernel()) if path == "rs_shift_mma" and gluon else fn


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def column_diff(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Largest relative Frobenius difference of one output column (a weight row: what a row's
    shift scales), NaNs set aside, and whether out and ref have their NaNs in the same places."""
    same_nans = torch.equal(torch.isnan(out), torch.isnan(ref))
    o, r = (torch.nan_to_num(t.double(), nan=0.0) for t in (out, ref))
    worst = ((o - r).norm(dim=0) / r.norm(dim=0).clamp_min(1e-30)).max()
    return {"max_column_rel_diff": float(worst), "same_nans": same_nans,
            "nan_columns": int(torch.isnan(ref).any(0).sum())}


def routed(w, tokens: int, device, dtype, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, w.hidden, generator=gen, device=device).to(dtype)
    topk_w, topk_ids = route(x, w.router_weight, w.router_bias, w.top_k)
    block_m = pick_block_m(tokens * w.top_k, w.num_local_experts)
    return x, topk_w, topk_ids, routing_metadata(topk_ids, w.expert_map, w.num_local_experts, block_m, topk_w)


def time_point(ws: Weights, tokens: int, compute_dtype, timed: bool, reference: bool) -> list[dict]:
    """The rows of one (E, T): per op, each path's time (or error) and agreement with triton's output."""
    w = ws.w
    x, _, _, meta = routed(w, tokens, w.device, compute_dtype, seed=tokens)
    experts, rows = w.num_local_experts, meta.num_rows
    out_rows = []
    act = None
    for op, n, k in (("w13", 2 * w.inter_pad, w.hidden_pad), ("w2", w.hidden_pad, w.inter_pad)):
        inp = x if op == "w13" else act
        configs = path_configs(meta.block_m, n, k, op == "w13", rows, experts)
        row = {"experts": experts, "tokens": tokens, "op": op, "block_m": meta.block_m,
               "checkpoint_default": configs["sm90"][0].kernel if configs["sm90"][1] else "triton"}
        outs = {}
        for path in ("triton",) + GLUON_PATHS:
            config, is_default = configs[path]
            row[path + "_config"] = list(dataclasses.astuple(config))
            if path == "sm90":
                row["sm90_is_default"] = is_default
            if not on_hopper(inp.device) and path in GLUON_PATHS:
                row[path + "_ran_as"] = "triton (no Gluon off Hopper)"
            try:
                fn = launch(path, config, op, ws, inp, meta, compute_dtype)
                outs[path] = fn().float()
                if path != "triton":
                    row[path + "_rel_diff"] = rel_diff(outs[path], outs["triton"])
                    if not row[path + "_rel_diff"] <= SWEEP_AGREEMENT:
                        row[path + "_ms"] = f"disagrees with triton: {row[path + '_rel_diff']:.2e}"
                        continue
                if timed:
                    row[path + "_ms"] = time_graph(fn)
            except Exception as exc:            # a config this Triton or GPU refuses: reported, not fatal
                row[path + "_ms"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if reference and "triton" in outs:      # the harness itself: triton against the torch twin
            row["triton_rel_diff_reference"] = rel_diff(outs["triton"], _reference(op, ws, inp, meta, compute_dtype))
        if op == "w13":
            act = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=(w.swiglu_alpha, w.swiglu_limit),
                             compute_dtype=compute_dtype)
        out_rows.append(row)
    return out_rows


def _reference(op: str, ws: Weights, inp: torch.Tensor, meta, compute_dtype) -> torch.Tensor:
    """`reference_moe_matmul` (the torch twin) of the launch `launch` makes for `op`."""
    w = ws.w
    if op == "w13":
        return reference_moe_matmul(inp, w.w13_blocks, ws.w13_scales, w.w13_bias, meta,
                                    swiglu=(w.swiglu_alpha, w.swiglu_limit), compute_dtype=compute_dtype).float()
    return reference_moe_matmul(inp, w.w2_blocks, ws.w2_scales, w.w2_bias, meta, gather=False, apply_row_weight=True,
                                combine="atomic", n_out=w.hidden, compute_dtype=compute_dtype)


def extended_scale_check(ws: Weights, tokens: int, compute_dtype) -> dict:
    """At one (E, T): lift the scale bytes of an eighth of the rows of w13 and w2 (to row maxima
    up to 230, past the fragment layout's 128) and make one w2 byte NaN in a row of an expert
    with tokens; then rs_shift and rs_shift_mma against sm90 (checkpoint order, the kernel
    that runs such weights today) per output column, and triton beside them."""
    w = ws.w
    x, _, topk_ids, meta = routed(w, tokens, w.device, compute_dtype, seed=tokens)
    gen = torch.Generator(device=w.device).manual_seed(1)
    busy = int(torch.bincount(topk_ids.flatten(), minlength=w.num_local_experts).argmax())
    saved = {op: getattr(ws, op + "_scales") for op in ("w13", "w2")}
    result = {"experts": w.num_local_experts, "tokens": tokens, "block_m": meta.block_m}
    try:
        for op, blocks in (("w13", w.w13_blocks), ("w2", w.w2_blocks)):
            scales = saved[op].clone()
            lifted = torch.rand(scales.shape[:2], generator=gen, device=w.device) < 1 / 8
            lift = 230 - int(scales.max())
            scales[lifted] = (scales[lifted].to(torch.int16) + lift).to(torch.uint8)
            if op == "w2":
                scales[busy, 7, 0] = E8M0_NAN
            result[op + "_max_scale_byte"] = int(scales[scales != E8M0_NAN].max())
            result[op + "_fragment_order_problem"] = fragment_layout.fragment_order_problem(scales)
            ws.set_scales(op, blocks, scales)
        act = None
        for op, n, k in (("w13", 2 * w.inter_pad, w.hidden_pad), ("w2", w.hidden_pad, w.inter_pad)):
            inp = x if op == "w13" else act
            configs = path_configs(meta.block_m, n, k, op == "w13", meta.num_rows, w.num_local_experts)
            outs = {}
            for path in ("sm90", "triton") + SHIFT_PATHS:
                try:
                    outs[path] = launch(path, configs[path][0], op, ws, inp, meta, compute_dtype)()
                except Exception as exc:
                    result[f"{op}_{path}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            for path in SHIFT_PATHS + ("triton",):
                if path in outs and "sm90" in outs:
                    result[f"{op}_{path}_vs_sm90"] = column_diff(outs[path].float(), outs["sm90"].float())
            if op == "w13":
                act = torch.nan_to_num(outs.get("sm90", outs.get("triton")))
    finally:
        for op, blocks in (("w13", w.w13_blocks), ("w2", w.w2_blocks)):
            ws.set_scales(op, blocks, saved[op])
    return result


def _ms(row: dict, path: str) -> str:
    v = row.get(path + "_ms")
    if isinstance(v, float):
        return f"{v:.4f}" + ("*" if path == "sm90" and not row.get("sm90_is_default") else "")
    return "err" if v else "-"


def _ratio(row: dict, a: str, b: str) -> str:
    va, vb = row.get(a + "_ms"), row.get(b + "_ms")
    return f"{va / vb:.2f}" if isinstance(va, float) and isinstance(vb, float) else "-"


def markdown(header: dict, rows: list[dict], check: dict | None) -> str:
    lines = ["# Does the \"sm90\" kernel earn its place?", "",
             f"device: {header['device']}; torch {header['torch']}; triton {header['triton']}; commit "
             f"{header['commit']}", f"command: `{header['command']}`", f"shapes: {header['shapes']}", "",
             "GPU time in ms (CUDA-graph replay, L2 flushed, median). `ckpt default`: the kernel the "
             "checkpoint-order default runs (what a layer whose scales keep it out of fragment order runs "
             "today). `*`: an \"sm90\" config no default picks (SM90_SWAPPED). rs_shift: rs with the per-row "
             "epilogue scale that takes every scale byte into fragment order; rs_shift_mma: the same scale "
             "applied in the wgmma's layout (a kernel copy).", "",
             "| E | T | op | bm | ckpt default | sm90 | triton | rs | rs_shift | rs_shift_mma | triton/sm90 | "
             "sm90/rs | rs_shift/rs | rs_shift_mma/rs | sm90/rs_shift_mma |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['tokens']} | {r['op']} | {r['block_m']} | {r['checkpoint_default']} | "
                     + " | ".join(_ms(r, p) for p in PATHS) + " | "
                     + " | ".join(_ratio(r, a, b) for a, b in (("triton", "sm90"), ("sm90", "rs"), ("rs_shift", "rs"),
                                                               ("rs_shift_mma", "rs"), ("sm90", "rs_shift_mma")))
                     + " |")
    today = [r for r in rows if r["checkpoint_default"] == "sm90"]
    for a, b, what in (("triton", "sm90", "triton/sm90 (the loss if sm90 went and triton ran instead)"),
                       ("sm90", "rs_shift_mma", "sm90/rs_shift_mma (the gain if rs_shift_mma ran instead)")):
        ratios = [float(_ratio(r, a, b)) for r in today if _ratio(r, a, b) != "-"]
        if ratios:
            lines += ["", f"Where sm90 is the checkpoint-order default ({len(ratios)} launches): {what} "
                          f"{min(ratios):.2f}..{max(ratios):.2f}."]
    errors = [(r["experts"], r["tokens"], r["op"], p, r[p + "_ms"]) for r in rows for p in PATHS
              if isinstance(r.get(p + "_ms"), str)]
    if errors:
        lines += ["", "Not timed:", ""] + [f"- E={e} T={t} {op} {p}: {msg}" for e, t, op, p, msg in errors]
    if check:
        lines += ["", "Scale bytes past 128 (and one NaN): rs_shift(_mma) and triton against sm90, per output column:",
                  "",
                  "```", json.dumps(check, indent=1), "```"]
    return "\n".join(lines) + "\n"


def compile_only(args) -> int:
    """Compile for sm_90 (no GPU: `kernels/tools/sm90_report.py`) every distinct config the timing run
    launches at these points; rs_shift(_mma) is rs with HAS_CHANNEL_SCALE (and the kernel copy)."""
    from mxfp4_moe.kernels.tools import sm90_report
    launcher = importlib.import_module("mxfp4_moe.kernels.moe_matmul")     # the module, not its function
    seen, failed = set(), 0
    for experts in args.experts:
        for tokens in args.tokens:
            rows = tokens * args.top_k
            block_m = pick_block_m(rows, experts)
            for op, n, k in (("w13", 2 * args.inter, args.hidden), ("w2", args.hidden, args.inter)):
                for path, (config, _) in path_configs(block_m, n, k, op == "w13", rows, experts).items():
                    key = (path if path in SHIFT_PATHS else "", config, op)
                    if key in seen:
                        continue
                    seen.add(key)
                    line = {"path": path, "op": op, "E": experts, "T": tokens, "config": dataclasses.astuple(config)}
                    try:
                        with _channel_scale(launcher, path in SHIFT_PATHS):
                            compiled = sm90_report.compile_variant(
                                config, k=k, n=n, swiglu=op == "w13", atomic=op == "w2",
                                rs_kernel=cs_in_mma_kernel() if path == "rs_shift_mma" else None)
                        report = sm90_report.resource_report(compiled, config)
                        line.update({key: report[key] for key in ("registers", "local_bytes", "shared_bytes",
                                                                  "loop_instructions", "in_flight_overwrites")})
                    except Exception as exc:
                        failed += 1
                        line["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                    print(json.dumps(line), flush=True)
    return 1 if failed else 0


@contextlib.contextmanager
def _channel_scale(launcher, on: bool):
    """While on, `sm90_report.compile_variant` compiles the "rs" kernel with HAS_CHANNEL_SCALE
    (it takes its tiling constexprs from `moe_matmul.rs_constexprs`, at call time)."""
    if not on:
        yield
        return
    plain = launcher.rs_constexprs
    launcher.rs_constexprs = lambda *a, **kw: {**plain(*a, **kw), "HAS_CHANNEL_SCALE": True}
    try:
        yield
    finally:
        launcher.rs_constexprs = plain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=None, help="default 128 32 (--tiny: 8)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="default 1 8 32 128 512 2048 8192 (--tiny: 1 8 33)")
    p.add_argument("--hidden", type=int, default=None, help="H (default 2880, --tiny 64)")
    p.add_argument("--inter", type=int, default=None, help="I (default 2880, --tiny 64)")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--check-point", default=None,
                   help="E:T of the scale-bytes-past-128 check (default 32:512, a 64-row tile; --tiny: 8:33); "
                        "'none' skips it")
    p.add_argument("--tiny", action="store_true",
                   help="small shapes; off a GPU (TRITON_INTERPRET=1) a check of the harness: float32, the Gluon "
                        "paths as the Triton kernel, no times")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the configs the run launches for sm_90 on this machine (no GPU) and exit")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/out")),
                   help="folder for probe_sm90_place.json and .md (default $OUT, else benchmarks/out)")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.experts = args.experts or ([8] if tiny else [128, 32])
    args.tokens = args.tokens or ([1, 8, 33] if tiny else [1, 8, 32, 128, 512, 2048, 8192])
    args.hidden = args.hidden or (64 if tiny else 2880)
    args.inter = args.inter or (64 if tiny else 2880)
    args.check_point = args.check_point or ("8:33" if tiny else "32:512")
    if args.compile_only:
        return compile_only(args)
    cuda = torch.cuda.is_available()
    if not cuda and not interpreting():
        print("probe_sm90_place needs a CUDA GPU, or TRITON_INTERPRET=1 (with --tiny) for a check of the harness",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    compute_dtype = torch.bfloat16 if cuda and not interpreting() else torch.float32
    timed = cuda and not interpreting()
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or 'interpreter'})",
              "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(),
              "command": "python -m benchmarks.probes.probe_sm90_place " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv),
              "shapes": f"H = {args.hidden}, I = {args.inter}, top-{args.top_k}, {str(compute_dtype)[6:]}",
              "gluon": on_hopper(device), "timed": timed}
    print(json.dumps(header), flush=True)
    rows, check = [], None
    check_e, check_t = (None, None) if args.check_point == "none" else map(int, args.check_point.split(":"))
    json_path = args.out / "probe_sm90_place.json"
    for experts in args.experts:
        w, _ = random_expert_weights(experts, args.hidden, args.inter, top_k=args.top_k, seed=experts, device=device,
                                     dense=False)
        ws = Weights(w)
        for tokens in args.tokens:
            for row in time_point(ws, tokens, compute_dtype, timed, reference=not timed):
                record(row, rows, json_path, header)
        if experts == check_e:
            check = extended_scale_check(ws, check_t, compute_dtype)
            print(json.dumps(check), flush=True)
        del ws, w
        if cuda:
            torch.cuda.empty_cache()
    json_path.write_text(json.dumps({"header": header, "rows": rows, "extended_scale_check": check}, indent=1))
    md = markdown(header, rows, check)
    (args.out / "probe_sm90_place.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
