"""Block configs of the grouped MXFP4 matmul: `MatmulConfig` (block sizes, schedule and kernel of
one launch), the rows per tile (`pick_block_m`), the tuned defaults (`default_config`, the "rs"
kernel's tables `_RS_CONFIGS`) and the "rs" kernel's tiling constexprs. Adding a config or a
default is a change here; whether a kernel can run a call is `moe_matmul_support.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import _device

Kernel = Literal["triton", "sm90", "rs"]


@dataclass(frozen=True)
class MatmulConfig:
    """Block sizes and schedule of one launch; block_m must equal the routing metadata's.

    kernel: "triton" (`_moe_matmul.py`: any GPU and the interpreter), "sm90" (`_moe_matmul_sm90.py`:
      Hopper, bf16, checkpoint order; the decode of a K step overlaps the previous step's wgmma)
      or "rs" (`_moe_matmul_rs.py`: Hopper, bf16, weights in fragment order, passed as
      `moe_matmul(fragments=...)`, decoded into the wgmma's register operand).
    num_stages: "sm90": the copy ring's depth (>= 2, num_stages - 1 steps in flight); "rs": x
      buffers (>= 3, num_stages - 2 steps in flight); "triton": Triton's software pipelining.
    "rs" only: swap_ab, block_n = 16 or 32 * num_warps (weight rows per warp), block_k 64, 128 or
      256; prefetch (>= 1): K steps of weights held in registers (prefetch - 1 loaded ahead);
      split_k: programs per tile along K (w2's atomic combine adds their partial sums);
      pipeline_mma: each step's wgmma runs on during the next step's decode, on a second register
      fragment (correct, but off by default: the extra registers halve the programs per SM);
      width_step (0 = off): an expert's last, partial tile runs on the wgmma's N side only as wide
      as its rows rounded up to width_step (a power of two in [4 * num_warps, block_m)).
    "sm90" only: the wgmma's row side (block_n with swap_ab, else block_m) a multiple of
      16 * num_warps, block_k in 32..256.
    Why the defaults are what they are: benchmarks/RESULTS.md section 3.4.
    """
    block_m: int
    block_n: int
    block_k: int
    swap_ab: bool
    num_warps: int = 4
    num_stages: int = 3
    kernel: Kernel = "triton"
    prefetch: int = 1
    split_k: int = 1
    pipeline_mma: bool = False
    width_step: int = 0


def pick_block_m(num_rows: int, num_local_experts: int) -> int:
    """Rows per tile: a power of two in 16..128.

    The smallest one at or above the mean rows per local expert m, one step larger when that
    leaves many experts needing a second tile (m + 2 * sqrt(m) above it: the counts are roughly
    Poisson, and reading them would synchronise) while the tile is still a small swapped one
    (<= 32 rows): every extra tile reads and dequantizes its expert's weights again
    (RESULTS.md 3.4).
    """
    mean = num_rows / max(1, num_local_experts)
    block_m = 16
    while block_m < 128 and block_m < mean:
        block_m *= 2
    if block_m <= 16 and mean + 2.0 * mean ** 0.5 > block_m:
        block_m *= 2
    return block_m


# The fragment-order kernel's config per tile size: 64-row programs (4 warps) except at 128-row
# tiles, where 8 warps share each x tile; 128-wide K steps up to 32-row tiles, 64 from there;
# from 64 rows, width_step half the tile. At <= 8 routed rows (a few hundred programs) the K loop's
# length bounds the time: w13 takes 256-wide steps, w2 splits K in 4. The fastest of the configs
# measured: RESULTS.md 3.4.
_RS_FEW_ROWS = 8
_RS_FEW_ROWS_CONFIGS = {True: MatmulConfig(16, 64, 256, True, 4, 4, "rs", 2),
                        False: MatmulConfig(16, 64, 128, True, 4, 4, "rs", 2, split_k=4)}
_RS_CONFIGS = {16: MatmulConfig(16, 64, 128, True, 4, 4, "rs", 2),
               32: MatmulConfig(32, 64, 128, True, 4, 4, "rs", 2),
               64: MatmulConfig(64, 64, 64, True, 4, 4, "rs", 2, width_step=32),
               128: MatmulConfig(128, 128, 64, True, 8, 4, "rs", 3, width_step=64)}


def default_config(block_m: int, n: int, k: int, *, swiglu: bool = False, sm90: bool = False,
                   mean_rows: float | None = None, fragments: bool = False, rows: int | None = None) -> MatmulConfig:
    """Block sizes for an [n, k] weight at `block_m` rows per tile (swiglu: the w13 launch;
    mean_rows: routed rows per local expert, rows: routed rows in all, when known; fragments:
    the weights are also in fragment order, and sm90: on a Hopper GPU in bf16 -> the "rs"
    kernel; its split_k > 1 assumes w2's atomic combine, the launcher drops it otherwise).

    With fragments on sm90: `_RS_CONFIGS` by tile size (`_RS_FEW_ROWS_CONFIGS` at <= 8 rows).
    Otherwise: few rows per expert, swap A and B (y.T = W @ x.T) so weight rows fill the MMA's
    wide side; sm90 (a Hopper GPU and bf16) from 64-row tiles up, the "sm90" Gluon kernel, whose
    weight decode overlaps the previous K step's wgmma. The choices are the fastest of the
    sweeps and probes in benchmarks/RESULTS.md (H200 and H100). Under the interpreter, small
    blocks (it runs per program in numpy).
    """
    if _device.interpreting():
        return MatmulConfig(block_m, block_n=32, block_k=64, swap_ab=block_m <= 32, num_warps=4, num_stages=1)
    if sm90 and fragments and block_m in _RS_CONFIGS:
        if block_m == 16 and rows is not None and rows <= _RS_FEW_ROWS:
            return _RS_FEW_ROWS_CONFIGS[swiglu]
        return _RS_CONFIGS[block_m]
    if block_m <= 16 and not swiglu and mean_rows is not None and mean_rows < 1:
        # w2 with fewer rows than experts (T = 1, 8 at E = 128): half the K steps per program
        # (RESULTS.md 3.4).
        return MatmulConfig(block_m, block_n=64, block_k=128, swap_ab=True, num_warps=4, num_stages=4)
    if block_m <= 16:
        return MatmulConfig(block_m, block_n=64, block_k=64, swap_ab=True, num_warps=4, num_stages=4)
    if block_m <= 32:
        # 128 weight rows: two wgmma row blocks share each x tile (RESULTS.md 3.4).
        return MatmulConfig(block_m, block_n=128, block_k=64, swap_ab=True, num_warps=4, num_stages=4)
    if block_m == 64:
        return MatmulConfig(block_m, block_n=128, block_k=64, swap_ab=False, num_warps=4, num_stages=3,
                            kernel="sm90" if sm90 else "triton")
    if sm90:
        # Two warpgroups (64 rows each) share each weight tile; 4 x tiles in flight.
        return MatmulConfig(block_m, block_n=128, block_k=64, swap_ab=False, num_warps=8, num_stages=4,
                            kernel="sm90")
    if not swiglu:
        # w2 at 128-row tiles: 4 warps and 4 stages (still no spills), RESULTS.md 3.4.
        return MatmulConfig(block_m, block_n=128, block_k=64, swap_ab=False, num_warps=4, num_stages=4)
    return MatmulConfig(block_m, block_n=128, block_k=64, swap_ab=False, num_warps=8, num_stages=3)


def rs_constexprs(config: MatmulConfig, row_groups: int, k_steps: int, k: int, k_x: int) -> dict:
    """The "rs" kernel's tiling constexprs for a weight of K = k in fragment order (row_groups,
    k_steps: `FragmentWeights`) and x with k_x columns: what `moe_matmul` launches and what
    `sm90_report` compiles."""
    steps = -(-k // config.block_k)
    return dict(NUM_K=steps, LAYOUT_STEPS=k_steps, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, STAGES=config.num_stages, PREFETCH=config.prefetch, SPLIT_K=config.split_k,
                PIPELINE_MMA=config.pipeline_mma, WIDTH_STEP=config.width_step,
                EVEN_K=k_x == steps * config.block_k and steps % config.split_k == 0,
                ROW_MASK=row_groups % (config.block_n // 16) != 0)
