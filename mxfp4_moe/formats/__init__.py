"""The checkpoint readers, one module per MXFP4 MoE format behind one interface, and the hook
`checkpoint.open_checkpoint` calls to find the formats other than gpt-oss's fused layouts.

The interface (`ExpertReader`) is what the loader reads: `config` (a `checkpoint.MoEConfig`),
`semantics` (a `semantics.MoESemantics`) and `layer(i)` returning an `UnfusedLayerTensors` (this
module's per-expert gate/up/down projections) whose tensors read slices lazily in the Hugging Face
encoding (packed uint8 [out, in/2], low nibble = even element; E8M0 scale bytes [out, in/32]), or,
from gpt-oss's fused layouts, a `gpt_oss.LayerTensors` (each projection stacked over the experts,
gate and up rows interleaved). A reader whose bytes are encoded otherwise (GGUF) converts them in
its `read`. The loader interleaves gate and up into w13 where they are apart, and pads and shards
every layout alike.

  format               module                 detected by
  gpt-oss (fused)      `gpt_oss`              MoE tensor names (HF or original/), when no other claims it
  gpt-oss (unfused)    `gpt_oss_unfused`      config.json quantization_config.layout "unfused"
  compressed-tensors   `compressed_tensors`   config.json quantization_config.quant_method
  AMD Quark            `quark`                config.json quantization_config.quant_method
  GGUF                 `gguf`                 a *.gguf file (or a folder holding exactly one)

`open_checkpoint(path, layout="hf" | "original")` skips the detection: it reads gpt-oss's fused
layout of that name, whatever the config says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..checkpoint import (_FLOAT_DTYPES, CONFIG_FILE, CheckpointError, MoEConfig, NanScaleReport, SafetensorsTensors,
                          TensorRef)
from ..mxfp4 import BLOCK_SIZE, E8M0_NAN, NanScale
from ..semantics import MoESemantics

# The projections of one expert, in the order `UnfusedExpert` holds them.
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class UnfusedProjection:
    """One projection of one expert: weight [out, in/2] uint8, weight_scale [out, in/32] uint8,
    bias [out] float or None, channel_scale [out] or [out, 1] float or None."""
    weight: TensorRef
    weight_scale: TensorRef
    bias: TensorRef | None = None
    channel_scale: TensorRef | None = None


@dataclass
class UnfusedExpert:
    gate: UnfusedProjection      # [I, H]
    up: UnfusedProjection        # [I, H]
    down: UnfusedProjection      # [H, I]


@dataclass
class UnfusedLayerTensors:
    """One layer of an unfused checkpoint: `experts[g]` for each global expert g, and the router
    (router_weight [E, H] float; router_bias [E] float, or None when the checkpoint has none)."""
    index: int
    experts: list[UnfusedExpert]
    router_weight: TensorRef
    router_bias: TensorRef | None

    def has_channel_scales(self) -> tuple[bool, bool]:
        """(w13 has per-channel scales, w2 has them)."""
        first = self.experts[0]
        return first.gate.channel_scale is not None, first.down.channel_scale is not None

    def has_biases(self) -> tuple[bool, bool]:
        """(gate and up have biases, down has one)."""
        first = self.experts[0]
        return first.gate.bias is not None, first.down.bias is not None

    def check_sizes(self, *, num_experts: int, hidden: int, inter: int) -> None:
        """Check every tensor's shape against E, H, I; raise CheckpointError naming the tensor."""
        if len(self.experts) != num_experts:
            raise CheckpointError(f"unfused layer {self.index}: has {len(self.experts)} experts, expected {num_experts}")
        if self.router_weight.shape != (num_experts, hidden):
            raise CheckpointError(f"{self.router_weight.file}: tensor {self.router_weight.name}: expected shape "
                                  f"{[num_experts, hidden]}, found {list(self.router_weight.shape)}")
        if self.router_bias is not None and self.router_bias.shape != (num_experts,):
            raise CheckpointError(f"{self.router_bias.file}: tensor {self.router_bias.name}: expected shape "
                                  f"{[num_experts]}, found {list(self.router_bias.shape)}")
        w13_channel, w2_channel = self.has_channel_scales()
        w13_bias, w2_bias = self.has_biases()
        for ex in self.experts:
            for proj, out, inp in ((ex.gate, inter, hidden), (ex.up, inter, hidden), (ex.down, hidden, inter)):
                expected = {"weight": ((out, inp // 2), (torch.uint8,)),
                            "weight_scale": ((out, inp // BLOCK_SIZE), (torch.uint8,))}
                if proj.bias is not None:
                    expected["bias"] = ((out,), _FLOAT_DTYPES)
                if proj.channel_scale is not None:
                    expected["channel_scale"] = (((out,), (out, 1)), _FLOAT_DTYPES)
                for kind, (shape, dtypes) in expected.items():
                    ref = getattr(proj, kind)
                    shapes = shape if isinstance(shape[0], tuple) else (shape,)
                    if ref.shape not in shapes or ref.dtype not in dtypes:
                        raise CheckpointError(f"{ref.file}: tensor {ref.name}: expected {dtypes[0]} shape "
                                              f"{' or '.join(str(list(s)) for s in shapes)}, found "
                                              f"{ref.dtype} {list(ref.shape)}")
            has = ((ex.gate.channel_scale is not None, ex.up.channel_scale is not None),
                   ex.down.channel_scale is not None)
            if has != ((w13_channel, w13_channel), w2_channel):
                raise CheckpointError(f"unfused layer {self.index}: channel scales must be present on every "
                                      f"expert's gate and up (and down) or on none; {ex.gate.weight.name} differs")
            has = ((ex.gate.bias is not None, ex.up.bias is not None), ex.down.bias is not None)
            if has != ((w13_bias, w13_bias), w2_bias):
                raise CheckpointError(f"unfused layer {self.index}: biases must be present on every expert's "
                                      f"gate and up (and down) or on none; {ex.gate.weight.name} differs")


class ExpertReader:
    """Base of the format readers: path, layout (the format's name), config, semantics, files,
    layer(i), find_nan_scales(i), close(). Subclasses implement `_build_layer(i)`, and
    `_check_layer(layer)` where their layer is not an `UnfusedLayerTensors` (gpt-oss's fused one)."""

    layout: str = ""

    def __init__(self, path: Path, config: MoEConfig, semantics: MoESemantics, files: list[Path],
                 nan_scales: str = "report"):
        if nan_scales not in ("report", "error"):
            raise ValueError(f"nan_scales must be 'report' or 'error', got {nan_scales!r}")
        self.path, self.config, self.semantics, self.files = path, config, semantics, files
        self.nan_scales = nan_scales
        self._nan_checked: set[int] = set()
        self._layers = []
        for i in range(config.num_layers):                 # each layer checked as it is built
            layer = self._build_layer(i)
            self._check_layer(layer)
            self._layers.append(layer)

    def _build_layer(self, i: int) -> UnfusedLayerTensors:
        raise NotImplementedError

    def _check_layer(self, layer: UnfusedLayerTensors) -> None:
        """Raise CheckpointError, naming the tensor, where a layer's shapes or dtypes are not the config's."""
        layer.check_sizes(num_experts=self.config.num_experts, hidden=self.config.hidden_size,
                          inter=self.config.intermediate_size)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, layers={self.config.num_layers}, "
                f"experts={self.config.num_experts}, {self.semantics.activation}/{self.semantics.router})")

    def layer(self, i: int) -> UnfusedLayerTensors:
        """Layer i's tensors. With nan_scales="error", the first call for a layer reads its scale
        tensors and raises CheckpointError on a NaN (0xFF) byte, naming the tensor and its index."""
        n = self.config.num_layers
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise CheckpointError(f"{self.path}: layer index {i!r} out of range: expected 0..{n - 1}"
                                  + self._layer_count_source())
        if self.nan_scales == "error" and i not in self._nan_checked:
            report = self.find_nan_scales(i, limit=1)
            if report.count:
                raise self._nan_scale_error(report, i)
            self._nan_checked.add(i)
        return self._layers[i]

    def _layer_count_source(self) -> str:
        """Where the layer count comes from, as the out-of-range message adds it (nothing here)."""
        return ""

    def _nan_scale_error(self, report: NanScaleReport, i: int) -> CheckpointError:
        return CheckpointError(f"{self.path}: {report.locations[0].describe()}: expected finite E8M0 "
                               f"scales, found {report.count} NaN scale bytes in layer {i}")

    def find_nan_scales(self, layer: int, *, limit: int | None = 100) -> NanScaleReport:
        """NaN (0xFF) scale bytes of layer `layer`: count and the first `limit` locations, each
        named by its per-expert tensor with index (row, block)."""
        count, locations = 0, []
        for ref in self._scale_refs(self._layers[layer]):
            scales = ref.read()
            found = int((scales == E8M0_NAN).sum())
            count += found
            if found and (limit is None or len(locations) < limit):
                where = (scales == E8M0_NAN).nonzero()[: None if limit is None else limit - len(locations)]
                locations += [NanScale(ref.name, tuple(int(v) for v in row)) for row in where.tolist()]
        return NanScaleReport(layer, count, tuple(locations))

    @staticmethod
    def _scale_refs(layer: UnfusedLayerTensors) -> Iterator:
        for ex in layer.experts:
            for proj in (ex.gate, ex.up, ex.down):
                yield proj.weight_scale


class SafetensorsExpertReader(SafetensorsTensors, ExpertReader):
    """An `ExpertReader` over safetensors files (`tensors`: name -> (file, dtype, shape, nbytes), as
    `checkpoint._collect_tensors` gives them), with every tensor by name for the dense model
    (`checkpoint.SafetensorsTensors`: names, `in`, close)."""

    def __init__(self, path: Path, config: MoEConfig, semantics: MoESemantics, tensors: dict, nan_scales: str,
                 identities: dict[Path, tuple] | None = None):
        self._index_tensors(tensors, identities)
        super().__init__(path, config, semantics, sorted({ref.file for ref in self._refs.values()}), nan_scales)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    def tensor(self, name: str) -> TensorRef:
        """Any tensor by name (the dense model's included)."""
        return self._ref(name)

    def _ref(self, name: str, *, required: bool = True) -> TensorRef | None:
        if name not in self._refs:
            if not required:
                return None
            raise CheckpointError(f"{self.path}: tensor {name} is missing (expected in "
                                  f"{[f.name for f in sorted({r.file for r in self._refs.values()})]})")
        return self._refs[name]


def open_other_format(path: str | Path, *, nan_scales: str = "report") -> ExpertReader | None:
    """The reader for `path` if it is one of the formats found by their files (GGUF,
    compressed-tensors, Quark, gpt-oss unfused), else None (then `checkpoint.open_checkpoint` reads
    it as gpt-oss's fused layout, `gpt_oss.open_checkpoint`). The quant_method formats come before
    the unfused layout, which a config says by quantization_config.layout alone."""
    from . import compressed_tensors, gguf, gpt_oss_unfused, quark
    for module in (gguf, compressed_tensors, quark, gpt_oss_unfused):
        if module.detect(Path(path)):
            return module.open_checkpoint(Path(path), nan_scales=nan_scales)
    return None
