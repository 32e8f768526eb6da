"""Where rasters enter: finding Landsat files by name, reading with nodata as NaN, clear errors on bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CLIP_C1_AFRICA, CLIP_C1_MARBURG, CLIP_PRE
from fusionkern import landsat, readers
from fusionkern.errors import InputError, MissingDependencyError

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

CLIPS = {
    CLIP_C1_AFRICA: dict(dtype="uint16", nodata=65535.0, epsg=32637, shape=(101, 101), qa=True),
    CLIP_C1_MARBURG: dict(dtype="int16", nodata=-32768.0, epsg=32632, shape=(41, 41), qa=True),
    CLIP_PRE: dict(dtype="float64", nodata=-1.7e308, epsg=32619, shape=(134, 184), qa=False),
}


def _write_tif(path: Path, data: np.ndarray, nodata: float | None = None, **extra) -> Path:
    """A small single-band GeoTIFF in UTM 50N."""
    profile = dict(
        driver="GTiff", dtype=data.dtype.name, count=1, width=data.shape[1], height=data.shape[0],
        crs="EPSG:32650", transform=from_origin(400000.0, 3500000.0, 30.0, 30.0), nodata=nodata, **extra,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"")


# ---------------------------------------------------------------------------------------------------------------
# Finding files
# ---------------------------------------------------------------------------------------------------------------


def test_find_band_file_real_naming_schemes(clip_dir):
    for band in (6, 7, 10, 11):
        for spelling in (band, str(band), f"b{band}", f"B{band}"):
            path = readers.find_band_file(clip_dir, spelling)
            assert path.parent == clip_dir
            assert path.name.upper().endswith((f"_B{band}.TIF", f"_BAND{band}.TIF"))
    mtl = readers.find_mtl(clip_dir)
    assert mtl is not None and mtl.name.endswith("_MTL.txt")
    qa = readers.find_qa_file(clip_dir)
    assert (qa is not None) == CLIPS[clip_dir.name]["qa"]
    if qa is not None:
        assert qa.name.endswith("_BQA.TIF")


def test_find_band_file_collection2_names(tmp_path):
    product = "LC08_L2SP_123032_20200101_20200823_02_T1"
    _touch(
        tmp_path,
        f"{product}_SR_B1.TIF", f"{product}_SR_B6.TIF", f"{product}_SR_B7.TIF", f"{product}_ST_B10.TIF",
        f"{product}_ST_QA.TIF", f"{product}_QA_PIXEL.TIF", f"{product}_MTL.txt", f"{product}_MTL.xml",
        f"{product}_SR_B6.TIF.aux.xml",
    )
    assert readers.find_band_file(tmp_path, 6).name == f"{product}_SR_B6.TIF"
    assert readers.find_band_file(tmp_path, "b10").name == f"{product}_ST_B10.TIF"
    assert readers.find_band_file(tmp_path, 1).name == f"{product}_SR_B1.TIF"  # B1 never matches B10
    assert readers.find_qa_file(tmp_path).name == f"{product}_QA_PIXEL.TIF"
    assert readers.find_mtl(tmp_path).name == f"{product}_MTL.txt"


def test_find_band_file_is_case_insensitive(tmp_path):
    _touch(tmp_path, "scene_b7.tif", "scene_BAND6.TIFF", "scene_bqa.tif")
    assert readers.find_band_file(tmp_path, 7).name == "scene_b7.tif"
    assert readers.find_band_file(tmp_path, 6).name == "scene_BAND6.TIFF"
    assert readers.find_qa_file(tmp_path).name == "scene_bqa.tif"
    assert readers.find_mtl(tmp_path) is None


def test_find_band_file_ambiguous_or_absent_names_folder_and_band(tmp_path):
    _touch(tmp_path, "a_B6.TIF", "b_band6.tif", "a_BQA.TIF", "a_QA_PIXEL.TIF")
    with pytest.raises(InputError, match="band 6 is ambiguous") as info:
        readers.find_band_file(tmp_path, 6)
    assert str(tmp_path) in str(info.value) and "a_B6.TIF" in str(info.value)
    with pytest.raises(InputError, match="no file for band 11") as info:
        readers.find_band_file(tmp_path, "B11")
    assert str(tmp_path) in str(info.value)
    with pytest.raises(InputError, match="QA band is ambiguous"):
        readers.find_qa_file(tmp_path)
    missing = tmp_path / "no_such_scene"
    with pytest.raises(InputError, match="scene folder not found") as info:
        readers.find_band_file(missing, 6)
    assert str(missing) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Reading the real clips
# ---------------------------------------------------------------------------------------------------------------


def test_read_raster_real_clips(clip_dir):
    expected = CLIPS[clip_dir.name]
    path = readers.find_band_file(clip_dir, 6)
    values, profile = readers.read_raster(path)
    assert values.dtype == np.float32 and values.shape == expected["shape"]
    assert profile["dtype"] == "float32" and np.isnan(profile["nodata"])
    assert profile["crs"].to_epsg() == expected["epsg"]
    raw, raw_profile = readers.read_raster(path, out_dtype=None)
    assert raw.dtype == np.dtype(expected["dtype"]) and raw_profile["nodata"] == pytest.approx(expected["nodata"])
    np.testing.assert_array_equal(values, raw.astype(np.float32))


def test_nodata_becomes_nan_per_clip(clip_dir, tmp_path):
    expected = CLIPS[clip_dir.name]
    source = readers.find_band_file(clip_dir, 7)
    with rasterio.open(source) as src:
        data, profile = src.read(1), src.profile
    data[0, 0] = expected["nodata"]
    data[5, 6] = expected["nodata"]
    invalid = np.zeros(data.shape, dtype=bool)
    invalid[0, 0] = invalid[5, 6] = True
    if data.dtype.kind == "f":
        data[9, 9] = np.nextafter(expected["nodata"], 0.0)  # not bit-identical to the tag, still nodata
        invalid[9, 9] = True
    path = tmp_path / source.name
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    values, _ = readers.read_raster(path)
    np.testing.assert_array_equal(np.isnan(values), invalid)
    np.testing.assert_array_equal(values[~invalid], data[~invalid].astype(np.float32))


def test_read_raster_window(landsat8_dir):
    path = readers.find_band_file(landsat8_dir / CLIP_PRE, 10)
    full, full_profile = readers.read_raster(path)
    part, profile = readers.read_raster(path, window=((10, 20), (5, 17)))
    np.testing.assert_array_equal(part, full[10:20, 5:17])
    assert (profile["height"], profile["width"]) == (10, 12)
    assert profile["transform"] == full_profile["transform"] * rasterio.Affine.translation(5, 10)
    with pytest.raises(InputError, match="leaves raster") as info:
        readers.read_raster(path, window=((130, 140), (0, 10)))
    assert str(path) in str(info.value)


def test_read_scene_band_calibrates_with_mtl(clip_dir, tmp_path):
    mtl = landsat.read_mtl(readers.find_mtl(clip_dir))
    dn, _ = readers.read_raster(readers.find_band_file(clip_dir, 10))
    bt, profile = readers.read_scene_band(clip_dir, "b10")
    np.testing.assert_array_equal(bt, landsat.calibrate(dn, mtl, 10))
    assert 220 < np.nanmin(bt) and np.nanmax(bt) < 340
    raw, _ = readers.read_scene_band(clip_dir, 10, calibrate=False)
    np.testing.assert_array_equal(raw, dn)
    # Without an MTL, DN are never passed off as calibrated values: an error naming the folder, unless asked for.
    band_file = readers.find_band_file(clip_dir, 10)
    (tmp_path / band_file.name).symlink_to(band_file)
    with pytest.raises(InputError, match="no \\*_MTL.txt") as info:
        readers.read_scene_band(tmp_path, 10)
    assert str(tmp_path) in str(info.value)
    values, _ = readers.read_scene_band(tmp_path, 10, calibrate=False)
    np.testing.assert_array_equal(values, dn)


def test_calibrate_band_by_product_name():
    dn = np.array([[0.0, 10000.0]], dtype=np.float32)
    sr = readers.calibrate_band(dn, "LC08_X_SR_B6.TIF", 6)
    np.testing.assert_array_equal(sr, landsat.c2_surface_reflectance(dn, fill_zero=True))
    assert np.isnan(sr[0, 0])
    st = readers.calibrate_band(dn, "LC08_X_ST_B10.TIF", 10)
    np.testing.assert_array_equal(st, landsat.c2_surface_temperature(dn, fill_zero=True))
    np.testing.assert_array_equal(readers.calibrate_band(dn, "composite_b6.tif", 6), dn)


def test_qa_invalid_mask_by_name():
    words = np.array([1 << 3, 1 << 4, 2720], dtype=np.uint16)
    np.testing.assert_array_equal(readers.qa_invalid_mask(words, "x_QA_PIXEL.TIF"), [True, True, False])
    np.testing.assert_array_equal(readers.qa_invalid_mask(words, "x_BQA.TIF"), [False, True, False])


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "missing_B6.TIF"
    with pytest.raises(InputError, match="not found") as info:
        readers.read_raster(path)
    assert str(path) in str(info.value)


def test_truncated_geotiff(tmp_path):
    rng = np.random.default_rng(0)
    whole = _write_tif(tmp_path / "whole.tif", rng.integers(1, 60000, (256, 256), dtype=np.uint16))
    truncated = tmp_path / "truncated_B6.TIF"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InputError, match="cannot (open|read) raster") as info:
        readers.read_raster(truncated)
    assert str(truncated) in str(info.value)


def test_not_a_raster(tmp_path):
    path = tmp_path / "notes_B6.TIF"
    path.write_text("this is not a GeoTIFF\n")
    with pytest.raises(InputError, match="cannot open raster") as info:
        readers.read_raster(path)
    assert str(path) in str(info.value)


def test_band_that_does_not_exist(tmp_path):
    path = _write_tif(tmp_path / "one.tif", np.ones((4, 4), dtype=np.float32))
    with pytest.raises(InputError, match="band 2 does not exist") as info:
        readers.read_raster(path, band=2)
    assert str(path) in str(info.value)


def test_gdal_mask_band_becomes_nan(tmp_path):
    path = tmp_path / "masked.tif"
    data = np.arange(16, dtype=np.uint16).reshape(4, 4) + 1
    _write_tif(path, data)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
        mask = np.full((4, 4), 255, dtype=np.uint8)
        mask[2, 3] = 0
        dst.write_mask(mask)
    values, _ = readers.read_raster(path)
    assert np.isnan(values[2, 3]) and np.isnan(values).sum() == 1


@pytest.mark.parametrize(
    "dtype, nodata, mask",
    [("uint16", 0.0, False), ("int16", -32768.0, False), ("uint8", None, True), ("uint32", 7.0, False),
     ("float32", -9999.0, False), ("float64", -1.7e308, False), ("int16", None, False)],
)  # fmt: skip
def test_reading_into_an_array_gives_what_a_plain_read_gives(tmp_path, dtype, nodata, mask):
    rng = np.random.default_rng()
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    low, high = (info.min, info.max) if info is not None else (-1e4, 1e4)
    data = rng.uniform(max(low, -1e9), min(high, 1e9), (23, 31)).astype(dtype)
    data.flat[rng.choice(data.size, 9, replace=False)] = nodata if nodata is not None else 0
    data[10, 10] = nodata if nodata is not None else 0  # inside every window drawn below
    if np.dtype(dtype).kind == "f":
        data[1, 2] = np.nan
        data[3, 4] = np.nextafter(np.float64(nodata), 0.0).astype(dtype)  # not bit-identical, still nodata
    if dtype == "uint32":
        data[5, 5] = 16_777_217  # not exact in float32: that read takes the copying path
    path = _write_tif(tmp_path / "band.tif", data, nodata)
    if mask:
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
            m = np.full(data.shape, 255, dtype=np.uint8)
            m[4, 7:10] = 0
            dst.write_mask(m)
    window = tuple((int(rng.integers(0, a)), int(rng.integers(b, c))) for a, b, c in ((5, 15, 24), (6, 20, 32)))
    with readers.RasterSource(path) as source:
        want = source.read(window)
        shape = want.shape
        out = np.full(shape, 123.0, dtype=np.float32)
        got = source.read(window, out=out)
        assert got is out
        np.testing.assert_array_equal(got, want)  # NaN where the plain read has NaN, the same values elsewhere
        assert np.isnan(got).any() == (nodata is not None or mask)
        whole = source.read(None, out=np.empty(data.shape, np.float32))
        np.testing.assert_array_equal(whole, source.read())
        for bad in (np.empty(shape, np.float64), np.empty((shape[0] + 1, shape[1]), np.float32),
                    np.empty((shape[1], shape[0] * 2), np.float32)[:, ::2].T):  # fmt: skip
            with pytest.raises(ValueError, match="out must be"):
                source.read(window, out=bad)


def test_missing_rasterio_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rasterio", None)
    with pytest.raises(MissingDependencyError, match=r"rasterio.*fusionkern\[geo\]"):
        readers.read_raster(tmp_path / "any.tif")
