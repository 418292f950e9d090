"""Readers for MXFP4 MoE checkpoint formats other than gpt-oss's own safetensors layouts, one
module each behind one interface, and the hook `checkpoint.open_checkpoint` calls to find them.

The interface (`ExpertReader`) is what the loader already reads from an unfused checkpoint:
`config` (a `checkpoint.MoEConfig`), `semantics` (a `semantics.MoESemantics`) and `layer(i)`
returning an `unfused.UnfusedLayerTensors` whose tensors read slices lazily in the Hugging Face
encoding (packed uint8 [out, in/2], low nibble = even element; E8M0 scale bytes [out, in/32]).
A reader whose bytes are encoded otherwise (GGUF) converts them in its `read`. The loader then
interleaves gate and up into w13 and pads and shards exactly as for every other layout.

  format               module                 detected by
  compressed-tensors   `compressed_tensors`   config.json quantization_config.quant_method
  AMD Quark            `quark`                config.json quantization_config.quant_method
  GGUF                 `gguf`                 a *.gguf file (or a folder holding exactly one)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..checkpoint import CONFIG_FILE, CheckpointError, MoEConfig, NanScaleReport, SafetensorsTensors, TensorRef
from ..mxfp4 import E8M0_NAN, NanScale
from ..semantics import MoESemantics
from ..unfused import UnfusedLayerTensors


class ExpertReader:
    """Base of the format readers: path, layout (the format's name), config, semantics, files,
    layer(i), find_nan_scales(i), close(). Subclasses implement `_build_layer(i)`."""

    layout: str = ""

    def __init__(self, path: Path, config: MoEConfig, semantics: MoESemantics, files: list[Path],
                 nan_scales: str = "report"):
        if nan_scales not in ("report", "error"):
            raise ValueError(f"nan_scales must be 'report' or 'error', got {nan_scales!r}")
        self.path, self.config, self.semantics, self.files = path, config, semantics, files
        self.nan_scales = nan_scales
        self._nan_checked: set[int] = set()
        self._layers = [self._build_layer(i) for i in range(config.num_layers)]
        for layer in self._layers:
            layer.check_sizes(num_experts=config.num_experts, hidden=config.hidden_size,
                              inter=config.intermediate_size)

    def _build_layer(self, i: int) -> UnfusedLayerTensors:
        raise NotImplementedError

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
        n = self.config.num_layers
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise CheckpointError(f"{self.path}: layer index {i!r} out of range: expected 0..{n - 1}")
        if self.nan_scales == "error" and i not in self._nan_checked:
            report = self.find_nan_scales(i, limit=1)
            if report.count:
                raise CheckpointError(f"{self.path}: {report.locations[0].describe()}: expected finite E8M0 "
                                      f"scales, found {report.count} NaN scale bytes in layer {i}")
            self._nan_checked.add(i)
        return self._layers[i]

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

    def __init__(self, path: Path, config: MoEConfig, semantics: MoESemantics, tensors: dict, nan_scales: str):
        self._index_tensors(tensors)
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
    """The reader for `path` if it is one of this package's formats, else None (then it is a
    gpt-oss layout for `checkpoint.open_checkpoint` to read)."""
    from . import compressed_tensors, gguf, quark
    for module in (gguf, compressed_tensors, quark):
        if module.detect(Path(path)):
            return module.open_checkpoint(Path(path), nan_scales=nan_scales)
    return None
