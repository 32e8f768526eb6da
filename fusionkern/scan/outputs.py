"""Where a scan's results leave: the scores COG, detections (GeoJSON and GeoParquet), a quick look and scan.json.

* ``scores.tif``: float32 cement probability, one pixel per chip on the stride grid (pixel ``(i, j)`` is
  ``stride`` wide and centred on chip ``(i, j)``), in the scan grid's CRS, NaN (the nodata value) where a chip was
  skipped. A Cloud-Optimised GeoTIFF (GDAL's COG driver: tiled, DEFLATE, overviews averaged).
* ``detections.geojson`` (RFC 7946: WGS 84 longitude/latitude, exterior rings counter-clockwise) and
  ``detections.parquet`` (GeoParquet 1.1, WKB geometry, the same CRS): one feature per site, ranked by score: the
  positive chips around a local peak of the probabilities (:func:`group_sites`, at most :data:`MAX_SITE_M` a
  side), with the score (the verifier's where it ran), the best chip's and the mean probability, the chip count,
  the peak location and the union of the chip footprints; threshold, prior and model sha256 are repeated in every
  feature's properties.
* ``quicklook.png``: the scores over a false-colour composite of the first date (B7, B6, B10), detections
  outlined.

Every file is written under a temporary name in the output folder and renamed when complete.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fusionkern.errors import MissingDependencyError
from fusionkern.files import atomic_output
from fusionkern.scan.grid import ChipLayout, ScanGrid

SCORES = "scores.tif"
GEOJSON = "detections.geojson"
PARQUET = "detections.parquet"
QUICKLOOK = "quicklook.png"
REPORT = "report.html"
STAC_ITEM = "scan.stac.json"
SCAN_JSON = "scan.json"
FINAL_OUTPUTS = (SCORES, GEOJSON, PARQUET, QUICKLOOK, REPORT, STAC_ITEM, SCAN_JSON)
"""Every final output, in the order they are written (``scan.json`` last: its presence marks a finished scan)."""

_COORD_DIGITS = 7  # about 1 cm in latitude


def write_json(path: Path, payload: Any) -> None:
    """JSON with a final newline, written atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------


def write_scores_cog(path: Path, scores: np.ndarray, grid: ScanGrid, layout: ChipLayout, tags: dict[str, Any]) -> None:
    """Writes the scores as a Cloud-Optimised GeoTIFF.

    Args:
        path: Destination (``scores.tif``).
        scores: (rows, cols) float32 probabilities, NaN where skipped.
        grid: The scan grid (its CRS).
        layout: The chips (the stride grid's transform).
        tags: Extra GDAL metadata items.
    """
    import rasterio
    import rasterio.shutil
    from rasterio.io import MemoryFile

    profile = {
        "driver": "GTiff", "dtype": "float32", "count": 1, "height": scores.shape[0], "width": scores.shape[1],
        "crs": grid.crs, "transform": layout.score_transform(grid), "nodata": float("nan"),
    }  # fmt: skip
    with atomic_output(path) as tmp, MemoryFile() as memory:
        with memory.open(**profile) as mem:
            mem.write(scores.astype(np.float32), 1)
            mem.set_band_description(1, "cement probability")
            mem.update_tags(**{k: str(v) for k, v in tags.items()})
        with memory.open() as mem:
            rasterio.shutil.copy(
                mem, tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES", BLOCKSIZE=256,
                OVERVIEW_RESAMPLING="AVERAGE",
            )  # fmt: skip
    with rasterio.open(path) as check:  # the COG driver keeps tags and description; verify the copy reads back
        check.read(1, window=((0, 1), (0, 1)))


# --------------------------------------------------------------------------------------------------------------
# Detections
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Detection:
    """One site: the positive chips around a local peak of the scores, capped in size.

    Attributes:
        id: 1-based rank, highest score first.
        score: The detection's score: the verifier's where the site was verified, else ``chip_score``.
        chip_score: Highest chip probability of the site (the first pass).
        mean_score: Mean chip probability over the site's chips.
        chip_count: Chips in the site.
        lon: Longitude of the site's peak (the score-weighted centre of the chips around the best chip).
        lat: Latitude of the peak.
        x: The peak in the grid's CRS.
        y: The peak in the grid's CRS.
        footprint: GeoJSON geometry (Polygon or MultiPolygon) of the chips' union, WGS 84 lon/lat.
        footprint_grid: The same in the grid's CRS.
        chips: (row, col) of the site's chips, the peak chip first.
        verifier_score: Probability given by the verifier, None where the site was not verified.
        context: Scan-wide values repeated in every feature (threshold, prior, model sha256).
    """

    id: int
    score: float
    chip_score: float
    mean_score: float
    chip_count: int
    lon: float
    lat: float
    x: float
    y: float
    footprint: dict[str, Any]
    footprint_grid: dict[str, Any] = field(repr=False)
    chips: list[tuple[int, int]] = field(repr=False)
    verifier_score: float | None = None
    context: dict[str, Any] = field(default_factory=dict, repr=False)

    def properties(self) -> dict[str, Any]:
        """The attributes written with the footprint."""
        return {
            "id": self.id,
            "rank": self.id,
            "class": "cement",  # the class property that the STAC label extension names (label:properties)
            "score": round(self.score, 6),
            "chip_score": round(self.chip_score, 6),
            "verifier_score": None if self.verifier_score is None else round(self.verifier_score, 6),
            "mean_score": round(self.mean_score, 6),
            "chip_count": self.chip_count,
            "peak_lon": round(self.lon, _COORD_DIGITS),
            "peak_lat": round(self.lat, _COORD_DIGITS),
            **self.context,
        }


def touch_radius(layout: ChipLayout) -> int:
    """How many stride cells apart two chips may be and still touch (share an edge or overlap)."""
    return max(1, layout.chip_px // layout.stride_px)


def _union_outline(chips: np.ndarray, layout: ChipLayout) -> list[list[list[tuple[float, float]]]]:
    """The union of chip squares as polygons (lists of rings) in grid pixel coordinates (col, row).

    The union is traced on the grid of the chips' own edge positions (a cell per pair of consecutive edges),
    where it is exact, then the corner indices are mapped back to pixels.
    """
    from rasterio import features

    s, c = layout.stride_px, layout.chip_px
    rows = np.unique(np.concatenate([chips[:, 0] * s, chips[:, 0] * s + c]))
    cols = np.unique(np.concatenate([chips[:, 1] * s, chips[:, 1] * s + c]))
    mask = np.zeros((len(rows) - 1, len(cols) - 1), dtype=np.uint8)
    for r, col in chips:
        a0, a1 = np.searchsorted(rows, [r * s, r * s + c])
        b0, b1 = np.searchsorted(cols, [col * s, col * s + c])
        mask[a0:a1, b0:b1] = 1
    polygons = []
    for geometry, _ in features.shapes(mask, mask=mask.astype(bool), connectivity=4):
        polygons.append([
            [(float(cols[int(round(x))]), float(rows[int(round(y))])) for x, y in ring]
            for ring in geometry["coordinates"]
        ])  # fmt: skip
    return polygons


def _signed_area(ring: Sequence[Sequence[float]]) -> float:
    x = np.asarray([p[0] for p in ring], dtype=np.float64)
    y = np.asarray([p[1] for p in ring], dtype=np.float64)
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _orient(polygon: list[list[Any]]) -> list[list[Any]]:
    """Exterior ring counter-clockwise, holes clockwise (RFC 7946 section 3.1.6), in x-right / y-up axes."""
    out = []
    for k, ring in enumerate(polygon):
        ccw = _signed_area(ring) > 0
        out.append(ring if ccw == (k == 0) else ring[::-1])
    return out


def _geometry(polygons: list[list[list[Any]]]) -> dict[str, Any]:
    polygons = [_orient(p) for p in polygons]
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


Rings = list[list[tuple[float, float]]]


def _to_grid_crs(polygons: list[Rings], grid: ScanGrid) -> list[Rings]:
    affine = grid.affine
    return [[[tuple(affine * p) for p in ring] for ring in polygon] for polygon in polygons]


def _round_geometry(geometry: dict[str, Any]) -> dict[str, Any]:
    def walk(value: Any) -> Any:
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], (int, float)):
            return [round(float(v), _COORD_DIGITS) for v in value]
        return [walk(v) for v in value]

    return {"type": geometry["type"], "coordinates": walk(geometry["coordinates"])}


def group_sites(scores: np.ndarray, threshold: float, radius: int) -> list[np.ndarray]:
    """Positive cells grouped around local peaks: one group per site, at most ``2 * radius + 1`` cells a side.

    The best positive cell not yet taken starts a group and takes every positive cell within ``radius`` cells
    (Chebyshev distance) of it that is still free; then the next best free cell, and so on. Touching positive
    chips of one plant thus make one site, while a large positive area (a town, a whole warm clip) is cut into
    sites of bounded size instead of one polygon.

    Args:
        scores: (rows, cols) probabilities, NaN where skipped.
        threshold: Probability at or above which a cell is positive.
        radius: Largest row and column distance of a cell from its group's peak.

    Returns:
        One (n, 2) int array of (row, col) per group, groups by descending peak score (ties in row-major order),
        the peak first and the other cells in row-major order.
    """
    with np.errstate(invalid="ignore"):
        positive = np.nan_to_num(scores, nan=-1.0) >= threshold
    cells = np.argwhere(positive)
    if not len(cells):
        return []
    values = scores[cells[:, 0], cells[:, 1]]
    order = np.lexsort((np.arange(len(cells)), -values))
    free = positive.copy()
    groups = []
    for k in order:
        r, c = (int(v) for v in cells[k])
        if not free[r, c]:
            continue
        r0, c0 = max(r - radius, 0), max(c - radius, 0)
        window = free[r0 : r + radius + 1, c0 : c + radius + 1]
        members = np.argwhere(window) + [r0, c0]
        window[:] = False
        rest = members[(members[:, 0] != r) | (members[:, 1] != c)]
        groups.append(np.vstack([[[r, c]], rest]).astype(np.int64))
    return groups


def peak_point(scores: np.ndarray, cell: Sequence[int], layout: ChipLayout, grid: ScanGrid) -> tuple[float, float]:
    """Grid-CRS (x, y) of a site's peak: the centres of the best chip and its scored neighbours (3 x 3 cells),
    weighted by how far their scores rise above the lowest of them; the best chip's centre if they are flat."""
    r, c = int(cell[0]), int(cell[1])
    height, width = scores.shape
    rows, cols = (a.ravel() for a in np.mgrid[max(r - 1, 0) : min(r + 2, height), max(c - 1, 0) : min(c + 2, width)])
    values = scores[rows, cols].astype(np.float64)
    finite = np.isfinite(values)
    rows, cols, values = rows[finite], cols[finite], values[finite]
    weights = values - values.min()
    if not weights.sum() > 0:
        rows, cols, weights = np.array([r]), np.array([c]), np.ones(1)
    xs, ys = layout.chip_centres(grid, rows, cols)
    return float(np.average(xs, weights=weights)), float(np.average(ys, weights=weights))


def site_radius(layout: ChipLayout, max_site_m: float, grid: ScanGrid) -> int:
    """The group radius (stride cells) that keeps a site's footprint within ``max_site_m`` metres a side."""
    metres = grid.res * grid.metres_per_unit
    cells = (max_site_m / metres - layout.chip_px) / layout.stride_px  # footprint = (2r) * stride + chip
    return max(touch_radius(layout), int(cells // 2))


MAX_SITE_M = 3000.0
"""Largest side of a detection's footprint, in metres (a site of chips around one peak; plants are < 2 km)."""


def find_detections(
    scores: np.ndarray,
    layout: ChipLayout,
    grid: ScanGrid,
    threshold: float,
    max_site_m: float = MAX_SITE_M,
    context: dict[str, Any] | None = None,
    limit: int | None = None,
) -> list[Detection]:
    """The sites of positive chips (:func:`group_sites`), ranked by their highest chip probability.

    Args:
        scores: (rows, cols) probabilities, NaN where skipped.
        layout: The chips.
        grid: The scan grid.
        threshold: Probability at or above which a chip is positive.
        max_site_m: Largest side of a site's footprint in metres.
        context: Scan-wide properties written with every detection.
        limit: Keep only this many sites, the best first (None: all).

    Returns:
        The detections, by rank.
    """
    from rasterio.warp import transform, transform_geom

    detections = []
    sites = group_sites(scores, threshold, site_radius(layout, max_site_m, grid))
    for number, chips in enumerate(sites[:limit] if limit is not None else sites, start=1):
        values = scores[chips[:, 0], chips[:, 1]].astype(np.float64)
        x, y = peak_point(scores, chips[0], layout, grid)
        (lon,), (lat,) = transform(grid.crs, "EPSG:4326", [x], [y])
        footprint_grid = _geometry(_to_grid_crs(_union_outline(chips, layout), grid))
        lonlat = transform_geom(grid.crs, "EPSG:4326", footprint_grid)
        footprint = _round_geometry(_geometry([p for p in _polygons(lonlat)]))
        detections.append(Detection(
            number, float(values[0]), float(values[0]), float(values.mean()), len(chips), float(lon), float(lat), x,
            y, footprint, footprint_grid, [(int(r), int(c)) for r, c in chips], None, dict(context or {}),
        ))  # fmt: skip
    return detections


def rank(detections: Sequence[Detection]) -> list[Detection]:
    """The detections sorted by score (highest first) and renumbered 1..n in that order."""
    ranked = sorted(detections, key=lambda d: (-d.score, d.id))
    for number, detection in enumerate(ranked, start=1):
        detection.id = number
    return list(ranked)


def _polygons(geometry: dict[str, Any]) -> list[list[list[Any]]]:
    coords = geometry["coordinates"]
    polygons = [coords] if geometry["type"] == "Polygon" else list(coords)
    return [[[tuple(p) for p in ring] for ring in polygon] for polygon in polygons]


def write_geojson(path: Path, detections: Sequence[Detection], metadata: dict[str, Any] | None = None) -> None:
    """Writes the detections as an RFC 7946 FeatureCollection (WGS 84 lon/lat), atomically.

    Args:
        path: Destination (``detections.geojson``).
        detections: The detections.
        metadata: Extra top-level members (foreign members, allowed by RFC 7946 section 6.1).
    """
    features = [
        {"type": "Feature", "id": d.id, "geometry": d.footprint, "properties": d.properties()} for d in detections
    ]
    payload = {"type": "FeatureCollection", **(metadata or {}), "features": features}
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")


def wkb(geometry: dict[str, Any]) -> bytes:
    """ISO WKB (little-endian) of a GeoJSON Polygon or MultiPolygon."""

    def polygon(rings: Sequence[Sequence[Sequence[float]]]) -> bytes:
        parts = [struct.pack("<BII", 1, 3, len(rings))]
        for ring in rings:
            parts.append(struct.pack("<I", len(ring)))
            parts.append(np.asarray(ring, dtype="<f8")[:, :2].tobytes())
        return b"".join(parts)

    if geometry["type"] == "Polygon":
        return polygon(geometry["coordinates"])
    members = geometry["coordinates"]
    return struct.pack("<BII", 1, 6, len(members)) + b"".join(polygon(p) for p in members)


def _bbox(detections: Sequence[Detection]) -> list[float]:
    points = np.asarray([p for d in detections for poly in _polygons(d.footprint) for ring in poly for p in ring])
    return [float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max())]


def geo_metadata(detections: Sequence[Detection]) -> dict[str, Any]:
    """GeoParquet 1.1 ``geo`` metadata of the detections table.

    The ``crs`` member is written out (PROJJSON of OGC:CRS84, WGS 84 longitude/latitude, which the footprints are
    in) although GeoParquet means that CRS when it is absent: readers that do not apply the default then still
    place the footprints right.
    """
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": sorted({d.footprint["type"] for d in detections}),
        "crs": crs84_projjson(),
        "orientation": "counterclockwise",
        "edges": "planar",
    }
    if detections:
        column["bbox"] = _bbox(detections)
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}


def crs84_projjson() -> dict[str, Any]:
    """PROJJSON of OGC:CRS84 (WGS 84, longitude first), as this machine's PROJ writes it; a fresh copy."""
    return json.loads(_crs84_text())


@functools.lru_cache(maxsize=1)
def _crs84_text() -> str:
    from rasterio.crs import CRS

    return json.dumps(CRS.from_user_input("OGC:CRS84").to_dict(projjson=True))


def write_geoparquet(path: Path, detections: Sequence[Detection]) -> None:
    """Writes the detections as GeoParquet (WKB footprints in WGS 84 lon/lat), atomically.

    Raises:
        MissingDependencyError: pyarrow is not installed.
    """
    pa, pq = require_pyarrow()
    table = pa.table({
        "id": pa.array([d.id for d in detections], pa.int32()),
        "score": pa.array([d.score for d in detections], pa.float64()),
        "chip_score": pa.array([d.chip_score for d in detections], pa.float64()),
        "verifier_score": pa.array([d.verifier_score for d in detections], pa.float64()),
        "mean_score": pa.array([d.mean_score for d in detections], pa.float64()),
        "chip_count": pa.array([d.chip_count for d in detections], pa.int32()),
        "peak_lon": pa.array([d.lon for d in detections], pa.float64()),
        "peak_lat": pa.array([d.lat for d in detections], pa.float64()),
        "geometry": pa.array([wkb(d.footprint) for d in detections], pa.binary()),
    })  # fmt: skip
    table = table.replace_schema_metadata({b"geo": json.dumps(geo_metadata(detections)).encode()})
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def require_pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or the extra that provides them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError("pyarrow", "scan", "Writing detections.parquet") from exc
    return pa, pq


def require_matplotlib() -> Any:
    """matplotlib, or the extra that provides it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError("matplotlib", "scan", "Drawing quicklook.png") from exc
    return matplotlib


# --------------------------------------------------------------------------------------------------------------
# Quick look
# --------------------------------------------------------------------------------------------------------------


def overview_shape(grid: ScanGrid, max_side: int) -> tuple[int, int]:
    """(rows, cols) of the grid scaled down to at most ``max_side`` on its longer side."""
    scale = min(1.0, max_side / max(grid.width, grid.height))
    return max(1, round(grid.height * scale)), max(1, round(grid.width * scale))


def _stretch(band: np.ndarray) -> np.ndarray:
    finite = band[np.isfinite(band)]
    if finite.size == 0:
        return np.zeros_like(band)
    lo, hi = np.percentile(finite, [2, 98])
    out = np.clip((band - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return np.nan_to_num(out, nan=0.0)


def write_quicklook(
    path: Path,
    composite: Sequence[np.ndarray],
    scores: np.ndarray,
    grid: ScanGrid,
    layout: ChipLayout,
    detections: Sequence[Detection],
    threshold: float,
    title: str = "",
) -> None:
    """Draws the scores over a band composite with the detections outlined, as a PNG, atomically.

    Args:
        path: Destination (``quicklook.png``).
        composite: Three (h, w) bands covering the grid (red, green, blue), any scale.
        scores: (rows, cols) probabilities, NaN where skipped.
        grid: The scan grid.
        layout: The chips.
        detections: The detections.
        threshold: The detection threshold (drawn on the colour bar).
        title: Figure title.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    west, south, east, north = grid.bounds
    rgb = np.dstack([_stretch(b) for b in composite])
    s_west, s_north = layout.score_transform(grid) * (0, 0)
    s_east, s_south = layout.score_transform(grid) * (scores.shape[1], scores.shape[0])
    aspect = (north - south) / max(east - west, 1e-9)
    fig = Figure(figsize=(8.0, max(3.0, min(12.0, 7.0 * aspect + 1.0))), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(rgb, extent=(west, east, south, north), interpolation="nearest")
    ax.imshow(_score_overlay(scores, threshold), extent=(s_west, s_east, s_south, s_north), interpolation="nearest")
    for d in detections:
        for polygon in _polygons(d.footprint_grid):
            ring = np.asarray(polygon[0])
            ax.plot(ring[:, 0], ring[:, 1], color="cyan", linewidth=1.0)
        ax.plot([d.x], [d.y], marker="+", color="cyan", markersize=8)
    ax.set_xlim(west, east)
    ax.set_ylim(south, north)
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.set_xlabel(f"{grid.describe()['crs'][:40]} x", fontsize=8)
    ax.set_ylabel("y", fontsize=8)
    ax.set_title(title or f"{len(detections)} detection(s), threshold {threshold:g}", fontsize=10)
    ax.tick_params(labelsize=7)
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), "inferno"), ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("cement probability", fontsize=8)
    bar.ax.axhline(threshold, color="cyan", linewidth=1.0)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")


def _score_overlay(scores: np.ndarray, threshold: float) -> np.ndarray:
    """RGBA scores: the colour map, fading in from half the threshold so that background leaves the bands visible."""
    from matplotlib import colormaps

    values = np.nan_to_num(scores, nan=0.0)
    rgba = colormaps["inferno"](np.clip(values, 0.0, 1.0))
    low = 0.5 * threshold
    rgba[..., 3] = 0.85 * np.clip((values - low) / max(threshold - low, 1e-6), 0.0, 1.0)
    return rgba


def composite_bands(sources: Sequence[Any], grid: ScanGrid, max_side: int = 1024) -> list[np.ndarray]:
    """Three bands read over the whole grid at reduced size, for the quick look."""
    shape = overview_shape(grid, max_side)
    return [source.read_overview(grid, shape) for source in sources]


def safe_float(value: float) -> float | None:
    """A JSON-friendly float (None for NaN or infinity)."""
    return float(value) if math.isfinite(value) else None
