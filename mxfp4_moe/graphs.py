"""`CUDAGraphMoE`: an MoE layer's forward replayed from CUDA graphs, one per token-count bucket.

An eager forward of `MXFP4MoE` costs the host several times the GPU work at decode sizes (4
Triton launches and a few torch ops; benchmarks/RESULTS.md 3.3). The layer never synchronises with the host, so a CUDA graph captures it whole; this
wrapper keeps one graph per bucket of token counts and replays the smallest that holds the call.
"""

from __future__ import annotations

import bisect

import torch


def default_buckets(max_tokens: int) -> tuple[int, ...]:
    """Token counts captured by default: the powers of two below `max_tokens`, and `max_tokens`."""
    if max_tokens < 1:
        raise ValueError(f"CUDAGraphMoE: max_tokens must be >= 1, got {max_tokens}")
    buckets = []
    size = 1
    while size < max_tokens:
        buckets.append(size)
        size *= 2
    return (*buckets, max_tokens)


def pick_bucket(buckets: tuple[int, ...], tokens: int) -> int | None:
    """The smallest bucket (sorted ascending) holding `tokens` tokens; None for none (or T = 0)."""
    if tokens < 1:
        return None
    i = bisect.bisect_left(buckets, tokens)
    return buckets[i] if i < len(buckets) else None


class CUDAGraphMoE(torch.nn.Module):
    """`layer`'s forward, replayed from a CUDA graph for calls of up to `max_tokens` tokens.

    layer: an `MXFP4MoE` (or `DistributedMXFP4MoE`) on a CUDA device with the triton backend (the
      torch reference synchronises with the host and cannot be captured).
    max_tokens: the largest T served from a graph (default 256); buckets: the token counts to
      capture (default `default_buckets(max_tokens)`). A call with T tokens runs the graph of the
      smallest bucket >= T: x is copied into that graph's input buffer (in the layer's compute
      dtype; the rows past T are zeroed, and since every token's output depends on its own row
      only, they change nothing), the graph replays, and rows [:T] of its output are copied out
      into a new tensor in x's dtype (never a view of the graph's buffer, which the next call
      overwrites). Larger calls, T = 0, and calls made while a graph is being captured (a model
      captured whole) run the layer itself.
    Each bucket is captured the first time a call needs it (a warm-up forward, then the capture),
    or all at once by `capture()`; the graphs share one memory pool.

    Differences from calling the layer: x is rounded to the compute dtype before routing (the
    layer routes float32 x in float32) and the output comes out of the compute dtype, so float32
    input gives bf16-precise output. The graphs hold the layer's tensors by address: do not replace
    them after a capture. Replay on one CUDA stream at a time (the buckets share memory).
    """

    def __init__(self, layer: torch.nn.Module, max_tokens: int = 256, buckets: tuple[int, ...] | None = None):
        super().__init__()
        weights = layer.weights
        if weights.device.type != "cuda":
            raise ValueError(f"CUDAGraphMoE: CUDA graphs need the layer on a CUDA device; its weights are on "
                             f"{weights.device}")
        if getattr(layer, "backend", "triton") != "triton":
            raise ValueError(f"CUDAGraphMoE: the layer's backend is {layer.backend!r}; only 'triton' runs without host "
                             "synchronisation (the torch reference cannot be captured)")
        buckets = default_buckets(max_tokens) if buckets is None else tuple(sorted(set(buckets)))
        if not buckets or buckets[0] < 1:
            raise ValueError(f"CUDAGraphMoE: buckets must be positive token counts, got {buckets}")
        self.layer = layer
        self.buckets = buckets
        self.hidden = weights.hidden
        self.compute_dtype = layer.compute_dtype
        self.device = weights.device
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None

    @property
    def captured(self) -> tuple[int, ...]:
        """The buckets captured so far."""
        return tuple(sorted(self._graphs))

    def capture(self, buckets: tuple[int, ...] | None = None) -> "CUDAGraphMoE":
        """Capture `buckets` (default: all of them) now rather than on first use, largest first
        (the smaller graphs then reuse the pool's memory); returns self."""
        for bucket in sorted(self.buckets if buckets is None else buckets, reverse=True):
            if bucket not in self.buckets:
                raise ValueError(f"CUDAGraphMoE.capture: {bucket} is not one of the buckets {self.buckets}")
            if bucket not in self._graphs:
                self._capture(bucket)
        return self

    def _capture(self, bucket: int) -> None:
        x = torch.zeros(bucket, self.hidden, dtype=self.compute_dtype, device=self.device)
        # Warm up on a side stream first: the first call compiles the Triton kernels.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.layer(x)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            y = self.layer(x)
        self._graphs[bucket] = (graph, x, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] not in (self.hidden, self.layer.weights.hidden_pad):
            raise ValueError(f"CUDAGraphMoE.forward: x must be [tokens, {self.hidden}] (or [tokens, "
                             f"{self.layer.weights.hidden_pad}] padded), got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"CUDAGraphMoE.forward: x is on {x.device}, the layer on {self.device}")
        tokens = x.shape[0]
        bucket = pick_bucket(self.buckets, tokens)
        if bucket is None or torch.cuda.is_current_stream_capturing():
            return self.layer(x)
        if bucket not in self._graphs:
            self._capture(bucket)
        graph, x_static, y_static = self._graphs[bucket]
        x_static[:tokens].copy_(x[:, :self.hidden])        # padded hidden columns are zero by contract
        x_static[tokens:].zero_()
        graph.replay()
        return y_static[:tokens].to(x.dtype, copy=True)
