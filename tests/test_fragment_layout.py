"""The fragment-order weight layout (`mxfp4_moe.kernels.fragment_layout`) on the CPU: where each
code lands, the kernel's bit-level decode (emulated in torch) against `mxfp4.dequantize`, and the
errors. The kernel that reads it runs only on a Hopper GPU (tests/test_kernels_on_gpu.py)."""

import dataclasses
import os

import pytest
import torch

from mxfp4_moe import mxfp4
from mxfp4_moe.kernels import fragment_layout as fl
from mxfp4_moe.kernels.fragment_layout import to_fragment_order

# The Triton build runs through the interpreter on a CPU machine and compiled on a GPU one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_word_bits_hold_each_code_bit_exactly_once():
    bits = [fl.word_bit(pair, high, bit) for pair in range(4) for high in range(2) for bit in range(4)]
    assert sorted(bits) == list(range(32))


@pytest.mark.parametrize("shape", [(2, 40, 96), (3, 64, 128), (1, 17, 64), (2, 50, 192), (1, 16, 320)])
def test_kernel_decode_of_fragments_equals_dequantize(shape):
    # Random codes (all 16, subnormal 0.5 included) and scale bytes over the whole supported
    # range 0..128; N not a multiple of 16 and K not a multiple of 128 (zero padding).
    E, N, K = shape
    gen = torch.Generator().manual_seed(N + K)
    blocks = torch.randint(0, 256, (E, N, K // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, fl.MAX_SCALE_BYTE + 1, (E, N, K // 32), generator=gen, dtype=torch.uint8)
    scales.view(-1)[:2] = torch.tensor([0, fl.MAX_SCALE_BYTE], dtype=torch.uint8)
    fw = to_fragment_order(blocks, scales)
    groups, steps = -(-N // 16), 4 * -(-K // 256)       # steps of 64 k, a multiple of 4 of them
    assert fw.words.shape == (E, groups, steps, 32, 4) and fw.words.dtype == torch.int32
    assert fw.scales.shape == (E, groups, steps, 8, 4) and fw.scales.dtype == torch.uint8
    expected = mxfp4.dequantize(blocks, scales, torch.float32).view(E, N, K)
    assert torch.equal(fl.dequantize_fragments(fw), expected)


def test_fragment_word_holds_the_documented_codes():
    # Independent of the permutes in to_fragment_order: word j = 2 kblock + half of lane 4 g + t
    # in row group 0, step 0 holds row 8 half + g at k = 32 kblock + 8 i + 2 t + h.
    E, N, K = 1, 16, 64
    codes = torch.randint(0, 16, (E, N, K), generator=torch.Generator().manual_seed(1))
    blocks = mxfp4.pack_e2m1(codes.to(torch.uint8))
    fw = to_fragment_order(blocks, torch.full((E, N, 2), 127, dtype=torch.uint8))
    words = fw.words.to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        g, t = divmod(lane, 4)
        for kblock in range(2):
            for half in range(2):
                word = int(words[0, 0, 0, lane, 2 * kblock + half])
                for i in range(4):
                    for h in range(2):
                        code = int(codes[0, 8 * half + g, 32 * kblock + 8 * i + 2 * t + h])
                        got = sum(((word >> fl.word_bit(i, h, bit)) & 1) << bit for bit in range(4))
                        assert got == code, (lane, kblock, half, i, h)
    real = fw.scales[:, :, 0]                      # steps 1..3 pad the step count to a multiple of 4
    assert torch.equal(real, torch.full_like(real, 127 + fl.SCALE_BIAS))


def test_scales_outside_the_decode_range_are_refused():
    blocks = torch.zeros(1, 16, 32, dtype=torch.uint8)
    for byte, reason in ((mxfp4.E8M0_NAN, "NaN"), (fl.MAX_SCALE_BYTE + 1, "above")):
        scales = torch.full((1, 16, 2), 120, dtype=torch.uint8)
        scales[0, 3, 1] = byte
        assert reason in fl.fragment_order_problem(scales)
        with pytest.raises(ValueError, match=reason):
            to_fragment_order(blocks, scales)
    assert fl.fragment_order_problem(torch.full((1, 16, 2), fl.MAX_SCALE_BYTE, dtype=torch.uint8)) == ""


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="blocks must be"):
        to_fragment_order(torch.zeros(16, 32, dtype=torch.uint8), torch.zeros(16, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scales must be"):
        to_fragment_order(torch.zeros(1, 16, 32, dtype=torch.uint8), torch.zeros(1, 16, 3, dtype=torch.uint8))


def test_rs_kernel_needs_fragments_and_a_matching_config():
    from mxfp4_moe.kernels.moe_matmul import MatmulConfig
    from mxfp4_moe.kernels.moe_matmul import _rs_unsupported
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    blocks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    scales = torch.full((2, 32, 2), 127, dtype=torch.uint8)
    cfg = MatmulConfig(16, 64, 64, True, 4, 4, "rs", 3)
    assert "fragment order" in _rs_unsupported(x, None, 32, 64, cfg, torch.bfloat16, {})
    fw = to_fragment_order(blocks, scales)
    assert "[32, 64] weight, blocks an [48, 64]" in _rs_unsupported(x, fw, 48, 64, cfg, torch.bfloat16, {})
    assert "64, 128 or 256" in _rs_unsupported(x, fw, 32, 64, MatmulConfig(16, 64, 512, True, 4, 4, "rs", 3),
                                               torch.bfloat16, {})
    assert "split_k > 1 needs" in _rs_unsupported(x, fw, 32, 64, MatmulConfig(16, 64, 64, True, 4, 4, "rs", 3, 2),
                                                  torch.bfloat16, {})
    for block_n in (32, 96, 256):          # 16 or 32 weight rows per warp only: 64 or 128 at 4 warps
        assert "16 or 32 * num_warps" in _rs_unsupported(x, fw, 32, 64,
                                                         MatmulConfig(16, block_n, 64, True, 4, 4, "rs", 3),
                                                         torch.bfloat16, {})
    assert "Hopper" in _rs_unsupported(x, fw, 32, 64, MatmulConfig(16, 128, 64, True, 4, 4, "rs", 3),
                                       torch.bfloat16, {})      # past the config checks: only the CPU stops it
    assert "Hopper" in _rs_unsupported(x, fw, 32, 64, cfg, torch.bfloat16, {})     # on this CPU


def test_rs_kernel_is_the_hopper_default_with_fragments(monkeypatch):
    # With the weights in fragment order, bf16 on a Hopper GPU takes the "rs" kernel at every tile
    # size (a 256-wide K step for w13 and split-K for w2 at <= 8 routed rows); without them, or
    # off Hopper, the checkpoint-order defaults stay.
    import importlib
    launcher = importlib.import_module("mxfp4_moe.kernels.moe_matmul")
    monkeypatch.setattr(importlib.import_module("mxfp4_moe.kernels._device"), "interpreting", lambda: False)
    for block_m in (16, 32, 64, 128):
        for swiglu in (True, False):
            cfg = launcher.default_config(block_m, 5760, 2880, swiglu=swiglu, sm90=True, fragments=True, rows=4096)
            assert cfg.kernel == "rs" and cfg.block_m == block_m and cfg.split_k == 1
            assert cfg.width_step == (block_m // 2 if block_m >= 64 else 0)
            assert not _rs_problem(launcher, cfg, split_k_ok=not swiglu)
            assert launcher.default_config(block_m, 5760, 2880, swiglu=swiglu, sm90=True).kernel != "rs"
            assert launcher.default_config(block_m, 5760, 2880, swiglu=swiglu, fragments=True).kernel == "triton"
    w13 = launcher.default_config(16, 5760, 2880, swiglu=True, sm90=True, fragments=True, rows=4)
    w2 = launcher.default_config(16, 2880, 2880, swiglu=False, sm90=True, fragments=True, rows=4)
    assert (w13.block_k, w13.split_k) == (256, 1) and (w2.block_k, w2.split_k) == (128, 4)
    assert not _rs_problem(launcher, w13, split_k_ok=False) and not _rs_problem(launcher, w2, split_k_ok=True)


def _rs_problem(launcher, cfg, split_k_ok):
    """What _rs_unsupported says of `cfg` for gpt-oss-shaped fragments, Hopper assumed."""
    import unittest.mock
    x = torch.zeros(8, 256, dtype=torch.bfloat16)
    fw = to_fragment_order(torch.zeros(1, 32, 128, dtype=torch.uint8), torch.full((1, 32, 8), 127, dtype=torch.uint8))
    from mxfp4_moe.kernels import _device
    with unittest.mock.patch.object(_device, "on_hopper", lambda device: True):
        return launcher._rs_unsupported(x, fw, 32, 256, cfg, torch.bfloat16, {}, split_k_ok=split_k_ok)


def test_experts_re_arranged_in_chunks_give_the_same_words(monkeypatch):
    # to_fragment_order works a few experts at a time; one expert per pass must change nothing.
    gen = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 256, (5, 48, 160), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, fl.MAX_SCALE_BYTE + 1, (5, 48, 10), generator=gen, dtype=torch.uint8)
    whole = to_fragment_order(blocks, scales)
    monkeypatch.setattr(fl, "_CHUNK_BYTES", 1)
    chunked = to_fragment_order(blocks, scales)
    assert torch.equal(whole.words, chunked.words) and torch.equal(whole.scales, chunked.scales)


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 17, 96), (3, 40, 320), (2, 64, 512)])
def test_triton_build_gives_the_torch_words(shape, monkeypatch):
    # The device build (one Triton kernel) against the torch reference, on random codes, with N
    # not a multiple of 16 and K not a multiple of 256 (zero rows and steps), every output word
    # poisoned first: a word the kernel skips cannot pass. (On a GPU machine it runs compiled.)
    from mxfp4_moe.kernels import _fragment_words
    E, N, K = shape
    gen = torch.Generator().manual_seed(E * N + K)
    blocks = torch.randint(0, 256, (E, N, K // 2), generator=gen, dtype=torch.uint8).to(DEVICE)
    scales = torch.randint(0, fl.MAX_SCALE_BYTE + 1, (E, N, K // 32), generator=gen, dtype=torch.uint8).to(DEVICE)
    reference = to_fragment_order(blocks, scales, builder="torch")
    monkeypatch.setattr(_fragment_words, "_empty_words",
                        lambda shape, device: torch.full(shape, 0x5A5A5A5A, dtype=torch.int32, device=device))
    built = to_fragment_order(blocks, scales, builder="triton")
    assert torch.equal(built.words, reference.words) and torch.equal(built.scales, reference.scales)
    assert torch.equal(fl.dequantize_fragments(built), mxfp4.dequantize(blocks, scales, torch.float32).view(E, N, K))


def test_triton_build_reads_strided_experts():
    # A layer's weights may be a view (an expert slice, or rows of a larger tensor): same words.
    gen = torch.Generator().manual_seed(3)
    full = torch.randint(0, 256, (4, 40, 64), generator=gen, dtype=torch.uint8).to(DEVICE)
    blocks = full[1:3, 4:36]
    scales = torch.randint(0, fl.MAX_SCALE_BYTE + 1, (2, 32, 4), generator=gen, dtype=torch.uint8).to(DEVICE)
    built = to_fragment_order(blocks, scales, builder="triton")
    assert torch.equal(built.words, to_fragment_order(blocks.contiguous(), scales, builder="torch").words)


def test_unknown_builder_is_refused():
    with pytest.raises(ValueError, match="builder must be"):
        to_fragment_order(torch.zeros(1, 16, 32, dtype=torch.uint8), torch.zeros(1, 16, 2, dtype=torch.uint8),
                          builder="cuda")


def test_layer_keeps_fragment_order_only_where_its_kernel_runs():
    # On a CPU (or the torch backend) the default builds no fragment-order copy, and asking for
    # one says why not; weights outside the layout's scale range are named.
    from mxfp4_moe.moe import MXFP4MoE
    from mxfp4_moe.synthetic import random_expert_weights
    w, _ = random_expert_weights(4, 64, 64, top_k=2, dense=False)
    assert MXFP4MoE(w, backend="torch").fragments is None
    with pytest.raises(ValueError, match="Hopper GPU"):
        MXFP4MoE(w, backend="torch", fragment_order=True)
    w.w2_scales[0, 0, 0] = fl.MAX_SCALE_BYTE + 1
    with pytest.raises(ValueError, match="w2_scales: a scale byte is 129"):
        MXFP4MoE(w, backend="torch", fragment_order=True)
    assert MXFP4MoE(w, backend="torch", fragment_order=False).fragments is None


@pytest.mark.parametrize("shape", [(2, 40, 96), (1, 17, 64), (2, 50, 192), (1, 16, 320)])
def test_from_fragment_order_rebuilds_the_checkpoint_bytes(shape, monkeypatch):
    # Every code and scale byte of the supported range, N and K off the layout's 16-row and
    # 256-k grid: the inverse gives back exactly the bytes the layout was built from, in one
    # pass and one expert at a time.
    E, N, K = shape
    gen = torch.Generator().manual_seed(3 * N + K)
    blocks = torch.randint(0, 256, (E, N, K // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, fl.MAX_SCALE_BYTE + 1, (E, N, K // 32), generator=gen, dtype=torch.uint8)
    fw = to_fragment_order(blocks, scales)
    for chunk_bytes in (fl._CHUNK_BYTES, 1):
        monkeypatch.setattr(fl, "_CHUNK_BYTES", chunk_bytes)
        got_blocks, got_scales = fl.from_fragment_order(fw)
        assert got_blocks.shape == blocks.shape and got_scales.shape == scales.shape
        assert torch.equal(got_blocks, blocks) and torch.equal(got_scales, scales)


def test_from_fragment_order_refuses_words_of_another_shape():
    fw = to_fragment_order(torch.zeros(1, 32, 64, dtype=torch.uint8), torch.full((1, 32, 4), 127, dtype=torch.uint8))
    wrong = fl.FragmentWeights(words=fw.words, scales=fw.scales, n=48, k=fw.k)      # 3 row groups, 2 held
    with pytest.raises(ValueError, match=r"not the layout of an \[48, 128\] weight"):
        fl.from_fragment_order(wrong)


def test_shape_only_weights_need_fragments_and_the_rs_kernel():
    # A layer that keeps only the fragment copy passes meta-device blocks and scales: without
    # fragments, or where the "rs" kernel cannot run (here: the interpreter), the call says so
    # instead of reading weights that are not there.
    from mxfp4_moe.kernels.moe_matmul import moe_matmul
    from mxfp4_moe.synthetic import random_expert_weights
    from mxfp4_moe.routing import routing_metadata
    w, _ = random_expert_weights(4, 64, 64, top_k=2, dense=False)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    meta = routing_metadata(ids, w.expert_map, 4, 16, torch.full((3, 2), 0.5))
    x = torch.randn(3, 64)
    shape_only = [torch.empty(t.shape, dtype=torch.uint8, device="meta") for t in (w.w13_blocks, w.w13_scales)]
    with pytest.raises(ValueError, match="must come as fragments="):
        moe_matmul(x, *shape_only, w.w13_bias, meta, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="both are shape-only"):
        moe_matmul(x, shape_only[0], w.w13_scales, w.w13_bias, meta, compute_dtype=torch.float32,
                   fragments=to_fragment_order(w.w13_blocks, w.w13_scales))
    with pytest.raises(ValueError, match="fragment order only.*'triton'"):
        moe_matmul(x, *shape_only, w.w13_bias, meta, compute_dtype=torch.float32,
                   fragments=to_fragment_order(w.w13_blocks, w.w13_scales))


def test_layer_cannot_drop_its_only_copy():
    from mxfp4_moe.moe import MXFP4MoE
    from mxfp4_moe.synthetic import random_expert_weights
    w, _ = random_expert_weights(4, 64, 64, top_k=2, dense=False)
    with pytest.raises(ValueError, match="keep_checkpoint_order=False needs the fragment-order copy"):
        MXFP4MoE(w, backend="torch", keep_checkpoint_order=False)
    layer = MXFP4MoE(w, backend="torch")
    assert layer.holds_checkpoint_order and layer.checkpoint_weights() is layer.weights


class _RecordingKernel:
    """Stands in for a Gluon kernel on the CPU: records the grid and keyword arguments of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, {**kwargs, "args": args}))


@pytest.fixture
def rs_launches(monkeypatch):
    """The launcher as on a Hopper GPU, with the "rs" Gluon kernel replaced by a recorder:
    returns (the launcher module, the recorder)."""
    import importlib
    launcher = importlib.import_module("mxfp4_moe.kernels.moe_matmul")
    rs_module = importlib.import_module("mxfp4_moe.kernels._moe_matmul_rs")
    recorder = _RecordingKernel()
    monkeypatch.setattr(rs_module, "_moe_matmul_rs_kernel", recorder)
    device = importlib.import_module("mxfp4_moe.kernels._device")    # where every kernel module asks
    monkeypatch.setattr(device, "on_hopper", lambda device: True)
    monkeypatch.setattr(device, "interpreting", lambda: False)
    return launcher, recorder


def test_launcher_picks_the_rs_kernel_and_drops_split_k_where_it_cannot_sum(rs_launches):
    # The launch moe_matmul would make on a Hopper GPU with fragments, as the kernel sees it: the
    # few-rows w2 config splits K over the grid's third axis with atomic combine, and runs
    # unsplit (one program per tile) when writing rows; an explicit split config there raises.
    from mxfp4_moe.synthetic import random_expert_weights
    from mxfp4_moe.routing import routing_metadata
    launcher, recorder = rs_launches
    w, _ = random_expert_weights(8, 128, 128, top_k=4, dense=False)
    act = torch.zeros(4, w.inter_pad, dtype=torch.bfloat16)
    meta = routing_metadata(torch.tensor([[0, 1, 2, 3]]), w.expert_map, 8, 16, torch.full((1, 4), 0.25))
    fragments = to_fragment_order(w.w2_blocks, w.w2_scales)
    common = dict(gather=False, apply_row_weight=True, n_out=w.hidden, fragments=fragments)
    launcher.moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, combine="atomic", **common)
    launcher.moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, combine="none", **common)
    (grid_atomic, atomic), (grid_rows, rows) = recorder.launches
    assert atomic["SPLIT_K"] == 4 and grid_atomic[2] == 4 and atomic["ATOMIC"] and atomic["BLOCK_K"] == 128
    assert rows["SPLIT_K"] == 1 and grid_rows[2] == 1 and not rows["ATOMIC"]
    assert grid_atomic[1] == meta.max_tiles == 4           # 4 routed rows: at most 4 tiles
    with pytest.raises(ValueError, match="kernel 'rs' cannot run this call: split_k > 1 needs"):
        launcher.moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, combine="none",
                            config=launcher.MatmulConfig(16, 64, 128, True, 4, 4, "rs", 2, split_k=4), **common)


def test_launcher_reads_sorted_rows_by_tma_from_64_wide_k_steps(rs_launches):
    # w2 reads its x rows in sorted order (no gather): with K steps of 64 the "rs" kernel takes
    # them by TMA, one [block_m, 64] box per step over x as it is; w13 gathers token rows and
    # keeps cp.async (no descriptor), as does w2 at K steps of 128.
    from mxfp4_moe.synthetic import random_expert_weights
    from mxfp4_moe.routing import routing_metadata
    launcher, recorder = rs_launches
    w, _ = random_expert_weights(8, 128, 128, top_k=4, dense=False)
    tokens = 600
    ids = torch.arange(tokens * 4).remainder(8).view(tokens, 4)
    meta = routing_metadata(ids, w.expert_map, 8, 64, torch.full((tokens, 4), 0.25))
    x = torch.zeros(tokens, w.hidden, dtype=torch.bfloat16)
    act = torch.zeros(tokens * 4, w.inter_pad, dtype=torch.bfloat16)
    config = launcher.default_config(64, w.hidden, w.inter_pad, sm90=True, fragments=True)
    assert config.block_k == 64 and not config.pipeline_mma
    launcher.moe_matmul(x, w.w13_blocks, w.w13_scales, w.w13_bias, meta, swiglu=(1.702, 7.0),
                        fragments=to_fragment_order(w.w13_blocks, w.w13_scales))
    w2_fragments = to_fragment_order(w.w2_blocks, w.w2_scales)
    for block_k in (64, 128):
        launcher.moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, gather=False, combine="atomic",
                            apply_row_weight=True, fragments=w2_fragments,
                            config=dataclasses.replace(config, block_k=block_k))
    (_, w13), (_, w2), (_, w2_bk128) = recorder.launches
    assert not w13["X_TMA"] and w13["GATHER"] and not w2_bk128["X_TMA"]
    assert w2["X_TMA"] and not w2["GATHER"]
    descriptors = [arg for arg in w2["args"] if type(arg).__name__ == "TensorDescriptor"]
    assert len(descriptors) == 1 and descriptors[0].base is act
    assert list(descriptors[0].block_shape) == [64, 64] and list(descriptors[0].shape) == list(act.shape)


def test_rs_constexprs_name_every_tiling_constexpr_of_the_kernel():
    # moe_matmul launches the "rs" kernel with rs_constexprs plus the fused-step flags, X_TMA
    # (set by the call: w2's sorted rows, no gather) and PDL (the device), and sm90_report compiles the same dict:
    # together they must be exactly the kernel's constexprs.
    from mxfp4_moe.kernels._moe_matmul_rs import _moe_matmul_rs_kernel
    from mxfp4_moe.kernels.fragment_layout import layout_shape
    from mxfp4_moe.kernels.moe_matmul import MatmulConfig, rs_constexprs
    fused = {"GATHER", "SCATTER", "ATOMIC", "HAS_BIAS", "HAS_CHANNEL_SCALE", "SWIGLU", "ROW_WEIGHT", "X_TMA",
             "L2_PREFETCH", "PDL", "num_warps"}
    kernel_constexprs = {p.name for p in _moe_matmul_rs_kernel.params if p.is_constexpr}
    cfg = MatmulConfig(128, 128, 64, True, 8, 4, "rs", 3, width_step=64)
    got = rs_constexprs(cfg, *layout_shape(2880, 2880), 2880, 2880)
    assert set(got) | fused == kernel_constexprs and not set(got) & fused
    assert layout_shape(2880, 2880) == (180, 48)
    assert (got["NUM_K"], got["LAYOUT_STEPS"], got["EVEN_K"], got["ROW_MASK"]) == (45, 48, True, True)  # 180 % 8
    split = rs_constexprs(MatmulConfig(16, 64, 128, True, 4, 4, "rs", 2, split_k=4), 180, 48, 2880, 2880)
    assert (split["NUM_K"], split["EVEN_K"], split["ROW_MASK"]) == (23, False, False)   # 23 steps, 4 splits
    assert not rs_constexprs(cfg, 180, 48, 2880, 2816)["EVEN_K"]         # x narrower than K: masked columns


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="runs the layer's other Triton kernels on CPU tensors: needs the interpreter "
                           "(a GPU machine runs the real launch in tests/test_kernels_on_gpu.py)")
def test_layer_with_only_the_fragment_copy_launches_from_it(rs_launches, monkeypatch):
    # As on a Hopper GPU (the Gluon kernel replaced by a recorder): by default the layer builds
    # the fragment copy and drops checkpoint order, leaving the caller's weights as they were;
    # checkpoint_weights() rebuilds them exactly, and forward, even on float32 tokens with an
    # odd row stride, launches the "rs" kernel on the fragments for both matmuls.
    from mxfp4_moe import kernel_api
    from mxfp4_moe.moe import CHECKPOINT_ORDER_TENSORS, MXFP4MoE
    from mxfp4_moe.synthetic import random_expert_weights
    _, recorder = rs_launches
    # Only the kernels see a GPU: the package (the layer's backend, the routing kernels) still
    # runs through the interpreter on these CPU tensors.
    monkeypatch.setattr(kernel_api, "interpreting", lambda: True, raising=False)
    w, _ = random_expert_weights(4, 64, 64, top_k=2, dense=False)
    originals = {name: getattr(w, name).clone() for name in CHECKPOINT_ORDER_TENSORS}
    layer = MXFP4MoE(w, backend="triton", compute_dtype=torch.bfloat16)
    assert layer.fragments is not None and not layer.holds_checkpoint_order
    assert all(getattr(layer.weights, name).is_meta for name in CHECKPOINT_ORDER_TENSORS)
    assert layer.weights.device == w.device and layer.weights.num_local_experts == 4
    rebuilt = layer.checkpoint_weights()
    for name, original in originals.items():
        assert torch.equal(getattr(w, name), original), name          # the caller's copy untouched
        assert torch.equal(getattr(rebuilt, name), original), name
    y = layer(torch.randn(5, 67)[:, :64])
    assert y.dtype == torch.float32 and y.shape == (5, 64)           # x's dtype, whatever the kernels ran in
    (_, w13), (_, w2) = recorder.launches
    assert w13["SWIGLU"] and w13["GATHER"] and w2["ATOMIC"] and not w2["GATHER"]
    kept = MXFP4MoE(w, backend="triton", compute_dtype=torch.bfloat16, keep_checkpoint_order=True)
    assert kept.fragments is not None and kept.holds_checkpoint_order and kept.checkpoint_weights() is kept.weights


def test_rs_kernel_waits_for_its_predecessor_exactly_when_launched_dependent(rs_launches, monkeypatch):
    # A programmatic dependent launch that skips griddepcontrol.wait would read its predecessor's
    # outputs early: the PDL constexpr and the launch attribute must always agree.
    from mxfp4_moe.synthetic import random_expert_weights
    from mxfp4_moe.routing import routing_metadata
    launcher, recorder = rs_launches
    w, _ = random_expert_weights(8, 128, 128, top_k=4, dense=False)
    act = torch.zeros(4, w.inter_pad, dtype=torch.bfloat16)
    meta = routing_metadata(torch.tensor([[0, 1, 2, 3]]), w.expert_map, 8, 16, torch.full((1, 4), 0.25))
    fragments = to_fragment_order(w.w2_blocks, w.w2_scales)
    common = dict(gather=False, apply_row_weight=True, n_out=w.hidden, fragments=fragments, combine="atomic")
    launcher.moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, **common)     # a CPU tensor: no PDL
    monkeypatch.setattr(launcher, "pdl_launch", lambda device: True)
    launcher.moe_matmul(act, w.w2_blocks, w.w2_scales, w.w2_bias, meta, **common)
    (_, plain), (_, dependent) = recorder.launches
    assert plain["PDL"] is False and plain["launch_pdl"] is False
    assert dependent["PDL"] is True and dependent["launch_pdl"] is True


def test_dependent_launch_only_on_a_gpu_that_has_it(monkeypatch):
    from mxfp4_moe.kernels import _device
    from mxfp4_moe.kernels import _grid_dependency as gd
    assert not gd.pdl_launch(torch.device("cpu"))
    monkeypatch.setattr(_device, "_CUDA_MAJOR", {0: 9})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert gd.pdl_launch(torch.device("cuda", 0))
    monkeypatch.setattr(gd, "ENABLED", False)
    assert not gd.pdl_launch(torch.device("cuda", 0))
    monkeypatch.setattr(gd, "ENABLED", True)
    monkeypatch.setattr(_device, "_CUDA_MAJOR", {0: 8})
    assert not gd.pdl_launch(torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_device, "_CUDA_MAJOR", {0: 9})
    assert not gd.pdl_launch(torch.device("cuda", 0))
