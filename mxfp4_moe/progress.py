"""The progress bar of long work (verify's checks, loading a model's layers): tqdm on stderr,
drawn only when stderr is a terminal, so logs and captured output stay clean."""

from __future__ import annotations

import sys


def progress_bar(total: int, enabled: bool = True, desc: str = "", unit: str = "step"):
    """A tqdm bar of `total` steps; silent when not `enabled` or stderr is not a terminal.
    `advance` moves it on; `.close()` clears it."""
    from tqdm.auto import tqdm
    return tqdm(total=max(1, total), desc=desc, unit=unit, file=sys.stderr, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


def advance(bar, step: str) -> None:
    """Count one step of `progress_bar` and show the one starting now."""
    bar.set_postfix_str(step, refresh=False)
    bar.update(1)
