"""Landsat-8 physics: MTL parsing, calibration against the real clips, nodata, the B7:B6 ratio, QA masks."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from fusionkern import landsat
from fusionkern.errors import InputError
from conftest import CLIP_C1_AFRICA, CLIP_C1_MARBURG, CLIP_PRE

rasterio = pytest.importorskip("rasterio")

# Per clip: stored dtype, nodata value, and a few MTL values read off the files by eye.
CLIPS = {
    CLIP_C1_AFRICA: dict(dtype="uint16", nodata=65535, sun=59.03847941, path=167, date="2017-03-08", collection=1),
    CLIP_C1_MARBURG: dict(dtype="int16", nodata=-32768, sun=58.99675180, path=195, date="2013-07-07", collection=1),
    CLIP_PRE: dict(dtype="float64", nodata=-1.7e308, sun=52.70271194, path=232, date="2016-02-09", collection=None),
}
REFLECTIVE = (6, 7)
THERMAL = (10, 11)


def _mtl_path(clip_dir: Path) -> Path:
    return next(clip_dir.glob("*_MTL.txt"))


def _band_path(clip_dir: Path, band: int) -> Path:
    return next(p for p in clip_dir.iterdir() if p.name.upper().endswith((f"_B{band}.TIF", f"_BAND{band}.TIF")))


def _read_dn(clip_dir: Path, band: int) -> np.ndarray:
    with rasterio.open(_band_path(clip_dir, band)) as src:
        return src.read(1)


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    """Context in which any warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------------------------------------------------------
# MTL parsing
# ---------------------------------------------------------------------------------------------------------------


def test_read_mtl_real_clips(clip_dir):
    expected = CLIPS[clip_dir.name]
    mtl = landsat.read_mtl(_mtl_path(clip_dir))
    assert mtl["SUN_ELEVATION"] == expected["sun"]
    assert mtl["WRS_PATH"] == expected["path"] and isinstance(mtl["WRS_PATH"], int)
    assert mtl["DATE_ACQUIRED"] == expected["date"]  # dates stay strings
    assert mtl["SPACECRAFT_ID"] == "LANDSAT_8"  # quotes stripped
    assert mtl.get("COLLECTION_NUMBER") == expected["collection"]
    assert mtl["K2_CONSTANT_BAND_10"] == 1321.0789
    assert mtl["RADIANCE_MULT_BAND_10"] == 3.342e-4
    groups = mtl["_groups"]
    assert list(groups) == ["L1_METADATA_FILE"]
    assert groups["L1_METADATA_FILE"]["IMAGE_ATTRIBUTES"]["SUN_ELEVATION"] == expected["sun"]
    for band in (*REFLECTIVE, *THERMAL):
        assert isinstance(mtl[f"RADIANCE_ADD_BAND_{band}"], float)


C2_MTL = """GROUP = LANDSAT_METADATA_FILE
  GROUP = PRODUCT_CONTENTS
    LANDSAT_PRODUCT_ID = "LC08_L2SP_123032_20200101_20200823_02_T1"
    COLLECTION_NUMBER = 02
  END_GROUP = PRODUCT_CONTENTS
  GROUP = IMAGE_ATTRIBUTES
    SUN_ELEVATION = 30.0
    SCENE_CENTER_TIME = "03:12:45.1234560Z"
  END_GROUP = IMAGE_ATTRIBUTES
  GROUP = LEVEL2_SURFACE_REFLECTANCE_PARAMETERS
    REFLECTANCE_MULT_BAND_6 = 2.75E-05
    REFLECTANCE_ADD_BAND_6 = -0.200000
  END_GROUP = LEVEL2_SURFACE_REFLECTANCE_PARAMETERS
  GROUP = LEVEL1_RADIOMETRIC_RESCALING
    REFLECTANCE_MULT_BAND_6 = 2.0000E-05
    REFLECTANCE_ADD_BAND_6 = -0.100000
    CORNERS = (1.5, 2,
               "three")
  END_GROUP = LEVEL1_RADIOMETRIC_RESCALING
END_GROUP = LANDSAT_METADATA_FILE
END
"""


def test_read_mtl_collection2_duplicates_and_lists(tmp_path):
    path = tmp_path / "LC08_L2SP_MTL.txt"
    path.write_text(C2_MTL)
    mtl = landsat.read_mtl(path)
    assert mtl["COLLECTION_NUMBER"] == 2
    assert mtl["REFLECTANCE_MULT_BAND_6"] == 2.75e-05  # first occurrence kept in the flat dict
    level1 = mtl["_groups"]["LANDSAT_METADATA_FILE"]["LEVEL1_RADIOMETRIC_RESCALING"]
    assert level1["REFLECTANCE_MULT_BAND_6"] == 2.0e-05  # the nested structure keeps both
    assert level1["CORNERS"] == (1.5, 2, "three")
    # Calibration uses the Level-1 constants, not the Level-2 surface reflectance scaling that reuses the key.
    rho = landsat.toa_reflectance(np.array([10000], dtype=np.uint16), mtl, 6)
    assert rho[0] == np.float32((2.0e-05 * 10000 - 0.1) / math.sin(math.radians(30.0)))


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),  # empty file
        ("   \n\n", "empty"),  # blank lines only
        ("GROUP = SOMETHING_ELSE\n  A = 1\nEND_GROUP = SOMETHING_ELSE\nEND\n", "not a Landsat MTL"),
        ("just some text\n", "expected 'KEY = value'"),
        ("GROUP = L1_METADATA_FILE\n  A = 1\n", "never closed"),  # truncated
    ],
)
def test_read_mtl_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "scene_MTL.txt"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        landsat.read_mtl(path)
    assert str(path) in str(info.value)


def test_read_mtl_missing_and_binary(tmp_path):
    missing = tmp_path / "nope_MTL.txt"
    with pytest.raises(InputError, match="not found") as info:
        landsat.read_mtl(missing)
    assert str(missing) in str(info.value)
    binary = tmp_path / "binary_MTL.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(InputError, match="not a Landsat MTL") as info:
        landsat.read_mtl(binary)
    assert str(binary) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Calibration on the real clips
# ---------------------------------------------------------------------------------------------------------------


def test_band_names():
    for band in (6, "6", "b6", "B6", "band6", np.int64(6)):
        assert landsat.band_number(band) == 6
    assert landsat.band_number("B10") == 10
    for bad in (0, 12, "b12", "x", "", 6.0, True):
        with pytest.raises(InputError, match="band"):
            landsat.band_number(bad)


def test_calibrated_values_physically_plausible(clip_dir):
    mtl = landsat.read_mtl(_mtl_path(clip_dir))
    for band in REFLECTIVE:
        rho = landsat.calibrate(_read_dn(clip_dir, band), mtl, f"b{band}")
        assert rho.dtype == np.float32 and np.isfinite(rho).all()
        assert 0.0 < rho.min() and rho.max() < 1.2, (band, rho.min(), rho.max())
    for band in THERMAL:
        bt = landsat.calibrate(_read_dn(clip_dir, band), mtl, f"B{band}")
        assert bt.dtype == np.float32 and np.isfinite(bt).all()
        assert 220.0 < bt.min() and bt.max() < 340.0, (band, bt.min(), bt.max())


def test_one_pixel_by_hand(clip_dir):
    mtl_text = _mtl_path(clip_dir).read_text()

    def constant(key: str) -> float:
        line = next(line for line in mtl_text.splitlines() if line.strip().startswith(key + " "))
        return float(line.split("=")[1])

    row, col = 7, 11
    sun = math.radians(constant("SUN_ELEVATION"))
    dn6 = float(_read_dn(clip_dir, 6)[row, col])
    rho = (constant("REFLECTANCE_MULT_BAND_6") * dn6 + constant("REFLECTANCE_ADD_BAND_6")) / math.sin(sun)
    assert landsat.toa_reflectance(_read_dn(clip_dir, 6), _mtl_path(clip_dir), 6)[row, col] == np.float32(rho)

    dn10 = float(_read_dn(clip_dir, 10)[row, col])
    rad = constant("RADIANCE_MULT_BAND_10") * dn10 + constant("RADIANCE_ADD_BAND_10")
    bt = constant("K2_CONSTANT_BAND_10") / math.log(constant("K1_CONSTANT_BAND_10") / rad + 1.0)
    mtl = landsat.read_mtl(_mtl_path(clip_dir))
    assert landsat.radiance(_read_dn(clip_dir, 10), mtl, 10)[row, col] == np.float32(rad)
    assert landsat.brightness_temperature(_read_dn(clip_dir, 10), mtl, 10)[row, col] == np.float32(bt)


def test_nodata_and_fill_propagate_per_clip(clip_dir):
    expected = CLIPS[clip_dir.name]
    mtl = landsat.read_mtl(_mtl_path(clip_dir))
    for band in (6, 10):
        dn = _read_dn(clip_dir, band)
        assert dn.dtype == np.dtype(expected["dtype"])
        dn[0, 0] = expected["nodata"]
        dn[1, 1] = 0  # the Landsat fill value
        if dn.dtype.kind == "f":
            dn[2, 2] = np.nan
            dn[3, 3] = np.nextafter(expected["nodata"], 0.0)  # a fill value that went through text and back
        with _no_warnings():
            out = landsat.calibrate(dn, mtl, band, nodata=expected["nodata"], fill_zero=True)
        invalid = np.zeros(dn.shape, dtype=bool)
        invalid[0, 0] = invalid[1, 1] = True
        if dn.dtype.kind == "f":
            invalid[2, 2] = invalid[3, 3] = True
        np.testing.assert_array_equal(np.isnan(out), invalid)


def test_nodata_rules():
    mtl = {"REFLECTANCE_MULT_BAND_6": 2e-5, "REFLECTANCE_ADD_BAND_6": -0.1, "SUN_ELEVATION": 90.0}
    ints = np.array([0, 1, 5000, 65535], dtype=np.uint16)
    out = landsat.toa_reflectance(ints, mtl, 6)
    np.testing.assert_array_equal(np.isnan(out), [True, False, False, False])  # integer 0 is fill by default
    out = landsat.toa_reflectance(ints, mtl, 6, nodata=65535)
    np.testing.assert_array_equal(np.isnan(out), [True, False, False, True])
    floats = np.array([0.0, np.nan, 5000.0], dtype=np.float32)
    np.testing.assert_array_equal(np.isnan(landsat.toa_reflectance(floats, mtl, 6)), [False, True, False])
    np.testing.assert_array_equal(
        np.isnan(landsat.toa_reflectance(floats, mtl, 6, fill_zero=True)), [True, True, False]
    )


def test_missing_constant_names_key_and_band(tmp_path, landsat8_dir):
    source = _mtl_path(landsat8_dir / CLIP_C1_AFRICA).read_text()
    stripped = "\n".join(line for line in source.splitlines() if "K1_CONSTANT_BAND_11" not in line)
    path = tmp_path / "stripped_MTL.txt"
    path.write_text(stripped)
    dn = np.full((2, 2), 25000, dtype=np.uint16)
    with pytest.raises(InputError, match=r"K1_CONSTANT_BAND_11.*band 11"):
        landsat.calibrate(dn, path, "b11")
    landsat.calibrate(dn, path, "b10")  # the other thermal band is still complete
    with pytest.raises(InputError, match=r"SUN_ELEVATION.*band 7"):
        landsat.toa_reflectance(dn, {"REFLECTANCE_MULT_BAND_7": 2e-5, "REFLECTANCE_ADD_BAND_7": -0.1}, 7)
    with pytest.raises(InputError, match="band 10 has no reflectance"):
        landsat.toa_reflectance(dn, path, 10)
    with pytest.raises(InputError, match="band 6 has no brightness"):
        landsat.brightness_temperature(dn, path, 6)


def test_brightness_temperature_of_non_positive_radiance_is_nan():
    mtl = {"RADIANCE_MULT_BAND_10": 1.0, "RADIANCE_ADD_BAND_10": -2.0, "K1_CONSTANT_BAND_10": 774.8853,
           "K2_CONSTANT_BAND_10": 1321.0789}
    with _no_warnings():
        out = landsat.brightness_temperature(np.array([1, 2, 3], dtype=np.uint16), mtl, 10)
    np.testing.assert_array_equal(np.isnan(out), [True, True, False])


def test_collection2_level2_scalings():
    dn = np.array([0, 7273, 43636, 65535], dtype=np.uint16)
    sr = landsat.c2_surface_reflectance(dn)
    expected = np.array([np.nan, 0.0000275 * 7273 - 0.2, 0.0000275 * 43636 - 0.2, 0.0000275 * 65535 - 0.2])
    np.testing.assert_array_equal(sr, expected.astype(np.float32))
    st = landsat.c2_surface_temperature(dn, nodata=65535)
    expected = np.array([np.nan, 0.00341802 * 7273 + 149.0, 0.00341802 * 43636 + 149.0, np.nan])
    np.testing.assert_array_equal(st, expected.astype(np.float32))
    assert st.dtype == np.float32


# ---------------------------------------------------------------------------------------------------------------
# B7 / B6 ratio
# ---------------------------------------------------------------------------------------------------------------


def test_band_ratio_guards():
    nan = np.nan
    b7 = np.array([0.2, 0.3, 0.3, nan, 0.2, 0.2, np.inf, 1.0], dtype=np.float32)
    b6 = np.array([0.4, 0.0, -0.1, 0.2, nan, np.inf, 0.2, 1e-40], dtype=np.float32)
    #           ok    b6=0 b6<0  b7 nan b6 nan b6 inf b7 inf  overflow
    expected = np.array([np.float32(0.2) / np.float32(0.4), nan, nan, nan, nan, nan, nan, nan], dtype=np.float32)
    with _no_warnings():
        out = landsat.band_ratio(b7, b6)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    assert not np.isinf(out).any()


def test_band_ratio_with_nodata_value():
    b7 = np.array([[0.25, -9999.0], [0.1, 0.3]])
    b6 = np.array([[0.5, 0.5], [-9999.0, 0.0]])
    with _no_warnings():
        out = landsat.band_ratio(b7, b6, nodata=-9999.0)
    np.testing.assert_array_equal(out, np.array([[0.5, -9999.0], [-9999.0, -9999.0]], dtype=np.float32))


@pytest.mark.parametrize("nodata", [np.nan, -9999.0, 0.0])
def test_band_ratio_of_float32_bands_equals_the_float64_route(nodata):
    specials = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-38, 1e-45, -9999.0, 0.5, 2.0]
    b7, b6 = (a.ravel().astype(np.float32) for a in np.meshgrid(specials, specials))
    rng = np.random.default_rng()
    b7 = np.concatenate([b7, rng.normal(size=999).astype(np.float32)])
    b6 = np.concatenate([b6, rng.normal(size=999).astype(np.float32)])
    with _no_warnings():
        want = landsat.band_ratio(b7.astype(np.float64), b6.astype(np.float64), nodata=nodata)
        got = landsat.band_ratio(b7, b6, nodata=nodata)
        out = np.full(b7.shape, 5.0, np.float32)
        into = landsat.band_ratio(b7, b6, nodata=nodata, out=out)
        into64 = landsat.band_ratio(b7.astype(np.float64), b6, nodata=nodata, out=np.empty(b7.shape, np.float32))
    assert got.dtype == np.float32 and into is out
    for result in (got, into, into64):
        np.testing.assert_array_equal(result, want)
    with pytest.raises(ValueError, match="out must be float32"):
        landsat.band_ratio(b7, b6, out=np.empty(b7.shape, np.float64))


def test_band_ratio_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        landsat.band_ratio(np.ones(3), np.ones(4))


def test_band_ratio_on_real_clip(clip_dir):
    mtl = landsat.read_mtl(_mtl_path(clip_dir))
    b7 = landsat.calibrate(_read_dn(clip_dir, 7), mtl, 7)
    b6 = landsat.calibrate(_read_dn(clip_dir, 6), mtl, 6)
    ratio = landsat.band_ratio(b7, b6)
    np.testing.assert_array_equal(ratio, (b7.astype(np.float64) / b6).astype(np.float32))
    assert 0.3 < ratio.min() and ratio.max() < 1.5


# ---------------------------------------------------------------------------------------------------------------
# Quality masks
# ---------------------------------------------------------------------------------------------------------------


def test_c2_qa_pixel_known_bits():
    qa = np.array(
        [
            0,  # nothing set
            1 << 0,  # fill
            1 << 1,  # dilated cloud
            1 << 2,  # cirrus (off by default)
            1 << 3,  # cloud
            1 << 4,  # cloud shadow
            1 << 6,  # clear
            0b11 << 8,  # cloud confidence high alone: not a flag of this mask
            21824,  # USGS "clear, low confidence" land value
            22280,  # USGS "cloud, high confidence" value (bit 3 set)
        ],
        dtype=np.uint16,
    )
    np.testing.assert_array_equal(
        landsat.cloud_mask_c2_qa_pixel(qa), [False, True, True, False, True, True, False, False, False, True]
    )
    np.testing.assert_array_equal(landsat.cloud_mask_c2_qa_pixel(qa, cirrus=True)[3], True)
    only_cloud = landsat.cloud_mask_c2_qa_pixel(qa, dilated_cloud=False, cloud_shadow=False, fill=False)
    np.testing.assert_array_equal(only_cloud, [False, False, False, False, True, False, False, False, False, True])


def test_qa_masks_accept_signed_and_float():
    signed = np.array([(0x8000 | 1 << 3) - 0x10000, -0x8000, 1 << 4], dtype=np.int16)  # high bit set, as int16
    np.testing.assert_array_equal(landsat.cloud_mask_c2_qa_pixel(signed), [True, False, True])
    np.testing.assert_array_equal(landsat.cloud_mask_c1_bqa(signed), [False, False, True])
    floats = np.array([np.nan, 2720.0, 2800.0])
    np.testing.assert_array_equal(landsat.cloud_mask_c1_bqa(floats), [True, False, True])


def test_c1_bqa_bits():
    bqa = np.array(
        [
            2720,  # clear: low cloud / shadow / snow / cirrus confidence
            2800,  # cloud (bit 4) with high cloud confidence
            1,  # designated fill
            0b11 << 5,  # high cloud confidence without the cloud bit
            0b11 << 7,  # high cloud shadow confidence
            1 << 4,  # cloud bit alone
        ],
        dtype=np.uint16,
    )
    np.testing.assert_array_equal(landsat.cloud_mask_c1_bqa(bqa), [False, True, True, True, True, True])
    np.testing.assert_array_equal(
        landsat.cloud_mask_c1_bqa(bqa, cloud_confidence_high=False, cloud_shadow_confidence_high=False),
        [False, True, True, False, False, True],
    )
    np.testing.assert_array_equal(
        landsat.cloud_mask_c1_bqa(bqa, cloud=False, fill=False, cloud_shadow_confidence_high=False),
        [False, True, False, True, False, False],
    )


@pytest.mark.parametrize("clip", [CLIP_C1_AFRICA, CLIP_C1_MARBURG])
def test_c1_bqa_real_clips(landsat8_dir, clip):
    path = next((landsat8_dir / clip).glob("*_BQA.TIF"))
    with rasterio.open(path) as src:
        bqa = src.read(1)
    assert bqa.dtype == np.dtype(CLIPS[clip]["dtype"])
    assert (bqa == 2720).all()  # both clips are cloud-free
    mask = landsat.cloud_mask_c1_bqa(bqa)
    assert mask.shape == bqa.shape and mask.dtype == bool and not mask.any()
    cloudy = bqa.copy()
    cloudy[3, 4] |= 1 << 4
    assert landsat.cloud_mask_c1_bqa(cloudy).sum() == 1 and landsat.cloud_mask_c1_bqa(cloudy)[3, 4]
