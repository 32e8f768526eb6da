"""The scan grid and the chip layout on it; rasters read onto the grid, warped where they lie on another one.

The scan grid is a north-up pixel grid in a projected CRS: the first input raster's grid, or one built from a CRS,
a resolution and bounds the user gives. Chips of ``chip_px`` pixels are laid on it every ``stride_px`` pixels,
starting at its top-left corner and covering it completely (the last row and column of chips may reach past its
edge). A raster on the same grid (same CRS and pixel size, whole-pixel offset) is read directly; any other is read
through a ``WarpedVRT`` onto the grid (bilinear for bands, nearest for QA words).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fusionkern.errors import ConfigError, InputError
from fusionkern.readers import RasterSource, _raster_errors, _rasterio

_GRID_TOLERANCE_PX = 1e-3
_LONLAT_LIMITS = (-180.0, -90.0, 180.0, 90.0)


# --------------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanGrid:
    """A north-up pixel grid; plain values only, so it pickles and goes into JSON as it is.

    Attributes:
        crs_wkt: The CRS as WKT.
        transform: The six affine coefficients ``(a, b, c, d, e, f)`` (pixel -> CRS).
        width: Columns.
        height: Rows.
    """

    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int

    @property
    def crs(self) -> Any:
        """The CRS as a ``rasterio.crs.CRS``."""
        from rasterio.crs import CRS

        return CRS.from_wkt(self.crs_wkt)

    @property
    def affine(self) -> Any:
        """The transform as an ``affine.Affine``."""
        from affine import Affine

        return Affine(*self.transform)

    @property
    def res(self) -> float:
        """Pixel size in CRS units (square pixels)."""
        return abs(self.transform[0])

    @property
    def metres_per_unit(self) -> float:
        """Metres per CRS unit."""
        return float(self.crs.linear_units_factor[1])

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(west, south, east, north)`` in the grid's CRS."""
        a, _, c, _, e, f = self.transform
        return c, f + e * self.height, c + a * self.width, f

    def describe(self) -> dict[str, Any]:
        """The grid as JSON values (with the EPSG code where there is one)."""
        epsg = self.crs.to_epsg()
        return {
            "crs": f"EPSG:{epsg}" if epsg else self.crs_wkt,
            "transform": list(self.transform),
            "width": self.width,
            "height": self.height,
            "resolution": self.res,
            "bounds": list(self.bounds),
        }


def _check_projected(crs: Any, what: str) -> None:
    if crs is None:
        raise InputError(f"{what} has no CRS: the scan needs georeferenced rasters")
    if not crs.is_projected:
        raise InputError(f"{what} is in {crs.to_string()}, a geographic CRS: chips need metres (e.g. a UTM zone)")


def _north_up(transform: Any, what: str) -> None:
    if transform.b or transform.d or transform.e >= 0 or transform.a <= 0:
        raise InputError(f"{what} is rotated or not north-up; give --crs and --resolution to warp it onto a grid")
    if not math.isclose(transform.a, -transform.e, rel_tol=1e-6):
        raise InputError(f"{what} has non-square pixels ({transform.a} x {-transform.e}); give --resolution")


def raster_grid(path: str) -> ScanGrid:
    """The pixel grid of a raster.

    Args:
        path: A raster GDAL can open.

    Returns:
        Its grid.

    Raises:
        InputError: The raster cannot be opened, has no projected CRS, or is not north-up with square pixels.
    """
    with RasterSource(path) as src:
        _check_projected(src.crs, str(path))
        _north_up(src.transform, str(path))
        return ScanGrid(src.crs.to_wkt(), tuple(src.transform)[:6], src.width, src.height)


def parse_crs(text: str) -> Any:
    """A CRS from ``EPSG:32650``, a PROJ string or WKT; ConfigError when it is not one."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        return CRS.from_user_input(text)
    except CRSError as exc:
        raise ConfigError(f"--crs {text!r} is not a CRS ({exc})") from None


def _bounds_in(crs: Any, bounds: Sequence[float], bounds_crs: str) -> tuple[float, float, float, float]:
    """``bounds`` converted to ``crs``; ``bounds_crs`` is ``auto``, ``lonlat``, ``grid`` or a CRS string."""
    from rasterio.warp import transform_bounds

    west, south, east, north = (float(v) for v in bounds)
    if not (west < east and south < north):
        raise ConfigError(f"--bounds must be WEST SOUTH EAST NORTH with west < east and south < north, got {bounds}")
    if bounds_crs == "auto":
        lo_x, lo_y, hi_x, hi_y = _LONLAT_LIMITS
        lonlat = lo_x <= west and east <= hi_x and lo_y <= south and north <= hi_y
        bounds_crs = "lonlat" if lonlat else "grid"
    if bounds_crs == "grid":
        return west, south, east, north
    source = "EPSG:4326" if bounds_crs == "lonlat" else parse_crs(bounds_crs)
    return tuple(transform_bounds(source, crs, west, south, east, north, densify_pts=21))  # type: ignore[return-value]


def _snap(bounds: Sequence[float], origin: tuple[float, float], res: float) -> tuple[float, float, int, int]:
    """West, north, width, height of the smallest grid aligned on ``origin`` that covers ``bounds``."""
    west, south, east, north = bounds
    x0, y0 = origin
    col0 = math.floor((west - x0) / res + _GRID_TOLERANCE_PX)
    col1 = math.ceil((east - x0) / res - _GRID_TOLERANCE_PX)
    row0 = math.floor((y0 - north) / res + _GRID_TOLERANCE_PX)
    row1 = math.ceil((y0 - south) / res - _GRID_TOLERANCE_PX)
    return x0 + col0 * res, y0 - row0 * res, max(1, col1 - col0), max(1, row1 - row0)


def make_grid(
    reference: str,
    crs: str | None = None,
    resolution: float | None = None,
    bounds: Sequence[float] | None = None,
    bounds_crs: str = "auto",
) -> ScanGrid:
    """The scan grid: the reference raster's, or one built from the options given.

    Without options the grid is the reference raster's. ``bounds`` alone keeps its CRS, pixel size and pixel
    alignment and changes the extent (snapped outward to whole pixels). With ``crs`` or ``resolution`` the grid is
    aligned on multiples of the resolution (as ``gdalwarp -tap``); the extent is ``bounds`` or the reference
    raster's footprint in that CRS.

    Args:
        reference: The first input raster.
        crs: The grid's CRS (``EPSG:...``, PROJ or WKT); projected.
        resolution: Pixel size in the grid CRS's units.
        bounds: ``(west, south, east, north)``.
        bounds_crs: CRS of ``bounds``: ``auto`` (lon/lat when every value fits in -180..180 / -90..90, else the
            grid's CRS), ``lonlat``, ``grid`` or a CRS string.

    Returns:
        The grid.

    Raises:
        InputError: The reference raster cannot be read or is unsuitable.
        ConfigError: An option is invalid.
    """
    ref = raster_grid(reference)
    if crs is None and resolution is None and bounds is None:
        return ref
    grid_crs = parse_crs(crs) if crs is not None else ref.crs
    _check_projected(grid_crs, f"--crs {crs}")
    if resolution is not None and not (resolution > 0 and math.isfinite(resolution)):
        raise ConfigError(f"--resolution must be a positive number, got {resolution}")
    same_crs = grid_crs == ref.crs
    if bounds is not None:
        region = _bounds_in(grid_crs, bounds, bounds_crs)
    elif same_crs:
        region = ref.bounds
    else:
        from rasterio.warp import transform_bounds

        region = tuple(transform_bounds(ref.crs, grid_crs, *ref.bounds, densify_pts=21))
    if resolution is None and not same_crs:
        resolution = ref.res * ref.metres_per_unit / float(grid_crs.linear_units_factor[1])
    if resolution is None or (same_crs and math.isclose(resolution, ref.res, rel_tol=1e-9)):
        res, origin = ref.res, (ref.transform[2], ref.transform[5])
    else:
        res, origin = float(resolution), (0.0, 0.0)
    west, north, width, height = _snap(region, origin, res)
    return ScanGrid(grid_crs.to_wkt(), (res, 0.0, west, 0.0, -res, north), width, height)


# --------------------------------------------------------------------------------------------------------------
# Chips on the grid
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChipLayout:
    """Where chips lie on the scan grid: chip ``(i, j)`` has its top-left pixel at ``(i * stride, j * stride)``.

    Attributes:
        chip_px: Chip side in grid pixels.
        stride_px: Distance between chips in grid pixels.
        n_rows: Rows of chips (the scores raster's height).
        n_cols: Columns of chips (the scores raster's width).
    """

    chip_px: int
    stride_px: int
    n_rows: int
    n_cols: int

    @property
    def n_chips(self) -> int:
        """All chips of the region."""
        return self.n_rows * self.n_cols

    @property
    def extent_px(self) -> tuple[int, int]:
        """(rows, cols) of grid pixels the chips cover, from the grid's top-left corner."""
        return (self.n_rows - 1) * self.stride_px + self.chip_px, (self.n_cols - 1) * self.stride_px + self.chip_px

    def score_transform(self, grid: ScanGrid) -> Any:
        """Affine transform of the scores raster: pixel ``(i, j)`` is ``stride`` wide, centred on chip (i, j)."""
        from affine import Affine

        offset = (self.chip_px - self.stride_px) / 2.0
        return grid.affine * Affine.translation(offset, offset) * Affine.scale(self.stride_px)

    def chip_centres(self, grid: ScanGrid, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid-CRS (x, y) of the centres of chips (rows, cols)."""
        half = self.chip_px / 2.0
        px_cols = np.asarray(cols, dtype=np.float64) * self.stride_px + half
        px_rows = np.asarray(rows, dtype=np.float64) * self.stride_px + half
        return grid.affine * (px_cols, px_rows)

    def describe(self, grid: ScanGrid) -> dict[str, Any]:
        """The layout as JSON values."""
        metres = grid.res * grid.metres_per_unit
        return {
            "chip_px": self.chip_px,
            "chip_m": self.chip_px * metres,
            "stride_px": self.stride_px,
            "stride_m": self.stride_px * metres,
            "rows": self.n_rows,
            "cols": self.n_cols,
        }


def chip_layout(grid: ScanGrid, chip_m: float, stride_m: float | None = None) -> ChipLayout:
    """Chips of ``chip_m`` metres every ``stride_m`` metres (default: half a chip) covering the grid.

    Args:
        grid: The scan grid.
        chip_m: Chip side in metres (the checkpoint's ``chip_px * resolution_m``).
        stride_m: Stride in metres; None for half a chip.

    Returns:
        The layout; sizes are rounded to whole grid pixels.

    Raises:
        ConfigError: A size that is not positive, or a stride larger than a chip (which would leave gaps).
    """
    metres = grid.res * grid.metres_per_unit
    if not chip_m > 0:
        raise ConfigError(f"chip size must be positive, got {chip_m} m")
    chip_px = max(1, round(chip_m / metres))
    stride = chip_m / 2.0 if stride_m is None else float(stride_m)
    if not (stride > 0 and math.isfinite(stride)):
        raise ConfigError(f"--stride must be a positive number of metres, got {stride_m}")
    stride_px = max(1, round(stride / metres))
    if stride_px > chip_px:
        raise ConfigError(f"--stride {stride:g} m is larger than a chip ({chip_px * metres:g} m): it would leave gaps")
    n_rows = math.ceil(max(grid.height - chip_px, 0) / stride_px) + 1
    n_cols = math.ceil(max(grid.width - chip_px, 0) / stride_px) + 1
    return ChipLayout(chip_px, stride_px, n_rows, n_cols)


def stride_note(layout: ChipLayout, grid: ScanGrid, stride_m: float | None) -> str | None:
    """A line saying that ``--stride`` was snapped to the pixel grid, or None where it was taken as given.

    Args:
        layout: The chips as laid out.
        grid: The scan grid.
        stride_m: The stride asked for, in metres (None: the default, half a chip).
    """
    if stride_m is None:
        return None
    metres = grid.res * grid.metres_per_unit
    used = layout.stride_px * metres
    if math.isclose(used, float(stride_m), rel_tol=1e-9, abs_tol=1e-6):
        return None
    return (f"--stride {float(stride_m):g} m snapped to {used:g} m ({layout.stride_px} px of {metres:g} m): chips lie on "
            "the pixel grid")  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Reading a raster onto the grid
# --------------------------------------------------------------------------------------------------------------


def _grid_offset(src: Any, grid: ScanGrid) -> tuple[int, int] | None:
    """Whole-pixel (row, col) of the grid origin in ``src``, or None when ``src`` is not on the grid."""
    if src.crs is None or src.crs != grid.crs:
        return None
    t = src.transform
    if t.b or t.d or not math.isclose(t.a, grid.res, rel_tol=1e-9) or not math.isclose(-t.e, grid.res, rel_tol=1e-9):
        return None
    col, row = ~t * (grid.transform[2], grid.transform[5])
    if max(abs(col - round(col)), abs(row - round(row))) > _GRID_TOLERANCE_PX:
        return None
    return int(round(row)), int(round(col))


def on_grid(path: str, grid: ScanGrid) -> bool:
    """Whether a raster lies on the scan grid (read directly) rather than needing a warp."""
    with RasterSource(path) as src:
        return _grid_offset(src, grid) is not None


def aligned_block(path: str, grid: ScanGrid) -> int | None:
    """The raster's block side when it is tiled in square blocks that start at the grid's origin, else None."""
    with RasterSource(path) as src:
        offset = _grid_offset(src, grid)
        rows, cols = src._ds.block_shapes[0]
    if offset is None or rows != cols or rows >= src.width or offset[0] % rows or offset[1] % cols:
        return None
    return int(rows)


def footprint_overlaps(path: str, grid: ScanGrid) -> bool:
    """Whether a raster's footprint intersects the grid's extent."""
    from rasterio.warp import transform_bounds

    rasterio = _rasterio()
    with _raster_errors(path, "open"), rasterio.open(path) as ds:
        if ds.crs is None:
            raise InputError(f"raster {path} has no CRS: it cannot be placed on the scan grid")
        west, south, east, north = transform_bounds(ds.crs, grid.crs, *ds.bounds, densify_pts=21)
    g_west, g_south, g_east, g_north = grid.bounds
    return west < g_east and east > g_west and south < g_north and north > g_south


class GridSource:
    """One band of one raster, read in windows of the scan grid; pixels it does not cover come back as nodata.

    Bands come back as float32 with NaN at nodata; QA words (``qa=True``) as stored, 0 where not covered.
    Not thread-safe: give each thread its own.

    Args:
        path: The raster (any GDAL path).
        grid: The scan grid.
        extent_px: (rows, cols) of grid pixels that will be read (the chips' coverage, which may pass the grid).
        qa: Whether this is a QA band (integer words, nearest-neighbour warping).
    """

    def __init__(self, path: str, grid: ScanGrid, extent_px: tuple[int, int], qa: bool = False):
        self.path, self.qa = path, qa
        self._source = RasterSource(path)
        self.offset = _grid_offset(self._source, grid)
        self.warped = self.offset is None
        self._vrt = self._warped_vrt(grid, extent_px) if self.warped else None

    def _warped_vrt(self, grid: ScanGrid, extent_px: tuple[int, int]) -> Any:
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        ds = self._source._ds
        if ds.crs is None:
            raise InputError(f"raster {self.path} has no CRS: it cannot be warped onto the scan grid")
        options: dict[str, Any] = dict(crs=grid.crs, transform=grid.affine, height=extent_px[0], width=extent_px[1])
        if self.qa:
            options.update(resampling=Resampling.nearest, nodata=0)
        else:
            options.update(resampling=Resampling.bilinear, dtype="float32", nodata=float("nan"))
        with _raster_errors(self.path, "warp"):
            return WarpedVRT(ds, src_nodata=ds.nodatavals[0], **options)

    def close(self) -> None:
        """Closes the raster (and its warped view)."""
        if self._vrt is not None:
            self._vrt.close()
        self._source.close()

    def read(self, top: int, left: int, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
        """The grid window ``(top, left, height, width)``: float32 with NaN at nodata, or QA words.

        Args:
            top, left, height, width: The window, in grid pixels.
            out: For a band (not QA) window inside the raster: a C-contiguous float32 (height, width) array that
                the pixels are converted into as they are read (:meth:`RasterSource.read`), and returned. Elsewhere
                it is not used, and the window comes back in a new array.

        Raises:
            InputError: The raster cannot be decoded (e.g. truncated); the message names it.
        """
        if self.warped:
            return self._read_warped(top, left, height, width)
        fill = 0 if self.qa else np.nan
        dtype = self._source.dtype if self.qa else np.float32
        d_row, d_col = self.offset  # type: ignore[misc]
        r0, c0 = max(top + d_row, 0), max(left + d_col, 0)
        r1 = min(top + d_row + height, self._source.height)
        c1 = min(left + d_col + width, self._source.width)
        out_dtype = None if self.qa else np.float32
        if (r1 - r0, c1 - c0) == (height, width):  # inside the raster: nothing to pad
            return self._source.read(((r0, r1), (c0, c1)), out_dtype=out_dtype, out=None if self.qa else out)
        out = np.full((height, width), fill, dtype=dtype)
        if r1 > r0 and c1 > c0:
            values = self._source.read(((r0, r1), (c0, c1)), out_dtype=out_dtype)
            out[r0 - top - d_row : r1 - top - d_row, c0 - left - d_col : c1 - left - d_col] = values
        return out

    def inside(self, top: int, left: int, height: int, width: int) -> bool:
        """Whether the whole grid window lies inside the raster (False for a warped raster)."""
        if self.warped:
            return False
        d_row, d_col = self.offset  # type: ignore[misc]
        r0, c0 = top + d_row, left + d_col
        return r0 >= 0 and c0 >= 0 and r0 + height <= self._source.height and c0 + width <= self._source.width

    def covered(self, top: int, left: int, height: int, width: int) -> np.ndarray | None:
        """(height, width) bool, True where the grid window lies inside the raster; None for a warped raster
        (its footprint is not a window of the grid, so pixels outside it read as nodata)."""
        if self.warped:
            return None
        d_row, d_col = self.offset  # type: ignore[misc]
        rows = np.arange(top + d_row, top + d_row + height)
        cols = np.arange(left + d_col, left + d_col + width)
        inside_rows = (rows >= 0) & (rows < self._source.height)
        inside_cols = (cols >= 0) & (cols < self._source.width)
        return inside_rows[:, None] & inside_cols[None, :]

    def _read_warped(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        from rasterio.windows import Window

        with _raster_errors(self.path):
            values = self._vrt.read(1, window=Window(left, top, width, height))
        if not self.qa:
            values[~np.isfinite(values)] = np.nan
        return values

    def read_overview(self, grid: ScanGrid, shape: tuple[int, int]) -> np.ndarray:
        """The whole grid extent, averaged down to ``shape``: float32, NaN at nodata (for quick looks)."""
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        ds = self._source._ds
        with _raster_errors(self.path), WarpedVRT(
            ds, crs=grid.crs, transform=grid.affine, width=grid.width, height=grid.height, dtype="float32",
            nodata=float("nan"), src_nodata=ds.nodatavals[0], resampling=Resampling.bilinear,
        ) as vrt:  # fmt: skip
            values = vrt.read(1, out_shape=shape, resampling=Resampling.average)
        values[~np.isfinite(values)] = np.nan
        return values
