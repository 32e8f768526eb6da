"""Landsat-8 physics: MTL metadata, DN calibration, the B7:B6 ratio and quality masks.

The formulas follow the USGS Landsat 8 Data Users Handbook:

* TOA reflectance: ``rho = (REFLECTANCE_MULT_BAND_n * DN + REFLECTANCE_ADD_BAND_n) / sin(SUN_ELEVATION)``.
* TOA radiance: ``L = RADIANCE_MULT_BAND_n * DN + RADIANCE_ADD_BAND_n``.
* Brightness temperature (bands 10, 11): ``T = K2_CONSTANT_BAND_n / ln(K1_CONSTANT_BAND_n / L + 1)`` in kelvin.
* Collection 2 Level-2: surface reflectance ``0.0000275 * DN - 0.2``, surface temperature
  ``0.00341802 * DN + 149.0`` K.

Every conversion returns ``float32`` with NaN wherever the input is nodata: NaN in a float input, the ``nodata``
value when one is given, and DN 0 (the Landsat fill value) for integer input or when ``fill_zero=True``.
Arithmetic runs in float64 and is rounded to float32 once, at the end.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from fusionkern.errors import InputError

Band = int | str
"""A Landsat-8 band: ``6``, ``"6"``, ``"b6"``, ``"B6"`` or ``"band6"``."""

Mtl = Mapping[str, Any]
"""Parsed MTL metadata, as returned by :func:`read_mtl`."""

REFLECTIVE_BANDS = tuple(range(1, 10))
"""OLI bands with reflectance constants in the MTL."""

THERMAL_BANDS = (10, 11)
"""TIRS bands with radiance and K1/K2 constants in the MTL."""

MTL_ROOT_GROUPS = ("L1_METADATA_FILE", "LANDSAT_METADATA_FILE")
"""Outermost group of a pre-collection / Collection 1 MTL, and of a Collection 2 MTL."""

C2_SR_MULT, C2_SR_ADD = 0.0000275, -0.2
C2_ST_MULT, C2_ST_ADD = 0.00341802, 149.0

_BAND_RE = re.compile(r"^(?:b|band)?\s*(\d{1,2})$", re.IGNORECASE)
_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?$")


# --------------------------------------------------------------------------------------------------------------
# MTL metadata
# --------------------------------------------------------------------------------------------------------------


def read_mtl(path: str | Path) -> dict[str, Any]:
    """Parses a Landsat MTL metadata file (pre-collection, Collection 1 or Collection 2 text format).

    The file is ODL text: ``GROUP = NAME`` ... ``END_GROUP = NAME`` blocks holding ``KEY = value`` lines, closed by
    ``END``. Quoted values become strings without their quotes, integers ``int``, decimals ``float``; anything
    else (dates, times, bare words) stays a string. Parenthesised lists become tuples.

    Args:
        path: The ``*_MTL.txt`` file.

    Returns:
        A flat dict ``KEY -> value``, keeping the first occurrence of a key that appears in several groups
        (Collection 2 Level-2 files repeat some keys), plus ``"_groups"``: the nested structure, group name ->
        dict of keys and sub-groups.

    Raises:
        InputError: The file is missing, unreadable, empty, malformed, or not a Landsat MTL file.
    """
    path = Path(path)
    text = _read_text(path)
    groups = _parse_odl(text, path)
    if not any(name in groups for name in MTL_ROOT_GROUPS):
        raise InputError(
            f"{path} is not a Landsat MTL file: no 'GROUP = {MTL_ROOT_GROUPS[0]}' or "
            f"'GROUP = {MTL_ROOT_GROUPS[1]}'"
        )
    flat: dict[str, Any] = {}
    for key, value in _iter_values(groups):
        flat.setdefault(key, value)
    flat["_groups"] = groups
    return flat


def _read_text(path: Path) -> str:
    """Reads an MTL file as text, turning every failure into an InputError naming the file."""
    if not path.is_file():
        raise InputError(f"MTL file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not a Landsat MTL file: not a text file") from exc
    except OSError as exc:
        raise InputError(f"cannot read MTL file {path}: {exc.strerror or exc}") from exc
    if not text.strip():
        raise InputError(f"MTL file {path} is empty")
    return text


def _parse_odl(text: str, path: Path) -> dict[str, Any]:
    """Parses ODL ``GROUP``/``END_GROUP``/``KEY = value`` text into nested dicts (first occurrence wins)."""
    root: dict[str, Any] = {}
    stack: list[tuple[str, dict[str, Any]]] = [("", root)]
    lines = iter(enumerate(text.splitlines(), start=1))
    for number, raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line == "END":
            break
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep or not key:
            raise InputError(f"{path}, line {number}: expected 'KEY = value', found {raw.strip()!r}")
        if key == "GROUP":
            group = stack[-1][1].setdefault(value, {})
            stack.append((value, group if isinstance(group, dict) else {}))
        elif key == "END_GROUP":
            if len(stack) == 1 or stack[-1][0] != value:
                raise InputError(f"{path}, line {number}: END_GROUP = {value} does not close an open group")
            stack.pop()
        else:
            while value.startswith("(") and not value.endswith(")"):
                value += " " + next(lines, (number, ")"))[1].strip()
            stack[-1][1].setdefault(key, _parse_value(value))
    if len(stack) > 1:
        raise InputError(f"{path} is truncated: group {stack[-1][0]} is never closed")
    return root


def _parse_value(value: str) -> Any:
    """Converts one ODL value: quoted string, int, float, parenthesised list, or bare word (kept as str)."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if value.startswith("(") and value.endswith(")"):
        return tuple(_parse_value(item.strip()) for item in value[1:-1].split(",") if item.strip())
    if _INT_RE.match(value):
        return int(value)
    if _FLOAT_RE.match(value):
        return float(value)
    return value


def _iter_values(groups: Mapping[str, Any], skip_prefix: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yields ``(key, value)`` pairs in file order, depth first, skipping groups named ``skip_prefix*``."""
    for key, value in groups.items():
        if isinstance(value, dict):
            if skip_prefix is None or not key.startswith(skip_prefix):
                yield from _iter_values(value, skip_prefix)
        else:
            yield key, value


def _constant(mtl: Mtl, key: str, band: int) -> float:
    """Looks up a Level-1 calibration constant, ignoring Collection 2 Level-2 groups that reuse the key."""
    value = None
    groups = mtl.get("_groups")
    if isinstance(groups, Mapping):
        value = next((v for k, v in _iter_values(groups, skip_prefix="LEVEL2_") if k == key), None)
    if value is None:
        value = mtl.get(key)
    if value is None:
        raise InputError(f"the MTL metadata has no {key}, needed to calibrate band {band}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"the MTL value {key} = {value!r} (band {band}) is not a number")
    return float(value)


def _as_mtl(mtl: Mtl | str | Path) -> Mtl:
    """Accepts parsed metadata or the path of an MTL file."""
    return read_mtl(mtl) if isinstance(mtl, (str, Path)) else mtl


# --------------------------------------------------------------------------------------------------------------
# Bands and nodata
# --------------------------------------------------------------------------------------------------------------


def band_number(band: Band) -> int:
    """Normalises a band name to its Landsat-8 number.

    Args:
        band: ``6``, ``"6"``, ``"b6"``, ``"B6"`` or ``"band6"``.

    Returns:
        The band number, 1 to 11.

    Raises:
        InputError: The band is not a Landsat-8 band.
    """
    number: int | None = None
    if isinstance(band, (int, np.integer)) and not isinstance(band, bool):
        number = int(band)
    elif isinstance(band, str) and (match := _BAND_RE.match(band.strip())):
        number = int(match.group(1))
    if number is None or not 1 <= number <= 11:
        raise InputError(f"unknown Landsat-8 band {band!r}: expected 1..11, e.g. 6, 'b6' or 'B10'")
    return number


def nodata_mask(values: np.ndarray, nodata: float | None = None, fill_zero: bool | None = None) -> np.ndarray:
    """Marks the pixels of a DN array that hold no measurement.

    Args:
        values: Input array (any numeric dtype).
        nodata: A nodata value to mask besides NaN. Large float fill values such as -1.7e308 are matched with a
            relative tolerance of 1e-6, since they rarely survive a round trip through text exactly.
        fill_zero: Whether 0 is the Landsat fill value. ``None`` means: yes for integer input.

    Returns:
        Boolean array, True where the pixel is nodata.
    """
    values = np.asarray(values)
    floating = values.dtype.kind == "f"
    mask = np.isnan(values) if floating else np.zeros(values.shape, dtype=bool)
    if fill_zero is None:
        fill_zero = values.dtype.kind in "iu"
    if fill_zero:
        mask |= values == 0
    if nodata is not None and not np.isnan(nodata):
        mask |= _equals_nodata(values, float(nodata))
    return mask


def _equals_nodata(values: np.ndarray, nodata: float) -> np.ndarray:
    """Equality with a nodata value, tolerant to text round trips for float data."""
    if values.dtype.kind != "f" or nodata == 0 or not math.isfinite(nodata):
        return values == nodata
    with np.errstate(all="ignore"):
        return np.abs(values / nodata - 1.0) <= 1e-6


def _finish(result: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    """Rounds a float64 result to float32 and writes NaN at invalid pixels."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = result.astype(np.float32)
    out[invalid] = np.nan
    return out


def _linear(dn: np.ndarray, mult: float, add: float, nodata: float | None, fill_zero: bool | None) -> np.ndarray:
    """``mult * DN + add`` in float64, with the input's nodata mask."""
    dn = np.asarray(dn)
    invalid = nodata_mask(dn, nodata, fill_zero)
    with np.errstate(all="ignore"):
        values = mult * dn.astype(np.float64) + add
    values[invalid] = np.nan
    return values


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------


def radiance(
    dn: np.ndarray, mtl: Mtl | str | Path, band: Band, nodata: float | None = None, fill_zero: bool | None = None
) -> np.ndarray:
    """Converts Level-1 DN to TOA spectral radiance, W / (m^2 sr um).

    Args:
        dn: Digital numbers (any numeric dtype; NaN counts as nodata).
        mtl: Parsed MTL metadata (:func:`read_mtl`) or the path of the MTL file.
        band: Band 1 to 11.
        nodata: Nodata value of ``dn``, if any.
        fill_zero: Whether DN 0 is fill (default: yes for integer input).

    Returns:
        float32 radiance, NaN at nodata.

    Raises:
        InputError: The MTL lacks ``RADIANCE_MULT_BAND_n`` or ``RADIANCE_ADD_BAND_n``.
    """
    n, mtl = band_number(band), _as_mtl(mtl)
    mult = _constant(mtl, f"RADIANCE_MULT_BAND_{n}", n)
    add = _constant(mtl, f"RADIANCE_ADD_BAND_{n}", n)
    values = _linear(dn, mult, add, nodata, fill_zero)
    return _finish(values, np.isnan(values))


def toa_reflectance(
    dn: np.ndarray, mtl: Mtl | str | Path, band: Band, nodata: float | None = None, fill_zero: bool | None = None
) -> np.ndarray:
    """Converts Level-1 DN to top-of-atmosphere reflectance, corrected for the sun elevation.

    ``rho = (REFLECTANCE_MULT_BAND_n * DN + REFLECTANCE_ADD_BAND_n) / sin(SUN_ELEVATION)``, one sun elevation per
    scene (the scene centre's, as the Handbook's formula uses).

    Args:
        dn: Digital numbers (any numeric dtype; NaN counts as nodata).
        mtl: Parsed MTL metadata (:func:`read_mtl`) or the path of the MTL file.
        band: A reflective band, 1 to 9.
        nodata: Nodata value of ``dn``, if any.
        fill_zero: Whether DN 0 is fill (default: yes for integer input).

    Returns:
        float32 reflectance (unitless, about 0 to 1.2), NaN at nodata.

    Raises:
        InputError: The band is thermal, or the MTL lacks a constant needed.
    """
    n, mtl = band_number(band), _as_mtl(mtl)
    if n not in REFLECTIVE_BANDS:
        raise InputError(f"band {n} has no reflectance calibration: reflective bands are 1 to 9")
    mult = _constant(mtl, f"REFLECTANCE_MULT_BAND_{n}", n)
    add = _constant(mtl, f"REFLECTANCE_ADD_BAND_{n}", n)
    sun_elevation = _constant(mtl, "SUN_ELEVATION", n)
    values = _linear(dn, mult, add, nodata, fill_zero) / math.sin(math.radians(sun_elevation))
    return _finish(values, np.isnan(values))


def brightness_temperature(
    dn: np.ndarray, mtl: Mtl | str | Path, band: Band, nodata: float | None = None, fill_zero: bool | None = None
) -> np.ndarray:
    """Converts Level-1 DN of a thermal band to at-sensor brightness temperature in kelvin.

    ``T = K2_CONSTANT_BAND_n / ln(K1_CONSTANT_BAND_n / L + 1)`` with ``L`` the TOA radiance. Pixels with zero or
    negative radiance have no brightness temperature and become NaN.

    Args:
        dn: Digital numbers (any numeric dtype; NaN counts as nodata).
        mtl: Parsed MTL metadata (:func:`read_mtl`) or the path of the MTL file.
        band: Thermal band 10 or 11.
        nodata: Nodata value of ``dn``, if any.
        fill_zero: Whether DN 0 is fill (default: yes for integer input).

    Returns:
        float32 brightness temperature in kelvin, NaN at nodata.

    Raises:
        InputError: The band is not thermal, or the MTL lacks a constant needed.
    """
    n, mtl = band_number(band), _as_mtl(mtl)
    if n not in THERMAL_BANDS:
        raise InputError(f"band {n} has no brightness temperature: thermal bands are 10 and 11")
    mult = _constant(mtl, f"RADIANCE_MULT_BAND_{n}", n)
    add = _constant(mtl, f"RADIANCE_ADD_BAND_{n}", n)
    k1 = _constant(mtl, f"K1_CONSTANT_BAND_{n}", n)
    k2 = _constant(mtl, f"K2_CONSTANT_BAND_{n}", n)
    rad = _linear(dn, mult, add, nodata, fill_zero)
    invalid = ~(rad > 0)
    with np.errstate(all="ignore"):
        values = k2 / np.log(k1 / rad + 1.0)
    return _finish(values, invalid)


def calibrate(
    dn: np.ndarray, mtl: Mtl | str | Path, band: Band, nodata: float | None = None, fill_zero: bool | None = None
) -> np.ndarray:
    """Converts Level-1 DN to the units FusionNet is trained on.

    Reflective bands (b6, b7) become TOA reflectance, thermal bands (b10, b11) brightness temperature in kelvin.

    Args:
        dn: Digital numbers (any numeric dtype; NaN counts as nodata).
        mtl: Parsed MTL metadata (:func:`read_mtl`) or the path of the MTL file.
        band: Band 1 to 11.
        nodata: Nodata value of ``dn``, if any.
        fill_zero: Whether DN 0 is fill (default: yes for integer input).

    Returns:
        float32 array, NaN at nodata.

    Raises:
        InputError: Unknown band, or a constant missing from the MTL.
    """
    n = band_number(band)
    convert = brightness_temperature if n in THERMAL_BANDS else toa_reflectance
    return convert(dn, mtl, n, nodata=nodata, fill_zero=fill_zero)


def c2_surface_reflectance(dn: np.ndarray, nodata: float | None = None, fill_zero: bool | None = None) -> np.ndarray:
    """Scales Collection 2 Level-2 ``SR_B*`` DN to surface reflectance: ``0.0000275 * DN - 0.2``.

    Args:
        dn: Digital numbers (any numeric dtype; NaN counts as nodata).
        nodata: Nodata value of ``dn``, if any.
        fill_zero: Whether DN 0 is fill (default: yes for integer input, as in the USGS products).

    Returns:
        float32 surface reflectance, NaN at nodata.
    """
    values = _linear(dn, C2_SR_MULT, C2_SR_ADD, nodata, fill_zero)
    return _finish(values, np.isnan(values))


def c2_surface_temperature(dn: np.ndarray, nodata: float | None = None, fill_zero: bool | None = None) -> np.ndarray:
    """Scales Collection 2 Level-2 ``ST_B10`` DN to surface temperature in kelvin: ``0.00341802 * DN + 149.0``.

    Args:
        dn: Digital numbers (any numeric dtype; NaN counts as nodata).
        nodata: Nodata value of ``dn``, if any.
        fill_zero: Whether DN 0 is fill (default: yes for integer input, as in the USGS products).

    Returns:
        float32 surface temperature in kelvin, NaN at nodata.
    """
    values = _linear(dn, C2_ST_MULT, C2_ST_ADD, nodata, fill_zero)
    return _finish(values, np.isnan(values))


def band_ratio(b7: np.ndarray, b6: np.ndarray, nodata: float = np.nan, out: np.ndarray | None = None) -> np.ndarray:
    """The SWIR ratio B7 / B6, guarded: never inf, never a floating-point warning.

    A pixel gets ``nodata`` where B6 is at or below zero, where either input is NaN, infinite or equal to
    ``nodata``, or where the ratio would overflow float32.

    Args:
        b7: Band 7 (TOA reflectance).
        b6: Band 6 (TOA reflectance), same shape as ``b7``.
        nodata: Value written at invalid pixels (NaN by default).
        out: float32 array of that shape to write the ratio into (None: a new one); must not overlap the inputs.

    Returns:
        float32 ratio, same shape as the inputs (``out`` where given).

    Raises:
        ValueError: The two arrays differ in shape, or ``out`` is not float32 of their shape.
    """
    if out is not None and (out.dtype != np.float32 or out.shape != np.shape(b7)):
        raise ValueError(f"out must be float32 of shape {np.shape(b7)}, got {out.dtype} {out.shape}")
    if getattr(b7, "dtype", None) == np.float32 and getattr(b6, "dtype", None) == np.float32:
        return _band_ratio_float32(b7, b6, nodata, out)
    if out is not None:
        out[...] = band_ratio(b7, b6, nodata)
        return out
    b7 = np.asarray(b7, dtype=np.float64)
    b6 = np.asarray(b6, dtype=np.float64)
    if b7.shape != b6.shape:
        raise ValueError(f"band_ratio needs arrays of one shape, got b7 {b7.shape} and b6 {b6.shape}")
    invalid = ~np.isfinite(b7) | ~np.isfinite(b6) | ~(b6 > 0)
    if not np.isnan(nodata):
        invalid |= (b7 == nodata) | (b6 == nodata)
    ratio = np.divide(b7, b6, out=np.zeros_like(b7), where=~invalid)
    invalid |= np.abs(ratio) > np.finfo(np.float32).max
    ratio[invalid] = 0.0
    out = ratio.astype(np.float32)
    out[invalid] = nodata
    return out


def _band_ratio_float32(b7: np.ndarray, b6: np.ndarray, nodata: float, out: np.ndarray | None) -> np.ndarray:
    """:func:`band_ratio` of float32 bands, divided in float32: the same values as dividing in float64 and
    rounding (double rounding is innocuous for division from binary64 to binary32), without the float64 copies.
    Quotients that round to infinity are invalid, as quotients beyond the float32 range are there."""
    if b7.shape != b6.shape:
        raise ValueError(f"band_ratio needs arrays of one shape, got b7 {b7.shape} and b6 {b6.shape}")
    with np.errstate(all="ignore"):
        out = np.divide(b7, b6, out=out, dtype=np.float32)
    # the quotient is NaN or infinite wherever b7 is, or b6 is 0 or NaN, or it overflows; b6 < 0 and b6 = inf
    # (with a finite b7) leave it finite, so b6 is tested for those two
    invalid = ~np.isfinite(out)
    invalid |= ~(b6 > 0)
    invalid |= b6 == np.inf
    if not np.isnan(nodata):
        invalid |= (b7 == nodata) | (b6 == nodata)
    if invalid.any():
        np.copyto(out, np.float32(nodata), where=invalid)
    return out


# --------------------------------------------------------------------------------------------------------------
# Quality masks
# --------------------------------------------------------------------------------------------------------------


def _qa_bits(qa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the QA words as uint16 and a mask of pixels without a QA word (NaN in float input).

    Signed input (int16 rasters such as re-encoded BQA files) is reinterpreted bit for bit, not clipped.
    """
    qa = np.asarray(qa)
    missing = np.zeros(qa.shape, dtype=bool)
    if qa.dtype.kind == "f":
        missing = ~np.isfinite(qa)
        words = np.where(missing, 0, qa).astype(np.int64) & 0xFFFF
        return words.astype(np.uint16), missing
    if qa.dtype == np.int16:
        return qa.view(np.uint16), missing
    if qa.dtype.kind in "iu":
        return (qa.astype(np.int64) & 0xFFFF).astype(np.uint16), missing
    raise InputError(f"a QA band must hold integers, got dtype {qa.dtype}")


def _bit(words: np.ndarray, bit: int) -> np.ndarray:
    return (words >> bit) & 1 == 1


def _high(words: np.ndarray, low_bit: int) -> np.ndarray:
    """Two-bit confidence field starting at ``low_bit`` equal to 3 (high)."""
    return (words >> low_bit) & 0b11 == 0b11


def cloud_mask_c1_bqa(
    bqa: np.ndarray,
    *,
    cloud: bool = True,
    cloud_confidence_high: bool = True,
    cloud_shadow_confidence_high: bool = True,
    fill: bool = True,
) -> np.ndarray:
    """Invalid pixels from a Collection 1 (or pre-collection) ``BQA`` band.

    Bits: 0 designated fill, 4 cloud, 5-6 cloud confidence, 7-8 cloud shadow confidence (two-bit fields,
    3 = high). By default every flag below is on, matching :func:`cloud_mask_c2_qa_pixel` (cloud and shadow).

    Args:
        bqa: The BQA words, uint16 or int16 (reinterpreted as uint16); NaN in float input counts as invalid.
        cloud: Mask bit 4 (cloud).
        cloud_confidence_high: Mask pixels whose cloud confidence (bits 5-6) is high.
        cloud_shadow_confidence_high: Mask pixels whose cloud shadow confidence (bits 7-8) is high.
        fill: Mask bit 0 (designated fill).

    Returns:
        Boolean array, True where the pixel is invalid.
    """
    words, invalid = _qa_bits(bqa)
    if fill:
        invalid |= _bit(words, 0)
    if cloud:
        invalid |= _bit(words, 4)
    if cloud_confidence_high:
        invalid |= _high(words, 5)
    if cloud_shadow_confidence_high:
        invalid |= _high(words, 7)
    return invalid


def cloud_mask_c2_qa_pixel(
    qa: np.ndarray,
    *,
    dilated_cloud: bool = True,
    cirrus: bool = False,
    cloud: bool = True,
    cloud_shadow: bool = True,
    fill: bool = True,
) -> np.ndarray:
    """Invalid pixels from a Collection 2 ``QA_PIXEL`` band.

    Bits: 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud, 4 cloud shadow.

    Args:
        qa: The QA_PIXEL words, uint16 or int16 (reinterpreted as uint16); NaN in float input counts as invalid.
        dilated_cloud: Mask bit 1 (dilated cloud).
        cirrus: Mask bit 2 (high-confidence cirrus); off by default, SWIR and TIR see through thin cirrus best.
        cloud: Mask bit 3 (cloud).
        cloud_shadow: Mask bit 4 (cloud shadow).
        fill: Mask bit 0 (fill).

    Returns:
        Boolean array, True where the pixel is invalid.
    """
    words, invalid = _qa_bits(qa)
    for enabled, bit in ((fill, 0), (dilated_cloud, 1), (cirrus, 2), (cloud, 3), (cloud_shadow, 4)):
        if enabled:
            invalid |= _bit(words, bit)
    return invalid
