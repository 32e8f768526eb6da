"""The raw-read baseline of the scan: the tile windows the scan reads, read with plain rasterio and nothing else.

The scan's input side (:func:`fusionkern.scan.engine.time_io`) reads each tile window of the 12 rasters, converts
it to float32, calibrates it, builds the nodata, cloud and outside masks, cuts the chips and scales them. This
module reads the same windows of the same rasters (same manifest, grid, chip layout and tiles, laid out through the
scanner's own public functions) with ``DatasetReader.read(1, window=...)`` in the stored dtype, with as many threads
as the scan's reader threads, each holding its own open rasters, and does nothing with the pixels. Its chips/s is
how fast the scan's input side could go if everything after decoding cost nothing; the scan's input side over it
says what that work costs, and end to end over the smaller of inference alone and raw reads says how close the
scan comes to its limit.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusionkern.errors import InputError
from fusionkern.readers import INPUT_BANDS, _raster_errors
from fusionkern.scan.grid import ChipLayout, ScanGrid, _grid_offset, chip_layout, make_grid
from fusionkern.scan.inputs import load_inputs
from fusionkern.scan.tiles import Tile, plan_tiles, tile_chips_for


@dataclass(frozen=True)
class ScanTiles:
    """The rasters, grid, chips and tiles of a scan of a manifest, as the scan's timing helpers lay them out.

    Attributes:
        rasters: The band rasters in branch and date order (12: four bands, three dates).
        grid: The scan grid (the first raster's).
        layout: The chips on it.
        tiles: The tiles covering the layout.
    """

    rasters: list[str]
    grid: ScanGrid
    layout: ChipLayout
    tiles: list[Tile]


def scan_tiles(manifest: str | Path, chip_m: float, tile_px: int, stride_m: float | None = None) -> ScanTiles:
    """What :func:`fusionkern.scan.engine.time_io` reads for a manifest (uncalibrated inputs, the first raster's
    grid, tiles of about ``tile_px`` pixels).

    Args:
        manifest: A manifest (e.g. from :func:`fusionkern.scan.engine.make_benchmark_region`).
        chip_m: Chip side in metres.
        tile_px: Tile window side in pixels.
        stride_m: Stride in metres (None: half a chip).
    """
    inputs = load_inputs(manifest=manifest, calibrate=False)
    grid = make_grid(inputs.reference)
    layout = chip_layout(grid, chip_m, stride_m)
    tiles = plan_tiles(layout, tile_chips_for(layout, tile_px))
    return ScanTiles([r.path for branch in INPUT_BANDS for r in inputs.bands[branch]], grid, layout, tiles)


def _inside(span: tuple[int, int], start: int, count: int, layout: ChipLayout) -> int:
    """How many of ``count`` chips from chip index ``start`` along one axis lie wholly in grid pixels ``span``."""
    lo, hi = span
    first = max(start, -(-lo // layout.stride_px))
    last = min(start + count - 1, (hi - layout.chip_px) // layout.stride_px)
    return max(0, last - first + 1)


class _Reader:
    """The rasters open in one thread: reads grid windows clipped to each raster, in the stored dtype.

    Raises:
        InputError: A raster cannot be opened, or is not on the grid (it would need the scan's warping).
    """

    def __init__(self, rasters: list[str], grid: ScanGrid):
        import rasterio

        self.datasets: list[Any] = []
        self.offsets: list[tuple[int, int]] = []
        try:
            for path in rasters:
                with _raster_errors(path, "open"):
                    ds = rasterio.open(path)
                self.datasets.append(ds)
                offset = _grid_offset(ds, grid)
                if offset is None:
                    raise InputError(f"raster {path} is not on the grid of {rasters[0]}: raw reads do not warp")
                self.offsets.append(offset)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ds in self.datasets:
            ds.close()

    def extent(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Grid pixel rows and columns ``(start, stop)`` that every raster covers."""
        rows, cols = (-(2**62), 2**62), (-(2**62), 2**62)
        for ds, (d_row, d_col) in zip(self.datasets, self.offsets):
            rows = (max(rows[0], -d_row), min(rows[1], ds.height - d_row))
            cols = (max(cols[0], -d_col), min(cols[1], ds.width - d_col))
        return rows, cols

    def read(self, top: int, left: int, height: int, width: int) -> int:
        """Reads the window of every raster; returns the bytes read."""
        from rasterio.windows import Window

        nbytes = 0
        for ds, (d_row, d_col) in zip(self.datasets, self.offsets):
            r0, c0 = max(top + d_row, 0), max(left + d_col, 0)
            r1, c1 = min(top + d_row + height, ds.height), min(left + d_col + width, ds.width)
            if r1 > r0 and c1 > c0:
                with _raster_errors(ds.name):
                    nbytes += ds.read(1, window=Window(c0, r0, c1 - c0, r1 - r0)).nbytes
        return nbytes


def time_raw_reads(
    manifest: str | Path,
    chip_m: float = 1050.0,
    tile_px: int = 1024,
    stride_m: float | None = None,
    workers: int = 2,
) -> dict[str, float]:
    """Reads every tile window of the scan's 12 rasters with plain rasterio: the scan's input side at no cost
    beyond decoding.

    Args:
        manifest: A manifest whose rasters lie on the first raster's grid (as the generated region's do).
        chip_m: Chip side in metres.
        tile_px: Tile window side in pixels.
        stride_m: Stride in metres (None: half a chip).
        workers: Threads, each with its own open rasters, taking tiles from one queue (the scan's reader threads).

    Returns:
        ``{"chips", "tiles", "bytes", "seconds", "chips_per_s"}``: ``chips`` counts the tiles' chips that lie
        wholly inside every raster (on a region without nodata or clouds, the chips the scan scores); ``seconds``
        runs from opening the rasters to the last window read, as the scan's timing helpers count theirs.

    Raises:
        InputError: A raster is not on the grid of the first one (it would need the scan's warping) or cannot be
            opened or read (the message names it).
    """
    setup = scan_tiles(manifest, chip_m, tile_px, stride_m)
    todo: queue.SimpleQueue[Tile] = queue.SimpleQueue()
    for tile in setup.tiles:
        todo.put(tile)
    failed = threading.Event()

    def work() -> tuple[int, tuple[tuple[int, int], tuple[int, int]]]:
        nbytes = 0
        reader = _Reader(setup.rasters, setup.grid)
        try:
            while not failed.is_set():
                try:
                    tile = todo.get_nowait()
                except queue.Empty:
                    break
                nbytes += reader.read(*tile.window(setup.layout))
            return nbytes, reader.extent()
        except BaseException:
            failed.set()  # the other threads stop after their current tile
            raise
        finally:
            reader.close()

    n_threads = max(1, min(int(workers), len(setup.tiles)))
    start = time.perf_counter()
    with ThreadPoolExecutor(n_threads, thread_name_prefix="raw-read") as pool:
        done = [f.result() for f in [pool.submit(work) for _ in range(n_threads)]]
    seconds = time.perf_counter() - start
    rows, cols = done[0][1]
    chips = sum(_inside(rows, t.row0, t.rows, setup.layout) * _inside(cols, t.col0, t.cols, setup.layout)
                for t in setup.tiles)  # fmt: skip
    return {
        "chips": chips,
        "tiles": len(setup.tiles),
        "bytes": sum(nbytes for nbytes, _ in done),
        "seconds": seconds,
        "chips_per_s": chips / max(seconds, 1e-9),
    }
