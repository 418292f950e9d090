"""Writing gpt-oss-style MXFP4 checkpoints: `write_checkpoint` (from float or already-quantized
expert weights, Hugging Face or original layout, one file or shards) and
`make_synthetic_checkpoint` (seeded, realistic random weights; the default input of `verify` and
the tests). Tensor names come from `checkpoint.layer_tensor_names`, so writer and reader agree.

Files are written tensor by tensor straight from the tensors' memory (our own small safetensors
writer), so a layer of gpt-oss-120b size (w13 blocks ~1 GiB) needs about one layer in RAM.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoint import (CONFIG_FILE, INDEX_FILE, SAFETENSORS_DTYPE_NAMES, Layout, MoEConfig,
                         layer_tensor_names)
from .mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK, ScaleRounding, quantize
from .weights import ExpertWeights

_FLOAT_DTYPE = torch.bfloat16          # biases, router and dense weights, as gpt-oss stores them
_CHANNEL_SCALE_DTYPE = torch.float32
_HEADER_ALIGN = 8                      # safetensors pads its JSON header to 8 bytes

MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
"""The Hugging Face gpt-oss quantization_config's list of modules kept in bf16."""


@dataclass(frozen=True)
class DenseSpec:
    """Sizes of the non-MoE part of a tiny full model (attention, embeddings), for config.json and
    for `synthetic_dense_tensors`. Defaults make a model transformers runs in milliseconds on CPU."""
    vocab_size: int = 256
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    sliding_window: int = 128
    max_position_embeddings: int = 4096
    rope_theta: float = 150000.0
    rms_norm_eps: float = 1e-5


@dataclass
class LayerWeights:
    """One layer's MoE weights to write. Give each projection either float weights (quantized with
    `mxfp4.quantize`) or already-quantized blocks and scales:

    w13 [E, 2I, H] float (rows interleaved: 2j gate, 2j+1 up)  or  w13_blocks [E, 2I, H/32, 16] uint8
        + w13_scales [E, 2I, H/32] uint8
    w2  [E, H, I] float                                         or  w2_blocks [E, H, I/32, 16] uint8
        + w2_scales [E, H, I/32] uint8
    w13_bias [E, 2I], w2_bias [E, H], router_weight [E, H], router_bias [E]: float (written as bf16)
    w13_channel_scale [E, 2I], w2_channel_scale [E, H]: optional float (written as float32)
    """
    router_weight: torch.Tensor
    router_bias: torch.Tensor
    w13_bias: torch.Tensor
    w2_bias: torch.Tensor
    w13: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w13_blocks: torch.Tensor | None = None
    w13_scales: torch.Tensor | None = None
    w2_blocks: torch.Tensor | None = None
    w2_scales: torch.Tensor | None = None
    w13_channel_scale: torch.Tensor | None = None
    w2_channel_scale: torch.Tensor | None = None


# ---- configs -----------------------------------------------------------------------------------

def hf_config_dict(config: MoEConfig, dense: DenseSpec | None = None) -> dict:
    """config.json in Hugging Face naming, with the fields transformers' GptOssConfig reads."""
    dense = dense or DenseSpec()
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "num_hidden_layers": config.num_layers,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.experts_per_token,
        "experts_per_token": config.experts_per_token,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "swiglu_limit": config.swiglu_limit,
        "swiglu_alpha": config.swiglu_alpha,
        "vocab_size": dense.vocab_size,
        "num_attention_heads": dense.num_attention_heads,
        "num_key_value_heads": dense.num_key_value_heads,
        "head_dim": dense.head_dim,
        "sliding_window": dense.sliding_window,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_layers)],
        "max_position_embeddings": dense.max_position_embeddings,
        "initial_context_length": 4096,
        "rope_theta": dense.rope_theta,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096},
        "rms_norm_eps": dense.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "router_aux_loss_coef": 0.9,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT)},
    }


def original_config_dict(config: MoEConfig, dense: DenseSpec | None = None) -> dict:
    """config.json in the original gpt-oss naming (num_experts, experts_per_token, ...)."""
    dense = dense or DenseSpec()
    raw = {
        "num_hidden_layers": config.num_layers,
        "num_experts": config.num_experts,
        "experts_per_token": config.experts_per_token,
        "vocab_size": dense.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "swiglu_limit": config.swiglu_limit,
        "head_dim": dense.head_dim,
        "num_attention_heads": dense.num_attention_heads,
        "num_key_value_heads": dense.num_key_value_heads,
        "sliding_window": dense.sliding_window,
        "initial_context_length": 4096,
        "rope_theta": dense.rope_theta,
        "rope_scaling_factor": 32.0,
        "rope_ntk_alpha": 1.0,
        "rope_ntk_beta": 32.0,
    }
    if config.swiglu_alpha != MoEConfig.swiglu_alpha:
        raw["swiglu_alpha"] = config.swiglu_alpha   # not an original key; our reader honours it
    return raw


# ---- the writer --------------------------------------------------------------------------------

def _check(t: torch.Tensor | None, what: str, shape: tuple[int, ...], *, float_ok: bool = False,
           uint8: bool = False) -> torch.Tensor:
    if t is None:
        raise ValueError(f"{what}: missing (expected {list(shape)})")
    if tuple(t.shape) != shape:
        raise ValueError(f"{what}: expected shape {list(shape)}, found {list(t.shape)}")
    if uint8 and t.dtype != torch.uint8:
        raise ValueError(f"{what}: expected uint8, found {t.dtype}")
    if float_ok and not t.is_floating_point():
        raise ValueError(f"{what}: expected a float tensor, found {t.dtype}")
    return t


def _layer_arrays(lw: LayerWeights, config: MoEConfig, index: int, scale_rounding: ScaleRounding
                  ) -> dict[str, torch.Tensor]:
    """LayerWeights -> {field: tensor as written}: quantize float weights, cast biases to bf16."""
    shapes = config.expected_shapes()
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    out = {}
    for proj, float_shape in (("w13", (e, 2 * i, h)), ("w2", (e, h, i))):
        dense = getattr(lw, proj)
        where = f"layer {index} {proj}"
        if dense is not None:
            if getattr(lw, f"{proj}_blocks") is not None:
                raise ValueError(f"{where}: give float weights or blocks/scales, not both")
            blocks, scales = quantize(_check(dense, where, float_shape, float_ok=True),
                                      scale_rounding=scale_rounding)
        else:
            blocks, scales = getattr(lw, f"{proj}_blocks"), getattr(lw, f"{proj}_scales")
        out[f"{proj}_blocks"] = _check(blocks, f"{where}_blocks", shapes[f"{proj}_blocks"], uint8=True)
        out[f"{proj}_scales"] = _check(scales, f"{where}_scales", shapes[f"{proj}_scales"], uint8=True)
    for field in ("w13_bias", "w2_bias", "router_weight", "router_bias"):
        out[field] = _check(getattr(lw, field), f"layer {index} {field}", shapes[field], float_ok=True).to(_FLOAT_DTYPE)
    for field, rows in (("w13_channel_scale", 2 * i), ("w2_channel_scale", h)):
        value = getattr(lw, field)
        if value is not None:
            out[field] = _check(value, f"layer {index} {field}", (e, rows), float_ok=True).to(_CHANNEL_SCALE_DTYPE)
    return out


def _moe_entries(config: MoEConfig, layout: Layout, index: int, channel_scales: bool
                 ) -> list[tuple[str, str, torch.dtype, tuple[int, ...]]]:
    """(name, field, dtype, shape) of each MoE tensor of one layer, in writing order."""
    names = layer_tensor_names(layout, index)
    shapes = config.expected_shapes()
    entries = []
    for field, shape in shapes.items():
        dtype = torch.uint8 if field.endswith(("_blocks", "_scales")) else _FLOAT_DTYPE
        entries.append((names[field], field, dtype, shape))
    if channel_scales:
        entries.append((names["w13_channel_scale"], "w13_channel_scale", _CHANNEL_SCALE_DTYPE,
                        (config.num_experts, 2 * config.intermediate_size)))
        entries.append((names["w2_channel_scale"], "w2_channel_scale", _CHANNEL_SCALE_DTYPE,
                        (config.num_experts, config.hidden_size)))
    return entries


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _split_shards(sizes: list[int], shards: int) -> list[int]:
    """Cut a list of tensor sizes into `shards` contiguous, non-empty runs of about equal bytes.
    Returns the start index of each run."""
    total = sum(sizes)
    starts, acc = [0], 0
    for k, size in enumerate(sizes):
        # Start a new shard once this one holds its share, keeping one tensor for each shard left.
        if (len(starts) < shards and acc >= total * len(starts) / shards
                and len(sizes) - k >= shards - len(starts)):
            starts.append(k)
        acc += size
    while len(starts) < shards:   # tiny tensors at the end: give each remaining shard one
        starts.append(len(sizes) - (shards - len(starts)))
    return starts


def _write_header(f, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _HEADER_ALIGN)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def _write_tensor(f, t: torch.Tensor) -> None:
    # Raw little-endian bytes without a bytes() copy: a byte view of the contiguous tensor.
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    f.write(memoryview(data))


def write_checkpoint(path: str | Path, config: MoEConfig,
                     layers: Sequence[LayerWeights] | Callable[[int], LayerWeights], *,
                     layout: Layout = "hf", shards: int = 1, dense: DenseSpec | None = None,
                     dense_tensors: dict[str, torch.Tensor] | None = None,
                     scale_rounding: ScaleRounding = "floor") -> Path:
    """Write a gpt-oss-style MXFP4 checkpoint into folder `path` (created) and return it.

    layers: one LayerWeights per layer, or a function layer index -> LayerWeights, called once per
      layer in order, so that only one layer is in memory at a time. All layers must agree on
      whether channel scales are present.
    layout: "hf" (model.layers.N.mlp.experts.*; config.json in Hugging Face naming with
      quantization_config) or "original" (block.N.mlp.*; original config naming). Point `path` at
      a model folder's `original/` to lay it out as gpt-oss ships it.
    shards: number of safetensors files. 1 writes model.safetensors; more write
      model-0000i-of-0000N.safetensors (i = 0..N-1) and, for "hf", model.safetensors.index.json
      (the "original" layout gets no index; the reader scans headers).
    dense, dense_tensors: config.json sizes of the non-MoE part, and those tensors (name -> tensor,
      written as given), e.g. from `synthetic_dense_tensors`.
    scale_rounding: passed to `mxfp4.quantize` for float weights.
    """
    if layout not in ("hf", "original"):
        raise ValueError(f"layout must be 'hf' or 'original', got {layout!r}")
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")
    if not callable(layers) and len(layers) != config.num_layers:
        raise ValueError(f"expected {config.num_layers} LayerWeights (config.num_layers), found {len(layers)}")
    get_layer = layers if callable(layers) else layers.__getitem__
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    first = _layer_arrays(get_layer(0), config, 0, scale_rounding)
    channel_scales = "w13_channel_scale" in first
    if channel_scales != ("w2_channel_scale" in first):
        raise ValueError("layer 0: give both w13_channel_scale and w2_channel_scale, or neither")
    dense_tensors = dict(dense_tensors or {})
    entries = [(name, None, t.dtype, tuple(t.shape)) for name, t in dense_tensors.items()]
    for index in range(config.num_layers):
        entries += [(name, (index, field), dtype, shape)
                    for name, field, dtype, shape in _moe_entries(config, layout, index, channel_scales)]
    if shards > len(entries):
        raise ValueError(f"shards={shards} exceeds the {len(entries)} tensors to write")
    starts = _split_shards([_nbytes(d, s) for _, _, d, s in entries], shards) + [len(entries)]
    file_names = (["model.safetensors"] if shards == 1 else
                  [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(shards)])

    current = {"index": 0, "arrays": first}

    def data(name: str, key) -> torch.Tensor:
        if key is None:
            return dense_tensors[name]
        index, field = key
        if current["index"] != index:
            current["arrays"] = None                   # free the previous layer first
            arrays = _layer_arrays(get_layer(index), config, index, scale_rounding)
            if ("w13_channel_scale" in arrays) != channel_scales:
                raise ValueError(f"layer {index}: channel scales present in some layers and not others")
            current.update(index=index, arrays=arrays)
        return current["arrays"][field]

    weight_map = {}
    for k, file_name in enumerate(file_names):
        chunk = entries[starts[k]:starts[k + 1]]
        with open(path / file_name, "wb") as f:
            _write_header(f, [(name, dtype, shape) for name, _, dtype, shape in chunk])
            for name, key, dtype, shape in chunk:
                t = data(name, key)
                assert t.dtype == dtype and tuple(t.shape) == shape, (name, t.dtype, t.shape)
                _write_tensor(f, t)
                weight_map[name] = file_name
    if shards > 1 and layout == "hf":
        total = sum(_nbytes(d, s) for _, _, d, s in entries)
        index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX_FILE).write_text(json.dumps(index_json, indent=2))
    raw_config = hf_config_dict(config, dense) if layout == "hf" else original_config_dict(config, dense)
    (path / CONFIG_FILE).write_text(json.dumps(raw_config, indent=2))
    return path


# ---- synthetic weights -------------------------------------------------------------------------

_STREAMS = {"gate": 1, "up": 2, "down": 3, "w13_row_gain": 4, "w2_row_gain": 5, "biases": 6,
            "router": 7, "channel": 8, "dense": 9}


_U64 = (1 << 64) - 1


def _generator(seed: int, *keys: int) -> torch.Generator:
    """A torch generator seeded from (seed, *keys) by a splitmix64-style mix, so each expert's
    weights can be regenerated alone, whatever the layout, sharding or order of generation."""
    state = seed & _U64
    for key in keys:
        state = (state ^ (key + 0x9E3779B97F4A7C15 + (state << 6) + (state >> 2))) & _U64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _U64
        state ^= state >> 31
    return torch.Generator().manual_seed(state >> 1)   # manual_seed takes a non-negative int64


def _row_gain(rows: int, g: torch.Generator) -> torch.Tensor:
    """Per-row magnitudes spread over about 2**-1..2**1 (log-normal), so scale bytes vary by row."""
    return torch.exp2(0.5 * torch.randn(rows, 1, generator=g)).clamp(0.25, 4.0)


def synthetic_expert_weights(seed: int, layer: int, expert: int, hidden: int, intermediate: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float weights `make_synthetic_checkpoint` quantizes for one expert, regenerated alone.

    Returns w13 [2I, H] float32 (rows interleaved: 2j gate j, 2j+1 up j) and w2 [H, I] float32.
    Entries are normal / sqrt(fan_in) times a per-row gain; gate and up are drawn from separate
    streams and up is half as large, so a gate/up swap or de-interleave changes results visibly.
    """
    h, i = hidden, intermediate
    gate = torch.randn(i, h, generator=_generator(seed, layer, expert, _STREAMS["gate"]))
    up = torch.randn(i, h, generator=_generator(seed, layer, expert, _STREAMS["up"])) * 0.5
    w13 = torch.stack((gate, up), dim=1).reshape(2 * i, h)          # row 2j gate j, 2j+1 up j
    w13 *= _row_gain(2 * i, _generator(seed, layer, expert, _STREAMS["w13_row_gain"])) / math.sqrt(h)
    w2 = torch.randn(h, i, generator=_generator(seed, layer, expert, _STREAMS["down"]))
    w2 *= _row_gain(h, _generator(seed, layer, expert, _STREAMS["w2_row_gain"])) / math.sqrt(i)
    return w13, w2


def synthetic_layer(config: MoEConfig, layer: int, *, seed: int = 0, channel_scales: bool = False,
                    scale_rounding: ScaleRounding = "floor") -> LayerWeights:
    """One layer of seeded synthetic weights, expert weights already quantized.

    Experts come from `synthetic_expert_weights` and are quantized one at a time into
    preallocated uint8 tensors, so memory stays near the packed size (about 1.6 GiB for a
    gpt-oss-120b layer) plus one expert in float32. Biases are small (normal * 0.05); the router
    is normal / sqrt(H) with bias normal * 0.1; channel scales (optional) are 2**uniform(-1, 1).
    """
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    w13_blocks = torch.empty((e, 2 * i, h // BLOCK_SIZE, BYTES_PER_BLOCK), dtype=torch.uint8)
    w13_scales = torch.empty((e, 2 * i, h // BLOCK_SIZE), dtype=torch.uint8)
    w2_blocks = torch.empty((e, h, i // BLOCK_SIZE, BYTES_PER_BLOCK), dtype=torch.uint8)
    w2_scales = torch.empty((e, h, i // BLOCK_SIZE), dtype=torch.uint8)
    for expert in range(e):
        w13, w2 = synthetic_expert_weights(seed, layer, expert, h, i)
        w13_blocks[expert], w13_scales[expert] = quantize(w13, scale_rounding=scale_rounding)
        w2_blocks[expert], w2_scales[expert] = quantize(w2, scale_rounding=scale_rounding)
    g = _generator(seed, layer, _STREAMS["biases"])
    w13_bias = torch.randn(e, 2 * i, generator=g) * 0.05
    w2_bias = torch.randn(e, h, generator=g) * 0.05
    g = _generator(seed, layer, _STREAMS["router"])
    router_weight = torch.randn(e, h, generator=g) / math.sqrt(h)
    router_bias = torch.randn(e, generator=g) * 0.1
    w13_cs = w2_cs = None
    if channel_scales:
        g = _generator(seed, layer, _STREAMS["channel"])
        w13_cs = torch.exp2(torch.rand(e, 2 * i, generator=g) * 2 - 1)
        w2_cs = torch.exp2(torch.rand(e, h, generator=g) * 2 - 1)
    return LayerWeights(router_weight=router_weight, router_bias=router_bias, w13_bias=w13_bias,
                        w2_bias=w2_bias, w13_blocks=w13_blocks, w13_scales=w13_scales,
                        w2_blocks=w2_blocks, w2_scales=w2_scales,
                        w13_channel_scale=w13_cs, w2_channel_scale=w2_cs)


def synthetic_dense_tensors(config: MoEConfig, dense: DenseSpec, layout: Layout = "hf", *, seed: int = 0
                            ) -> dict[str, torch.Tensor]:
    """The non-MoE tensors of a tiny full gpt-oss model (bf16): embeddings, attention (with
    sinks), norms and the unembedding, named for `layout`. Together with the MoE tensors they
    make a checkpoint transformers' GptOssForCausalLM loads completely. The same seed gives the
    same model in either layout: the original layout's tensors are the Hugging Face ones under
    their original names, with q, k and v stacked into one qkv projection."""
    hf = _hf_dense_tensors(config, dense, seed)
    if layout == "hf":
        return hf
    if layout != "original":
        raise ValueError(f"layout must be 'hf' or 'original', got {layout!r}")
    out = {"embedding.weight": hf["model.embed_tokens.weight"], "norm.scale": hf["model.norm.weight"],
           "unembedding.weight": hf["lm_head.weight"]}
    for n in range(config.num_layers):
        p, o = f"model.layers.{n}.", f"block.{n}."
        attn = p + "self_attn."
        out[o + "attn.norm.scale"] = hf[p + "input_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[f"{o}attn.qkv.{kind}"] = torch.cat([hf[f"{attn}{proj}.{kind}"] for proj in ("q_proj", "k_proj", "v_proj")])
            out[f"{o}attn.out.{kind}"] = hf[f"{attn}o_proj.{kind}"]
        out[o + "attn.sinks"] = hf[attn + "sinks"]
        out[o + "mlp.norm.scale"] = hf[p + "post_attention_layernorm.weight"]
    return out


def _hf_dense_tensors(config: MoEConfig, dense: DenseSpec, seed: int) -> dict[str, torch.Tensor]:
    g = _generator(seed, _STREAMS["dense"])
    h, v = config.hidden_size, dense.vocab_size
    q_dim = dense.num_attention_heads * dense.head_dim
    kv_dim = dense.num_key_value_heads * dense.head_dim

    def normal(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(_FLOAT_DTYPE)

    def norm_weight():
        return (1 + 0.1 * torch.randn(h, generator=g)).to(_FLOAT_DTYPE)

    out = {"model.embed_tokens.weight": normal(v, h, std=1.0)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        for proj, rows, cols in (("q_proj", q_dim, h), ("k_proj", kv_dim, h), ("v_proj", kv_dim, h),
                                 ("o_proj", h, q_dim)):
            out[f"{p}self_attn.{proj}.weight"] = normal(rows, cols, std=1 / math.sqrt(cols))
            out[f"{p}self_attn.{proj}.bias"] = normal(rows, std=0.02)
        out[f"{p}self_attn.sinks"] = normal(dense.num_attention_heads, std=1.0)
        out[f"{p}input_layernorm.weight"] = norm_weight()
        out[f"{p}post_attention_layernorm.weight"] = norm_weight()
    out["model.norm.weight"] = norm_weight()
    out["lm_head.weight"] = normal(v, h, std=1 / math.sqrt(h))
    return out


def make_synthetic_checkpoint(path: str | Path, *, num_layers: int = 2, num_experts: int = 8,
                              hidden: int = 256, intermediate: int = 256, top_k: int = 4, seed: int = 0,
                              layout: Layout = "hf", shards: int = 1, full_model: bool = False,
                              dense: DenseSpec | None = None, channel_scales: bool = False,
                              swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702,
                              scale_rounding: ScaleRounding = "floor") -> Path:
    """Write a seeded synthetic gpt-oss-style checkpoint into folder `path` and return it.

    Expert weights: `synthetic_expert_weights` (normal / sqrt(fan_in), per-row gains, gate/up
    interleaved), quantized per expert; see `synthetic_layer` for biases and router. The same
    seed gives the same bytes whatever the layout or sharding. Layers are generated and written
    one at a time (one gpt-oss-120b-size layer: E=128, hidden=intermediate=2880).
    full_model: also write the dense tensors of a tiny full model (`synthetic_dense_tensors`,
      sizes from `dense`), so that transformers can load the checkpoint.
    """
    config = MoEConfig(num_layers=num_layers, num_experts=num_experts, experts_per_token=top_k,
                       hidden_size=hidden, intermediate_size=intermediate, swiglu_limit=swiglu_limit,
                       swiglu_alpha=swiglu_alpha)
    dense = dense or DenseSpec()
    dense_tensors = synthetic_dense_tensors(config, dense, layout, seed=seed) if full_model else None
    return write_checkpoint(
        path, config,
        lambda n: synthetic_layer(config, n, seed=seed, channel_scales=channel_scales,
                                  scale_rounding=scale_rounding),
        layout=layout, shards=shards, dense=dense, dense_tensors=dense_tensors,
        scale_rounding=scale_rounding)


def random_expert_weights(num_experts: int, hidden: int, inter: int, *, top_k: int = 4,
                          hidden_pad: int | None = None, inter_pad: int | None = None,
                          local_experts: list[int] | None = None, channel_scales: bool = False,
                          seed: int = 0, device: torch.device | str = "cpu",
                          tp_rank: int = 0, dense: bool = True
                          ) -> tuple[ExpertWeights, dict[str, torch.Tensor]]:
    """Random gpt-oss-style weights in the padded ExpertWeights layout, for tests and benchmarks.

    Float weights ~ N(0, 1 / fan_in) are quantized with `mxfp4.quantize` (spec FLOOR scales) and
    copied into the top-left corner of zero-code, PAD_SCALE_E8M0-scale padded tensors; biases
    ~ N(0, 0.1) (w2 bias zero unless tp_rank == 0). local_experts: the global ids this rank
    holds (default all). Everything is drawn and quantized on `device` (fast for gpt-oss sizes
    on a GPU). Returns (weights, {"w13": [E_local, 2I, H], "w2": [E_local, H, I]} the
    dequantized unpadded float32 weights, in checkpoint orientation [out, in]; empty if not dense).
    """
    from .mxfp4 import BLOCK_SIZE, PAD_SCALE_E8M0, dequantize, quantize
    hidden_pad = hidden if hidden_pad is None else hidden_pad
    inter_pad = inter if inter_pad is None else inter_pad
    local = list(range(num_experts)) if local_experts is None else list(local_experts)
    e_local = len(local)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    def quantized(out_f: int, in_f: int, out_pad: int, in_pad: int):
        w = randn(e_local, out_f, in_f)
        w /= in_f ** 0.5
        blocks, scales = quantize(w)
        del w
        blocks_pad = torch.zeros(e_local, out_pad, in_pad // 2, dtype=torch.uint8, device=device)
        scales_pad = torch.full((e_local, out_pad, in_pad // BLOCK_SIZE), PAD_SCALE_E8M0, dtype=torch.uint8,
                                device=device)
        blocks_pad[:, :out_f, :in_f // 2] = blocks.reshape(e_local, out_f, in_f // 2)
        scales_pad[:, :out_f, :in_f // BLOCK_SIZE] = scales
        return blocks_pad, scales_pad, dequantize(blocks, scales, torch.float32) if dense else None

    w13_blocks, w13_scales, w13 = quantized(2 * inter, hidden, 2 * inter_pad, hidden_pad)
    w2_blocks, w2_scales, w2 = quantized(hidden, inter, hidden_pad, inter_pad)
    w13_bias = torch.zeros(e_local, 2 * inter_pad, device=device)
    w13_bias[:, :2 * inter] = 0.1 * randn(e_local, 2 * inter)
    w2_bias = torch.zeros(e_local, hidden_pad, device=device)
    if tp_rank == 0:
        w2_bias[:, :hidden] = 0.1 * randn(e_local, hidden)
    router_weight = torch.zeros(num_experts, hidden_pad, device=device)
    # Rounded to bf16 values, as a checkpoint stores them (the layer then routes through a bf16 GEMM).
    router_weight[:, :hidden] = (randn(num_experts, hidden) / hidden ** 0.5).bfloat16().float()
    router_bias = 0.1 * randn(num_experts)
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[torch.tensor(local, dtype=torch.long)] = torch.arange(e_local, dtype=torch.int32)
    extra = {}
    if channel_scales:
        for name, rows, real in (("w13_channel_scale", 2 * inter_pad, 2 * inter), ("w2_channel_scale", hidden_pad, hidden)):
            extra[name] = torch.zeros(e_local, rows, device=device)
            extra[name][:, :real] = 0.5 + torch.rand(e_local, real, generator=gen, device=device)
    weights = ExpertWeights(
        w13_blocks=w13_blocks, w13_scales=w13_scales, w13_bias=w13_bias,
        w2_blocks=w2_blocks, w2_scales=w2_scales, w2_bias=w2_bias,
        router_weight=router_weight, router_bias=router_bias, hidden=hidden, inter=inter,
        local_experts=torch.tensor(local, dtype=torch.int64), expert_map=expert_map, top_k=top_k,
        w2_bias_included=tp_rank == 0, tp_rank=tp_rank, **extra)
    weights.validate()
    return weights.to(device), ({"w13": w13, "w2": w2} if dense else {})
