"""Benchmarks: what fusionkern buys on this machine, each figure against a baseline timed in the same run.

* :mod:`~fusionkern.bench.cases`: the cases (layers, Gabor bank, model throughput, training step, scan) and the
  sizes of a run (:class:`~fusionkern.bench.cases.Plan`).
* :mod:`~fusionkern.bench.roofline`: FLOPs and bytes per site, matmul peak and copy bandwidth.
* :mod:`~fusionkern.bench.timing`: warm-up, rounds, device synchronisation, peak memory.
* :mod:`~fusionkern.bench.machine`: CPU, GPU, versions and commit of the machine.
* :mod:`~fusionkern.bench.report`: ratios to the baselines, the speed goals, ``bench.json`` / ``bench.md`` /
  ``bench.png``.
* :mod:`~fusionkern.bench.runner`: :func:`run_bench`, the suite in ``benchmarks/`` run in-process
  (``fusionkern bench``).
"""

from fusionkern.bench.machine import describe_machine
from fusionkern.bench.report import GOALS, Goal, build_report, evaluate_goals, render_markdown, write_report
from fusionkern.bench.runner import BenchRun, default_suite, find_suite, run_bench

__all__ = [
    "GOALS",
    "BenchRun",
    "Goal",
    "build_report",
    "default_suite",
    "describe_machine",
    "evaluate_goals",
    "find_suite",
    "render_markdown",
    "run_bench",
    "write_report",
]
