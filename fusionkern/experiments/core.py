"""What every experiment shares: its settings, its data and splits, and the loop over (row, column, split) cells.

An experiment is a table: rows are models (or model variants), columns are inputs (bands, or the fused five), and
each cell is trained once per stratified split with the paper's protocol (:mod:`fusionkern.train`). The splits are
the same for every cell, drawn once from the dataset's labels, so the cells of a column are compared on identical
test sites. Each (cell, split) is seeded from the split alone (weights, shuffling, augmentation), so a cell's result
does not depend on which cells ran before it, and a resumed run gives what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from fusionkern import BRANCHES, CLASSES
from fusionkern.errors import ConfigError
from fusionkern.experiments.resume import CellStore
from fusionkern.metrics import SUMMARY_KEYS, summarise

PAPER_BAND_ORDER = ("b11", "b10", "b7", "b6", "b76")
"""Column order of the paper's Tables II and III (Band 11, Band 10, Band 7, Band 6, Band 7:6)."""

BAND_LABELS = {"b10": "Band 10", "b11": "Band 11", "b7": "Band 7", "b6": "Band 6", "b76": "Band 7:6"}

QUICK = dict(preset="native", width=0.25, epochs=2, splits=2, batch_size=32, lr=2e-3)
"""What ``--quick`` sets (flags given explicitly still win): a smoke run of the whole grid in seconds per cell on a
CPU. Its figures say that the pipeline works, not how the models compare."""

Log = Callable[[str], None]


@dataclass
class ExperimentSettings:
    """Training settings shared by every cell of an experiment (the paper's protocol by default).

    ``quick`` replaces the defaults by :data:`QUICK` for every field left at None.
    """

    data: str = ""
    out: str = ""
    preset: str | None = None  # paper (256 px input) or native (35 px)
    width: float | None = None
    alphas: str | list[float] = "paper"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    splits: int | None = None
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    class_weights: list[float] = field(default_factory=lambda: [3.0, 1.0])
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    progress: bool = True
    quick: bool = False
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        defaults = (
            QUICK if self.quick else dict(preset="paper", width=1.0, epochs=150, splits=5, batch_size=100, lr=1e-4)
        )
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if not self.data:
            raise ConfigError("data: no dataset folder given (--data DIR)")
        if not self.out:
            raise ConfigError("out: no output folder given (--out DIR)")
        self.train_config(model="cnn5", branch="b76")  # validates every shared option now, before any work

    def train_config(self, **overrides: Any):
        """The :class:`fusionkern.train.TrainConfig` of one cell: these settings plus the cell's model and input."""
        from fusionkern.train import TrainConfig

        values = dict(
            data=str(self.data), out=str(self.out), preset=self.preset, width=float(self.width), alphas=self.alphas,
            epochs=int(self.epochs), batch_size=int(self.batch_size), lr=float(self.lr),
            weight_decay=float(self.weight_decay), splits=int(self.splits), test_fraction=self.test_fraction,
            val_fraction=self.val_fraction, class_weights=list(self.class_weights), augment=self.augment,
            seed=self.seed, device=self.device, workers=self.workers, progress=self.progress,
        )  # fmt: skip
        values.update(overrides)
        return TrainConfig(**values)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide a cell's result (not where it runs, nor how many splits or cells)."""
        keys = ("preset", "width", "alphas", "epochs", "batch_size", "lr", "weight_decay", "test_fraction",
                "val_fraction", "class_weights", "augment", "seed")  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ExperimentData:
    """A dataset read once for a whole experiment: its sites, a cached dataset of their inputs, the splits."""

    sites: list
    dataset: Any  # SiteDataset over the branches the experiment needs, no augmentation; views share its cache
    labels: np.ndarray
    splits: list
    counts: dict[str, int]
    identity: str  # hash of the sites' keys and labels

    def view(self, branches: Sequence[str], augment_seed: int | None):
        """The sites with ``branches`` only; augmented with a generator seeded ``augment_seed`` (None: no augment)."""
        from fusionkern.data import SiteAugment

        augment = SiteAugment(seed=augment_seed) if augment_seed is not None else None
        dataset = self.dataset
        if tuple(branches) != tuple(dataset.branches):
            if len(branches) != 1:
                raise ValueError(f"a view holds one branch or all of {dataset.branches}, got {tuple(branches)}")
            dataset = dataset.single_branch(branches[0])
        return dataset.with_augment(augment)


def load_data(settings: ExperimentSettings, branches: Iterable[str], log: Log = print) -> ExperimentData:
    """Read ``settings.data`` once, check every site can be read, and draw the splits."""
    from fusionkern.data import SiteDataset, load_sites, stratified_splits
    from fusionkern.models import get_preset

    sites, report = load_sites(settings.data)
    if report is not None:
        log(report.summary())
    wanted = tuple(b for b in BRANCHES if b in set(branches))
    dataset = SiteDataset(sites, chip_size=get_preset(settings.preset).chip_px, augment=None, branches=wanted)
    dataset.preload()
    labels = np.asarray(dataset.labels)
    splits = stratified_splits(
        labels, int(settings.splits), settings.test_fraction, settings.val_fraction, settings.seed
    )
    counts = {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}
    digest = hashlib.sha256("\n".join(f"{s.key}\t{s.label}" for s in sites).encode()).hexdigest()[:16]
    log(f"{len(sites)} sites ({', '.join(f'{n} {c}' for c, n in counts.items())}) from {settings.data}; "
        f"{len(splits)} split(s)")  # fmt: skip
    return ExperimentData(sites, dataset, labels, splits, counts, digest)


@dataclass(frozen=True)
class Axis:
    """One row or column of an experiment's table: a key (file-safe) and the label the table prints."""

    key: str
    label: str


def parse_list(text: str | Sequence[str] | None, allowed: Sequence[str], option: str,
               aliases: Mapping[str, str] | None = None) -> list[str] | None:  # fmt: skip
    """A comma-separated option (or a list) checked against ``allowed``; None stays None."""
    if text is None:
        return None
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [(aliases or {}).get(t, t) for t in items if t]
    unknown = [t for t in items if t not in allowed]
    if unknown or not items:
        raise ConfigError(
            f"{option}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(allowed)}"
        )
    return list(dict.fromkeys(items))


BAND_ALIASES = {
    "b7:6": "b76", "7:6": "b76", "b7_6": "b76", "band7:6": "b76", "ratio": "b76", "band10": "b10", "band11": "b11",
    "band7": "b7", "band6": "b6", "10": "b10", "11": "b11", "7": "b7", "6": "b6", "76": "b76",
}  # fmt: skip


def parse_bands(text: str | Sequence[str] | None, option: str = "--bands") -> list[str] | None:
    """Bands from the user (``b11,b10``, ``7:6``...), returned in the paper's column order."""
    bands = parse_list(text, PAPER_BAND_ORDER, option, BAND_ALIASES)
    return None if bands is None else [b for b in PAPER_BAND_ORDER if b in bands]


TrainCell = Callable[[Axis, Axis, Any, int, Path], dict]
"""``train(row, column, split, index, split_dir) -> record``: trains one cell on one split."""


def run_grid(
    store: CellStore,
    rows: Sequence[Axis],
    columns: Sequence[Axis],
    splits: Sequence[Any],
    train: TrainCell,
    *,
    cells: Iterable[tuple[Axis, Axis]] | None = None,
    on_cell: Callable[[dict[tuple[str, str], list[dict]]], None] | None = None,
    log: Log = print,
) -> dict[tuple[str, str], list[dict]]:
    """Train every (row, column) cell on every split, skipping those the store has finished.

    Args:
        store: Where finished cells are recorded (and found again on ``--resume``).
        rows, columns: The table's axes.
        splits: The stratified splits.
        train: Trains one cell on one split and returns its record (``test`` and ``val`` metrics, ...).
        cells: The (row, column) pairs to run, default every pair; others stay empty in the table.
        on_cell: Called with the records so far after each cell and split (e.g. to refresh the report).
        log: Progress lines.

    Returns:
        The records of each (row key, column key), in split order.
    """
    pairs = list(cells) if cells is not None else [(r, c) for r in rows for c in columns]
    total = len(pairs) * len(splits)
    records: dict[tuple[str, str], list[dict]] = {(r.key, c.key): [] for r, c in pairs}
    done = 0
    for row, column in pairs:
        for index, split in enumerate(splits):
            done += 1
            where = f"[{done}/{total}] {row.label} on {column.label}, split {index}"
            record = store.get(row.key, column.key, index)
            if record is not None:
                log(f"{where}: finished before, skipped")
            else:
                split_dir = store.cell_dir(row.key, column.key, index)
                split_dir.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                result = train(row, column, split, index, split_dir)
                result["seconds"] = time.perf_counter() - t0
                if result.get("checkpoint"):
                    result["checkpoint"] = _relative(result["checkpoint"], store.out)
                record = store.put(row.key, column.key, index, result)
                log(f"{where}: test accuracy {_pct(record['test']['accuracy'])} %, cement recall "
                    f"{_pct(record['test']['cement_recall'])} % ({record['seconds']:.1f} s)")  # fmt: skip
            records[(row.key, column.key)].append(record)
            if on_cell is not None:
                on_cell(records)
    return records


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def cell_summary(records: Sequence[dict]) -> dict[str, Any]:
    """Mean and std over splits of each test metric, and the confusion matrix summed over splits."""
    tests = [r["test"] for r in records]
    cm = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    for t in tests:
        cm += np.asarray(t["confusion_matrix"], dtype=np.int64)
    return {"splits": len(tests), "metrics": summarise(tests, SUMMARY_KEYS), "confusion_matrix": cm.tolist()}


def assemble(
    experiment: str,
    title: str,
    settings: ExperimentSettings,
    data: ExperimentData,
    rows: Sequence[Axis],
    columns: Sequence[Axis],
    records: Mapping[tuple[str, str], list[dict]],
    *,
    paper: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The experiment's result: every figure of every cell and split, summaries, axes and settings (JSON-ready)."""
    cells = []
    for row in rows:
        for column in columns:
            recs = records.get((row.key, column.key))
            if recs:
                cells.append({"row": row.key, "column": column.key, "summary": cell_summary(recs), "splits": recs})
    result = {
        "experiment": experiment,
        "title": title,
        "classes": list(CLASSES),
        "sites": data.counts,
        "dataset_identity": data.identity,
        "settings": settings.as_dict(),
        "rows": [dataclasses.asdict(r) for r in rows],
        "columns": [dataclasses.asdict(c) for c in columns],
        "cells": cells,
        "paper": dict(paper or {}),
        "notes": list(notes),
    }
    result.update(extra or {})
    return result


__all__ = [
    "Axis", "BAND_LABELS", "ExperimentData", "ExperimentSettings", "PAPER_BAND_ORDER", "QUICK", "assemble",
    "cell_summary", "load_data", "parse_bands", "parse_list", "run_grid",
]  # fmt: skip
