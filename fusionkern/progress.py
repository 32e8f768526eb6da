"""Progress that suits where it goes: a live bar on a terminal, plain lines in a log file or CI.

tqdm redraws its bar with carriage returns; written to a file, those pile up into one line megabytes long. Where the
stream is not a terminal, :func:`progress` gives a reporter with the same ``update`` / ``close`` interface that
prints one complete line per step instead (at most one per percent, so that a long run stays readable).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class LineProgress:
    """One line per step: ``scan: 1.2k/10k chips (12 %), 350 chips/s, about 25 s left``.

    Args:
        total: Steps in all (in ``unit``).
        desc: What is being done.
        unit: What is counted.
        initial: Steps already done (a resumed run).
        stream: Where the lines go.
    """

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, stream: TextIO | None = None):
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.n = self._start = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self._t0 = time.perf_counter()
        self._shown = -1  # the last percent printed

    def update(self, n: int = 1) -> None:
        """Advances by ``n`` steps and prints a line when the percent done has moved (or the run is complete)."""
        self.n += int(n)
        percent = 100 * self.n // self.total if self.total else 100
        if percent == self._shown and self.n < self.total:
            return
        self._shown = percent
        elapsed = time.perf_counter() - self._t0
        done_here = self.n - self._start
        line = f"{self.desc}: {_count(self.n)}/{_count(self.total)} {self.unit}s ({percent} %)"
        if elapsed > 0 and done_here > 0:
            rate = done_here / elapsed
            line += f", {rate:.0f} {self.unit}s/s"
            if self.n < self.total:
                line += f", about {(self.total - self.n) / rate:.0f} s left"
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Nothing to clear: every line is already complete."""


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _count(n: int) -> str:
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def progress(
    total: int, desc: str, unit: str = "item", initial: int = 0, enabled: bool = True, stream: TextIO | None = None
) -> Any:
    """A progress reporter with ``update(n)`` and ``close()``.

    Args:
        total: Steps in all.
        desc: What is being done (the line's or bar's prefix).
        unit: What is counted (``chip``, ``site``).
        initial: Steps already done.
        enabled: False gives a reporter that prints nothing.
        stream: Where it writes (default stderr): a tqdm bar where it is a terminal, else one line per step.
    """
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return _Silent()
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit=unit, unit_scale=True, desc=desc, file=stream,
                    dynamic_ncols=True, smoothing=0.1)  # fmt: skip
    return LineProgress(total, desc, unit, initial, stream)


__all__ = ["LineProgress", "progress"]
