"""mxfp4_moe: load, shard and multiply MXFP4-quantized Mixture-of-Experts weights (gpt-oss style).

The public names below are imported on first use, so `import mxfp4_moe` stays light and works
without a GPU.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "quantize": "mxfp4", "dequantize": "mxfp4", "pack_e2m1": "mxfp4", "unpack_e2m1": "mxfp4",
    "find_nan_scales": "mxfp4",
    "open_checkpoint": "checkpoint", "Checkpoint": "checkpoint", "CheckpointError": "checkpoint",
    "MoEConfig": "checkpoint",
    "make_synthetic_checkpoint": "synthetic", "write_checkpoint": "synthetic",
    "ShardPlan": "sharding", "load_layer": "loader", "narrow_to_source": "loader",
    "ExpertWeights": "weights", "route": "routing", "reference_moe": "reference",
    "MXFP4MoE": "moe", "CUDAGraphMoE": "graphs",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mxfp4_moe' has no attribute {name!r}")
