"""Timing one benchmark case: warm-up, then rounds of a callable that waits for the device before it returns.

pytest-benchmark reads the host clock around each round, so every timed callable synchronises the CUDA device
before it returns (``torch.cuda.synchronize``); on the CPU the work is already done when the call returns. On a
GPU a round repeats the call ``inner`` times before the one synchronisation, so that launching and waiting cost
once per round instead of once per call; the report divides each round by ``inner``
(``benchmark.extra_info["inner"]``).

Warm-up calls (compilation by ``torch.compile``, Triton's autotuning, cuDNN's algorithm search, allocator growth)
run before the first timed round, and the number of rounds is chosen from the warm-up's time so that a case
takes about ``target_s`` seconds. In quick mode (tiny shapes, or pytest-benchmark disabled) a case runs once:
that checks the suite works, it measures nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class TimingSettings:
    """How long and how often a case is timed.

    Attributes:
        device: Where the cases run.
        quick: One call per case, no warm-up (the suite's self-check).
        target_s: Seconds spent timing one case, about (warm-up excluded).
        min_rounds: Fewest timed rounds of a case.
        min_rounds_long: Fewest timed rounds of a case whose call alone lasts longer than ``target_s``.
        max_rounds: Most timed rounds of a case.
        warmup: Untimed calls before the first round (two at least, the first of which may compile; no more
            once a warm call lasts longer than ``target_s``).
        min_round_s: On CUDA, a round repeats the call until it lasts about this long.
    """

    device: torch.device
    quick: bool = False
    target_s: float = 1.0
    min_rounds: int = 5
    min_rounds_long: int = 3
    max_rounds: int = 500
    warmup: int = 3
    min_round_s: float = 5e-3


def synchronize(device: torch.device) -> None:
    """Wait for every queued kernel of ``device`` (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    benchmark: Any,
    fn: Callable[..., Any],
    settings: TimingSettings,
    *,
    setup: Callable[[], tuple] | None = None,
    repeatable: bool = True,
) -> float:
    """Time ``fn`` with the pytest-benchmark fixture ``benchmark``; returns the warm-up's best seconds per call.

    Args:
        benchmark: The ``benchmark`` fixture.
        fn: The work of one call. With ``setup``, called as ``fn(*setup())``.
        settings: Rounds, warm-up and device.
        setup: Untimed preparation run before every round (e.g. the forward pass whose backward is timed); its
            device work is finished before the round's clock starts.
        repeatable: Whether ``fn`` may run several times per round on CUDA (False for calls with side effects
            that must not pile up, such as one optimizer step per timed unit).

    Sets ``benchmark.extra_info["inner"]`` (calls per round) and ``["rounds"]``.
    """
    device = settings.device

    def prepared() -> tuple:
        args = setup() if setup is not None else ()
        synchronize(device)
        return args

    if settings.quick or getattr(benchmark, "disabled", False):
        benchmark.extra_info.update(inner=1, rounds=1)

        def once(*args):
            fn(*args)
            synchronize(device)

        if setup is not None:
            benchmark.pedantic(once, setup=lambda: (prepared(), {}), rounds=1, iterations=1)
        else:
            benchmark.pedantic(once, rounds=1, iterations=1)
        return math.nan

    best = math.inf
    for i in range(max(2, settings.warmup)):
        args = prepared()
        start = time.perf_counter()
        fn(*args)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        if i >= 1 and best > settings.target_s:
            break
    best = max(best, 1e-7)

    inner = 1
    if device.type == "cuda" and setup is None and repeatable:
        inner = max(1, min(1000, math.ceil(settings.min_round_s / best)))
    fewest = settings.min_rounds_long if best > settings.target_s else settings.min_rounds
    rounds = max(fewest, min(settings.max_rounds, int(settings.target_s / (best * inner))))
    benchmark.extra_info.update(inner=inner, rounds=rounds)

    if setup is not None:

        def timed(*args):
            fn(*args)
            synchronize(device)

        benchmark.pedantic(timed, setup=lambda: (prepared(), {}), rounds=rounds, iterations=1)
    else:

        def timed_round():
            for _ in range(inner):
                fn()
            synchronize(device)

        benchmark.pedantic(timed_round, rounds=rounds, iterations=1)
    return best


def peak_memory(device: torch.device, fn: Callable[[], Any]) -> dict[str, int | None]:
    """Peak device memory of one call of ``fn`` (CUDA: ``torch.cuda.max_memory_allocated``; ``fn`` is not called
    on the CPU).

    Returns:
        ``{"peak_mem_bytes", "resident_bytes"}``: the peak during the call and what was allocated before it
        (weights, optimizer state, inputs); both None on the CPU, where memory is not measured.
    """
    if device.type != "cuda":
        return {"peak_mem_bytes": None, "resident_bytes": None}
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)), "resident_bytes": int(resident)}
