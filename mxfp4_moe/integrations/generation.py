"""`generate()` fast by default for the models `load_model` builds on a GPU.

transformers compiles a model's decode step by itself when the KV cache is static (a fixed
shape): several times faster per token than its default dynamic cache, which it runs eagerly.
Two things keep users from that: the cache must be asked for, and its length follows each call's
prompt plus `max_new_tokens`, so every new length compiles again (tens of seconds each). Here the
model asks for a static cache, and its length is rounded up to one of a few fixed buckets, so
calls of any length up to a bucket reuse one compiled step; a line on stderr says when a new
(batch size, bucket) compiles. torch keeps its compiled kernels on disk (inductor's caches), so
a second process compiles faster. A step that fails to compile is run eagerly, with one warning.
"""

from __future__ import annotations

import functools
import sys
import warnings

# Cache lengths (tokens) a call is rounded up to: few enough that a session compiles one or two
# steps, each at most 4x longer than needed (attention over the unused rest is masked).
CACHE_BUCKETS = (1024, 4096, 16384, 65536)


def cache_bucket(length: int, max_positions: int | None = None) -> int:
    """The static cache length for a call that needs `length` positions: the first bucket at or
    above it (past the last bucket, `length` itself), capped at the model's `max_positions`."""
    bucket = next((b for b in CACHE_BUCKETS if length <= b), length)
    if max_positions:
        bucket = min(bucket, max(length, max_positions))
    return bucket


def _prompt_shape(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """(batch, prompt length) of a generate() call, or None when it passes no token ids."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if ids is None or not hasattr(ids, "shape") or ids.dim() != 2:
        return None
    return int(ids.shape[0]), int(ids.shape[1])


def _is_compile_failure(error: BaseException) -> bool:
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def enable_fast_generate(model):
    """Make `model.generate` use a static KV cache sized from `CACHE_BUCKETS` (transformers then
    compiles the decode step on a GPU). Calls that choose their own cache (`past_key_values`,
    `cache_implementation`, `max_cache_len`) are left as they are. Returns `model`."""
    model.generation_config.cache_implementation = "static"
    plain_generate = model.generate
    compiled_shapes: set[tuple[int, int]] = set()
    max_positions = getattr(model.config, "max_position_embeddings", None)

    @functools.wraps(plain_generate)
    def generate(*args, **kwargs):
        shape = _prompt_shape(args, kwargs)
        chooses_cache = any(k in kwargs for k in ("past_key_values", "cache_implementation", "max_cache_len"))
        if shape is None or chooses_cache:
            return plain_generate(*args, **kwargs)
        batch, prompt = shape
        config = kwargs.get("generation_config") or model.generation_config
        new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        needed = prompt + new_tokens if new_tokens is not None else kwargs.get("max_length", config.max_length)
        kwargs["max_cache_len"] = cache_bucket(needed, max_positions)
        key = (batch, kwargs["max_cache_len"])
        compiles = model.device.type == "cuda" and not config.disable_compile and key not in compiled_shapes
        if compiles:
            print(f"mxfp4_moe: compiling the decode step for batch {batch}, cache of {key[1]} tokens (once per "
                  "process and shape; later processes reuse torch's compile cache)", file=sys.stderr, flush=True)
        try:
            out = plain_generate(*args, **kwargs)
        except Exception as error:
            if not (compiles and _is_compile_failure(error)):
                raise
            warnings.warn(f"mxfp4_moe: the decode step did not compile ({type(error).__name__}); generate() runs "
                          "eagerly from now on", RuntimeWarning, stacklevel=2)
            model.generation_config.disable_compile = True
            out = plain_generate(*args, **kwargs)
        compiled_shapes.add(key)
        return out

    model.generate = generate
    return model
