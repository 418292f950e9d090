"""What the grouped MXFP4 matmul does when a default fast kernel ("rs", "sm90") fails to compile
or launch: the portable Triton kernel runs that shape class from then on, with one warning per
class (`fall_back`), and the record of every fallback taken (`kernel_fallbacks`, which `verify`
reports). An explicit config never comes here: it raises.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from .fragment_layout import FragmentWeights
from .moe_matmul_configs import MatmulConfig, default_config


@dataclass
class KernelFallback:
    """A fast kernel that failed for a shape class, and the portable Triton config that runs it
    instead (`kernel_fallbacks`)."""
    failed_config: MatmulConfig     # its kernel: "rs" or "sm90"
    shape: str              # the shape class, in words
    error: str              # the compiler's (or launcher's) first error line
    config: MatmulConfig    # what runs instead (kernel "triton")
    calls: int = 0          # moe_matmul calls it has served

    @property
    def kernel(self) -> str:
        """The kernel that failed."""
        return self.failed_config.kernel

    def as_dict(self) -> dict:
        """JSON-ready: what `verify` reports."""
        return {"kernel": self.kernel, "config": dataclasses.asdict(self.failed_config), "shape": self.shape,
                "error": self.error, "ran": self.config.kernel}


class ShapeClass(NamedTuple):
    """What a compiled kernel depends on, as far as a fallback goes: one warning and one
    fallback per class."""
    config: MatmulConfig
    n: int
    k: int
    k_x: int                # x's columns
    swiglu: bool
    combine: str
    gather: bool
    activation: str = "swiglu_oai"

    def describe(self) -> str:
        act = "SwiGLU" if self.activation == "swiglu_oai" else self.activation
        role = f"w13 + {act}" if self.swiglu else f"combine {self.combine!r}"
        return (f"[{self.n}, {self.k}] weights (x {self.k_x} wide, {'gathered' if self.gather else 'sorted'} rows, "
                f"{role}) at {self.config.block_m}-row tiles")


_FALLBACKS: dict[ShapeClass, KernelFallback] = {}      # filled once per class


def fallback_for(shape_class: ShapeClass) -> KernelFallback | None:
    """The fallback taken for `shape_class`, if any. (No lookup, which hashes the config, until
    some fallback has been taken.)"""
    return _FALLBACKS.get(shape_class) if _FALLBACKS else None


def kernel_fallbacks() -> list[KernelFallback]:
    """Every fallback taken in this process so far, in order: the shape classes for which a
    default Gluon kernel could not compile or launch and the portable Triton kernel runs instead."""
    return list(_FALLBACKS.values())


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (a CompilationError's own message, not the
    source excerpt it starts with)."""
    text = str(getattr(error, "error_message", None) or error)
    return next((line.strip() for line in text.splitlines() if line.strip()), repr(error))


def fall_back(shape_class: ShapeClass, problem: str, shape_only: bool) -> KernelFallback:
    """Record the portable Triton kernel as the fallback for `shape_class` and warn, once per
    class: a fast kernel that cannot compile must not take the layer down."""
    config = shape_class.config
    triton_config = default_config(config.block_m, shape_class.n, shape_class.k, swiglu=shape_class.swiglu)
    fallback = KernelFallback(config, shape_class.describe(), problem, triton_config)
    _FALLBACKS[shape_class] = fallback
    rebuilt = (" The layer holds its weights in fragment order only, so they are rebuilt once in checkpoint "
               "order for it (a second copy in memory)." if shape_only else "")
    warnings.warn(f"mxfp4_moe: the {config.kernel!r} kernel cannot run {fallback.shape} with {config} on Triton "
                  f"{triton.__version__}: {problem}. The portable Triton kernel runs this shape class instead "
                  f"(correct, slower).{rebuilt} Please report it with this message.", RuntimeWarning, stacklevel=3)
    return fallback


_CHECKPOINT_ORDER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checkpoint_order(fragments: FragmentWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks and scales in checkpoint order rebuilt from `fragments`, once per fragment copy
    (kept while it lives): for the fallback of a layer that dropped its checkpoint-order copy."""
    if fragments not in _CHECKPOINT_ORDER:
        from .fragment_layout import from_fragment_order
        _CHECKPOINT_ORDER[fragments] = from_fragment_order(fragments)
    return _CHECKPOINT_ORDER[fragments]
