"""The report folder: ``report.md``, ``correctness.md``, ``bench.json`` / ``bench.md`` / ``bench.png``, ``env.txt``
and ``check.log``; at most :data:`MAX_FILES` files of at most :data:`MAX_FILE_BYTES` each.

``report.md`` and ``correctness.md`` are written with the standard library after every phase (a run cut short
still has them); the ``bench.*`` files come from :func:`write_bench`, which needs the checkout importable.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from gpucheck.correctness import EXCLUDING, INTERPRETER_BF16, PRECISIONS, TOLERANCES, summarise

MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
LOG_KEEP_BYTES = 6 * 2**20  # check.log keeps its first and last half of this when longer
FILES = ("report.md", "correctness.md", "bench.json", "bench.md", "bench.png", "env.txt", "check.log")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-" if v is None else str(v)
    return f"{v:.{digits}e}"


def _si(v: float | None, unit: str = "") -> str:
    if not v:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}".strip()


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


# --------------------------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------------------------


def correctness_lines(rows: Sequence[dict], full: bool = False) -> list[str]:
    """The correctness section: counts, worst errors per kind and precision, failures, exclusions (and with
    ``full`` every comparison)."""
    if not rows:
        return ["Not run."]
    s = summarise(rows)
    st = s["unit_status"]
    lines = [f"{s['units']} units (a layer with one launch configuration), {s['comparisons']} comparisons; units: "
             f"**{st['pass']} passed**, {st['fail']} failed, {st['error']} errors, {st['not run']} not run.",
             ""]  # fmt: skip
    table = []
    for kind in ("gabor", "conv", "dilated", "attention"):
        for precision in PRECISIONS:
            sel = [r for r in rows if r["kind"] == kind and r.get("precision") == precision]
            if not sel:
                continue
            out = max((r["out_err"] for r in sel), default=None)
            grads = [r["grad_err"] for r in sel if r.get("grad_err") is not None]
            tol_out, tol_grad = TOLERANCES[precision]
            worst_grad = _fmt(max(grads, default=None))
            table.append([kind, precision, len(sel), sum(r["status"] == "fail" for r in sel),
                          f"{_fmt(out)} ({tol_out:.0e})", f"{worst_grad} ({tol_grad:.0e})"])  # fmt: skip
    lines += _table(["kernel", "precision", "comparisons", "failed", "worst output error (tolerance)",
                     "worst gradient error (tolerance)"], table)  # fmt: skip
    if not any(r.get("precision") == "bf16" for r in rows):
        lines += ["", INTERPRETER_BF16 + "."]
    lines += ["", "Output: max |error| / max |reference|; gradients: ||error|| / ||reference||. A failed "
              f"{' or '.join(EXCLUDING)} comparison excludes its autotune config from autotuning."]  # fmt: skip
    bad = s["failed"]
    if bad:
        lines += ["", "Failures:", ""]
        for r in bad[:40]:
            what = ", ".join(r.get("failed") or []) or r.get("error", "")
            lines.append(f"* {r['module']} [{r.get('config') or r.get('pick') or '-'}] b{r['batch']} "
                         f"{r.get('precision') or ''} {r.get('mode') or ''}: {r['status']}: {what}")  # fmt: skip
        if len(bad) > 40:
            lines.append(f"* ... and {len(bad) - 40} more (correctness.md)")
    retried = [r for r in rows if r.get("note")]
    if retried:
        lines += ["", f"{len(retried)} comparisons passed only on their second seed (a near-tie the first time)."]
    lines += ["", "Autotune exclusions: " + ("none" if not s["exclusions"] else "; ".join(
        f"{k}: {', '.join(v)}" for k, v in s["exclusions"].items()))]  # fmt: skip
    not_run = [r for r in rows if r["status"] == "not run"]
    if not_run:
        lines.append(f"Not run ({not_run[0].get('error')}): " + ", ".join(r["unit"] for r in not_run[:10])
                     + (" ..." if len(not_run) > 10 else ""))  # fmt: skip
    if full:
        lines += ["", "## Every comparison", ""]
        lines += _table(
            ["layer", "launch", "batch", "precision", "mode", "output error", "gradient error (worst)", "status"],
            [[r["module"], r.get("config") or r.get("pick") or "-", r["batch"], r.get("precision") or "-",
              r.get("mode") or "-", _fmt(r.get("out_err")),
              f"{_fmt(r.get('grad_err'))} {r.get('worst_grad') or ''}".strip(),
              r["status"] + (f" ({r['note']})" if r.get("note") else "")
              + (f": {r['error']}" if r.get("error") else "")] for r in rows],
        )  # fmt: skip
    return lines


# --------------------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------------------


def write_bench(work: Path, dest: Path, settings: dict, notes: Sequence[str] = ()) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` and ``bench.png`` from the timing phases' results (needs the checkout and
    matplotlib importable); ``bench.json`` also carries the check's phases and correctness rows."""
    from fusionkern.bench.machine import describe_machine
    from fusionkern.bench.report import GOALS, build_report, write_report
    from gpucheck.timings import read_results

    res = read_results([work / "timings.jsonl", work / "scan.jsonl"])
    outcomes = {"passed": len(res["benchmarks"]), "failed": res["failed"], "skipped": res["skipped"],
                "exit_code": 1 if res["failed"] else 0}  # fmt: skip
    report = build_report({"benchmarks": res["benchmarks"]}, machine=describe_machine(settings.get("device", "cuda")),
                          settings=settings, outcomes=outcomes, notes=list(notes) + res["notes"])  # fmt: skip
    goals = {g.key: g for g in GOALS}
    rows = {(r["group"], r["variant"]): r for r in report["results"]}
    figures = []
    for g in report["goals"]:
        goal = goals.get(g["goal"])
        mine = rows.get((g["group"], goal.variant)) if goal and g["group"] else None
        ref = rows.get((g["group"], goal.reference)) if goal and g["group"] else None
        figures.append({**g, "variant": goal.variant if goal else None, "reference": goal.reference if goal else None,
                        "figure": mine, "baseline": ref})  # fmt: skip
    report["gpu_check"] = {
        "goals": figures,
        "phases": json.loads((work / "phases.json").read_text()) if (work / "phases.json").is_file() else [],
        "correctness": read_jsonl(work / "correctness.jsonl"),
    }
    return write_report(report, dest)


def _figure(row: dict | None, metric: str) -> str:
    if not row:
        return "-"
    if metric == "memory":
        peak = row.get("info", {}).get("peak_mem_bytes")
        return f"{peak / 2**30:.2f} GiB" if peak else "-"
    unit = {"layers": "samples", "model": "sites", "train": "sites", "scan": "chips"}.get(row.get("case"), "items")
    t = row.get("time_s")
    return f"{_si(row.get('throughput'), unit + '/s')} ({t * 1e3:.3f} ms)" if t else "-"


def goal_lines(bench: dict) -> list[str]:
    goals = bench.get("gpu_check", {}).get("goals") or bench.get("goals", [])
    table = []
    for g in goals:
        measured = "-" if g.get("measured") is None else f"{g['measured']:.2f}x"
        status = f"**{g['status']}**" if g["status"] != "not measured" else f"not measured: {g.get('reason', '')}"
        table.append([f"#{g['issue']} {g['text']}", g.get("group") or "-", _figure(g.get("figure"), g["metric"]),
                      _figure(g.get("baseline"), g["metric"]), measured,
                      ("<= " if g["metric"] == "memory" else ">= ") + f"{g['target']:g}x", status])  # fmt: skip
    return _table(["goal", "group", "figure", "same-run baseline", "ratio", "target", "status"], table)


def figure_lines(bench: dict) -> list[str]:
    rows = bench.get("results", [])
    out: list[str] = []
    model = [r for r in rows if r["case"] == "model" and r.get("throughput")]
    if model:
        variants = sorted({r["variant"] for r in model})
        groups = sorted({r["group"] for r in model}, key=lambda g: (g.split("/")[1], int(g.split("/b")[-1])))
        by = {(r["group"], r["variant"]): r for r in model}
        out += ["", "Model inference, sites/s (ratio to eager-fp32 in the same group):", ""]
        def cell(g: str, v: str) -> str:
            r = by.get((g, v))
            if r is None:
                return "-"
            return f"{r['throughput']:.4g}" + (f" ({r['ratio']:.2f}x)" if r.get("ratio") else "")

        out += _table(["group"] + variants, [[g] + [cell(g, v) for v in variants] for g in groups])
    other = [r for r in rows if r["case"] in ("train", "layers", "scan", "matmul", "copy") and r.get("time_s")]
    if other:
        out += ["", "Other timed cases (time per call, throughput, ratio to the group's baseline, peak memory):", ""]
        out += _table(["group", "variant", "time", "throughput", "ratio", "peak memory"], [
            [r["group"], r["variant"], f"{r['time_s'] * 1e3:.3f} ms", _si(r.get("throughput")),
             f"{r['ratio']:.2f}x" if r.get("ratio") else "-",
             f"{r['info']['peak_mem_bytes'] / 2**30:.2f} GiB" if r["info"].get("peak_mem_bytes") else "-"]
            for r in other])  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------------------


def write_markdown(work: Path, dest: Path, header: dict[str, Any]) -> Path:
    """``report.md`` and ``correctness.md`` from what the work folder holds now."""
    dest.mkdir(parents=True, exist_ok=True)
    phases = json.loads((work / "phases.json").read_text()) if (work / "phases.json").is_file() else []
    rows = read_jsonl(work / "correctness.jsonl")
    bench = json.loads((dest / "bench.json").read_text()) if (dest / "bench.json").is_file() else {}
    lines = [f"# GPU check: {header.get('gpu', '?')}, {header.get('date', '?')}", ""]
    lines += [f"* {k}: {v}" for k, v in header.items() if k not in ("gpu", "date", "setup")]
    lines += ["", "## Phases", ""]
    lines += _table(["phase", "status", "seconds", "allowed", "note"],
                    [[p["phase"], p["status"], f"{p.get('seconds', 0):.0f}",
                      "-" if p.get("allowed_s") is None else f"{p['allowed_s']:.0f}", p.get("note", "")]
                     for p in phases])  # fmt: skip
    lines += ["", "## Setup", ""] + [f"* {line}" for line in header.get("setup", [])]
    lines += ["", "## Correctness on the card", ""] + correctness_lines(rows)
    lines += ["", "## Goals", ""]
    if bench:
        lines += goal_lines(bench) + figure_lines(bench)
        outcomes = bench.get("outcomes", {})
        failed, skipped = outcomes.get("failed", []), outcomes.get("skipped", [])
        if failed:
            lines += ["", "Cases that failed:", ""] + [f"* {f['test']}: {f['message']}" for f in failed]
        if skipped:
            reasons = Counter(s["reason"] for s in skipped)
            lines += ["", "Cases not run:", ""] + [f"* {n} x {reason}" for reason, n in reasons.most_common()]
    else:
        lines.append("No timing results (the timing phases did not run or wrote nothing).")
    lines += ["", "## Files", "", ", ".join(f"`{f}`" for f in FILES if (dest / f).exists() or f == "report.md")]
    path = dest / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (dest / "correctness.md").write_text("# Correctness on the card\n\n" + "\n".join(correctness_lines(rows, full=True))
                                         + "\n", encoding="utf-8")  # fmt: skip
    return path


def write_log(dest: Path, parts: Sequence[tuple[str, Path]]) -> Path:
    """``check.log``: each log of ``parts`` under a header; a long log keeps its head and tail."""
    path = dest / "check.log"
    half = LOG_KEEP_BYTES // 2 // max(1, len(parts))
    with path.open("wb") as out:
        for title, log in parts:
            out.write(f"\n===== {title} =====\n".encode())
            if not log.is_file():
                out.write(b"(no log)\n")
                continue
            data = log.read_bytes()
            if len(data) > 2 * half:
                data = data[:half] + f"\n[... {len(data) - 2 * half} bytes left out ...]\n".encode() + data[-half:]
            out.write(data)
    return path


def check_limits(dest: Path) -> list[str]:
    """Problems with the folder's size limits (too many files, a file too large)."""
    files = [p for p in dest.iterdir() if p.is_file()]
    problems = [f"{p.name} is {p.stat().st_size / 2**20:.1f} MiB (limit {MAX_FILE_BYTES / 2**20:.0f} MiB)"
                for p in files if p.stat().st_size > MAX_FILE_BYTES]  # fmt: skip
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (limit {MAX_FILES})")
    return problems
