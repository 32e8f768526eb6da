"""Where rasters enter fusionkern: Landsat file discovery, windowed reads with nodata as NaN, DN calibration, and
what to read (three scene folders or a manifest), shared by ``fusionkern chips`` and ``fusionkern scan``.

Every failure to find or read a file (missing, truncated, not a raster, a band that is not there) becomes an
:class:`~fusionkern.errors.InputError` that names the file, never a bare GDAL traceback. rasterio is imported only
when a raster is actually opened, so the rest of fusionkern works without the ``geo`` extra.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from fusionkern import landsat
from fusionkern.errors import InputError, MissingDependencyError

WindowLike = Any
"""A ``rasterio.windows.Window`` or ``((row_start, row_stop), (col_start, col_stop))``."""

_QA_RE = re.compile(r"^.+_(?:BQA|QA_PIXEL)\.tiff?$", re.IGNORECASE)
_MTL_RE = re.compile(r"^.+_MTL\.txt$", re.IGNORECASE)
_SR_RE = re.compile(r"_SR_B\d{1,2}\.tiff?$", re.IGNORECASE)
_ST_RE = re.compile(r"_ST_B\d{1,2}\.tiff?$", re.IGNORECASE)
_C1_QA_RE = re.compile(r"_BQA\.tiff?$", re.IGNORECASE)


def _rasterio() -> ModuleType:
    """Imports rasterio, or explains which extra provides it."""
    try:
        import rasterio
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MissingDependencyError("rasterio", "geo", "Reading rasters") from exc
    return rasterio


# --------------------------------------------------------------------------------------------------------------
# Finding files in a scene folder
# --------------------------------------------------------------------------------------------------------------


def _band_pattern(number: int) -> re.Pattern[str]:
    """File names of band ``number``: ``*_B6.TIF``, ``*_band6.tif``, ``*_SR_B6.TIF``, ``*_ST_B10.TIF``."""
    return re.compile(rf"^.+_(?:(?:SR|ST)_)?B{number}\.tiff?$|^.+_band{number}\.tiff?$", re.IGNORECASE)


def _scene_folder(scene_dir: str | Path) -> Path:
    folder = Path(scene_dir)
    if not folder.is_dir():
        raise InputError(f"scene folder not found: {folder}")
    return folder


def _matching_files(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and pattern.match(p.name))


def _single(matches: list[Path], folder: Path, what: str) -> Path | None:
    """The one file found, None if none; several are an error naming them."""
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise InputError(f"{what} is ambiguous in {folder}: {len(matches)} files match ({names})")
    return matches[0] if matches else None


def is_gdal_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GDAL virtual or remote path (``/vsicurl/...``, ``s3://...``) rather than a local file."""
    text = os.fspath(path)
    return text.startswith("/vsi") or "://" in text


def find_band_file(scene_dir: str | Path, band: landsat.Band) -> Path:
    """Finds the file of one band in a Landsat scene folder, by the usual USGS names (case-insensitive).

    Recognised: Collection 1 / 2 Level-1 ``*_B6.TIF``, pre-collection and ESPA ``*_band6.tif``, Collection 2
    Level-2 ``*_SR_B6.TIF`` and ``*_ST_B10.TIF``.

    Args:
        scene_dir: The scene folder.
        band: Band number or name (``6``, ``"b6"``, ``"B10"``).

    Returns:
        The path of the band's GeoTIFF.

    Raises:
        InputError: The folder does not exist, no file matches, or several do.
    """
    folder, number = _scene_folder(scene_dir), landsat.band_number(band)
    found = _single(_matching_files(folder, _band_pattern(number)), folder, f"band {number}")
    if found is None:
        raise InputError(
            f"no file for band {number} in {folder}: expected a name ending in _B{number}.TIF, "
            f"_band{number}.tif, _SR_B{number}.TIF or _ST_B{number}.TIF"
        )
    return found


def find_qa_file(scene_dir: str | Path) -> Path | None:
    """Finds the quality band of a scene: Collection 1 ``*_BQA.TIF`` or Collection 2 ``*_QA_PIXEL.TIF``.

    Args:
        scene_dir: The scene folder.

    Returns:
        The QA file, or None when the scene has none.

    Raises:
        InputError: The folder does not exist, or several QA files match.
    """
    folder = _scene_folder(scene_dir)
    return _single(_matching_files(folder, _QA_RE), folder, "the QA band")


def find_mtl(scene_dir: str | Path) -> Path | None:
    """Finds the ``*_MTL.txt`` metadata file of a scene.

    Args:
        scene_dir: The scene folder.

    Returns:
        The MTL file, or None when the scene has none.

    Raises:
        InputError: The folder does not exist, or several MTL files match.
    """
    folder = _scene_folder(scene_dir)
    return _single(_matching_files(folder, _MTL_RE), folder, "the MTL file")


# --------------------------------------------------------------------------------------------------------------
# Reading rasters
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _raster_errors(path: str | Path, action: str = "read") -> Iterator[None]:
    """Turns rasterio and GDAL errors into one InputError naming the file."""
    rasterio = _rasterio()
    from rasterio.errors import RasterioError

    gdal_errors: tuple[type[BaseException], ...] = (RasterioError, OSError)
    cple = getattr(getattr(rasterio, "_err", None), "CPLE_BaseError", None)
    if cple is not None:
        gdal_errors += (cple,)
    try:
        yield
    except gdal_errors as exc:
        reason = str(exc).strip() or type(exc).__name__
        if reason.startswith("Read failed") and exc.__context__ is not None:
            reason = str(exc.__context__).strip() or reason
        raise InputError(f"cannot {action} raster {path}: {reason}") from exc


def _is_local(path: str | Path) -> bool:
    text = str(path)
    return "://" not in text and not text.startswith("/vsi")


def _as_window(window: WindowLike) -> Any:
    """Normalises a window argument to ``rasterio.windows.Window``."""
    from rasterio.windows import Window

    if window is None or isinstance(window, Window):
        return window
    (row_start, row_stop), (col_start, col_stop) = window
    return Window(col_start, row_start, col_stop - col_start, row_stop - row_start)


class RasterSource:
    """One band of a raster, kept open for many window reads; nodata comes back as NaN.

    Use as a context manager::

        with RasterSource(path) as src:
            chip = src.read(window)

    Attributes:
        path: The raster file.
        band: The 1-based band index read.
        crs: Coordinate reference system (``rasterio.crs.CRS``).
        transform: Affine pixel -> CRS transform.
        width: Columns.
        height: Rows.
        nodata: The band's nodata value, or None.
        dtype: The stored data type (numpy dtype).
    """

    def __init__(self, path: str | Path, band: int = 1):
        """Opens the raster.

        Args:
            path: A raster file GDAL can read (GeoTIFF for Landsat products).
            band: 1-based band index.

        Raises:
            InputError: The file is missing, not a raster, or has no such band.
        """
        rasterio = _rasterio()
        self.path = Path(path) if _is_local(path) else path
        if _is_local(path) and not Path(path).is_file():
            raise InputError(f"raster not found: {path}")
        with _raster_errors(path, "open"):
            self._ds = rasterio.open(path)
        count = self._ds.count
        if not 1 <= band <= count:
            self._ds.close()
            raise InputError(f"raster {path} has {count} band(s); band {band} does not exist")
        self.band = band
        self.crs = self._ds.crs
        self.transform = self._ds.transform
        self.width, self.height = self._ds.width, self._ds.height
        self.nodata = self._ds.nodatavals[band - 1]
        self.dtype = np.dtype(self._ds.dtypes[band - 1])

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self.close()

    def close(self) -> None:
        """Closes the dataset."""
        self._ds.close()

    @property
    def res(self) -> tuple[float, float]:
        """Pixel width and height in CRS units (both positive)."""
        return abs(self.transform.a), abs(self.transform.e)

    def contains(self, window: WindowLike) -> bool:
        """Whether a window lies entirely inside the raster."""
        w = _as_window(window)
        return (
            w.col_off >= 0
            and w.row_off >= 0
            and w.col_off + w.width <= self.width
            and w.row_off + w.height <= self.height
        )

    def read(self, window: WindowLike = None, out_dtype: Any = np.float32, out: np.ndarray | None = None) -> np.ndarray:
        """Reads the band, or a window of it.

        Args:
            window: Part to read (None: everything); must lie inside the raster.
            out_dtype: Output float dtype; nodata pixels (the nodata value, or a GDAL mask) become NaN. None
                or an integer dtype returns the stored values as they are, nodata included.
            out: Where to put a float result: a C-contiguous (rows, cols) array of ``out_dtype``. Where every
                stored value is exact in that dtype (integers of up to 16 bits into float32, or the same float
                type), GDAL converts while it copies the pixels there, saving a pass and an array; otherwise the
                result is copied into it. Returned.

        Returns:
            2-D array of shape (rows, cols).

        Raises:
            InputError: The window leaves the raster, or the file cannot be decoded (e.g. truncated).
        """
        window = _as_window(window)
        if window is not None and not self.contains(window):
            raise InputError(
                f"window {window} leaves raster {self.path} ({self.height} rows x {self.width} columns)"
            )
        if out is not None:
            return self._read_into(window, out_dtype, out)
        with _raster_errors(self.path):
            raw = self._ds.read(self.band, window=window)
            if out_dtype is None or np.dtype(out_dtype).kind != "f":
                return raw if out_dtype is None else raw.astype(out_dtype)
            invalid = self._invalid(raw, window)
        with np.errstate(over="ignore"):
            out = raw.astype(out_dtype)
        out[invalid] = np.nan
        return out

    def _read_into(self, window: Any, out_dtype: Any, out: np.ndarray) -> np.ndarray:
        dtype = np.dtype(out_dtype)
        shape = (self.height, self.width) if window is None else (int(window.height), int(window.width))
        if dtype.kind != "f" or out.dtype != dtype or out.shape != shape or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {dtype} array of shape {shape}, got {out.dtype} {out.shape}")
        if not _exact_in(self.dtype, dtype):
            out[...] = self.read(window, out_dtype)
            return out
        with _raster_errors(self.path):
            self._ds.read(self.band, window=window, out=out)
            # the stored values are exact in ``out``, so the nodata test on them is the test on the stored ones
            # (and integers hold no NaN to look for)
            invalid = self._invalid(out, window, integers=self.dtype.kind in "iu")
        if invalid is not None and invalid.any():
            np.copyto(out, np.nan, where=invalid)
        return out

    def _invalid(self, raw: np.ndarray, window: Any, integers: bool = False) -> np.ndarray | None:
        """Nodata pixels: the nodata value (tolerant for float fill values), NaN, or a GDAL mask band. With
        ``integers`` (``raw`` holds stored integers converted exactly): only the nodata value and the mask band,
        and None where the band has neither."""
        from rasterio.enums import MaskFlags

        if not integers:
            invalid = landsat.nodata_mask(raw, self.nodata, fill_zero=False)
        else:
            invalid = None if self.nodata is None else raw == self.nodata
        flags = self._ds.mask_flag_enums[self.band - 1]
        if MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
            masked = self._ds.read_masks(self.band, window=window) == 0
            invalid = masked if invalid is None else invalid | masked
        return invalid

    def profile(self, window: WindowLike = None, out_dtype: Any = np.float32) -> dict[str, Any]:
        """A single-band rasterio profile for what :meth:`read` returns (window transform, NaN nodata).

        Args:
            window: The window read (None: the whole raster).
            out_dtype: The dtype read.

        Returns:
            A copy of the source profile, updated to the window and dtype.
        """
        from rasterio import windows

        window = _as_window(window)
        profile = dict(self._ds.profile)
        dtype = self.dtype if out_dtype is None else np.dtype(out_dtype)
        profile.update(count=1, dtype=dtype.name)
        if out_dtype is not None and dtype.kind == "f":
            profile["nodata"] = float("nan")
        if window is not None:
            profile.update(
                width=int(window.width),
                height=int(window.height),
                transform=windows.transform(window, self.transform),
            )
            for key in ("blockxsize", "blockysize", "tiled"):
                profile.pop(key, None)
        return profile


def _exact_in(stored: np.dtype, dtype: np.dtype) -> bool:
    """Whether every value of ``stored`` converts exactly (and so compares equal to nodata as before) to ``dtype``."""
    if stored.kind in "iu":
        return stored.itemsize * 8 <= np.finfo(dtype).nmant + 1  # every value fits the significand
    return stored == dtype


def read_raster(
    path: str | Path, band: int = 1, window: WindowLike = None, out_dtype: Any = np.float32
) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads one band of a raster with nodata as NaN.

    Nodata is the band's nodata value (float fill values such as -1.7e308 are matched with a relative
    tolerance), NaN, or a GDAL mask band.

    Args:
        path: Raster file.
        band: 1-based band index.
        window: Part to read, inside the raster (None: everything).
        out_dtype: Output float dtype (None: stored dtype, nodata left as stored).

    Returns:
        ``(array, profile)``: the 2-D array and a rasterio profile describing it (window transform, NaN nodata).

    Raises:
        InputError: Missing file, truncated or unreadable raster, not a raster, or no such band; the message
            names the file.
    """
    with RasterSource(path, band) as src:
        return src.read(window, out_dtype), src.profile(window, out_dtype)


# --------------------------------------------------------------------------------------------------------------
# Calibration by product
# --------------------------------------------------------------------------------------------------------------


def calibrate_band(
    values: np.ndarray, path: str | Path, band: landsat.Band, mtl: Mapping[str, Any] | str | Path | None = None
) -> np.ndarray:
    """Converts the values read from a band file to physical units, choosing the formula from the product.

    * Collection 2 Level-2 ``*_SR_B*`` files: surface reflectance; ``*_ST_B*``: surface temperature (K).
    * Level-1 files with MTL metadata: :func:`fusionkern.landsat.calibrate` (TOA reflectance for reflective
      bands, brightness temperature for thermal bands), DN 0 treated as fill.
    * Otherwise the values are taken as already calibrated (e.g. composites exported as reflectance).

    Args:
        values: Values read with :func:`read_raster` (NaN at nodata).
        path: The file they came from (its name tells the product).
        band: The Landsat-8 band.
        mtl: Parsed MTL metadata or the MTL path, for Level-1 files.

    Returns:
        float32 array, NaN at nodata.
    """
    name = Path(path).name
    if _SR_RE.search(name):
        return landsat.c2_surface_reflectance(values, fill_zero=True)
    if _ST_RE.search(name):
        return landsat.c2_surface_temperature(values, fill_zero=True)
    if mtl is not None:
        return landsat.calibrate(values, mtl, band, fill_zero=True)
    return np.asarray(values, dtype=np.float32)


def read_scene_band(
    scene_dir: str | Path, band: landsat.Band, calibrate: bool = True, window: WindowLike = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads one band of a Landsat scene folder, calibrated where the folder says how.

    Args:
        scene_dir: Scene folder (see :func:`find_band_file` for the names recognised).
        band: Band number or name.
        calibrate: Convert DN with :func:`calibrate_band` (MTL constants, or Level-2 scalings). A Level-1 band
            without an MTL in its folder is an error, never DN passed off as calibrated values.
        window: Part to read (None: everything).

    Returns:
        ``(array, profile)`` as :func:`read_raster`, float32 with NaN at nodata.

    Raises:
        InputError: The band, the raster or the MTL cannot be found or read, or (``calibrate``) a Level-1 band
            has no MTL.
    """
    path = find_band_file(scene_dir, band)
    mtl = find_mtl(scene_dir) if calibrate else None
    if calibrate and mtl is None and calibration_of(path, None) == "stored":
        raise InputError(
            f"scene folder {scene_dir} has no *_MTL.txt to convert the DN of {path.name}; add the scene's MTL "
            "file, or read it with calibrate=False"
        )
    values, profile = read_raster(path, window=window)
    if not calibrate:
        return values, profile
    return calibrate_band(values, path, band, landsat.read_mtl(mtl) if mtl else None), profile


def qa_invalid_mask(qa: np.ndarray, path: str | Path) -> np.ndarray:
    """Cloud, shadow and fill mask of a QA band, decoding it by its file name.

    ``*_BQA.TIF`` is decoded as Collection 1 BQA, anything else (``*_QA_PIXEL.TIF``) as Collection 2 QA_PIXEL,
    both with their default flags.

    Args:
        qa: QA words as stored (uint16 or int16), or float with NaN where there is no QA word.
        path: The QA file.

    Returns:
        Boolean array, True where the pixel is invalid.
    """
    if _C1_QA_RE.search(Path(path).name):
        return landsat.cloud_mask_c1_bqa(qa)
    return landsat.cloud_mask_c2_qa_pixel(qa)


# --------------------------------------------------------------------------------------------------------------
# What to read: scene folders and manifests (shared by ``fusionkern chips`` and ``fusionkern scan``)
# --------------------------------------------------------------------------------------------------------------

INPUT_BANDS = {"b10": 10, "b11": 11, "b7": 7, "b6": 6}
"""Branches read from rasters and their Landsat-8 band; ``b76`` is computed from b7 and b6."""

N_DATES = 3
"""Dates per branch: one image channel each."""

MANIFEST_KEYS = (*INPUT_BANDS, "mtl", "qa", "dates")

# A Landsat-8/9 product name (Collection 1/2 ``LC08_...``, pre-collection ``LC8...``): such a file holds DN unless
# it is a Level-2 ``_SR_`` / ``_ST_`` band.
_PRODUCT_RE = re.compile(r"^L[COT]0?[89]", re.IGNORECASE)

CALIBRATIONS = {
    "mtl": "Level-1 DN to TOA reflectance and brightness temperature (K) with the MTL constants",
    "level2": "Collection 2 Level-2 scaling (surface reflectance, surface temperature in K)",
    "stored": "values as stored",
}
"""How the values of one raster become physical units (recorded per date in ``scan.json``)."""


@dataclass(frozen=True)
class BandInput:
    """One date of one input band.

    Attributes:
        path: The raster file.
        band: Landsat-8 band number (10, 11, 7 or 6).
        mtl: MTL metadata file for calibrating Level-1 DN, if any.
        label: Description of the date (acquisition date, or the file name).

    ``fusionkern chips`` keeps paths as found; a scan's :class:`~fusionkern.scan.inputs.ScanInputs` holds them as
    strings, so that they travel to reader processes and into ``scan.json`` as they are.
    """

    path: Path | str  # a local file, or a GDAL path (/vsicurl/..., s3://...) where the manifest allows them
    band: int
    mtl: Path | str | None = None
    label: str = ""


@dataclass
class ChipInputs:
    """The rasters of three dates, per band: what ``chips`` cuts and ``scan`` reads.

    Attributes:
        bands: ``b10|b11|b7|b6`` -> three :class:`BandInput`, in date order.
        qa: Per date, a QA band (Collection 1 BQA or Collection 2 QA_PIXEL) or None.
    """

    bands: dict[str, list[BandInput]]
    qa: list[Path | None] = field(default_factory=lambda: [None] * N_DATES)


def calibration_of(path: str | Path, mtl: Any, calibrate: bool = True) -> str:
    """How the values of one band file become physical units: a key of :data:`CALIBRATIONS`.

    Args:
        path: The band file (its name tells the product).
        mtl: Its MTL file (or parsed metadata), or None.
        calibrate: False: values are used as stored.
    """
    name = Path(str(path)).name
    if not calibrate:
        return "stored"
    if _SR_RE.search(name) or _ST_RE.search(name):
        return "level2"
    return "mtl" if mtl else "stored"


def _is_level1(path: str | Path) -> bool:
    """Whether a file name is a Landsat Level-1 band (DN), by its product name."""
    name = Path(str(path)).name
    return bool(_PRODUCT_RE.match(name)) and not (_SR_RE.search(name) or _ST_RE.search(name))


def describe_calibration(bands: Mapping[str, Sequence[Any]], calibrate: bool = True) -> list[dict[str, Any]]:
    """Per date, how each band is calibrated (for ``scan.json`` and the chips report).

    Args:
        bands: ``b10|b11|b7|b6`` -> three entries with ``path``, ``mtl`` and ``label`` attributes.
        calibrate: Whether DN are converted at all.

    Returns:
        One dict per date: ``date``, ``mtl`` (the file or None) and ``bands`` (branch -> a key of
        :data:`CALIBRATIONS`).
    """
    dates = []
    for date in range(N_DATES):
        entries = {branch: rasters[date] for branch, rasters in bands.items()}
        first = next(iter(entries.values()))
        mtl = first.mtl if calibrate else None
        dates.append({
            "date": first.label,
            "mtl": str(mtl) if mtl else None,
            "bands": {branch: calibration_of(e.path, e.mtl, calibrate) for branch, e in entries.items()},
        })  # fmt: skip
    return dates


def check_calibration(inputs: ChipInputs, calibrate: bool, source: str) -> None:
    """Refuses inputs whose DN would silently stay DN, or whose dates would mix calibrated and stored values.

    Args:
        inputs: The rasters found.
        calibrate: Whether DN are to be converted (False: ``--no-calibrate``, nothing to check).
        source: What the inputs came from, for the message (e.g. ``manifest inputs.yaml``).

    Raises:
        InputError: A Level-1 band without MTL metadata, or some dates calibrated with an MTL and others not.
    """
    if not calibrate:
        return
    hint = "or pass --no-calibrate to use the values as stored"
    for rasters in inputs.bands.values():
        for date, band in enumerate(rasters, start=1):
            if band.mtl is None and _is_level1(band.path):
                raise InputError(
                    f"{band.path} (band {band.band}, date {date}) is a Landsat Level-1 file holding DN, and the "
                    f"{source} gives no MTL to convert it to kelvin or reflectance: list the MTL files under 'mtl', "
                    f"{hint}"
                )
    methods = [set(m["bands"].values()) for m in describe_calibration(inputs.bands, calibrate)]
    converted = [d for d, m in enumerate(methods, start=1) if m & {"mtl", "level2"}]
    stored = [d for d, m in enumerate(methods, start=1) if "stored" in m]
    if converted and stored:
        raise InputError(
            f"the {source} gives MTL metadata (or Level-2 files) for date(s) {', '.join(map(str, converted))} but "
            f"not for {', '.join(map(str, stored))}: the dates would mix calibrated and raw values; give every date "
            f"its MTL, {hint}"
        )


def inputs_from_scenes(scene_dirs: Sequence[str | Path], calibrate: bool = True) -> ChipInputs:
    """Finds the input bands, MTL and QA files in three Landsat scene folders, one per date.

    Args:
        scene_dirs: Three scene folders, in date order.
        calibrate: DN will be converted: every folder of Level-1 bands must hold its ``*_MTL.txt``.

    Returns:
        The inputs; date labels are the MTL's ``DATE_ACQUIRED`` (or the folder names).

    Raises:
        InputError: Not three folders, a band missing or ambiguous in one of them, an unreadable MTL, or (with
            ``calibrate``) a folder of Level-1 bands without an MTL.
    """
    if len(scene_dirs) != N_DATES:
        raise InputError(f"expected {N_DATES} scene folders (one per date), got {len(scene_dirs)}")
    bands: dict[str, list[BandInput]] = {branch: [] for branch in INPUT_BANDS}
    qa: list[Path | None] = []
    for scene in map(Path, scene_dirs):
        mtl = find_mtl(scene)
        label = str(landsat.read_mtl(mtl).get("DATE_ACQUIRED", scene.name)) if mtl else scene.name
        files = {branch: find_band_file(scene, number) for branch, number in INPUT_BANDS.items()}
        level1 = [f for f in files.values() if not (_SR_RE.search(f.name) or _ST_RE.search(f.name))]
        if calibrate and mtl is None and level1:
            raise InputError(
                f"scene folder {scene} has no *_MTL.txt: its Level-1 band files ({level1[0].name}, ...) hold DN "
                "that need the MTL constants to become kelvin and reflectance; add the scene's MTL file, or pass "
                "--no-calibrate to use the values as stored"
            )
        for branch, number in INPUT_BANDS.items():
            bands[branch].append(BandInput(files[branch], number, mtl, label))
        qa.append(find_qa_file(scene))
    return ChipInputs(bands, qa)


def inputs_from_manifest(path: str | Path, allow_gdal: bool = False, calibrate: bool = True) -> ChipInputs:
    """Reads a YAML manifest listing three rasters per band, in date order.

    Example::

        b10: [d1_b10.tif, d2_b10.tif, d3_b10.tif]
        b11: [...]
        b7: [...]
        b6: [...]
        mtl: [d1_MTL.txt, d2_MTL.txt, d3_MTL.txt]   # calibrate Level-1 DN (required for Landsat Level-1 files)
        qa: [d1_BQA.TIF, null, null]                # optional: cloud masks
        dates: ["2018-01", "2017-01", "2017-04"]    # optional: band descriptions

    Relative paths are relative to the manifest's folder. Without ``dates`` the band descriptions are the
    input file names. Without ``mtl`` the rasters are taken to hold physical values already (kelvin and
    reflectance), except files named as Landsat Level-1 products, which are refused.

    Args:
        path: The manifest.
        allow_gdal: Accept GDAL paths (``/vsicurl/...``, ``s3://...``) for the rasters and QA bands; they are
            kept as strings and not checked for existence here (GDAL reports them when opened).
        calibrate: DN will be converted (see :func:`check_calibration`).

    Returns:
        The inputs.

    Raises:
        InputError: Missing manifest, unknown key, a band without three entries, a file that does not exist, or
            (with ``calibrate``) Level-1 files without MTL or dates that would mix calibrated and raw values.
    """
    path = Path(path)
    manifest = _load_yaml(path)
    unknown = sorted(set(manifest) - set(MANIFEST_KEYS))
    if unknown:
        raise InputError(f"manifest {path}: unknown key(s) {', '.join(map(str, unknown))}; "
                         f"allowed: {', '.join(MANIFEST_KEYS)}")  # fmt: skip
    mtls = _manifest_paths(manifest, "mtl", path, required=False)
    if calibrate:
        for mtl in mtls:
            if mtl is not None:
                landsat.read_mtl(mtl)  # a malformed MTL fails here, naming the file, before any raster is read
    dates = _manifest_list(manifest, "dates", path, required=False)
    bands = {}
    for branch, number in INPUT_BANDS.items():
        files = _manifest_paths(manifest, branch, path, required=True, allow_gdal=allow_gdal)
        bands[branch] = [
            BandInput(file, number, mtl, str(date) if date is not None else Path(file).name)
            for file, mtl, date in zip(files, mtls, dates)
        ]
    inputs = ChipInputs(bands, _manifest_paths(manifest, "qa", path, required=False, allow_gdal=allow_gdal))
    check_calibration(inputs, calibrate, f"manifest {path}")
    return inputs


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is a core dependency
        raise MissingDependencyError("pyyaml", "geo", "Reading a manifest") from exc
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"manifest {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"manifest {path} must map b10, b11, b7, b6 to lists of {N_DATES} rasters")
    return data


def _manifest_list(manifest: dict[str, Any], key: str, path: Path, required: bool) -> list[Any]:
    value = manifest.get(key)
    if value is None and not required:
        return [None] * N_DATES
    if not isinstance(value, list) or len(value) != N_DATES:
        raise InputError(f"manifest {path}: '{key}' must be a list of {N_DATES} entries, one per date")
    return value


def _manifest_paths(
    manifest: dict[str, Any], key: str, path: Path, required: bool, allow_gdal: bool = False
) -> list[Path | str | None]:
    paths: list[Path | str | None] = []
    for entry in _manifest_list(manifest, key, path, required):
        if entry is None and not required:
            paths.append(None)
            continue
        if allow_gdal and is_gdal_path(str(entry).strip()):
            paths.append(str(entry).strip())
            continue
        file = Path(str(entry)).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise InputError(f"manifest {path}: '{key}' file not found: {file}")
        paths.append(file)
    return paths
