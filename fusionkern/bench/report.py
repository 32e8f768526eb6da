"""The benchmark report: every figure with its same-run baseline and the ratio, the speed goals, the roofline.

Input is pytest-benchmark's JSON (``--benchmark-json``) from the suite in ``benchmarks/``: one entry per case, its
group (what is compared), its timing statistics and ``extra_info`` written by :func:`fusionkern.bench.cases.record`
(``case``, ``variant``, ``baseline``, ``items`` per call, ``inner`` calls per timed round, and case fields such as
``preset``, ``batch``, ``dtype``, ``pass``, ``peak_mem_bytes``).

Definitions used throughout:

* time per call: the median round time divided by ``inner``;
* throughput: ``items`` per call over the time per call (sites/s, chips/s, FLOP/s, bytes/s, filters/s);
* ratio: throughput over the baseline's throughput in the same group (above 1: faster than the baseline); with the
  same items per call that is the baseline's time over this time;
* memory ratio: peak memory over the baseline's peak memory (below 1: less memory).

Outputs: ``bench.json`` (:func:`build_report`), ``bench.md`` (:func:`render_markdown`) and ``bench.png``
(:func:`render_plot`), written together by :func:`write_report`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

SCHEMA = "fusionkern-bench/1"
FAMILY_ORDER = ("layers", "gabor_bank", "model", "train", "scan", "matmul", "copy", "costs")
FAMILY_TITLES = {
    "layers": "Layers",
    "gabor_bank": "Gabor bank construction",
    "model": "Model inference throughput",
    "train": "Training step",
    "scan": "Scan",
    "matmul": "Roofline: matmul peak",
    "copy": "Roofline: copy bandwidth",
    "costs": "Roofline: costs per site",
}
UNITS = {
    "layers": "samples", "gabor_bank": "filters", "model": "sites", "train": "sites", "scan": "chips",
    "matmul": "FLOP", "copy": "B", "costs": "",
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured case with its baseline and ratios."""

    group: str
    name: str
    case: str
    variant: str
    baseline: str
    timed: bool
    time_s: float | None
    stddev_s: float | None
    iqr_s: float | None
    min_s: float | None
    rounds: int | None
    inner: int
    items: float
    throughput: float | None
    info: dict[str, Any] = field(default_factory=dict)
    baseline_time_s: float | None = None
    baseline_throughput: float | None = None
    ratio: float | None = None
    mem_ratio: float | None = None

    @property
    def is_baseline(self) -> bool:
        return self.variant == self.baseline

    def get(self, key: str, default: Any = None) -> Any:
        return self.info.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["is_baseline"] = self.is_baseline
        return d


def _finite(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def rows_from_pytest_benchmark(data: Mapping[str, Any]) -> list[Row]:
    """Rows of a pytest-benchmark JSON document, with ratios to each group's baseline filled in."""
    rows: list[Row] = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        stats = bench.get("stats") or {}
        inner = int(info.get("inner") or 1)
        timed = bool(info.get("timed", True))
        median = _finite(stats.get("median"))
        time_s = median / inner if (timed and median) else None
        items = float(info.get("items") or 1)
        rows.append(Row(
            group=bench.get("group") or info.get("case", "?"),
            name=bench.get("name", "?"),
            case=info.get("case", "?"),
            variant=str(info.get("variant", bench.get("param") or "?")),
            baseline=str(info.get("baseline", "")),
            timed=timed,
            time_s=time_s,
            stddev_s=(_finite(stats.get("stddev")) or 0.0) / inner if time_s else None,
            iqr_s=(_finite(stats.get("iqr")) or 0.0) / inner if time_s else None,
            min_s=(_finite(stats.get("min")) or 0.0) / inner if time_s else None,
            rounds=stats.get("rounds"),
            inner=inner,
            items=items,
            throughput=items / time_s if time_s else None,
            info=info,
        ))  # fmt: skip
    fill_ratios(rows)
    return rows


def fill_ratios(rows: Sequence[Row]) -> None:
    """Each row's baseline figures, throughput ratio and memory ratio from the baseline row of its group."""
    by_group: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_group[row.group].append(row)
    for group_rows in by_group.values():
        base = next((r for r in group_rows if r.is_baseline), None)
        for row in group_rows:
            if base is None:
                continue
            row.baseline_time_s = base.time_s
            row.baseline_throughput = base.throughput
            if row.throughput and base.throughput:
                row.ratio = row.throughput / base.throughput
            peak, base_peak = row.get("peak_mem_bytes"), base.get("peak_mem_bytes")
            if peak and base_peak:
                row.mem_ratio = peak / base_peak


# --------------------------------------------------------------------------------------------------------------
# Goals
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """A speed or memory target: ``variant`` against ``reference`` in every group whose rows match ``match``.

    ``metric`` is ``speed`` (throughput ratio, at least ``target``) or ``memory`` (peak memory ratio, at most
    ``target``). ``device`` is where the goal is set (None: any).
    """

    key: str
    issue: int
    text: str
    case: str
    variant: str
    reference: str
    target: float
    metric: str = "speed"
    device: str | None = None
    match: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, row: Row) -> bool:
        if row.case != self.case:
            return False
        for key, want in self.match.items():
            have = row.get(key)
            if isinstance(want, (tuple, list, set, frozenset)):
                if have not in want:
                    return False
            elif have != want:
                return False
        return True


FUSED_STAGES = ("gabor_stage", "conv_stage")

GOALS: tuple[Goal, ...] = (
    Goal("layer-fwd-eager", 3, "fused conv + ReLU + mixpool layer forward >= 1.5x eager (H100)", "layers", "triton",
         "eager", 1.5, device="cuda", match={"layer": FUSED_STAGES, "pass": "fwd"}),
    Goal("layer-fwd-compile", 3, "fused conv + ReLU + mixpool layer forward >= 1.0x torch.compile (H100)", "layers",
         "triton", "compile", 1.0, device="cuda", match={"layer": FUSED_STAGES, "pass": "fwd"}),
    Goal("layer-bwd-eager", 3, "fused conv + ReLU + mixpool layer backward >= 1.2x eager (H100)", "layers", "triton",
         "eager", 1.2, device="cuda", match={"layer": FUSED_STAGES, "pass": "bwd"}),
    Goal("train-step-eager", 3, "FusionNet training step >= 1.3x eager (H100)", "train", "triton", "eager", 1.3,
         device="cuda"),
    Goal("train-peak-memory", 3, "FusionNet training step peak memory <= 0.7x eager (H100)", "train", "triton",
         "eager", 0.7, metric="memory", device="cuda"),
    Goal("onnx-native-cpu", 4, "onnxruntime >= 1.5x eager on the native preset (CPU)", "model", "onnxruntime-fp32",
         "eager-fp32", 1.5, device="cpu", match={"preset": "native"}),
    Goal("trt-fp16-eager", 4, "TensorRT fp16 at batch 256 >= 5x eager fp32 (H100)", "model", "tensorrt-fp16",
         "eager-fp32", 5.0, device="cuda", match={"batch": 256}),
    Goal("trt-fp16-compile-bf16", 4, "TensorRT fp16 at batch 256 >= 1.5x torch.compile bf16 (H100)", "model",
         "tensorrt-fp16", "compile-bf16", 1.5, device="cuda", match={"batch": 256}),
)  # fmt: skip
"""The speed goals of issue 3 (kernels) and issue 4 (export engines), as measured ratios in one run."""


@dataclass
class GoalResult:
    """One goal in one group: the measured ratio and whether it meets the target."""

    goal: str
    issue: int
    text: str
    group: str | None
    measured: float | None
    target: float
    metric: str
    status: str  # "met" | "not met" | "not measured"
    reason: str = ""


def _not_measured_reason(goal: Goal, device: str, quick: bool, skipped: Sequence[Mapping[str, str]]) -> str:
    if quick:
        return "quick mode: one call on tiny shapes, not a measurement"
    if goal.device and goal.device != device:
        return f"set for a {'CUDA GPU' if goal.device == 'cuda' else 'CPU'} run; this run was on {device}"
    for name in (goal.variant, goal.reference):
        for item in skipped:
            if f"-{name}]" in item.get("test", "") or f"-{name}-" in item.get("test", ""):
                return f"{name} not measured: {item.get('reason', '')}"
    return "no measured pair of rows in this run"


def evaluate_goals(
    rows: Sequence[Row], device: str, quick: bool = False, skipped: Sequence[Mapping[str, str]] = (),
    goals: Sequence[Goal] = GOALS,
) -> list[GoalResult]:  # fmt: skip
    """Every goal against every matching group; a goal without a measured pair gets one "not measured" line."""
    results: list[GoalResult] = []
    for goal in goals:
        by_group: dict[str, dict[str, Row]] = defaultdict(dict)
        for row in rows:
            if row.timed and goal.matches(row):
                by_group[row.group][row.variant] = row
        found = False
        if not quick and (goal.device is None or goal.device == device):
            for group, variants in by_group.items():
                mine, ref = variants.get(goal.variant), variants.get(goal.reference)
                if mine is None or ref is None:
                    continue
                if goal.metric == "memory":
                    a, b = mine.get("peak_mem_bytes"), ref.get("peak_mem_bytes")
                    measured = a / b if (a and b) else None
                else:
                    measured = (mine.throughput / ref.throughput) if (mine.throughput and ref.throughput) else None
                if measured is None:
                    continue
                found = True
                met = measured <= goal.target if goal.metric == "memory" else measured >= goal.target
                results.append(GoalResult(goal.key, goal.issue, goal.text, group, measured, goal.target, goal.metric,
                                          "met" if met else "not met"))  # fmt: skip
        if not found:
            results.append(GoalResult(goal.key, goal.issue, goal.text, None, None, goal.target, goal.metric,
                                      "not measured", _not_measured_reason(goal, device, quick, skipped)))  # fmt: skip
    return results


# --------------------------------------------------------------------------------------------------------------
# Roofline summary
# --------------------------------------------------------------------------------------------------------------


def roofline_summary(rows: Sequence[Row]) -> dict[str, Any]:
    """Measured ceilings, costs per preset, and each model / training row's share of the matmul peak."""
    from fusionkern.bench.roofline import time_floor

    peaks = {r.variant: r.throughput for r in rows if r.case == "matmul" and r.throughput}
    bandwidth = next((r.throughput for r in rows if r.case == "copy" and r.throughput), None)
    costs = {r.get("preset"): {k: r.info[k] for k in COST_KEYS if k in r.info} for r in rows if r.case == "costs"}
    shares = []
    for r in rows:
        if r.case not in ("model", "train") or not r.throughput:
            continue
        flops_site = r.get("flops_per_item")  # effective FLOPs (nominal ones as flops_per_item_nominal)
        if not flops_site:
            continue
        precision = r.get("precision", "fp32")
        peak = peaks.get("fp32" if precision == "fp32" else "bf16")
        achieved = r.throughput * flops_site
        nominal = r.throughput * r.get("flops_per_item_nominal") if r.get("flops_per_item_nominal") else None
        cost = costs.get(r.get("preset")) or {}
        bytes_site = cost.get("bytes_floor_per_site")
        if bytes_site and precision != "fp32":
            bytes_site = bytes_site / 2
        floor = time_floor(flops_site, bytes_site, peak, bandwidth) if bytes_site else None
        shares.append({
            "group": r.group, "variant": r.variant, "case": r.case, "achieved_flops": achieved,
            "peak_flops": peak, "share_of_peak": achieved / peak if peak else None,
            "share_of_peak_nominal": nominal / peak if (peak and nominal) else None,
            "floor_s_per_site": floor, "time_over_floor": (1 / r.throughput) / floor if floor else None,
        })  # fmt: skip
    return {"matmul_peak_flops": peaks, "copy_bandwidth": bandwidth, "costs": costs, "shares": shares}


# --------------------------------------------------------------------------------------------------------------
# Scan: where its limit is
# --------------------------------------------------------------------------------------------------------------


SCAN_LIMITS = {"inference": "inference", "raw_read": "raw reads"}
"""The two limits of a scan: the model on chips in memory, and the rasters' windows read as stored."""


def _over(rate: Mapping[str, float], top: str, bottom: str | None) -> float | None:
    return rate[top] / rate[bottom] if (bottom and top in rate and bottom in rate) else None


def scan_summary(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Per scan group (preset, backend, compression), where the scan's limit is.

    Returns:
        One dict per group: ``chips_per_s`` per variant; ``io_over_raw_read`` (the scan's input side over plain
        reads of the same windows: below 1 by what conversion, calibration, masks, cutting and scaling cost);
        ``end_to_end_over_inference``; ``limit`` (``inference`` or ``raw reads``, the slower of the two) and
        ``end_to_end_over_limit`` (end to end over the limit's chips/s: 1 is a scan as fast as its limit allows).
    """
    by_group: dict[str, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        if row.case == "scan" and row.timed and row.throughput:
            by_group[row.group][row.variant] = row
    out = []
    for group, variants in by_group.items():
        rate = {variant: row.throughput for variant, row in variants.items()}
        first = next(iter(variants.values()))
        limit = min(SCAN_LIMITS, key=rate.__getitem__) if all(k in rate for k in SCAN_LIMITS) else None
        out.append({
            "group": group, "preset": first.get("preset"), "backend": first.get("backend"),
            "compression": first.get("compression"), "chips_per_s": rate,
            "io_over_raw_read": _over(rate, "io", "raw_read"),
            "end_to_end_over_inference": _over(rate, "end_to_end", "inference"),
            "limit": SCAN_LIMITS.get(limit or ""), "end_to_end_over_limit": _over(rate, "end_to_end", limit),
        })  # fmt: skip
    return out


COST_KEYS = (
    "preset", "width", "input_size", "params", "cost_batch", "flops_per_site_effective", "flops_per_site_nominal",
    "bytes_floor_per_site", "bytes_eager_per_site", "eager_bytes_per_site_activations",
    "eager_bytes_per_batch_weights", "intensity_floor", "intensity_eager",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# The report document
# --------------------------------------------------------------------------------------------------------------


def build_report(
    benchmark_json: Mapping[str, Any],
    *,
    machine: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    outcomes: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The content of ``bench.json``: machine, settings, rows with ratios, goals, roofline, what was not measured."""
    settings = dict(settings or {})
    outcomes = dict(outcomes or {})
    device = settings.get("device", (machine or {}).get("device", "cpu"))
    quick = bool(settings.get("quick", False))
    rows = rows_from_pytest_benchmark(benchmark_json)
    skipped = list(outcomes.get("skipped", []))
    goals = evaluate_goals(rows, device, quick, skipped)
    return {
        "schema": SCHEMA,
        "machine": dict(machine or {}),
        "settings": settings,
        "notes": list(notes),
        "results": [r.to_dict() for r in rows],
        "goals": [asdict(g) for g in goals],
        "roofline": roofline_summary(rows),
        "scan": scan_summary(rows),
        "outcomes": {
            "passed": outcomes.get("passed", len(rows)),
            "failed": list(outcomes.get("failed", [])),
            "skipped": skipped,
            "exit_code": outcomes.get("exit_code"),
        },
        "pytest_benchmark": {
            "version": benchmark_json.get("version"),
            "datetime": benchmark_json.get("datetime"),
        },
    }


def rows_of(report: Mapping[str, Any]) -> list[Row]:
    """The rows of a report document (as written by :func:`build_report`)."""
    fields = set(Row.__dataclass_fields__)
    return [Row(**{k: v for k, v in d.items() if k in fields}) for d in report.get("results", [])]


# --------------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_si(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}".rstrip()
    return f"{v:.3g} {unit}".rstrip()


def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.0f} B"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _percent(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _gflop(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e9:.4g}"


def _rate(row: Row) -> str:
    unit = UNITS.get(row.case, "")
    if row.case in ("matmul",):
        return fmt_si(row.throughput, "FLOP/s")
    if row.case == "copy":
        return fmt_si(row.throughput, "B/s")
    return fmt_si(row.throughput, f"{unit}/s" if unit else "/s")


def _table(header: Sequence[str], lines: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return out


def _machine_lines(m: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    cpu = m.get("cpu") or {}
    gpu = m.get("gpu") or None
    commit = m.get("commit") or {}
    versions = m.get("versions") or {}
    lines = [
        ("Date", m.get("date", "-")),
        ("Device", settings.get("device", m.get("device", "-"))),
        ("Host", m.get("host", "-")),
        ("CPU", f"{cpu.get('model', '-')}, {cpu.get('usable_cores', '-')} usable of {cpu.get('logical_cores', '-')} "
                f"logical cores, {cpu.get('memory_gib', '-')} GiB; "
                f"load average at start {cpu.get('load_average', '-')}"),
        ("CPU threads", f"{settings.get('threads', cpu.get('torch_threads', '-'))} (torch and onnxruntime; torch's "
                        f"default here: {cpu.get('torch_threads', '-')})"),
        ("GPU", "none" if not gpu else f"{gpu.get('name')} x{gpu.get('count')}, {gpu.get('memory_gib')} GiB, "
                f"sm {gpu.get('capability')}, CUDA {gpu.get('cuda')}, cuDNN {gpu.get('cudnn')}, "
                f"driver {gpu.get('driver')}"),
        ("Versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
        ("Commit", f"{commit.get('short', '-')}{' (uncommitted changes)' if commit.get('dirty') else ''}"
                   f" on {commit.get('branch', '-')}"),
        ("Settings", ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("device", "threads"))),
    ]  # fmt: skip
    return _table(("", ""), lines)


def _section_rows(rows: Sequence[Row], case: str) -> list[Row]:
    return [r for r in rows if r.case == case and r.timed]


def _layers_table(rows: Sequence[Row]) -> list[str]:
    lines = []
    for r in rows:
        lines.append((r.get("layer"), r.get("pass"), r.get("dtype"), r.get("preset"), r.get("shape", "-"), r.variant,
                      fmt_time(r.time_s), _rate(r), fmt_time(r.baseline_time_s) if not r.is_baseline else "baseline",
                      fmt_ratio(r.ratio)))  # fmt: skip
    return _table(("layer", "pass", "dtype", "preset", "shape", "variant", "time/call", "throughput",
                   "eager time", "ratio"), lines)  # fmt: skip


def _generic_table(rows: Sequence[Row], extra: Sequence[tuple[str, str]] = ()) -> list[str]:
    header = ["group", "variant", "time/call", "throughput", "baseline", "baseline time", "ratio"]
    header += [title for title, _ in extra]
    lines = []
    for r in rows:
        line = [r.group, r.variant, fmt_time(r.time_s), _rate(r), r.baseline,
                fmt_time(r.baseline_time_s) if not r.is_baseline else "(this row)", fmt_ratio(r.ratio)]  # fmt: skip
        for _, key in extra:
            if key == "peak_mem_bytes":
                line.append(fmt_bytes(r.get(key)) if r.get(key) else "not measured (CPU)")
            elif key == "mem_ratio":
                line.append(fmt_ratio(r.mem_ratio))
            else:
                line.append(r.get(key, "-"))
        lines.append(line)
    return _table(header, lines)


def render_markdown(report: Mapping[str, Any]) -> str:
    """``bench.md``: machine, goals, where something is slower than its baseline, one table per case family,
    the roofline, and what was not measured."""
    rows = rows_of(report)
    settings = report.get("settings", {})
    machine = report.get("machine", {})
    device = settings.get("device", machine.get("device", "cpu"))
    out = [f"# fusionkern benchmarks: {machine.get('name', device)} ({device})", ""]
    if settings.get("quick"):
        out += ["**Quick mode**: tiny shapes and one call per case. This run checks that the suite works; its "
                "figures are not measurements.", ""]  # fmt: skip
    for note in report.get("notes", []):
        out += [f"> {note}", ""]
    out += _machine_lines(machine, settings) + [""]
    out += ["Every figure is compared with a baseline timed in the same run, on the same machine. Ratio = "
            "throughput / baseline throughput (above 1: faster than the baseline). Time/call is the median round "
            "divided by the calls per round.", ""]  # fmt: skip

    out += ["## Goals", ""]
    goal_lines = []
    for g in report.get("goals", []):
        measured = "-" if g["measured"] is None else f"{g['measured']:.2f}x"
        sign = "<=" if g["metric"] == "memory" else ">="
        goal_lines.append((f"#{g['issue']}", g["text"], g["group"] or "-", measured, f"{sign} {g['target']:g}x",
                           g["status"] + (f" ({g['reason']})" if g["reason"] else "")))  # fmt: skip
    out += _table(("issue", "goal", "group", "measured", "goal", "status"), goal_lines) + [""]

    slower = [r for r in rows if r.timed and not r.is_baseline and r.ratio is not None and r.ratio < 1
              and r.case in ("layers", "model", "train")]  # fmt: skip
    out += ["## Slower than the baseline", ""]
    if settings.get("quick"):
        out += ["Not compared in quick mode (one call per case, compilation and first-call costs included)."]
    elif slower:
        out += ["Where a compiled or fused variant or an engine is slower than the eager reference (cuDNN on a GPU, "
                "PyTorch's own CPU kernels on a CPU) in this run:", ""]  # fmt: skip
        out += _table(("group", "variant", "ratio"), [(r.group, r.variant, fmt_ratio(r.ratio)) for r in slower])
    else:
        out += ["Nothing measured in this run is slower than its baseline."]
    out += [""]

    for case in ("layers", "gabor_bank", "model", "train", "scan"):
        section = _section_rows(rows, case)
        if not section:
            continue
        out += [f"## {FAMILY_TITLES[case]}", ""]
        if case == "layers":
            out += ["Baseline: the eager reference. fwd: inference forward (eval mode, BatchNorm folded on the Triton "
                    "path); bwd: the backward alone; full: forward + backward (train mode). Throughput in samples/s.",
                    ""]  # fmt: skip
            out += _layers_table(section)
        elif case == "gabor_bank":
            out += ["Baseline: the bank built one filter at a time in a Python double loop (as the authors' code "
                    "does); vectorised: `gabor_bank`. fwd builds the bank; full also back-propagates to its four "
                    "parameters.", ""]  # fmt: skip
            out += _generic_table(section)
        elif case == "model":
            out += ["FusionNet forward on sites already at the preset's input size; baseline eager fp32. Variants "
                    "are backend-precision.", ""]  # fmt: skip
            out += _generic_table(section)
        elif case == "train":
            out += ["One fp32 training step (forward, weighted cross-entropy, backward, Adam); baseline eager. Peak "
                    "memory: `torch.cuda.max_memory_allocated` during one step after warm-up (weights, gradients "
                    "and Adam state included); not measured on the CPU.", ""]  # fmt: skip
            out += _generic_table(section, (("peak memory", "peak_mem_bytes"), ("memory ratio", "mem_ratio")))
        elif case == "scan":
            out += ["Chips/s on a generated region, as generated and DEFLATE-compressed; baseline inference alone "
                    "(chips in memory). io: the scan's input side (reading, calibration, masks, cutting and scaling) "
                    "with the model replaced by zeros (a ratio above 1: reading outpaces the model); raw_read: the "
                    "same tile windows of the 12 rasters read with plain rasterio in their stored dtype, nothing "
                    "else, by as many threads (chips/s equivalent: the chips of those windows over the time); "
                    "end_to_end: the local engine, reader threads overlapping inference.", ""]  # fmt: skip
            out += _generic_table(section) + [""]
            out += _scan_limits_markdown(report.get("scan") or scan_summary(rows))
        out += [""]

    out += _roofline_markdown(report.get("roofline", {}), rows)

    outcomes = report.get("outcomes", {})
    if outcomes.get("failed"):
        out += ["## Failed", ""]
        out += _table(("test", "error"), [(f["test"], f.get("message", "")) for f in outcomes["failed"]]) + [""]
    if outcomes.get("skipped"):
        out += ["## Not measured", ""]
        by_reason: dict[str, list[str]] = defaultdict(list)
        for s in outcomes["skipped"]:
            by_reason[s.get("reason", "")].append(s.get("test", ""))
        out += _table(("reason", "cases"), [(reason, len(tests)) for reason, tests in by_reason.items()]) + [""]
    return "\n".join(out).rstrip() + "\n"


def _scan_limits_markdown(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    if not summary:
        return []
    out = ["Where the scan's limit is: io / raw reads (what the input side costs beyond decoding), end to end / "
           "inference alone, end to end / min(inference alone, raw reads) (1: the scan runs as fast as its slower "
           "limit allows).", ""]  # fmt: skip
    lines = []
    for s in summary:
        rate = s["chips_per_s"]
        lines.append((s["group"], *(fmt_si(rate.get(k), "chips/s") for k in ("inference", "raw_read", "io",
                      "end_to_end")), fmt_ratio(s["io_over_raw_read"]), fmt_ratio(s["end_to_end_over_inference"]),
                      fmt_ratio(s["end_to_end_over_limit"]), s["limit"] or "-"))  # fmt: skip
    return out + _table(("group", "inference", "raw reads", "io", "end to end", "io / raw", "e2e / inference",
                         "e2e / min(inference, raw)", "limit"), lines)  # fmt: skip


def _roofline_markdown(roof: Mapping[str, Any], rows: Sequence[Row]) -> list[str]:
    if not roof or not (roof.get("costs") or roof.get("matmul_peak_flops") or roof.get("copy_bandwidth")):
        return []
    out = ["## Roofline", ""]
    peaks = roof.get("matmul_peak_flops") or {}
    out += [f"Measured in this run: matmul peak fp32 {fmt_si(peaks.get('fp32'), 'FLOP/s')}, bf16 "
            f"{fmt_si(peaks.get('bf16'), 'FLOP/s')} (`torch.matmul`, TF32 off); copy bandwidth "
            f"{fmt_si(roof.get('copy_bandwidth'), 'B/s')} (bytes read + written).", ""]  # fmt: skip
    costs = roof.get("costs") or {}
    if costs:
        out += ["Costs per site of FusionNet (forward). FLOPs: `fusionkern.models.profile` (convolutions and linear "
                "layers); nominal: every output position times every kernel tap; effective: only the multiply-adds "
                "whose input tap lies inside the unpadded input map (taps on zero padding do no work), used for the "
                "intensities and the shares of the peak. Bytes in fp32 at the stated batch: floor = input read once "
                "+ logits written once + weights once per batch; eager = every ATen operator of the eager forward reads its inputs and "
                "writes its outputs once (views free).", ""]  # fmt: skip
        lines = []
        for preset, c in costs.items():
            lines.append((preset, c.get("width"), c.get("input_size"), fmt_si(c.get("params")),
                          _gflop(c.get("flops_per_site_nominal")), _gflop(c.get("flops_per_site_effective")),
                          c.get("cost_batch"),
                          fmt_bytes(c.get("bytes_floor_per_site")), fmt_bytes(c.get("bytes_eager_per_site")),
                          f"{c.get('intensity_floor', 0):.3g}", f"{c.get('intensity_eager', 0):.3g}"))  # fmt: skip
        out += _table(("preset", "width", "input px", "params", "GFLOP/site nominal", "GFLOP/site effective", "batch",
                       "bytes floor", "bytes eager", "FLOP/B floor", "FLOP/B eager"), lines) + [""]  # fmt: skip
    shares = roof.get("shares") or []
    if shares:
        out += ["Share of the matmul peak (fp32 rows against the fp32 peak, 16-bit rows against the bf16 peak); "
                "training rows count 3x the forward FLOPs. Achieved and share count effective FLOPs; the nominal "
                "share counts the padding's taps too. Over floor: measured time per site / max(FLOPs / peak, "
                "floor bytes / bandwidth).", ""]  # fmt: skip
        out += _table(("group", "variant", "achieved", "share of peak", "share, nominal FLOPs", "time over floor"),
                      [(s["group"], s["variant"], fmt_si(s["achieved_flops"], "FLOP/s"), _percent(s["share_of_peak"]),
                        _percent(s.get("share_of_peak_nominal")),
                        "-" if s["time_over_floor"] is None else f"{s['time_over_floor']:.3g}x") for s in shares])
        out += [""]  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------------


def render_plot(report: Mapping[str, Any], path: str | Path) -> Path:
    """``bench.png``: one panel per case family, a bar per variant with its ratio to the group's baseline
    (baseline = 1, dashed), plus a roofline panel where peaks were measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_of(report)
    panels = []
    for case in ("layers", "gabor_bank", "model", "train", "scan"):
        bars = [r for r in rows if r.case == case and r.timed and not r.is_baseline and r.ratio]
        if bars:
            panels.append((case, bars))
    roof = report.get("roofline") or {}
    has_roof = bool(roof.get("costs")) and bool(roof.get("matmul_peak_flops"))
    heights = [max(1.6, 0.22 * len(bars) + 0.9) for _, bars in panels] + ([4.0] if has_roof else [])
    if not heights:
        heights = [1.5]
    fig, axes = plt.subplots(len(heights), 1, figsize=(11, sum(heights) + 0.8),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)  # fmt: skip
    axes = axes[:, 0]
    settings = report.get("settings", {})
    title = f"fusionkern bench: {report.get('machine', {}).get('name', '?')} ({settings.get('device', '?')})"
    if settings.get("quick"):
        title += ", quick mode: not measurements"
    fig.suptitle(title, fontsize=11)
    if not panels and not has_roof:
        axes[0].text(0.5, 0.5, "no timed results", ha="center", va="center")
        axes[0].axis("off")
    for ax, (case, bars) in zip(axes, panels):
        labels = [f"{r.group.split('/', 1)[-1]}  {r.variant}" for r in bars]
        ratios = [r.ratio for r in bars]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in ratios]
        y = range(len(bars))
        ax.barh(list(y), ratios, color=colors, height=0.7)
        ax.axvline(1.0, color="k", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yticks(list(y), labels, fontsize=6.5)
        ax.invert_yaxis()
        for yi, (v, r) in enumerate(zip(ratios, bars)):
            ax.text(v, yi, f" {v:.2f}x: {fmt_time(r.time_s)} vs {r.baseline} {fmt_time(r.baseline_time_s)}",
                    va="center", fontsize=6)  # fmt: skip
        lo, hi = min(ratios + [1.0]), max(ratios + [1.0])
        ax.set_xlim(lo / 1.6, hi * 12)
        ax.set_title(f"{FAMILY_TITLES[case]}: ratio to the baseline (> 1 faster)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    if has_roof:
        _roofline_panel(axes[len(panels)], roof, rows)
    total = sum(heights) + 0.8
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / total))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _roofline_panel(ax, roof: Mapping[str, Any], rows: Sequence[Row]) -> None:
    peaks = roof.get("matmul_peak_flops") or {}
    bw = roof.get("copy_bandwidth")
    costs = roof.get("costs") or {}
    xs = [c["intensity_eager"] for c in costs.values()] + [c["intensity_floor"] for c in costs.values()]
    lo, hi = max(min(xs) / 10, 1e-2), max(xs) * 10
    grid = [lo * (hi / lo) ** (i / 100) for i in range(101)]
    for name, peak in sorted(peaks.items()):
        roofline = [min(peak, x * bw) if bw else peak for x in grid]
        ax.plot(grid, roofline, label=f"roof {name} ({fmt_si(peak, 'FLOP/s')}, {fmt_si(bw, 'B/s')})")
    shares = roof.get("shares") or []
    for s in shares:
        preset = s["group"].split("/")[1]
        c = costs.get(preset)
        if not c:
            continue
        ax.scatter([c["intensity_floor"]], [s["achieved_flops"]], s=12)
        ax.annotate(f" {s['group']} {s['variant']}", (c["intensity_floor"], s["achieved_flops"]), fontsize=5.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity, FLOP per byte (floor bytes)", fontsize=8)
    ax.set_ylabel("FLOP/s", fontsize=8)
    ax.set_title("Roofline: measured ceilings and what each backend achieves", fontsize=9)
    ax.legend(fontsize=7)


def write_report(report: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out`` (created); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(report), encoding="utf-8")
    render_plot(report, paths["png"])
    return paths
