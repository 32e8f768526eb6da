"""``fusionkern scan --plan``: what a scan would cost, said before a pixel of the region is read.

The plan places the region as the scan does (:func:`place_region`, which :func:`fusionkern.scan.run.run_scan` calls
too): the same grid, chips and tiles. From the rasters' headers it counts what the scan would read: per raster, the
pixels of every tile window that fall on it (a warped raster: the windows' area in its own pixels, an estimate)
times the size of its stored data type, and the compressed bytes behind them, estimated from the file's size over
every pixel it stores (overviews included). The nodata share comes from each band raster's smallest overview, never
from full resolution: the share of the scan grid where the band holds no data or does not reach, and where some
band does (a chip there is skipped). Rasters without overviews leave it unknown.

The time is the chips over the scan group's end-to-end chips/s in the newest ``fusionkern bench`` record
(``benchmarks/results/*/bench.json``) of this machine's CPU model or GPU name, with the backend, preset and width
asked for. Where no record matches, the plan says so and gives no time.

The checkpoint is read for its description only (``torch.load(weights_only=True)``, its tensors mapped, never put
into a model). The plan writes ``plan.json`` into the output folder, atomically, and nothing else.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from fusionkern import BRANCHES, __version__, landsat
from fusionkern.errors import CheckpointError, ConfigError, InputError
from fusionkern.files import write_text_atomic
from fusionkern.readers import _raster_errors, _rasterio, calibration_of, is_gdal_path
from fusionkern.scan.grid import (
    ChipLayout,
    ScanGrid,
    aligned_block,
    chip_layout,
    footprint_overlaps,
    make_grid,
    on_grid,
    stride_note,
)
from fusionkern.scan.inputs import ScanInputs, load_inputs
from fusionkern.scan.tiles import Tile, plan_tiles, tile_chips_for

if TYPE_CHECKING:
    from fusionkern.scan.run import ScanOptions

PLAN_JSON = "plan.json"
PLAN_FORMAT = "fusionkern-scan-plan/1"
NODATA_GRID_SIDE = 512
"""Longest side of the coarse copy of the scan grid that the overviews' nodata masks are compared on."""
_EDGE_TOLERANCE_PX = 1e-6


# --------------------------------------------------------------------------------------------------------------
# The region, as the scan lays it out
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Region:
    """The rasters, the grid, the chips and the tiles of a scan.

    Attributes:
        inputs: The rasters.
        grid: The scan grid.
        layout: The chips on it.
        tile_chips: Chips per tile side.
        tiles: The tiles, row by row.
    """

    inputs: ScanInputs
    grid: ScanGrid
    layout: ChipLayout
    tile_chips: int
    tiles: list[Tile]


def check_overlap(inputs: ScanInputs, grid: ScanGrid) -> None:
    """Raises InputError naming the first raster whose footprint misses the grid."""
    for path in inputs.rasters():
        if not footprint_overlaps(path, grid):
            west, south, east, north = grid.bounds
            raise InputError(
                f"{path} does not overlap the scan region ({west:.0f}, {south:.0f}, {east:.0f}, {north:.0f} in "
                f"{grid.describe()['crs']}): check --bounds and the inputs"
            )


def place_region(options: ScanOptions, chip_m: float) -> Region:
    """Finds the inputs and lays the grid, the chips and the tiles on them, reading headers only.

    Args:
        options: The scan's options (inputs, grid, stride, tile size, calibration).
        chip_m: Chip side in metres (the checkpoint's).

    Raises:
        InputError: A missing or unsuitable input, or one that does not overlap the region.
        ConfigError: An invalid grid or stride option.
    """
    inputs = load_inputs(options.scenes, options.manifest, options.calibrate)
    grid = make_grid(inputs.reference, options.crs, options.resolution, options.bounds, options.bounds_crs)
    check_overlap(inputs, grid)
    layout = chip_layout(grid, chip_m, options.stride_m)
    tile_chips = tile_chips_for(layout, options.tile_px, aligned_block(inputs.reference, grid))
    return Region(inputs, grid, layout, tile_chips, plan_tiles(layout, tile_chips))


# --------------------------------------------------------------------------------------------------------------
# The checkpoint's description
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What the plan needs of the model: its chip size, and what the benchmark records are matched on.

    Attributes:
        path: The checkpoint, or the exported model.
        preset: The model's preset.
        width: Its width multiplier (None where not recorded).
        chip_px: Chip side in pixels at ``resolution_m``.
        resolution_m: Pixel size the chips were cut at, metres.
    """

    path: str
    preset: str
    width: float | None
    chip_px: int
    resolution_m: float

    @property
    def chip_m(self) -> float:
        """Chip side in metres."""
        return self.chip_px * self.resolution_m


def read_model_spec(path: str | os.PathLike, preset: str | None = None, backend: str | None = None) -> ModelSpec:
    """The description of a FusionNet checkpoint (or of a model ``fusionkern export`` wrote), without its weights.

    Args:
        path: A ``.pt`` checkpoint, or an ``.onnx`` file or engine with its sidecar.
        preset: The preset the scan requires (None: any).
        backend: The backend asked for (an exported model runs only on its own).

    Raises:
        CheckpointError: Not a FusionNet checkpoint, another preset, or chips described otherwise than the scan
            cuts them.
        ConfigError: An exported model given for another backend.
    """
    from fusionkern.models.checkpoint import SCALING, read_checkpoint
    from fusionkern.scan.backends import EXPORTED_SUFFIXES, load_exported

    if Path(path).suffix.lower() in EXPORTED_SUFFIXES:
        exported = load_exported(path, backend)
        config, data = exported.config, exported.checkpoint["data"]
    else:
        payload = read_checkpoint(path, mmap=True)  # weights_only=True; the tensors stay on disk
        model = payload.get("model") or {}
        if model.get("class") != "FusionNet":
            raise CheckpointError(f"{path} holds a {model.get('class')}, expected a FusionNet")
        config, data = model.get("config") or {}, payload.get("data") or {}
    name = str(config.get("preset"))
    problems = [
        (preset is not None and name != preset, f"holds a FusionNet of the '{name}' preset, not '{preset}'"),
        (data.get("scaling") != SCALING, f"was trained on chips scaled by {data.get('scaling')!r}, not {SCALING!r}"),
        (list(data.get("branches") or []) != list(BRANCHES), f"takes branches {data.get('branches')}"),
        (int(data.get("chip_px") or 0) < 1 or float(data.get("resolution_m") or 0) <= 0,
         "does not say its chip size (data.chip_px, data.resolution_m)"),
    ]  # fmt: skip
    for bad, what in problems:
        if bad:
            raise CheckpointError(f"{path} {what}")
    width = config.get("width")
    return ModelSpec(str(path), name, None if width is None else float(width), int(data["chip_px"]),
                     float(data["resolution_m"]))  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Bytes read
# --------------------------------------------------------------------------------------------------------------


def _pixel_box(bounds: Sequence[float], grid: ScanGrid) -> tuple[float, float, float, float]:
    """``(row0, row1, col0, col1)`` of grid-CRS bounds in grid pixels; edges within a hair of a pixel snap to it."""
    a, _, c, _, e, f = grid.transform
    west, south, east, north = bounds
    box = ((f - north) / -e, (f - south) / -e, (west - c) / a, (east - c) / a)
    return tuple(float(round(v)) if abs(v - round(v)) < _EDGE_TOLERANCE_PX else v for v in box)  # type: ignore


def window_pixels(tiles: Sequence[Tile], layout: ChipLayout, box: tuple[float, float, float, float]) -> float:
    """Grid pixels of all tile windows that fall inside ``box`` (``row0, row1, col0, col1``), halos counted in
    every tile that reads them."""
    if not tiles:
        return 0.0
    top, left, height, width = np.array([t.window(layout) for t in tiles], dtype=np.float64).T
    row0, row1, col0, col1 = box
    rows = np.clip(np.minimum(top + height, row1) - np.maximum(top, row0), 0.0, None)
    cols = np.clip(np.minimum(left + width, col1) - np.maximum(left, col0), 0.0, None)
    return float((rows * cols).sum())


def raster_reads(path: str, region: Region) -> dict[str, Any]:
    """What the scan reads from one raster (band 1): pixels, bytes as stored, compressed bytes (estimated).

    Args:
        path: The raster.
        region: The scan's region.

    Returns:
        ``path, dtype, width, height, compression, warped, pixels_read, bytes_read, file_bytes, compressed_bytes``
        (the last two None for a GDAL path) and ``overviews`` (the decimation factors).
    """
    from rasterio.warp import transform_bounds

    rasterio = _rasterio()
    with _raster_errors(path, "open"), rasterio.open(path) as ds:
        dtype = np.dtype(ds.dtypes[0])
        factors = list(ds.overviews(1))
        compression = ds.compression.value.lower() if ds.compression else None
        footprint = transform_bounds(ds.crs, region.grid.crs, *ds.bounds, densify_pts=21)
        width, height, count = ds.width, ds.height, ds.count
    box = _pixel_box(footprint, region.grid)
    warped = not on_grid(path, region.grid)
    # source pixels per grid pixel: 1 on the grid; else the raster's pixels over its footprint's area on the grid
    per_grid_px = (width * height) / max((box[1] - box[0]) * (box[3] - box[2]), 1e-12) if warped else 1.0
    pixels = int(round(window_pixels(region.tiles, region.layout, box) * per_grid_px))
    file_bytes = None if is_gdal_path(path) else os.stat(path).st_size
    stored = count * (width * height + sum(math.ceil(width / f) * math.ceil(height / f) for f in factors))
    return {
        "path": str(path), "dtype": dtype.name, "width": width, "height": height, "compression": compression,
        "warped": warped,
        "overviews": factors, "pixels_read": pixels, "bytes_read": pixels * dtype.itemsize, "file_bytes": file_bytes,
        "compressed_bytes": None if file_bytes is None else int(round(pixels * file_bytes / stored)),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Nodata from overviews
# --------------------------------------------------------------------------------------------------------------


def coarse_grid(grid: ScanGrid, side: int = NODATA_GRID_SIDE) -> tuple[Any, tuple[int, int]]:
    """The scan grid's extent at most ``side`` pixels a side: its transform and ``(rows, cols)``."""
    from affine import Affine

    step = max(1, math.ceil(max(grid.width, grid.height) / side))
    rows, cols = math.ceil(grid.height / step), math.ceil(grid.width / step)
    return grid.affine * Affine.scale(grid.width / cols, grid.height / rows), (rows, cols)


def overview_nodata(path: str, grid: ScanGrid, fill_zero: bool, side: int = NODATA_GRID_SIDE) -> np.ndarray | None:
    """Where a raster holds no data on a coarse copy of the scan grid, from its smallest overview.

    Pixels the raster does not reach count as nodata, as the scan skips chips there. Full resolution is never read.

    Args:
        path: The raster (band 1).
        grid: The scan grid.
        fill_zero: Whether 0 is fill (Landsat DN that the scan calibrates).
        side: Longest side of the coarse grid.

    Returns:
        (rows, cols) bool over :func:`coarse_grid`, True at nodata; None where the raster has no overviews.
    """
    from rasterio.enums import MaskFlags, Resampling
    from rasterio.warp import reproject

    rasterio = _rasterio()
    with _raster_errors(path, "open"), rasterio.open(path) as ds:
        factors = ds.overviews(1)
    if not factors:
        return None
    level = int(np.argmax(factors))  # the smallest overview
    with _raster_errors(path, "read overviews of"), rasterio.open(path, overview_level=level) as ov:
        raw = ov.read(1)
        invalid = landsat.nodata_mask(raw, ov.nodata, fill_zero=fill_zero)
        flags = ov.mask_flag_enums[0]
        if MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
            invalid |= ov.read_masks(1) == 0
        transform, shape = coarse_grid(grid, side)
        outside = 255
        coarse = np.full(shape, outside, dtype=np.uint8)
        reproject(invalid.astype(np.uint8), coarse, src_transform=ov.transform, src_crs=ov.crs, src_nodata=outside,
                  dst_transform=transform, dst_crs=grid.crs, dst_nodata=outside, resampling=Resampling.nearest)
    return coarse != 0


def nodata_shares(region: Region, side: int = NODATA_GRID_SIDE) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Per band raster its nodata share of the grid, and the share where some band has none, from overviews.

    Returns:
        ``({path: share or None}, {"share", "missing_overviews", "method"})``; the union's share is None when a
        band raster has no overviews.
    """
    inputs = region.inputs
    shares: dict[str, float | None] = {}
    union: np.ndarray | None = None
    missing = []
    for rasters in inputs.bands.values():
        for raster in rasters:
            fill_zero = calibration_of(raster.path, raster.mtl, inputs.calibrate) != "stored"
            mask = overview_nodata(raster.path, region.grid, fill_zero, side)
            if mask is None:
                missing.append(raster.path)
                shares[raster.path] = None
                continue
            shares[raster.path] = float(mask.mean())
            union = mask if union is None else union | mask
    share = None if missing or union is None else float(union.mean())
    method = (f"each band's smallest overview, nearest on a {side} px copy of the grid; area outside a raster "
              "counts as nodata; QA flags not included")  # fmt: skip
    return shares, {"share": share, "missing_overviews": missing, "method": method}


# --------------------------------------------------------------------------------------------------------------
# Time, from the benchmark records
# --------------------------------------------------------------------------------------------------------------


def default_results() -> Path:
    """``benchmarks/results`` of the checkout this package is installed from."""
    from fusionkern.bench.runner import default_suite

    return default_suite() / "results"


def this_device(backend: str, device: str) -> tuple[dict[str, str] | None, str]:
    """The device the scan would run on here, ``{"type", "name"}`` (CPU model or GPU name), or None and why."""
    import torch

    from fusionkern.bench.machine import cpu_model
    from fusionkern.devices import resolve_device

    if backend == "onnxruntime":
        return {"type": "cpu", "name": cpu_model()}, ""
    try:
        resolved = resolve_device(device)
    except ConfigError as exc:
        return None, str(exc)
    if resolved.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(resolved)}, ""
    if backend in ("triton", "tensorrt"):
        return None, f"--backend {backend} runs on a CUDA GPU, and this machine has none"
    return {"type": "cpu", "name": cpu_model()}, ""


def _recorded_device(report: dict[str, Any], kind: str) -> str | None:
    """The GPU name (``kind`` cuda) or CPU model a bench record was measured on."""
    machine = report.get("machine") or {}
    if kind == "cuda":
        return (machine.get("gpu") or {}).get("name")
    return (machine.get("cpu") or {}).get("model")


def find_scan_rate(
    results: Path, device: dict[str, str], backend: str, preset: str, width: float | None,
    compression: str | None = None,
) -> tuple[dict[str, Any] | None, list[float]]:  # fmt: skip
    """The newest end-to-end scan rate recorded by ``fusionkern bench`` on this device for a backend and preset.

    Args:
        results: A folder of bench records (``*/bench.json``).
        device: ``{"type": "cpu"|"cuda", "name": CPU model or GPU name}``.
        backend: The scan backend.
        preset: The model's preset.
        width: The model's width (None: any).
        compression: The bench's region compression to match (``uncompressed`` or ``deflate``); rows of records
            that do not say theirs match any.

    Returns:
        The record (folder, date, group, chips/s, machine) or None, and the widths recorded for this device,
        backend and preset where only the width differed.
    """
    from fusionkern.bench.report import SCHEMA, rows_of

    best: dict[str, Any] | None = None
    other_widths: set[float] = set()
    for path in sorted(results.glob("*/bench.json")):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not isinstance(report, dict) or report.get("schema") != SCHEMA:
            continue
        settings = report.get("settings") or {}
        if settings.get("quick") or settings.get("device") != device["type"]:
            continue
        if _recorded_device(report, device["type"]) != device["name"]:
            continue
        for row in rows_of(report):
            if row.case != "scan" or row.variant != "end_to_end" or not (row.timed and row.throughput):
                continue
            if row.get("backend") != backend or row.get("preset") != preset:
                continue
            if compression is not None and row.get("compression") not in (None, compression):
                continue
            if width is not None and row.get("width") is not None and float(row.get("width")) != width:
                other_widths.add(float(row.get("width")))
                continue
            machine = report.get("machine") or {}
            cpu = machine.get("cpu") or {}
            found = {
                "record": str(path.parent), "date": machine.get("date"), "group": row.group, "variant": row.variant,
                "chips_per_s": row.throughput, "device": device["type"], "machine": device["name"],
                "usable_cores": cpu.get("usable_cores"), "threads": settings.get("threads"),
                "width": row.get("width"), "compression": row.get("compression"), "region_px": row.get("region_px"),
                "scan_batch": row.get("scan_batch"),
            }  # fmt: skip
            if best is None or str(found["date"] or "") > str(best["date"] or ""):
                best = found
    return best, sorted(other_widths)


def estimate_time(
    n_chips: int, model: ModelSpec, options: ScanOptions, results: Path | None = None, compressed: bool = False
) -> dict[str, Any]:
    """The scan's time from the benchmark records, or why there is none.

    Args:
        n_chips: Chips of the scan.
        model: The model's description.
        options: The scan's options (backend, device, engine).
        results: Folder of bench records (default: the checkout's ``benchmarks/results``).
        compressed: Whether the inputs are compressed (matched to the bench's DEFLATE region, else to its
            uncompressed one, where a record has both).

    Returns:
        ``{"seconds", "chips_per_s", "record", ...}`` or ``{"seconds": None, "reason"}``.
    """
    if options.engine == "ray":
        return {"seconds": None, "reason": "the bench records time the local engine on one machine; a Ray scan's "
                                           "speed is the cluster's"}  # fmt: skip
    device, why = this_device(options.backend, options.device)
    if device is None:
        return {"seconds": None, "reason": why}
    results = default_results() if results is None else Path(results)
    width = "" if model.width is None else f", width {model.width:g}"
    what = f"scan/{model.preset}/{options.backend} end_to_end{width}"
    compression = "deflate" if compressed else "uncompressed"
    found, widths = find_scan_rate(results, device, options.backend, model.preset, model.width, compression)
    if found is None:
        others = f" (only of width {', '.join(f'{w:g}' for w in widths)})" if widths else ""
        kind = "GPU" if device["type"] == "cuda" else "CPU"
        return {"seconds": None, "reason": f"no fusionkern bench record of {what} on this machine's {kind} "
                f"({device['name']}) in {results}{others}", "device": device}  # fmt: skip
    seconds = n_chips / found["chips_per_s"]
    return {"seconds": round(seconds, 1), "chips_per_s": round(found["chips_per_s"], 1), "record": found,
            "device": device, "note": "every chip at the recorded end-to-end rate; setup, outputs and a verifier "
            "come on top, chips skipped for nodata or cloud are read but not scored"}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------


def plan_scan(options: ScanOptions, results: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a scan with ``options`` would cost, from headers, overviews and benchmark records.

    Args:
        options: The scan's options.
        results: Folder of ``fusionkern bench`` records (default: the checkout's ``benchmarks/results``).

    Returns:
        The contents of ``plan.json``.

    Raises:
        ConfigError: Invalid options.
        CheckpointError: Not a FusionNet checkpoint, or not of the preset asked for.
        InputError: A missing, unreadable or non-overlapping input.
    """
    options.validate()
    model = read_model_spec(options.checkpoint, options.preset, options.backend)
    region = place_region(options, model.chip_m)
    grid, layout, inputs = region.grid, region.layout, region.inputs
    shares, nodata = nodata_shares(region)
    rasters = []
    for role, path in _roles(inputs):
        entry = raster_reads(path, region)
        rasters.append({"role": role, **entry, "nodata_share": shares.get(path)})
    compressed = [r["compressed_bytes"] for r in rasters]
    metres = grid.res * grid.metres_per_unit
    _, _, height, width = region.tiles[0].window(layout)  # the first tile is a whole one, the largest
    return {
        "format": PLAN_FORMAT,
        "fusionkern_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"path": model.path, "preset": model.preset, "width": model.width, "chip_px": model.chip_px,
                       "resolution_m": model.resolution_m},  # fmt: skip
        "options": {k: getattr(options, k) for k in ("backend", "device", "engine", "batch_size", "tile_px",
                                                     "stride_m", "max_invalid")},  # fmt: skip
        "grid": {**grid.describe(), "resolution_m": metres,
                 "area_km2": round(grid.width * grid.height * metres * metres / 1e6, 3)},
        "chips": {**layout.describe(grid), "count": layout.n_chips,
                  "note": stride_note(layout, grid, options.stride_m)},
        "tiles": {"count": len(region.tiles), "tile_chips": region.tile_chips, "window_px": [height, width]},
        "read": {
            "rasters": len(rasters),
            "bytes": sum(r["bytes_read"] for r in rasters),
            "compressed_bytes": None if None in compressed else sum(compressed),
        },
        "nodata": nodata,
        "estimate": estimate_time(layout.n_chips, model, options, None if results is None else Path(results),
                                  compressed=rasters[0]["compression"] is not None),
        "per_raster": rasters,
    }


def _roles(inputs: ScanInputs) -> list[tuple[str, str]]:
    """``(role, path)`` of every raster the scan reads, e.g. ``("b10 d1", ...)``, bands then QA."""
    roles = [(f"{branch} d{date + 1}", r.path) for branch, rs in inputs.bands.items() for date, r in enumerate(rs)]
    return roles + [(f"qa d{date + 1}", q) for date, q in enumerate(inputs.qa) if q]


def write_plan(out: str | os.PathLike, plan: dict[str, Any]) -> Path:
    """Writes ``plan.json`` into ``out`` (created), atomically; returns its path."""
    return write_text_atomic(Path(out) / PLAN_JSON, json.dumps(plan, indent=2) + "\n")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2g} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f} min"
    hours, minutes = divmod(round(minutes), 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{seconds / 86400:.1f} days"


def _share(value: float | None) -> str:
    return "unknown (no overviews)" if value is None else f"{100 * value:.1f} %"


def plan_lines(plan: dict[str, Any]) -> list[str]:
    """The plan as a short table for the terminal."""
    from fusionkern.bench.report import fmt_bytes

    grid, chips, tiles, read = plan["grid"], plan["chips"], plan["tiles"], plan["read"]
    nodata, estimate = plan["nodata"], plan["estimate"]
    compressed = read["compressed_bytes"]
    if estimate["seconds"] is None:
        time = f"no estimate: {estimate['reason']}"
    else:
        rec = estimate["record"]
        time = (f"about {_duration(estimate['seconds'])} at {estimate['chips_per_s']:g} chips/s, the end-to-end "
                f"rate of {rec['group']} in bench record {Path(rec['record']).name} ({rec['machine']}, "
                f"{rec['usable_cores']} cores, {rec['threads']} thread(s))")  # fmt: skip
    summary = [
        ("grid", f"{grid['width']} x {grid['height']} px of {grid['resolution_m']:g} m in {grid['crs'][:40]}, "
                 f"{grid['area_km2']:g} km2"),
        ("chips", f"{chips['count']}: {chips['chip_px']} px ({chips['chip_m']:g} m) every {chips['stride_px']} px "
                  f"({chips['stride_m']:g} m), {chips['rows']} rows x {chips['cols']} cols"),
        ("tiles", f"{tiles['count']} of up to {tiles['tile_chips']} x {tiles['tile_chips']} chips "
                  f"({tiles['window_px'][0]} x {tiles['window_px'][1]} px windows)"),
        ("read", f"{fmt_bytes(read['bytes'])} from {read['rasters']} rasters as stored, "
                 + (f"about {fmt_bytes(compressed)} compressed" if compressed is not None else "compressed unknown")),
        ("nodata", _share(nodata["share"]) + (" of the grid where some band has no data" if nodata["share"] is not
                                               None else "")),
        ("time", time),
    ]  # fmt: skip
    lines = [f"{key:<7} {text}" for key, text in summary]
    if chips.get("note"):
        lines.append(f"{'':<7} {chips['note']}")
    lines += ["", f"{'raster':<8} {'file':<28} {'dtype':<8} {'read':>10} {'compressed':>11}  nodata"]
    for r in plan["per_raster"]:
        name = Path(r["path"]).name
        name = name if len(name) <= 28 else "..." + name[-25:]
        comp = "-" if r["compressed_bytes"] is None else fmt_bytes(r["compressed_bytes"])
        share = "-" if r["role"].startswith("qa") else _share(r["nodata_share"])
        lines.append(f"{r['role']:<8} {name:<28} {r['dtype']:<8} {fmt_bytes(r['bytes_read']):>10} {comp:>11}  "
                     f"{share}{' (warped)' if r['warped'] else ''}")  # fmt: skip
    return lines


def run_plan(
    options: ScanOptions, results: str | os.PathLike | None = None, log: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Plans the scan, writes ``plan.json`` into ``options.out`` and logs the table.

    Args:
        options: The scan's options.
        results: Folder of ``fusionkern bench`` records (default: the checkout's ``benchmarks/results``).
        log: Receives the table's lines.

    Returns:
        The plan.
    """
    plan = plan_scan(options, results)
    path = write_plan(options.out, plan)
    for line in plan_lines(plan):
        log(line)
    log(f"wrote {path}")
    return plan


__all__ = [
    "ModelSpec", "PLAN_FORMAT", "PLAN_JSON", "Region", "check_overlap", "estimate_time", "find_scan_rate",
    "overview_nodata", "place_region", "plan_lines", "plan_scan", "raster_reads", "read_model_spec", "run_plan",
    "write_plan",
]  # fmt: skip
