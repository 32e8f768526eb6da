"""The scan part of ``fusionkern demo``: a synthetic region with plants planted at known places, scanned, scored.

The region is drawn with the physics of :mod:`fusionkern.data.synthetic` (the same functions, applied to one large
square instead of one chip): seasonal landcover over the whole region, cement works (kiln heat sustained in all
dates, dry dusty halo raising B7 over B6) at known places, and look-alikes elsewhere (one-date fires, dry fields,
towns, other hot industry). It is written as twelve GeoTIFFs (b10, b11, b7, b6 in three dates) in UTM zone 50N with
a manifest, scanned with :func:`fusionkern.scan.run_scan`, and the detections are compared with the planted truth:
a plant is found when a detection's chips cover it; a detection is right when its chips cover a plant.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fusionkern.data import synthetic
from fusionkern.errors import ConfigError

DEMO_CRS = "EPSG:32650"
DEMO_ORIGIN = (420_000.0, 3_480_000.0)
"""West and north edge of the demo region in UTM 50N metres (about 117.2 E, 31.4 N, eastern China)."""


@dataclass
class DemoRegion:
    """A written synthetic region.

    Attributes:
        manifest: The manifest listing its rasters.
        plants: (n, 2) float (row, col) pixel positions of the planted cement works.
        confusers: (m, 2) float (row, col) centres of the windows given look-alikes (some drew none).
        size_px: Side of the region in pixels.
    """

    manifest: Path
    plants: np.ndarray
    confusers: np.ndarray
    size_px: int


def _scatter(rng: np.random.Generator, n: int, size: int, margin: int, spacing: float, avoid: np.ndarray) -> np.ndarray:
    """Up to ``n`` random (row, col) points at least ``spacing`` from each other and from ``avoid``."""
    points: list[np.ndarray] = []
    taken = [np.asarray(p, dtype=np.float64) for p in avoid]
    for _ in range(n * 50):
        if len(points) == n:
            break
        p = rng.uniform(margin, size - margin, 2)
        if all(np.hypot(*(p - q)) >= spacing for q in taken):
            points.append(p)
            taken.append(p)
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


def _window(surface: synthetic._Surface, centre: np.ndarray, half: int) -> tuple[synthetic._Surface, np.ndarray]:
    """A square sub-surface (views: drawing on it draws on the region) and the centre in its coordinates."""
    r0, c0 = (int(round(v)) - half for v in centre)
    rows, cols = slice(r0, r0 + 2 * half), slice(c0, c0 + 2 * half)
    views = (a[:, rows, cols] for a in (surface.veg, surface.moist, surface.heat, surface.add_b6, surface.add_b7))
    return synthetic._Surface(*views), centre - np.array([r0, c0], dtype=np.float64)


def make_demo_region(
    folder: str | Path,
    size_px: int = 2048,
    n_plants: int = 12,
    n_confusers: int = 32,
    seed: int = 0,
    chip_px: int = 35,
    dates: Sequence[str] = ("2018-01", "2017-01", "2017-04"),
) -> DemoRegion:
    """Draws and writes a synthetic region with plants at known places.

    Args:
        folder: Where the rasters, ``manifest.yaml`` and ``truth.geojson`` go (created).
        size_px: Side of the square region in 30 m pixels.
        n_plants: Cement works planted (fewer if they do not fit at 5 km spacing).
        n_confusers: Windows given landcover look-alikes, at least 3 km from any plant.
        seed: Seed of everything.
        chip_px: The model's chip side; works and look-alikes are drawn on windows of twice that.
        dates: Three dates ``YYYY-MM``, in channel order (their months set the seasons).

    Returns:
        The region.

    Raises:
        ConfigError: A region too small for a chip margin, or dates that are not three ``YYYY-MM``.
    """
    months = synthetic._check_args(1, 1, chip_px, dates)
    if size_px < 8 * chip_px:
        raise ConfigError(f"the demo region needs at least {8 * chip_px} px a side, got {size_px}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    veg, moist = synthetic._land_surface(rng, size_px, months)
    surface = synthetic._Surface(veg, moist, np.zeros_like(veg), np.zeros_like(veg), np.zeros_like(veg))
    half, margin = chip_px, 2 * chip_px
    plants = _scatter(rng, n_plants, size_px, margin, spacing=5000.0 / synthetic.PIXEL_M, avoid=np.empty((0, 2)))
    confusers = _scatter(rng, n_confusers, size_px, margin, spacing=3000.0 / synthetic.PIXEL_M, avoid=plants)
    for centre in plants:
        window, local = _window(surface, centre, half)
        synthetic._add_plant(rng, 2 * half, local, window)
    for centre in confusers:
        window, local = _window(surface, centre, half)
        synthetic._add_confusers(rng, 2 * half, local, window)
    lat = _region_latitude(size_px)
    rasters = {}
    b6, b7 = synthetic._reflectance(rng, surface)
    rasters["b7"], rasters["b6"] = b7.astype(np.float32), b6.astype(np.float32)
    del b6, b7
    b10, b11 = synthetic._brightness_temperature(rng, surface, months, lat)
    rasters["b10"], rasters["b11"] = b10.astype(np.float32), b11.astype(np.float32)
    del b10, b11, surface, veg, moist
    manifest = _write_region(folder, rasters, dates)
    _write_truth(folder / "truth.geojson", plants, confusers)
    return DemoRegion(manifest, plants, confusers, size_px)


def _region_transform() -> Any:
    """Pixel -> UTM transform of the region (its north-west corner is fixed)."""
    from rasterio.transform import from_origin

    return from_origin(*DEMO_ORIGIN, synthetic.PIXEL_M, synthetic.PIXEL_M)


def _region_latitude(size_px: int) -> float:
    """Latitude of the region's centre (it sets the synthetic climate)."""
    from rasterio.warp import transform

    x = DEMO_ORIGIN[0] + size_px * synthetic.PIXEL_M / 2
    y = DEMO_ORIGIN[1] - size_px * synthetic.PIXEL_M / 2
    _, (lat,) = transform(DEMO_CRS, "EPSG:4326", [x], [y])
    return float(lat)


def _write_region(folder: Path, rasters: dict[str, np.ndarray], dates: Sequence[str]) -> Path:
    """One tiled, compressed float32 GeoTIFF per band and date, and the manifest listing them."""
    import rasterio
    import yaml

    size = next(iter(rasters.values())).shape[-1]
    profile = {
        "driver": "GTiff", "dtype": "float32", "count": 1, "width": size, "height": size, "crs": DEMO_CRS,
        "transform": _region_transform(), "nodata": float("nan"), "tiled": True, "blockxsize": 512,
        "blockysize": 512, "compress": "deflate", "predictor": 3,
    }  # fmt: skip
    manifest: dict[str, Any] = {"dates": list(dates)}
    for branch in ("b10", "b11", "b7", "b6"):
        manifest[branch] = []
        for index, date in enumerate(dates):
            name = f"{branch}_{date}.tif"
            with rasterio.open(folder / name, "w", **profile) as dst:
                dst.write(rasters[branch][index], 1)
                dst.set_band_description(1, f"{branch} {date}")
            manifest[branch].append(name)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def _lonlat(points: np.ndarray) -> tuple[list[float], list[float]]:
    """WGS 84 lon, lat of (row, col) pixel positions of the region."""
    from rasterio.warp import transform

    xs, ys = _region_transform() * (points[:, 1], points[:, 0])
    return transform(DEMO_CRS, "EPSG:4326", list(xs), list(ys))


def _write_truth(path: Path, plants: np.ndarray, confusers: np.ndarray) -> None:
    """The planted works and look-alike windows as GeoJSON points (with their pixel positions)."""
    features = []
    for kind, points in (("cement", plants), ("confuser", confusers)):
        if not len(points):
            continue
        lons, lats = _lonlat(points)
        for k, (lon, lat, (row, col)) in enumerate(zip(lons, lats, points), start=1):
            features.append({
                "type": "Feature", "geometry": {"type": "Point", "coordinates": [round(lon, 7), round(lat, 7)]},
                "properties": {"kind": kind, "id": k, "row": round(float(row), 2), "col": round(float(col), 2)},
            })  # fmt: skip
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# Scanning and scoring
# --------------------------------------------------------------------------------------------------------------


def _covered(points: np.ndarray, chips: Sequence[tuple[int, int]], chip_px: int, stride_px: int) -> np.ndarray:
    """Which (row, col) pixel positions lie inside at least one of the chips."""
    hit = np.zeros(len(points), dtype=bool)
    for r, c in chips:
        top, left = r * stride_px, c * stride_px
        rows = (points[:, 0] >= top) & (points[:, 0] < top + chip_px)
        hit |= rows & (points[:, 1] >= left) & (points[:, 1] < left + chip_px)
    return hit


def match_detections(region: DemoRegion, detections: Sequence[Any], chip_px: int, stride_px: int) -> dict[str, Any]:
    """Recall and precision of detections against the planted plants.

    Args:
        region: The region with its truth.
        detections: The scan's detections (their ``chips``).
        chip_px: Chip side in pixels.
        stride_px: Stride in pixels.

    Returns:
        Counts, recall and precision, and the look-alike windows hit.
    """
    found = np.zeros(len(region.plants), dtype=bool)
    confused = np.zeros(len(region.confusers), dtype=bool)
    right = 0
    for detection in detections:
        hits = _covered(region.plants, detection.chips, chip_px, stride_px)
        found |= hits
        right += bool(hits.any())
        confused |= _covered(region.confusers, detection.chips, chip_px, stride_px)
    n = len(detections)
    return {
        "plants": int(len(region.plants)),
        "plants_found": int(found.sum()),
        "detections": n,
        "detections_right": int(right),
        "recall": float(found.mean()) if len(found) else None,
        "precision": float(right / n) if n else None,
        "lookalike_windows": int(len(region.confusers)),
        "lookalike_windows_detected": int(confused.sum()),
    }


def threshold_sweep(
    region: DemoRegion, scores: np.ndarray, chip_px: int, stride_px: int, thresholds: Sequence[float]
) -> list[dict[str, Any]]:
    """Recall and precision of the same scores at several detection thresholds (no rescan).

    With one plant per thousand chips or so, precision is set by how rarely the model scores landcover high, so
    the sweep shows what a stricter threshold buys and costs.

    Args:
        region: The region with its truth.
        scores: The scan's (rows, cols) probabilities.
        chip_px: Chip side in pixels.
        stride_px: Stride in pixels.
        thresholds: The thresholds to try.

    Returns:
        One ``{"threshold", "recall", "precision", "detections"}`` per threshold.
    """
    import yaml

    from fusionkern.scan.grid import ChipLayout, raster_grid
    from fusionkern.scan.outputs import find_detections

    manifest = yaml.safe_load(region.manifest.read_text(encoding="utf-8"))
    grid = raster_grid(str(region.manifest.parent / manifest["b10"][0]))
    layout = ChipLayout(chip_px, stride_px, *scores.shape)
    rows = []
    for threshold in thresholds:
        match = match_detections(region, find_detections(scores, layout, grid, threshold), chip_px, stride_px)
        rows.append({"threshold": threshold, **{k: match[k] for k in ("recall", "precision", "detections")}})
    return rows


def _checkpoint(model_or_checkpoint: Any, out: Path) -> Path:
    from torch import nn

    if isinstance(model_or_checkpoint, nn.Module):
        from fusionkern.models import save_checkpoint

        return save_checkpoint(model_or_checkpoint, out / "scan_model.pt")
    return Path(model_or_checkpoint)


def run_scan_demo(
    out_dir: str | Path,
    model_or_checkpoint: Any,
    size_px: int = 2048,
    n_plants: int = 12,
    n_confusers: int = 32,
    seed: int = 0,
    threshold: float = 0.5,
    workers: int = 2,
    batch_size: int = 256,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Builds a synthetic region, scans it with a trained FusionNet and scores the detections.

    Args:
        out_dir: Folder for ``region/`` (rasters, manifest, truth) and ``scan/`` (the scan's outputs), and
            ``scan_demo.json`` (the figures returned).
        model_or_checkpoint: A trained FusionNet, or the path of its checkpoint (e.g. the demo's best split).
        size_px: Side of the region in 30 m pixels.
        n_plants: Plants planted.
        n_confusers: Windows given landcover look-alikes.
        seed: Seed of the region.
        threshold: Detection threshold of the scan.
        workers: Reader threads of the scan.
        batch_size: Chips per model call.
        progress: Show the scan's progress bar.
        log: Receives the summary lines.

    Returns:
        ``{"region", "scan", "match", "seconds"}``: the region's size, the scan's counts and chips/s, recall and
        precision, and the seconds spent building, scanning and in all.
    """
    from fusionkern.scan import ScanOptions, run_scan

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    checkpoint = _checkpoint(model_or_checkpoint, out)
    region = make_demo_region(out / "region", size_px, n_plants, n_confusers, seed)
    t1 = time.perf_counter()
    log(f"synthetic region {size_px} x {size_px} px ({size_px * 0.03:.0f} km a side) with {len(region.plants)} "
        f"plants and {len(region.confusers)} look-alike windows written in {t1 - t0:.0f} s")  # fmt: skip
    options = ScanOptions(
        checkpoint=str(checkpoint), out=str(out / "scan"), manifest=str(region.manifest), threshold=threshold,
        workers=workers, batch_size=batch_size, overwrite=True, progress=progress, checksums=False,
    )  # fmt: skip
    result = run_scan(options)
    t2 = time.perf_counter()
    chips = result.report["chips"]
    match = match_detections(region, result.detections, chips["chip_px"], chips["stride_px"])
    levels = sorted({threshold, 0.6, 0.7, 0.8, 0.9})
    sweep = threshold_sweep(region, result.scores, chips["chip_px"], chips["stride_px"], levels)
    summary = {
        "region": {"size_px": size_px, "plants": len(region.plants), "lookalike_windows": len(region.confusers),
                   "folder": str(out / "region")},  # fmt: skip
        "scan": {"folder": str(out / "scan"), **result.report["counts"],
                 "chips_per_s": result.report["timings"]["chips_per_s"]["end_to_end"]},  # fmt: skip
        "match": match,
        "thresholds": sweep,
        "seconds": {"region": round(t1 - t0, 1), "scan": round(t2 - t1, 1), "total": round(t2 - t0, 1)},
    }
    (out / "scan_demo.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log(f"scan: {result.report['counts']['scored']} chips scored in {t2 - t1:.0f} s, "
        f"{match['detections']} detection(s) at threshold {threshold:g}; recall {_percent(match['recall'])} "
        f"({match['plants_found']}/{match['plants']} plants), precision {_percent(match['precision'])} "
        f"({match['detections_right']}/{match['detections']}); "
        f"{match['lookalike_windows_detected']}/{match['lookalike_windows']} look-alike windows detected")  # fmt: skip
    for row in (r for r in sweep if r["threshold"] != threshold):
        log(f"  at threshold {row['threshold']:g}: recall {_percent(row['recall'])}, precision "
            f"{_percent(row['precision'])} ({row['detections']} detection(s))")  # fmt: skip
    return summary


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"
