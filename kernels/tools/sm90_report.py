"""Compile the grouped-matmul kernel ahead of time for Hopper (sm_90) on any machine, no GPU
needed, and report its resource use: registers, spills, shared memory and whether the dots
became wgmma (HGMMA in the SASS). Used by a CPU test and before spending GPU time. A tool that
drives the compiler, not a runtime module: it sits in kernels/tools/, apart from the kernels it
compiles, and nothing at run time imports it.

    python -m mxfp4_moe.kernels.tools.sm90_report                  # one JSON line per default config
    python -m mxfp4_moe.kernels.tools.sm90_report --dequant=bytes  # the Triton kernel's one-code-at-a-time path
    python -m mxfp4_moe.kernels.tools.sm90_report --small-shapes   # every default config at small H, I
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import _device
from .._compat import LAUNCH_OPTIONS
from ..moe_matmul import MatmulConfig, default_config

_TL_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# gpt-oss shapes: w13 [2 * 2880, 2880] with SwiGLU, w2 [2880, 2880] with atomic combine; TP-4 w2.
VARIANTS = (
    # name, N, K, block_m, swiglu, atomic
    ("w13_bm16", 5760, 2880, 16, True, False),
    ("w2_bm16", 2880, 2880, 16, False, True),
    ("w13_bm32", 5760, 2880, 32, True, False),
    ("w2_bm32", 2880, 2880, 32, False, True),
    ("w13_bm64", 5760, 2880, 64, True, False),
    ("w2_bm64", 2880, 2880, 64, False, True),
    ("w13_bm128", 5760, 2880, 128, True, False),
    ("w2_bm128", 2880, 2880, 128, False, True),
    ("w2_tp4_bm128", 2880, 768, 128, False, True),
)


def sm90_ptxas_version() -> tuple[int, int]:
    """(major, minor) CUDA release of the ptxas Triton assembles sm_90 code with (its bundled one,
    `ptxas-blackwell` from Triton 3.9, or TRITON_PTXAS_PATH). From CUDA 13.3 ptxas no longer
    reuses the registers of a wgmma still in flight (triton#9433, fixed by triton PR #11781)."""
    from triton.backends.nvidia.compiler import get_ptxas_version
    found = re.search(r"release (\d+)\.(\d+)", get_ptxas_version(90))
    if not found:
        raise RuntimeError(f"sm90_report: cannot read the ptxas release from {get_ptxas_version(90)!r}")
    return int(found.group(1)), int(found.group(2))


def _bin_dir() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


_UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_sk", "stride_bn", "stride_yn")


def _int_args(config: MatmulConfig, *, k: int, n: int, atomic: bool) -> dict:
    """Integer arguments of a launch on contiguous tensors: x [rows, k], blocks [E, n, k // 2],
    scales [E, n, k // 32], bias [E, n], y [rows, n_out] (n_out = n, or n // 2 with SwiGLU)."""
    n_out = n if atomic else n // 2
    return {"stride_xm": k, "stride_we": n * k // 2, "stride_wn": k // 2, "stride_se": n * k // 32,
            "stride_sn": k // 32, "stride_be": n, "stride_cse": n * k // 2, "stride_csn": k // 2,
            "stride_ym": n_out, "N": n, "K_X": k, "N_OUT": n_out}


def _signature(x_type: str, y_type: str) -> dict:
    """Runtime argument types of both kernels (each takes the names it has)."""
    return {
        "x_ptr": x_type, "stride_xm": "i32",
        "w_ptr": "*u8", "stride_we": "i32", "stride_wn": "i32",
        "s_ptr": "*u8", "stride_se": "i32", "stride_sn": "i32",
        "bias_ptr": "*fp32", "stride_be": "i32",
        "cs_ptr": "*fp32", "stride_cse": "i32", "stride_csn": "i32",
        "y_ptr": y_type, "stride_ym": "i32",
        "gather_ptr": "*i32", "scatter_ptr": "*i32", "row_weight_ptr": "*fp32",
        "expert_offsets_ptr": "*i32", "tile_expert_ptr": "*i32", "tile_row_start_ptr": "*i32",
        "N": "i32", "K_X": "i32", "N_OUT": "i32", "alpha": "fp32", "limit": "fp32",
    }


def _compile(kernel, source_type, signature: dict, constexprs: dict, config: MatmulConfig, *, k: int, n: int,
             swiglu: bool, atomic: bool, options: dict):
    """Compile `kernel` for sm_90 with the fused steps of a gpt-oss launch (bias always; gather
    for w13, scatter + atomic + routing weight for w2; SwiGLU if asked) and what the launcher's runtime
    specialization sees for contiguous tensors: pointers and ints divisible by 16 get
    divisibility 16 (unit strides are constexprs or absent). Constexprs the kernel does not
    take are left out."""
    constexprs = {
        "K": k, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
        "GATHER": not atomic, "SCATTER": atomic, "ATOMIC": atomic, "HAS_BIAS": True,
        "HAS_CHANNEL_SCALE": False, "SWIGLU": swiglu, "ROW_WEIGHT": atomic, "ACTIVATION": "swiglu_oai",
        **constexprs,
    }
    names = list(kernel.arg_names)
    constexprs = {name: value for name, value in constexprs.items() if name in names}
    signature = {name: "constexpr" if name in constexprs else signature[name] for name in names}
    divisible = {name for name, ty in signature.items() if ty.startswith("*")}
    divisible |= {name for name, value in _int_args(config, k=k, n=n, atomic=atomic).items()
                  if value % 16 == 0 and name in signature}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = source_type(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={**LAUNCH_OPTIONS, **options})


def compile_variant(config: MatmulConfig, *, k: int, swiglu: bool, atomic: bool, n: int = 2880,
                    compute: str = "bfloat16", x_dtype: str = "bfloat16", dequant: str | None = None,
                    retire_mma_each_step: bool | None = None, rs_kernel=None, l2_prefetch: bool = False):
    """Compile the kernel `config` names for sm_90 as a launch on contiguous tensors of an [n, k]
    weight would specialize it; returns triton's CompiledKernel. For the Triton kernel: dequant, its DEQUANT
    (default: what the launcher picks on a GPU, "ptx" for bf16, else "bytes");
    retire_mma_each_step, its RETIRE_MMA_EACH_STEP (default: as the launcher sets it on a GPU,
    i.e. config.swap_ab). The Gluon kernels ("sm90", "rs") are bf16 only. rs_kernel: compile this
    variant of the "rs" kernel (same arguments) in its place (`benchmarks/probes/probe_rs_parts.py`);
    l2_prefetch: its L2_PREFETCH."""
    if _device.interpreting():
        raise RuntimeError("sm90_report needs TRITON_INTERPRET unset (the interpreter replaces triton.jit)")
    if config.kernel == "rs":
        from triton.experimental.gluon._runtime import GluonASTSource
        from .._moe_matmul_rs import _moe_matmul_rs_kernel
        from ..fragment_layout import layout_shape
        from ..moe_matmul import rs_constexprs, rs_x_tma_block
        signature = {**_signature("*bf16", "*fp32" if atomic else "*bf16"), "words_ptr": "*i32", "row_groups": "i32"}
        # PDL as the launcher sets it on Hopper (`_grid_dependency.pdl_launch`).
        signature.update(next_words_ptr="*i32", next_scales_ptr="*u8", next_expert_words="i32",
                         next_expert_scales="i32")
        constexprs = {**rs_constexprs(config, *layout_shape(n, k), k, k), "num_warps": config.num_warps, "PDL": True,
                      "L2_PREFETCH": l2_prefetch}
        # As the launcher: w2 (atomic, no gather) reads x by TMA where `rs_x_tma_block` allows.
        x_tma = rs_x_tma_block(config) if atomic else None
        if x_tma is None:
            constexprs.update(x_desc=None, X_TMA=False)
        else:
            (rows, cols), x_layout = x_tma
            signature["x_desc"] = f"tensordesc<bf16[{rows}, {cols}],{x_layout!r}>"
            constexprs["X_TMA"] = True
        return _compile(rs_kernel or _moe_matmul_rs_kernel, GluonASTSource, signature, constexprs, config, k=k, n=n,
                        swiglu=swiglu, atomic=atomic, options={"num_warps": config.num_warps})
    if config.kernel == "sm90":
        from triton.experimental.gluon._runtime import GluonASTSource
        from .._moe_matmul_sm90 import _moe_matmul_sm90_kernel
        from ..moe_matmul import words_tma_block
        block, words_layout = words_tma_block(config)
        signature = {**_signature("*bf16", "*fp32" if atomic else "*bf16"),
                     "words_desc": f"tensordesc<i32[{block[0]}, {block[1]}],{words_layout!r}>",
                     "rows_per_expert": "i32"}
        return _compile(_moe_matmul_sm90_kernel, GluonASTSource, signature,
                        {"STAGES": config.num_stages, "SWAP_AB": config.swap_ab, "num_warps": config.num_warps},
                        config, k=k, n=n, swiglu=swiglu, atomic=atomic, options={"num_warps": config.num_warps})
    import triton.language as tl
    from .._moe_matmul import _moe_matmul_kernel
    constexprs = {
        **{name: 1 for name in _UNIT_STRIDES},
        "SWAP_AB": config.swap_ab, "EVEN_K": k % config.block_k == 0, "COMPUTE_DTYPE": getattr(tl, compute),
        "DEQUANT": dequant or ("ptx" if compute == "bfloat16" else "bytes"),
        "RETIRE_MMA_EACH_STEP": config.swap_ab if retire_mma_each_step is None else retire_mma_each_step,
    }
    y_type = "*fp32" if atomic else f"*{_TL_NAMES[compute]}"
    return _compile(_moe_matmul_kernel, ASTSource, _signature(f"*{_TL_NAMES[x_dtype]}", y_type), constexprs,
                    config, k=k, n=n, swiglu=swiglu, atomic=atomic,
                    options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def default_configs() -> list[tuple[str, MatmulConfig, int, int, bool, bool]]:
    """(name, config, n, k, swiglu, atomic) of every default config of the gpt-oss shapes: the
    Triton kernel's; on a Hopper GPU with bf16 the Gluon kernel's where it differs ("_sm90");
    and with the weights in fragment order, the "rs" kernel's ("_rs"; "_rs_few" at <= 8 rows)."""
    out = []
    for name, n, k, block_m, swiglu, atomic in VARIANTS:
        out.append((name, default_config(block_m, n, k, swiglu=swiglu), n, k, swiglu, atomic))
        hopper = default_config(block_m, n, k, swiglu=swiglu, sm90=True)
        if hopper.kernel == "sm90":
            out.append((name + "_sm90", hopper, n, k, swiglu, atomic))
        out.append((name + "_rs", default_config(block_m, n, k, swiglu=swiglu, sm90=True, fragments=True),
                    n, k, swiglu, atomic))
        few = default_config(block_m, n, k, swiglu=swiglu, sm90=True, fragments=True, rows=4)
        if few != out[-1][1]:
            out.append((name + "_rs_few", few, n, k, swiglu, atomic))
    return out


# Hidden and intermediate sizes of small test models and narrow TP shards: K loops of one step
# (K <= block_k), a few steps, and w2's split-K leaving one step per split.
SMALL_SIZES = (32, 64, 96, 128, 160, 256, 288, 352)


def _compile_key(config: MatmulConfig, n: int, k: int, swiglu: bool, atomic: bool) -> tuple:
    """What the compiled code depends on: for the "rs" kernel its tiling constexprs (N enters
    only through ROW_MASK); for the others the config and K (N is a runtime argument)."""
    if config.kernel == "rs":
        from ..fragment_layout import layout_shape
        from ..moe_matmul import rs_constexprs
        return (config, swiglu, atomic, tuple(sorted(rs_constexprs(config, *layout_shape(n, k), k, k).items())))
    return (config, k, swiglu, atomic)


def small_shape_configs(sizes: tuple[int, ...] = SMALL_SIZES) -> list[tuple[str, MatmulConfig, int, int, bool, bool]]:
    """(name, config, n, k, swiglu, atomic) of every distinct compile `default_config` can ask
    for on sm_90 when H and I range over `sizes`: w13 ([2 I, H], SwiGLU) and w2 ([H, I], atomic
    combine), every block_m, few and many rows, checkpoint or fragment order. Config choices
    that compile the same code (`_compile_key`) appear once."""
    out, seen = [], set()
    for k in sizes:
        for other in sizes:
            for swiglu in (True, False):
                n = 2 * other if swiglu else other
                for block_m in (16, 32, 64, 128):
                    configs = [default_config(block_m, n, k, swiglu=swiglu),
                               default_config(block_m, n, k, swiglu=swiglu, mean_rows=0.5),
                               default_config(block_m, n, k, swiglu=swiglu, sm90=True),
                               default_config(block_m, n, k, swiglu=swiglu, sm90=True, fragments=True),
                               default_config(block_m, n, k, swiglu=swiglu, sm90=True, fragments=True, rows=4)]
                    for config in configs:
                        if config.split_k > 1 and swiglu:       # as the launcher: split-K only for w2
                            config = dataclasses.replace(config, split_k=1)
                        key = _compile_key(config, n, k, swiglu, not swiglu)
                        if key not in seen:
                            seen.add(key)
                            name = f"{'w13' if swiglu else 'w2'}_n{n}_k{k}_bm{block_m}_{config.kernel}"
                            out.append((name, config, n, k, swiglu, not swiglu))
    return out


def wgmma_loops(sass: str) -> list[list[str]]:
    """SASS lines of each K loop: the bodies of backward branches that hold an HGMMA and no EXIT
    (an mbarrier wait's retry path, placed after the kernel's end, branches back into the loop
    from beyond the epilogue), outermost only, longest first. The "rs" kernel has one per tile
    width (`MatmulConfig.width_step`)."""
    lines = [line for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
    addr = [int(re.search(r"/\*([0-9a-f]{4,})\*/", line).group(1), 16) for line in lines]
    spans = []
    for i, line in enumerate(lines):
        branch = re.search(r"\bBRA\s+(0x[0-9a-f]+)", line)
        if branch and int(branch.group(1), 16) < addr[i]:
            body = [j for j in range(i + 1) if addr[j] >= int(branch.group(1), 16)]
            if (any("HGMMA" in lines[j] for j in body)
                    and not any(re.search(r"\bEXIT\b", lines[j]) for j in body)):
                spans.append((body[0], body[-1]))
    outer = [(a, b) for a, b in spans if not any(c <= a and b <= d and (c, d) != (a, b) for c, d in spans)]
    return sorted(([lines[j] for j in range(a, b + 1)] for a, b in outer), key=len, reverse=True)


def main_loop(sass: str) -> list[str]:
    """SASS lines of the longest K loop (`wgmma_loops`), [] if none."""
    loops = wgmma_loops(sass)
    return loops[0] if loops else []


_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s*(?P<text>[^;]*);")
_HGMMA_A_REGISTER = re.compile(r"\bHGMMA\.\S+ R\d+, R(\d+),")
_WGMMA_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)")
# Instructions whose first register is a source, not a destination.
_NO_DESTINATION = ("ST", "RED", "ATOM", "HGMMA", "WARPGROUP", "BAR", "BRA", "DEPBAR", "LDGDEPBAR",
                   "LDGSTS", "ISETP", "FSETP", "HSETP", "UISETP", "PLOP3", "NOP", "EXIT", "RET")


def _registers_written(instruction: str) -> set[int]:
    """General registers an instruction writes (its first operand), e.g. LDS.128 R8 -> R8..R11."""
    m = re.match(r"(?:@!?U?P\w+\s+)?(?P<op>[A-Z0-9_.]+)\s+R(?P<reg>\d+)\b", instruction)
    if not m or m.group("op").startswith(_NO_DESTINATION):
        return set()
    width = 4 if ".128" in m.group("op") else 2 if (".64" in m.group("op") or ".WIDE" in m.group("op")) else 1
    return set(range(int(m.group("reg")), int(m.group("reg")) + width))


def rs_wgmma_hazards(loop: list[str]) -> dict:
    """Registers the K loop overwrites while a wgmma that reads them may still run.

    A wgmma with its A operand in registers (HGMMA R_d, R_a, gdesc...) reads R_a..R_a+3
    asynchronously, until a WARPGROUP.DEPBAR.LE gsb0, n (wgmma.wait_group n) leaves at most n
    newer groups pending. This walks the loop body twice (the second time starting with the
    groups the first left pending: the back edge) and counts, in the second walk, instructions
    that write a register of a pending group. Returns {"rs_groups", "pending_at_back_edge",
    "in_flight_overwrites"}.
    """
    body = [m.group("text").strip() for line in loop if (m := _SASS_INSTRUCTION.match(line))]

    def walk(pending: list[set[int]]) -> tuple[list[set[int]], int, int]:
        open_group: set[int] | None = None
        overwrites = rs_groups = 0
        for ins in body:
            if ins.startswith("WARPGROUP.ARRIVE"):
                open_group = set()
                pending.append(open_group)
            elif (m := _HGMMA_A_REGISTER.search(ins)) and open_group is not None:
                rs_groups += not open_group
                open_group |= set(range(int(m.group(1)), int(m.group(1)) + 4))
            elif m := _WGMMA_WAIT.search(ins):
                keep = int(m.group(1), 16)
                del pending[:max(0, len(pending) - keep)]
            elif (written := _registers_written(ins)) and any(written & group for group in pending):
                overwrites += 1
        return [group for group in pending if group], rs_groups, overwrites

    pending, rs_groups, _ = walk([])
    pending, _, overwrites = walk(pending)
    return {"rs_groups": rs_groups, "pending_at_back_edge": len(pending), "in_flight_overwrites": overwrites}


def _hazards_of_every_loop(loops: list[list[str]]) -> dict:
    """`rs_wgmma_hazards` summed over the K loops (the largest pending count), and their number."""
    found = [rs_wgmma_hazards(loop) for loop in loops] or [rs_wgmma_hazards([])]
    return {"k_loops": len(loops), "rs_groups": sum(f["rs_groups"] for f in found),
            "pending_at_back_edge": max(f["pending_at_back_edge"] for f in found),
            "in_flight_overwrites": sum(f["in_flight_overwrites"] for f in found)}


def resource_usage(compiled) -> dict:
    """Registers, stack and local (spill) bytes, and shared memory of a compiled kernel, from
    its cubin (no SASS dump: the cheap part of `resource_report`)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(_bin_dir() / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {"registers": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1)),
            "local_bytes": int(fields.get("LOCAL", -1)), "shared_bytes": compiled.metadata.shared}


def resource_report(compiled, config: MatmulConfig | None = None) -> dict:
    """Registers, spills, shared memory and SASS instruction counts of a compiled kernel; with
    its config, also the K loop's instructions per thread and per weight element (all threads'
    loop instructions over the BLOCK_N x BLOCK_K weights one iteration dequantizes)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(_bin_dir() / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    loop = main_loop(sass)
    per_loop = {}
    if config is not None:
        threads = 32 * config.num_warps
        per_loop = {"loop_instructions": len(loop),
                    "instructions_per_element": round(len(loop) * threads / (config.block_n * config.block_k), 2)}
    return {
        **resource_usage(compiled),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
        "local_mem_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        **_hazards_of_every_loop(wgmma_loops(sass)),
        **per_loop,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Compile the grouped-matmul kernels for sm_90 without a GPU and "
                                            "report registers, spills, shared memory and wgmma use.")
    p.add_argument("variants", nargs="*", help="variant names to compile (default: every default config)")
    p.add_argument("--dequant", choices=("ptx", "bytes"), default=None,
                   help="the Triton kernel's decode (default: as the launcher picks)")
    p.add_argument("--small-shapes", action="store_true", help="every default config at small H, I")
    args = p.parse_args(argv)
    if args.small_shapes:
        return _report_small_shapes()
    names, dequant = set(args.variants), args.dequant
    for name, config, n, k, swiglu, atomic in default_configs():
        if names and name not in names:
            continue
        compiled = compile_variant(config, k=k, n=n, swiglu=swiglu, atomic=atomic, dequant=dequant)
        print(json.dumps({"variant": name, "config": config.__dict__,
                          "dequant": "ptx" if config.kernel != "triton" else dequant or "ptx",
                          **resource_report(compiled, config)}), flush=True)
    return 0


def _compile_small_shape(variant: tuple) -> dict:
    """One `small_shape_configs` entry compiled: its registers, spills and shared memory, or the
    compiler's first error line."""
    name, config, n, k, swiglu, atomic = variant
    line = {"variant": name, "config": config.__dict__, "n": n, "k": k}
    try:
        compiled = compile_variant(config, k=k, n=n, swiglu=swiglu, atomic=atomic)
    except Exception as error:          # report every failing shape, not just the first
        line["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        return line
    return {**line, **resource_usage(compiled)}


def _report_small_shapes() -> int:
    """One JSON line per `small_shape_configs` compile (`_compile_small_shape`), compiled on
    every core; exit status 1 if any failed."""
    from concurrent.futures import ProcessPoolExecutor
    failed = 0
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for line in pool.map(_compile_small_shape, small_shape_configs()):
            failed += "error" in line
            print(json.dumps(line), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
