"""Whole Qwen3-MoE models from compressed-tensors MXFP4 checkpoints in transformers: a
`Qwen3MoeForCausalLM` whose sparse MoE blocks are `MXFP4MoE` layers on the checkpoint's MXFP4
experts (SiLU-gated, softmax then top-k: `semantics.qwen_moe`). `transformers.load_model` calls
`load_qwen3_moe_model` for such a checkpoint.

Dense weights: MXFP4A16 quantizes every `Linear` (`targets=["Linear"]`), so the attention
projections come as `weight_packed` / `weight_scale` too; they are dequantized exactly into the
model's dtype. The rest (embeddings, norms, q/k norms, unembedding, routers) are stored in float.
The model is built on the meta device, so transformers' own float experts never exist. Every
layer must be sparse (compressed-tensors reader).
"""

from __future__ import annotations


import torch

from ..checkpoint import CheckpointError, link_roots, read_json
from ..formats.compressed_tensors import CompressedTensorsCheckpoint
from ..moe import Backend
from ..mxfp4 import dequantize
from ..sharding import ShardPlan

PACKED_SUFFIX = ".weight_packed"
SCALE_SUFFIX = ".weight_scale"


def _require_transformers():
    try:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    except ImportError as exc:
        raise ImportError("loading Qwen3-MoE models needs transformers: pip install 'mxfp4-moe[transformers]'") from exc
    return Qwen3MoeConfig, Qwen3MoeForCausalLM


class MXFP4Qwen3MoeBlock(torch.nn.Module):
    """A drop-in for transformers' `Qwen3MoeSparseMoeBlock` on MXFP4 expert weights.

    moe: an `MXFP4MoE` (or `distributed.DistributedMXFP4MoE`) whose weights carry Qwen semantics.
    forward(hidden_states [B, S, H]) -> [B, S, H] in the input's dtype, as the block returns it.
    """

    def __init__(self, moe: torch.nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        return self.moe(hidden_states.reshape(batch * seq, hidden)).reshape(batch, seq, hidden)

    def extra_repr(self) -> str:
        w = self.moe.weights
        return (f"experts={w.num_local_experts}/{w.num_experts}, top_k={w.top_k}, hidden={w.hidden}, "
                f"inter={w.inter} (tp rank {w.tp_rank} of {w.tp_size}), {w.activation}/{w.router_scoring}")


def qwen3_moe_config(checkpoint: CompressedTensorsCheckpoint):
    """transformers' `Qwen3MoeConfig` from the checkpoint's config.json (its quantization_config
    left out: we, not transformers, read the quantized tensors)."""
    Qwen3MoeConfig, _ = _require_transformers()
    from .transformers import check_model_config, build_config
    raw = read_json(checkpoint.config_file, "config", link_roots(checkpoint.path))
    # (Qwen3-MoE sets sliding_window null where it uses none, unlike gpt-oss.)
    check_model_config(raw, checkpoint.config_file, nullable=("sliding_window",))
    return build_config(Qwen3MoeConfig, raw, checkpoint.config_file)


def _dense_value(checkpoint: CompressedTensorsCheckpoint, key: str, dtype: torch.dtype) -> torch.Tensor:
    """A dense parameter from the checkpoint: stored in float under its own name, or (a Linear's
    weight) as MXFP4 `weight_packed` [out, in/2] + `weight_scale` [out, in/32], dequantized."""
    if key in checkpoint:
        return checkpoint.tensor(key).read_all().to(dtype)
    stem = key.removesuffix(".weight")
    if key.endswith(".weight") and stem + PACKED_SUFFIX in checkpoint:
        packed = checkpoint.tensor(stem + PACKED_SUFFIX)
        scales = checkpoint.tensor(stem + SCALE_SUFFIX)
        if packed.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise CheckpointError(f"{packed.file}: tensors {packed.name} / {scales.name}: expected uint8 MXFP4 "
                                  f"codes and E8M0 scales, found {packed.dtype} / {scales.dtype}")
        return dequantize(packed.read_all(), scales.read_all(), dtype)
    raise CheckpointError(f"{checkpoint.path}: no tensor for the model's {key}: expected {key} (float) or "
                          f"{stem}{PACKED_SUFFIX} + {stem}{SCALE_SUFFIX} (MXFP4); load_model needs a full model")


def _dense_present(checkpoint: CompressedTensorsCheckpoint, key: str) -> bool:
    stem = key.removesuffix(".weight")
    return key in checkpoint or (key.endswith(".weight") and stem + PACKED_SUFFIX in checkpoint
                                 and stem + SCALE_SUFFIX in checkpoint)


def missing_dense_tensors(checkpoint: CompressedTensorsCheckpoint) -> list[str]:
    """The dense parameters (embeddings, attention, norms, unembedding) of the model the config
    describes that the checkpoint holds neither in float nor as MXFP4 packed + scale, by their
    model names; empty for a full-model checkpoint. Nothing is allocated (a meta build)."""
    _, Qwen3MoeForCausalLM = _require_transformers()
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(qwen3_moe_config(checkpoint))
    return sorted(name for name, _ in model.named_parameters()
                  if ".mlp." not in name and not _dense_present(checkpoint, name))


def _load_dense(model, checkpoint: CompressedTensorsCheckpoint, device: torch.device, dtype: torch.dtype) -> None:
    model.to_empty(device=device)
    with torch.no_grad():
        for key, param in model.named_parameters():
            value = _dense_value(checkpoint, key, dtype)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{checkpoint.path}: the checkpoint's {key} has shape {list(value.shape)}, the "
                                      f"model's (from {checkpoint.config_file.name}) {list(param.shape)}")
            param.copy_(value)
    rotary = model.model.rotary_emb          # to_empty left its frequencies uninitialized
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(model.config)
    unknown = [name for name, _ in model.named_buffers() if not name.startswith("model.rotary_emb.")]
    if unknown:
        raise RuntimeError(f"load_model: Qwen3MoeForCausalLM has buffers load_model does not initialize: {unknown}")


def load_qwen3_moe_model(checkpoint: CompressedTensorsCheckpoint, *, device: torch.device, dtype: torch.dtype,
                         backend: Backend, plan: ShardPlan | None, progress: bool, attn_implementation: str,
                         **moe_kwargs):
    """`transformers.load_model` for an open compressed-tensors checkpoint: a `Qwen3MoeForCausalLM`
    with every sparse block an `MXFP4Qwen3MoeBlock` (arguments as `load_model`'s)."""
    from .transformers import _moe_block, shard_plan
    from ..progress import progress_bar

    _, Qwen3MoeForCausalLM = _require_transformers()
    config = qwen3_moe_config(checkpoint)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config).to(dtype)
    for decoder_layer in model.model.layers:
        decoder_layer.mlp = torch.nn.Identity()            # the meta float experts go first
    _load_dense(model, checkpoint, device, dtype)
    plan = plan or shard_plan(checkpoint)
    bar = progress_bar(len(model.model.layers), progress, desc="MXFP4 experts", unit="layer")
    try:
        for n, decoder_layer in enumerate(model.model.layers):
            # (_moe_block wraps the layer for GptOssMLP's contract; the layer itself is what we keep)
            moe = _moe_block(checkpoint, n, plan, device, backend, moe_kwargs).moe
            decoder_layer.mlp = MXFP4Qwen3MoeBlock(moe)
            bar.update(1)
    finally:
        bar.close()
    return model.requires_grad_(False).eval()
