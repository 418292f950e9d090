"""Tiny synthetic checkpoints in the other formats (`mxfp4_moe.formats`): the same seeded layers
`synthetic.synthetic_layer` makes for gpt-oss, written as compressed-tensors (Qwen3-MoE), GGUF
(gpt-oss), Quark (either family) or gpt-oss's per-expert unfused layout. The tests' inputs: no downloads. `dense_reference` is the MoE those files mean,
computed from the dequantized weights and the format's semantics, independently of the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from .checkpoint import MoEConfig
from .mxfp4 import dequantize
from .semantics import GPT_OSS, MoESemantics, activate, qwen_moe, score
from .synthetic import LayerWeights, synthetic_layer

Format = Literal["compressed-tensors", "gguf", "quark-qwen3", "quark-gpt-oss", "gpt-oss-unfused"]
FORMATS: tuple[str, ...] = ("compressed-tensors", "gguf", "quark-qwen3", "quark-gpt-oss", "gpt-oss-unfused")


def _fused(layer: LayerWeights) -> dict[str, torch.Tensor]:
    return {name: getattr(layer, name) for name in ("w13_blocks", "w13_scales", "w13_bias", "w2_blocks", "w2_scales",
                                                    "w2_bias", "router_weight", "router_bias")}


def format_semantics(fmt: str, norm_topk_prob: bool = False) -> MoESemantics:
    return qwen_moe(norm_topk_prob) if fmt in ("compressed-tensors", "quark-qwen3") else GPT_OSS


def make_format_checkpoint(path: str | Path, fmt: Format, *, num_layers: int = 1, num_experts: int = 4,
                           hidden: int = 64, intermediate: int = 96, top_k: int = 2, seed: int = 0,
                           norm_topk_prob: bool = False) -> tuple[Path, list[LayerWeights]]:
    """Write a synthetic checkpoint of `fmt` under `path` (a folder; GGUF: `path`/model.gguf).
    Returns (what to open, the layers written, rounded as the file stores them). The Qwen3-MoE
    formats (compressed-tensors, quark-qwen3) drop the biases and store the router in bf16; GGUF
    keeps biases and router in float32; quark-gpt-oss keeps them in bf16; gpt-oss-unfused keeps
    them in float32, holding bf16 values."""
    from .formats import compressed_tensors, gguf, gpt_oss_unfused, quark
    config = MoEConfig(num_layers=num_layers, num_experts=num_experts, experts_per_token=top_k,
                       hidden_size=hidden, intermediate_size=intermediate)
    layers = [synthetic_layer(config, i, seed=seed) for i in range(num_layers)]
    folder = Path(path)
    for layer in layers:              # what the file holds, so the layers describe it exactly
        if fmt in ("compressed-tensors", "quark-qwen3"):
            layer.router_bias = torch.zeros_like(layer.router_bias)
            layer.w13_bias = torch.zeros_like(layer.w13_bias)
            layer.w2_bias = torch.zeros_like(layer.w2_bias)
        if fmt != "gguf":
            for name in ("router_weight", "router_bias", "w13_bias", "w2_bias"):
                setattr(layer, name, getattr(layer, name).bfloat16().float())
    if fmt == "compressed-tensors":
        target = compressed_tensors.write_checkpoint(folder, [_fused(lw) for lw in layers], top_k=top_k,
                                                     norm_topk_prob=norm_topk_prob)
    elif fmt in ("quark-qwen3", "quark-gpt-oss"):
        target = quark.write_checkpoint(folder, [_fused(lw) for lw in layers], top_k=top_k,
                                        family="qwen3_moe" if fmt == "quark-qwen3" else "gpt_oss",
                                        norm_topk_prob=norm_topk_prob)
    elif fmt == "gguf":
        target = gguf.write_checkpoint(folder / "model.gguf", [_fused(lw) for lw in layers], top_k=top_k)
    elif fmt == "gpt-oss-unfused":
        target = gpt_oss_unfused.write_unfused_checkpoint(folder, [_fused(lw) for lw in layers], top_k=top_k)
    else:
        raise ValueError(f"make_format_checkpoint: fmt must be one of {FORMATS}, got {fmt!r}")
    return target, layers


def dense_reference(x: torch.Tensor, layer: LayerWeights, semantics: MoESemantics, top_k: int) -> torch.Tensor:
    """The MoE output [T, H] float64 of one layer: router logits (+ bias), `semantics.score`, each
    chosen expert's dequantized w13 (interleaved rows) + bias, `semantics.activate`, w2 + bias,
    weighted sum."""
    x = x.double()
    logits = (x @ layer.router_weight.double().T + layer.router_bias.double()).float()
    weights, ids = score(logits, top_k, semantics.router, semantics.norm_topk_prob)
    w13 = dequantize(layer.w13_blocks, layer.w13_scales, torch.float64)          # [E, 2I, H]
    w2 = dequantize(layer.w2_blocks, layer.w2_scales, torch.float64)             # [E, H, I]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = int(ids[t, j])
            h = w13[e] @ x[t] + layer.w13_bias[e].double()
            a = activate(h, semantics.activation, semantics.swiglu_alpha, semantics.swiglu_limit)
            out[t] += float(weights[t, j]) * (w2[e] @ a + layer.w2_bias[e].double())
    return out


def make_qwen3_moe_model_checkpoint(path: str | Path, *, num_layers: int = 2, num_experts: int = 4,
                                    hidden: int = 64, intermediate: int = 64, top_k: int = 2,
                                    norm_topk_prob: bool = True, seed: int = 0):
    """A tiny whole Qwen3-MoE model as llm-compressor's MXFP4A16 writes it: every Linear but
    lm_head (experts and attention projections) as compressed-tensors MXFP4, the routers, norms
    and embeddings in bf16. Needs transformers. Returns (folder, reference): `reference` is
    transformers' float32 `Qwen3MoeForCausalLM` holding exactly the values the files mean (the
    quantized weights dequantized, the bf16 ones as stored)."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from .formats.compressed_tensors import layer_tensors, quantization_config
    from .mxfp4 import quantize

    config = Qwen3MoeConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                            moe_intermediate_size=intermediate, num_hidden_layers=num_layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_experts=num_experts, num_experts_per_tok=top_k,
                            norm_topk_prob=norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                            tie_word_embeddings=False, max_position_embeddings=256)
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    reference = Qwen3MoeForCausalLM(config).float().eval()
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in reference.named_parameters():
            # Larger than transformers' init (std 0.02), so routing and activations are not flat.
            param.normal_(0.0, 1.0 / param.shape[-1] ** 0.5) if param.dim() > 1 else param.uniform_(0.5, 1.5)
        for n, layer in enumerate(reference.model.layers):
            experts = layer.mlp.experts
            gate, up = experts.gate_up_proj[:, :intermediate], experts.gate_up_proj[:, intermediate:]
            w13 = torch.stack((gate, up), dim=2).reshape(num_experts, 2 * intermediate, hidden)   # interleaved
            w13_blocks, w13_scales = quantize(w13)
            w2_blocks, w2_scales = quantize(experts.down_proj)
            router = layer.mlp.gate.weight.bfloat16()
            tensors.update(layer_tensors(n, {"w13_blocks": w13_blocks, "w13_scales": w13_scales,
                                             "w2_blocks": w2_blocks, "w2_scales": w2_scales, "router_weight": router}))
            w13 = dequantize(w13_blocks, w13_scales, torch.float32)
            experts.gate_up_proj.copy_(torch.cat((w13[:, 0::2], w13[:, 1::2]), dim=1))
            experts.down_proj.copy_(dequantize(w2_blocks, w2_scales, torch.float32))
            layer.mlp.gate.weight.copy_(router.float())
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(layer.self_attn, proj)
                blocks, scales = quantize(linear.weight)
                prefix = f"model.layers.{n}.self_attn.{proj}."
                tensors[prefix + "weight_packed"] = blocks.flatten(-2).contiguous()
                tensors[prefix + "weight_scale"] = scales.contiguous()
                linear.weight.copy_(dequantize(blocks, scales, torch.float32))
        for name, param in reference.named_parameters():
            if ".mlp." in name or any(f"self_attn.{p}." in name for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                continue
            tensors[name] = param.bfloat16().contiguous()
            param.copy_(tensors[name].float())
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    raw["num_experts"] = raw.pop("num_local_experts", num_experts)      # the name Qwen's own config.json uses
    raw["quantization_config"] = quantization_config()
    (folder / "config.json").write_text(__import__("json").dumps(raw, indent=2, default=str))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, reference


def make_gguf_model_checkpoint(path: str | Path, *, dense_type: str = "BF16", num_layers: int = 2,
                               num_experts: int = 4, hidden: int = 64, intermediate: int = 96, top_k: int = 2,
                               seed: int = 0, vocab_size: int = 128) -> tuple[Path, Path]:
    """A tiny whole gpt-oss model as a GGUF file (MXFP4 experts; matrices of the dense model in
    GGML type `dense_type`: F32, F16, BF16 or a quantized type such as Q8_0; 1-D tensors F32) and
    its twin in the Hugging Face layout holding the same values: the synthetic full checkpoint
    (`synthetic.make_synthetic_checkpoint`) with its dense tensors replaced by the float32 values
    the GGUF file holds (dequantized, so that both files mean one model). Returns (GGUF file,
    Hugging Face folder)."""
    import json

    from safetensors.torch import load_file, save_file

    from .formats import gguf
    from .synthetic import DenseSpec, make_synthetic_checkpoint

    folder = Path(path)
    dense_spec = DenseSpec(vocab_size=vocab_size)
    hf = make_synthetic_checkpoint(folder / "hf", num_layers=num_layers, num_experts=num_experts, hidden=hidden,
                                   intermediate=intermediate, top_k=top_k, seed=seed, full_model=True,
                                   dense=dense_spec)
    model_config = json.loads((hf / "config.json").read_text())
    [st_file] = sorted(hf.glob("*.safetensors"))
    tensors = load_file(str(st_file))
    dense, twin = {}, dict(tensors)
    for name, value in tensors.items():
        if ".mlp." in name:
            continue
        dense[name], twin[name] = gguf.encode_dense(value, dense_type)
    save_file({k: v.contiguous() for k, v in twin.items()}, str(st_file))
    layers = []
    for n in range(num_layers):
        # The experts as the Hugging Face file holds them: MXFP4 bytes as they are, the router and
        # biases rounded to bf16 (GGUF stores them in F32, which holds the bf16 values exactly).
        p = f"model.layers.{n}.mlp."
        layers.append({"w13_blocks": tensors[p + "experts.gate_up_proj_blocks"],
                       "w13_scales": tensors[p + "experts.gate_up_proj_scales"],
                       "w13_bias": tensors[p + "experts.gate_up_proj_bias"].float(),
                       "w2_blocks": tensors[p + "experts.down_proj_blocks"],
                       "w2_scales": tensors[p + "experts.down_proj_scales"],
                       "w2_bias": tensors[p + "experts.down_proj_bias"].float(),
                       "router_weight": tensors[p + "router.weight"].float(),
                       "router_bias": tensors[p + "router.bias"].float()})
    file = gguf.write_checkpoint(folder / "model.gguf", layers, top_k=top_k, model_config=model_config, dense=dense)
    return file, hf
