"""Every kernel launch of the package goes through `launch`, so that a caller can record the
launches of one call (`record_launches`) and replay them later (`RecordedLaunch`) without running the
Python that chose them again. `mxfp4_moe.eager_plan` does this for the MoE layer at decode sizes,
where Triton's dispatch and the launchers' own checks cost the host more than the GPU's work.

A replay runs the compiled kernel through its own launcher (`CompiledKernel.run`, the call
Triton's `JITFunction.run` ends in, with the same arguments in Triton 3.6 through 3.9), skipping
Triton's argument binding, specialisation and cache look-up. That is only sound when every
argument specialises as it did when recorded: the caller replaces tensors only by tensors of the
same dtype and the same 16-byte alignment, and keeps every other argument. Under the interpreter
there is no compiled kernel, and while a profiler's launch hook is set the hook must see the
launch: both replay through the ordinary `kernel[grid](...)`.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Iterator

from triton import knobs
from triton.runtime import driver

# The open recordings of each thread: another thread's launches are not this call's.
_local = threading.local()


def _open_recordings() -> list[list["RecordedLaunch | None"]]:
    if not hasattr(_local, "recordings"):
        _local.recordings = []
    return _local.recordings


def launch(kernel, grid: tuple, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, recorded into every `record_launches` open in this thread."""
    compiled = kernel[grid](*args, **kwargs)
    recordings = _open_recordings()
    if recordings:
        try:
            recorded = RecordedLaunch(kernel, grid, args, kwargs, compiled)
        except Exception:       # a launch this module cannot describe: None marks the recording unusable
            recorded = None
        for launches in recordings:
            launches.append(recorded)
    return compiled


@contextlib.contextmanager
def record_launches() -> Iterator[list["RecordedLaunch | None"]]:
    """The launches made inside the block, in order (None for one that could not be recorded)."""
    launches: list[RecordedLaunch | None] = []
    recordings = _open_recordings()
    recordings.append(launches)
    try:
        yield launches
    finally:
        recordings.remove(launches)


def _hooks_unset() -> bool:
    """Whether no launch hook is set (Triton keeps them as chains of callables; None also means none)."""
    runtime = knobs.runtime
    return all(hook is None or getattr(hook, "calls", True) == []
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


class RecordedLaunch:
    """One launch: the kernel, its grid, every parameter's value in the kernel's order (defaults
    filled in, constexprs included, as Triton's launcher takes them) and the launch options."""

    def __init__(self, kernel, grid: tuple, args: tuple, kwargs: dict, compiled):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        signature = inspect.signature(kernel.fn)     # (the Python function, under Triton or its interpreter)
        names = signature.parameters.keys()
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        self.values = list(bound.arguments.values())
        self.options = {k: v for k, v in kwargs.items() if k not in names}
        # (the interpreter returns no compiled kernel: its replays go through kernel[grid])
        self.compiled = compiled if hasattr(compiled, "packed_metadata") else None
        self.device = driver.active.get_current_device() if self.compiled is not None else None

    def positions_of(self, tensor) -> list[int]:
        """The parameter positions that hold `tensor` itself (by identity)."""
        return [i for i, value in enumerate(self.values) if value is tensor]

    @property
    def parameter_names(self) -> list[str]:
        """The kernel's parameter names, in the order of `values`."""
        return list(inspect.signature(self.kernel.fn).parameters)

    def replay(self, replaced: dict[int, object] | None = None) -> None:
        """Launch again on the current stream, with the values at the positions in `replaced`
        swapped for the given ones (same dtype and alignment: see the module docstring)."""
        values = self.values
        if replaced:
            values = list(values)
            for position, value in replaced.items():
                values[position] = value
        compiled = self.compiled
        if compiled is None or not _hooks_unset():
            self.kernel[self.grid](*values, **self.options)
            return
        stream = driver.active.get_current_stream(self.device)
        compiled.run(*self.grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *values)


__all__ = ["RecordedLaunch", "launch", "record_launches"]
