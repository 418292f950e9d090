"""The Triton grouped MXFP4 matmul against its torch twin, on the CPU through TRITON_INTERPRET
(conftest sets it before this module imports the kernels), plus an sm_90 compile check.

Tolerances (relative Frobenius error, ||out - ref|| / ||ref||): float32 compute 1e-5 (same
operands, float32 sums in another order); float16 compute 2e-3 (x and the SwiGLU output rounded
to fp16, ~2**-11 each). Decoding of codes and scales is checked exactly, for each dequantization
path the interpreter runs ("bytes", "words") and, through a small interpreter of the PTX subset it
uses, for the inline-PTX path's program text (its run on the GPU: tests/test_kernels_on_gpu.py).
"""

import json
import re

import numpy as np
import pytest
import torch
from compile_script import run_compiler_script

from mxfp4_moe import mxfp4
from mxfp4_moe.kernels.moe_matmul import moe_matmul, pick_block_m
from mxfp4_moe.synthetic import random_expert_weights
from mxfp4_moe.reference import reference_moe_matmul
from mxfp4_moe.routing import routing_metadata

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output: an element was not written"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _routing(tokens, num_experts, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen)
    top_v, top_i = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top_v, -1), top_i


CASES = [
    # id, E, H, I, H_pad, I_pad, T, k, dtype
    pytest.param(4, 64, 64, 64, 64, 7, 2, torch.float32, id="unpadded-T7-fp32"),
    pytest.param(4, 96, 64, 128, 96, 33, 4, torch.float16, id="padded-H-and-I-T33-fp16"),
    pytest.param(8, 128, 96, 128, 128, 1, 4, torch.float32, id="decode-T1-most-experts-empty"),
    pytest.param(8, 256, 128, 256, 128, 33, 2, torch.float16, id="H256-T33-fp16"),
]


@pytest.mark.parametrize("E,H,I,H_pad,I_pad,T,k,dtype", CASES)
def test_w13_swiglu_then_w2_combine(E, H, I, H_pad, I_pad, T, k, dtype, nan_like):
    weights, _ = random_expert_weights(E, H, I, hidden_pad=H_pad, inter_pad=I_pad, top_k=k, seed=T + E)
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=gen).to(dtype)
    topk_w, topk_ids = _routing(T, E, k, seed=T)
    meta = routing_metadata(topk_ids, weights.expert_map, E, pick_block_m(T * k, E), topk_w)
    local = int(meta.expert_offsets[-1])
    swiglu = (weights.swiglu_alpha, weights.swiglu_limit)
    args13 = (weights.w13_blocks, weights.w13_scales, weights.w13_bias, meta)
    act = nan_like(torch.empty(T * k, I_pad, dtype=dtype))
    act = moe_matmul(x, *args13, swiglu=swiglu, compute_dtype=dtype, out=act)
    act_ref = reference_moe_matmul(x, *args13, swiglu=swiglu, compute_dtype=dtype)
    assert rel_err(act[:local], act_ref[:local]) < TOL[dtype]
    args2 = (weights.w2_blocks, weights.w2_scales, weights.w2_bias, meta)
    for combine in ("atomic", "slots"):
        y = moe_matmul(act, *args2, gather=False, apply_row_weight=True, combine=combine, n_out=H,
                       compute_dtype=dtype)
        y_ref = reference_moe_matmul(act_ref, *args2, gather=False, apply_row_weight=True, combine=combine,
                                     n_out=H, compute_dtype=dtype)
        assert y.shape == (T, H) and y.dtype == torch.float32
        assert rel_err(y, y_ref) < TOL[dtype], combine
    # "atomic" adds into a given out (the layer zeroes its sums before routing): here one holding
    # a random start, which must come back plus the sums, in the same tensor.
    start = torch.randn(T, H, generator=gen)
    out = start.clone()
    y = moe_matmul(act, *args2, gather=False, apply_row_weight=True, combine="atomic", n_out=H,
                   compute_dtype=dtype, out=out)
    assert y is out
    assert rel_err(y - start, reference_moe_matmul(act_ref, *args2, gather=False, apply_row_weight=True,
                                                   combine="atomic", n_out=H, compute_dtype=dtype)) < TOL[dtype]
    with pytest.raises(ValueError, match="out"):
        moe_matmul(act, *args2, gather=False, apply_row_weight=True, combine="atomic", n_out=H,
                   compute_dtype=dtype, out=torch.zeros(T, H, dtype=torch.float64))


@pytest.mark.parametrize("tokens", [0, 1], ids=["T0", "T1"])
def test_tiny_token_counts(tokens):
    weights, _ = random_expert_weights(4, 64, 64, top_k=2, seed=3)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(3))
    topk_w, topk_ids = _routing(tokens, 4, 2, seed=3)
    meta = routing_metadata(topk_ids, None, 4, 16, topk_w)
    y = moe_matmul(x, weights.w2_blocks, weights.w2_scales, weights.w2_bias, meta, apply_row_weight=True,
                   combine="atomic", compute_dtype=torch.float32)
    y_ref = reference_moe_matmul(x, weights.w2_blocks, weights.w2_scales, weights.w2_bias, meta,
                                 apply_row_weight=True, combine="atomic", compute_dtype=torch.float32)
    assert y.shape == (tokens, 64)
    if tokens:
        assert rel_err(y, y_ref) < TOL[torch.float32]


def test_all_tokens_to_one_expert_with_channel_scales():
    # 40 rows on expert 2 (three 16-row tiles, the last partial), others empty; per-channel scales.
    weights, _ = random_expert_weights(4, 64, 64, top_k=1, seed=11, channel_scales=True)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(11))
    meta = routing_metadata(torch.full((40, 1), 2), None, 4, 16, torch.ones(40, 1))
    kw = dict(channel_scale=weights.w13_channel_scale, swiglu=(1.702, 7.0), compute_dtype=torch.float32)
    args = (weights.w13_blocks, weights.w13_scales, weights.w13_bias, meta)
    out = torch.full((40, 64), float("nan"))
    act = moe_matmul(x, *args, out=out, **kw)
    assert rel_err(act, reference_moe_matmul(x, *args, **kw)) < TOL[torch.float32]


def test_expert_parallel_rows_dropped():
    # This rank holds global experts 1 and 3 of 4: pairs routed to 0 and 2 must not appear.
    weights, _ = random_expert_weights(4, 64, 64, top_k=2, local_experts=[1, 3], seed=2)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    topk_w, topk_ids = _routing(9, 4, 2, seed=2)
    meta = routing_metadata(topk_ids, weights.expert_map, 2, 16, topk_w)
    args = (weights.w2_blocks, weights.w2_scales, weights.w2_bias, meta)
    kw = dict(apply_row_weight=True, combine="atomic", compute_dtype=torch.float32)
    y = moe_matmul(x, *args, **kw)
    assert rel_err(y, reference_moe_matmul(x, *args, **kw)) < TOL[torch.float32]
    all_remote = ~(weights.expert_map.long()[topk_ids] >= 0).any(-1)
    assert torch.equal(y[all_remote], torch.zeros_like(y[all_remote]))


@pytest.mark.parametrize("dequant", ["bytes", "words"])
def test_decode_every_code_and_scale_exactly(dequant):
    # One expert, K = 32 inputs x N = 256 rows; row n holds all 16 codes twice (each row in its own
    # order, so a code lands in every position of a word) and scale byte n (0..240: the kernel's
    # decode range) or 0xFF (NaN). x = identity, so y = dequant(W).T exactly.
    n_rows = 256
    gen = torch.Generator().manual_seed(5)
    codes = torch.stack([torch.arange(32, dtype=torch.uint8).remainder(16)[torch.randperm(32, generator=gen)]
                         for _ in range(n_rows)])
    scales = torch.arange(n_rows, dtype=torch.int32).clamp(max=240).to(torch.uint8)
    scales[-1] = mxfp4.E8M0_NAN
    blocks = mxfp4.pack_e2m1(codes).reshape(1, n_rows, 16)
    scales = scales.reshape(1, n_rows, 1)
    meta = routing_metadata(torch.zeros(32, 1, dtype=torch.int64), None, 1, 32)
    y = moe_matmul(torch.eye(32), blocks, scales, None, meta, compute_dtype=torch.float32,
                   config=None, dequant=dequant)
    expected = mxfp4.dequantize(blocks[0], scales[0], torch.float32).T          # [32, 256]
    assert torch.equal(y[:, :-1], expected[:, :-1])
    assert bool(torch.isnan(y[:, -1]).all())


def test_words_path_end_to_end_padded_fp16():
    # The uint32-word decode ("words", the interpreter's twin of the GPU's "ptx") through w13 +
    # SwiGLU and w2 + combine, padded H and I, against the torch twin.
    E, H, I, H_pad, I_pad, T, k, dtype = 4, 96, 64, 128, 96, 33, 4, torch.float16
    weights, _ = random_expert_weights(E, H, I, hidden_pad=H_pad, inter_pad=I_pad, top_k=k, seed=17)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(17)).to(dtype)
    topk_w, topk_ids = _routing(T, E, k, seed=17)
    meta = routing_metadata(topk_ids, weights.expert_map, E, pick_block_m(T * k, E), topk_w)
    local = int(meta.expert_offsets[-1])
    swiglu = (weights.swiglu_alpha, weights.swiglu_limit)
    args13 = (weights.w13_blocks, weights.w13_scales, weights.w13_bias, meta)
    act = moe_matmul(x, *args13, swiglu=swiglu, compute_dtype=dtype, dequant="words")
    act_ref = reference_moe_matmul(x, *args13, swiglu=swiglu, compute_dtype=dtype)
    assert rel_err(act[:local], act_ref[:local]) < TOL[dtype]
    args2 = (weights.w2_blocks, weights.w2_scales, weights.w2_bias, meta)
    kw2 = dict(gather=False, apply_row_weight=True, combine="atomic", n_out=H, compute_dtype=dtype)
    y = moe_matmul(act, *args2, dequant="words", **kw2)
    assert rel_err(y, reference_moe_matmul(act_ref, *args2, **kw2)) < TOL[dtype]


# ---- the inline-PTX decode's program, run on the CPU ---------------------------------------------

def _prmt(a, b, sel):
    """PTX prmt.b32 default mode: byte i of the result is byte (sel nibble i & 7) of {b, a}, or
    that byte's bit 7 replicated when the nibble's bit 3 is set."""
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros(a.shape, np.uint32)
    for i in range(4):
        nib = (sel >> np.uint32(4 * i)) & np.uint32(0xF)
        shift = (np.uint64(8) * (nib & np.uint32(7)).astype(np.uint64))
        byte = ((src >> shift) & np.uint64(0xFF)).astype(np.uint32)
        replicated = np.where(byte >> np.uint32(7) == 1, np.uint32(0xFF), np.uint32(0))
        out |= np.where(nib & np.uint32(8) != 0, replicated, byte) << np.uint32(8 * i)
    return out


def _lop3(a, b, c, lut):
    """PTX lop3.b32: bit i of the result is bit (a_i b_i c_i as a 3-bit number) of lut."""
    out = np.zeros(a.shape, np.uint32)
    for index in range(8):
        if (lut >> index) & 1:
            out |= ((a if index & 4 else ~a) & (b if index & 2 else ~b) & (c if index & 1 else ~c))
    return out


def _mul_bf16x2(a, b):
    """PTX mul.rn.bf16x2 (subnormals kept): each 16-bit half multiplied, rounded to nearest even."""
    def half(x, shift):
        bits = ((x >> np.uint32(shift)) & np.uint32(0xFFFF)).astype(np.uint16).view(np.int16)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16).double()
    out = np.zeros(a.shape, np.uint32)
    for shift in (0, 16):
        prod = (half(a, shift) * half(b, shift)).to(torch.bfloat16).view(torch.int16).numpy()
        out |= prod.view(np.uint16).astype(np.uint32) << np.uint32(shift)
    return out


def run_ptx(program: str, operands: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Run straight-line PTX made of mov/shl/shr/and/lop3/prmt .b32 and mul.rn.bf16x2 on uint32
    arrays; operands {i: array} are the asm's $i. Returns every register after the run."""
    shape = next(iter(operands.values())).shape
    regs = {f"${i}": v.astype(np.uint32) for i, v in operands.items()}

    def value(token):
        return regs[token] if token in regs else np.full(shape, int(token, 0), np.uint32)
    for line in program.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [t.strip() for t in rest.split(",")]
        v = [value(t) for t in src]
        regs[dst] = {
            "mov.b32": lambda: v[0],
            "shl.b32": lambda: v[0] << v[1],
            "shr.b32": lambda: v[0] >> v[1],
            "and.b32": lambda: v[0] & v[1],
            "lop3.b32": lambda: _lop3(v[0], v[1], v[2], int(src[3], 0)),
            "prmt.b32": lambda: _prmt(v[0], v[1], v[2]),
            "mul.rn.bf16x2": lambda: _mul_bf16x2(v[0], v[1]),
        }[op]().astype(np.uint32)
    return regs


def test_ptx_program_decodes_every_code_and_scale_bit_exactly():
    # The inline-PTX program as the kernel calls it: x_a = word, x_b = word >> 4, both halves of
    # $6 the bf16 scale 2 ** (b - 127); outputs $0..$3 = codes (0,1), (2,3), (4,5), (6,7).
    # Words: every code in every nibble (random words plus 0x76543210 / 0xFEDCBA98) x scale bytes
    # 0..240 (the decode range) and 0xFF; bf16 bit patterns compared (so -0.0 too).
    from mxfp4_moe.kernels._moe_matmul import _E2M1_BF16_PTX
    program = getattr(_E2M1_BF16_PTX, "value", _E2M1_BF16_PTX)
    rng = np.random.default_rng(0)
    scale_bytes = np.repeat(np.append(np.arange(241), mxfp4.E8M0_NAN).astype(np.uint32), 16)
    words = rng.integers(0, 1 << 32, size=scale_bytes.shape, dtype=np.uint64).astype(np.uint32)
    words[::16], words[1::16] = 0x76543210, 0xFEDCBA98
    exp_bits = np.where(scale_bytes == 0, 1 << 6, scale_bytes << 7)               # bf16 2 ** (b - 127)
    exp_bits = np.where(scale_bytes == mxfp4.E8M0_NAN, 0x7FC0, exp_bits).astype(np.uint32)
    regs = run_ptx(program, {4: words, 5: words >> np.uint32(4), 6: exp_bits | (exp_bits << np.uint32(16))})
    out = np.stack([regs[f"${t}"] for t in range(4)], axis=1)                     # [n, 4] bf16 pairs
    got = torch.from_numpy(np.stack([out & 0xFFFF, out >> 16], axis=2).reshape(-1, 8).astype(np.uint16)
                           .view(np.int16).copy()).view(torch.bfloat16)
    codes = np.stack([(words >> np.uint32(4 * i)) & 0xF for i in range(8)], axis=1)
    values = mxfp4.e2m1_lut(dtype=torch.float64)[torch.from_numpy(codes.astype(np.int64))]
    scale = torch.pow(2.0, torch.from_numpy(scale_bytes.astype(np.float64)) - mxfp4.E8M0_BIAS)
    expected = (values * scale[:, None]).to(torch.bfloat16)
    finite = torch.from_numpy(scale_bytes != mxfp4.E8M0_NAN)
    assert torch.equal(got[finite].view(torch.int16), expected[finite].view(torch.int16))
    assert bool(torch.isnan(got[~finite]).all())


def test_bad_arguments_raise():
    weights, _ = random_expert_weights(4, 64, 64, top_k=2, seed=0)
    meta = routing_metadata(torch.zeros(3, 2, dtype=torch.int64), None, 4, 16)
    with pytest.raises(ValueError, match="w13|blocks|scales"):
        moe_matmul(torch.randn(3, 64), weights.w13_blocks, weights.w2_scales, None, meta)
    with pytest.raises(ValueError, match="compute_dtype"):
        moe_matmul(torch.randn(3, 64), weights.w2_blocks, weights.w2_scales, None, meta, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="more than the weights' K"):
        moe_matmul(torch.randn(3, 96), weights.w2_blocks, weights.w2_scales, None, meta)
    with pytest.raises(ValueError, match="dequant"):
        moe_matmul(torch.randn(3, 64), weights.w2_blocks, weights.w2_scales, None, meta, dequant="nibbles")
    with pytest.raises(ValueError, match="ptx"):      # inline PTX: bf16 on a GPU only
        moe_matmul(torch.randn(3, 64), weights.w2_blocks, weights.w2_scales, None, meta,
                   compute_dtype=torch.float32, dequant="ptx")
    odd_rows = torch.zeros(4, 64, 34, dtype=torch.uint8)[:, :, :32]      # row stride 34 bytes
    with pytest.raises(ValueError, match="4-byte words"):
        moe_matmul(torch.randn(3, 64), odd_rows, weights.w2_scales, None, meta,
                   compute_dtype=torch.float32, dequant="words")


def test_compiles_for_sm90_without_spills():
    # Ahead-of-time compile for the H100 (no GPU needed), every default config: HGMMA present,
    # no local memory; the K loop at most 8 SASS instructions per weight element (the inline-PTX
    # decode: 5.3-7.1; one code at a time it was 10.5-12.3, the loop then bound by issue slots).
    stdout = run_compiler_script("-m", "mxfp4_moe.kernels.tools.sm90_report")
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    from mxfp4_moe.kernels.tools.sm90_report import VARIANTS
    names = [r["variant"] for r in reports]
    assert [n for n in names if not n.endswith(("_sm90", "_rs", "_rs_few"))] == [v[0] for v in VARIANTS]
    gluon = [r for r in reports if r["config"]["kernel"] == "sm90"]    # the Hopper defaults from 64 rows up
    assert [r["variant"] for r in gluon] == [v[0] + "_sm90" for v in VARIANTS if v[3] >= 64]    # every default config of the gpt-oss shapes
    # With fragment order, the "rs" kernel at every tile size (and its few-rows configs at 16 rows).
    assert [n for n in names if n.endswith("_rs")] == [v[0] + "_rs" for v in VARIANTS]
    assert [n for n in names if n.endswith("_rs_few")] == [v[0] + "_rs_few" for v in VARIANTS if v[3] == 16]
    for rep in reports:
        # No register a wgmma may still read is written by the next K step (triton#9433).
        assert rep["pending_at_back_edge"] == 0 and rep["in_flight_overwrites"] == 0, rep
        assert rep["hgmma"] > 0, rep
        assert rep["local_bytes"] == 0 and rep["local_mem_ops"] == 0 and rep["stack_bytes"] == 0, rep
        assert rep["registers"] <= 255, rep
        assert rep["dequant"] == "ptx" and rep["instructions_per_element"] <= 8.0, rep


def test_gluon_configs_of_the_gpu_tests_compile_for_sm90():
    # The GPU tests run the Gluon kernels at non-default configs too (swapped operands, 256-wide
    # tiles, the fragment-order kernel); GPU time is scarce, so an edit that breaks one of them
    # should fail here first: every one compiles for sm_90, w13 (SwiGLU) and w2 (atomic
    # combine), without local memory.
    from test_kernels_on_gpu import RS_CONFIGS, SM90_CONFIGS
    configs = SM90_CONFIGS + RS_CONFIGS
    script = (
        "import json, sys\n"
        "from mxfp4_moe.kernels.tools.sm90_report import compile_variant, resource_report\n"
        "from mxfp4_moe.kernels.moe_matmul import MatmulConfig\n"
        "for fields in json.loads(sys.argv[1]):\n"
        "    cfg = MatmulConfig(*fields)\n"
        "    for n, swiglu in ((5760, True), (2880, False)):\n"
        "        rep = resource_report(compile_variant(cfg, k=2880, n=n, swiglu=swiglu, atomic=not swiglu), cfg)\n"
        "        print(json.dumps({'config': fields, 'swiglu': swiglu, **rep}))\n")
    stdout = run_compiler_script("-c", script, json.dumps(configs))
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 2 * len(configs)
    for rep in reports:
        assert rep["hgmma"] > 0, rep
        assert rep["local_bytes"] == 0 and rep["local_mem_ops"] == 0 and rep["stack_bytes"] == 0, rep
        # The fragment-order kernel's wgmma reads registers: none may be rewritten while it runs,
        # in any of its K loops (one per tile width with width_step, the 11th field).
        assert rep["in_flight_overwrites"] == 0, rep
        fields = rep["config"]
        if fields[6] == "rs":
            width_step = fields[10] if len(fields) > 10 else 0
            assert rep["k_loops"] == (fields[0] // width_step if width_step else 1), rep


def test_rs_kernel_with_the_l2_prefetch_compiles_for_sm90():
    # The "rs" kernel's L2_PREFETCH (w2's weights asked into L2 during w13: `moe.L2_PREFETCH_MAX_ROWS`,
    # off until measured) at the decode configs it is meant for: it compiles for sm_90 with each
    # supported Triton's ptxas, issues its two bulk prefetches (words, scales) and reads its own
    # weights evict-first, and costs no local memory and no wgmma race.
    script = (
        "import json\n"
        "from mxfp4_moe.kernels.tools.sm90_report import compile_variant, resource_report\n"
        "from mxfp4_moe.kernels.moe_matmul import MatmulConfig\n"
        "for fields in ((16, 64, 256, True, 4, 4, 'rs', 2), (16, 64, 128, True, 4, 4, 'rs', 2)):\n"
        "    cfg = MatmulConfig(*fields)\n"
        "    for prefetch in (False, True):\n"
        "        c = compile_variant(cfg, k=2880, n=5760, swiglu=True, atomic=False, l2_prefetch=prefetch)\n"
        "        ptx = c.asm['ptx']\n"
        "        print(json.dumps({'prefetch': prefetch, 'bulk': ptx.count('cp.async.bulk.prefetch.L2'),\n"
        "                          'evict_first': ptx.count('L1::evict_first'), **resource_report(c, cfg)}))\n")
    stdout = run_compiler_script("-c", script)
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 4
    for rep in reports:
        assert rep["local_bytes"] == 0 and rep["in_flight_overwrites"] == 0 and rep["hgmma"] > 0, rep
        assert (rep["bulk"], rep["evict_first"] > 0) == ((2, True) if rep["prefetch"] else (0, False)), rep


def test_sm90_race_check_flags_pipelined_register_operand_wgmma():
    # Triton 3.6 keeps up to 3 swapped-operand wgmmas (weights in registers) in flight across
    # the K loop's back edge, and ptxas 12.8 lets the next step's decode overwrite registers they
    # still read (triton#9433): 3.7 relative error on an H100 at (128, 128, 64, swap, 8 warps).
    # The kernel retires each step's wgmma. The check must see the race without that, and no
    # race with it, on a config that went wrong on the GPU.
    # From CUDA 13.3 (the ptxas Triton 3.9 assembles sm_90 with) ptxas no longer reuses those
    # registers: the same loop then has wgmmas pending at the back edge and no overwrite.
    script = (
        "import json\n"
        "from mxfp4_moe.kernels.tools.sm90_report import compile_variant, resource_report, sm90_ptxas_version\n"
        "from mxfp4_moe.kernels.moe_matmul import MatmulConfig\n"
        "print(json.dumps({'ptxas': sm90_ptxas_version()}))\n"
        "cfg = MatmulConfig(64, 128, 64, True, 4, 3)\n"
        "for retire in (False, True):\n"
        "    c = compile_variant(cfg, k=2880, n=5760, swiglu=True, atomic=False, retire_mma_each_step=retire)\n"
        "    print(json.dumps(resource_report(c, cfg)))\n")
    stdout = run_compiler_script("-c", script)
    ptxas, racy, retired = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert racy["pending_at_back_edge"] > 0, racy
    if tuple(ptxas["ptxas"]) < (13, 3):
        assert racy["in_flight_overwrites"] > 0, racy
    else:
        assert racy["in_flight_overwrites"] == 0, (ptxas, racy)
    assert retired["rs_groups"] > 0, retired          # still the register-operand wgmma
    assert retired["pending_at_back_edge"] == 0 and retired["in_flight_overwrites"] == 0, retired


def test_ptx_decode_is_the_bf16_default(monkeypatch):
    import importlib
    launcher = importlib.import_module("mxfp4_moe.kernels.moe_matmul")   # the module, not the function
    monkeypatch.setattr(importlib.import_module("mxfp4_moe.kernels._device"), "interpreting",
                        lambda: False)                                # as on the GPU
    blocks = torch.zeros(2, 64, 32, dtype=torch.uint8)
    assert launcher.pick_dequant(torch.bfloat16, blocks) == "ptx"      # whatever the block config
    assert launcher.pick_dequant(torch.float16, blocks) == "bytes"
    assert launcher.pick_dequant(torch.bfloat16, blocks[:, :, 1:]) == "bytes"


def test_sm90_kernel_selection(monkeypatch):
    # The Gluon kernel is a Hopper + bf16 default from 64-row tiles; anything it cannot take
    # gets a reason (an explicit kernel="sm90" config raises with it, the default falls back).
    import importlib
    launcher = importlib.import_module("mxfp4_moe.kernels.moe_matmul")
    C = launcher.MatmulConfig
    device = importlib.import_module("mxfp4_moe.kernels._device")    # where every kernel module asks
    monkeypatch.setattr(device, "interpreting", lambda: False)
    monkeypatch.setattr(device, "on_hopper", lambda device: True)
    for block_m, kernel in ((16, "triton"), (32, "triton"), (64, "sm90"), (128, "sm90")):
        for swiglu in (True, False):
            assert launcher.default_config(block_m, 5760, 2880, swiglu=swiglu, sm90=True).kernel == kernel
            assert launcher.default_config(block_m, 5760, 2880, swiglu=swiglu).kernel == "triton"
    good = C(128, 128, 64, False, 8, 4, "sm90")
    x = torch.zeros(10, 64, dtype=torch.bfloat16)
    blocks = torch.zeros(2, 128, 32, dtype=torch.uint8)
    other = {"scales_e8m0": torch.zeros(2, 128, 2, dtype=torch.uint8), "bias": torch.zeros(2, 128), "out": None}
    assert launcher._sm90_unsupported(x, blocks, good, torch.bfloat16, "ptx", other) == ""
    bad_calls = [
        ((x, blocks, good, torch.float16, "ptx", other), "bfloat16"),
        ((x, blocks, good, torch.bfloat16, "bytes", other), "inline PTX"),
        ((x, blocks, C(16, 64, 128, True, 8, 4, "sm90"), torch.bfloat16, "ptx", other),
         "block_n .*swap_ab.* 16 \\* num_warps"),
        ((x, blocks, C(64, 128, 64, False, 8, 4, "sm90"), torch.bfloat16, "ptx", other), "block_m .* 16 \\* num_warps"),
        ((x, blocks, C(128, 128, 512, False, 8, 4, "sm90"), torch.bfloat16, "ptx", other), "32..256"),
        ((x, blocks, C(128, 128, 64, False, 8, 1, "sm90"), torch.bfloat16, "ptx", other), "num_stages"),
        ((x[:, :60], blocks, good, torch.bfloat16, "ptx", other), "multiples of 8"),
        ((x, blocks, good, torch.bfloat16, "ptx", {**other, "bias": torch.zeros(128, 2).t()}), "bias"),
        # rows 34 bytes apart, and experts 4112 bytes apart with 32-byte rows: no 2-D array for TMA
        ((x, torch.zeros(2, 128, 34, dtype=torch.uint8)[:, :, :32], good, torch.bfloat16, "ptx", other), "TMA"),
        ((x, torch.zeros(2 * 4112, dtype=torch.uint8).as_strided((2, 128, 32), (4112, 32, 1)), good, torch.bfloat16,
          "ptx", other), "expert stride"),
    ]
    # Swapped operands (small T): the weight rows are the wgmma's row side.
    assert launcher._sm90_unsupported(x, blocks, C(16, 64, 128, True, 4, 6, "sm90"), torch.bfloat16, "ptx", other) == ""
    for args, reason in bad_calls:
        message = launcher._sm90_unsupported(*args)
        assert message and re.search(reason, message), (reason, message)



@pytest.mark.parametrize("expert_rows", [128, 136])
def test_sm90_words_descriptor_addresses_every_row(expert_rows):
    # The Gluon kernel reads expert e's weight row n at row e * rows_per_expert + n of one int32
    # array; check that mapping on the loader's contiguous layout and on experts stored with
    # padding rows (expert stride 136 rows, 128 used).
    from mxfp4_moe.kernels.moe_matmul import MatmulConfig, _words_descriptor, _words_tma_problem
    n_experts, n, k = 3, 128, 256
    storage = torch.randint(0, 256, (n_experts, expert_rows, k // 2), dtype=torch.uint8)
    blocks = storage[:, :n]
    assert _words_tma_problem(blocks) == ""
    desc, rows_per_expert = _words_descriptor(blocks, MatmulConfig(16, 64, 128, True, 4, 6, "sm90"))
    assert rows_per_expert == expert_rows
    assert desc.block_shape == [64, 16] and desc.base.dtype == torch.int32
    assert desc.shape == [(n_experts - 1) * expert_rows + n, k // 8]
    for e in range(n_experts):
        rows = desc.base[e * rows_per_expert: e * rows_per_expert + n]
        assert torch.equal(rows, blocks[e].contiguous().view(torch.int32)), e


def test_every_default_config_compiles_for_sm90_at_small_shapes():
    # Small test models and narrow TP shards give K loops of one step (K <= block_k) and w2
    # split-K programs of one step each: Triton 3.6 failed to lower the copies the folded
    # one-step loop left dead (issue: short K loops). Every config the defaults can pick for
    # sm_90, at H and I in sm90_report.SMALL_SIZES, must compile, without spills.
    stdout = run_compiler_script("-m", "mxfp4_moe.kernels.tools.sm90_report", "--small-shapes")
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    from mxfp4_moe.kernels.tools.sm90_report import SMALL_SIZES
    assert {r["config"]["kernel"] for r in reports} == {"triton", "sm90", "rs"}
    assert {r["k"] for r in reports} == set(SMALL_SIZES)
    rs = [r for r in reports if r["config"]["kernel"] == "rs"]
    one_step = [r for r in rs if -(-r["k"] // r["config"]["block_k"]) <= r["config"]["split_k"]]
    assert any(r["config"]["split_k"] == 1 for r in one_step) and any(r["config"]["split_k"] > 1 for r in one_step)
    for rep in reports:
        assert "error" not in rep, rep
        assert rep["local_bytes"] == 0 and rep["stack_bytes"] == 0 and 0 < rep["registers"] <= 255, rep


@pytest.fixture
def launcher_without_fallbacks(monkeypatch):
    """The launcher module with an empty fallback record (restored after the test)."""
    import importlib
    launcher = importlib.import_module("mxfp4_moe.kernels.moe_matmul")
    monkeypatch.setattr(importlib.import_module("mxfp4_moe.kernels.moe_matmul_fallbacks"), "_FALLBACKS", {})
    return launcher


@pytest.mark.parametrize("shape_only", [False, True], ids=["checkpoint-order-kept", "fragment-order-only"])
def test_compile_failure_falls_back_to_triton_and_warns_once(launcher_without_fallbacks, monkeypatch, shape_only,
                                                             nan_like):
    # A default fast kernel that fails to compile ("rs" here, forced with today's Triton error)
    # must not take the layer down: the portable kernel runs the call, one warning per shape
    # class names the kernel, its config and the error, and the output matches the reference.
    # With only the fragment copy (the layer's default on Hopper), the checkpoint order is rebuilt.
    from mxfp4_moe.kernels.fragment_layout import to_fragment_order
    launcher = launcher_without_fallbacks
    rs_config = launcher.MatmulConfig(16, 64, 128, True, 4, 4, "rs", 2)
    attempts = []

    def failing_rs(launch, config):
        attempts.append(config)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setitem(launcher._LAUNCHERS, "rs", failing_rs)
    monkeypatch.setattr(launcher, "_pick_config", lambda *args: rs_config)
    weights, _ = random_expert_weights(4, 64, 96, top_k=2, seed=5)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(5))
    topk_w, topk_ids = _routing(7, 4, 2, seed=5)
    meta = routing_metadata(topk_ids, None, 4, 16, topk_w)
    fragments = to_fragment_order(weights.w13_blocks, weights.w13_scales)
    blocks, scales = weights.w13_blocks, weights.w13_scales
    if shape_only:
        blocks, scales = (torch.empty(t.shape, dtype=t.dtype, device="meta") for t in (blocks, scales))
    kw = dict(swiglu=(weights.swiglu_alpha, weights.swiglu_limit), compute_dtype=torch.float32)
    ref = reference_moe_matmul(x, weights.w13_blocks, weights.w13_scales, weights.w13_bias, meta, **kw)
    with pytest.warns(RuntimeWarning, match=r"'rs' kernel cannot run \[192, 64\] weights .*block_k=128.*"
                                            r"PassManager::run failed.*portable Triton kernel") as caught:
        out = moe_matmul(x, blocks, scales, weights.w13_bias, meta, fragments=fragments,
                         out=nan_like(torch.empty(14, 96)), **kw)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert ("second copy" in str(caught[0].message)) == shape_only
    assert rel_err(out, ref) < TOL[torch.float32]
    [fallback] = launcher.kernel_fallbacks()
    assert (fallback.kernel, fallback.failed_config, fallback.config.kernel) == ("rs", rs_config, "triton")
    assert fallback.error == "RuntimeError: PassManager::run failed"

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the same shape class again: no second warning,
        again = moe_matmul(x, blocks, scales, weights.w13_bias, meta, fragments=fragments, **kw)
    assert len(attempts) == 1                   # and no second compile attempt
    assert torch.equal(again, out)

    # An explicit request for the kernel that failed still raises, naming it.
    monkeypatch.setattr(launcher, "_rs_unsupported", lambda *args, **kwargs: "")
    with pytest.raises(RuntimeError, match=r"'rs' kernel cannot run .*PassManager::run failed"):
        moe_matmul(x, blocks, scales, weights.w13_bias, meta, fragments=fragments, config=rs_config, **kw)
