"""Whole gpt-oss models in Hugging Face transformers, with the experts kept in MXFP4 and run by
`MXFP4MoE` (our kernels on a GPU, the pure-torch reference elsewhere).

    from mxfp4_moe.integrations.transformers import load_model
    model = load_model("path/to/gpt-oss-20b", device="cuda")       # a GptOssForCausalLM
    model.generate(...)

transformers builds the model; the dense weights (embeddings, attention, norms, unembedding)
come from the checkpoint through our reader, and every decoder layer's `mlp` becomes an
`MXFP4GptOssMLP` holding that layer's experts as our loader gives them: MXFP4 bytes in the
padded layout, for the rank a `ShardPlan` describes. The experts are never dequantized: the
model is built on the meta device, so transformers' own bf16 expert tensors (about 4x the MXFP4
bytes) never exist, not even one layer at a time. Nothing is downloaded: no hub kernels, no
`kernels` package.

Both checkpoint layouts load: the Hugging Face one, and the original one, whose dense tensors
are renamed (and its fused qkv projection split) as transformers' conversion script does.

Needs transformers (`pip install "mxfp4-moe[transformers]"`).
"""

from __future__ import annotations

import keyword
import math
import re
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, CheckpointError, link_roots, open_checkpoint, read_json, shown
from ..loader import load_layer
from ..moe import Backend, MXFP4MoE
from ..progress import progress_bar
from ..sharding import ShardPlan

__all__ = ["MXFP4GptOssMLP", "check_dense_tensors", "gpt_oss_config", "load_model", "missing_dense_tensors",
           "replace_moe", "shard_plan"]


def _require_transformers():
    try:
        import transformers
        from transformers import GptOssConfig, GptOssForCausalLM
    except ImportError as exc:
        raise ImportError("mxfp4_moe.integrations.transformers needs transformers: "
                          "pip install 'mxfp4-moe[transformers]'") from exc
    return transformers, GptOssConfig, GptOssForCausalLM


class MXFP4GptOssMLP(torch.nn.Module):
    """A drop-in for transformers' `GptOssMLP` (router + experts) on MXFP4 expert weights.

    moe: an `MXFP4MoE` (one process) or a `distributed.DistributedMXFP4MoE` (this rank's shard;
      its forward all-reduces the ranks' partial outputs, so every rank gets the full output).
    forward(hidden_states [B, S, H]) -> (output [B, S, H], router scores [B * S, k]), both in the
      input's dtype, as `GptOssMLP` returns them (the decoder layer keeps the output only).

    The expert weights live in `moe.weights`, not in parameters: `model.to(...)` does not move
    them, and `state_dict()` does not hold them (they are the checkpoint's bytes; load them
    from there).
    """

    def __init__(self, moe: torch.nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden = hidden_states.shape
        output, router_scores = self.moe.forward_with_router_scores(hidden_states.reshape(batch * seq, hidden))
        return output.reshape(batch, seq, hidden), router_scores

    def extra_repr(self) -> str:
        w = self.moe.weights
        return (f"experts={w.num_local_experts}/{w.num_experts}, top_k={w.top_k}, hidden={w.hidden}, "
                f"inter={w.inter} (tp rank {w.tp_rank} of {w.tp_size}), backend={self.moe.backend!r}")


# ---- the model's config -----------------------------------------------------------------------

# What transformers is handed is checked first, key by key: its config class and model turn a
# bad value into a ZeroDivisionError, a TypeError or a terabyte allocation far from the file.
# Sizes are ints in [1, 2**31 - 1] (int32 indexing); the rest as GptOssConfig documents them.
_MAX_SIZE = 2 ** 31 - 1
_POSITIVE_INTS = ("num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size", "head_dim",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "num_local_experts",
                  "num_experts", "num_experts_per_tok", "experts_per_token", "initial_context_length",
                  "sliding_window")     # (gpt-oss's sliding-attention layers need a window: null breaks them)
_OPTIONAL_NONNEGATIVE_INTS = ("pad_token_id", "bos_token_id")
_POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps", "swiglu_limit", "swiglu_alpha", "rope_scaling_factor",
                     "rope_ntk_alpha", "rope_ntk_beta")
_NONNEGATIVE_NUMBERS = ("attention_dropout", "initializer_range", "router_aux_loss_coef")
_BOOLS = ("tie_word_embeddings", "attention_bias", "use_cache", "output_router_logits")
_ROPE_KEYS = ("rope_scaling", "rope_parameters")
_LAYER_TYPES = ("sliding_attention", "full_attention")
_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= _MAX_SIZE ** 2)


def check_model_config(raw, source, nullable: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError naming `source` and the key unless every key transformers reads from
    `raw` (a config.json of either naming, or a Qwen3-MoE one) has the type and range transformers
    expects. nullable: keys of `_POSITIVE_INTS` that this family may set to null."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object, found {type(raw).__name__}")
    for key, value in raw.items():
        if not _KEY_RE.match(key) or keyword.iskeyword(key) or key == "self":
            raise CheckpointError(f"{source}: config key {shown(key)}: expected a name of letters, digits and "
                                  "underscores (a config attribute), not a Python keyword or 'self'")

        def bad(expected):
            return CheckpointError(f"{source}: {key}: expected {expected}, found {shown(value)}")

        if key in _POSITIVE_INTS and not (_is_int(value) and 1 <= value <= _MAX_SIZE) and not (
                value is None and key in nullable):
            raise bad(f"an int in [1, {_MAX_SIZE}]")
        if key in _OPTIONAL_NONNEGATIVE_INTS and value is not None and not (_is_int(value) and 0 <= value <= _MAX_SIZE):
            raise bad(f"null or an int in [0, {_MAX_SIZE}]")
        if key == "eos_token_id" and value is not None and not (
                (_is_int(value) and 0 <= value <= _MAX_SIZE)
                or (isinstance(value, list) and all(_is_int(v) and 0 <= v <= _MAX_SIZE for v in value))):
            raise bad("null, a token id or a list of token ids")
        if key in _POSITIVE_NUMBERS and not (_is_number(value) and value > 0):
            raise bad("a finite number > 0")
        if key in _NONNEGATIVE_NUMBERS and not (_is_number(value) and value >= 0):
            raise bad("a finite number >= 0")
        if key in _BOOLS and not isinstance(value, bool):
            raise bad("true or false")
        if key == "hidden_act" and value != "silu":
            raise bad("'silu' (gpt-oss's activation)")
        if key in _ROPE_KEYS and value is not None:
            if not isinstance(value, dict):
                raise bad("null or an object")
            for name, item in value.items():
                ok = (isinstance(item, (str, bool)) or item is None or _is_number(item)) and isinstance(name, str)
                if not ok or (name == "factor" and not (_is_number(item) and item > 0)) or (
                        name in ("rope_type", "type") and not isinstance(item, str)):
                    raise CheckpointError(f"{source}: {key}.{shown(name)}: expected a string, a finite number "
                                          f"(factor > 0), true, false or null, found {shown(item)}")
    heads, kv_heads = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv_heads) and heads % kv_heads:
        raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{kv_heads} (each key/value head serves a whole group of query heads)")
    layers, layer_types = raw.get("num_hidden_layers"), raw.get("layer_types")
    if layer_types is not None and not (isinstance(layer_types, list) and len(layer_types) == layers
                                        and all(t in _LAYER_TYPES for t in layer_types)):
        raise CheckpointError(f"{source}: layer_types: expected a list of num_hidden_layers = {layers} entries, "
                              f"each one of {list(_LAYER_TYPES)}, found {shown(layer_types)}")


def _original_to_hf_config(raw: dict, checkpoint: Checkpoint) -> dict:
    """An original-layout config.json in Hugging Face naming, as transformers' gpt-oss
    conversion script writes it. The MoE sizes come from the checkpoint's `MoEConfig`, which
    reads either naming (a model folder's config.json next to `original/` is in HF naming)."""
    cfg = checkpoint.config
    num_layers = cfg.num_layers
    context = raw.get("initial_context_length", 4096)
    factor = raw.get("rope_scaling_factor", 32.0)
    hf = {key: raw[key] for key in ("num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size",
                                    "head_dim", "num_attention_heads", "num_key_value_heads",
                                    "sliding_window", "rope_theta", "swiglu_limit") if key in raw}
    hf.update(
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
        # The original model alternates sliding-window (even layers) and full attention.
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        max_position_embeddings=raw.get("max_position_embeddings", int(context * factor)),
        rope_scaling={"rope_type": "yarn", "factor": factor, "beta_fast": raw.get("rope_ntk_beta", 32.0),
                      "beta_slow": raw.get("rope_ntk_alpha", 1.0), "truncate": False,
                      "original_max_position_embeddings": context},
        attention_bias=True, tie_word_embeddings=False)
    if "swiglu_alpha" in raw:
        hf["swiglu_alpha"] = raw["swiglu_alpha"]
    return hf


def build_config(config_class, raw: dict, source):
    """`config_class(**raw)` (a transformers config) for a config.json already through
    `check_model_config`, its quantization_config left out (we, not transformers, load the
    experts). Raises CheckpointError naming `source` for a key that would replace one of the
    class's methods, or whatever transformers' own checks refuse."""
    raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    name = config_class.__name__
    for key in raw:
        if callable(getattr(config_class, key, None)):
            raise CheckpointError(f"{source}: config key {key!r} would replace {name}'s method of that name")
    try:
        return config_class(**raw)
    except Exception as err:     # transformers' own checks, whatever their type, after ours passed
        raise CheckpointError(f"{source}: transformers' {name} refuses this config: "
                              f"{type(err).__name__}: {shown(str(err))}") from None


def gpt_oss_config(checkpoint: Checkpoint):
    """transformers' `GptOssConfig` for an open checkpoint of either layout, or a GGUF file (from
    its metadata). Raises CheckpointError naming config.json (the GGUF file) and the key for a
    value transformers cannot take."""
    _, GptOssConfig, _ = _require_transformers()
    source = checkpoint.config_file
    if checkpoint.layout == "gguf":          # the config is the file's metadata (formats/gguf.py)
        raw = checkpoint.model_config()
        source = f"{source} (GGUF metadata as GptOssConfig keys)"
    else:
        raw = read_json(source, "config", link_roots(source.parent))
    check_model_config(raw, source)
    # An original-layout folder may carry a config in Hugging Face naming (the model folder's).
    if checkpoint.layout == "original" and "num_local_experts" not in raw:
        raw = _original_to_hf_config(raw, checkpoint)
        check_model_config(raw, f"{source} (in Hugging Face naming)")
    config = build_config(GptOssConfig, raw, source)
    if "swiglu_alpha" in raw:           # (not a GptOssConfig argument; its experts read the attribute)
        config.swiglu_alpha = raw["swiglu_alpha"]
    return config


def shard_plan(checkpoint: Checkpoint, *, tp_size: int = 1, tp_rank: int = 0, ep_size: int = 1, ep_rank: int = 0,
               align="triton", **kwargs) -> ShardPlan:
    """The `ShardPlan` of one rank for this checkpoint's MoE layers (every layer has the same
    shapes). Default: one rank, padded for our Triton kernels."""
    cfg = checkpoint.config
    return ShardPlan.create(num_experts=cfg.num_experts, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
                            tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=ep_rank, align=align,
                            **kwargs)


# ---- the dense weights ------------------------------------------------------------------------

def _dense_sources(model_keys, checkpoint: Checkpoint, config) -> dict[str, tuple[str, slice | None]]:
    """Each dense parameter's checkpoint tensor: {model key: (tensor name, row slice or None)}."""
    if checkpoint.layout in ("hf", "unfused"):     # the unfused layout keeps Hugging Face's names
        return {key: (key, None) for key in model_keys}
    if checkpoint.layout == "gguf":
        from ..formats.gguf import dense_tensor_name
        return {key: (dense_tensor_name(key), None) for key in model_keys}
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    sources = {"model.embed_tokens.weight": ("embedding.weight", None),
               "model.norm.weight": ("norm.scale", None),
               "lm_head.weight": ("unembedding.weight", None)}
    for n in range(config.num_hidden_layers):
        p, o = f"model.layers.{n}.", f"block.{n}."
        sources[p + "input_layernorm.weight"] = (o + "attn.norm.scale", None)
        sources[p + "post_attention_layernorm.weight"] = (o + "mlp.norm.scale", None)
        sources[p + "self_attn.sinks"] = (o + "attn.sinks", None)
        for kind in ("weight", "bias"):
            # The original model's qkv projection is q, k and v stacked along the output rows.
            for proj, rows in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))):
                sources[f"{p}self_attn.{proj}.{kind}"] = (f"{o}attn.qkv.{kind}", rows)
            sources[f"{p}self_attn.o_proj.{kind}"] = (f"{o}attn.out.{kind}", None)
    return sources


def _missing(sources: dict, checkpoint: Checkpoint) -> list[str]:
    return sorted({name for name, _ in sources.values()} - set(checkpoint.names))


def _dense_parameter_names(config) -> list[str]:
    """The model's dense parameters (every one but the MoE blocks'), from a meta-device build."""
    model = _meta_model(config, None)
    return [name for name, _ in model.named_parameters() if ".mlp." not in name]


def _meta_model(config, dtype: torch.dtype | None):
    """GptOssForCausalLM(config) on the meta device (nothing allocated)."""
    _, _, GptOssForCausalLM = _require_transformers()
    try:
        with torch.device("meta"):
            model = GptOssForCausalLM(config)
    except Exception as err:     # transformers' model code on a config our checks let through
        raise CheckpointError(f"transformers cannot build GptOssForCausalLM from this config: "
                              f"{type(err).__name__}: {shown(str(err))}") from None
    return model if dtype is None else model.to(dtype)


def check_dense_tensors(checkpoint: Checkpoint) -> None:
    """Raise CheckpointError, naming file and tensor, unless every dense tensor the model reads
    is a float tensor of the shape the config gives it (headers only; nothing is allocated)."""
    config = gpt_oss_config(checkpoint)
    model = _meta_model(config, None)
    for decoder_layer in model.model.layers:
        decoder_layer.mlp = torch.nn.Identity()            # the MoE tensors are the reader's to check
    sources = _dense_sources(dict(model.named_parameters()), checkpoint, config)
    if not _missing(sources, checkpoint):
        _check_dense(model, sources, checkpoint)


def missing_dense_tensors(checkpoint: Checkpoint) -> list[str]:
    """The dense tensors (embeddings, attention, norms, unembedding) a full model needs that the
    checkpoint lacks, by their checkpoint names; empty for a full-model checkpoint."""
    config = gpt_oss_config(checkpoint)
    return _missing(_dense_sources(_dense_parameter_names(config), checkpoint, config), checkpoint)


_DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_dense(model, sources: dict, checkpoint: Checkpoint) -> None:
    """Every dense tensor the model reads must be a float tensor of exactly the shape the config
    gives its parameter (the original layout's fused qkv: q, k and v rows together, no more, no
    fewer). Checked on the headers, before any parameter is allocated."""
    for key, param in model.named_parameters():
        name, rows = sources.get(key, (key, None))
        ref = checkpoint.tensor(name)
        expected = tuple(param.shape)
        if rows is not None:
            # The whole fused tensor: the config's q + 2 kv rows (rows.stop of v_proj's slice).
            total = _fused_qkv_rows(model.config)
            expected = (total, *param.shape[1:])
            what = (f"the config's q, k and v rows stacked ({model.config.num_attention_heads} + "
                    f"2 x {model.config.num_key_value_heads} heads of {model.config.head_dim} = {total} rows)")
        else:
            what = f"the model's {key}"
        if ref.dtype not in _DENSE_DTYPES:
            raise CheckpointError(f"{ref.file}: tensor {name}: expected a float dtype (bfloat16, float16 or "
                                  f"float32), found {ref.dtype}")
        if tuple(ref.shape) != expected:
            raise CheckpointError(f"{ref.file}: tensor {name}: expected shape {list(expected)} ({what}, from "
                                  f"config {checkpoint.config_file.name}), found {list(ref.shape)}")


def _fused_qkv_rows(config) -> int:
    return (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim


def _load_dense(model, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
    """Materialize the model's (meta) dense parameters on `device` from the checkpoint."""
    sources = _dense_sources(dict(model.named_parameters()), checkpoint, model.config)
    missing = _missing(sources, checkpoint)
    if missing:
        listed = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(
            f"{checkpoint.path}: no dense weights for the full model: {len(missing)} tensors are missing ({listed}). "
            "load_model needs a full gpt-oss checkpoint (embeddings, attention, norms, unembedding), not the "
            "MoE layers alone")
    _check_dense(model, sources, checkpoint)
    nbytes = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    try:
        model.to_empty(device=device)
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as err:
        raise MemoryError(f"load_model: cannot allocate the dense weights ({nbytes / 2**30:.2f} GiB of {dtype} on "
                          f"{device}) for {checkpoint.path}: {str(err)[:200]}") from None
    with torch.no_grad():
        for key, param in model.named_parameters():
            name, rows = sources.get(key, (key, None))
            ref = checkpoint.tensor(name)
            param.copy_((ref.read_all() if rows is None else ref.read(rows)).to(dtype))
    # to_empty left the buffers (rotary frequencies, computed at construction) uninitialized.
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(model.config)
    unknown = [name for name, buf in model.named_buffers() if not name.startswith("model.rotary_emb.")]
    if unknown:
        raise RuntimeError(f"load_model: this transformers version ({_require_transformers()[0].__version__}) "
                           f"gives GptOssForCausalLM buffers load_model does not know how to initialize: {unknown}")


# ---- the MoE blocks ---------------------------------------------------------------------------

def _check_model_matches(model, checkpoint: Checkpoint) -> None:
    cfg, mc = checkpoint.config, model.config
    for what, ours, theirs in (("num_hidden_layers", cfg.num_layers, mc.num_hidden_layers),
                               ("num_local_experts", cfg.num_experts, mc.num_local_experts),
                               ("num_experts_per_tok", cfg.experts_per_token, mc.num_experts_per_tok),
                               ("hidden_size", cfg.hidden_size, mc.hidden_size),
                               ("intermediate_size", cfg.intermediate_size, mc.intermediate_size)):
        if ours != theirs:
            raise ValueError(f"replace_moe: the model's config has {what} = {theirs}, but checkpoint "
                             f"{checkpoint.path} ({checkpoint.config_file.name}) has {ours}")


def _moe_block(checkpoint: Checkpoint, layer: int, plan: ShardPlan, device: torch.device, backend: Backend,
               moe_kwargs: dict) -> MXFP4GptOssMLP:
    weights = load_layer(checkpoint, layer, plan, device=device)
    if plan.tp_size * plan.ep_size == 1:
        return MXFP4GptOssMLP(MXFP4MoE(weights, backend=backend, **moe_kwargs))
    import torch.distributed as dist
    from ..distributed import DistributedMXFP4MoE, MoEGroups
    if not dist.is_initialized():
        raise RuntimeError(f"load_model: the plan is tp {plan.tp_size} x ep {plan.ep_size}, which needs "
                           "torch.distributed initialized (torchrun, then init_process_group)")
    world = dist.get_world_size()
    if world != plan.tp_size * plan.ep_size:
        raise ValueError(f"load_model: the plan is tp {plan.tp_size} x ep {plan.ep_size} = "
                         f"{plan.tp_size * plan.ep_size} ranks, but the world has {world}")
    groups = MoEGroups.from_world(plan.tp_size, plan.ep_size)
    return MXFP4GptOssMLP(DistributedMXFP4MoE(weights, groups, backend=backend, **moe_kwargs))


def _replace_blocks(model, checkpoint: Checkpoint, plan: ShardPlan | None, backend: Backend, progress: bool,
                    device_of, moe_kwargs: dict) -> None:
    """Swap every decoder layer's mlp for an MXFP4GptOssMLP loaded from the checkpoint, one
    layer at a time (the old block is dropped as its replacement arrives)."""
    plan = plan or shard_plan(checkpoint)
    layers = model.model.layers
    bar = progress_bar(len(layers), progress, desc="MXFP4 experts", unit="layer")
    try:
        for n, decoder_layer in enumerate(layers):
            bar.set_postfix_str(f"layer {n}", refresh=False)
            decoder_layer.mlp = _moe_block(checkpoint, n, plan, device_of(n), backend, moe_kwargs)
            bar.update(1)
    finally:
        bar.close()


# ---- the entry points -------------------------------------------------------------------------

def load_model(path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
               backend: Backend = "auto", plan: ShardPlan | None = None, progress: bool = True,
               attn_implementation: str = "eager", fast_generate: bool | None = None, **moe_kwargs):
    """A `GptOssForCausalLM` for the checkpoint at `path`, with every MoE block on MXFP4 weights
    (for a compressed-tensors Qwen3-MoE checkpoint, a `Qwen3MoeForCausalLM`: `qwen3_moe.py`).

    device: where the model runs (default: the current CUDA device when there is one, else cpu).
    dtype: the dense weights' and activations' dtype (the experts stay MXFP4; our kernels compute
      in bf16 on a GPU, the torch backend in float32).
    backend: `MXFP4MoE`'s ("auto": our Triton kernels on CUDA, the torch reference elsewhere).
    plan: this rank's `ShardPlan` (`shard_plan(...)` builds one). Default: one rank. A TP/EP plan
      needs torch.distributed initialized with tp_size * ep_size ranks; each rank then reads only
      its experts' bytes and every MoE block all-reduces its partial output, so with the same
      tokens on every rank each rank computes the single-process logits.
    progress: a progress bar over the layers on a terminal.
    attn_implementation: transformers' attention ("eager" runs anywhere; the sinks gpt-oss uses
      rule out sdpa).
    fast_generate: `model.generate()` with a static KV cache sized from a few length buckets, which
      transformers compiles on a GPU (`generation.py`; the first call of each batch size and bucket
      compiles, saying so on stderr). None (default): on for a CUDA device; False keeps
      transformers' default (dynamic cache, eager).
    moe_kwargs: passed to `MXFP4MoE` (compute_dtype, combine, fragment_order, ...).
    Raises CheckpointError (naming the file and tensor) for a checkpoint without the dense
    weights or with shapes its config does not give.
    """
    _require_transformers()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    with open_checkpoint(path) as checkpoint:
        if checkpoint.layout == "compressed-tensors":       # a Qwen3-MoE model: its own module
            from .qwen3_moe import load_qwen3_moe_model
            model = load_qwen3_moe_model(checkpoint, device=device, dtype=dtype, backend=backend, plan=plan,
                                         progress=progress, attn_implementation=attn_implementation, **moe_kwargs)
            return _with_generate_default(model, fast_generate, device)
        config = gpt_oss_config(checkpoint)
        config._attn_implementation = attn_implementation
        model = _meta_model(config, dtype)
        for decoder_layer in model.model.layers:
            decoder_layer.mlp = torch.nn.Identity()        # the meta bf16 experts go before anything is allocated
        _load_dense(model, checkpoint, device, dtype)
        _replace_blocks(model, checkpoint, plan, backend, progress, lambda n: device, moe_kwargs)
    # An inference model: the MoE blocks have no backward, and a compiled graph that tracks
    # gradients through their op would fail to build.
    return _with_generate_default(model.requires_grad_(False).eval(), fast_generate, device)


def _with_generate_default(model, fast_generate: bool | None, device: torch.device):
    """`model`, with `generate()` on a bucketed static cache where `fast_generate` asks for it
    (None: on CUDA)."""
    if fast_generate if fast_generate is not None else device.type == "cuda":
        from .generation import enable_fast_generate
        enable_fast_generate(model)
    return model


def replace_moe(model, path: str | Path, plan: ShardPlan | None = None, *, backend: Backend = "auto",
                progress: bool = True, **moe_kwargs):
    """Replace every MoE block of an already built `GptOssForCausalLM` with an `MXFP4GptOssMLP`
    holding the checkpoint's experts (for `plan`'s rank; default one rank), each on the device
    of its decoder layer. The model's config must match the checkpoint's. Returns `model`."""
    with open_checkpoint(path) as checkpoint:
        _check_model_matches(model, checkpoint)

        def device_of(n: int) -> torch.device:
            norm = model.model.layers[n].post_attention_layernorm.weight
            if norm.is_meta:
                raise ValueError(f"replace_moe: decoder layer {n}'s weights are on the meta device; "
                                 "load the dense weights first, or use load_model")
            return norm.device

        _replace_blocks(model, checkpoint, plan, backend, progress, device_of, moe_kwargs)
    return model
