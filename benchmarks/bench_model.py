"""Whole gpt-oss-shaped models on one GPU: load_model (MXFP4 experts) against transformers' bf16 model.

`integrations.transformers.load_model` (the experts in MXFP4, our kernels) beside transformers'
own model of the same checkpoint with the experts dequantized to bf16: load time, GPU memory,
decode latency per step and prefill; the MoE part of loading against a raw read of the same
bytes; a decode step eager, compiled and compiled with reduce-overhead.

    python -m benchmarks.bench_model --out DIR [--models 20b 120b] [--batches 1 8 64] [--prefill 2048]
        [--decode-steps N] [--layers-120b 12] [--no-dequantized] [--no-compile] [--workdir /tmp/bench_model]
    python -m benchmarks.bench_model --tiny --out DIR     # the whole pipeline on a CPU-sized model
Writes DIR/out_model.json and DIR/results_model.md after every part (a run cut short keeps what
finished), DIR/model.png at the end when matplotlib is importable, and prints the markdown.

Models: gpt-oss-20b-shaped (24 layers, E = 32) and gpt-oss-120b-shaped (36 layers, E = 128; the
first --layers-120b of them, since 65 GB of checkpoint and the rest do not fit the 64 GB disk),
top-4, H = I = 2880, 64 query / 8 KV heads of 64, vocab 201088, sliding window 128 on even layers.
Weights are random, drawn on the GPU and written by `synthetic.write_checkpoint` (the library's
names and config.json): uniform E2M1 byte pairs with E8M0 scale bytes 118..121, so a weight's RMS
is 2.93 * 2**(s - 127) = 0.006..0.046 around 1 / sqrt(2880) = 0.019 and the activations stay
finite through every layer; dense tensors as `synthetic_dense_tensors` draws them.

Decode: a random prompt of --prompt tokens per sequence, then one new token per step (greedy
argmax inside the step) through model(...) with the cache it returned (transformers' default
DynamicCache); each step timed alone between torch.cuda.synchronize calls, after --warmup
untimed steps; the median, 10th and 90th percentile over --decode-steps steps. Beside it the
floor: the bytes one step must read (dense weights but the embeddings, plus the experts a batch
hits, E * (1 - (1 - k / E) ** B) of them per layer for uniform routing) over the device copy
bandwidth measured in the same run. Prefill: --prefill tokens at batch 1, logits of the last
position only (as generate asks), median of 3 after one warm-up.

Loading (issue item 5): the MoE part of load_model (every layer's `load_layer` to the GPU and
its `MXFP4MoE`, which on Hopper also builds the fragment-order copy) against a raw read of the
same tensors: safetensors `get_slice` views copied into two pinned 64 MiB host buffers in turn,
each followed by an asynchronous copy to the device. The page cache cannot be dropped without
root, so both are warm-cache figures (the checkpoint was just written and read), measured in
alternating order (raw, ours, raw, ...), medians compared.

Compiled decode (--compile-model, default 20b; run last, so a timeout costs only it): batch 1 on
a StaticCache (`static_cache`), eager, then each --compile-modes; the first 3 calls (compile,
CUDA-graph capture) are timed apart from the steady steps, graph breaks and CUDA-graph skips are
counted, and the logits are compared with eager's. Each failure is recorded, not raised.

Disk: the 20b checkpoint is 13.7 GB, the 12-layer 120b one 23.3 GB; the 20b one is kept for the
compiled step at the end while the disk holds both, else that step runs before it goes.
--budget-s: an optional part (the dequantized model, each compile mode, the next model) is
skipped, and the skip recorded, once less than a rough guess of its time is left.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import git_commit
from mxfp4_moe.checkpoint import MoEConfig, open_checkpoint
from mxfp4_moe.integrations.transformers import MXFP4GptOssMLP, load_model, shard_plan
from mxfp4_moe.loader import load_layer
from mxfp4_moe.moe import MXFP4MoE
from mxfp4_moe.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK
from mxfp4_moe.synthetic import DenseSpec, LayerWeights, synthetic_dense_tensors, write_checkpoint

GIB = 2 ** 30
# E8M0 bytes of the random expert weights: 2 ** -9 .. 2 ** -6 (the module docstring derives them).
SCALE_BYTES = (118, 121)
SHARD_BYTES = 5 * 10 ** 9            # about the size of gpt-oss's own safetensors shards
RAW_CHUNK_BYTES = 64 * 2 ** 20       # each of the raw read's two pinned host buffers
COMPILE_WARMUP = 3                   # reduce-overhead: warm-up run, graph capture, first replay
PREFILL_REPEATS = 3
DEQUANTIZED_MARGIN_BYTES = 10 * GIB  # activations, eager attention's score tensor, allocator slack
# Rough device seconds of the optional parts, for skipping what --budget-s cannot fit.
GUESS_S = {"dequantized": 60.0, "compile_mode": 60.0, "model": 60.0}


# gpt-oss's attention and vocabulary: 64 query / 8 KV heads of 64, vocab 201088, sliding window 128.
GPT_OSS_DENSE = DenseSpec(vocab_size=201088, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                          sliding_window=128, max_position_embeddings=131072, rope_theta=150000.0)


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers_full: int
    experts: int
    hidden: int = 2880
    inter: int = 2880
    top_k: int = 4
    dense: DenseSpec = GPT_OSS_DENSE

    def moe_config(self, layers: int) -> MoEConfig:
        return MoEConfig(num_layers=layers, num_experts=self.experts, experts_per_token=self.top_k,
                         hidden_size=self.hidden, intermediate_size=self.inter)

    def label(self, layers: int) -> str:
        which = f"{layers} layers" if layers == self.layers_full else f"{layers} of {self.layers_full} layers"
        return f"gpt-oss-{self.name}-shaped ({which}, E = {self.experts})"

    # -- sizes --
    def expert_mxfp4_bytes(self) -> int:
        """One expert's bytes as our layer holds them: MXFP4 blocks and scales, float32 biases."""
        h, i = self.hidden, self.inter
        return 2 * i * (h // 2 + h // BLOCK_SIZE) + h * (i // 2 + i // BLOCK_SIZE) + 4 * (2 * i + h)

    def expert_bf16_bytes(self) -> int:
        """One expert's bytes in transformers' dequantized model: bf16 weights and biases."""
        h, i = self.hidden, self.inter
        return 2 * (2 * i * h + h * i) + 2 * (2 * i + h)

    def attention_bytes(self) -> int:
        """One decoder layer's attention and norms in bf16 (weights, biases, sinks)."""
        heads, head_dim = self.dense.num_attention_heads, self.dense.head_dim
        q, kv, h = heads * head_dim, self.dense.num_key_value_heads * head_dim, self.hidden
        return 2 * ((q + 2 * kv) * h + h * q + q + 2 * kv + h + heads + 2 * h)

    def dense_bytes(self, layers: int) -> int:
        return layers * self.attention_bytes() + 2 * (2 * self.dense.vocab_size * self.hidden + self.hidden)

    def dequantized_bytes(self, layers: int) -> int:
        router = 2 * self.experts * (self.hidden + 1)
        return self.dense_bytes(layers) + layers * (self.experts * self.expert_bf16_bytes() + router)

    def step_bytes(self, layers: int, batch: int, expert_bytes: int) -> float:
        """Bytes one decode step reads at least: the dense weights but the embedding table (it
        gathers B rows), plus the experts B tokens hit per layer under uniform routing."""
        hit = self.experts * (1 - (1 - self.top_k / self.experts) ** batch)
        dense = layers * self.attention_bytes() + 2 * self.dense.vocab_size * self.hidden
        return dense + layers * hit * expert_bytes


SHAPES = {"20b": ModelShape("20b", layers_full=24, experts=32), "120b": ModelShape("120b", layers_full=36, experts=128)}
# --tiny: the same pipeline at CPU sizes (E 4, H = I = 64, vocab 256), a sliding window the prefill crosses.
TINY_DENSE = replace(GPT_OSS_DENSE, vocab_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     sliding_window=16)
TINY_SHAPES = {name: ModelShape(name, layers_full=layers, experts=4, hidden=64, inter=64, top_k=2, dense=TINY_DENSE)
               for name, layers in (("20b", 2), ("120b", 3))}


# ---- small helpers -----------------------------------------------------------------------------

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()[:600]}"


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy rate in bytes/s (read + write of 1 GiB), the decode floor's ceiling."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench
    src = torch.empty(GIB // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    src = dst = None
    free_memory(device)
    return 2 * GIB / (ms * 1e-3)


# ---- the transformers model's calling convention -----------------------------------------------

def forward_parameters(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def cache_keyword(model) -> str:
    """transformers 5.24 names the KV cache argument `cache` (`past_key_values` still works but
    warns); earlier releases call it `past_key_values`."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def returned_cache(out):
    for key in ("cache", "past_key_values"):
        if key in out:
            return out[key]
    raise KeyError(f"the model's output holds no cache (keys {list(out.keys())})")


def static_cache(model, max_cache_len: int):
    """A StaticCache of `max_cache_len` positions for every layer, sliding ones included: the
    sliding layers' own static cache (transformers 5.24) counts its length in a Python int, so a
    compiled step would be specialized on it and recompile at every token. A full-length layer
    counts in a tensor, and the sliding window is still applied, by the sliding layers' mask."""
    import copy
    from transformers import StaticCache
    config = copy.deepcopy(model.config)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    config.sliding_window = None
    return StaticCache(config=config, max_cache_len=max_cache_len)


def static_step_kwargs(model, start: int, length: int, batch: int, device: torch.device) -> dict:
    """position_ids (and cache_position, where the model's forward takes it) for tokens
    start .. start + length: tensors, so a compiled step sees the same shapes every call."""
    positions = torch.arange(start, start + length, device=device)
    kwargs = {"position_ids": positions.unsqueeze(0).expand(batch, length)}
    if "cache_position" in forward_parameters(model):
        kwargs["cache_position"] = positions
    return kwargs


# ---- writing the checkpoint --------------------------------------------------------------------

def dense_shapes(shape: ModelShape, layers: int) -> dict[str, tuple[int, ...]]:
    """Every dense tensor's name and shape, taken from the library's own `synthetic_dense_tensors`
    at a miniature size whose dimensions are distinct sentinels (hidden 32, vocab 3, 2 heads of 5,
    1 KV head: q 10, kv 5), mapped to this model's sizes."""
    mini = synthetic_dense_tensors(
        MoEConfig(num_layers=layers, num_experts=1, experts_per_token=1, hidden_size=32, intermediate_size=32),
        DenseSpec(vocab_size=3, num_attention_heads=2, num_key_value_heads=1, head_dim=5))
    dense = shape.dense
    sizes = {32: shape.hidden, 3: dense.vocab_size, 10: dense.num_attention_heads * dense.head_dim,
             5: dense.num_key_value_heads * dense.head_dim, 2: dense.num_attention_heads}
    return {name: tuple(sizes[d] for d in t.shape) for name, t in mini.items()}


def random_dense_tensors(shape: ModelShape, layers: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """The dense tensors (bf16, on `device`), drawn as `synthetic_dense_tensors` draws them:
    embeddings N(0, 1), projections N(0, 1 / fan_in), biases N(0, 0.02), sinks N(0, 1), norm
    weights 1 + N(0, 0.1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, dims in dense_shapes(shape, layers).items():
        t = torch.randn(dims, generator=gen, device=device)
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * t
        elif name.endswith("bias"):
            t *= 0.02
        elif name.endswith("weight") and "embed_tokens" not in name:
            t /= math.sqrt(dims[-1])
        out[name] = t.to(torch.bfloat16)
    return out


def random_layer(shape: ModelShape, layer: int, device: torch.device, seed: int) -> LayerWeights:
    """One layer's experts as checkpoint bytes, drawn on `device` (see the module docstring)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1009 + layer)
    e, h, i = shape.experts, shape.hidden, shape.inter

    def codes(*dims):           # two uniform E2M1 codes per byte
        return torch.randint(0, 256, dims, generator=gen, device=device, dtype=torch.uint8)

    def scales(*dims):
        return torch.randint(SCALE_BYTES[0], SCALE_BYTES[1] + 1, dims, generator=gen, device=device, dtype=torch.uint8)

    def normal(*dims):
        return torch.randn(dims, generator=gen, device=device)

    return LayerWeights(
        w13_blocks=codes(e, 2 * i, h // BLOCK_SIZE, BYTES_PER_BLOCK), w13_scales=scales(e, 2 * i, h // BLOCK_SIZE),
        w2_blocks=codes(e, h, i // BLOCK_SIZE, BYTES_PER_BLOCK), w2_scales=scales(e, h, i // BLOCK_SIZE),
        w13_bias=0.05 * normal(e, 2 * i), w2_bias=0.05 * normal(e, h),
        router_weight=normal(e, h) / math.sqrt(h), router_bias=0.1 * normal(e))


def write_random_checkpoint(path: Path, shape: ModelShape, layers: int, device: torch.device, seed: int) -> dict:
    config = shape.moe_config(layers)
    total = shape.dense_bytes(layers) + layers * shape.experts * (
        shape.expert_mxfp4_bytes() - 2 * (2 * shape.inter + shape.hidden))       # biases are bf16 on disk
    shards = max(1, math.ceil(total / SHARD_BYTES))
    start = time.perf_counter()
    dense_tensors = random_dense_tensors(shape, layers, device, seed)
    write_checkpoint(path, config, lambda n: random_layer(shape, n, device, seed), layout="hf", shards=shards,
                     dense=shape.dense, dense_tensors=dense_tensors)
    del dense_tensors
    free_memory(device)
    seconds = time.perf_counter() - start
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"path": str(path), "bytes": on_disk, "shards": shards, "write_s": seconds,
            "write_GBps": on_disk / seconds / 1e9}


# ---- timing a model ----------------------------------------------------------------------------

@torch.no_grad()
def time_decode(model, batch: int, args, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=gen).to(device)
    key = cache_keyword(model)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = returned_cache(out)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for step in range(args.warmup + args.decode_steps):
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **{key: cache})
        cache = returned_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    return {"batch": batch, "prompt": args.prompt, "steps": len(times), "median_ms": median,
            "p10_ms": percentile(times, 0.1), "p90_ms": percentile(times, 0.9), "tokens_per_s": batch / median * 1e3}


@torch.no_grad()
def time_prefill(model, tokens: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(device)
    times = []
    for rep in range(1 + PREFILL_REPEATS):
        sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync(device)
        if rep:
            times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    return {"tokens": tokens, "median_ms": median, "min_ms": min(times), "max_ms": max(times),
            "tokens_per_s": tokens / median * 1e3}


def measure_model(build, impl: str, shape: ModelShape, layers: int, expert_bytes: int, args,
                  device: torch.device, ceiling: float | None) -> dict:
    """Load with `build()` (peak memory while loading, memory after), then decode at every batch
    and prefill. Returns the row; the model is freed."""
    free_memory(device)
    reset_peak(device)
    before = allocated(device)
    start = time.perf_counter()
    model = build()
    sync(device)
    row = {"impl": impl, "load_s": time.perf_counter() - start, "mem_before": before, "mem_peak_load": peak(device),
           "mem_after_load": allocated(device),
           "experts_implementation": getattr(model.config, "_experts_implementation", None)}
    log(f"  {impl}: loaded in {row['load_s']:.1f} s" + (
        f", peak {row['mem_peak_load'] / GIB:.1f} GiB, holds {row['mem_after_load'] / GIB:.1f} GiB"
        if device.type == "cuda" else ""))
    reset_peak(device)
    row["decode"] = {}
    for batch in args.batches:
        d = time_decode(model, batch, args, device)
        if ceiling:
            d["floor_ms"] = shape.step_bytes(layers, batch, expert_bytes) / ceiling * 1e3
        row["decode"][str(batch)] = d
        log(f"  {impl}: decode batch {batch}: {d['median_ms']:.2f} ms/step (p10 {d['p10_ms']:.2f}, p90 {d['p90_ms']:.2f})")
    if args.prefill:
        row["prefill"] = time_prefill(model, args.prefill, device)
        log(f"  {impl}: prefill {args.prefill}: {row['prefill']['median_ms']:.1f} ms")
    row["mem_peak_run"] = peak(device)
    del model
    free_memory(device)
    return row


# ---- loading at scale --------------------------------------------------------------------------

def moe_tensor_refs(path: Path) -> list[tuple[Path, str, tuple[int, ...], int]]:
    """(file, name, shape, nbytes) of every MoE tensor, in layer order."""
    with open_checkpoint(path) as ckpt:
        return [(ref.file, ref.name, tuple(ref.shape), ref.nbytes)
                for n in range(ckpt.config.num_layers) for ref in ckpt.layer(n).tensors().values()]


def load_moe_ours(path: Path, device: torch.device, backend: str, pinned_staging: bool | None = None) -> dict:
    """What load_model does for the experts, layer by layer, the blocks kept as load_model keeps them
    (pinned_staging: load_layer's, None its default; False the plain pageable copy, for the A/B)."""
    with open_checkpoint(path) as ckpt:
        plan = shard_plan(ckpt)
        blocks, nbytes, read_s = [], 0, 0.0
        sync(device)
        start = time.perf_counter()
        for n in range(ckpt.config.num_layers):
            t = time.perf_counter()
            weights = load_layer(ckpt, n, plan, device=device, pinned_staging=pinned_staging)
            sync(device)
            read_s += time.perf_counter() - t
            nbytes += weights.bytes_read
            blocks.append(MXFP4GptOssMLP(MXFP4MoE(weights, backend=backend)))
            del weights
        sync(device)
        seconds = time.perf_counter() - start
    del blocks
    free_memory(device)
    return {"seconds": seconds, "load_layer_s": read_s, "bytes": nbytes}


def load_moe_raw(refs, device: torch.device) -> dict:
    """The same tensors' bytes to the device by the shortest route: a safetensors view (its
    memory map) copied into a pinned buffer, then an asynchronous copy to the device while the
    other buffer fills."""
    from safetensors import safe_open
    pin = device.type == "cuda"
    largest_row = max(size // dims[0] for _, _, dims, size in refs)
    chunk = max(RAW_CHUNK_BYTES, largest_row)
    buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
    in_flight: list = [None, None]
    kept, nbytes, slot = [], 0, 0
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                   for file in sorted({r[0] for r in refs})}
        sync(device)
        start = time.perf_counter()
        for file, name, dims, size in refs:
            view = handles[file].get_slice(name)
            dest = torch.empty(size, dtype=torch.uint8, device=device)
            rows = max(1, chunk // (size // dims[0]))
            offset = 0
            for row in range(0, dims[0], rows):
                src = view[row:row + rows].reshape(-1).view(torch.uint8)
                n = src.numel()
                if in_flight[slot] is not None:
                    in_flight[slot].synchronize()        # the buffer's last copy has left it
                buffers[slot][:n].copy_(src)
                dest[offset:offset + n].copy_(buffers[slot][:n], non_blocking=pin)
                if pin:
                    in_flight[slot] = torch.cuda.Event()
                    in_flight[slot].record()
                offset += n
                slot ^= 1
            kept.append(dest)
            nbytes += size
        sync(device)
        seconds = time.perf_counter() - start
    del kept, buffers
    free_memory(device)
    return {"seconds": seconds, "bytes": nbytes}


def measure_loading(path: Path, device: torch.device, backend: str, repeats: int) -> dict:
    refs = moe_tensor_refs(path)
    raw, ours, pageable = [load_moe_raw(refs, device)], [], []
    for _ in range(repeats):
        ours.append(load_moe_ours(path, device, backend))
        if device.type == "cuda":
            pageable.append(load_moe_ours(path, device, backend, pinned_staging=False))
        raw.append(load_moe_raw(refs, device))
    nbytes = ours[0]["bytes"]
    if nbytes != raw[0]["bytes"]:
        raise AssertionError(f"the loader read {nbytes} bytes, the raw read {raw[0]['bytes']}")
    ours_s = statistics.median(r["seconds"] for r in ours)
    raw_s = statistics.median(r["seconds"] for r in raw)
    extra = {}
    if pageable:
        pageable_s = statistics.median(r["seconds"] for r in pageable)
        extra = {"pageable_s": [r["seconds"] for r in pageable], "pageable_median_s": pageable_s,
                 "pageable_ratio": pageable_s / raw_s}
    return {**extra, "bytes": nbytes, "order": "raw, " + ", ".join(["ours, ours pageable, raw" if pageable else "ours, raw"] * repeats),
            "ours_s": [r["seconds"] for r in ours], "ours_load_layer_s": [r["load_layer_s"] for r in ours],
            "raw_s": [r["seconds"] for r in raw], "ours_median_s": ours_s, "raw_median_s": raw_s,
            "ours_GBps": nbytes / ours_s / 1e9, "raw_GBps": nbytes / raw_s / 1e9, "ratio": ours_s / raw_s,
            "page_cache": "warm (just written and read; caches cannot be dropped without root)"}


# ---- compiled decode ---------------------------------------------------------------------------

@torch.no_grad()
def measure_compiled(path: Path, shape: ModelShape, layers: int, args, device: torch.device, result: dict,
                     save) -> None:
    """A decode step at batch 1 on a StaticCache (fixed shapes, so the compiled step neither
    recompiles nor re-captures): eager, then each compile mode, each on a fresh cache prefilled
    eagerly with the same prompt and fed the same tokens; logits compared with eager's. Rows go
    into `result["rows"]` as they finish."""
    from torch._dynamo.utils import counters
    model = load_model(path, device=device, backend=args.backend, progress=False)
    steps = COMPILE_WARMUP + args.decode_steps
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, shape.dense.vocab_size, (1, args.prompt), generator=gen).to(device)
    tokens = torch.randint(0, shape.dense.vocab_size, (steps, 1, 1), generator=gen).to(device)
    key = cache_keyword(model)
    eager_logits = None
    for mode in ["eager"] + list(args.compile_modes):
        if mode != "eager" and budget_left(args) < GUESS_S["compile_mode"]:
            result["rows"].append({"mode": mode, "skipped": f"--budget-s {args.budget_s:.0f} s nearly spent"})
            continue
        row = {"mode": mode}
        start = time.perf_counter()
        try:
            torch._dynamo.reset()
            counters.clear()
            cache = static_cache(model, args.prompt + steps)
            model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{key: cache},
                  **static_step_kwargs(model, 0, args.prompt, 1, device))
            if mode == "eager":
                step = model
            elif args.compile_backend == "inductor":
                step = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
            else:                   # --tiny on a CPU: the trace alone (no C++ compile, no CUDA graphs)
                step = torch.compile(model, backend=args.compile_backend, dynamic=False)
            times, logits = [], []
            for i in range(steps):
                sync(device)
                t = time.perf_counter()
                out = step(input_ids=tokens[i], use_cache=True, **{key: cache},
                           **static_step_kwargs(model, args.prompt + i, 1, 1, device))
                sync(device)
                times.append((time.perf_counter() - t) * 1e3)
                logits.append(out.logits[0, -1].float().clone())     # a replay overwrites the graph's output
            timed = times[COMPILE_WARMUP:]
            row.update(first_calls_s=sum(times[:COMPILE_WARMUP]) / 1e3, median_ms=statistics.median(timed),
                       p10_ms=percentile(timed, 0.1), p90_ms=percentile(timed, 0.9),
                       graph_breaks=sum(counters["graph_break"].values()),
                       graphs=counters["stats"]["unique_graphs"],
                       cudagraph_skips=counters["inductor"]["cudagraph_skips"])
            logits = torch.stack(logits)
            if eager_logits is None:
                eager_logits = logits
            row["logits_rel_diff_vs_eager"] = ((logits - eager_logits).norm() / eager_logits.norm()).item()
            log(f"  decode batch 1, {mode}: {row['median_ms']:.2f} ms/step (first {COMPILE_WARMUP} calls "
                f"{row['first_calls_s']:.1f} s, {row['graph_breaks']} graph breaks, "
                f"logits vs eager {row['logits_rel_diff_vs_eager']:.1e})")
        except Exception as exc:    # a compile failure is a result, not the end of the run
            row["error"] = error_text(exc)
            row["seconds_until_error"] = time.perf_counter() - start
            log(f"  decode batch 1, {mode}: FAILED {row['error'][:300]}")
        result["rows"].append(row)
        save()
    torch._dynamo.reset()
    del model
    free_memory(device)


# ---- the run -----------------------------------------------------------------------------------

def layer_count(args, name: str) -> int:
    """How many of the model's layers are written and loaded (--layers, else --layers-120b for 120b)."""
    full = args.shapes[name].layers_full
    if args.layers:
        return min(full, args.layers)
    return min(full, args.layers_120b) if name == "120b" else full


def budget_left(args) -> float:
    return args.budget_s - (time.perf_counter() - T0)


def dequantized_plan(shape: ModelShape, layers: int, capacity: int, args) -> str | None:
    """None when the dequantized model runs; else why not."""
    if args.no_dequantized:
        return "--no-dequantized"
    full = shape.dequantized_bytes(shape.layers_full) + DEQUANTIZED_MARGIN_BYTES
    sliced = shape.dequantized_bytes(layers) + DEQUANTIZED_MARGIN_BYTES
    if full > capacity and not (args.dequantized_sliced and sliced <= capacity):
        return (f"the full {shape.layers_full}-layer model's bf16 weights need {full / GIB:.0f} GiB with "
                f"{DEQUANTIZED_MARGIN_BYTES / GIB:.0f} GiB for activations, more than the "
                f"{capacity / GIB:.0f} GiB of {'the GPU' if args.device.type == 'cuda' else 'host memory'}: "
                "ours alone" + (f" (the {layers}-layer slice would need {sliced / GIB:.0f} GiB: "
                                "--dequantized-sliced runs it)" if layers < shape.layers_full and sliced <= capacity
                                else ""))
    if sliced > capacity:
        return f"needs {sliced / GIB:.0f} GiB, more than {capacity / GIB:.0f} GiB"
    if budget_left(args) < GUESS_S["dequantized"]:
        return f"--budget-s {args.budget_s:.0f} s nearly spent"
    return None


def header(args) -> dict:
    import safetensors
    import transformers

    import mxfp4_moe
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = args.device
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "device_memory_GiB": args.capacity / GIB, "torch": torch.__version__, "triton": triton_version,
           "transformers": transformers.__version__, "safetensors": safetensors.__version__,
           "mxfp4_moe": mxfp4_moe.__version__,
           "python": platform.python_version(), "commit": git_commit(), "tiny": args.tiny,
           "command": "python -m benchmarks.bench_model " + " ".join(args.argv),
           "cpu_count": os.cpu_count(), "host_memory_GiB": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
           "workdir": str(args.workdir), "backend": args.backend, "dtype": "bfloat16"}
    return out


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown(results: dict) -> str:
    h = results["header"]
    lines = ["# Whole-model benchmark", "",
             f"device: {h['device']} ({h['device_memory_GiB']:.0f} GiB); torch {h['torch']}; triton {h['triton']}; "
             f"transformers {h['transformers']}; commit {h['commit']}" + (" (--tiny, CPU sizes)" if h["tiny"] else ""),
             f"command: `{h['command']}`", ""]
    if h.get("copy_GBps"):
        lines += [f"measured device copy: {h['copy_GBps']:.0f} GB/s (the decode floor's ceiling)", ""]
    lines += ["Decode: median ms per step (one new token per sequence, DynamicCache, after a "
              f"{results['settings']['prompt']}-token prompt; floor = bytes a step reads / copy rate). Prefill: "
              "batch 1, median ms. Memory: torch.cuda.max_memory_allocated while loading (reset before), "
              "memory_allocated after, and the peak over the runs.", ""]
    batches = results["settings"]["batches"]
    head = ["model", "impl", "load s", "peak load GiB", "after load GiB", "peak run GiB"]
    for b in batches:
        head += [f"b{b} ms", f"b{b} floor"]
    head += [f"prefill {results['settings']['prefill']} ms", "prefill tok/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gib = lambda v: fmt(None if v is None else v / GIB, ".1f")  # noqa: E731
    for m in results["models"]:
        for r in m["runs"]:
            if "skipped" in r or "error" in r:
                cells = [m["label"], r["impl"], r.get("skipped") or "FAILED: " + r["error"]]
                lines.append("| " + " | ".join(cells) + " |" + " |" * (len(head) - len(cells)))
                continue
            impl = r["impl"] if r["impl"] == "ours" or not r.get("experts_implementation") else (
                f"{r['impl']} (experts: {r['experts_implementation']})")
            cells = [m["label"], impl, fmt(r["load_s"], ".1f"), gib(r["mem_peak_load"]), gib(r["mem_after_load"]),
                     gib(r["mem_peak_run"])]
            for b in batches:
                d = r["decode"].get(str(b), {})
                cells += [fmt(d.get("median_ms")), fmt(d.get("floor_ms"))]
            p = r.get("prefill", {})
            cells += [fmt(p.get("median_ms"), ".1f"), fmt(p.get("tokens_per_s"), ".0f")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Loading the experts (issue item 5): the MoE part of load_model (`load_layer` to the device and "
              "`MXFP4MoE`, per layer) against safetensors views copied through pinned buffers to the device; "
              "warm page cache, alternating order, medians.", "",
              "| model | MoE bytes (GB) | ours s | ours GB/s | of which load_layer s | raw s | raw GB/s | ours / raw "
              "| ours, pageable copies / raw | order |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        ld = m.get("loading")
        if not ld:
            continue
        if "error" in ld:
            lines.append(f"| {m['label']} | FAILED: {ld['error']} |||||||| ")
            continue
        lines.append(f"| {m['label']} | {ld['bytes'] / 1e9:.2f} | {ld['ours_median_s']:.2f} | {ld['ours_GBps']:.1f} | "
                     f"{statistics.median(ld['ours_load_layer_s']):.2f} | {ld['raw_median_s']:.2f} | "
                     f"{ld['raw_GBps']:.1f} | {ld['ratio']:.2f}x | "
                     f"{fmt(ld.get('pageable_ratio'), '.2f')}x | {ld['order']} |")
    c = results.get("compile")
    if c:
        lines += ["", f"Decode step under torch.compile ({c['model']}, batch {c['batch']}, {c['cache']}, "
                  f"compiler backend {c['backend']}): median ms per step after {COMPILE_WARMUP} calls "
                  "(their time includes compiling and, for reduce-overhead, the CUDA-graph capture).", "",
                  "| mode | ms/step | p10 | p90 | vs eager | first calls s | graph breaks | graphs | cudagraph skips "
                  "| logits rel diff vs eager | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        eager = next((r["median_ms"] for r in c["rows"] if r["mode"] == "eager" and "median_ms" in r), None)
        for r in c["rows"]:
            if "median_ms" not in r:
                lines.append(f"| {r['mode']} | | | | | | | | | | {r.get('skipped') or 'FAILED: ' + r.get('error', '')} |")
                continue
            speed = fmt(eager / r["median_ms"] if eager else None, ".2f") + "x"
            lines.append(f"| {r['mode']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | {speed} | "
                         f"{r['first_calls_s']:.1f} | {r['graph_breaks']} | {r['graphs']} | {r['cudagraph_skips']} | "
                         f"{r['logits_rel_diff_vs_eager']:.1e} | |")
    if results.get("checkpoints"):
        lines += ["", "Checkpoints: " + "; ".join(
            f"{k}: {v['bytes'] / 1e9:.1f} GB in {v['shards']} files, written in {v['write_s']:.1f} s "
            f"({v['write_GBps']:.2f} GB/s)" for k, v in results["checkpoints"].items())]
    if results.get("notes"):
        lines += [""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in results["models"]:
        for r in m["runs"]:
            if "decode" not in r:
                continue
            bs = sorted(int(b) for b in r["decode"])
            ax.plot(bs, [r["decode"][str(b)]["median_ms"] for b in bs], "o-", label=f"{m['name']} {r['impl']}")
            if all("floor_ms" in r["decode"][str(b)] for b in bs):
                ax.plot(bs, [r["decode"][str(b)]["floor_ms"] for b in bs], ":", label=f"{m['name']} {r['impl']} floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("ms per decode step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"),
                   help="folder for out_model.json, results_model.md and model.png (default benchmarks/out)")
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["20b", "120b"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--prefill", type=int, default=None, help="prefill tokens at batch 1 (default 2048; --tiny 64; 0: none)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before the timed decode steps")
    p.add_argument("--decode-steps", type=int, default=12, help="timed decode steps per batch")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--layers-120b", type=int, default=12, help="layers of the 120b-shaped model written and loaded")
    p.add_argument("--layers", type=int, default=None,
                   help="write and load only the first N layers of every model (overrides --layers-120b)")
    p.add_argument("--no-dequantized", action="store_true", help="skip transformers' dequantized-bf16 model")
    p.add_argument("--dequantized-sliced", action="store_true",
                   help="run the dequantized model on a layer slice that fits even when the full model would not")
    p.add_argument("--without-eager-plans", action="store_true",
                   help="also time our model with the layers' eager plans off (mxfp4_moe.eager_plan)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile decode step")
    p.add_argument("--compile-modes", nargs="+", default=["reduce-overhead", "default"],
                   choices=["reduce-overhead", "default", "max-autotune-no-cudagraphs"])
    p.add_argument("--compile-model", choices=sorted(SHAPES), default="20b")
    p.add_argument("--load-repeats", type=int, default=1, help="rounds of (ours, raw) after a first raw read")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_model"), help="where the checkpoints are written")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="skip optional parts (dequantized model, compile modes, a further model) once this many "
                        "seconds are nearly spent")
    p.add_argument("--backend", default=None, help="MXFP4MoE backend (default auto; --tiny: torch)")
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="memory the dequantized model's fit check assumes (default: the GPU's; CPU: host memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="the whole pipeline at CPU sizes with the torch backend")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.tiny:
        args.device = torch.device("cpu")
        torch.set_num_threads(1)        # tiny ops: a shared core's OpenMP barriers would swamp the timings
        args.backend = args.backend or "torch"
        args.compile_backend = "aot_eager"
        args.prefill = 64 if args.prefill is None else args.prefill
    else:
        args.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        args.backend = args.backend or "auto"
        args.compile_backend = "inductor"
        args.prefill = 2048 if args.prefill is None else args.prefill
    if args.device is not None:
        if args.device_memory_gib is not None:
            args.capacity = int(args.device_memory_gib * GIB)
        elif args.device.type == "cuda":
            args.capacity = torch.cuda.get_device_properties(args.device).total_memory
        else:
            args.capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device is None:
        print("bench_model needs a CUDA GPU (or --tiny for the CPU-sized pipeline)", file=sys.stderr)
        return 2
    device = args.device
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {"header": header(args), "settings": {
        "batches": args.batches, "prefill": args.prefill, "prompt": args.prompt, "decode_steps": args.decode_steps,
        "warmup": args.warmup, "layers": {name: layer_count(args, name) for name in args.models}, "scale_bytes": list(SCALE_BYTES),
        "shapes": {name: asdict(args.shapes[name]) for name in args.models}},
        "models": [], "checkpoints": {}, "notes": []}
    print(json.dumps(results["header"]), flush=True)

    def save() -> None:
        (args.out / "out_model.json").write_text(json.dumps(results, indent=1))
        (args.out / "results_model.md").write_text(markdown(results))

    ceiling = copy_bandwidth(device)
    results["header"]["copy_GBps"] = ceiling / 1e9 if ceiling else None
    written: dict[str, Path] = {}
    compile_on = None if args.no_compile else args.compile_model
    if compile_on is not None and compile_on not in args.models:
        results["notes"].append(f"--compile-model {compile_on} is not among --models: no compiled decode step")
        compile_on = None
    compiled_done = False

    def run_compile(name: str) -> None:
        nonlocal compiled_done
        shape = args.shapes[name]
        layers = layer_count(args, name)
        log(f"{name}: decode step under torch.compile ({', '.join(args.compile_modes)})")
        results["compile"] = {"model": shape.label(layers), "batch": 1, "cache": "StaticCache", "prompt": args.prompt,
                              "backend": args.compile_backend, "rows": []}
        compiled_done = True
        if budget_left(args) < GUESS_S["compile_mode"]:
            results["compile"]["rows"].append({"mode": "all", "skipped": f"--budget-s {args.budget_s:.0f} s nearly spent"})
            log(f"{name}: compiled decode step not run: --budget-s nearly spent")
            return
        try:
            measure_compiled(written[name], shape, layers, args, device, results["compile"], save)
        except Exception as exc:    # loading the model, say: the rows so far stay
            results["compile"]["rows"].append({"mode": "(set-up)", "error": error_text(exc)})
            log(f"  compiled decode: FAILED {error_text(exc)}")
        save()

    def drop(name: str) -> None:
        if not args.keep and name in written:
            shutil.rmtree(written.pop(name), ignore_errors=True)

    try:
        for index, name in enumerate(args.models):
            shape = args.shapes[name]
            layers = layer_count(args, name)
            if index and budget_left(args) < GUESS_S["model"]:
                results["notes"].append(f"{shape.label(layers)}: not run, --budget-s {args.budget_s:.0f} s nearly spent")
                continue
            path = args.workdir / f"gpt-oss-{name}-{layers}l"
            need = shape.dense_bytes(layers) + layers * shape.experts * shape.expert_mxfp4_bytes()
            # A checkpoint kept for the compiled step goes first when the disk cannot hold both.
            for kept in [k for k in written if k != name]:
                if shutil.disk_usage(args.workdir).free < need + 4 * GIB:
                    if kept == compile_on and not compiled_done:
                        run_compile(kept)
                    drop(kept)
            log(f"{name}: writing {shape.label(layers)} ({need / 1e9:.1f} GB) to {path}")
            info = write_random_checkpoint(path, shape, layers, device, args.seed)
            written[name] = path
            results["checkpoints"][name] = info
            log(f"{name}: written in {info['write_s']:.1f} s ({info['write_GBps']:.2f} GB/s, {info['shards']} files)")
            model_row = {"name": name, "label": shape.label(layers), "layers": layers, "runs": []}
            results["models"].append(model_row)
            save()

            def build_ours():
                return load_model(path, device=device, backend=args.backend, progress=False)

            def build_ours_without_plans():
                model = build_ours()
                for module in model.modules():
                    if isinstance(module, MXFP4MoE):
                        module.eager_plans = False
                return model

            builds = [("ours", build_ours)]
            if args.without_eager_plans:
                builds.append(("ours, no eager plans", build_ours_without_plans))
            for impl, build in builds:
                try:
                    model_row["runs"].append(measure_model(build, impl, shape, layers, shape.expert_mxfp4_bytes(),
                                                           args, device, ceiling))
                except Exception as exc:
                    model_row["runs"].append({"impl": impl, "error": error_text(exc)})
                    log(f"  {impl}: FAILED {error_text(exc)}")
                    free_memory(device)
                save()
            log(f"{name}: loading the experts, ours against a raw read")
            try:
                model_row["loading"] = measure_loading(path, device, args.backend, args.load_repeats)
                ld = model_row["loading"]
                log(f"  {ld['bytes'] / 1e9:.2f} GB: ours {ld['ours_median_s']:.2f} s ({ld['ours_GBps']:.1f} GB/s), "
                    f"raw {ld['raw_median_s']:.2f} s ({ld['raw_GBps']:.1f} GB/s): {ld['ratio']:.2f}x")
            except Exception as exc:
                model_row["loading"] = {"error": error_text(exc)}
                log(f"  loading: FAILED {error_text(exc)}")
            save()
            why_not = dequantized_plan(shape, layers, args.capacity, args)
            if why_not:
                model_row["runs"].append({"impl": "transformers dequantized bf16", "skipped": why_not})
                log(f"  transformers dequantized bf16: not run: {why_not}")
            else:
                # device_map needs accelerate (the GPU image has it); on a CPU the default placement is right.
                placement = {"device_map": str(device)} if device.type == "cuda" else {}

                def build_dequantized():
                    from transformers import GptOssForCausalLM, Mxfp4Config
                    return GptOssForCausalLM.from_pretrained(
                        path, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16,
                        attn_implementation="eager", **placement).eval()

                try:
                    model_row["runs"].append(measure_model(build_dequantized, "transformers dequantized bf16", shape,
                                                           layers, shape.expert_bf16_bytes(), args, device, ceiling))
                except Exception as exc:
                    model_row["runs"].append({"impl": "transformers dequantized bf16", "error": error_text(exc)})
                    log(f"  transformers dequantized bf16: FAILED {error_text(exc)}")
                    free_memory(device)
            save()
            if name != compile_on:
                drop(name)
        if compile_on in written and not compiled_done:
            run_compile(compile_on)
    finally:
        for name in list(written):
            drop(name)
        save()
    plot(results, args.out / "model.png")
    md = markdown(results)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
