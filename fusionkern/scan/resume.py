"""Finished tiles on disk, so that a killed scan resumes where it stopped.

``<out>/.tiles/`` holds ``params.json`` (everything that decides a tile's scores: inputs, checkpoint, backend,
grid, chips, tiling, threshold) and one ``<tile>.npz`` per finished tile (its scores and skip reasons). Each file is
written to a temporary name in the same folder and renamed, so a record is either complete or absent. A resumed
scan must have the same parameters; it then skips the recorded tiles and its outputs equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fusionkern.errors import ConfigError
from fusionkern.files import write_bytes_atomic
from fusionkern.scan.tiles import Tile

TILES_DIR = ".tiles"
PARAMS = "params.json"
FORMAT = "fusionkern-scan-tiles"
VERSION = 1


def _differences(old: Any, new: Any, where: str = "") -> Iterator[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
    elif old != new:
        yield where or "parameters"


class TileStore:
    """The tile records of one scan output folder.

    Args:
        out: The scan's output folder.
        params: The scan's parameters (plain JSON values).
    """

    def __init__(self, out: Path, params: dict[str, Any]):
        self.folder = Path(out) / TILES_DIR
        self.params = json.loads(json.dumps(params))  # normalised as JSON reads it back

    def exists(self) -> bool:
        """Whether a previous scan left records here."""
        return self.folder.is_dir()

    def start(self, resume: bool) -> None:
        """Opens the store: a fresh one, or (``resume``) the previous one after checking its parameters.

        Raises:
            ConfigError: ``resume`` with records of a scan with other parameters (the message names them).
        """
        if resume and (self.folder / PARAMS).is_file():
            self._check_params()
            return
        self.clear()
        created_out = not self.folder.parent.exists()
        self.folder.mkdir(parents=True)
        payload = {"format": FORMAT, "version": VERSION, "params": self.params}
        try:
            write_bytes_atomic(self.folder / PARAMS, (json.dumps(payload, indent=1) + "\n").encode())
        except BaseException:  # e.g. a full disk: no record of a scan that never started
            self.clear()
            if created_out:
                self.folder.parent.rmdir()
            raise

    def _check_params(self) -> None:
        try:
            stored = json.loads((self.folder / PARAMS).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"cannot resume: {self.folder / PARAMS} is unreadable ({exc}); rerun without --resume"
            ) from None
        if stored.get("format") != FORMAT or stored.get("version") != VERSION:
            raise ConfigError(f"cannot resume: {self.folder} was written by another version; rerun without --resume")
        changed = list(_differences(stored.get("params"), self.params))
        if changed:
            raise ConfigError(
                f"cannot resume the scan in {self.folder.parent}: it was started with other {', '.join(changed[:5])}; "
                "rerun with the same inputs and options, or without --resume to start over"
            )

    def clear(self) -> None:
        """Removes every record."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def path(self, tile: Tile) -> Path:
        """The record of a tile."""
        return self.folder / f"{tile.key}.npz"

    def save(self, tile: Tile, scores: np.ndarray, reasons: np.ndarray) -> None:
        """Records a finished tile atomically."""
        import io

        buffer = io.BytesIO()
        np.savez(buffer, scores=scores, reasons=reasons, shape=np.array([tile.rows, tile.cols]))
        write_bytes_atomic(self.path(tile), buffer.getvalue())

    def load(self, tile: Tile) -> tuple[np.ndarray, np.ndarray] | None:
        """A tile's recorded scores and reasons, or None when it has no complete record."""
        path = self.path(tile)
        if not path.is_file():
            return None
        try:
            with np.load(path) as record:
                scores, reasons, shape = record["scores"], record["reasons"], tuple(record["shape"])
        except (OSError, ValueError, KeyError):
            return None
        if shape != (tile.rows, tile.cols) or scores.shape != shape or reasons.shape != shape:
            return None
        return scores, reasons
