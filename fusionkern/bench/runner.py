"""Running the suite in-process: ``pytest.main`` over the repository's ``benchmarks/`` folder, then the report.

The suite is not part of the installed package: it lives next to it in the repository (an editable install,
``pip install -e .``, finds it there). :func:`find_suite` says clearly when it cannot be found.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fusionkern.errors import ConfigError, MissingDependencyError

DEVICES = ("cpu", "cuda")


def default_suite() -> Path:
    """Where the suite is in a checkout: ``benchmarks/`` beside the ``fusionkern`` package folder."""
    import fusionkern

    return Path(fusionkern.__file__).resolve().parent.parent / "benchmarks"


def find_suite(suite: str | os.PathLike | None = None) -> Path:
    """The benchmark suite folder (``suite`` or :func:`default_suite`), checked to hold the suite's files.

    Raises:
        ConfigError: The folder is missing or is not the suite.
    """
    path = Path(suite).expanduser().resolve() if suite is not None else default_suite()
    if not path.is_dir() or not (path / "conftest.py").is_file() or not any(path.glob("test_bench_*.py")):
        where = "--suite" if suite is not None else "next to the installed package"
        raise ConfigError(
            f"benchmark suite not found at {path} ({where}): it is the benchmarks/ folder of a fusionkern "
            "checkout; install from a checkout (pip install -e .) or pass --suite DIR"
        )
    return path


def check_device(device: str) -> None:
    """Raise a one-line :class:`ConfigError` when ``device`` cannot be benchmarked here."""
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device cuda needs a CUDA GPU, and torch {torch.__version__} sees none; "
                              "use --device cpu")  # fmt: skip
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise ConfigError("TRITON_INTERPRET=1 is set: the Triton kernels would run on the CPU interpreter; "
                              "unset it to benchmark on the GPU")  # fmt: skip


class _Outcomes:
    """A pytest plugin that keeps what passed, failed and was skipped (with the reason)."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[dict[str, str]] = []
        self.skipped: list[dict[str, str]] = []

    def pytest_runtest_logreport(self, report) -> None:
        test = report.nodeid.split("::")[-1]
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skipped.append({"test": test, "reason": reason.removeprefix("Skipped: ")})
        elif report.failed:
            message = getattr(report.longrepr, "reprcrash", None)
            text = message.message if message is not None else str(report.longrepr)
            first = text.splitlines()[0][:300] if text else ""
            self.failed.append({"test": test, "when": report.when, "message": first})
        elif report.passed and report.when == "call":
            self.passed += 1

    def as_dict(self, exit_code: int) -> dict[str, Any]:
        return {"passed": self.passed, "failed": self.failed, "skipped": self.skipped, "exit_code": exit_code}


@dataclass
class BenchRun:
    """What :func:`run_bench` did: pytest's exit code, the report and the files written."""

    exit_code: int
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, str]]:
        return self.report["outcomes"]["failed"]


def pytest_args(
    suite: Path, json_path: Path, *, device: str, quick: bool, select: str | None, target_s: float | None,
    threads: int | None = None, verbose: bool = False, extra: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """The command line of the in-process pytest run."""
    args = [
        str(suite), "-p", "no:cacheprovider", "--import-mode=importlib", f"--benchmark-json={json_path}",
        f"--bench-device={device}", "--benchmark-sort=name", "--benchmark-columns=median,iqr,rounds",
        "-rfE", "-v" if verbose else "-q",
    ]  # fmt: skip
    if quick:
        args.append("--quick")
    if target_s is not None:
        args.append(f"--bench-time={target_s}")
    if threads:
        args.append(f"--bench-threads={threads}")
    if select:
        args += ["-k", select]
    return args + list(extra)


def run_bench(
    *,
    device: str,
    out: str | os.PathLike,
    quick: bool = False,
    suite: str | os.PathLike | None = None,
    select: str | None = None,
    target_s: float | None = None,
    threads: int | None = None,
    notes: Sequence[str] = (),
    verbose: bool = False,
    extra_pytest_args: Sequence[str] = (),
) -> BenchRun:
    """Run the suite with pytest-benchmark in this process and write ``bench.json``, ``bench.md``, ``bench.png``.

    Args:
        device: ``cpu`` or ``cuda``.
        out: Folder of the report (created).
        quick: Tiny shapes, one call per case: checks the suite, measures nothing.
        suite: The suite folder (default: ``benchmarks/`` beside the installed package).
        select: A pytest ``-k`` expression choosing cases.
        target_s: Seconds spent timing each case (default 1).
        threads: CPU threads of torch and onnxruntime during the run (default: theirs).
        notes: Lines quoted at the top of ``bench.md`` (e.g. that the machine was shared).
        verbose: pytest's ``-v``.
        extra_pytest_args: More pytest arguments.

    Raises:
        ConfigError: Unknown or unusable device, or no suite.
        MissingDependencyError: pytest-benchmark or matplotlib missing.
    """
    check_device(device)
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    suite_path = find_suite(suite)
    try:
        import pytest
        import pytest_benchmark  # noqa: F401
    except ImportError as exc:
        package = getattr(exc, "name", None) or "pytest-benchmark"
        raise MissingDependencyError(package, "bench", "fusionkern bench") from None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError("matplotlib", "bench", "The benchmark plot") from None

    from fusionkern.bench.machine import describe_machine
    from fusionkern.bench.report import build_report, write_report

    machine = describe_machine(device)  # before the run: the load average says how busy the machine was
    outcomes = _Outcomes()
    with tempfile.TemporaryDirectory(prefix="fusionkern-bench-") as tmp:
        json_path = Path(tmp) / "pytest-benchmark.json"
        args = pytest_args(suite_path, json_path, device=device, quick=quick, select=select, target_s=target_s,
                           threads=threads, verbose=verbose, extra=extra_pytest_args)  # fmt: skip
        exit_code = int(pytest.main(args, plugins=[outcomes]))
        data = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {"benchmarks": []}
    settings = {
        "device": device, "quick": quick, "select": select, "target_s": target_s if target_s is not None else 1.0,
        "threads": threads or torch.get_num_threads(), "suite": str(suite_path),
        "fp32": "torch defaults: TF32 convolutions, IEEE matmuls" if device == "cuda" else "IEEE",
    }  # fmt: skip
    report = build_report(data, machine=machine, settings=settings, outcomes=outcomes.as_dict(exit_code), notes=notes)
    paths = write_report(report, out)
    return BenchRun(exit_code, report, paths)
