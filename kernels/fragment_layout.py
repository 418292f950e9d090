"""MXFP4 expert weights re-arranged once, at load time, into the order the Hopper wgmma's
register operand wants them (`FragmentWeights`, read by the kernel of `_moe_matmul_rs.py`).

The kernel computes y.T = W @ x.T with the decoded weights as the wgmma's A fragment: in each
warp's 16 weight rows, lane 4 g + t holds rows g and g + 8 at k = 2 t + {0, 1} + 8 i. Here every
thread's codes of one step of K_STEP = 64 lie in 4 consecutive int32 words (one 16-byte load),
laid out

    words  [E, row_groups, k_steps, 32 lanes, 4]   int32, row_groups = ceil(N / 16)
    scales [E, row_groups, k_steps, 8, 4]          uint8, E8M0 byte + SCALE_BIAS

(k_steps = ceil(K / 64) rounded up to a multiple of 4, so that a kernel stepping 128 or 256 reads
whole steps.)
Word j = 2 * kblock + half of lane 4 g + t covers row 8 * half + g of its group and the 32-block
kblock of the step: 4 bf16 pairs, pair i at k = 32 kblock + 8 i + 2 t + {0, 1}. Inside a word the
8 codes' bits are placed so that a bit rotation and a mask turn the word into each pair's bf16
bits (`pair_bits`): code c becomes the bf16 c_sign << 15 | c_magnitude << 6, which is exactly
the E2M1 value times 2 ** -126 (the subnormal 0.5 included). The kernel multiplies that by
2 ** (b - 1) (b the E8M0 byte, stored as b + SCALE_BIAS, the bf16 exponent field of 2 ** (b - 1)),
so a pair costs about 2 integer instructions and one bf16x2 multiply: with the scale's own 2
per word, 15 SASS instructions per 8 weights, about 1.9 per weight (the checkpoint-order decode
of `_moe_matmul.py` takes about 3). Exact for scale bytes up to
MAX_SCALE_BYTE = 128 (2 ** (b - 1) must be a normal bf16); `fragment_order_problem` says when
weights are outside that range (NaN scales, weights beyond 12), and the layer then keeps the
checkpoint-order kernels. (Weights below 2 ** -126, from scale bytes 0 and 1, are exact here but
may be flushed to zero by the tensor cores.) Rows past N and K past the weights' K are zero codes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._format import BLOCK_SIZE, E8M0_BIAS, E8M0_NAN

LANES = 32
ROWS_PER_GROUP = 16           # a warp's share of the wgmma's 64 rows
K_STEP = 64                   # k per step of the layout: 4 words per lane
STEP_ALIGN = 4                # k_steps is a multiple of this: kernels may step 64, 128 or 256
_CHUNK_BYTES = 1 << 26        # codes re-arranged per pass of to_fragment_order
PAIRS_PER_WORD = 4
SCALE_BIAS = E8M0_BIAS - 1    # b + 126: bf16 exponent field of 2 ** (b - 1)
BF16_MANTISSA_BITS = 7        # stored byte << 7: the bf16 bits of 2 ** (b - 1)
MAX_SCALE_BYTE = 0xFE - SCALE_BIAS      # 128: 2 ** 127 is the largest normal bf16 power of two

# Where code bits land in a bf16 pair register: magnitude bits 0..2 at bf16 bits 6..8 of the low
# (even k) half and 22..24 of the high half, the sign at bit 15 / 31.
PAIR_MASK = 0x81C081C0
# Pairs 0..2 of a word: rotl(word, r) & PAIR_MASK. Pair 3: rotl(word, r_a) & MASK_A |
# rotl(word, r_b) & MASK_B. (No four rotations tile the word; `tests/test_fragment_layout.py`
# checks that these place every bit of the word exactly once.)
PAIR_ROTATIONS = (0, 4, 10)
LAST_PAIR_ROTATIONS = (6, 14)
LAST_PAIR_MASKS = (0x80C080C0, 0x01000100)


def _bf16_bit(code_bit: int, high_half: int) -> int:
    """The pair register bit that holds bit `code_bit` (0..2 magnitude, 3 sign) of the even
    (high_half 0) or odd (1) code."""
    return (6 + code_bit if code_bit < 3 else 15) + 16 * high_half


def word_bit(pair: int, high_half: int, code_bit: int) -> int:
    """The bit of a fragment word that holds bit `code_bit` of code (pair, high_half)."""
    q = _bf16_bit(code_bit, high_half)
    if pair < len(PAIR_ROTATIONS):
        rotation = PAIR_ROTATIONS[pair]
    else:
        rotation = LAST_PAIR_ROTATIONS[0] if (LAST_PAIR_MASKS[0] >> q) & 1 else LAST_PAIR_ROTATIONS[1]
    return (q - rotation) % 32


@dataclass(frozen=True)
class FragmentWeights:
    """One weight tensor [E, n, k] in fragment order (module docstring). Built by
    `to_fragment_order`; the checkpoint-order tensors stay where they were."""
    words: torch.Tensor
    scales: torch.Tensor
    n: int
    k: int

    @property
    def row_groups(self) -> int:
        return self.words.shape[1]

    @property
    def k_steps(self) -> int:
        return self.words.shape[2]


def layout_shape(n: int, k: int) -> tuple[int, int]:
    """(row_groups, k_steps) of an [n, k] weight in fragment order (module docstring)."""
    return -(-n // ROWS_PER_GROUP), -(-k // (K_STEP * STEP_ALIGN)) * STEP_ALIGN


def fragment_order_problem(scales_e8m0: torch.Tensor) -> str:
    """Why weights with these E8M0 scales cannot go into fragment order ("" when they can)."""
    top = int(scales_e8m0.max()) if scales_e8m0.numel() else 0
    if top == E8M0_NAN:
        return "a scale byte is 255 (NaN)"
    if top > MAX_SCALE_BYTE:
        return f"a scale byte is {top}, above {MAX_SCALE_BYTE} (the fragment-order decode's range)"
    return ""


@functools.lru_cache(maxsize=None)
def _placed_byte_bits_table() -> torch.Tensor:
    """[PAIRS_PER_WORD, 256] int32 on the CPU: the bits of a fragment word that checkpoint byte b
    sets in pair slot i (its low nibble, the even k, is the pair's low half), for every byte b
    (bit 31 as int32's sign bit). Built once: 8192 `word_bit` calls cost milliseconds, which
    every layer of a model load would pay twice."""
    def bits(pair: int, byte: int) -> int:
        codes = (byte & 0xF, byte >> 4)
        return sum(((codes[high] >> bit) & 1) << word_bit(pair, high, bit) for high in range(2) for bit in range(4))
    table = [[bits(pair, byte) for byte in range(256)] for pair in range(PAIRS_PER_WORD)]
    return torch.tensor(table, dtype=torch.int64).to(torch.int32)     # (wraps 2 ** 31 to int32)


def _placed_byte_bits(device: torch.device) -> torch.Tensor:
    """`_placed_byte_bits_table()` on `device`."""
    return _placed_byte_bits_table().to(device)


def _fragment_words_torch(blocks: torch.Tensor, placed: torch.Tensor, groups: int, steps: int) -> torch.Tensor:
    """to_fragment_order's words by torch gathers (the reference build)."""
    n_experts, n, k_half = blocks.shape
    kblocks = K_STEP // BLOCK_SIZE
    n_pad, k_pad = groups * ROWS_PER_GROUP, steps * K_STEP
    words = torch.empty(n_experts, groups, steps, LANES, 2 * kblocks, dtype=torch.int32, device=blocks.device)
    # A few experts at a time: the temporaries stay near _CHUNK_BYTES whatever the layer's size.
    chunk = max(1, _CHUNK_BYTES // max(1, n_pad * k_pad))
    for e0 in range(0, n_experts, chunk):
        e1 = min(n_experts, e0 + chunk)
        packed = torch.zeros(e1 - e0, n_pad, k_pad // 2, dtype=torch.uint8, device=blocks.device)
        packed[:, :n, :k_half] = blocks[e0:e1]
        # A pair (k, k + 1) is one checkpoint byte: byte 16 kblock + 4 pair + t of a step.
        # [e, group, half, g, step, kblock, pair, t] -> [e, group, step, g, t, kblock, half, pair]
        packed = packed.view(e1 - e0, groups, 2, 8, steps, kblocks, PAIRS_PER_WORD, 4).permute(0, 1, 4, 3, 7, 5, 2, 6)
        chunk_words = placed[0][packed[..., 0].int()]
        for pair in range(1, PAIRS_PER_WORD):      # each byte's word bits, looked up
            chunk_words |= placed[pair][packed[..., pair].int()]
        words[e0:e1] = chunk_words.reshape(e1 - e0, groups, steps, LANES, 2 * kblocks)
    return words


def to_fragment_order(blocks: torch.Tensor, scales_e8m0: torch.Tensor, *,
                      builder: str = "auto") -> FragmentWeights:
    """blocks [E, N, K // 2] uint8 (low nibble = even k), scales_e8m0 [E, N, K // 32] uint8 ->
    `FragmentWeights`, where the tensors are.

    builder: how the words are built. "torch": gathers over a permuted copy of the codes, a few
    experts at a time (temporaries of about 6 x _CHUNK_BYTES); the reference. "triton": one
    kernel (`_fragment_words.py`), no temporaries, the same words. "auto": triton for CUDA
    tensors, torch elsewhere.
    """
    if builder not in ("auto", "torch", "triton"):
        raise ValueError(f"to_fragment_order: builder must be 'auto', 'torch' or 'triton', got {builder!r}")
    if blocks.dim() != 3 or blocks.dtype != torch.uint8:
        raise ValueError(f"to_fragment_order: blocks must be [E, N, K // 2] uint8, got {tuple(blocks.shape)} "
                         f"{blocks.dtype}")
    n_experts, n, k_half = blocks.shape
    k = 2 * k_half
    if tuple(scales_e8m0.shape) != (n_experts, n, k // BLOCK_SIZE) or scales_e8m0.dtype != torch.uint8:
        raise ValueError(f"to_fragment_order: scales must be [{n_experts}, {n}, {k // BLOCK_SIZE}] uint8, got "
                         f"{tuple(scales_e8m0.shape)} {scales_e8m0.dtype}")
    problem = fragment_order_problem(scales_e8m0)
    if problem:
        raise ValueError(f"to_fragment_order: {problem}")
    groups, steps = layout_shape(n, k)
    kblocks = K_STEP // BLOCK_SIZE
    n_pad = groups * ROWS_PER_GROUP
    device = blocks.device

    placed = _placed_byte_bits(device)
    if builder == "triton" or (builder == "auto" and device.type == "cuda"):
        from ._fragment_words import fragment_words
        words = fragment_words(blocks, placed, groups, steps)
    else:
        words = _fragment_words_torch(blocks, placed, groups, steps)

    biased = torch.zeros(n_experts, n_pad, steps * kblocks, dtype=torch.uint8, device=device)
    biased[:, :n, :k // BLOCK_SIZE] = scales_e8m0 + SCALE_BIAS
    # [E, group, half, g, step, kblock] -> [E, group, step, g, kblock, half]
    scales = biased.view(n_experts, groups, 2, 8, steps, kblocks).permute(0, 1, 4, 3, 5, 2)
    scales = scales.reshape(n_experts, groups, steps, 8, 2 * kblocks)
    return FragmentWeights(words=words, scales=scales.contiguous(), n=n, k=k)


def from_fragment_order(fw: FragmentWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `to_fragment_order`: `fw` -> (blocks [E, N, K // 2] uint8, low nibble =
    even k; scales_e8m0 [E, N, K // 32] uint8), byte for byte what it was built from (the layout's
    own row and K padding dropped). Rebuilds checkpoint order for a layer that keeps only the
    fragment copy. Runs where `fw` is, a few experts at a time."""
    n_experts, groups, steps, lanes, j = fw.words.shape
    kblocks = j // 2
    if lanes != LANES or kblocks != K_STEP // BLOCK_SIZE or (groups, steps) != layout_shape(fw.n, fw.k):
        raise ValueError(f"from_fragment_order: words {tuple(fw.words.shape)} are not the layout of an "
                         f"[{fw.n}, {fw.k}] weight")
    n_pad, k_pad = groups * ROWS_PER_GROUP, steps * K_STEP
    device = fw.words.device
    blocks = torch.empty(n_experts, fw.n, fw.k // 2, dtype=torch.uint8, device=device)
    chunk = max(1, _CHUNK_BYTES // max(1, n_pad * k_pad))
    for e0 in range(0, n_experts, chunk):
        e1 = min(n_experts, e0 + chunk)
        words = fw.words[e0:e1].view(e1 - e0, groups, steps, 8, 4, kblocks, 2)    # [.., g, t, kblock, half]
        codes = torch.zeros(words.shape + (PAIRS_PER_WORD, 2), dtype=torch.uint8, device=device)
        for pair in range(PAIRS_PER_WORD):
            for high in range(2):
                code = torch.zeros(words.shape, dtype=torch.int32, device=device)
                for bit in range(4):
                    code |= ((words >> word_bit(pair, high, bit)) & 1) << bit
                codes[..., pair, high] = code.to(torch.uint8)
        # [e, group, step, g, t, kblock, half, pair, p] -> [e, group, half, g, step, kblock, pair, t, p]
        codes = codes.permute(0, 1, 6, 3, 2, 5, 7, 4, 8).reshape(e1 - e0, n_pad, k_pad)[:, :fw.n, :fw.k]
        blocks[e0:e1] = codes[..., 0::2] | (codes[..., 1::2] << 4)
    # [E, group, step, g, kblock, half] -> [E, group, half, g, step, kblock]
    biased = fw.scales.view(n_experts, groups, steps, 8, kblocks, 2).permute(0, 1, 5, 3, 2, 4)
    biased = biased.reshape(n_experts, n_pad, steps * kblocks)[:, :fw.n, :fw.k // BLOCK_SIZE]
    return blocks, (biased - SCALE_BIAS).contiguous()


def _rotl(words: torch.Tensor, r: int) -> torch.Tensor:
    return ((words << r) | (words >> (32 - r))) & 0xFFFFFFFF if r else words


def pair_bits(words: torch.Tensor) -> list[torch.Tensor]:
    """The kernel's integer step, in torch: int32 fragment words -> the 4 pair registers (int64
    holding 32 bits: low half even k, high half odd k, each the bf16 bits of E2M1 * 2 ** -126)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    pairs = [_rotl(w, r) & PAIR_MASK for r in PAIR_ROTATIONS]
    (ra, rb), (ma, mb) = LAST_PAIR_ROTATIONS, LAST_PAIR_MASKS
    pairs.append((_rotl(w, ra) & ma) | (_rotl(w, rb) & mb))
    return pairs


def dequantize_fragments(fw: FragmentWeights) -> torch.Tensor:
    """Decode `fw` the way the kernel does (bit rotations, then times 2 ** (b - 1)), back into
    [E, N, K] float32 checkpoint order: for tests of the layout against `mxfp4.dequantize`."""
    n_experts, groups, steps, _, j = fw.words.shape
    kblocks = j // 2
    halves = []
    for bits16 in (0, 16):
        pair_values = [((p >> bits16) & 0xFFFF).to(torch.int32) << 16 for p in pair_bits(fw.words)]
        halves.append(torch.stack([v.view(torch.float32) for v in pair_values], dim=-1))   # [..., pair]
    values = torch.stack(halves, dim=-1).to(torch.float64)           # [E, group, step, lane, j, pair, p]
    # tiny (E2M1 * 2 ** -126) * 2 ** (b - 1) with b = stored - SCALE_BIAS: E2M1 * 2 ** (b - 127)
    scale = torch.ldexp(torch.ones(fw.scales.shape, dtype=torch.float64, device=fw.scales.device),
                        fw.scales.to(torch.int32) - SCALE_BIAS - 1)
    scale = scale.repeat_interleave(4, dim=3)                         # 8 row slots -> 32 lanes
    values = values * scale[..., None, None]
    # [E, group, step, g, t, kblock, half, pair, p] -> [E, group, half, g, step, kblock, pair, t, p]
    values = values.view(n_experts, groups, steps, 8, 4, kblocks, 2, PAIRS_PER_WORD, 2)
    values = values.permute(0, 1, 6, 3, 2, 5, 7, 4, 8).reshape(n_experts, groups * ROWS_PER_GROUP,
                                                                  steps * K_STEP)
    return values[:, :fw.n, :fw.k].to(torch.float32)
