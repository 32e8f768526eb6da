"""An experiment's report: Markdown tables laid out like the paper's, the JSON of every figure, and the plots.

Files written into the experiment's folder:

``table.md``
    The main table as in the paper (rows: models; columns: Band 11, Band 10, Band 7, Band 6, Band 7:6, and
    ``Fused`` for FusionNet on all five inputs), test accuracy in % as mean ± std over the splits; then the same
    layout for cement accuracy (which is cement recall), landcover accuracy, cement precision and F1, the confusion
    matrices summed over the splits, and the paper's own figures for comparison.
``results.json``
    Everything: settings, dataset, per cell and split the test and validation metrics (accuracy, per-class
    accuracy, cement recall and precision, F1, confusion matrix), best epoch, training history, checkpoint path;
    per cell the mean, std and summed confusion matrix; the paper's figures; and under ``figures`` the exact
    numbers each PNG plots.
``per_class_accuracy.png``
    Grouped bars per band (paper Figs. 3 and 7): overall, cement and landcover accuracy per model, ± std.
``cement_recall.png``
    Cement recall per band and model, ± std (paper Fig. 8).
``confusion_matrices.png``
    One confusion matrix per cell, counts summed over the splits (paper Fig. 5).
``transfer_learning.png``
    Baselines only: accuracy over the splits from scratch against ImageNet-pretrained, per architecture (Fig. 9).

The PNGs need matplotlib (the ``experiments`` extra); without it they are skipped with a one-line message and the
tables and JSON are still written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

from fusionkern.experiments.resume import to_json
from fusionkern.files import write_text_atomic

METRIC_NAMES = {
    "accuracy": "Accuracy",
    "cement_accuracy": "Cement accuracy (= cement recall)",
    "landcover_accuracy": "Landcover accuracy",
    "cement_precision": "Cement precision",
    "f1": "Cement F1",
}
CEMENT_COLOUR, LANDCOVER_COLOUR = "#08306b", "#6baed6"  # the paper's dark and light blue


def _pct(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(100.0 * float(x), 4)


def _cells(result: Mapping[str, Any]) -> dict[tuple[str, str], dict]:
    return {(c["row"], c["column"]): c for c in result["cells"]}


def _labels(result: Mapping[str, Any], axis: str) -> list[tuple[str, str]]:
    return [(a["key"], a["label"]) for a in result[axis]]


def _mean_std(cell: dict | None, metric: str) -> tuple[float | None, float | None]:
    if cell is None:
        return None, None
    m = cell["summary"]["metrics"][metric]
    return _pct(m["mean"]), _pct(m["std"])


def figure_data(result: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers behind every PNG of the report (in %; None where a cell was not run or is undefined)."""
    cells, rows, cols = _cells(result), _labels(result, "rows"), _labels(result, "columns")
    bars = []
    recall = []
    for rkey, rlabel in rows:
        series: dict[str, Any] = {"row": rkey, "label": rlabel}
        for metric in ("accuracy", "cement_accuracy", "landcover_accuracy", "cement_recall"):
            pairs = [_mean_std(cells.get((rkey, ckey)), metric) for ckey, _ in cols]
            series[metric] = {"mean": [p[0] for p in pairs], "std": [p[1] for p in pairs]}
        bars.append({k: series[k] for k in ("row", "label", "accuracy", "cement_accuracy", "landcover_accuracy")})
        recall.append({"row": rkey, "label": rlabel, **series["cement_recall"]})
    x = [label for _, label in cols]
    figures: dict[str, Any] = {
        "per_class_accuracy.png": {"x": x, "unit": "%", "error": "std over splits", "series": bars},
        "cement_recall.png": {"x": x, "unit": "%", "error": "std over splits", "series": recall},
        "confusion_matrices.png": {
            "rows": [label for _, label in rows],
            "columns": x,
            "layout": "[[true cement -> cement, -> landcover], [true landcover -> cement, -> landcover]]",
            "summed_over_splits": True,
            "matrices": [
                [cells[(r, c)]["summary"]["confusion_matrix"] if (r, c) in cells else None for c, _ in cols]
                for r, _ in rows
            ],
        },  # fmt: skip
    }
    if result.get("experiment") == "baselines":
        figures["transfer_learning.png"] = _transfer_data(result, cells, cols)
    return figures


def _transfer_data(result: Mapping[str, Any], cells: dict, cols: list[tuple[str, str]]) -> dict[str, Any]:
    panels = []
    for ckey, clabel in cols:
        archs = []
        for arch, info in result.get("archs", {}).items():
            scratch, tl = cells.get((arch, ckey)), cells.get((f"tl-{arch}", ckey))
            if scratch and tl:
                archs.append({"arch": arch, "label": info["label"],
                              "scratch": [_pct(s["test"]["accuracy"]) for s in scratch["splits"]],
                              "imagenet": [_pct(s["test"]["accuracy"]) for s in tl["splits"]]})  # fmt: skip
        if archs:
            panels.append({"band": ckey, "label": clabel, "archs": archs})
    return {"unit": "%", "metric": "test accuracy per split", "panels": panels}


def _fmt(cell: dict | None, metric: str) -> str:
    """``mean ± std`` in %; ``–`` for a cell not run, ``n/a`` for a metric undefined on every split."""
    if cell is None:
        return "–"
    mean, std = _mean_std(cell, metric)
    if mean is None:
        return "n/a"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def markdown(result: Mapping[str, Any]) -> str:
    """The report's Markdown: the paper-style main table, the other metrics, confusion matrices, the paper's figures."""
    s = result["settings"]
    cells, rows, cols = _cells(result), _labels(result, "rows"), _labels(result, "columns")
    n_splits = max((c["summary"]["splits"] for c in result["cells"]), default=0)
    sites = result["sites"]
    lines = [
        f"# {result['title']}",
        "",
        f"Data `{s['data']}`: {sum(sites.values())} sites ({', '.join(f'{n} {c}' for c, n in sites.items())}). "
        f"Preset {s['preset']}, width {s['width']}, {s['epochs']} epoch(s), batch {s['batch_size']}, Adam lr "
        f"{s['lr']}, class weights {s['class_weights']}, augmentation {'on' if s['augment'] else 'off'}, seed "
        f"{s['seed']}. Test-set figures in %, mean ± std over {n_splits} split(s) (the paper: five).",
    ]
    if s.get("quick"):
        lines += ["", "> Quick run (few epochs, small widths, few splits): it shows that the pipeline works; its "
                      "figures are not comparable with the paper's."]  # fmt: skip
    for note in result.get("notes", []):
        lines += ["", note]
    header = "| Models | " + " | ".join(label for _, label in cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    for metric, name in METRIC_NAMES.items():
        lines += ["", f"## {name} (%)", "", header, rule]
        for rkey, rlabel in rows:
            lines.append(f"| {rlabel} | " + " | ".join(_fmt(cells.get((rkey, c)), metric) for c, _ in cols)
                         + " |")  # fmt: skip
    lines += ["", "## Confusion matrices, summed over the splits", "",
              "`[[cement -> cement, cement -> landcover], [landcover -> cement, landcover -> landcover]]` "
              "(rows: true class; columns: predicted).", "", header, rule]  # fmt: skip
    for rkey, rlabel in rows:
        lines.append(f"| {rlabel} | " + " | ".join(
            str(cells[(rkey, c)]["summary"]["confusion_matrix"]) if (rkey, c) in cells else "–" for c, _ in cols)
            + " |")  # fmt: skip
    paper = result.get("paper") or {}
    values = paper.get("values") or {}
    if values:
        labels = dict(rows)
        paper_rows = [k for k in values if k in labels] + [k for k in values if k not in labels]
        lines += ["", f"## The paper's figures ({paper.get('source', '')}), mean accuracy (%) over five splits", "",
                  header, rule]  # fmt: skip
        for key in paper_rows:
            label = labels.get(key, key.upper())
            lines.append(f"| {label} | " + " | ".join(
                f"{values[key][c]:.1f}" if c in values[key] else "–" for c, _ in cols) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(
    result: dict[str, Any],
    out: str | Path,
    *,
    figures: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Write ``table.md``, ``results.json`` and (with ``figures``) the PNGs into ``out``; returns what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = figure_data(result)
    files = {"table": str(out / "table.md"), "results": str(out / "results.json")}
    if figures:
        files.update(write_figures(data, out, log=log))
    result["figures"] = data
    result["files"] = files
    write_text_atomic(out / "table.md", markdown(result))
    write_text_atomic(out / "results.json", to_json(result))
    return files


def _matplotlib_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def write_figures(data: Mapping[str, Any], out: Path, *, log: Callable[[str], None] = print) -> dict[str, str]:
    """Render the figures of :func:`figure_data` as PNGs; skipped (one message) when matplotlib is absent."""
    Figure = _matplotlib_figure()
    if Figure is None:
        log("figures skipped: the PNG plots need matplotlib: pip install 'fusionkern[experiments]'")
        return {}
    written = {}
    painters = {
        "per_class_accuracy.png": _plot_per_class,
        "cement_recall.png": _plot_recall,
        "confusion_matrices.png": _plot_confusions,
        "transfer_learning.png": _plot_transfer,
    }
    for name, spec in data.items():
        fig = painters[name](Figure, spec)
        if fig is None:
            continue
        path = out / name
        tmp = path.with_name(f".{name}.tmp.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        tmp.replace(path)
        written[name.removesuffix(".png")] = str(path)
    return written


def _bars(ax, x: list[str], series: list[dict], key: str | None, title: str) -> None:
    import numpy as np

    n = max(len(series), 1)
    width = 0.8 / n
    pos = np.arange(len(x))
    lows = []
    for i, s in enumerate(series):
        vals = s[key] if key else s
        mean = np.array([np.nan if v is None else v for v in vals["mean"]], dtype=float)
        std = np.array([0.0 if v is None else v for v in vals["std"]], dtype=float)
        bars = ax.bar(pos + (i - (n - 1) / 2) * width, mean, width, yerr=std, capsize=2, label=s["label"])
        lows.extend((mean - std)[np.isfinite(mean)])
        if len(series) * len(x) <= 12:
            ax.bar_label(bars, labels=["" if np.isnan(m) else f"{m:.1f}" for m in mean], fontsize=7, padding=2)
    low = max(0.0, math.floor((min(lows) if lows else 0.0) / 10.0) * 10.0 - 10.0)
    ax.set_ylim(low, 102)
    ax.set_xticks(pos, x)
    ax.set_title(title)
    ax.set_ylabel("%")
    ax.grid(axis="y", alpha=0.3)


def _plot_per_class(Figure, spec: Mapping[str, Any]):
    panels = (("accuracy", "Accuracy"), ("cement_accuracy", "Cement accuracy"),
              ("landcover_accuracy", "Landcover accuracy"))  # fmt: skip
    n_bars = len(spec["x"]) * max(len(spec["series"]), 1)
    fig = Figure(figsize=(max(6.0, 2.0 + 0.3 * n_bars), 9.0), layout="constrained")
    axes = fig.subplots(3, 1)
    for ax, (key, title) in zip(axes, panels):
        _bars(ax, spec["x"], spec["series"], key, title)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Mean test accuracy per band and class (± std over splits)")
    return fig


def _plot_recall(Figure, spec: Mapping[str, Any]):
    n_bars = len(spec["x"]) * max(len(spec["series"]), 1)
    fig = Figure(figsize=(max(6.0, 2.0 + 0.3 * n_bars), 3.6), layout="constrained")
    ax = fig.subplots()
    _bars(ax, spec["x"], spec["series"], None, "Cement recall (± std over splits)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _plot_confusions(Figure, spec: Mapping[str, Any]):
    import numpy as np

    rows, cols = spec["rows"], spec["columns"]
    fig = Figure(figsize=(0.6 + 2.3 * len(cols), 0.6 + 2.5 * len(rows)), layout="constrained")
    axes = np.atleast_2d(np.asarray(fig.subplots(len(rows), len(cols), squeeze=False)))
    for i, rlabel in enumerate(rows):
        for j, clabel in enumerate(cols):
            ax = axes[i, j]
            cm = spec["matrices"][i][j]
            if cm is None:
                ax.axis("off")
                continue
            cm = np.asarray(cm)
            ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
            for (a, b), v in np.ndenumerate(cm):
                ax.text(b, a, str(v), ha="center", va="center", fontsize=9,
                        color="white" if v > cm.max() / 2 else "black")  # fmt: skip
            ax.set_xticks([0, 1], ["cement", "landcover"], fontsize=7)
            ax.set_yticks([0, 1], ["cement", "landcover"], fontsize=7, rotation=90, va="center")
            ax.set_title(f"{rlabel}\n{clabel}", fontsize=8)
            if j == 0:
                ax.set_ylabel("true", fontsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("predicted", fontsize=7)
    fig.suptitle("Confusion matrices (test sites, summed over splits)")
    return fig


def _plot_transfer(Figure, spec: Mapping[str, Any]):
    panels = spec["panels"]
    if not panels:
        return None
    fig = Figure(figsize=(1.0 + 2.0 * max(len(p["archs"]) for p in panels), 4.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        data, labels, colours = [], [], []
        for a in panel["archs"]:
            for init, prefix, colour in (("scratch", "", LANDCOVER_COLOUR), ("imagenet", "TL", CEMENT_COLOUR)):
                data.append([v for v in a[init] if v is not None])
                labels.append(prefix + a["label"])
                colours.append(colour)
        box = ax.boxplot(data, patch_artist=True)
        for patch, colour in zip(box["boxes"], colours):
            patch.set_facecolor(colour)
            patch.set_alpha(0.8)
        for i, values in enumerate(data, start=1):  # every split, so that a handful of splits stay visible
            ax.scatter([i] * len(values), values, s=12, c="black", zorder=3)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"From scratch vs ImageNet-pretrained, {panel['label']}")
        ax.grid(axis="y", alpha=0.3)
    return fig


__all__ = ["figure_data", "markdown", "write_figures", "write_report"]
