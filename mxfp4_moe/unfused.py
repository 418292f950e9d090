"""Per-expert ("unfused") gpt-oss MXFP4 checkpoints: the reader and writer live in
`mxfp4_moe.formats.gpt_oss_unfused`, one format module among the others; this module keeps their
names importable from here."""

from .formats import PROJECTIONS, UnfusedExpert, UnfusedLayerTensors, UnfusedProjection
from .formats.gpt_oss_unfused import (UNFUSED_LAYOUT, UnfusedCheckpoint, expert_prefix, open_unfused_checkpoint,
                                      router_names, unfuse_checkpoint, unfuse_layer, write_unfused_checkpoint)

__all__ = ["PROJECTIONS", "UNFUSED_LAYOUT", "UnfusedCheckpoint", "UnfusedExpert", "UnfusedLayerTensors",
           "UnfusedProjection", "expert_prefix", "open_unfused_checkpoint", "router_names", "unfuse_checkpoint",
           "unfuse_layer", "write_unfused_checkpoint"]
