"""Hard negatives and background chips mined from a region with the scanner (``fusionkern mine``).

A region holds about a thousand landcover chips per plant chip, and the ones a model gets wrong are not the ones a
training set samples around plants. Mining scans a region with a checkpoint (:func:`fusionkern.scan.run_scan`,
the same chips, scaling and masking as any scan), keeps the highest-scoring chips farther than ``exclude_m`` from
every known plant (the hard negatives), optionally adds random background chips of the same region, and writes
them as landcover sites of the site layout, with context around each chip as ``fusionkern chips --context-px``
cuts it. ``fusionkern train --data TRAIN MINED...`` then trains on both.

Output::

    <out>/
      landcover/<site>/b10.tif b11.tif b7.tif b6.tif b76.tif provenance.json
      sites.csv          site,label,lon,lat
      mined.csv          site,kind,round,score,row,col,top,left,size_px,lon,lat (kind: hard | random)
      _scan/             the scan the chips were chosen from (scores.tif, scan.json, ...)

The folder is built beside ``out`` and renamed when complete: a failed run leaves nothing that looks finished.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fusionkern import BRANCHES
from fusionkern.data.chips import SITES_COLUMNS, Plant, write_site_files
from fusionkern.errors import ConfigError, InputError

SCAN_DIR = "_scan"
MINED_CSV = "mined.csv"
_KNOWN = {"sites.csv", MINED_CSV, SCAN_DIR, "landcover"}


@dataclass
class MineOptions:
    """What ``fusionkern mine`` takes.

    Attributes:
        checkpoint: The checkpoint to mine with.
        out: Dataset folder to create.
        plants: Known plants (nothing is mined within ``exclude_m`` of them).
        scenes: Three scene folders (or ``manifest``).
        manifest: A manifest of the rasters (or ``scenes``).
        top: Hard negatives to keep (highest scores first).
        random: Random background chips to add.
        exclude_m: Smallest distance, metres, from a kept chip (with its context) to a known plant.
        round: Mining round recorded with every chip.
        context_px: Context kept around every chip, pixels.
        min_gap_cells: Fewest stride cells between two kept chips (2: they barely overlap).
        seed: Seed of the random chips.
        scan: Extra :class:`~fusionkern.scan.ScanOptions` values (batch size, workers, device, backend...).
        overwrite: Replace an existing mined folder.
        progress: Show the scan's progress bar.
    """

    checkpoint: str
    out: str
    plants: Sequence[Plant]
    scenes: Sequence[str] | None = None
    manifest: str | None = None
    top: int = 200
    random: int = 0
    exclude_m: float = 2000.0
    round: int = 1
    context_px: int = 9
    min_gap_cells: int = 2
    seed: int = 0
    scan: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raises ConfigError on values that cannot work."""
        if self.top < 0 or self.random < 0 or self.top + self.random < 1:
            raise ConfigError(f"--top and --random must be >= 0 and ask for one chip at least, got {self.top}, "
                              f"{self.random}")  # fmt: skip
        if not (self.exclude_m > 0 and math.isfinite(self.exclude_m)):
            raise ConfigError(f"--exclude-m must be a positive distance in metres, got {self.exclude_m}")
        if self.context_px < 0:
            raise ConfigError(f"--context-px must be >= 0, got {self.context_px}")
        if self.min_gap_cells < 1:
            raise ConfigError(f"the gap between mined chips must be at least one stride cell, got {self.min_gap_cells}")
        if not self.plants:
            raise InputError("no known plant given: mining needs them to keep its chips away from plants")


@dataclass
class MineReport:
    """What was mined.

    Attributes:
        out: The dataset folder.
        hard: Hard negatives written.
        random: Random chips written.
        plants_in_region: Known plants inside the scanned region.
        eligible: Scored chips far enough from every plant.
        skipped: Chips passed over because their context held nodata or cloud, or left the region.
        top_scores: The highest score kept and the lowest hard-negative score kept.
    """

    out: Path
    hard: int = 0
    random: int = 0
    plants_in_region: int = 0
    eligible: int = 0
    skipped: int = 0
    top_scores: tuple[float, float] | None = None

    def lines(self) -> list[str]:
        """A short summary."""
        scores = ""
        if self.top_scores:
            scores = f" (hard-negative scores {self.top_scores[0]:.3g} down to {self.top_scores[1]:.3g})"
        return [
            f"mined {self.hard} hard negative(s){scores} and {self.random} random background chip(s) from "
            f"{self.eligible} eligible chips; {self.plants_in_region} known plant(s) in the region kept out; "
            f"{self.skipped} chip(s) passed over (nodata, cloud or edge)",
            f"landcover sites written to {self.out}; train on them with: fusionkern train --data TRAIN {self.out}",
        ]


def plant_pixels(plants: Sequence[Plant], grid: Any) -> np.ndarray:
    """(n, 2) float (row, col) grid pixel positions of plants (pixel centres at .5)."""
    from rasterio.warp import transform

    if not plants:
        return np.zeros((0, 2))
    xs, ys = transform("EPSG:4326", grid.crs, [p.lon for p in plants], [p.lat for p in plants])
    cols, rows = ~grid.affine * (np.asarray(xs), np.asarray(ys))
    return np.column_stack([rows, cols])


def near_plants(pixels: np.ndarray, layout: Any, grid: Any, distance_m: float, pad_px: int = 0) -> np.ndarray:
    """(rows, cols) bool: chips (grown by ``pad_px`` on every side) that come within ``distance_m`` of a plant.

    The distance is from the plant to the nearest point of the chip's square, so a chip marked False lies wholly
    farther than ``distance_m``.
    """
    metres = grid.res * grid.metres_per_unit
    near = np.zeros((layout.n_rows, layout.n_cols), dtype=bool)
    s, c = layout.stride_px, layout.chip_px
    reach_px = distance_m / metres + c / 2.0 + pad_px
    for row, col in pixels:
        r0 = max(int(math.floor((row - reach_px - c / 2.0) / s)), 0)
        r1 = min(int(math.ceil((row + reach_px) / s)) + 1, layout.n_rows)
        c0 = max(int(math.floor((col - reach_px - c / 2.0) / s)), 0)
        c1 = min(int(math.ceil((col + reach_px) / s)) + 1, layout.n_cols)
        if r0 >= r1 or c0 >= c1:
            continue
        rows = np.arange(r0, r1)[:, None]
        cols = np.arange(c0, c1)[None, :]
        top, left = rows * s - pad_px, cols * s - pad_px  # chip square grown by the padding
        bottom, right = top + c + 2 * pad_px, left + c + 2 * pad_px
        dy = np.maximum(np.maximum(top - row, row - bottom), 0.0)
        dx = np.maximum(np.maximum(left - col, col - right), 0.0)
        near[r0:r1, c0:c1] |= np.hypot(dy, dx) * metres <= distance_m
    return near


def pick_hard(scores: np.ndarray, eligible: np.ndarray, n: int, gap: int) -> list[tuple[int, int]]:
    """Up to ``n`` eligible cells by descending score, no two closer than ``gap`` cells (Chebyshev)."""
    cells = np.argwhere(eligible)
    if not len(cells) or n < 1:
        return []
    values = scores[cells[:, 0], cells[:, 1]]
    order = np.lexsort((np.arange(len(cells)), -values))
    taken = np.zeros_like(eligible)
    picked = []
    for k in order:
        r, c = (int(v) for v in cells[k])
        if taken[max(r - gap + 1, 0) : r + gap, max(c - gap + 1, 0) : c + gap].any():
            continue
        picked.append((r, c))
        taken[r, c] = True
        if len(picked) == n:
            break
    return picked


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise InputError(f"output folder {out} is not empty; pass --overwrite to replace it")
    foreign = [name for name in entries if name not in _KNOWN]
    if foreign:
        raise InputError(f"output folder {out} does not look like a mined dataset (it holds "
                         f"{', '.join(foreign[:5])}); refusing to delete it")  # fmt: skip


def mine(options: MineOptions, log: Callable[[str], None] = lambda line: None) -> MineReport:
    """Scans a region and writes its hard negatives (and random background) as landcover sites.

    Args:
        options: What to mine and where.
        log: Receives progress lines.

    Returns:
        What was written.

    Raises:
        ConfigError: Invalid options.
        InputError: No known plant inside the region, nothing eligible, or an output folder in the way; and
            whatever the scan raises on its inputs.
    """
    from fusionkern.files import check_writable, folder_built_aside, output_errors
    from fusionkern.scan import ScanOptions, run_scan

    options.validate()
    out = Path(options.out)
    _check_out(out, options.overwrite)
    check_writable(out, "--out")
    with output_errors(out), folder_built_aside(out) as partial:
        scan_options = ScanOptions(
            checkpoint=options.checkpoint, out=str(partial / SCAN_DIR), scenes=options.scenes,
            manifest=options.manifest, quicklook=False, checksums=False, progress=options.progress,
            **options.scan,
        )  # fmt: skip
        result = run_scan(scan_options, log=log)
        report = _mine_from(result, options, partial)
    report.out = out
    return report


def _mine_from(result: Any, options: MineOptions, root: Path) -> MineReport:
    """Chooses the chips on a finished scan and writes them under ``root``."""
    from rasterio.warp import transform

    from fusionkern.scan.tiles import StackReader

    grid, layout, scores = result.grid, result.layout, result.raw_scores
    pixels = plant_pixels(options.plants, grid)
    inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < grid.height) & (pixels[:, 1] >= 0) & (pixels[:, 1] < grid.width)
    report = MineReport(root, plants_in_region=int(inside.sum()))
    if not inside.any():
        raise InputError(
            f"none of the {len(options.plants)} known plant(s) lies in the scanned region: mining needs the plants "
            "of the region it mines (check --plants, its lon/lat order, and the scenes)"
        )
    ctx, size = options.context_px, layout.chip_px + 2 * options.context_px
    rows, cols = np.mgrid[0 : layout.n_rows, 0 : layout.n_cols]
    tops, lefts = rows * layout.stride_px - ctx, cols * layout.stride_px - ctx
    fits = (tops >= 0) & (lefts >= 0) & (tops + size <= grid.height) & (lefts + size <= grid.width)
    eligible = np.isfinite(scores) & fits & ~near_plants(pixels, layout, grid, options.exclude_m, ctx)
    report.eligible = int(eligible.sum())
    if not report.eligible:
        raise InputError(f"no chip of the region lies farther than {options.exclude_m:g} m from every known plant "
                         "with its context inside the rasters: lower --exclude-m or mine a larger region")  # fmt: skip
    want = [("hard", cell) for cell in pick_hard(scores, eligible, options.top * 2, options.min_gap_cells)]
    if options.random:
        rest = eligible.copy()
        for _, (r, c) in want:
            rest[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = False
        cells = np.argwhere(rest)
        rng = np.random.default_rng(options.seed)
        chosen = cells[rng.permutation(len(cells))[: options.random * 2]]
        want += [("random", (int(r), int(c))) for r, c in chosen]
    inputs = result.inputs
    dates = tuple(r.label or Path(r.path).name for r in inputs.bands["b7"])
    descriptions = {b: dates for b in BRANCHES}
    records = []
    counts = {"hard": 0, "random": 0}
    limits = {"hard": options.top, "random": options.random}
    with StackReader(inputs, grid, layout) as reader:
        for kind, (r, c) in want:
            if counts[kind] >= limits[kind]:
                continue
            top, left = int(tops[r, c]), int(lefts[r, c])
            data = reader.read(top, left, size, size)
            if data.nodata.any() or data.cloud.any():
                report.skipped += 1
                continue
            counts[kind] += 1
            name = f"mined_r{options.round}_{kind}_{counts[kind]:05d}"
            xs, ys = layout.chip_centres(grid, np.array([r]), np.array([c]))
            (lon,), (lat,) = transform(grid.crs, "EPSG:4326", [float(xs[0])], [float(ys[0])])
            record = {"site": name, "kind": kind, "round": options.round, "score": float(scores[r, c]),
                      "row": r, "col": c, "top": top, "left": left, "size_px": size, "context_px": ctx,
                      "lon": round(float(lon), 7), "lat": round(float(lat), 7)}  # fmt: skip
            chips = {branch: data.stack[i] for i, branch in enumerate(BRANCHES)}
            write_site_files(root / "landcover" / name, chips, grid.crs, grid.affine * _translation(left, top),
                             descriptions, {"site": name, "label": "landcover", "kind": kind,
                                            "round": options.round, "context_px": ctx})  # fmt: skip
            provenance = {
                **record, "checkpoint": str(options.checkpoint), "checkpoint_sha256": result.report["checkpoint"]["sha256"],
                "rasters": {b: [str(r.path) for r in inputs.bands[b]] for b in inputs.bands},
                "window": {"top": top, "left": left, "height": size, "width": size, "grid": grid.describe()},
            }  # fmt: skip
            (root / "landcover" / name / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
            records.append(record)
    report.hard, report.random = counts["hard"], counts["random"]
    if not records:
        raise InputError("every chosen chip held nodata or cloud in its context: nothing could be mined")
    hard_scores = [r["score"] for r in records if r["kind"] == "hard"]
    report.top_scores = (max(hard_scores), min(hard_scores)) if hard_scores else None
    _write_tables(root, records)
    return report


def _translation(col: int, row: int) -> Any:
    from affine import Affine

    return Affine.translation(col, row)


def _write_tables(root: Path, records: list[dict[str, Any]]) -> None:
    with (root / "sites.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SITES_COLUMNS)
        for r in records:
            writer.writerow([r["site"], "landcover", f"{r['lon']:.6f}", f"{r['lat']:.6f}"])
    columns = ["site", "kind", "round", "score", "row", "col", "top", "left", "size_px", "lon", "lat"]
    with (root / MINED_CSV).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
