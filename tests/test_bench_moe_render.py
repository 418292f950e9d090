"""The roofline floor and the triton_kernels comparison of benchmarks/bench_moe.py, on CPU: its
floor reproduces the anchors' README table (benchmarks/RESULTS.md 3.1) from that run's times,
and bench_tk.py's tk_results.json is read as that script writes it."""

import json

import pytest

from benchmarks import bench_moe

# The ceilings of the README's run: read 4.48 TB/s; "687 TFLOP/s" rounded from a rate that puts
# the T = 8192 w13 floor at 1583 us (687.0 would give 1582).
CEILINGS = {"read_GBps": 4480.0, "bf16_matmul_TFLOPs": 686.8,
            "read_by_size": [{"MiB": 35, "GBps": 2350.0}, {"MiB": 4096, "GBps": 4480.0}]}
HEADER = {"device": "NVIDIA H200", "ceilings": CEILINGS, "shape": {"hidden": 2880, "inter": 2880, "top_k": 4}}
W13_BYTES = bench_moe.mxfp4_weight_bytes(2 * 2880, 2880)
W2_BYTES = bench_moe.mxfp4_weight_bytes(2880, 2880)


def flops(op, tokens):
    return 2 * tokens * 4 * (2 * 2880 if op == "w13" else 2880) * 2880


def bench_row(experts, tokens, hit, w13_us, w2_us):
    """A row of out_moe.json with the fields the roofline table reads, as bench_point fills them."""
    row = {"experts": experts, "tokens": tokens, "experts_hit": hit}
    for op, us, per_expert in (("w13", w13_us, W13_BYTES), ("w2", w2_us, W2_BYTES)):
        row[op] = {"ms": us * 1e-3, "flops": flops(op, tokens),
                   "floor_ms": bench_moe.roofline_floor_ms(hit * per_expert, flops(op, tokens), CEILINGS)}
    row["layer"] = {"ms": (w13_us + w2_us) * 1e-3,
                    "floor_ms": bench_moe.roofline_floor_ms(hit * (W13_BYTES + W2_BYTES),
                                                            flops("w13", tokens) + flops("w2", tokens), CEILINGS)}
    return row


def tk_entry(tokens, kernel, op, hit, us):
    """One entry of bench_tk.py's results list, as its record() writes it."""
    ms = us * 1e-3
    per_expert = W13_BYTES if op == "w13" else W2_BYTES
    return {"T": tokens, "kernel": kernel, "ms": ms * 1.1, "ms_graph": ms, "tflops": None,
            "gbs": None, "gbs_graph": None, "tflops_graph": flops(op, tokens) / (ms * 1e-3) / 1e12,
            "wbytes_MB": hit * per_expert / 1e6, "note": "", "relerr": None}


def write_tk_json(path, entries):
    path.write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11", "triton": "3.6.0", "results": entries}))
    return path


def test_mxfp4_weight_bytes_is_codes_plus_scales():
    # w13 of one gpt-oss expert: 5760 x 2880 E2M1 codes at 2 a byte, one E8M0 byte per 32
    assert W13_BYTES == 5760 * 2880 // 2 + 5760 * 2880 // 32 == 8_812_800


@pytest.mark.parametrize("experts, tokens, hit, w13_floor, w2_floor", [
    (128, 1, 4, "7.9", "3.9"),          # weight-bound, one token's 4 experts
    (32, 8, 20, "39.3", "19.7"),        # weight-bound, 20 of 32 experts hit
    (32, 512, 32, "98.9", "49.5"),      # FLOP-bound already at E = 32
    (128, 8192, 128, "1583", "791"),    # FLOP-bound
])
def test_floor_matches_anchor_readme(experts, tokens, hit, w13_floor, w2_floor):
    row = bench_row(experts, tokens, hit, 100.0, 100.0)
    assert bench_moe.fmt_us(row["w13"]["floor_ms"]) == w13_floor
    assert bench_moe.fmt_us(row["w2"]["floor_ms"]) == w2_floor


def test_table_with_triton_kernels_matches_anchor_readme(tmp_path):
    results = [bench_row(128, 1, 4, 24.6, 15.6), bench_row(128, 8192, 128, 2205, 1117),
               bench_row(32, 8, 20, 74.3, 42.0)]
    tk128 = write_tk_json(tmp_path / "tk128.json", [
        {**tk_entry(1, "routing(topk+meta)", "w13", 4, 9.0), "ms_graph": None, "wbytes_MB": None},
        tk_entry(1, "mx_w13_gather(w4)", "w13", 4, 20.0),           # no SwiGLU: not our w13
        tk_entry(1, "mx_w13_gather_swiglu(w4)", "w13", 4, 31.6),
        tk_entry(1, "mx_w2_scatter(w4)", "w2", 4, 40.4),
        tk_entry(1, "mx_w2_noscatter(w4)", "w2", 4, 10.0),          # no top-k reduce: not our w2
        tk_entry(8192, "mx_w13_gather_swiglu(w8)", "w13", 128, 2463),
        tk_entry(8192, "mx_w13_gather_swiglu(w4)", "w13", 128, 2600),  # --alt-warps: the faster counts
        tk_entry(8192, "mx_w2_scatter(w8)", "w2", 128, 1651)])
    tk32 = write_tk_json(tmp_path / "tk32.json", [
        tk_entry(8, "mx_w13_gather_swiglu(w4)", "w13", 20, 78.1), tk_entry(8, "mx_w2_scatter(w4)", "w2", 20, 66.5)])
    tk = {e: bench_moe.load_tk_results(p, e) for e, p in ((128, tk128), (32, tk32))}
    header = dict(HEADER)
    bench_moe.attach_tk(results, header, tk)
    assert results[0]["triton_kernels"]["w13"]["kernel"] == "mx_w13_gather_swiglu(w4)"
    assert results[1]["triton_kernels"]["w13"]["kernel"] == "mx_w13_gather_swiglu(w8)"
    assert results[0]["triton_kernels"]["w2"]["speedup"] == pytest.approx(40.4 / 15.6)
    rows = [line for line in bench_moe.roofline_table(results, header) if line[:3] in ("| 1", "| 3")]
    assert rows == [
        "| 128 | 1 | 4 | 7.9 | 24.6 (32%) | 31.6 (25%) | 1.28 | 3.9 | 15.6 (25%) | 40.4 (10%) | 2.59 |",
        "| 128 | 8192 | 128 | 1583 | 2205 (72%) | 2463 (64%) | 1.12 | 791 | 1117 (71%) | 1651 (48%) | 1.48 |",
        "| 32 | 8 | 20 | 39.3 | 74.3 (53%) | 78.1 (50%) | 1.05 | 19.7 | 42.0 (47%) | 66.5 (30%) | 1.58 |"]


def test_tk_routing_that_hits_other_experts_gets_its_own_floor(tmp_path):
    # at E = 128, T = 8 (32 rows) two random routings rarely hit the same number of experts
    results = [bench_row(128, 8, 30, 98.9, 61.7)]
    path = write_tk_json(tmp_path / "tk.json", [tk_entry(8, "mx_w13_gather_swiglu(w4)", "w13", 29, 96.5)])
    header = dict(HEADER)
    bench_moe.attach_tk(results, header, {128: bench_moe.load_tk_results(path, 128)})
    row = bench_moe.roofline_table(results, header)[-1]
    # ours: 30 experts, floor 59.0; tk: its 29 experts, floor 57.0 (the README's 59%); no tk w2
    assert row == "| 128 | 8 | 30 / 29 | 59.0 | 98.9 (60%) | 96.5 (59%) | 0.98 | 29.5 | 61.7 (48%) | - | - |"


def test_tk_json_at_other_shapes_is_refused(tmp_path):
    entry = tk_entry(1, "mx_w13_gather_swiglu(w4)", "w13", 4, 31.6)
    path = write_tk_json(tmp_path / "tk.json", [{**entry, "wbytes_MB": entry["wbytes_MB"] * 1.1}])  # H = 3168
    with pytest.raises(ValueError, match="experts of 8812800 bytes"):
        bench_moe.load_tk_results(path, 128)
    path = write_tk_json(tmp_path / "tk.json", [{**entry, "tflops_graph": entry["tflops_graph"] * 2}])  # top-8
    with pytest.raises(ValueError, match="FLOPs"):
        bench_moe.load_tk_results(path, 128)


@pytest.mark.parametrize("spec", ["tk.json", "E=tk.json", "128="])
def test_tk_spec_needs_the_expert_count(spec):
    with pytest.raises(ValueError, match="E=PATH"):
        bench_moe.parse_tk_spec(spec)


def full_row(experts, tokens, hit, w13_us, w2_us):
    """bench_row plus the fields of the report's "All figures" table, as bench_point fills them."""
    row = bench_row(experts, tokens, hit, w13_us, w2_us)
    config = {"block_m": 16, "block_n": 64, "block_k": 128, "swap_ab": True, "num_warps": 4, "num_stages": 4,
              "kernel": "rs", "prefetch": 3}
    for op in ("w13", "w2"):
        row[op]["roofline_frac"] = row[op]["floor_ms"] / row[op]["ms"]
        row[op + "_best"] = {"ms": row[op]["ms"], "config": config}
    row["layer"].update(eager_ms=0.5, TFLOPs=4.0, weight_GBps=975.0)
    row.update(block_m=16, w2_slots_ms=0.034, grouped_mm_bf16={"speedup_w13": 2.88, "speedup_w2": 2.79})
    return row


def test_report_compares_with_triton_kernels_once_and_from_the_same_run(tmp_path):
    # The report's only triton_kernels figures are the ones attached from the same call's
    # tk_results.json (the roofline table); the "All figures" table carries none: a stored
    # triton_kernels time from another card and run under the same heading would read as a
    # same-run comparison.
    results = [full_row(128, 1, 4, 24.6, 15.6)]
    path = write_tk_json(tmp_path / "tk.json", [tk_entry(1, "mx_w13_gather_swiglu(w4)", "w13", 4, 31.6),
                                                tk_entry(1, "mx_w2_scatter(w4)", "w2", 4, 40.4)])
    header = {**HEADER, "torch": "2.11", "triton": "3.6.0", "commit": "2911932", "command": "bench_moe"}
    bench_moe.attach_tk(results, header, {128: bench_moe.load_tk_results(path, 128)})
    md = bench_moe.markdown(results, header)
    tables = [[line for line in part.splitlines() if line.startswith("| E |")] for part in md.split("\n## ")[1:]]
    roofline, figures = tables
    assert roofline == ["| E | T | hit | w13 floor | ours w13 | tk w13 | w13 x | w2 floor | ours w2 | tk w2 | w2 x |"]
    (figures_header,) = figures
    assert not [cell for cell in figures_header.split("|") if cell.strip().startswith("tk")], figures_header
    assert "H100" not in md
    assert "| 128 | 1 | 4 | 7.9 | 24.6 (32%) | 31.6 (25%) | 1.28 | 3.9 | 15.6 (25%) | 40.4 (10%) | 2.59 |" in md
    assert "| 128 | 1 | 16 | 4 | 0.025 | 0.32 | 2.88 | 0.025 | nan | 0.016 | 0.25 | 2.79 | 0.016 | nan | 0.034 |" in md
