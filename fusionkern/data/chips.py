"""Cutting a FusionNet training set from Landsat-8 rasters and plant locations.

Output, the site layout read by :mod:`fusionkern.data`::

    <root>/
      sites.csv                      # site,label,lon,lat (label = cement|landcover)
      cement/<site>/b10.tif  b11.tif  b7.tif  b6.tif  b76.tif
      landcover/<site>/...

Each ``<branch>.tif`` is a 3-band float32 GeoTIFF, one band per date in the user's date order, nodata NaN, band
descriptions set to the dates (or the input file names). b10/b11 are brightness temperature in kelvin, b6/b7 TOA
reflectance, b76 the guarded ratio b7 / b6.

Cement chips are centred on the plants. Landcover chips are taken as the paper does, about 3.5 km around each
plant: a box centred on a random bearing at that distance (seeded), redrawn while it overlaps a plant's chip or
another landcover chip. Chips that leave the rasters, hold nodata or (where a QA band is given) cloud are skipped
and counted.

All rasters must share one CRS (projected, e.g. UTM), one pixel size and one pixel grid; their extents may
differ. Chips are located on the grid of the first date's b10 raster and read from every raster at the same
ground position.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from fusionkern import BRANCHES, CLASSES, landsat
from fusionkern.data.splits import MIN_PER_CLASS
from fusionkern.errors import ConfigError, InputError
from fusionkern.files import check_writable, folder_built_aside, output_errors
from fusionkern.readers import (  # discovery lives with the readers; re-exported for existing callers
    INPUT_BANDS,
    N_DATES,
    BandInput,
    ChipInputs,
    RasterSource,
    calibrate_band,
    describe_calibration,
    inputs_from_manifest,
    inputs_from_scenes,
    qa_invalid_mask,
)

SITES_CSV = "sites.csv"
SITES_COLUMNS = ("site", "label", "lon", "lat")

_LON_COLUMNS = ("lon", "longitude", "lng", "long", "x")
_LAT_COLUMNS = ("lat", "latitude", "y")
_NAME_COLUMNS = ("name", "plant", "plant_name", "site")
_GRID_TOLERANCE_PX = 1e-3
_OFF_GRID = -1e9


# --------------------------------------------------------------------------------------------------------------
# Inputs: plants, rasters, options
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plant:
    """A plant location in WGS84 degrees."""

    name: str
    lon: float
    lat: float


@dataclass(frozen=True)
class ChipOptions:
    """How chips are cut.

    Attributes:
        chip_m: Chip side in metres (1050 m = 35 px at 30 m).
        landcover_per_plant: Landcover chips drawn around each plant.
        landcover_km: Distance of a landcover chip's centre from its plant, in km.
        seed: Seed of the random bearings.
        max_cloud: Largest fraction of a chip flagged by a QA band (any date) that is still kept.
        calibrate: Convert DN to reflectance / brightness temperature where an MTL (or a Level-2 name) says how.
        tries: Bearings drawn per landcover chip before giving up on overlaps.
        context_px: Pixels of context kept on every side of a chip, so that training can shift the chip window
            (:class:`~fusionkern.data.transforms.SiteAugment`) as the scan's chips fall at any offset. The files
            hold ``chip + 2 * context_px`` pixels a side; readers centre-crop them back to the chip.
    """

    chip_m: float = 1050.0
    landcover_per_plant: int = 3
    landcover_km: float = 3.5
    seed: int = 0
    max_cloud: float = 0.0
    calibrate: bool = True
    tries: int = 10
    context_px: int = 0

    def validate(self) -> None:
        """Raises ConfigError on values that cannot work."""
        if not self.chip_m > 0:
            raise ConfigError(f"chip size must be positive, got {self.chip_m} m")
        if self.landcover_per_plant < 0:
            raise ConfigError(f"landcover chips per plant must be >= 0, got {self.landcover_per_plant}")
        if not self.landcover_km > 0:
            raise ConfigError(f"landcover distance must be positive, got {self.landcover_km} km")
        if not 0.0 <= self.max_cloud <= 1.0:
            raise ConfigError(f"max cloud fraction must be within 0..1, got {self.max_cloud}")
        if self.tries < 1:
            raise ConfigError(f"tries must be >= 1, got {self.tries}")
        if self.context_px < 0:
            raise ConfigError(f"--context-px must be >= 0, got {self.context_px}")


def read_plants(path: str | Path) -> list[Plant]:
    """Reads plant locations from a CSV (lon/lat columns, optional name) or a GeoJSON file of points.

    CSV columns are matched case-insensitively: ``lon``/``longitude``/``lng``/``x``, ``lat``/``latitude``/``y``
    and optionally ``name``/``plant``. GeoJSON coordinates are WGS84 ``[lon, lat]``; a ``name`` property is used
    when present, and features whose ``kind`` property is not ``cement`` (look-alikes in a truth file) are left
    out. Plants without a name are called ``plant_<row>``.

    Args:
        path: ``.csv`` (comma, semicolon or tab separated), ``.geojson`` or ``.json`` file.

    Returns:
        The plants, in file order.

    Raises:
        InputError: Missing file, no lon/lat columns, a value that is not a coordinate, or no plants at all.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"plants file not found: {path}")
    if path.suffix.lower() in (".geojson", ".json"):
        plants = _read_plants_geojson(path)
    else:
        plants = _read_plants_csv(path)
    if not plants:
        raise InputError(f"plants file {path} holds no plants")
    return plants


def _pick_column(fields: Sequence[str], names: Sequence[str]) -> str | None:
    lowered = {f.strip().lower(): f for f in fields}
    return next((lowered[n] for n in names if n in lowered), None)


def _read_plants_csv(path: Path) -> list[Plant]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        dialect: Any = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    fields = reader.fieldnames or []
    lon_col, lat_col = _pick_column(fields, _LON_COLUMNS), _pick_column(fields, _LAT_COLUMNS)
    if lon_col is None or lat_col is None:
        raise InputError(f"plants file {path} needs lon and lat columns, found: {', '.join(fields) or 'none'}")
    name_col = _pick_column(fields, _NAME_COLUMNS)
    plants = []
    for row_number, row in enumerate(reader, start=2):
        if not any((value or "").strip() for value in row.values()):
            continue
        where = f"{path}, line {row_number}"
        lon = _coordinate(row.get(lon_col), "lon", 180.0, where)
        lat = _coordinate(row.get(lat_col), "lat", 90.0, where)
        name = (row.get(name_col) or "").strip() if name_col else ""
        plants.append(Plant(name or f"plant_{len(plants) + 1}", lon, lat))
    return plants


def _read_plants_geojson(path: Path) -> list[Plant]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"plants file {path} is not valid GeoJSON: {exc}") from exc
    features = data.get("features") if isinstance(data, dict) and data.get("type") == "FeatureCollection" else [data]
    plants = []
    for index, feature in enumerate(features or []):
        where = f"{path}, feature {index}"
        geometry = feature.get("geometry") if isinstance(feature, dict) and "geometry" in feature else feature
        if not isinstance(geometry, dict) or geometry.get("type") != "Point":
            raise InputError(f"{where}: expected a Point geometry")
        coords = geometry.get("coordinates") or []
        if len(coords) < 2:
            raise InputError(f"{where}: a Point needs [lon, lat] coordinates")
        lon = _coordinate(coords[0], "lon", 180.0, where)
        lat = _coordinate(coords[1], "lat", 90.0, where)
        properties = (feature.get("properties") or {}) if isinstance(feature, dict) else {}
        if str(properties.get("kind", "cement")).lower() != "cement":
            continue  # a truth file that also lists look-alikes (``kind: confuser``) names plants ``kind: cement``
        name = str(properties.get("name") or "").strip()
        plants.append(Plant(name or f"plant_{len(plants) + 1}", lon, lat))
    return plants


def _coordinate(value: Any, axis: str, limit: float, where: str) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = math.nan
    if not -limit <= number <= limit:
        raise InputError(f"{where}: {axis} {value!r} is not a WGS84 coordinate within +-{limit:g} degrees")
    return number


# --------------------------------------------------------------------------------------------------------------
# The raster stack: one pixel grid, many files
# --------------------------------------------------------------------------------------------------------------


class _Stack:
    """The open rasters of all bands and dates, checked to share one CRS and pixel grid."""

    def __init__(self, inputs: ChipInputs, options: ChipOptions):
        self.sources: dict[str, list[RasterSource]] = {}
        self.qa: list[RasterSource | None] = []
        self.mtl: dict[Path, dict[str, Any]] = {}
        self.inputs = inputs
        self.calibrate = options.calibrate
        try:
            for branch in INPUT_BANDS:
                self.sources[branch] = [RasterSource(b.path) for b in inputs.bands[branch]]
            self.qa = [RasterSource(p) if p else None for p in inputs.qa]
            self.ref = self.sources["b10"][0]
            self.offsets = {id(s): self._grid_offset(s) for s in self._all_sources()}
            self.size = self._chip_pixels(options.chip_m)
            self.context = int(options.context_px)
            if options.calibrate:
                self.mtl = {b.mtl: landsat.read_mtl(b.mtl) for bs in inputs.bands.values() for b in bs if b.mtl}
        except BaseException:
            self.close()
            raise

    def _all_sources(self) -> Iterable[RasterSource]:
        yield from (s for sources in self.sources.values() for s in sources)
        yield from (s for s in self.qa if s is not None)

    def close(self) -> None:
        for source in self._all_sources():
            source.close()

    def _grid_offset(self, source: RasterSource) -> tuple[int, int]:
        """Whole-pixel (row, col) offset of ``source``'s grid from the reference grid."""
        ref = self.ref
        if source.crs != ref.crs:
            raise InputError(f"{source.path} is in {source.crs}, {ref.path} in {ref.crs}: reproject to one CRS")
        if not np.allclose(source.res, ref.res, rtol=1e-6):
            raise InputError(f"{source.path} has {source.res} m pixels, {ref.path} {ref.res}: resample to one size")
        if source.transform.b or source.transform.d or source.transform.e > 0:
            raise InputError(f"{source.path} is rotated or not north-up; warp it to a north-up grid")
        col, row = ~source.transform * (ref.transform.c, ref.transform.f)
        if max(abs(col - round(col)), abs(row - round(row))) > _GRID_TOLERANCE_PX:
            raise InputError(f"{source.path} is not on the pixel grid of {ref.path}: resample to one grid")
        return int(round(row)), int(round(col))

    def _chip_pixels(self, chip_m: float) -> tuple[int, int]:
        """Chip (rows, cols) for a side of ``chip_m`` metres."""
        crs = self.ref.crs
        if crs is None or not crs.is_projected:
            raise InputError(f"{self.ref.path} is not in a projected CRS: chips need metres (e.g. UTM)")
        metres = self.metres_per_unit
        rows, cols = (max(1, round(chip_m / (r * metres))) for r in (self.ref.res[1], self.ref.res[0]))
        return int(rows), int(cols)

    @property
    def metres_per_unit(self) -> float:
        return float(self.ref.crs.linear_units_factor[1])

    def window_at(self, row: float, col: float) -> tuple[int, int]:
        """Top-left (row, col) of the chip whose centre is closest to the reference pixel position given."""
        rows, cols = self.size
        return math.floor(row - rows / 2 + 0.5), math.floor(col - cols / 2 + 0.5)

    @property
    def window_size(self) -> tuple[int, int]:
        """(rows, cols) of what is read and written per site: the chip and its context on every side."""
        return self.size[0] + 2 * self.context, self.size[1] + 2 * self.context

    def _window(self, source: RasterSource, top: int, left: int) -> Any:
        """The window of the chip at (top, left) with its context, on ``source``'s grid."""
        from rasterio.windows import Window

        d_row, d_col = self.offsets[id(source)]
        rows, cols = self.window_size
        return Window(left + d_col - self.context, top + d_row - self.context, cols, rows)

    def inside(self, top: int, left: int) -> bool:
        return all(s.contains(self._window(s, top, left)) for s in self._all_sources())

    def read_branches(self, top: int, left: int) -> dict[str, np.ndarray]:
        """The five branches of the chip at (top, left): (3, rows, cols) float32 each, NaN at nodata."""
        stack = {}
        for branch, sources in self.sources.items():
            dates = []
            for source, band in zip(sources, self.inputs.bands[branch]):
                values = source.read(self._window(source, top, left))
                if self.calibrate:
                    values = calibrate_band(values, band.path, band.band, self.mtl.get(band.mtl))
                dates.append(values)
            stack[branch] = np.stack(dates)
        stack["b76"] = landsat.band_ratio(stack["b7"], stack["b6"])
        return {branch: stack[branch] for branch in BRANCHES}

    def cloud_fraction(self, top: int, left: int) -> float:
        """Fraction of the chip flagged by the QA band of any date (0 without QA bands)."""
        flagged = np.zeros(self.window_size, dtype=bool)
        for source in self.qa:
            if source is not None:
                words = source.read(self._window(source, top, left), out_dtype=None)
                flagged |= qa_invalid_mask(words, source.path)
        return float(flagged.mean())

    def descriptions(self, branch: str) -> tuple[str, ...]:
        key = branch if branch in INPUT_BANDS else "b7"
        return tuple(b.label or b.path.name for b in self.inputs.bands[key])


# --------------------------------------------------------------------------------------------------------------
# Planning sites
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Site:
    site: str
    label: str
    name: str
    top: int
    left: int
    lon: float = math.nan
    lat: float = math.nan


@dataclass
class ChipReport:
    """What a chips run wrote and skipped.

    Attributes:
        plants: Plants read.
        written: Sites written, per label (``cement``, ``landcover``).
        skipped: Sites skipped, per label and reason (``outside``, ``nodata``, ``cloud``, ``overlap``).
        skipped_sites: ``(site, name, reason)`` of each skipped site.
        chip_px: Chip (rows, cols) in pixels.
        out: The dataset folder.
        calibration: Per date, how each band was calibrated (:func:`fusionkern.readers.describe_calibration`).
        warnings: What the dataset lacks for ``fusionkern train`` and what to change.
    """

    plants: int = 0
    written: dict[str, int] = field(default_factory=lambda: {label: 0 for label in CLASSES})
    skipped: dict[str, dict[str, int]] = field(
        default_factory=lambda: {label: {"outside": 0, "nodata": 0, "cloud": 0, "overlap": 0} for label in CLASSES}
    )
    skipped_sites: list[tuple[str, str, str]] = field(default_factory=list)
    chip_px: tuple[int, int] = (0, 0)
    out: Path | None = None
    calibration: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def skip(self, site: _Site, reason: str) -> None:
        self.skipped[site.label][reason] += 1
        self.skipped_sites.append((site.site, site.name, reason))

    def lines(self) -> list[str]:
        """The report as short human-readable lines."""
        rows, cols = self.chip_px
        lines = [
            f"wrote {self.written['cement']} cement and {self.written['landcover']} landcover sites "
            f"({rows} x {cols} px) from {self.plants} plants to {self.out}"
        ]
        for label in CLASSES:
            counts = {k: v for k, v in self.skipped[label].items() if v}
            if counts:
                detail = ", ".join(f"{v} {k}" for k, v in counts.items())
                lines.append(f"skipped {label}: {detail}")
        if self.calibration:
            lines.append("calibration: " + "; ".join(_calibration_line(date) for date in self.calibration))
        lines.extend(f"warning: {text}" for text in self.warnings)
        return lines


def _calibration_line(date: dict[str, Any]) -> str:
    methods = sorted(set(date["bands"].values()))
    said = {"mtl": f"DN converted with {Path(date['mtl']).name if date['mtl'] else 'the MTL'}",
            "level2": "Level-2 scaling", "stored": "values as stored"}  # fmt: skip
    return f"{date['date']}: " + ", ".join(said[m] for m in methods)


def _plant_pixels(stack: _Stack, plants: Sequence[Plant]) -> np.ndarray:
    """Fractional (row, col) of each plant on the reference grid, shape (N, 2)."""
    from rasterio.warp import transform

    xs, ys = transform("EPSG:4326", stack.ref.crs, [p.lon for p in plants], [p.lat for p in plants])
    cols, rows = ~stack.ref.transform * (np.asarray(xs), np.asarray(ys))
    # A point the projection cannot represent is placed far off the grid, so it is counted as outside.
    return np.nan_to_num(np.stack([rows, cols], axis=1), nan=_OFF_GRID, posinf=_OFF_GRID, neginf=_OFF_GRID)


def _lonlat(stack: _Stack, sites: Sequence[_Site]) -> None:
    """Fills the lon/lat of chip centres from their windows."""
    from rasterio.warp import transform

    if not sites:
        return
    rows, cols = stack.size
    centre_cols = np.array([s.left + cols / 2 for s in sites])
    centre_rows = np.array([s.top + rows / 2 for s in sites])
    xs, ys = stack.ref.transform * (centre_cols, centre_rows)
    lons, lats = transform(stack.ref.crs, "EPSG:4326", list(xs), list(ys))
    for site, lon, lat in zip(sites, lons, lats):
        site.lon, site.lat = lon, lat


def _overlaps(boxes: list[tuple[int, int]], top: int, left: int, size: tuple[int, int]) -> bool:
    if not boxes:
        return False
    corners = np.asarray(boxes)
    return bool(np.any((np.abs(corners[:, 0] - top) < size[0]) & (np.abs(corners[:, 1] - left) < size[1])))


def _plan_sites(
    stack: _Stack, plants: Sequence[Plant], options: ChipOptions, report: ChipReport
) -> list[_Site]:
    """Windows of every cement chip and of the landcover chips drawn around them."""
    digits = max(4, len(str(len(plants))))
    pixels = _plant_pixels(stack, plants)
    cement = []
    for index, (plant, (row, col)) in enumerate(zip(plants, pixels), start=1):
        top, left = stack.window_at(row, col)
        cement.append(_Site(f"plant_{index:0{digits}d}", "cement", plant.name, top, left, plant.lon, plant.lat))
    boxes = [(s.top, s.left) for s in cement]
    rng = np.random.default_rng(options.seed)
    distance_px = options.landcover_km * 1000.0 / stack.metres_per_unit / np.asarray(stack.ref.res)
    landcover = []
    for index, (plant, (row, col)) in enumerate(zip(plants, pixels), start=1):
        for slot in range(1, options.landcover_per_plant + 1):
            site = _Site(f"lc_{index:0{digits}d}_{slot}", "landcover", plant.name, 0, 0)
            for _ in range(options.tries):
                bearing = rng.uniform(0.0, 2.0 * math.pi)  # clockwise from north
                site.top, site.left = stack.window_at(
                    row - math.cos(bearing) * distance_px[1], col + math.sin(bearing) * distance_px[0]
                )
                if not _overlaps(boxes, site.top, site.left, stack.size):
                    boxes.append((site.top, site.left))
                    landcover.append(site)
                    break
            else:
                report.skip(site, "overlap")
    _lonlat(stack, landcover)
    return cement + landcover


# --------------------------------------------------------------------------------------------------------------
# Cutting and writing
# --------------------------------------------------------------------------------------------------------------


def _write_site(stack: _Stack, site: _Site, chips: dict[str, np.ndarray], root: Path) -> None:
    from rasterio import windows

    rows, cols = stack.window_size
    window = windows.Window(site.left - stack.context, site.top - stack.context, cols, rows)
    write_site_files(
        root / site.label / site.site, chips, stack.ref.crs, windows.transform(window, stack.ref.transform),
        {branch: stack.descriptions(branch) for branch in chips},
        {"site": site.site, "label": site.label, "plant": site.name, "context_px": stack.context},
    )  # fmt: skip


def write_site_files(
    folder: Path,
    chips: dict[str, np.ndarray],
    crs: Any,
    transform: Any,
    descriptions: dict[str, Sequence[str]],
    tags: dict[str, Any],
) -> None:
    """One site folder of the site layout: a 3-band float32 GeoTIFF per branch (one band per date).

    Args:
        folder: The site's folder (created; must not exist).
        chips: Branch -> (3, rows, cols) values, NaN at nodata.
        crs: Their CRS.
        transform: The affine transform of their top-left pixel.
        descriptions: Branch -> the three band descriptions (the dates).
        tags: GDAL metadata written in every file (the branch is added).
    """
    import rasterio

    folder.mkdir(parents=True)
    rows, cols = next(iter(chips.values())).shape[-2:]
    profile = {
        "driver": "GTiff", "dtype": "float32", "count": N_DATES, "width": cols, "height": rows, "crs": crs,
        "transform": transform, "nodata": float("nan"), "compress": "deflate", "predictor": 3,
    }  # fmt: skip
    for branch, data in chips.items():
        # Encoded in memory, then written by Python: GDAL reports a write that fails on disk (a full disk) only as a
        # log line and leaves a broken file, where Python's write raises.
        with rasterio.MemoryFile() as memory:
            with memory.open(**profile) as dst:
                dst.write(data)
                for band, description in enumerate(descriptions[branch], start=1):
                    dst.set_band_description(band, description)
                dst.update_tags(**{k: str(v) for k, v in tags.items()}, branch=branch)
            (folder / f"{branch}.tif").write_bytes(memory.read())


def _cut_site(stack: _Stack, site: _Site, options: ChipOptions) -> tuple[dict[str, np.ndarray] | None, str]:
    """The site's five branches, or None and the reason it is skipped."""
    if not stack.inside(site.top, site.left):
        return None, "outside"
    chips = stack.read_branches(site.top, site.left)
    if any(np.isnan(data).any() for data in chips.values()):
        return None, "nodata"
    if stack.cloud_fraction(site.top, site.left) > options.max_cloud:
        return None, "cloud"
    return chips, ""


def cut_chips(inputs: ChipInputs, plants: Sequence[Plant], root: str | Path, options: ChipOptions) -> ChipReport:
    """Cuts the training set into ``root`` (an existing, empty folder), in the site layout.

    Args:
        inputs: The rasters, per band and date.
        plants: Plant locations.
        root: Output folder; it must exist and be empty.
        options: Chip size, landcover sampling, cloud threshold.

    Returns:
        The counts of sites written and skipped.

    Raises:
        InputError: Rasters that do not share a grid or cannot be read, or no cement chip at all, or no landcover
            chip where some were asked for (the message says which ``--landcover-km`` would fit).
    """
    options.validate()
    root = Path(root)
    report = ChipReport(plants=len(plants), out=root)
    stack = _Stack(inputs, options)
    try:
        _check_overlap(stack)
        report.chip_px = stack.size
        written = []
        for site in _plan_sites(stack, plants, options, report):
            chips, reason = _cut_site(stack, site, options)
            if chips is None:
                report.skip(site, reason)
                continue
            _write_site(stack, site, chips, root)
            report.written[site.label] += 1
            written.append(site)
    finally:
        stack.close()
    if not report.written["cement"]:
        raise InputError(
            "no cement chip could be cut: " + "; ".join(report.lines()[1:] or ["no plants"])
            + " (are the plants inside the rasters, with lon and lat in that order?)"
        )
    if options.landcover_per_plant and not report.written["landcover"]:
        raise InputError("no landcover chip could be cut (" + _landcover_advice(stack, plants, options, report) + ")")
    for label in CLASSES:
        if report.written[label] < MIN_PER_CLASS:
            more = "--landcover-per-plant" if label == "landcover" else "plants"
            report.warnings.append(
                f"{report.written[label]} {label} site(s): fusionkern train needs at least {MIN_PER_CLASS} per class "
                f"(one each for training, validation and test); add {more} before training"
            )
    report.calibration = describe_calibration(inputs.bands, options.calibrate)
    _write_sites_csv(root / SITES_CSV, written)
    return report


def _check_overlap(stack: _Stack) -> None:
    """Names a raster that shares no ground with the first date's b10 (every chip would be skipped as outside)."""
    ref = stack.ref
    for source in stack._all_sources():
        d_row, d_col = stack.offsets[id(source)]  # the reference grid's origin, in the source's pixels
        if not (d_row < source.height and d_row + ref.height > 0 and d_col < source.width and d_col + ref.width > 0):
            raise InputError(f"{source.path} does not overlap {ref.path}: every date and band must cover the same "
                             "ground")  # fmt: skip


def _landcover_advice(stack: _Stack, plants: Sequence[Plant], options: ChipOptions, report: ChipReport) -> str:
    """Why no landcover chip fitted, and which --landcover-km would (from the plants' room to the raster edges)."""
    skipped = ", ".join(f"{n} {why}" for why, n in report.skipped["landcover"].items() if n) or "none drawn"
    metres = stack.metres_per_unit * stack.ref.res[0]
    height_km, width_km = (n * metres / 1000.0 for n in (stack.ref.height, stack.ref.width))
    rows, cols = _plant_pixels(stack, plants).T
    room_px = np.minimum.reduce([rows, cols, stack.ref.height - rows, stack.ref.width - cols])
    chip_km = max(stack.size) * metres / 1000.0
    fit_km = float(np.median(room_px)) * metres / 1000.0 - chip_km / 2.0
    said = (f"skipped: {skipped}; the rasters span {width_km:.1f} x {height_km:.1f} km and landcover chips are "
            f"drawn {options.landcover_km:g} km from each plant")  # fmt: skip
    if fit_km >= 1.5 * chip_km:  # a chip's side and a half clears the plant's own chip at any bearing
        return f"{said}: pass --landcover-km {math.floor(fit_km * 10) / 10:g} or less"
    return f"{said}: there is no room for them around the plants; use larger rasters or a smaller --chip-m"


def _write_sites_csv(path: Path, sites: Sequence[_Site]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SITES_COLUMNS)
        for site in sites:
            writer.writerow([site.site, site.label, f"{site.lon:.6f}", f"{site.lat:.6f}"])


# --------------------------------------------------------------------------------------------------------------
# Writing a dataset folder safely
# --------------------------------------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuses to replace a file, a non-empty folder without ``overwrite``, a folder that is not a dataset, a
    read-only one, or one whose folder cannot take the new dataset."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    check_writable(out, "--out")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise InputError(f"output folder {out} is not empty; pass --overwrite to replace it")
    foreign = [name for name in entries if name not in (SITES_CSV, *CLASSES)]
    if foreign:
        raise InputError(
            f"output folder {out} does not look like a chips dataset (it holds {', '.join(foreign[:5])}); "
            "refusing to delete it"
        )


def write_chip_dataset(
    inputs: ChipInputs,
    plants: Sequence[Plant],
    out: str | Path,
    options: ChipOptions = ChipOptions(),
    overwrite: bool = False,
) -> ChipReport:
    """Cuts a training set into ``out`` atomically: a failed run leaves no dataset behind.

    Everything is written to a hidden folder beside ``out`` and renamed to ``out`` at the end.

    Args:
        inputs: The rasters, per band and date.
        plants: Plant locations.
        out: Dataset folder to create.
        options: Chip size, landcover sampling, cloud threshold.
        overwrite: Replace an existing dataset folder (only one that holds nothing but a dataset).

    Returns:
        The counts of sites written and skipped.

    Raises:
        InputError: ``out`` is not empty (without ``overwrite``), or cutting fails.
    """
    out = Path(out)
    options.validate()
    _check_out(out, overwrite)
    with output_errors(out), folder_built_aside(out) as partial:
        report = cut_chips(inputs, plants, partial, options)
    report.out = out
    return report

