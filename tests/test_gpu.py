"""GPU checks at gpt-oss sizes (bf16 kernels): each grouped matmul against a float32 reference on
the dequantized weights, the whole layer against transformers' GptOssMLP, and CUDA-graph capture.
Run on a CUDA machine with `pytest -m gpu tests/test_gpu.py`; skipped elsewhere.

Tolerance: relative Frobenius error < 5e-3 (bf16 operands and bf16 intermediate; triton_kernels
measures 1.7e-3 for w13 and 2.4e-3 for w2 on the same kind of data). The dequantization paths are
checked exactly: the inline-PTX decode bit for bit on every code x scale byte, and the kernel
with it bit for bit against the kernel with the one-code-at-a-time decode.
"""

import pytest
import torch
import triton
import triton.language as tl

from mxfp4_moe import mxfp4
from mxfp4_moe.moe import MXFP4MoE, random_expert_weights
from mxfp4_moe.kernels.moe_matmul import pick_block_m
from mxfp4_moe.kernels._moe_matmul import _dequant_mxfp4_words
from mxfp4_moe.routing import route, routing_metadata

pytestmark = pytest.mark.gpu
TOL_BF16 = 5e-3
TOKENS = (1, 8, 64, 512, 4096)


@triton.jit
def _dequant_tile_kernel(w_ptr, s_ptr, y_ptr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         USE_PTX: tl.constexpr):
    # One [BLOCK_N, BLOCK_K] tile: words [BLOCK_N, BLOCK_K // 8] uint32, scales [BLOCK_N,
    # BLOCK_K // 32] uint8 -> y [BLOCK_N, BLOCK_K] bf16, through the kernel's word decode.
    offs_n = tl.arange(0, BLOCK_N)
    words = tl.load(w_ptr + offs_n[:, None] * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)[None, :])
    words = words.to(tl.uint32, bitcast=True)
    scales = tl.load(s_ptr + offs_n[:, None] * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)[None, :])
    w = _dequant_mxfp4_words(words, scales, BLOCK_N, BLOCK_K, tl.bfloat16, USE_PTX)
    tl.store(y_ptr + offs_n[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :], w)


def _every_code_and_scale(n_rows=256, k=64, seed=0):
    """[n_rows, k] codes, each row all 16 codes k/16 times in its own order; scale bytes: row n
    has n (0..240, the decode range), rows past 240 random in 100..140, the last row 0xFF (NaN)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.arange(k).remainder(16)[torch.randperm(k, generator=gen)] for _ in range(n_rows)])
    scales = torch.randint(100, 141, (n_rows, k // mxfp4.BLOCK_SIZE), generator=gen)
    scales[:241] = torch.arange(241)[:, None]
    scales[-1] = mxfp4.E8M0_NAN
    return mxfp4.pack_e2m1(codes.to(torch.uint8)), scales.to(torch.uint8)


@pytest.mark.parametrize("use_ptx", [True, False], ids=["ptx", "words"])
def test_decode_every_code_and_scale_bit_exact(use_ptx):
    blocks, scales = _every_code_and_scale()
    expected = mxfp4.dequantize(blocks, scales, torch.bfloat16)               # [256, 64]
    y = torch.full(expected.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    words = blocks.cuda().view(torch.int32)
    _dequant_tile_kernel[(1,)](words, scales.cuda(), y, BLOCK_N=256, BLOCK_K=64, USE_PTX=use_ptx)
    y = y.cpu()
    finite = scales.repeat_interleave(mxfp4.BLOCK_SIZE, dim=1) != mxfp4.E8M0_NAN
    bad = (y.view(torch.int16) != expected.view(torch.int16)) & finite
    assert not bad.any(), f"{int(bad.sum())} mismatches, first at (row, k) {bad.nonzero()[0].tolist()}"
    assert bool(torch.isnan(y[~finite]).all())


def test_kernel_ptx_decode_equals_bytes_decode_bitwise():
    # Same kernel, same configs, the weights decoded by inline PTX or one code at a time: the MMA
    # sees the same bf16 operands, so outputs agree bit for bit. Identity x (y = dequant(W).T,
    # every code x scale byte) and random x through w13 + SwiGLU and w2 + atomic combine.
    from mxfp4_moe.kernels.moe_matmul import moe_matmul
    blocks, scales = _every_code_and_scale(k=128)
    blocks, scales = blocks[None].cuda(), scales[None].cuda()
    meta = routing_metadata(torch.zeros(128, 1, dtype=torch.int64, device="cuda"), None, 1, 128)
    eye = torch.eye(128, device="cuda").to(torch.bfloat16)
    outs = [moe_matmul(eye, blocks, scales, None, meta, dequant=d) for d in ("ptx", "bytes")]
    assert torch.equal(outs[0][:, :-1].view(torch.int16), outs[1][:, :-1].view(torch.int16))
    assert bool(torch.isnan(outs[0][:, -1]).all() and torch.isnan(outs[1][:, -1]).all())    # NaN scale row
    expected = mxfp4.dequantize(blocks[0], scales[0], torch.bfloat16).T[:, :-1]
    print("identity x: ptx == bytes bitwise; == dequantize:",
          torch.equal(outs[0][:, :-1].view(torch.int16), expected.view(torch.int16)))
    w, _ = random_expert_weights(32, 2880, 2880, top_k=4, seed=9, device="cuda", dense=False)
    x = torch.randn(300, 2880, device="cuda").to(torch.bfloat16)
    topk_w, topk_ids = route(x, w.router_weight, w.router_bias, w.top_k)
    meta = routing_metadata(topk_ids, w.expert_map, w.num_local_experts, pick_block_m(1200, 32), topk_w)
    swiglu = (w.swiglu_alpha, w.swiglu_limit)
    acts = [moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu, dequant=d)
            for d in ("ptx", "bytes")]
    assert torch.equal(acts[0].view(torch.int16), acts[1].view(torch.int16))
    kw2 = dict(gather=False, apply_row_weight=True, combine="slots", n_out=w.hidden)
    ys = [moe_matmul(acts[0], w.w2_blocks, w.w2_scales, w.w2_bias, meta, dequant=d, **kw2) for d in ("ptx", "bytes")]
    assert torch.equal(ys[0], ys[1])


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module", params=[
    pytest.param((32, 2880, 2880, 2880, 2880), id="gpt-oss-20b-E32"),
    pytest.param((128, 2880, 2880, 2880, 2880), id="gpt-oss-120b-E128"),
    pytest.param((32, 2880, 736, 2880, 768), id="TP4-shard-I736-pad768"),
])
def gpt_oss_weights(request):
    E, H, I, H_pad, I_pad = request.param
    weights, _ = random_expert_weights(E, H, I, hidden_pad=H_pad, inter_pad=I_pad, top_k=4, seed=E + I,
                                       device="cuda", dense=False)
    yield weights
    del weights
    torch.cuda.empty_cache()


@pytest.mark.parametrize("tokens", TOKENS)
def test_grouped_matmuls_bf16_vs_float32(gpt_oss_weights, tokens):
    from mxfp4_moe.kernels.moe_matmul import moe_matmul, pick_block_m
    from mxfp4_moe.reference import reference_moe_matmul
    w = gpt_oss_weights
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, w.hidden, generator=gen, device="cuda").to(torch.bfloat16)
    topk_w, topk_ids = route(x, w.router_weight, w.router_bias, w.top_k)
    meta = routing_metadata(topk_ids, w.expert_map, w.num_local_experts,
                            pick_block_m(tokens * w.top_k, w.num_local_experts), topk_w)
    local = int(meta.expert_offsets[-1])
    args13 = (w.w13_blocks, w.w13_scales, w.w13_bias, meta)
    swiglu = (w.swiglu_alpha, w.swiglu_limit)
    act = torch.full((tokens * w.top_k, w.inter_pad), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_matmul(x, *args13, swiglu=swiglu, out=act)
    act_ref = reference_moe_matmul(x, *args13, swiglu=swiglu, compute_dtype=torch.float32)
    err13 = rel_err(act[:local], act_ref[:local])
    args2 = (w.w2_blocks, w.w2_scales, w.w2_bias, meta)
    kw2 = dict(gather=False, apply_row_weight=True, n_out=w.hidden)
    y = moe_matmul(act, *args2, combine="atomic", **kw2)
    y_ref = reference_moe_matmul(act, *args2, combine="atomic", compute_dtype=torch.float32, **kw2)
    err2 = rel_err(y, y_ref)
    print(f"E={w.num_local_experts} I_pad={w.inter_pad} T={tokens}: w13+swiglu {err13:.2e}  w2+combine {err2:.2e}")
    assert err13 < TOL_BF16 and err2 < TOL_BF16


SM90_CONFIGS = [(64, 128, 64, False, 4, 3, "sm90"), (128, 128, 64, False, 8, 3, "sm90"),
                (128, 128, 64, False, 4, 3, "sm90"), (128, 256, 64, False, 8, 4, "sm90"),
                # swapped operands (weights on the wgmma's row side), the small-T shapes
                (16, 64, 128, True, 4, 6, "sm90"), (16, 64, 256, True, 4, 4, "sm90"),
                (32, 128, 128, True, 8, 4, "sm90"), (64, 64, 128, True, 4, 4, "sm90")]


@pytest.mark.parametrize("config", SM90_CONFIGS,
                         ids=lambda c: "{}-bm{}-bn{}-bk{}-{}w{}-s{}".format(c[6], c[0], c[1], c[2], "swap-" if c[3] else "",
                                                                            c[4], c[5]))
@pytest.mark.parametrize("tokens", [1, 77, 600, 4096])
def test_sm90_kernel_vs_float32(gpt_oss_weights, config, tokens):
    # The Gluon kernel (decode overlapped with the previous step's wgmma) on the gpt-oss shapes,
    # tails in rows (T * 4 not a multiple of the tile) and in experts with no rows.
    _gluon_kernel_vs_float32(gpt_oss_weights, config, tokens, seed=tokens + 1, fragment_order=False)


def _gluon_kernel_vs_float32(w, config, tokens, seed, fragment_order):
    """A Gluon kernel config against the float32 reference on the dequantized weights: w13 +
    SwiGLU, w2 by atomic combine (split_k, if any, applies here only) and w2 into sorted rows with
    per-channel scales; outputs NaN-poisoned. fragment_order: the weights in fragment order too
    (for kernel "rs")."""
    import dataclasses
    from mxfp4_moe.kernels.moe_matmul import MatmulConfig, moe_matmul
    from mxfp4_moe.kernels.fragment_layout import to_fragment_order
    from mxfp4_moe.reference import reference_moe_matmul
    cfg = MatmulConfig(*config)
    cfg_no_split = dataclasses.replace(cfg, split_k=1)
    frag13 = to_fragment_order(w.w13_blocks, w.w13_scales) if fragment_order else None
    frag2 = to_fragment_order(w.w2_blocks, w.w2_scales) if fragment_order else None
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, w.hidden, generator=gen, device="cuda").to(torch.bfloat16)
    topk_w, topk_ids = route(x, w.router_weight, w.router_bias, w.top_k)
    meta = routing_metadata(topk_ids, w.expert_map, w.num_local_experts, cfg.block_m, topk_w)
    local = int(meta.expert_offsets[-1])
    args13 = (w.w13_blocks, w.w13_scales, w.w13_bias, meta)
    swiglu = (w.swiglu_alpha, w.swiglu_limit)
    act = torch.full((tokens * w.top_k, w.inter_pad), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_matmul(x, *args13, swiglu=swiglu, out=act, config=cfg_no_split, fragments=frag13)
    act_ref = reference_moe_matmul(x, *args13, swiglu=swiglu, compute_dtype=torch.float32)
    err13 = rel_err(act[:local], act_ref[:local])
    args2 = (w.w2_blocks, w.w2_scales, w.w2_bias, meta)
    kw2 = dict(gather=False, apply_row_weight=True, n_out=w.hidden)
    y = moe_matmul(act, *args2, combine="atomic", config=cfg, fragments=frag2, **kw2)
    y_ref = reference_moe_matmul(act, *args2, combine="atomic", compute_dtype=torch.float32, **kw2)
    err2 = rel_err(y, y_ref)
    cs = torch.rand(w.num_local_experts, w.hidden_pad, generator=gen, device="cuda") + 0.5
    rows = torch.full((tokens * w.top_k, w.hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_matmul(act, *args2, channel_scale=cs, out=rows, config=cfg_no_split, fragments=frag2, gather=False,
               n_out=w.hidden)
    rows_ref = reference_moe_matmul(act, *args2, channel_scale=cs, compute_dtype=torch.float32, gather=False,
                                    n_out=w.hidden)
    err_rows = rel_err(rows[:local], rows_ref[:local])
    print(f"{config} E={w.num_local_experts} I_pad={w.inter_pad} T={tokens}: w13 {err13:.2e} "
          f"w2 atomic {err2:.2e} w2 rows+channel scale {err_rows:.2e}")
    assert err13 < TOL_BF16 and err2 < TOL_BF16 and err_rows < TOL_BF16


# Fragment-order kernel: (block_m, block_n, block_k, swap_ab, num_warps, num_stages, kernel, prefetch
# [, split_k for the atomic w2]). 8 warps on the 2880-row w2 leave a partial row-group tile (180
# groups of 16): the row mask. Split 3 of 23 K steps of 128: a last split past K.
# With pipeline_mma (the 10th field), an odd step count per program (45 steps of 64; 9 per split
# of 5) ends in a zero-filled step: in a split other than the last it must add nothing.
RS_CONFIGS = [(16, 64, 64, True, 4, 4, "rs", 3), (16, 64, 128, True, 4, 4, "rs", 2),
              (16, 64, 256, True, 4, 4, "rs", 2), (16, 64, 128, True, 4, 4, "rs", 2, 3),
              (32, 128, 64, True, 8, 4, "rs", 3), (64, 64, 64, True, 4, 4, "rs", 2),
              (128, 128, 64, True, 8, 3, "rs", 2),
              (16, 64, 128, True, 4, 4, "rs", 2, 1, True), (16, 64, 64, True, 4, 4, "rs", 3, 5, True),
              (64, 64, 64, True, 4, 4, "rs", 3, 1, True), (128, 128, 64, True, 8, 4, "rs", 3, 1, True),
              # width_step (11th field): an expert's last tile runs its rows rounded up to a multiple
              # of it, in power-of-two pieces (one wgmma each)
              (64, 64, 64, True, 4, 4, "rs", 2, 1, False, 16), (128, 128, 64, True, 8, 4, "rs", 3, 1, False, 32),
              (64, 64, 64, True, 4, 4, "rs", 2, 1, False, 32), (128, 128, 64, True, 8, 4, "rs", 3, 1, False, 64),
              (128, 64, 64, True, 4, 4, "rs", 2, 1, False, 16), (128, 64, 64, True, 4, 3, "rs", 2, 1, False, 16),
              (128, 128, 64, True, 8, 4, "rs", 3, 1, True, 32),
              # block_n = 32 * num_warps: two 16-row blocks per warp, two wgmmas on each x tile
              (16, 128, 128, True, 4, 4, "rs", 2), (32, 128, 128, True, 4, 4, "rs", 2, 4),
              (64, 128, 64, True, 4, 4, "rs", 2, 1, False, 32), (128, 128, 64, True, 4, 4, "rs", 2, 1, False, 64)]


@pytest.mark.parametrize("config", RS_CONFIGS, ids=lambda c: "rs-bm{}-bn{}-bk{}-w{}-s{}-p{}-split{}{}{}".format(
    c[0], c[1], c[2], c[4], c[5], c[7], c[8] if len(c) > 8 else 1, "-pipelined" if len(c) > 9 and c[9] else "",
    f"-width_step{c[10]}" if len(c) > 10 and c[10] else ""))
@pytest.mark.parametrize("tokens", [1, 77, 600])
def test_rs_kernel_vs_float32(gpt_oss_weights, config, tokens):
    # The fragment-order kernel (decoded weights as the wgmma's register operand) on the gpt-oss
    # shapes, as test_sm90_kernel_vs_float32.
    _gluon_kernel_vs_float32(gpt_oss_weights, config, tokens, seed=tokens + 2, fragment_order=True)


@pytest.mark.parametrize("block_k", [64, 128])
def test_rs_kernel_decodes_every_weight_exactly(block_k):
    # One-hot tokens: token t is e_t, so output row t of expert e is column t of W_e, one exact
    # product per output (bf16 weights, fp32 accumulation, bf16 output). Every E2M1 code with
    # every scale byte the fragment order takes (0..128). Where the weight is a normal bf16
    # (scale byte >= 2) the output must equal it; weights below 2 ** -126 (scale bytes 0 and 1)
    # may come out flushed to zero by the tensor cores, and otherwise exact.
    from mxfp4_moe.kernels.moe_matmul import MatmulConfig, moe_matmul
    from mxfp4_moe.kernels.fragment_layout import to_fragment_order
    E, N, K = 2, 144, 4 * 320                 # 9 row groups (partial 64-row tile), a K tail at 128
    gen = torch.Generator(device="cuda").manual_seed(block_k)
    blocks = torch.randint(0, 256, (E, N, K // 2), generator=gen, device="cuda", dtype=torch.uint8)
    scales = torch.arange(E * N * K // 32, device="cuda").remainder(129).to(torch.uint8).view(E, N, K // 32)
    expected = mxfp4.dequantize(blocks, scales, torch.float32).view(E, N, K).to(torch.bfloat16)
    x = torch.eye(K, device="cuda", dtype=torch.bfloat16)
    topk_ids = torch.arange(K, device="cuda").remainder(E).view(K, 1).to(torch.int32)
    cfg = MatmulConfig(16, 64, block_k, True, 4, 4, "rs", 2)
    meta = routing_metadata(topk_ids, torch.arange(E, dtype=torch.int32), E, cfg.block_m,
                            torch.ones(K, 1, device="cuda"))
    out = torch.full((K, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_matmul(x, blocks, scales, None, meta, out=out, config=cfg, fragments=to_fragment_order(blocks, scales))
    token = meta.sorted_token.long()                      # sorted row r holds token sorted_token[r]
    want = expected[token.remainder(E), :, token]
    scale_byte = scales[token.remainder(E), :, token // 32]
    normal = scale_byte >= 2
    assert not torch.isnan(out).any()
    # == and not bits: a -0 code comes out +0 (the accumulator starts at +0)
    assert bool((out[normal] == want[normal]).all()), int((out[normal] != want[normal]).sum())
    tiny_ok = (out == want) | (out == 0)
    assert bool(tiny_ok[~normal].all()), int((~tiny_ok[~normal]).sum())
    print(f"rs decode bk{block_k}: {int(normal.sum())} normal weights exact; weights below 2**-126: "
          f"{int((out[~normal] == want[~normal]).sum())} exact, {int(((out == 0) & (want != 0))[~normal].sum())} "
          f"flushed to zero")


@pytest.mark.parametrize("config", [(128, 64, 64, True, 4, 4, "rs", 2, 1, False, 16),
                                    (128, 128, 64, True, 8, 4, "rs", 3, 1, False, 32),
                                    (128, 128, 64, True, 8, 4, "rs", 3, 1, True, 32),
                                    (64, 64, 64, True, 4, 4, "rs", 2, 1, False, 16),
                                    (128, 128, 64, True, 4, 4, "rs", 2, 1, False, 16)])
def test_rs_kernel_every_tile_width(config):
    # Experts with chosen row counts, so that with width_step every width code path runs: tiles
    # of 1..block_m rows, each rounded up to the step and split into power-of-two pieces (e.g.
    # 112 = 64 + 32 + 16), experts of several tiles, and empty experts. Output rows and the
    # atomic combine (per-piece scatter and routing weights) against float32; NaN-poisoned. Both
    # with gathered token rows and with rows already sorted (TMA copies of whole tiles).
    from mxfp4_moe.kernels.moe_matmul import MatmulConfig, moe_matmul
    from mxfp4_moe.kernels.fragment_layout import to_fragment_order
    from mxfp4_moe.reference import reference_moe_matmul
    cfg = MatmulConfig(*config)
    counts = [0, 1, 15, 16, 17, 31, 33, 40, 48, 49, 63, 64, 65, 80, 95, 97, 111, 113, 127, 128, 129, 200, 0, 300]
    E, N, K = len(counts), 320, 640                    # 20 row groups: a partial 128-row weight tile
    gen = torch.Generator(device="cuda").manual_seed(sum(config[:3]))
    blocks = torch.randint(0, 256, (E, N, K // 2), generator=gen, device="cuda", dtype=torch.uint8)
    scales = torch.randint(118, 124, (E, N, K // 32), generator=gen, device="cuda", dtype=torch.uint8)
    bias = torch.randn(E, N, generator=gen, device="cuda")
    tokens = sum(counts)
    expert_of = torch.repeat_interleave(torch.arange(E, device="cuda"), torch.tensor(counts, device="cuda"))
    topk_ids = expert_of[torch.randperm(tokens, generator=gen, device="cuda")].view(tokens, 1).to(torch.int32)
    topk_w = torch.rand(tokens, 1, generator=gen, device="cuda") + 0.5
    meta = routing_metadata(topk_ids, torch.arange(E, dtype=torch.int32), E, cfg.block_m, topk_w)
    x = torch.randn(tokens, K, generator=gen, device="cuda").to(torch.bfloat16)
    fragments = to_fragment_order(blocks, scales)
    args = (x, blocks, scales, bias, meta)
    rows = torch.full((tokens, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_matmul(*args, out=rows, config=cfg, fragments=fragments)
    rows_ref = reference_moe_matmul(*args, compute_dtype=torch.float32)
    combined = moe_matmul(*args, combine="atomic", apply_row_weight=True, config=cfg, fragments=fragments)
    combined_ref = reference_moe_matmul(*args, combine="atomic", apply_row_weight=True, compute_dtype=torch.float32)
    err_rows, err_combined = rel_err(rows, rows_ref), rel_err(combined, combined_ref)
    # The same rows already in sorted order (as w2 reads them: no gather, by TMA from 64-wide K
    # steps): the same products, so the same rows bit for bit.
    x_sorted = x[meta.sorted_token.long()]
    sorted_args = (x_sorted, blocks, scales, bias, meta)
    rows_sorted = torch.full((tokens, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_matmul(*sorted_args, gather=False, out=rows_sorted, config=cfg, fragments=fragments)
    combined_sorted = moe_matmul(*sorted_args, gather=False, combine="atomic", apply_row_weight=True, config=cfg,
                                 fragments=fragments)
    err_sorted = rel_err(combined_sorted, combined_ref)
    print(f"{config}: rows {err_rows:.2e}, atomic combine {err_combined:.2e}, sorted rows' combine {err_sorted:.2e}")
    assert not torch.isnan(rows).any()
    assert err_rows < TOL_BF16 and err_combined < TOL_BF16 and err_sorted < TOL_BF16
    assert torch.equal(rows_sorted, rows)


@pytest.mark.parametrize("config", [(128, 128, 64, False, 8, 3, "sm90"), (16, 64, 256, True, 4, 4, "sm90"),
                                    (16, 64, 64, True, 4, 4, "rs", 3), (128, 128, 128, True, 8, 3, "rs", 2)])
def test_gluon_kernels_padded_hidden(config):
    # Hidden 2880 padded to 3072: x has fewer columns than the weights' K (masked to zero).
    from mxfp4_moe.kernels.moe_matmul import MatmulConfig, moe_matmul
    from mxfp4_moe.reference import reference_moe_matmul
    w, _ = random_expert_weights(8, 2880, 2880, hidden_pad=3072, inter_pad=2944, top_k=4, seed=3, device="cuda",
                                 dense=False)
    cfg = MatmulConfig(*config)
    tokens = 700 if cfg.block_m >= 64 else 9          # several tiles per expert / a partial one
    x = torch.randn(tokens, 2880, generator=torch.Generator().manual_seed(5)).to("cuda", torch.bfloat16)
    topk_w, topk_ids = route(x, w.router_weight, w.router_bias, 4)
    meta = routing_metadata(topk_ids, w.expert_map, 8, cfg.block_m, topk_w)
    swiglu = (w.swiglu_alpha, w.swiglu_limit)
    args13 = (w.w13_blocks, w.w13_scales, w.w13_bias, meta)
    fragments = None
    if cfg.kernel == "rs":
        from mxfp4_moe.kernels.fragment_layout import to_fragment_order
        fragments = to_fragment_order(w.w13_blocks, w.w13_scales)
    act = moe_matmul(x, *args13, swiglu=swiglu, config=cfg, fragments=fragments)
    ref = reference_moe_matmul(x, *args13, swiglu=swiglu, compute_dtype=torch.float32)
    assert rel_err(act, ref) < TOL_BF16


@pytest.mark.parametrize("tokens", [64, 512])
def test_layer_vs_transformers_gpt_oss_mlp(tokens):
    pytest.importorskip("transformers")
    from mxfp4_moe.verify.oracle import build_transformers_moe
    E, H, I, k = 32, 2880, 2880, 4
    weights, _ = random_expert_weights(E, H, I, top_k=k, seed=tokens, device="cuda", dense=False)
    mlp = build_transformers_moe(weights, device="cuda")
    x = torch.randn(tokens, H, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        expected = mlp(x.float().unsqueeze(0))[0][0]
    y = MXFP4MoE(weights, backend="auto")(x)
    assert y.dtype == torch.bfloat16
    err = rel_err(y, expected)
    print(f"layer vs GptOssMLP T={tokens}: {err:.2e}")
    assert err < TOL_BF16


def test_layer_cuda_graph_replay_matches_eager():
    # No host synchronisation in forward: it captures into a CUDA graph, and replays agree.
    weights, _ = random_expert_weights(32, 2880, 2880, top_k=4, seed=1, device="cuda", dense=False)
    layer = MXFP4MoE(weights, backend="triton", combine="slots")
    x = torch.randn(100, 2880, device="cuda").to(torch.bfloat16)
    eager = layer(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(x)
    x.copy_(torch.randn(100, 2880, device="cuda").to(torch.bfloat16))
    graph.replay()
    assert rel_err(captured, layer(x)) < 1e-6   # slots combine: deterministic
    assert rel_err(captured, eager) > 1e-2      # new input really used


def test_layer_keeps_one_copy_of_the_expert_weights_on_hopper():
    # The default on Hopper: only the fragment-order copy stays (the checkpoint-order tensors are
    # freed once the caller drops them), the layer computes the same as one that keeps both,
    # and checkpoint_weights() rebuilds the checkpoint bytes exactly.
    from mxfp4_moe.moe import CHECKPOINT_ORDER_TENSORS
    from mxfp4_moe.reference import reference_moe
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the fragment-order copy is built on Hopper only")
    E, H, I = 32, 2880, 2880

    def build(keep):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        weights, _ = random_expert_weights(E, H, I, top_k=4, seed=11, device="cuda", dense=False)
        layer = MXFP4MoE(weights, backend="triton", keep_checkpoint_order=keep)
        del weights
        torch.cuda.synchronize()
        return layer, torch.cuda.memory_allocated() - before

    lean, lean_bytes = build(None)
    both, both_bytes = build(True)
    assert lean.fragments is not None and not lean.holds_checkpoint_order and both.holds_checkpoint_order
    checkpoint_bytes = sum(getattr(both.weights, name).numel() for name in CHECKPOINT_ORDER_TENSORS)
    print(f"layer memory: {lean_bytes / 2**20:.0f} MiB (fragment copy only) vs {both_bytes / 2**20:.0f} MiB "
          f"(both); checkpoint-order tensors {checkpoint_bytes / 2**20:.0f} MiB")
    assert abs((both_bytes - lean_bytes) - checkpoint_bytes) < 0.01 * checkpoint_bytes
    rebuilt = lean.checkpoint_weights()
    for name in CHECKPOINT_ORDER_TENSORS:
        assert torch.equal(getattr(rebuilt, name), getattr(both.weights, name)), name
    x = torch.randn(512, H, generator=torch.Generator(device="cuda").manual_seed(2), device="cuda")
    y_lean, y_both = lean(x), both(x)                 # float32 tokens: the lean layer casts them to bf16
    assert y_lean.dtype == torch.float32
    assert rel_err(y_lean, y_both) < 1e-3            # the same kernels; fp32 atomic order differs
    topk_w, topk_ids = route(x, both.weights.router_weight, both.weights.router_bias, 4,
                             router_weight_bf16=lean.router_weight_bf16)     # as forward routes
    ref = reference_moe(x.bfloat16().float(), rebuilt, topk_w, topk_ids, torch.float32)
    assert rel_err(y_lean, ref) < TOL_BF16


def test_graphed_layer_matches_the_layer_and_returns_fresh_tensors():
    # CUDAGraphMoE at bucket edges and past them (eager there), against the layer itself and a
    # float32 reference on the same routing; outputs must not alias the graph's buffer.
    from mxfp4_moe.graphs import CUDAGraphMoE
    from mxfp4_moe.reference import reference_moe
    weights, _ = random_expert_weights(32, 2880, 2880, top_k=4, seed=7, device="cuda", dense=False)
    layer = MXFP4MoE(weights, backend="triton", combine="slots")     # deterministic sum
    graphed = CUDAGraphMoE(layer, max_tokens=64)
    gen = torch.Generator(device="cuda").manual_seed(5)
    for tokens in (1, 3, 16, 17, 64, 65):
        x = torch.randn(tokens, 2880, generator=gen, device="cuda").to(torch.bfloat16)
        got = graphed(x)
        assert got.shape == (tokens, 2880) and got.dtype == torch.bfloat16
        topk_w, topk_ids = route(x, weights.router_weight, weights.router_bias, 4,
                                 router_weight_bf16=layer.router_weight_bf16)
        ref = reference_moe(x.float(), layer.checkpoint_weights(), topk_w, topk_ids, torch.float32)
        assert rel_err(got, ref) < TOL_BF16, tokens
        assert rel_err(got, layer(x)) < 5e-3, tokens        # other bucket size: other tiles, same sums
        if tokens > 64:
            assert torch.equal(got, layer(x))                  # past the buckets: the layer itself
    assert graphed.captured == (1, 4, 16, 32, 64)
    first_x = torch.randn(5, 2880, generator=gen, device="cuda").to(torch.bfloat16)
    first = graphed(first_x)
    kept = first.clone()
    graphed(torch.randn(6, 2880, generator=gen, device="cuda").to(torch.bfloat16))    # same bucket (8)
    assert torch.equal(first, kept)
    assert torch.equal(graphed(first_x), kept)               # zeroed tail rows: the same answer again


@pytest.mark.parametrize("config", [(128, 128, 64, True, 8, 3), (64, 128, 64, True, 4, 3)],
                         ids=["bm128-swap-8warps", "bm64-swap-4warps"])
@pytest.mark.parametrize("dequant", ["ptx", "words"])
def test_swapped_configs_that_raced_are_right(config, dequant):
    # Regression: on an H100 (128, 128, 64, swap, 8 warps) gave 3.7 relative error. The cause was
    # a race: Triton 3.6 kept swapped-operand wgmmas in flight across K steps while the next
    # step's decode reused their registers (triton#9433); the kernel now retires each step's
    # wgmma (RETIRE_MMA_EACH_STEP), and these configs must be right with every decode.
    from mxfp4_moe.kernels.moe_matmul import MatmulConfig, moe_matmul
    from mxfp4_moe.reference import reference_moe_matmul
    cfg = MatmulConfig(*config)
    E, H, I, k, T = 4, 2880, 2880, 2, 300
    w, _ = random_expert_weights(E, H, I, top_k=k, seed=1, device="cuda")
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
    topk_w, topk_ids = route(x, w.router_weight, w.router_bias, k)
    meta = routing_metadata(topk_ids, w.expert_map, E, cfg.block_m, topk_w)
    swiglu = (w.swiglu_alpha, w.swiglu_limit)
    got = moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu, config=cfg,
                     dequant=dequant).float()
    ref = reference_moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=swiglu).float()
    rows = int(meta.expert_offsets[-1])
    assert ((got[:rows] - ref[:rows]).norm() / ref[:rows].norm()).item() < 5e-3


@pytest.mark.parametrize("tokens,num_experts,local", [(1, 128, None), (4, 128, None), (5, 128, None),
                                                      (16, 128, None), (64, 32, None),
                                                      (8192, 128, None), (8192, 32, None),
                                                      (3000, 128, list(range(0, 128, 3)))])
def test_expert_sort_matches_torch_on_gpu(tokens, num_experts, local):
    # The Triton counting sort of routing_metadata against torch's stable sort, exactly, at
    # gpt-oss sizes (32768 pairs: 128 chunks at 128 experts) and under expert parallelism.
    from mxfp4_moe.kernels.expert_sort import expert_sort, sort_and_schedule
    from mxfp4_moe.routing import expert_sort_torch, max_tiles, tile_schedule_torch
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    logits = torch.randn(tokens, num_experts, generator=gen, device="cuda")
    topk_w, topk_ids = torch.topk(logits, 4, dim=-1)
    expert_map, num_local = None, num_experts
    if local is not None:
        expert_map = torch.full((num_experts,), -1, dtype=torch.int64, device="cuda")
        expert_map[local] = torch.arange(len(local), device="cuda")
        num_local = len(local)
    got = expert_sort(topk_ids, expert_map, num_local, topk_w.softmax(-1))
    want = expert_sort_torch(topk_ids, expert_map, num_local, topk_w.softmax(-1))
    for name, g, w in zip(("sorted_slot", "sorted_token", "sorted_weight", "inverse", "offsets"), got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name
    # routing_metadata's path: up to 16 tokens at 128 experts and 64 at 32, the sort and the
    # tile schedule in one launch (a schedule step of 16, 32 or 64 tiles).
    n_tiles = max_tiles(tokens * 4, num_local, 16)
    got = sort_and_schedule(topk_ids, expert_map, num_local, topk_w.softmax(-1), n_tiles, 16)
    want = (*want, *tile_schedule_torch(want[4], n_tiles, 16))
    for name, g, w in zip(("sorted_slot", "sorted_token", "sorted_weight", "inverse", "offsets", "counts",
                           "tile_expert", "tile_row_start"), got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w), name


def test_route_bf16_gemm_matches_float32():
    # On the GPU, bf16 x and a bf16-exact router weight route through one bf16 GEMM with float32
    # output: the same exact products as the float32 path, summed in another order.
    from mxfp4_moe.routing import _bf16_gemm_fp32_out, exact_bf16
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(128, 2880, generator=gen, device="cuda") / 2880 ** 0.5).bfloat16().float()
    bias = torch.randn(128, generator=gen, device="cuda")
    x = torch.randn(8192, 2880, generator=gen, device="cuda").bfloat16()
    assert _bf16_gemm_fp32_out(x.device), "torch.mm(..., out_dtype=torch.float32) is missing: route stays float32"
    fast_w, fast_ids = route(x, weight, bias, 4, router_weight_bf16=exact_bf16(weight))
    ref_w, ref_ids = route(x, weight, bias, 4)
    same = (fast_ids == ref_ids).all(-1)
    assert same.float().mean() > 0.999          # a near-tie may swap two experts' order
    assert rel_err(fast_w[same], ref_w[same]) < 1e-5


# Small and odd layer shapes (E, H, I, top_k, H_pad, I_pad): K loops of one step or a few, w2
# split-K down to one step per program, rows that fill no 16-row group, and TP shards.
SMALL_LAYERS = [
    pytest.param((1, 32, 32, 1, 32, 32), id="E1-H32-I32-one-block-each"),
    pytest.param((4, 64, 64, 2, 64, 64), id="E4-H64-I64-one-64-step"),
    pytest.param((4, 96, 64, 4, 96, 64), id="E4-H96-I64"),
    pytest.param((4, 64, 96, 2, 64, 128), id="E4-H64-I96-pad128"),
    pytest.param((4, 128, 128, 1, 128, 128), id="E4-H128-I128-top1"),
    pytest.param((8, 160, 96, 4, 160, 96), id="E8-H160-I96"),
    pytest.param((4, 64, 2880, 2, 64, 2880), id="E4-H64-I2880"),
    pytest.param((4, 2880, 64, 4, 2880, 64), id="E4-H2880-I64"),
    pytest.param((8, 256, 256, 2, 256, 256), id="E8-H256-I256"),
    pytest.param((8, 288, 352, 4, 288, 384), id="builtin-checkpoint-H288-I352-pad384"),
    # gpt-oss shards at high TP: I = 2880 / 90 = 32 per rank (one block), and TP 32's last ranks
    # with 2 blocks padded to the Triton alignment's 64 (a single K step of w2).
    pytest.param((32, 2880, 32, 4, 2880, 32), id="gpt-oss-20b-TP90-I32"),
    pytest.param((128, 2880, 64, 4, 2880, 64), id="gpt-oss-120b-TP32-I64"),
]


@pytest.mark.parametrize("shape", SMALL_LAYERS)
def test_layer_at_small_shapes_every_token_count(shape):
    # The whole layer (default kernels: "rs" on Hopper) against the float32 reference at every
    # token count from decode to prefill, and no kernel fell back to the portable one: each
    # fast kernel compiled and ran (the short-K-loop crash was a compile failure at T = 1).
    from mxfp4_moe.kernels.moe_matmul import kernel_fallbacks
    from mxfp4_moe.reference import reference_moe
    E, H, I, k, H_pad, I_pad = shape
    weights, _ = random_expert_weights(E, H, I, top_k=k, hidden_pad=H_pad, inter_pad=I_pad, seed=E + H + I,
                                       tp_rank=1 if I < 2880 and H == 2880 else 0, device="cuda", dense=False)
    layer = MXFP4MoE(weights, backend="triton")
    if torch.cuda.get_device_capability()[0] == 9:
        assert layer.fragments is not None         # the Hopper default: the "rs" kernel runs
    rebuilt = layer.checkpoint_weights()
    fallbacks_before = len(kernel_fallbacks())
    for tokens in (1, 2, 7, 40, 300):
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, H, generator=gen, device="cuda").to(torch.bfloat16)
        y = layer(x)
        topk_w, topk_ids = route(x, weights.router_weight, weights.router_bias, k,
                                 router_weight_bf16=layer.router_weight_bf16)
        ref = reference_moe(x.float(), rebuilt, topk_w, topk_ids, torch.float32)
        assert y.shape == (tokens, H) and y.dtype == torch.bfloat16
        err = rel_err(y, ref)
        assert err < TOL_BF16, (tokens, err)
    assert kernel_fallbacks()[fallbacks_before:] == []


def test_layer_under_torch_compile_reduce_overhead_matches_eager():
    # The layer is one custom op to torch.compile (`mxfp4_moe.custom_ops`): it traces with no
    # graph break and CUDA-graph mode ("reduce-overhead") captures and replays it. The slots
    # combine is deterministic, so replays equal the eager output bit for bit.
    weights, _ = random_expert_weights(32, 2880, 2880, top_k=4, seed=5, device="cuda", dense=False)
    layer = MXFP4MoE(weights, backend="triton", combine="slots")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    for tokens in (1, 64):
        x = torch.randn(tokens, 2880, generator=torch.Generator(device="cuda").manual_seed(tokens),
                        device="cuda").to(torch.bfloat16)
        eager = layer(x)
        for _ in range(3):                      # warm-up, capture, replay
            out = compiled(x).clone()
        assert torch.equal(out, eager), tokens


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_load_layer_to_the_gpu_through_pinned_staging_is_exact(tmp_path, tp_rank):
    # The pinned double-buffered copy against the plain pageable one and against a CPU load:
    # every tensor byte for byte (padding included), for a TP shard whose w2 reads are strided.
    from mxfp4_moe.checkpoint import open_checkpoint
    from mxfp4_moe.loader import load_layer
    from mxfp4_moe.sharding import ShardPlan
    from mxfp4_moe.synthetic import make_synthetic_checkpoint
    path = make_synthetic_checkpoint(tmp_path / "ckpt", num_layers=1, num_experts=6, hidden=288, intermediate=352,
                                     top_k=2, seed=4)
    plan = ShardPlan.create(num_experts=6, hidden=288, inter=352, tp_size=2, tp_rank=tp_rank, align="triton")
    with open_checkpoint(path) as ckpt:
        # 64 KiB buffers: each holds one expert's w13 (50 KB) or two of w2, so both turn over many times
        staged = load_layer(ckpt, 0, plan, device="cuda", max_read_bytes=65536, pinned_staging=True)
        pageable = load_layer(ckpt, 0, plan, device="cuda", pinned_staging=False)
        cpu = load_layer(ckpt, 0, plan, device="cpu")
    for name in ("w13_blocks", "w13_scales", "w13_bias", "w2_blocks", "w2_scales", "w2_bias", "router_weight",
                 "router_bias"):
        assert torch.equal(getattr(staged, name).cpu(), getattr(cpu, name)), name
        assert torch.equal(getattr(pageable, name).cpu(), getattr(cpu, name)), name
    assert staged.bytes_read == cpu.bytes_read
