"""The checks `python -m mxfp4_moe.verify` runs, one function each: the format of a layer, one
rank's shard against the checkpoint, the ranks' coverage of the layer, the transformers oracle and
the throughput; with the tolerances they are judged by and the report row they fill.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ..mxfp4 import BLOCK_SIZE, E8M0_BIAS, E8M0_NAN, PAD_SCALE_E8M0

# Relative Frobenius error allowed between the MoE layer and the float64 reference, by compute
# dtype. bf16 operands round to 8 bits (2**-9 relative), fp16 to 11; float32 on a GPU may use
# tf32 matrix units (10-bit mantissa), so it gets the fp16 bound there.
KERNEL_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}
KERNEL_TOLERANCE_GPU_FLOAT32 = 5e-3
# The ranks' float64 reference outputs must add up to the unsharded one to rounding.
SHARD_SUM_TOLERANCE = 1e-9
ORACLE_TOLERANCE = 1e-5
ORACLE_MAX_EXPERTS_X_SIZE = 64 * 1024 * 1024   # transformers holds float32 experts: keep it small
SCAN_CHUNK_BYTES = 64 * 1024 * 1024            # the format check reads scales this many bytes at a time


# ---- results --------------------------------------------------------------------------------

@dataclass
class CheckResult:
    """One row of the report."""
    check: str                     # format | sharding | kernels | fragment order | consistency | oracle | throughput
    layer: int | None
    rank: int | None
    passed: bool
    summary: str
    figures: dict = field(default_factory=dict)
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("PASS" if self.passed else "FAIL")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref||_F / ||ref||_F in float64; NaN anywhere gives inf, so it never passes."""
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return float("inf")
    denom = ref.norm().item()
    return (got - ref).norm().item() / denom if denom else (got - ref).norm().item()


def median_ms(fn, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median wall time of fn() in ms, eager: CUDA events on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---- the checks -----------------------------------------------------------------------------

def check_format(ckpt, layer: int) -> CheckResult:
    """NaN scale bytes and a summary of the scale exponents of w13 and w2 (dtypes and shapes were
    checked against the config when the checkpoint was opened)."""
    tensors = ckpt.layer(layer)
    report = ckpt.find_nan_scales(layer)
    figures = {"nan_scale_bytes": report.count}
    for proj in ("w13", "w2"):
        if hasattr(tensors, "experts"):       # per-expert gate/up/down (unfused, compressed-tensors, GGUF)
            projs = [p for ex in tensors.experts for p in ((ex.gate, ex.up) if proj == "w13" else (ex.down,))]
            histogram = sum(torch.bincount(p.weight_scale.read_all().reshape(-1), minlength=256) for p in projs)
        else:
            histogram = _scale_histogram(getattr(tensors, f"{proj}_scales"))
        histogram[E8M0_NAN] = 0
        if histogram.sum():
            present = histogram.nonzero()[:, 0]
            # The median's byte: the lower middle one, as torch.median picks it.
            middle = torch.tensor((int(histogram.sum()) + 1) // 2)
            median = int(torch.searchsorted(histogram.cumsum(0), middle))
            figures[f"{proj}_scale_exp"] = {"min": int(present[0]) - E8M0_BIAS, "median": median - E8M0_BIAS,
                                            "max": int(present[-1]) - E8M0_BIAS}
    exp_text = ", ".join(f"{p} exp {figures[k]['min']}..{figures[k]['max']}"
                         for p, k in (("w13", "w13_scale_exp"), ("w2", "w2_scale_exp")) if k in figures)
    if report.count:
        return CheckResult("format", layer, None, False, report.describe(), figures)
    return CheckResult("format", layer, None, True, f"dtypes and shapes match the config; no NaN scales; {exp_text}",
                       figures)


def _scale_histogram(ref) -> torch.Tensor:
    """How many of each of the 256 scale bytes a scale tensor [E, rows, blocks] holds, read a few
    experts at a time (at most SCAN_CHUNK_BYTES), so the check's memory does not grow with the layer."""
    counts = torch.zeros(256, dtype=torch.int64)
    per_expert = max(1, ref.nbytes // max(1, ref.shape[0]))
    step = max(1, SCAN_CHUNK_BYTES // per_expert)
    for start in range(0, ref.shape[0], step):
        chunk = ref.read(slice(start, min(ref.shape[0], start + step)))
        counts += torch.bincount(chunk.reshape(-1), minlength=256)     # (uint8 in: no wider copy)
    return counts


def _compare_region(problems: list[str], what: str, dest: torch.Tensor, src: torch.Tensor, fill: float) -> None:
    """dest's top-left must equal src exactly and everything else must equal `fill`."""
    region = tuple(slice(0, n) for n in src.shape)
    if dest.dim() != src.dim() or any(d < s for d, s in zip(dest.shape, src.shape)):
        problems.append(f"{what}: shard {tuple(dest.shape)} cannot hold checkpoint slice {tuple(src.shape)}")
        return
    if not torch.equal(dest[region], src.to(dest.dtype)):
        diff = (dest[region] != src.to(dest.dtype)).nonzero()
        problems.append(f"{what}: {diff.shape[0]} elements differ from the checkpoint, first at {tuple(diff[0].tolist())}")
    mask = torch.ones(dest.shape, dtype=torch.bool)
    mask[region] = False
    pad = dest[mask]
    if pad.numel() and not (pad == fill).all():
        problems.append(f"{what}: padding holds {int((pad != fill).sum())} values other than {fill}")


def check_shard(tensors, plan, weights) -> list[str]:
    """Compare one rank's loaded weights with the checkpoint, reading the rank's slices afresh.

    Independent of the loader's copy logic: it only uses the plan's ranges (which global experts,
    which intermediate blocks) and the documented padding fill. Returns the problems found.
    """
    from ..loader import PAD_CHANNEL_SCALE
    if hasattr(tensors, "experts"):
        return _check_shard_per_expert(tensors, plan, weights)
    problems: list[str] = []
    w = weights.to("cpu")
    rows, w2_blocks = plan.w13_rows, plan.w2_blocks_range
    for local, g in enumerate(plan.local_experts):
        e = slice(g, g + 1)
        tag = f"expert {g} (local {local})"
        src = tensors.w13_blocks.read(e, rows)[0]
        _compare_region(problems, f"w13_blocks {tag}", w.w13_blocks[local], src.reshape(src.shape[0], -1), 0)
        _compare_region(problems, f"w13_scales {tag}", w.w13_scales[local], tensors.w13_scales.read(e, rows)[0],
                        PAD_SCALE_E8M0)
        _compare_region(problems, f"w13_bias {tag}", w.w13_bias[local], tensors.w13_bias.read(e, rows)[0].float(), 0)
        src = tensors.w2_blocks.read(e, slice(None), w2_blocks)[0]
        _compare_region(problems, f"w2_blocks {tag}", w.w2_blocks[local], src.reshape(src.shape[0], -1), 0)
        _compare_region(problems, f"w2_scales {tag}", w.w2_scales[local],
                        tensors.w2_scales.read(e, slice(None), w2_blocks)[0], PAD_SCALE_E8M0)
        bias = tensors.w2_bias.read(e)[0].float()
        _compare_region(problems, f"w2_bias {tag}", w.w2_bias[local],
                        bias if plan.includes_w2_bias else torch.zeros_like(bias), 0)
        for proj, sel in (("w13", (e, rows)), ("w2", (e,))):
            ref = getattr(tensors, f"{proj}_channel_scale")
            got = getattr(w, f"{proj}_channel_scale")
            if (ref is None) != (got is None):
                problems.append(f"{proj}_channel_scale {tag}: present in {'checkpoint' if ref is not None else 'shard'} only")
            elif ref is not None:
                src = ref.read(*sel)[0].float()
                _compare_region(problems, f"{proj}_channel_scale {tag}", got[local], src.reshape(src.shape[0]),
                                PAD_CHANNEL_SCALE)
    _compare_region(problems, "router_weight", w.router_weight, tensors.router_weight.read_all().float(), 0)
    _compare_region(problems, "router_bias", w.router_bias, tensors.router_bias.read_all().float(), 0)
    if w.w2_bias_included != plan.includes_w2_bias:
        problems.append(f"w2_bias_included is {w.w2_bias_included} on {plan.describe()}")
    return problems


def _check_shard_per_expert(tensors, plan, weights) -> list[str]:
    """`check_shard` for per-expert gate/up/down tensors (`formats.UnfusedLayerTensors`): expert
    g's gate rows of this rank go to w13 rows 0, 2, 4, ..., its up rows to 1, 3, 5, ...; down's
    columns of this rank's blocks to w2. Absent biases must load as zeros."""
    problems: list[str] = []
    w = weights.to("cpu")
    rows, blocks = slice(plan.inter_start, plan.inter_stop), plan.w2_blocks_range
    down_bytes = slice(plan.inter_start // 2, plan.inter_stop // 2)
    n = plan.inter

    def interleaved(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.stack((gate, up), dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])

    for local, g in enumerate(plan.local_experts):
        ex, tag = tensors.experts[g], f"expert {g} (local {local})"
        if n:
            _compare_region(problems, f"w13_blocks {tag}", w.w13_blocks[local],
                            interleaved(ex.gate.weight.read(rows), ex.up.weight.read(rows)), 0)
            _compare_region(problems, f"w13_scales {tag}", w.w13_scales[local],
                            interleaved(ex.gate.weight_scale.read(rows), ex.up.weight_scale.read(rows)), PAD_SCALE_E8M0)
            _compare_region(problems, f"w2_blocks {tag}", w.w2_blocks[local], ex.down.weight.read(slice(None), down_bytes), 0)
            _compare_region(problems, f"w2_scales {tag}", w.w2_scales[local],
                            ex.down.weight_scale.read(slice(None), blocks), PAD_SCALE_E8M0)
            bias = (interleaved(ex.gate.bias.read(rows).float(), ex.up.bias.read(rows).float())
                    if ex.gate.bias is not None else torch.zeros(2 * n))
            _compare_region(problems, f"w13_bias {tag}", w.w13_bias[local], bias, 0)
        bias = ex.down.bias.read().float() if ex.down.bias is not None else torch.zeros(plan.hidden)
        _compare_region(problems, f"w2_bias {tag}", w.w2_bias[local],
                        bias if plan.includes_w2_bias else torch.zeros_like(bias), 0)
    _compare_region(problems, "router_weight", w.router_weight, tensors.router_weight.read_all().float(), 0)
    router_bias = (tensors.router_bias.read_all().float() if tensors.router_bias is not None
                   else torch.zeros(plan.num_experts))
    _compare_region(problems, "router_bias", w.router_bias, router_bias, 0)
    return problems


def check_coverage(plans, num_experts: int, inter: int) -> list[str]:
    """Every (expert, intermediate block) pair must be held by exactly one rank."""
    blocks = inter // BLOCK_SIZE
    count = torch.zeros(num_experts, blocks, dtype=torch.int32)
    for plan in plans:
        for g in plan.local_experts:
            count[g, plan.block_start:plan.block_stop] += 1
    problems = []
    if (count == 0).any():
        g, b = (count == 0).nonzero()[0].tolist()
        problems.append(f"{int((count == 0).sum())} (expert, block) pairs held by no rank, first expert {g} block {b}")
    if (count > 1).any():
        g, b = (count > 1).nonzero()[0].tolist()
        problems.append(f"{int((count > 1).sum())} (expert, block) pairs held twice, first expert {g} block {b}")
    return problems


def kernel_tolerance(dtype: torch.dtype, device: torch.device, backend: str) -> float:
    if dtype == torch.float32 and device.type == "cuda" and backend == "triton":
        return KERNEL_TOLERANCE_GPU_FLOAT32
    return KERNEL_TOLERANCE[dtype]


def run_noting_fallbacks(module, x: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """module(x), and the kernel fallbacks that call took (`kernels.kernel_fallbacks`: a fast
    kernel that could not compile for a shape, replaced by the portable Triton kernel)."""
    if getattr(module, "backend", None) != "triton":
        return module(x), []
    from ..kernel_api import kernel_fallbacks
    before = {id(f): f.calls for f in kernel_fallbacks()}
    out = module(x)
    return out, [f.as_dict() for f in kernel_fallbacks() if f.calls > before.get(id(f), 0)]


def check_kernels(got: torch.Tensor, ref: torch.Tensor, backend: str, layer: int,
                  fragment_order: bool = False, fallbacks: list[dict] = ()) -> CheckResult:
    """The MoE layer's output `got` [T, H] (its compute dtype, from `backend`; fragment_order:
    the layer ran the Hopper kernel on weights in fragment order; fallbacks: the kernel
    fallbacks it took, `run_noting_fallbacks`) against the float64 reference output `ref` [T, H]
    of the same routed tokens."""
    err = rel_err(got, ref)
    tol = kernel_tolerance(got.dtype, got.device, backend)
    max_abs = (got.double() - ref).abs().max().item() if got.numel() else 0.0
    name = str(got.dtype).removeprefix("torch.") + (", fragment order" if fragment_order else "")
    fell_back = "".join(f"; {f['kernel']!r} kernel fell back to {f['ran']!r} for {f['shape']} ({f['error']})"
                        for f in fallbacks)
    return CheckResult("kernels", layer, None, err <= tol,
                       f"MoE layer ({backend}, {name}) vs float64 reference: rel err {err:.2e} "
                       f"(<= {tol:.0e}), max abs {max_abs:.2e}{fell_back}",
                       {"rel_err": err, "max_abs_err": max_abs, "tolerance": tol, "backend": backend,
                        "dtype": str(got.dtype).removeprefix("torch."), "tokens": got.shape[0], "fragment_order": fragment_order,
                        "fallbacks": list(fallbacks)})


def check_fragment_order(layer_module, weights, layer: int) -> CheckResult:
    """The expert blocks and scales rebuilt from the layer's fragment-order copy (what its Hopper
    kernel reads; `MXFP4MoE.checkpoint_weights`) against the loaded checkpoint-order `weights`,
    byte for byte, padding included."""
    from ..moe import CHECKPOINT_ORDER_TENSORS
    rebuilt = layer_module.checkpoint_weights()
    problems = []
    for name in CHECKPOINT_ORDER_TENSORS:
        got, expected = getattr(rebuilt, name), getattr(weights, name)
        if got.shape != expected.shape:
            problems.append(f"{name}: shape {tuple(got.shape)}, loaded {tuple(expected.shape)}")
        elif not torch.equal(got, expected):
            problems.append(f"{name}: {int((got != expected).sum())} of {expected.numel()} bytes differ")
    held = "both orders held" if layer_module.holds_checkpoint_order else "only the fragment copy held"
    return CheckResult("fragment order", layer, None, not problems,
                       "; ".join(problems) or f"w13 and w2 blocks and scales rebuilt from the fragment-order "
                                               f"copy equal the loaded ones exactly ({held})",
                       {"problems": problems, "holds_checkpoint_order": layer_module.holds_checkpoint_order})


def check_oracle(layer_module, weights, x: torch.Tensor, config) -> CheckResult:
    """Our MoE block against transformers' GptOssMLP holding the same dequantized weights
    (skipped above ORACLE_MAX_EXPERTS_X_SIZE weights: transformers holds them in float32)."""
    size = weights.num_local_experts * weights.hidden_pad * weights.inter_pad * 3
    if size > ORACLE_MAX_EXPERTS_X_SIZE:
        return CheckResult("oracle", None, None, True,
                           f"model too large for the transformers oracle ({size:,} weights)", skipped=True)
    from .oracle import transformers_moe_forward
    ref = transformers_moe_forward(x, weights, config)
    got = layer_module(x.to(layer_module.compute_dtype)).float()
    err = rel_err(got.cpu(), ref.cpu())
    tol = max(ORACLE_TOLERANCE, kernel_tolerance(layer_module.compute_dtype, x.device, layer_module.backend))
    return CheckResult("oracle", None, None, err <= tol,
                       f"transformers {'Qwen3MoeSparseMoeBlock' if weights.activation == 'silu' else 'GptOssMLP'} "
                       f"vs ours: rel err {err:.2e} (<= {tol:.0e})",
                       {"rel_err": err, "tolerance": tol})


def measure_throughput(layer_module, tokens: int, hidden: int, device: torch.device, seed: int) -> CheckResult:
    """Median GPU time of the MoE layer's forward at `tokens` tokens (CUDA graph replay)."""
    import triton.testing
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=layer_module.compute_dtype)
    layer_module(x)
    torch.cuda.synchronize()
    try:
        ms = triton.testing.do_bench_cudagraph(lambda: layer_module(x), rep=200)
        method = "CUDA graph replay"
    except Exception:                      # a path that cannot be captured: eager timing instead
        ms = triton.testing.do_bench(lambda: layer_module(x), warmup=25, rep=200, return_mode="median")
        method = "eager"
    w = layer_module.weights
    flops = 2 * tokens * w.top_k * (2 * w.inter_pad * w.hidden_pad + w.hidden_pad * w.inter_pad)
    figures = {"tokens": tokens, "ms": ms, "tokens_per_s": tokens / ms * 1e3, "tflops": flops / ms / 1e9,
               "method": method}
    return CheckResult("throughput", None, None, True,
                       f"{tokens} tokens: {ms:.3f} ms ({method}), {tokens / ms * 1e3:,.0f} tokens/s, "
                       f"{flops / ms / 1e9:.1f} TFLOP/s", figures)


# ---- the run ------------------------------------------------------------------------------
