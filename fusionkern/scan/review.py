"""The review page of a scan: ``report.html``, one self-contained file to accept or reject detections with.

Everything the page shows is inside it (images as data URIs, no script or style from elsewhere), so it opens from
a disk, a mail attachment or an archive without a network:

* the region's overview (a false-colour composite of the first date, B7 / B6 / B10, with the scores over it) and,
  drawn over it in SVG, every detection's footprint and a marker numbered by rank, linked to its row;
* the detections by rank (score, verifier score where a verifier ran, best chip's score, peak lon/lat, chips),
  each row with crops of the five inputs in the three dates around the site's peak (brightness temperature of
  B10 and B11 in a heat scale, B7 and B6 reflectance and their ratio in grey, each crop stretched on its own 2-98
  percentiles as the model scales each chip; the chip the verifier scores outlined in cyan), read with the scan's
  own reader (:class:`~fusionkern.scan.tiles.StackReader`) on the scan grid;
* accept / reject buttons per detection, kept in the browser's local storage, and an export of the decisions as
  GeoJSON points at the peaks (``kind: cement`` for accepted, ``kind: landcover`` for rejected, ``review`` says
  which): ``fusionkern evaluate --truth`` and ``fusionkern mine --plants`` read accepted sites as plants;
* links to the other outputs, and the run's settings: model and its sha256, threshold and prior with where they
  came from, verifier, chip size and stride, grid, inputs with their dates.

Crops are drawn for the first :data:`MAX_CROPS` ranks (a country scan may hold thousands of candidates; each
detection's crops add 20 to 45 kB, the most on noisy rasters); the table lists every detection.

:func:`write_review` is what ``fusionkern scan`` calls; :func:`rebuild` remakes the page (and the STAC item that
lists it) from a finished scan's folder: ``fusionkern report SCAN_DIR``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any, Iterator, Sequence

import numpy as np

from fusionkern import BRANCHES
from fusionkern.errors import InputError, MissingDependencyError
from fusionkern.files import atomic_output
from fusionkern.readers import BandInput
from fusionkern.scan import outputs
from fusionkern.scan.grid import ChipLayout, GridSource, ScanGrid
from fusionkern.scan.inputs import ScanInputs

MAX_CROPS = 500
"""Detections (by rank) whose rows get crops."""

CROP_CHIPS = 2
"""Side of a crop in chips: the chip at the peak and half a chip of surroundings on each side."""

OVERVIEW_SIDE = 1024
"""Longer side of the overview image in pixels (the composite the quick look reads too)."""

BRANCH_TITLES = {"b10": "B10 BT", "b11": "B11 BT", "b7": "B7 SWIR", "b6": "B6 SWIR", "b76": "B7:B6"}
_THERMAL = ("b10", "b11")
_HEAT_STOPS = ((0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)),
               (1.0, (252, 255, 164)))  # fmt: skip  # an inferno-like ramp: dark is cool, yellow is hot
_NODATA_RGB = (72, 0, 72)
_GREY_FLOOR = 24.0  # grey crops start above black, which marks no data
_JPEG_QUALITY = 80  # crops of noisy rasters: a quarter of a PNG's size, and the outline is drawn by the page


def require_pillow() -> Any:
    """PIL.Image, or the extra that provides it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingDependencyError("pillow", "geo", "Writing report.html") from exc
    return Image


# --------------------------------------------------------------------------------------------------------------
# Detections, as written
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Site:
    """One detection as ``detections.geojson`` holds it.

    Attributes:
        rank: Its rank (1 is the highest score).
        properties: Its properties (score, chip_score, verifier_score, chip_count, peak_lon, peak_lat...).
        footprint: Its footprint, WGS 84 lon/lat (Polygon or MultiPolygon).
        col: Column of its peak on the scan grid (fractional pixels), set by :func:`place_sites`.
        row: Row of its peak.
        outline: Its footprint's rings in grid pixels (col, row), set by :func:`place_sites`.
    """

    rank: int
    properties: dict[str, Any]
    footprint: dict[str, Any]
    col: float = math.nan
    row: float = math.nan
    outline: list[list[tuple[float, float]]] = field(default_factory=list)

    @property
    def lon(self) -> float:
        """Longitude of the peak."""
        return float(self.properties["peak_lon"])

    @property
    def lat(self) -> float:
        """Latitude of the peak."""
        return float(self.properties["peak_lat"])


def read_sites(path: str | Path) -> list[Site]:
    """The detections of a scan's ``detections.geojson``, by rank.

    Raises:
        InputError: A missing or invalid file, or a feature without a peak or a footprint.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} not found: not a finished scan folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    sites = []
    for index, feature in enumerate((data.get("features") or []) if isinstance(data, dict) else []):
        properties = feature.get("properties") or {}
        geometry = feature.get("geometry") or {}
        if properties.get("peak_lon") is None or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            raise InputError(f"{path}, feature {index}: not a fusionkern detection (no peak_lon or footprint)")
        sites.append(Site(int(properties.get("rank") or index + 1), properties, geometry))
    return sorted(sites, key=lambda s: s.rank)


def place_sites(sites: Sequence[Site], grid: ScanGrid) -> None:
    """Sets each site's peak and footprint outline in grid pixels."""
    from rasterio.warp import transform, transform_geom

    if not sites:
        return
    inverse = ~grid.affine
    xs, ys = transform("EPSG:4326", grid.crs, [s.lon for s in sites], [s.lat for s in sites])
    footprints = transform_geom("EPSG:4326", grid.crs, [s.footprint for s in sites])
    for site, x, y, geometry in zip(sites, xs, ys, footprints):
        site.col, site.row = inverse * (x, y)
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        site.outline = [[tuple(inverse * tuple(p[:2])) for p in ring] for polygon in polygons for ring in polygon]


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def read_composite(
    inputs: ScanInputs, grid: ScanGrid, layout: ChipLayout, max_side: int = OVERVIEW_SIDE
) -> list[np.ndarray]:
    """B7, B6 and B10 of the first date over the whole grid at reduced size: the quick look's and overview's
    false-colour composite (red, green, blue)."""
    sources = [GridSource(inputs.bands[b][0].path, grid, layout.extent_px) for b in ("b7", "b6", "b10")]
    try:
        return outputs.composite_bands(sources, grid, max_side)
    finally:
        for source in sources:
            source.close()


def stretch(planes: np.ndarray, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """Each (h, w) plane of ``planes`` (..., h, w) scaled to [0, 1] between its own percentiles; NaN stays NaN.

    The percentiles are nearest-rank ones of at most about 40 x 40 evenly spread pixels of each plane: all that a
    picture needs, and a large page's crops are stretched several times faster. Returns float32.
    """
    height, width = planes.shape[-2:]
    flat = planes.reshape(-1, height, width).astype(np.float32)
    step = max(1, round(max(height, width) / 40))
    sample = np.sort(flat[:, ::step, ::step].reshape(len(flat), -1), axis=1)  # NaN sorts last
    count = np.isfinite(sample).sum(axis=1)
    rows = np.arange(len(flat))
    top = np.maximum(count - 1, 0)
    lo = sample[rows, np.round(low / 100.0 * top).astype(np.intp)][:, None, None]
    hi = sample[rows, np.round(high / 100.0 * top).astype(np.intp)][:, None, None]
    with np.errstate(invalid="ignore"):
        out = np.clip((flat - lo) / np.where(hi > lo, hi - lo, np.float32(1.0)), 0.0, 1.0)
    return out.reshape(planes.shape)


def _heat_table(levels: int = 256) -> np.ndarray:
    stops = np.asarray([s[0] for s in _HEAT_STOPS])
    colours = np.asarray([s[1] for s in _HEAT_STOPS], dtype=np.float64)
    ramp = np.linspace(0.0, 1.0, levels)
    return np.stack([np.interp(ramp, stops, colours[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)


_HEAT = _heat_table()


def heat_rgb(values: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) of values in [0, 1] on the heat ramp (NaN as 0)."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    return _HEAT[np.round(v * (len(_HEAT) - 1)).astype(np.intp)]


def _data_uri(image: Any, fmt: str, **options: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def iter_crops(
    inputs: ScanInputs, grid: ScanGrid, layout: ChipLayout, sites: Sequence[Site], crop_px: int
) -> Iterator[np.ndarray]:
    """The five inputs in three dates around each site's peak, read with the scan's reader on the scan grid.

    Args:
        inputs: The scan's rasters.
        grid: The scan grid.
        layout: The chips (the extent the reader covers).
        sites: Placed sites (:func:`place_sites`).
        crop_px: Side of a crop in grid pixels.

    Yields:
        Per site, float32 (5, 3, crop_px, crop_px), calibrated as the scan read them, NaN where there is no data;
        the chip the verifier scores starts ``(crop_px - chip_px) // 2`` pixels in.
    """
    from fusionkern.scan.tiles import StackReader

    if not len(sites):
        return
    chip, margin = layout.chip_px, (crop_px - layout.chip_px) // 2
    height, width = layout.extent_px  # what the reader covers (a warped raster is read through a view this size)
    with StackReader(inputs, grid, layout) as reader:
        for site in sites:
            # around the chip centred on the peak exactly as the verifier places it (decide.recentred_chips)
            top = int(math.floor(site.row - chip / 2 + 0.5)) - margin
            left = int(math.floor(site.col - chip / 2 + 0.5)) - margin
            crop = np.full((len(BRANCHES), 3, crop_px, crop_px), np.nan, dtype=np.float32)
            r0, c0 = max(top, 0), max(left, 0)
            r1, c1 = min(top + crop_px, height), min(left + crop_px, width)
            if r1 > r0 and c1 > c0:
                crop[..., r0 - top : r1 - top, c0 - left : c1 - left] = reader.read(r0, c0, r1 - r0, c1 - c0).stack
            yield crop


def crop_images(crops: np.ndarray) -> list[str]:
    """One site's 15 crops (5, 3, h, w), branch by branch and dates in order, as JPEG data URIs.

    Brightness temperature is drawn on the heat ramp (no data in purple), the other inputs in grey (no data
    black, the ramp starting above it).
    """
    Image = require_pillow()
    levels = stretch(crops)
    missing = ~np.isfinite(levels)
    images = []
    for branch, planes, holes in zip(BRANCHES, levels, missing):
        for plane, hole in zip(planes, holes):
            if branch in _THERMAL:
                pixels = heat_rgb(plane)
                pixels[hole] = _NODATA_RGB
            else:
                grey = _GREY_FLOOR + (255.0 - _GREY_FLOOR) * np.nan_to_num(plane)
                pixels = np.where(hole, 0, np.round(grey)).astype(np.uint8)
            images.append(_data_uri(Image.fromarray(pixels), "JPEG", quality=_JPEG_QUALITY))
    return images


def overview_image(composite: Sequence[np.ndarray] | None, scores: np.ndarray, grid: ScanGrid, layout: ChipLayout,
                   threshold: float) -> str:  # fmt: skip
    """The composite with the scores over it (fading in from half the threshold), as a JPEG data URI covering the
    grid; without a composite, the scores over black at about one pixel per stride cell."""
    Image = require_pillow()
    if composite is not None:
        base = np.nan_to_num(stretch(np.stack(composite)), nan=0.0).transpose(1, 2, 0) * np.float32(255.0)
    else:
        cells = -(-max(grid.width, grid.height) // layout.stride_px)
        base = np.zeros((*outputs.overview_shape(grid, cells), 3), dtype=np.float32)
    height, width = base.shape[:2]
    # the score cell under each overview pixel: cell (i, j) is the stride square centred on chip (i, j)
    offset = (layout.chip_px - layout.stride_px) / 2.0
    rows = np.floor(((np.arange(height) + 0.5) * grid.height / height - offset) / layout.stride_px).astype(np.intp)
    cols = np.floor(((np.arange(width) + 0.5) * grid.width / width - offset) / layout.stride_px).astype(np.intp)
    values = scores[np.clip(rows, 0, scores.shape[0] - 1)[:, None], np.clip(cols, 0, scores.shape[1] - 1)[None, :]]
    values = np.where(np.isfinite(values), values, np.float32(0.0)).astype(np.float32)
    low = 0.5 * threshold
    alpha = (0.85 * np.clip((values - low) / max(threshold - low, 1e-6), 0.0, 1.0))[..., None].astype(np.float32)
    base *= 1.0 - alpha
    base += alpha * heat_rgb(values)
    image = Image.fromarray(np.clip(np.round(base), 0, 255).astype(np.uint8))
    return _data_uri(image, "JPEG", quality=85)


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{float(value):.{digits}f}"


def _script_json(payload: Any) -> str:
    """JSON safe inside a <script> element (no closing tag can appear in it)."""
    return json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")


def _overview_svg(sites: Sequence[Site], grid: ScanGrid) -> str:
    radius = max(grid.width, grid.height) / 100.0
    parts = [f'<svg viewBox="0 0 {grid.width} {grid.height}" preserveAspectRatio="none" '
             'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="detections">']  # fmt: skip
    for site in sites:
        for ring in site.outline:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in ring)
            parts.append(f'<polygon class="footprint" points="{points}"/>')
    for site in sites:
        parts.append(
            f'<a href="#det-{site.rank}" class="marker" data-rank="{site.rank}"><title>#{site.rank} score '
            f'{_num(site.properties.get("score"))}</title><circle cx="{site.col:.1f}" cy="{site.row:.1f}" '
            f'r="{radius:.1f}"/><text x="{site.col + radius * 1.2:.1f}" y="{site.row - radius * 0.6:.1f}" '
            f'font-size="{radius * 1.8:.1f}">{site.rank}</text></a>'
        )  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _crops_cell(images: list[str] | None, dates: Sequence[str], rank: int, max_crops: int) -> str:
    if images is None:
        return f'<td class="nocrops">crops are drawn for the first {max_crops} ranks only</td>'
    cells = []
    for d, date in enumerate(dates):
        cells.append(f'<span class="date">{_esc(date)}</span>')
        for b, branch in enumerate(BRANCHES):
            title = f"#{rank} {BRANCH_TITLES[branch]} {date}"
            cells.append(f'<span class="crop"><img src="{images[b * len(dates) + d]}" alt="{_esc(title)}" '
                         f'title="{_esc(title)}"></span>')
    return f'<td><div class="crops">{"".join(cells)}</div></td>'


def _row(site: Site, images: list[str] | None, dates: Sequence[str], max_crops: int) -> str:
    """One detection's table row (``images``: its crops, None where it gets none)."""
    p = site.properties
    return (
        f'<tr id="det-{site.rank}" data-rank="{site.rank}"><td class="rank">{site.rank}</td>'
        f'<td>{_num(p.get("score"))}</td><td>{_num(p.get("verifier_score"))}</td>'
        f'<td>{_num(p.get("chip_score"))}</td><td class="lonlat">{site.lon:.5f}<br>{site.lat:.5f}</td>'
        f'<td>{_esc(p.get("chip_count", "–"))}</td>{_crops_cell(images, dates, site.rank, max_crops)}'
        '<td class="review"><button type="button" class="accept" data-review="accepted" aria-pressed="false">'
        '&#10003; accept</button><button type="button" class="reject" data-review="rejected" '
        'aria-pressed="false">&#10007; reject</button></td></tr>\n'
    )  # fmt: skip


def _settings(report: dict[str, Any]) -> str:
    checkpoint, decision, chips, grid = report["checkpoint"], report["decision"], report["chips"], report["grid"]
    counts = report.get("counts") or {}
    verifier = report.get("verifier") or {}
    verify = decision.get("verify") or []
    rows = [
        ("model", f"{checkpoint.get('class')} ({checkpoint.get('preset')} preset), {checkpoint.get('path')}"),
        ("model sha256", checkpoint["sha256"]),
        ("threshold", f"{_num(decision.get('threshold'), 4)} ({decision.get('threshold_source')})"
                      + (", on the verifier's score" if verify else ", on the chip probability")),
        ("prior", f"{_num(decision.get('prior'), 5)} (training prior {_num(decision.get('train_prior'), 5)}, "
                  f"log-odds shift {_num(decision.get('logit_shift'), 3)})"),
        ("verifier", (f"{len(verify)} checkpoint(s), {verifier.get('views', '?')} views each; candidates from chip "
                      f"probability {_num(decision.get('candidate_threshold'), 4)}: {verifier.get('candidates', '?')} "
                      f"scored, {verifier.get('unverifiable', 0)} unverifiable") if verify else "none"),
        ("chips", f"{chips.get('chip_px')} px ({_num(chips.get('chip_m'), 0)} m) every {chips.get('stride_px')} px "
                  f"({_num(chips.get('stride_m'), 0)} m)"),
        ("grid", f"{grid.get('crs') if len(str(grid.get('crs'))) < 40 else 'custom CRS'}, {grid.get('width')} x "
                 f"{grid.get('height')} px of {_num(grid.get('resolution'), 1)}"),
        ("scored", f"{counts.get('scored', '?')} of {counts.get('chips', '?')} chips, "
                   f"{_num(counts.get('area_km2'), 1)} km²"),
        ("backend", f"{(report.get('backend') or {}).get('name')} on {(report.get('backend') or {}).get('device')}"),
        ("created", f"{report.get('created')} by fusionkern {report.get('fusionkern_version')}"),
    ]  # fmt: skip
    notes = decision.get("notes") or []
    if notes:
        rows.append(("notes", "; ".join(notes)))
    return "\n".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)


def date_columns(report: dict[str, Any]) -> list[str]:
    """The three dates' labels (``date k`` where a date has none)."""
    first = next(iter(report["inputs"]["bands"].values()))
    return [str(e.get("date") or f"date {k + 1}") for k, e in enumerate(first)]


def _inputs(report: dict[str, Any]) -> str:
    bands = report["inputs"]["bands"]
    head = "".join(f"<th>{_esc(d)}</th>" for d in date_columns(report))
    rows = [f"<tr><th></th>{head}</tr>"]
    for branch, entries in bands.items():
        cells = "".join(f'<td title="{_esc(e["path"])}">{_esc(Path(str(e["path"])).name)}</td>' for e in entries)
        rows.append(f"<tr><th>{_esc(branch)}</th>{cells}</tr>")
    return "\n".join(rows)


def _links(out: Path) -> str:
    names = [n for n in outputs.FINAL_OUTPUTS if n != outputs.REPORT]
    present = [n for n in names if (out / n).exists() or n in (outputs.STAC_ITEM, outputs.SCAN_JSON)]
    return " · ".join(f'<a href="{_esc(n)}">{_esc(n)}</a>' for n in present)


def page_parts(
    out: Path,
    report: dict[str, Any],
    sites: Sequence[Site],
    grid: ScanGrid,
    overview: str,
    chip_inset: float,
) -> tuple[str, str]:
    """The page's HTML before and after the detections' rows.

    Args:
        out: The scan's folder (links to the outputs present).
        report: The contents of ``scan.json`` (settings and counts).
        sites: The detections by rank, placed on the grid.
        grid: The scan grid.
        overview: The overview image (data URI).
        chip_inset: Where the peak's chip starts in a crop, as a fraction of its side (the outline drawn).
    """
    from fusionkern.scan.stac import item_id

    decision = report["decision"]
    verified = bool(decision.get("verify"))
    scan = {"id": item_id(report), "model_sha256": report["checkpoint"]["sha256"],
            "threshold": decision.get("threshold"), "prior": decision.get("prior")}  # fmt: skip
    records = [{"rank": s.rank, "lon": s.lon, "lat": s.lat, "score": s.properties.get("score")} for s in sites]
    summary = (f"{len(sites)} detection(s) at threshold {_num(decision.get('threshold'), 4)}"
               + (" on the verifier's score" if verified else ""))  # fmt: skip
    head = _HEAD.substitute(
        title=_esc(f"fusionkern scan review: {out.name}"),
        heading=_esc(out.name),
        summary=_esc(summary),
        links=_links(out),
        overview=overview,
        svg=_overview_svg(sites, grid),
        crops_head="".join(f"<span>{_esc(BRANCH_TITLES[b])}</span>" for b in BRANCHES),
        chip_inset=f"{100 * chip_inset:.2f}%",
        style=_STYLE,
    )  # fmt: skip
    tail = _TAIL.substitute(
        empty="" if sites else '<tr><td colspan="8" class="empty">no detection above the threshold</td></tr>',
        settings=_settings(report),
        inputs=_inputs(report),
        scan_json=_script_json(scan),
        sites_json=_script_json(records),
        script=_SCRIPT,
    )  # fmt: skip
    return head, tail


def write_review(
    out: str | Path,
    report: dict[str, Any],
    grid: ScanGrid,
    layout: ChipLayout,
    inputs: ScanInputs,
    scores: np.ndarray,
    composite: Sequence[np.ndarray] | None,
    max_crops: int = MAX_CROPS,
) -> dict[str, Any]:
    """Writes ``report.html`` for the detections in ``out/detections.geojson``, atomically.

    The page is written as it is made, one detection's crops at a time, so that a scan's memory does not grow with
    its detections.

    Args:
        out: The scan's folder (``detections.geojson`` already written there).
        report: The contents of ``scan.json`` (``counts`` may still be missing).
        grid: The scan grid.
        layout: The chips.
        inputs: The scan's rasters (crops are read from them).
        scores: (rows, cols) chip probabilities at the deployment prior, NaN where skipped.
        composite: B7, B6, B10 of the first date at reduced size (:func:`read_composite`); None draws the
            overview from the scores alone (a scan without a quick look reads no composite).
        max_crops: Ranks that get crops.

    Returns:
        ``{"page", "detections", "with_crops", "bytes", "seconds"}``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    sites = read_sites(out / outputs.GEOJSON)
    place_sites(sites, grid)
    drawn = sites[: max(0, int(max_crops))]
    crop_px = max(layout.chip_px + 4, CROP_CHIPS * layout.chip_px)
    decision = report["decision"]
    chip_threshold = decision.get("candidate_threshold") if decision.get("verify") else decision.get("threshold")
    overview = overview_image(composite, scores, grid, layout, float(chip_threshold or 0.0))
    head, tail = page_parts(out, report, sites, grid, overview, ((crop_px - layout.chip_px) // 2) / crop_px)
    del overview
    dates = date_columns(report)
    with atomic_output(out / outputs.REPORT) as tmp, open(tmp, "w", encoding="utf-8") as page:
        page.write(head)
        crops = iter_crops(inputs, grid, layout, drawn, crop_px)
        for k, site in enumerate(sites):
            page.write(_row(site, crop_images(next(crops)) if k < len(drawn) else None, dates, max_crops))
        page.write(tail)
        page.flush()
        os.fsync(page.fileno())
        size = page.tell()
    return {"page": outputs.REPORT, "detections": len(sites), "with_crops": len(drawn), "bytes": size,
            "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Rebuilding from a finished scan
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FinishedScan:
    """What a finished scan's folder says about it.

    Attributes:
        folder: The folder.
        report: Its ``scan.json``.
        grid: The scan grid.
        layout: The chips.
        inputs: The rasters it read.
    """

    folder: Path
    report: dict[str, Any]
    grid: ScanGrid
    layout: ChipLayout
    inputs: ScanInputs


def load_scan(folder: str | Path) -> FinishedScan:
    """Reads a finished scan's ``scan.json`` back into its grid, chips and inputs.

    Raises:
        InputError: No such folder, no ``scan.json`` (not a finished scan), or one without what is needed.
    """
    from rasterio.crs import CRS

    from fusionkern.readers import INPUT_BANDS

    folder = Path(folder)
    path = folder / outputs.SCAN_JSON
    if not folder.is_dir():
        raise InputError(f"scan folder {folder} not found")
    if not path.is_file():
        raise InputError(f"{folder} holds no {outputs.SCAN_JSON}: not a finished scan (rerun it with --resume)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        g, chips, described = report["grid"], report["chips"], report["inputs"]
        grid = ScanGrid(CRS.from_user_input(g["crs"]).to_wkt(), tuple(g["transform"])[:6], int(g["width"]),
                        int(g["height"]))  # fmt: skip
        layout = ChipLayout(int(chips["chip_px"]), int(chips["stride_px"]), int(chips["rows"]), int(chips["cols"]))
        bands = {
            branch: [BandInput(str(e["path"]), INPUT_BANDS[branch], e.get("mtl"), str(e.get("date") or ""))
                     for e in described["bands"][branch]]
            for branch in INPUT_BANDS
        }  # fmt: skip
        qa = [str(q["path"]) if q else None for q in described.get("qa") or [None] * 3]
        inputs = ScanInputs(bands, qa, bool(described.get("calibrate", True)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} cannot be read back ({type(exc).__name__}: {exc}): was it written by "
                         "fusionkern scan?") from None  # fmt: skip
    from fusionkern.readers import is_gdal_path

    missing = [p for p in inputs.rasters() if not is_gdal_path(p) and not Path(p).is_file()]
    if missing:
        raise InputError(f"input raster {missing[0]} recorded in {path} not found: the review page's crops are read "
                         "from the scan's inputs")  # fmt: skip
    return FinishedScan(folder, report, grid, layout, inputs)


def read_scores(path: str | Path) -> np.ndarray:
    """The scores raster (``scores.tif``) as float32, NaN where skipped."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            return src.read(1).astype(np.float32)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def rebuild(folder: str | Path, max_crops: int = MAX_CROPS) -> dict[str, Any]:
    """Remakes ``report.html`` and ``scan.stac.json`` (which lists the page with its checksum) of a finished scan.

    Args:
        folder: The scan's output folder.
        max_crops: Ranks that get crops.

    Returns:
        What :func:`write_review` returned, with ``stac_seconds``.

    Raises:
        InputError: Not a finished scan, or its inputs are gone.
    """
    from fusionkern.scan.stac import write_item

    scan = load_scan(folder)
    scores = read_scores(scan.folder / outputs.SCORES)
    composite = read_composite(scan.inputs, scan.grid, scan.layout)
    stats = write_review(scan.folder, scan.report, scan.grid, scan.layout, scan.inputs, scores, composite, max_crops)
    t0 = time.perf_counter()
    write_item(scan.folder, scan.report)
    stats["stac_seconds"] = round(time.perf_counter() - t0, 3)
    return stats


# --------------------------------------------------------------------------------------------------------------
# Page template
# --------------------------------------------------------------------------------------------------------------

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
header { position: sticky; top: 0; z-index: 2; background: #20232a; color: #fff; padding: 8px 16px;
         display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
header h1 { font-size: 17px; margin: 0; }
header button { font: inherit; padding: 3px 10px; }
main { padding: 8px 16px 32px; }
section { margin: 16px 0; }
h2 { font-size: 15px; margin: 0 0 6px; }
table { border-collapse: collapse; }
.settings th, .inputs th { text-align: left; padding: 2px 12px 2px 0; font-weight: 600; vertical-align: top; }
.settings td, .inputs td { padding: 2px 12px 2px 0; font-family: ui-monospace, monospace; font-size: 12px; }
.map { position: relative; width: min(100%, 960px); line-height: 0; }
.map img { display: block; width: 100%; height: auto; image-rendering: pixelated; }
.map svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.footprint { fill: none; stroke: #00e5ff; stroke-width: 1.2; vector-effect: non-scaling-stroke; }
.marker circle { fill: rgba(0, 229, 255, 0.15); stroke: #00e5ff; stroke-width: 2; vector-effect: non-scaling-stroke; }
.marker text { fill: #fff; stroke: #000; stroke-width: 3px; paint-order: stroke; font-weight: 700;
               font-family: system-ui, sans-serif; vector-effect: non-scaling-stroke; }
.marker[data-review="accepted"] circle { stroke: #3ddc84; fill: rgba(61, 220, 132, 0.3); }
.marker[data-review="rejected"] circle { stroke: #ff5252; fill: rgba(255, 82, 82, 0.3); }
.detections th { position: sticky; top: 44px; background: #eceff1; z-index: 1; text-align: left; padding: 4px 8px;
                 vertical-align: bottom; }
.detections td { border-top: 1px solid #ddd; padding: 6px 8px; vertical-align: top; }
.detections tr[data-review="accepted"] { background: #e8f8ee; }
.detections tr[data-review="rejected"] { background: #fdecec; }
.rank { font-weight: 700; font-size: 16px; }
.lonlat { font-family: ui-monospace, monospace; font-size: 12px; }
.crops, .crops-head { display: grid; grid-template-columns: 64px repeat(5, 72px); gap: 2px; align-items: center; }
.crop { position: relative; display: block; width: 72px; height: 72px; }
.crop img { width: 72px; height: 72px; image-rendering: pixelated; display: block; }
.crop::after { content: ""; position: absolute; inset: var(--chip-inset); outline: 1px solid #00e5ff;
               pointer-events: none; }
.crops .date, .crops-head span { font-size: 11px; color: #555; }
.review button { display: block; width: 92px; margin: 0 0 6px; font: inherit; padding: 4px; cursor: pointer; }
.review button[aria-pressed="true"].accept { background: #3ddc84; }
.review button[aria-pressed="true"].reject { background: #ff5252; color: #fff; }
.empty, .nocrops { color: #666; font-style: italic; }
footer { color: #666; font-size: 12px; }
"""

_SCRIPT = """
"use strict";
const SCAN = JSON.parse(document.getElementById("scan-data").textContent);
const SITES = JSON.parse(document.getElementById("sites-data").textContent);
const KEY = "fusionkern-review:" + SCAN.id;
let decisions = {};
try { decisions = JSON.parse(localStorage.getItem(KEY) || "{}") || {}; } catch (error) { decisions = {}; }

function save() {
  try { localStorage.setItem(KEY, JSON.stringify(decisions)); } catch (error) { /* storage refused: keep in memory */ }
}

function setDecision(rank, value) {
  if (decisions[rank] === value) { delete decisions[rank]; } else { decisions[rank] = value; }
  save();
  show();
}

function show() {
  let accepted = 0, rejected = 0;
  for (const site of SITES) {
    const value = decisions[site.rank] || "";
    const row = document.getElementById("det-" + site.rank);
    row.dataset.review = value;
    row.querySelector("button.accept").setAttribute("aria-pressed", String(value === "accepted"));
    row.querySelector("button.reject").setAttribute("aria-pressed", String(value === "rejected"));
    const marker = document.querySelector('.marker[data-rank="' + site.rank + '"]');
    if (marker) { marker.dataset.review = value; }
    if (value === "accepted") { accepted += 1; } else if (value === "rejected") { rejected += 1; }
  }
  document.getElementById("tally").textContent = accepted + " accepted, " + rejected + " rejected, " +
    (SITES.length - accepted - rejected) + " to review";
}

// The decisions as GeoJSON points at the peaks: fusionkern evaluate --truth and fusionkern mine --plants read the
// features of kind "cement" (accepted) as plants and leave the others out.
function reviewGeoJSON() {
  const features = [];
  for (const site of SITES) {
    const value = decisions[site.rank];
    if (!value) { continue; }
    features.push({
      type: "Feature",
      geometry: {type: "Point", coordinates: [site.lon, site.lat]},
      properties: {name: "detection_" + site.rank, rank: site.rank, review: value,
                   kind: value === "accepted" ? "cement" : "landcover", score: site.score},
    });
  }
  return {type: "FeatureCollection",
          fusionkern: {review_of: SCAN.id, model_sha256: SCAN.model_sha256, threshold: SCAN.threshold,
                       detections: SITES.length, reviewed: features.length},
          features: features};
}

function exportReview() {
  const text = JSON.stringify(reviewGeoJSON(), null, 1) + "\\n";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {type: "application/geo+json"}));
  link.download = "review.geojson";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-review]");
  if (button) { setDecision(Number(button.closest("tr").dataset.rank), button.dataset.review); }
});
document.getElementById("export").addEventListener("click", exportReview);
document.getElementById("clear").addEventListener("click", () => {
  if (confirm("Forget every decision on this page?")) { decisions = {}; save(); show(); }
});
show();
"""

_HEAD = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$style</style>
</head>
<body>
<header>
<h1>$heading</h1>
<span>$summary</span>
<span id="tally"></span>
<button type="button" id="export" title="Download the decisions as GeoJSON (accepted: kind cement)">
Export review (GeoJSON)</button>
<button type="button" id="clear">Clear</button>
</header>
<main>
<section class="outputs"><h2>Outputs</h2>$links</section>
<section><h2>Overview</h2>
<div class="map"><img id="overview" src="$overview" alt="scores over a B7 / B6 / B10 composite of the first date">
$svg</div>
</section>
<section><h2>Detections</h2>
<table class="detections" style="--chip-inset: $chip_inset">
<thead><tr><th>rank</th><th>score</th><th>verifier</th><th>best chip</th><th>peak lon<br>lat</th><th>chips</th>
<th><div class="crops-head"><span></span>$crops_head</div></th><th>review</th></tr></thead>
<tbody>
""")

_TAIL = Template("""$empty</tbody>
</table>
</section>
<section><h2>Settings</h2><table class="settings">$settings</table></section>
<section><h2>Inputs</h2><table class="inputs">$inputs</table></section>
<footer>Written by fusionkern. Crops: the five inputs in the three dates around each peak, each stretched on its own
2-98 percentiles; brightness temperature in a heat scale (no data purple), reflectance and ratio in grey (no data
black); the cyan square is the chip centred on the peak, which the verifier scores.</footer>
</main>
<script type="application/json" id="scan-data">$scan_json</script>
<script type="application/json" id="sites-data">$sites_json</script>
<script>$script</script>
</body>
</html>
""")
