"""The grouped MXFP4 matmul kernels on a GPU at gpt-oss sizes (bf16): the weight decode bit for bit
(the inline-PTX decode on every code x scale byte, and the kernel with it against the kernel with the
one-code-at-a-time decode), and each kernel ("triton", "sm90", "rs") against a float32 reference on
the dequantized weights. Run on a CUDA machine with `pytest -m gpu`; skipped elsewhere.

Tolerance: relative Frobenius error < 5e-3 (bf16 operands and bf16 intermediate; triton_kernels
measures 1.7e-3 for w13 and 2.4e-3 for w2 on the same kind of data).
"""

import pytest
import torch
import triton
import triton.language as tl

from mxfp4_moe import mxfp4
from mxfp4_moe.synthetic import random_expert_weights
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
