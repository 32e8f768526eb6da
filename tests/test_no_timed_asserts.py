"""No test asserts a duration: time belongs in benchmarks, never in pass/fail.

A test that checks ``seconds < 5.0`` fails on a loaded two-core machine and passes on a fast one; it measures the
machine, not the code. This check reads every test and benchmark file and fails, naming file and line, on an
``assert`` (or ``assert*`` call) that compares a value taken from a clock, directly or through the names it was
assigned to, or a value named as a duration (``seconds``, ``elapsed``, ``wall_s``, ``timings[...]`` ...).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("tests", "benchmarks")
CLOCKS = {"time", "perf_counter", "monotonic", "process_time", "thread_time", "time_ns", "perf_counter_ns",
          "monotonic_ns", "process_time_ns"}  # fmt: skip
DURATION_NAME = re.compile(
    r"^(seconds|secs|elapsed|duration|durations|runtime|took|wall|wall_s|.*_seconds|.*_secs|.*_elapsed|"
    r"elapsed_.*|.*_duration|duration_.*|.*_ms|timings?)$",
    re.IGNORECASE,
)


_VALUE_OPS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)


def _is_clock_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else "time"
    return name in CLOCKS and owner in ("time", "timeit") or name in ("default_timer",)


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _targets(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def _timed_names(tree: ast.AST) -> set[str]:
    """Names assigned from a clock, or from other such names (to a fixed point)."""
    timed: set[str] = set()
    assignments = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            assignments.append((node.targets, node.value))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            assignments.append(([node.target], node.value))
    changed = True
    while changed:
        changed = False
        for targets, value in assignments:
            if any(_is_clock_call(n) for n in ast.walk(value)) or _names(value) & timed:
                new = set().union(*(_targets(t) for t in targets)) - timed
                if new:
                    timed |= new
                    changed = True
    return timed


def _mentions_duration(node: ast.AST, timed: set[str]) -> bool:
    for sub in ast.walk(node):
        if _is_clock_call(sub):
            return True
        if isinstance(sub, ast.Name) and (sub.id in timed or DURATION_NAME.match(sub.id)):
            return True
        if isinstance(sub, ast.Attribute) and DURATION_NAME.match(sub.attr):
            return True
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and DURATION_NAME.match(sub.value):
            return True
    return False


def timed_assertions(source: str, filename: str = "<test>") -> list[int]:
    """Line numbers of assertions that compare a duration."""
    tree = ast.parse(source, filename)
    timed = _timed_names(tree)
    lines = []
    for node in ast.walk(tree):
        checked: list[ast.AST] = []
        if isinstance(node, ast.Assert):
            checked = [node.test]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name.startswith("assert"):
                checked = list(node.args)
        for test in checked:
            if isinstance(node, ast.Assert):  # comparisons of values; membership and identity say nothing of time
                compares = [n for n in ast.walk(test) if isinstance(n, ast.Compare) and any(
                    isinstance(op, _VALUE_OPS) for op in n.ops)]  # fmt: skip
            else:
                compares = [test]
            if any(_mentions_duration(c, timed) for c in compares):
                lines.append(node.lineno)
                break
    return sorted(set(lines))


def _suite_files() -> list[Path]:
    return sorted(p for suite in SUITES for p in (ROOT / suite).rglob("*.py"))


def test_no_test_asserts_a_duration():
    found = []
    for path in _suite_files():
        for line in timed_assertions(path.read_text(encoding="utf-8"), str(path)):
            found.append(f"{path.relative_to(ROOT)}:{line}")
    assert not found, "tests must not assert durations (time belongs in benchmarks): " + ", ".join(found)


@pytest.mark.parametrize(
    "source, flagged",
    [
        ("start = time.perf_counter()\nrun()\nassert time.perf_counter() - start < 5.0\n", [3]),
        ("t0 = time.time()\nrun()\nelapsed = time.time() - t0\nassert elapsed < 1\n", [4]),
        ("root, sites, seconds = fixture\nassert seconds < 5.0\n", [2]),
        ("assert report['timings']['wall_s'] < 60\n", [1]),
        ("assert result.elapsed <= 2.0\n", [1]),
        ("t = perf_counter()\nx = t * 2\nself.assertLess(x, 3)\n", [3]),
        ("assert len(sites) == 60 and sites[0].label == 0\n", []),
        ("assert report['counts']['scored'] > 0\n", []),
        ("seconds = 3\nwait(seconds)\nassert done\n", []),
        ("assert 'end_to_end' in report['timings']\n", []),
    ],
)
def test_the_check_finds_timed_assertions(source, flagged):
    """The check itself: durations in every disguise are found, ordinary assertions are not."""
    source = "import time\nfrom time import perf_counter\n" + source
    assert [line - 2 for line in timed_assertions(source)] == flagged
