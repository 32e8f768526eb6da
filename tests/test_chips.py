"""``fusionkern chips``: the site layout, skip counts, b76 content, centring, and runs that fail cleanly."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import CLIP_C1_AFRICA
from fusionkern import BRANCHES, CLASSES, landsat, readers
from fusionkern.cli import main
from fusionkern.data import SiteDataset, chips, load_sites
from fusionkern.errors import InputError

rasterio = pytest.importorskip("rasterio")
yaml = pytest.importorskip("yaml")
from rasterio.transform import from_origin  # noqa: E402
from rasterio.warp import transform as warp_transform  # noqa: E402

EPSG = 32650  # UTM 50N
X0, Y0, PX = 400000.0, 3500000.0, 30.0
SIZE = 400  # 12 km square
DATES = ["2018-01", "2017-01", "2017-04"]
NODATA = -9999.0
CHIP = 35  # 1050 m at 30 m
HALF = CHIP // 2

PLANT_INSIDE = (200, 200)  # (row, col) of the plant pixel
PLANT_OUTSIDE = (-500, 200)  # 15 km north of the rasters
PLANT_NEAR_NODATA = (330, 75)
NODATA_PATCH = (slice(325, 336), slice(55, 66))  # in b7 of the second date


def _lonlat(row: float, col: float, crs: str = f"EPSG:{EPSG}", transform=None) -> tuple[float, float]:
    """WGS84 lon/lat of a pixel centre."""
    transform = transform or from_origin(X0, Y0, PX, PX)
    x, y = transform * (col + 0.5, row + 0.5)
    lons, lats = warp_transform(crs, "EPSG:4326", [x], [y])
    return lons[0], lats[0]


def _band_values(branch: str, date: int) -> np.ndarray:
    """Smooth, distinct, physically shaped values per branch and date."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    base = {
        "b10": 290.0 + date + 0.01 * rows,
        "b11": 288.0 + date + 0.01 * cols,
        "b7": 0.10 + 0.01 * date + 0.0005 * rows,
        "b6": 0.20 + 0.01 * date + 0.0005 * cols,
    }[branch]
    return base.astype(np.float32)


def _write(path: Path, data: np.ndarray, crs: str = f"EPSG:{EPSG}", nodata: float | None = NODATA) -> Path:
    profile = dict(
        driver="GTiff", dtype=data.dtype.name, count=1, width=data.shape[1], height=data.shape[0], crs=crs,
        transform=from_origin(X0, Y0, PX, PX), nodata=nodata,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


@pytest.fixture(scope="module")
def rasters(tmp_path_factory) -> dict[str, list[Path]]:
    """Three dates of b10, b11, b7, b6 on one UTM grid, with a nodata patch in b7 of the second date."""
    folder = tmp_path_factory.mktemp("rasters")
    paths: dict[str, list[Path]] = {}
    for branch in chips.INPUT_BANDS:
        for date in range(3):
            data = _band_values(branch, date)
            if branch == "b7" and date == 1:
                data[NODATA_PATCH] = NODATA
            paths.setdefault(branch, []).append(_write(folder / f"d{date + 1}_{branch}.tif", data))
    return paths


def _manifest(folder: Path, rasters: dict[str, list[Path]], **extra) -> Path:
    content = {branch: [str(p) for p in paths] for branch, paths in rasters.items()}
    content["dates"] = DATES
    content.update(extra)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def _plants_csv(folder: Path, pixels: list[tuple[int, int]]) -> Path:
    path = folder / "plants.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "lon", "lat"])
        for index, (row, col) in enumerate(pixels):
            lon, lat = _lonlat(row, col)
            writer.writerow([f"Plant {index}", f"{lon:.9f}", f"{lat:.9f}"])
    return path


def _read_sites(root: Path) -> list[dict[str, str]]:
    with (root / "sites.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _hidden_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------------------
# Synthetic rasters, manifest mode
# ---------------------------------------------------------------------------------------------------------------


def test_chips_layout_counts_and_content(tmp_path, rasters, capsys):
    manifest = _manifest(tmp_path, rasters)
    plants = _plants_csv(tmp_path, [PLANT_INSIDE, PLANT_OUTSIDE, PLANT_NEAR_NODATA])
    out = tmp_path / "dataset"
    code = main(["chips", "--manifest", str(manifest), "--plants", str(plants), "--out", str(out), "--seed", "3",
                 "--context-px", "0"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "wrote 1 cement" in printed and "skipped cement: 1 outside, 1 nodata" in printed

    # sites.csv and the folders agree; every site has the five branches as 3-band float32 chips.
    sites = _read_sites(out)
    assert set(sites[0]) == {"site", "label", "lon", "lat"}
    on_disk = {(label, p.name) for label in CLASSES for p in (out / label).iterdir()}
    assert on_disk == {(s["label"], s["site"]) for s in sites}
    for label, site in on_disk:
        assert sorted(p.name for p in (out / label / site).iterdir()) == sorted(f"{b}.tif" for b in BRANCHES)
        for branch in BRANCHES:
            with rasterio.open(out / label / site / f"{branch}.tif") as src:
                assert (src.count, src.height, src.width) == (3, CHIP, CHIP)
                assert src.dtypes == ("float32",) * 3 and math.isnan(src.nodata)
                assert src.crs.to_epsg() == EPSG and list(src.descriptions) == DATES
                assert np.isfinite(src.read()).all()

    # Counts: one cement chip written, one plant outside, one on the nodata patch.
    cement = [s for s in sites if s["label"] == "cement"]
    assert [s["site"] for s in cement] == ["plant_0001"]
    lon, lat = _lonlat(*PLANT_INSIDE)
    assert float(cement[0]["lon"]) == pytest.approx(lon, abs=1e-6)
    assert float(cement[0]["lat"]) == pytest.approx(lat, abs=1e-6)
    landcover = {s["site"] for s in sites if s["label"] == "landcover"}
    assert {"lc_0001_1", "lc_0001_2", "lc_0001_3"} <= landcover  # all three around the inside plant
    assert not any(site.startswith("lc_0002") for site in landcover)  # the outside plant's ring is outside too

    # The cement chip is centred on its plant and holds the source pixels; b76 = b7 / b6.
    site = out / "cement" / "plant_0001"
    top, left = PLANT_INSIDE[0] - HALF, PLANT_INSIDE[1] - HALF
    with rasterio.open(site / "b6.tif") as src:
        assert src.transform == from_origin(X0 + left * PX, Y0 - top * PX, PX, PX)
        b6 = src.read()
    with rasterio.open(site / "b7.tif") as src:
        b7 = src.read()
    with rasterio.open(site / "b76.tif") as src:
        b76 = src.read()
    for date in range(3):
        np.testing.assert_array_equal(b6[date], _band_values("b6", date)[top : top + CHIP, left : left + CHIP])
    np.testing.assert_array_equal(b76, (b7.astype(np.float64) / b6).astype(np.float32))
    np.testing.assert_array_equal(b76, landsat.band_ratio(b7, b6))

    # Landcover chips lie about 3.5 km from their plant and overlap no plant chip.
    plant_x, plant_y = X0 + (PLANT_INSIDE[1] + 0.5) * PX, Y0 - (PLANT_INSIDE[0] + 0.5) * PX
    for slot in (1, 2, 3):
        with rasterio.open(out / "landcover" / f"lc_0001_{slot}" / "b10.tif") as src:
            x, y = src.transform * (CHIP / 2, CHIP / 2)
            top_lc, left_lc = (round((Y0 - src.bounds.top) / PX), round((src.bounds.left - X0) / PX))
        assert math.hypot(x - plant_x, y - plant_y) == pytest.approx(3500.0, abs=PX)
        for plant_row, plant_col in (PLANT_INSIDE, PLANT_NEAR_NODATA):
            overlap_rows = abs(top_lc - (plant_row - HALF)) < CHIP
            overlap_cols = abs(left_lc - (plant_col - HALF)) < CHIP
            assert not (overlap_rows and overlap_cols)
    assert _hidden_leftovers(tmp_path) == []

    # What `chips` writes is what training reads: the site layout, five inputs per site.
    sites_read, report = load_sites(out)
    assert report is None and len(sites_read) == len(sites)
    x, y = SiteDataset(sites_read, chip_size=CHIP)[[s.name for s in sites_read].index("plant_0001")]
    assert x.shape == (len(BRANCHES), 3, CHIP, CHIP) and y == CLASSES.index("cement")



def test_chips_context_surrounds_the_same_chip(tmp_path, rasters, capsys):
    """--context-px N writes the chip with N more pixels on every side, on the same ground; the dataset's centre
    crop of it is the chip cut without context."""
    from fusionkern.data import SiteDataset, read_site_layout

    manifest = _manifest(tmp_path, rasters)
    plants = _plants_csv(tmp_path, [PLANT_INSIDE])
    outs = {}
    for context in (0, 4):
        outs[context] = tmp_path / f"ctx{context}"
        code = main(["chips", "--manifest", str(manifest), "--plants", str(plants), "--out", str(outs[context]),
                     "--seed", "3", "--context-px", str(context)])  # fmt: skip
        assert code == 0, capsys.readouterr().err
    site = outs[4] / "cement" / "plant_0001"
    top, left = PLANT_INSIDE[0] - HALF - 4, PLANT_INSIDE[1] - HALF - 4
    with rasterio.open(site / "b6.tif") as src:
        assert (src.height, src.width) == (CHIP + 8, CHIP + 8)
        assert src.transform == from_origin(X0 + left * PX, Y0 - top * PX, PX, PX)
        assert src.tags()["context_px"] == "4"
        np.testing.assert_array_equal(src.read(1), _band_values("b6", 0)[top : top + CHIP + 8, left : left + CHIP + 8])
    plain = SiteDataset(read_site_layout(outs[0]), chip_size=CHIP)
    wide = SiteDataset(read_site_layout(outs[4]), chip_size=CHIP)
    names = [s.name for s in plain.sites]
    assert names == [s.name for s in wide.sites]
    for index in range(len(names)):
        np.testing.assert_array_equal(plain.load(index), wide.load(index))


def test_chips_report_accounts_for_every_site(tmp_path, rasters):
    plants = chips.read_plants(_plants_csv(tmp_path, [PLANT_INSIDE, PLANT_OUTSIDE, PLANT_NEAR_NODATA]))
    inputs = chips.inputs_from_manifest(_manifest(tmp_path, rasters))
    options = chips.ChipOptions(landcover_per_plant=3, seed=11)
    report = chips.write_chip_dataset(inputs, plants, tmp_path / "a", options)
    assert report.written["cement"] == 1
    assert report.skipped["cement"] == {"outside": 1, "nodata": 1, "cloud": 0, "overlap": 0}
    assert report.written["landcover"] + sum(report.skipped["landcover"].values()) == 3 * len(plants)
    assert report.chip_px == (CHIP, CHIP)
    assert ("plant_0002", "Plant 1", "outside") in report.skipped_sites
    # The same seed gives the same dataset.
    again = chips.write_chip_dataset(inputs, plants, tmp_path / "b", options)
    assert _read_sites(tmp_path / "a") == _read_sites(tmp_path / "b") and again.written == report.written


def test_cloudy_chip_is_skipped(tmp_path, rasters):
    qa_paths = []
    for date in range(3):
        qa = np.full((SIZE, SIZE), 21824, dtype=np.uint16)  # clear
        if date == 2:
            qa[PLANT_INSIDE] |= 1 << 3  # one cloudy pixel under the first plant
        qa_paths.append(str(_write(tmp_path / f"d{date}_QA_PIXEL.TIF", qa, nodata=1)))
    manifest = _manifest(tmp_path, rasters, qa=qa_paths)
    plants = _plants_csv(tmp_path, [PLANT_INSIDE, (100, 320)])
    args = ["chips", "--manifest", str(manifest), "--plants", str(plants), "--landcover-per-plant", "0"]
    assert main([*args, "--out", str(tmp_path / "strict")]) == 0
    assert [s["site"] for s in _read_sites(tmp_path / "strict")] == ["plant_0002"]
    assert main([*args, "--out", str(tmp_path / "lenient"), "--max-cloud", "0.01"]) == 0
    assert [s["site"] for s in _read_sites(tmp_path / "lenient")] == ["plant_0001", "plant_0002"]


def test_scene_folders_and_geojson_plants(tmp_path, rasters, capsys):
    scenes = []
    for date in range(3):
        scene = tmp_path / f"scene{date + 1}"
        scene.mkdir()
        for branch, number in chips.INPUT_BANDS.items():
            (scene / f"SYN_{date}_B{number}.TIF").symlink_to(rasters[branch][date])
        scenes.append(str(scene))
    lon, lat = _lonlat(*PLANT_INSIDE)
    plants = tmp_path / "plants.geojson"
    plants.write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"name": "Kiln"},'
        f' "geometry": {{"type": "Point", "coordinates": [{lon!r}, {lat!r}]}}}}]}}'
    )
    out = tmp_path / "out"
    args = ["chips", "--scenes", *scenes, "--plants", str(plants), "--out", str(out), "--chip-m", "300", "--context-px", "0"]
    assert main(args) == 2  # Level-1 names and no MTL: DN are never passed off as kelvin and reflectance
    assert "scene1 has no *_MTL.txt" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--no-calibrate"]) == 0
    with rasterio.open(out / "cement" / "plant_0001" / "b11.tif") as src:
        assert (src.height, src.width) == (10, 10)  # 300 m at 30 m
        assert list(src.descriptions) == ["scene1", "scene2", "scene3"]  # no MTL: folder names
        assert src.tags()["plant"] == "Kiln"
        np.testing.assert_array_equal(src.read(3), _band_values("b11", 2)[195:205, 195:205])


# ---------------------------------------------------------------------------------------------------------------
# Runs that must fail, and leave nothing behind
# ---------------------------------------------------------------------------------------------------------------


def test_no_cement_chip_fails_and_leaves_no_output(tmp_path, rasters, capsys):
    manifest = _manifest(tmp_path, rasters)
    plants = _plants_csv(tmp_path, [PLANT_OUTSIDE])
    out = tmp_path / "dataset"
    assert main(["chips", "--manifest", str(manifest), "--plants", str(plants), "--out", str(out)]) == 2
    assert "no cement chip" in capsys.readouterr().err
    assert not out.exists() and _hidden_leftovers(tmp_path) == []


def test_failure_midway_leaves_no_output(tmp_path, rasters, monkeypatch, capsys):
    write_site = chips._write_site
    calls = []

    def failing_write_site(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise InputError("disk full while writing")
        return write_site(*args, **kwargs)

    monkeypatch.setattr(chips, "_write_site", failing_write_site)
    manifest = _manifest(tmp_path, rasters)
    plants = _plants_csv(tmp_path, [PLANT_INSIDE])
    out = tmp_path / "dataset"
    assert main(["chips", "--manifest", str(manifest), "--plants", str(plants), "--out", str(out)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert len(calls) == 2 and not out.exists() and _hidden_leftovers(tmp_path) == []


def test_refuses_to_overwrite(tmp_path, rasters, capsys):
    manifest = _manifest(tmp_path, rasters)
    plants = _plants_csv(tmp_path, [PLANT_INSIDE])
    out = tmp_path / "dataset"
    args = ["chips", "--manifest", str(manifest), "--plants", str(plants), "--out", str(out)]
    out.mkdir()
    (out / "sites.csv").write_text("old\n")
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "sites.csv").read_text() == "old\n"
    assert main([*args, "--overwrite"]) == 0
    assert _read_sites(out)[0]["site"] == "plant_0001"
    (out / "thesis.tex").write_text("precious")
    assert main([*args, "--overwrite"]) == 2
    assert "does not look like a chips dataset" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious"


def test_rasters_on_another_crs_are_refused(tmp_path, rasters, capsys):
    other = _write(tmp_path / "d3_b11_utm51.tif", _band_values("b11", 2), crs="EPSG:32651")
    bad = {**rasters, "b11": [*rasters["b11"][:2], other]}
    plants = _plants_csv(tmp_path, [PLANT_INSIDE])
    out = tmp_path / "dataset"
    code = main(["chips", "--manifest", str(_manifest(tmp_path, bad)), "--plants", str(plants), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(other) in err and "CRS" in err and not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"b6": ["only_one.tif"]}, "'b6' must be a list of 3"),
        ({"colour": "red"}, "unknown key"),
        ({"mtl": ["missing_MTL.txt", None, None]}, "'mtl' file not found"),
    ],
)
def test_bad_manifest(tmp_path, rasters, extra, message):
    manifest = _manifest(tmp_path, rasters, **extra)
    with pytest.raises(InputError, match=message) as info:
        chips.inputs_from_manifest(manifest)
    assert str(manifest) in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("name,x_coord,y_coord\nA,1,2\n", "needs lon and lat columns"),
        ("lon,lat\n200,10\n", "line 2: lon '200'"),
        ("lon;lat\n10;abc\n", "line 2: lat 'abc'"),
        ("lon,lat\n", "holds no plants"),
    ],
)
def test_bad_plants_csv(tmp_path, text, message):
    path = tmp_path / "plants.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        chips.read_plants(path)
    assert str(path) in str(info.value)


def test_plants_csv_variants(tmp_path):
    path = tmp_path / "plants.csv"
    path.write_text("\ufeffLatitude;Longitude;Plant\n30.5;117.25;Anhui One\n31;118;\n")
    plants = chips.read_plants(path)
    assert plants == [chips.Plant("Anhui One", 117.25, 30.5), chips.Plant("plant_2", 118.0, 31.0)]


# ---------------------------------------------------------------------------------------------------------------
# A real clip
# ---------------------------------------------------------------------------------------------------------------


def test_real_clip_chip_is_centred(tmp_path, landsat8_dir, capsys):
    scene = landsat8_dir / CLIP_C1_AFRICA
    if not scene.is_dir():
        pytest.skip(f"clip {CLIP_C1_AFRICA} not found")
    b10_path = readers.find_band_file(scene, 10)
    with rasterio.open(b10_path) as src:
        crs, transform = src.crs, src.transform
        centre = (src.height // 2, src.width // 2)
    lon, lat = _lonlat(*centre, crs=crs, transform=transform)
    # The plant lies inside the scene's corner coordinates given in the MTL (axis order check).
    mtl = landsat.read_mtl(readers.find_mtl(scene))
    assert mtl["CORNER_LL_LAT_PRODUCT"] < lat < mtl["CORNER_UL_LAT_PRODUCT"]
    assert mtl["CORNER_UL_LON_PRODUCT"] < lon < mtl["CORNER_UR_LON_PRODUCT"]
    # Independently: lon/lat -> UTM -> the pixel that holds the plant.
    (x,), (y,) = warp_transform("EPSG:4326", crs, [lon], [lat])
    row, col = rasterio.transform.rowcol(transform, x, y)
    assert (row, col) == centre

    plants = tmp_path / "plants.csv"
    plants.write_text(f"lon,lat,name\n{lon!r},{lat!r},centre\n")
    out = tmp_path / "africa"
    args = ["chips", "--scenes", str(scene), str(scene), str(scene), "--plants", str(plants), "--out", str(out),
            "--context-px", "0"]
    assert main([*args, "--landcover-per-plant", "2"]) == 2  # 3.5 km = 117 px: outside the 101 px clip
    err = capsys.readouterr().err
    assert "no landcover chip could be cut (skipped: 2 outside" in err and "no room for them" in err
    assert not out.exists()
    assert main([*args, "--landcover-per-plant", "0"]) == 0
    assert "warning: 1 cement site(s): fusionkern train needs at least 3" in capsys.readouterr().out
    site = out / "cement" / "plant_0001"
    with rasterio.open(site / "b10.tif") as src:
        assert src.transform == transform * rasterio.Affine.translation(col - HALF, row - HALF)
        assert (src.height, src.width) == (CHIP, CHIP)
        assert list(src.descriptions) == ["2017-03-08"] * 3
        chip = src.read()
    window = ((row - HALF, row + HALF + 1), (col - HALF, col + HALF + 1))
    expected, _ = readers.read_scene_band(scene, 10, window=window)
    for date in range(3):
        np.testing.assert_array_equal(chip[date], expected)
    assert 220 < chip.min() and chip.max() < 340  # kelvin
    with rasterio.open(site / "b6.tif") as src:
        assert 0 < src.read().min() and src.read().max() < 1.2  # TOA reflectance
    assert _read_sites(out) == [{"site": "plant_0001", "label": "cement", "lon": f"{lon:.6f}", "lat": f"{lat:.6f}"}]
