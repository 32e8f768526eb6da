"""Finished cells of an experiment, recorded atomically so that ``--resume`` can skip them.

An experiment is a grid of cells, one per (row, column, split): a model (or model variant) on an input, trained on
one stratified split. When a cell finishes, its record (metrics, best epoch, history, checkpoint path) is written
to ``<out>/cells/<row>/<column>/split_<k>/record.json`` through a temporary file and a rename, so a record either
exists whole or not at all. A run that is interrupted leaves every finished cell recorded; a cell that was
training when it stopped has no record and is trained again from its start.

``<out>/experiment.json`` holds the experiment's name and the *fingerprint* of everything that decides a cell's
result: the dataset (its sites and labels), the split seed and fractions, the training settings. Resuming with
another fingerprint would mix incomparable cells, so :class:`CellStore` refuses it and names what differs. The
number of splits, the rows and the columns are not part of the fingerprint: split ``k`` is drawn from seed
``seed + k`` whatever their number, so a resumed run may add splits, models or bands to a finished grid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

from fusionkern.errors import ConfigError
from fusionkern.files import write_text_atomic

MANIFEST = "experiment.json"
CELLS_DIR = "cells"
RECORD = "record.json"
FORMAT = "fusionkern-experiment"
VERSION = 1

_SAFE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


def to_json(value: Any) -> str:
    """JSON text of ``value``; NaN stays ``NaN`` (Python's json reads it back), numpy scalars become numbers."""
    return json.dumps(value, indent=2, default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "size", None) == 1:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class CellStore:
    """The finished cells of one experiment in ``out``.

    Args:
        out: The experiment's output folder.
        experiment: The experiment's name (``ablation``, ``fusion``, ``baselines``).
        fingerprint: Everything that decides a cell's result; plain JSON values.
        resume: Continue the experiment recorded in ``out``: its fingerprint must equal ``fingerprint``.
        overwrite: Delete the cells and manifest a previous run left in ``out`` and start over.

    Raises:
        ConfigError: ``out`` holds finished cells and neither ``resume`` nor ``overwrite`` is given; or
            ``resume`` is given and ``out`` holds another experiment or one with other settings.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        experiment: str,
        fingerprint: Mapping[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
    ):
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; give one of them")
        self.out = Path(out)
        self.experiment = experiment
        self.fingerprint = json.loads(to_json(dict(fingerprint)))  # normalised: tuples -> lists, numpy -> numbers
        manifest = self.out / MANIFEST
        previous = self._read_manifest(manifest)
        finished = sum(1 for _ in self._record_paths())
        if overwrite:
            shutil.rmtree(self.out / CELLS_DIR, ignore_errors=True)
            manifest.unlink(missing_ok=True)
        elif resume:
            if previous is not None:
                self._check_same(previous, manifest)
        elif finished or previous is not None:
            raise ConfigError(
                f"{self.out} already holds {finished} finished cell(s) of a previous experiment; pass --resume to "
                "continue it, --overwrite to start over, or choose another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(manifest, to_json({"format": FORMAT, "version": VERSION, "experiment": experiment,
                                        "fingerprint": self.fingerprint}))  # fmt: skip

    @staticmethod
    def _read_manifest(path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{path} is not a readable experiment manifest ({exc}); use --overwrite or another --out"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a fusionkern experiment manifest; use another --out")
        return data

    def _check_same(self, previous: dict, manifest: Path) -> None:
        if previous.get("experiment") != self.experiment:
            raise ConfigError(
                f"{manifest} records a '{previous.get('experiment')}' experiment, not '{self.experiment}'; "
                "choose another --out"
            )
        old, new = previous.get("fingerprint", {}), self.fingerprint
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            shown = "; ".join(f"{k}: {_short(old.get(k))} then, {_short(new.get(k))} now" for k in differ[:4])
            raise ConfigError(
                f"cannot resume {self.out}: its cells were trained with other settings ({shown}); "
                "use the same settings, --overwrite, or another --out"
            )

    def cell_dir(self, row: str, column: str, split: int) -> Path:
        """The folder of one cell (its checkpoint and record live there)."""
        for what, name in (("row", row), ("column", column)):
            if not _SAFE.match(name):
                raise ValueError(f"cell {what} name {name!r} must be lower-case letters, digits, '_', '-' or '.'")
        return self.out / CELLS_DIR / row / column / f"split_{int(split)}"

    def get(self, row: str, column: str, split: int) -> dict | None:
        """The record of a finished cell, or None when it has not finished (or its record is unreadable)."""
        path = self.cell_dir(row, column, split) / RECORD
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a damaged record counts as unfinished: the cell is trained again
        return record if isinstance(record, dict) and record.get("split") == int(split) else None

    def put(self, row: str, column: str, split: int, record: Mapping[str, Any]) -> dict:
        """Record a finished cell atomically; returns the record as stored."""
        record = dict(record, row=row, column=column, split=int(split))
        write_text_atomic(self.cell_dir(row, column, split) / RECORD, to_json(record))
        return json.loads(to_json(record))

    def _record_paths(self) -> Iterator[Path]:
        root = self.out / CELLS_DIR
        return root.glob(f"*/*/split_*/{RECORD}") if root.is_dir() else iter(())


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["CellStore", "to_json"]
