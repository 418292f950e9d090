"""GGUF files of gpt-oss with MXFP4 experts (llama.cpp's GGML type MXFP4): the reader, and a
writer of tiny ones for tests. Parsed with the `gguf` package (`pip install mxfp4_moe[gguf]`).

Facts (gguf 0.19.0: `quants.py::MXFP4`, `constants.py` GGML_QUANT_SIZES and the GPT_OSS tensor
list; llama.cpp's gpt-oss converter and `LLM_FFN_SWIGLU_OAI_MOE` constants; tests/test_formats.py
checks them against the package):

  block: 17 bytes per 32 elements: byte 0 the E8M0 scale (bias 127), bytes 1..16 the codes,
         qs[j] low nibble = element j, high nibble = element j + 16 (the Hugging Face layout
         has element 2j low and 2j + 1 high: the reader re-packs, bit-exactly)
  blk.N.ffn_gate_exps.weight  MXFP4, data (E, I, H/32 * 17)  gate rows (gpt-oss gate_up[..., ::2])
  blk.N.ffn_up_exps.weight    MXFP4, data (E, I, H/32 * 17)  up rows   (gate_up[..., 1::2])
  blk.N.ffn_down_exps.weight  MXFP4, data (E, H, I/32 * 17)
  blk.N.ffn_{gate,up}_exps.bias (E, I), blk.N.ffn_down_exps.bias (E, H), blk.N.ffn_gate_inp.weight
  (E, H) and .bias (E,): F32, F16 or BF16 here (other types are refused by name)
  metadata: general.architecture "gpt-oss"; gpt-oss.{block_count, expert_count, expert_used_count,
  embedding_length, expert_feed_forward_length}. No SwiGLU keys: llama.cpp hard-codes alpha 1.702
  and limit 7, and the gating is top-k then softmax: `semantics.GPT_OSS`.

The whole model (`integrations.transformers.load_model`): `model_config` turns the metadata into
transformers' GptOssConfig keys and `tensor(hf_name)` reads a dense tensor by its Hugging Face
name, dequantized to float32 by gguf's own `quants.dequantize` whatever GGML type the file uses
(F32, F16, BF16, Q8_0, ...). Names (gguf 0.19 `get_tensor_name_map(GPT_OSS)`, the map llama.cpp's
converter uses; sinks get ".weight" appended by its gpt-oss converter):
  token_embd.weight, output_norm.weight, output.weight; blk.N.attn_norm.weight (input_layernorm),
  blk.N.post_attention_norm.weight, blk.N.attn_{q,k,v,output}.{weight,bias}, blk.N.attn_sinks.weight
Metadata read (gguf 0.19 `Keys`; the converter's base `set_gguf_parameters` and gpt-oss's own):
  gpt-oss.{context_length, attention.head_count, attention.head_count_kv, attention.key_length,
  attention.layer_norm_rms_epsilon, attention.sliding_window, rope.freq_base, rope.scaling.factor,
  rope.scaling.original_context_length} and, if present, rope.scaling.yarn_beta_{fast,slow}
  (else GptOssConfig's 32 / 1). The file does not store which layers use the sliding window:
  gpt-oss alternates, even layers sliding (its config.json's layer_types).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..checkpoint import CheckpointError, MoEConfig
from ..mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK, NIBBLE_BITS, NIBBLE_MASK
from ..semantics import GPT_OSS
from . import ExpertReader, UnfusedExpert, UnfusedLayerTensors, UnfusedProjection

ARCH = "gpt-oss"
GGUF_BLOCK_BYTES = 1 + BYTES_PER_BLOCK        # the E8M0 byte, then 16 bytes of codes
_HALF = BLOCK_SIZE // 2                       # qs[j] holds elements j and j + 16
_INSTALL = "pip install 'mxfp4_moe[gguf]' (or: pip install gguf)"


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError(f"reading GGUF checkpoints needs the gguf package: {_INSTALL}") from err
    return gguf


def tensor_name(layer: int, what: str) -> str:
    """what: ffn_gate_exps.weight, ffn_up_exps.bias, ffn_gate_inp.weight, ..."""
    return f"blk.{layer}.{what}"


# ---- the block re-packing (both directions) ----------------------------------------------------

def gguf_to_hf(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF MXFP4 blocks [..., nb, 17] uint8 -> (packed [..., nb * 16] uint8, low nibble = even
    element; scales [..., nb] uint8 E8M0). Exact: the same codes and scale bytes, re-packed."""
    scales = raw[..., 0]
    qs = raw[..., 1:]
    codes = torch.cat((qs & NIBBLE_MASK, qs >> NIBBLE_BITS), dim=-1)        # elements 0..15, 16..31
    packed = codes[..., 0::2] | (codes[..., 1::2] << NIBBLE_BITS)           # byte j: elements 2j, 2j + 1
    return packed.flatten(-2), scales


def hf_to_gguf(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(blocks [..., nb, 16] uint8, low nibble = even element; scales [..., nb] E8M0) -> GGUF
    blocks [..., nb, 17] uint8 (the inverse of `gguf_to_hf`)."""
    codes = torch.stack((blocks & NIBBLE_MASK, blocks >> NIBBLE_BITS), dim=-1).flatten(-2)   # [..., nb, 32]
    qs = codes[..., :_HALF] | (codes[..., _HALF:] << NIBBLE_BITS)
    return torch.cat((scales.unsqueeze(-1), qs), dim=-1)


# ---- lazy reads -------------------------------------------------------------------------------

def _slice_bounds(index: tuple, shape: tuple[int, ...], name: str) -> list[tuple[int, int]]:
    """Step-1 slices (missing ones: whole dims) -> [(start, stop)] per dim, bounds checked."""
    if len(index) > len(shape):
        raise ValueError(f"tensor {name} {list(shape)}: {len(index)} indices for {len(shape)} dims")
    out = []
    for dim, size in enumerate(shape):
        idx = index[dim] if dim < len(index) else slice(None)
        if not isinstance(idx, slice) or idx.step not in (None, 1):
            raise ValueError(f"tensor {name}: dim {dim}: only step-1 slices are read, found {idx!r}")
        start, stop, _ = idx.indices(size)
        if (idx.stop is not None and idx.stop > size) or stop < start:
            raise ValueError(f"tensor {name}: dim {dim} has size {size}, slice asks for [{idx.start}:{idx.stop}]")
        out.append((start, stop))
    return out


class GGUFExpertRef:
    """One expert's weight (packed [rows, K/2]) or scales ([rows, K/32]) of a stacked GGUF MXFP4
    tensor, in the Hugging Face encoding: `read` takes whole 32-element blocks of the file and
    re-packs them (`gguf_to_hf`). Column slices of the weight must be block-aligned (the loader's
    always are). The codes and the scales are two refs over the same 17-byte blocks, so a slice's
    blocks are read from the file twice (the loader counts the 16 + 1 bytes they return); each
    read's temporary copy of the raw blocks is dropped once re-packed."""

    dtype = torch.uint8

    def __init__(self, name: str, file: Path, data: np.ndarray, expert: int, kind: str):
        rows, row_bytes = data.shape[1:]
        if row_bytes % GGUF_BLOCK_BYTES:
            raise CheckpointError(f"{file}: tensor {name}: rows of {row_bytes} bytes, expected a multiple of "
                                  f"{GGUF_BLOCK_BYTES} (MXFP4 blocks)")
        nb = row_bytes // GGUF_BLOCK_BYTES
        self.name, self.file, self._data, self._expert, self._kind = f"{name}[{expert}]", file, data, expert, kind
        self.shape = (rows, nb * BYTES_PER_BLOCK) if kind == "weight" else (rows, nb)
        self.nbytes = rows * nb * (BYTES_PER_BLOCK if kind == "weight" else 1)

    def read(self, *index: slice, contiguous: bool = True) -> torch.Tensor:
        (r0, r1), (c0, c1) = _slice_bounds(index, self.shape, self.name)
        per_block = BYTES_PER_BLOCK if self._kind == "weight" else 1
        if c0 % per_block or c1 % per_block:
            raise ValueError(f"tensor {self.name}: columns [{c0}:{c1}] split a {BLOCK_SIZE}-element block")
        b0, b1 = c0 // per_block, c1 // per_block
        raw = np.array(self._data[self._expert, r0:r1, b0 * GGUF_BLOCK_BYTES:b1 * GGUF_BLOCK_BYTES])   # a copy: the map is read-only
        packed, scales = gguf_to_hf(torch.from_numpy(raw).view(r1 - r0, b1 - b0, GGUF_BLOCK_BYTES))
        return packed if self._kind == "weight" else scales.contiguous()

    def read_all(self) -> torch.Tensor:
        return self.read()


class GGUFFloatRef:
    """A float tensor of the file ([E, n] biases and router weight, [E] router bias), or one
    expert's row of it (expert given), read as float32."""

    dtype = torch.float32

    def __init__(self, name: str, file: Path, data: np.ndarray, expert: int | None = None):
        self.name = name if expert is None else f"{name}[{expert}]"
        self.file, self._data, self._expert = file, data, expert
        self.shape = tuple(data.shape if expert is None else data.shape[1:])
        self.nbytes = int(np.prod(self.shape)) * 4

    def read(self, *index: slice, contiguous: bool = True) -> torch.Tensor:
        bounds = _slice_bounds(index, self.shape, self.name)
        sel = tuple(slice(a, b) for a, b in bounds)
        data = self._data if self._expert is None else self._data[self._expert]
        return torch.from_numpy(np.array(data[sel], dtype=np.float32))

    def read_all(self) -> torch.Tensor:
        return self.read()


class GGUFDenseRef:
    """A dense tensor of the file in any GGML type gguf's `quants.dequantize` reads, as float32
    of its logical shape (ggml's `ne` reversed: [rows, cols] for a matrix). `name` is the GGUF
    name; `read` dequantizes the whole tensor (dense tensors are small next to the experts)."""

    dtype = torch.float32

    def __init__(self, file: Path, tensor):
        self.name, self.file, self._tensor = tensor.name, file, tensor
        self.shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        self.ggml_type = tensor.tensor_type.name
        self.nbytes = int(np.prod(self.shape)) * 4

    def read(self, *index: slice, contiguous: bool = True) -> torch.Tensor:
        gguf = _gguf()
        try:
            values = gguf.quants.dequantize(self._tensor.data, self._tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{self.file}: tensor {self.name}: GGML type {self.ggml_type} cannot be "
                                  "dequantized by gguf.quants.dequantize: expected F32, F16, BF16 or a quantized "
                                  "type it reads (Q8_0, Q4_K, ...)") from None
        values = torch.from_numpy(np.array(values, dtype=np.float32))     # (a writable copy)
        if tuple(values.shape) != self.shape:
            raise CheckpointError(f"{self.file}: tensor {self.name}: {self.ggml_type} data dequantizes to "
                                  f"{list(values.shape)}, expected {list(self.shape)} (its header's shape)")
        bounds = _slice_bounds(index, self.shape, self.name)
        return values[tuple(slice(a, b) for a, b in bounds)]

    def read_all(self) -> torch.Tensor:
        return self.read()


# Each dense parameter of transformers' GptOssForCausalLM -> its GGUF name (module docstring).
_DENSE_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_DENSE_LAYER = {"input_layernorm.weight": "attn_norm.weight",
                "post_attention_layernorm.weight": "post_attention_norm.weight",
                "self_attn.sinks": "attn_sinks.weight",
                **{f"self_attn.{hf}_proj.{kind}": f"attn_{ours}.{kind}"
                   for hf, ours in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for kind in ("weight", "bias")}}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def dense_tensor_name(hf_name: str) -> str:
    """The GGUF name of one of GptOssForCausalLM's dense parameters (its Hugging Face name)."""
    if hf_name in _DENSE_GLOBAL:
        return _DENSE_GLOBAL[hf_name]
    match = _LAYER_KEY.match(hf_name)
    if match and match.group(2) in _DENSE_LAYER:
        return tensor_name(int(match.group(1)), _DENSE_LAYER[match.group(2)])
    raise KeyError(f"no GGUF name for the gpt-oss parameter {hf_name}")


# ---- the reader -------------------------------------------------------------------------------

def _gguf_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not any(path.glob("*.safetensors")):
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
    return None


def detect(path: Path) -> bool:
    """A *.gguf file, or a folder holding exactly one and no safetensors."""
    return _gguf_file(path) is not None


class GGUFCheckpoint(ExpertReader):
    """An opened gpt-oss GGUF file with MXFP4 experts (module docstring)."""

    layout = "gguf"

    def __init__(self, file: Path, nan_scales: str = "report"):
        gguf = _gguf()
        try:
            self._reader = gguf.GGUFReader(str(file))
        except Exception as err:          # gguf raises ValueError and others on a corrupt file
            raise CheckpointError(f"{file}: cannot read as GGUF: {err}") from None
        self._file = file
        arch = self._field("general.architecture")
        if arch != ARCH:
            raise CheckpointError(f"{file}: general.architecture: expected {ARCH!r} (the GGUF reader reads gpt-oss "
                                  f"MXFP4 experts), found {arch!r}")
        self._tensors = {t.name: t for t in self._reader.tensors}
        try:
            config = MoEConfig(num_layers=self._field(f"{ARCH}.block_count"),
                               num_experts=self._field(f"{ARCH}.expert_count"),
                               experts_per_token=self._field(f"{ARCH}.expert_used_count"),
                               hidden_size=self._field(f"{ARCH}.embedding_length"),
                               intermediate_size=self._field(f"{ARCH}.expert_feed_forward_length"),
                               quant_method="gguf")
        except ValueError as err:
            raise CheckpointError(f"{file}: {err}") from None
        super().__init__(file, config, GPT_OSS, [file], nan_scales)

    def _field(self, key: str, default=None):
        field = self._reader.get_field(key)
        if field is None:
            if default is not None:
                return default
            raise CheckpointError(f"{self._file}: metadata key {key} is missing")
        value = field.contents()
        return int(value) if isinstance(value, (int, np.integer)) else value

    # ---- the dense model (module docstring) ----

    @property
    def config_file(self) -> Path:
        """Where the model's config lives: the file's own metadata."""
        return self._file

    @property
    def names(self) -> list[str]:
        """Every tensor name in the file, sorted."""
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> GGUFDenseRef:
        """A dense tensor by its GGUF name, read as float32 (`GGUFDenseRef`)."""
        if name not in self._tensors:
            raise CheckpointError(f"{self._file}: tensor {name} is missing")
        return GGUFDenseRef(self._file, self._tensors[name])

    def model_config(self) -> dict:
        """transformers' GptOssConfig keys (Hugging Face naming) from the file's metadata; the
        vocabulary size is token_embd's row count. Raises CheckpointError naming a missing key."""
        def key(name: str, default=None):
            return self._field(f"{ARCH}.{name}", default)

        def real(name: str, default=None) -> float:
            # GGUF stores these as float32: the shortest decimal that rounds to it is the value a
            # config.json states (1e-05, not 9.99999975e-06).
            return float(str(np.float32(key(name, default))))

        scaling = key("rope.scaling.type", "yarn")
        if scaling != "yarn":
            raise CheckpointError(f"{self._file}: metadata {ARCH}.rope.scaling.type: expected 'yarn' (gpt-oss's "
                                  f"rope), found {scaling!r}")
        embed = self.tensor(_DENSE_GLOBAL["model.embed_tokens.weight"])
        cfg = self.config
        return {
            "num_hidden_layers": cfg.num_layers, "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.experts_per_token, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "vocab_size": embed.shape[0],
            "num_attention_heads": key("attention.head_count"), "num_key_value_heads": key("attention.head_count_kv"),
            "head_dim": key("attention.key_length"), "rms_norm_eps": real("attention.layer_norm_rms_epsilon"),
            "sliding_window": key("attention.sliding_window"),
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_layers)],
            "max_position_embeddings": key("context_length"), "rope_theta": real("rope.freq_base"),
            "rope_scaling": {"rope_type": "yarn", "factor": real("rope.scaling.factor"),
                             "beta_fast": real("rope.scaling.yarn_beta_fast", 32.0),
                             "beta_slow": real("rope.scaling.yarn_beta_slow", 1.0), "truncate": False,
                             "original_max_position_embeddings": key("rope.scaling.original_context_length")},
            "hidden_act": "silu", "attention_bias": True, "tie_word_embeddings": False,
        }

    def _tensor(self, name: str, mxfp4: bool, shape: tuple[int, ...]):
        gguf = _gguf()
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self._file}: tensor {name} is missing (expected {list(shape)})")
        types = ((gguf.GGMLQuantizationType.MXFP4,) if mxfp4 else
                 (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16))
        data = t.data
        if t.tensor_type == gguf.GGMLQuantizationType.BF16 and not mxfp4:
            # gguf holds BF16 as raw bytes: float32 values of the tensor's shape (it is small).
            data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.tensor_type not in types or tuple(data.shape) != shape:
            raise CheckpointError(f"{self._file}: tensor {name}: expected {' or '.join(x.name for x in types)} data "
                                  f"{list(shape)}, found {t.tensor_type.name} {list(data.shape)}")
        return data

    def _build_layer(self, i: int) -> UnfusedLayerTensors:
        cfg = self.config
        e, h, n = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        per_row = {"gate": h, "up": h, "down": n}
        out_rows = {"gate": n, "up": n, "down": h}
        data = {}
        for proj in ("gate", "up", "down"):
            name = tensor_name(i, f"ffn_{proj}_exps.weight")
            data[proj] = (name, self._tensor(name, True, (e, out_rows[proj], per_row[proj] // BLOCK_SIZE
                                                          * GGUF_BLOCK_BYTES)))
        bias = {proj: (tensor_name(i, f"ffn_{proj}_exps.bias"),
                       self._tensor(tensor_name(i, f"ffn_{proj}_exps.bias"), False, (e, out_rows[proj])))
                for proj in ("gate", "up", "down")}
        experts = []
        for g in range(e):
            projs = []
            for proj in ("gate", "up", "down"):
                name, blocks = data[proj]
                projs.append(UnfusedProjection(
                    weight=GGUFExpertRef(name, self._file, blocks, g, "weight"),
                    weight_scale=GGUFExpertRef(name, self._file, blocks, g, "scales"),
                    bias=GGUFFloatRef(bias[proj][0], self._file, bias[proj][1], g)))
            experts.append(UnfusedExpert(*projs))
        router_w = tensor_name(i, "ffn_gate_inp.weight")
        router_b = tensor_name(i, "ffn_gate_inp.bias")
        return UnfusedLayerTensors(i, experts, GGUFFloatRef(router_w, self._file, self._tensor(router_w, False, (e, h))),
                                   GGUFFloatRef(router_b, self._file, self._tensor(router_b, False, (e,))))


def open_checkpoint(path: Path, *, nan_scales: str = "report") -> GGUFCheckpoint:
    return GGUFCheckpoint(_gguf_file(path), nan_scales)


# ---- writing (tests' inputs) ------------------------------------------------------------------

def encode_dense(values: torch.Tensor, ggml_type: str) -> tuple[tuple[np.ndarray, str], torch.Tensor]:
    """One dense tensor in GGML type `ggml_type` ("F32", "F16", "BF16", "Q8_0", ... as gguf's
    `quants.quantize` writes it): ((the file's data, its type name), the float32 values it holds).
    One-dimensional tensors (norms, biases, sinks) stay F32, as llama.cpp's converter keeps them."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[ggml_type if values.dim() > 1 else "F32"]
    data = gguf.quants.quantize(np.ascontiguousarray(values.float().numpy()), qtype)
    held = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))
    return (data, qtype.name), held


def _add_model_metadata(writer, model_config: Mapping) -> None:
    """The keys `GGUFCheckpoint.model_config` reads, from a GptOssConfig dict (HF naming)."""
    gguf = _gguf()
    rope = model_config["rope_scaling"]
    writer.add_context_length(model_config["max_position_embeddings"])
    writer.add_head_count(model_config["num_attention_heads"])
    writer.add_head_count_kv(model_config["num_key_value_heads"])
    writer.add_key_length(model_config["head_dim"])
    writer.add_value_length(model_config["head_dim"])
    writer.add_layer_norm_rms_eps(model_config["rms_norm_eps"])
    writer.add_sliding_window(model_config["sliding_window"])
    writer.add_rope_freq_base(model_config["rope_theta"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


def write_checkpoint(path: str | Path, layers: Sequence[Mapping[str, torch.Tensor]], *, top_k: int,
                     model_config: Mapping | None = None,
                     dense: Mapping[str, tuple[np.ndarray, str]] | None = None) -> Path:
    """Write a tiny gpt-oss GGUF file (MXFP4 experts, F32 biases and router) from each layer's
    fused gpt-oss tensors: w13_blocks [E, 2I, H/32, 16] (rows interleaved 2j gate, 2j + 1 up),
    w13_scales, w13_bias [E, 2I], w2_blocks [E, H, I/32, 16], w2_scales, w2_bias [E, H],
    router_weight [E, H], router_bias [E]. Gate and up are split as llama.cpp's converter splits
    them. A whole model: also `model_config` (a GptOssConfig dict, written as metadata) and
    `dense` ({Hugging Face name: data from `encode_dense`}). Returns the file's path."""
    gguf = _gguf()
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    e, two_i, h_blocks, _ = layers[0]["w13_blocks"].shape
    writer = gguf.GGUFWriter(str(file), ARCH)
    if model_config is not None:
        _add_model_metadata(writer, model_config)
    for hf_name, (data, ggml_type) in (dense or {}).items():
        writer.add_tensor(dense_tensor_name(hf_name), data, raw_dtype=gguf.GGMLQuantizationType[ggml_type])
    writer.add_block_count(len(layers))
    writer.add_expert_count(e)
    writer.add_expert_used_count(top_k)
    writer.add_embedding_length(h_blocks * BLOCK_SIZE)
    writer.add_expert_feed_forward_length(two_i // 2)
    mxfp4 = gguf.GGMLQuantizationType.MXFP4

    def f32(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.float().numpy())

    for i, fused in enumerate(layers):
        for proj, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):
            blocks = hf_to_gguf(fused["w13_blocks"][:, rows], fused["w13_scales"][:, rows])
            writer.add_tensor(tensor_name(i, f"ffn_{proj}_exps.weight"), blocks.flatten(-2).contiguous().numpy(),
                              raw_dtype=mxfp4)
            writer.add_tensor(tensor_name(i, f"ffn_{proj}_exps.bias"), f32(fused["w13_bias"][:, rows]))
        blocks = hf_to_gguf(fused["w2_blocks"], fused["w2_scales"])
        writer.add_tensor(tensor_name(i, "ffn_down_exps.weight"), blocks.flatten(-2).contiguous().numpy(),
                          raw_dtype=mxfp4)
        writer.add_tensor(tensor_name(i, "ffn_down_exps.bias"), f32(fused["w2_bias"]))
        writer.add_tensor(tensor_name(i, "ffn_gate_inp.weight"), f32(fused["router_weight"]))
        writer.add_tensor(tensor_name(i, "ffn_gate_inp.bias"), f32(fused["router_bias"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file
