"""What a terminal shows of long work: progress bars with an ETA (tqdm) on stderr, drawn only where stderr is a
terminal, so that a Slurm output file or a pipe gets the log lines alone."""
from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", initial: int = 0, show: bool = True, leave: bool = False) -> tqdm:
    """tqdm over `iterable` (or updated by hand up to `total`) on stderr: elapsed time, rate and ETA, redrawn in
    place, left on screen at the end if `leave`; drawn only if `show` (e.g. on the main process) and stderr is a
    terminal, else silent (tqdm.write still prints)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True,
                file=sys.stderr, disable=None if show else True)
