"""The fragment-order words of `fragment_layout.to_fragment_order`, built by one Triton kernel on
the device: each output word looks up its four checkpoint bytes' bits in the same table the torch
build uses (`fragment_layout._placed_byte_bits`), so the two builds differ only in speed. The
torch build runs a gather per byte over a permuted copy of the codes and stays the reference
(tests/test_fragment_layout.py checks this one against it); this one is what a layer on a GPU
uses, since the build is part of every model load (benchmarks/RESULTS.md 2.1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compat import LAUNCH_OPTIONS

_WORDS_PER_PROGRAM = 1024


@triton.jit
def _fragment_words_kernel(blocks_ptr, table_ptr, words_ptr, total_words, n_rows, k_bytes,
                           expert_stride, row_stride, groups, steps,
                           BLOCK: tl.constexpr):
    # words [E, groups, steps, 32 lanes, 4]: word j = 2 kblock + half of lane 4 g + t covers row
    # 16 group + 8 half + g and bytes 32 step + 16 kblock + 4 pair + t, pair = 0..3.
    w = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = w < total_words
    j = w % 4
    lane = (w // 4) % 32
    step = (w // 128) % steps
    group = (w // (128 * steps)) % groups
    expert = w // (128 * steps * groups)
    row = 16 * group + 8 * (j % 2) + lane // 4
    first_byte = 32 * step + 16 * (j // 2) + lane % 4
    row_ok = in_range & (row < n_rows)
    source = blocks_ptr + expert * expert_stride + row * row_stride
    word = tl.zeros([BLOCK], dtype=tl.int32)
    for pair in tl.static_range(4):
        byte_index = first_byte + 4 * pair
        byte = tl.load(source + byte_index, mask=row_ok & (byte_index < k_bytes), other=0).to(tl.int32)
        word |= tl.load(table_ptr + 256 * pair + byte)
    tl.store(words_ptr + w, word, mask=in_range)


def _empty_words(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The uninitialized output (tests replace this to poison it: every word must be written)."""
    return torch.empty(shape, dtype=torch.int32, device=device)


def fragment_words(blocks: torch.Tensor, table: torch.Tensor, groups: int, steps: int) -> torch.Tensor:
    """blocks [E, N, K / 2] uint8 (rows contiguous), table [4, 256] int32 (`_placed_byte_bits`)
    -> words [E, groups, steps, 32, 4] int32, zero codes past N and K."""
    n_experts, n_rows, k_bytes = blocks.shape
    if blocks.stride(2) != 1:
        blocks = blocks.contiguous()
    words = _empty_words((n_experts, groups, steps, 32, 4), blocks.device)
    total = words.numel()
    if total:
        grid = (triton.cdiv(total, _WORDS_PER_PROGRAM),)
        _fragment_words_kernel[grid](blocks, table.contiguous(), words, total, n_rows, k_bytes,
                                     blocks.stride(0), blocks.stride(1), groups, steps,
                                     BLOCK=_WORDS_PER_PROGRAM, **LAUNCH_OPTIONS)
    return words
