"""The time budget of a check and how it is shared among the phases (standard library only).

The budget counts from the moment ``gpu_check.sh`` starts. Each phase gets a deadline when it starts, from what
is left then, so time a phase does not use passes on to the next:

* ``correctness``: at most ``CORRECTNESS_SHARE`` of what is left for the phases, and at most
  ``CORRECTNESS_MAX_S``;
* ``timings``: what is left, less the time kept for the scan phase (when it runs);
* ``scan``: what is left.

``REPORT_RESERVE_S`` is always kept for the report. Inside a phase every unit of work checks the deadline before
it starts (and how long it needs at least); a phase still running ``GRACE_S`` after its deadline is killed, and
what it wrote so far stays.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

DEFAULT_BUDGET_S = 450.0  # under 8 minutes with the report and a slow start
REPORT_RESERVE_S = 25.0  # the last phase's grace and the report
GRACE_S = 10.0
CORRECTNESS_SHARE = 0.4
CORRECTNESS_MAX_S = 170.0
SCAN_S = 45.0
PHASES = ("correctness", "timings", "scan")


@dataclass(frozen=True)
class Budget:
    """The check's clock: started at ``start`` (epoch seconds), ``total_s`` long (``inf``: no limit)."""

    start: float
    total_s: float = DEFAULT_BUDGET_S

    @property
    def end(self) -> float:
        return self.start + self.total_s

    def left(self, now: float | None = None) -> float:
        """Seconds left before the end (``inf`` without a limit)."""
        return self.end - (time.time() if now is None else now)

    def elapsed(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.start

    def phase_deadline(self, phase: str, phases: tuple[str, ...], now: float | None = None) -> float:
        """Deadline (epoch seconds) of ``phase`` starting now, when ``phases`` are the phases of this run.

        Raises:
            ValueError: An unknown phase.
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
        now = time.time() if now is None else now
        if math.isinf(self.total_s):
            return math.inf
        left = self.end - REPORT_RESERVE_S - now
        if phase == "correctness":
            return now + max(0.0, min(CORRECTNESS_MAX_S, CORRECTNESS_SHARE * left))
        if phase == "timings" and "scan" in phases:
            return now + max(0.0, left - SCAN_S)
        return now + max(0.0, left)


def describe_budget(budget: Budget, phases: tuple[str, ...], now: float | None = None) -> list[str]:
    """The phase plan as lines: each phase's share if every earlier phase used all of its own."""
    now = time.time() if now is None else now
    if math.isinf(budget.total_s):
        return ["budget: none (--full): every phase runs every case"]
    lines = [f"budget: {budget.total_s:.0f} s from the start, {budget.left(now):.0f} s left now; "
             f"{REPORT_RESERVE_S:.0f} s kept for the report"]  # fmt: skip
    t = now
    for phase in PHASES:
        if phase not in phases:
            lines.append(f"  {phase:<12} not run")
            continue
        deadline = budget.phase_deadline(phase, phases, t)
        lines.append(f"  {phase:<12} up to {deadline - t:5.0f} s (until {deadline - budget.start:4.0f} s)")
        t = deadline
    return lines
