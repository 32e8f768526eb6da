"""``fusionkern scan``: grids and georeferencing on the real clips, tiling, edges, resumption, bounded memory, warped
inputs, refusals, detections and their formats, backends, the scan demo (the Ray engine: test_ray.py).

Most tests use a small generated region (a manifest of twelve float32 GeoTIFFs) and a deterministic stand-in
predictor where the model's numbers do not matter; the real model (native preset, width 0.25) runs where they do.
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_points

import fusionkern.cli
from fusionkern import load_checkpoint
from fusionkern.errors import CheckpointError, ConfigError, InputError
from fusionkern.models import DGCNN, FusionNet, save_checkpoint
from fusionkern.scan import ScanOptions, run_scan
from fusionkern.scan import outputs as scan_outputs
from fusionkern.scan.backends import TorchPredictor, make_predictor, minmax_scale_torch
from fusionkern.scan.engine import EngineOptions, benchmark_scan
from fusionkern.scan.grid import GridSource, chip_layout, make_grid, raster_grid
from fusionkern.scan.tiles import chip_fractions, scale_chips
from conftest import CLIP_C1_AFRICA, CLIP_C1_MARBURG, CLIP_PRE

BANDS = ("b10", "b11", "b7", "b6")
CHIP, STRIDE = 35, 18


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(FusionNet(preset="native", width=0.25), tmp_path_factory.mktemp("ckpt") / "native.pt")


class ChipMean:
    """A stand-in predictor: the mean of the chip's first branch and date, batch-independent and cheap."""

    expects_raw = False

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed")
        return chips[:, 0, 0].mean(axis=(1, 2)).astype(np.float32)

    def describe(self) -> dict:
        return {"name": "chip-mean", "device": "cpu"}


class Always(ChipMean):
    """Every chip is cement."""

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        return np.ones(len(chips), np.float32)


def use_predictor(monkeypatch, predictor) -> None:
    monkeypatch.setattr("fusionkern.scan.run.make_predictor", lambda *args, **kwargs: predictor)


def write_region(
    folder: Path,
    height: int = 250,
    width: int = 310,
    seed: int = 0,
    crs: str = "EPSG:32650",
    origin: tuple[float, float] = (400_020.0, 3_500_010.0),
    fill: float | None = None,
    qa_box: tuple[int, int, int, int] | None = None,
) -> Path:
    """Twelve float32 rasters (b10/b11 ~290 K, b7/b6 ~0.2) and a manifest; ``fill`` makes them constant."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    profile = {
        "driver": "GTiff", "dtype": "float32", "count": 1, "height": height, "width": width, "crs": crs,
        "transform": from_origin(*origin, 30.0, 30.0), "nodata": float("nan"), "tiled": True, "blockxsize": 64,
        "blockysize": 64,
    }  # fmt: skip
    manifest: dict = {}
    for branch in BANDS:
        base = 290.0 if branch in ("b10", "b11") else 0.2
        scale = 5.0 if branch in ("b10", "b11") else 0.03
        manifest[branch] = []
        for date in range(3):
            coarse = rng.normal(0, 1, (height // 16 + 2, width // 16 + 2))
            smooth = np.kron(coarse, np.ones((16, 16)))[:height, :width]
            values = base + scale * smooth + rng.normal(0, scale / 10, (height, width))
            if fill is not None:
                values = np.full((height, width), fill)
            name = f"{branch}_{date}.tif"
            with rasterio.open(folder / name, "w", **profile) as dst:
                dst.write(values.astype(np.float32), 1)
            manifest[branch].append(name)
    if qa_box is not None:
        qa = np.zeros((height, width), np.uint16)
        r0, r1, c0, c1 = qa_box
        qa[r0:r1, c0:c1] = 1 << 3  # Collection 2 QA_PIXEL cloud bit
        qa_profile = {**profile, "dtype": "uint16", "nodata": None}
        with rasterio.open(folder / "scene_QA_PIXEL.TIF", "w", **qa_profile) as dst:
            dst.write(qa, 1)
        manifest["qa"] = ["scene_QA_PIXEL.TIF", None, None]
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest), encoding="utf-8")
    return path


def scan(tmp_path: Path, checkpoint: Path, out: str = "out", **kwargs) -> object:
    options = ScanOptions(checkpoint=str(checkpoint), out=str(tmp_path / out), progress=False, **kwargs)
    return run_scan(options)


def cli(argv: list[str], monkeypatch=None) -> int:
    return fusionkern.cli.main(["scan", *argv])


def read_scores(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path / "scores.tif") as ds:
        layout = ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT")
        return ds.read(1), {"crs": ds.crs, "transform": ds.transform, "layout": layout}


def finals(out: Path) -> list[str]:
    return sorted(n for n in scan_outputs.FINAL_OUTPUTS if (out / n).exists())


# --------------------------------------------------------------------------------------------------------------
# Real clips
# --------------------------------------------------------------------------------------------------------------


def test_scan_of_a_real_clip_writes_every_output_on_the_input_grid(
    landsat8_dir, checkpoint, tmp_path, monkeypatch, capsys
):
    clip = landsat8_dir / CLIP_C1_AFRICA
    out = tmp_path / "out"
    code = cli([str(checkpoint), "--scenes", *[str(clip)] * 3, "--out", str(out), "--no-progress"], monkeypatch)
    assert code == 0, capsys.readouterr().err
    with rasterio.open(clip / f"{CLIP_C1_AFRICA}_B10.TIF") as src:
        crs, transform, height, width = src.crs, src.transform, src.height, src.width
    scores, meta = read_scores(out)
    n_rows = -(-(height - CHIP) // STRIDE) + 1
    assert scores.shape == (n_rows, -(-(width - CHIP) // STRIDE) + 1)
    assert meta["crs"] == crs and meta["layout"] == "COG"
    offset = (CHIP - STRIDE) / 2
    expected = transform * transform.translation(offset, offset) * transform.scale(STRIDE)
    assert meta["transform"].almost_equals(expected)
    report = json.loads((out / "scan.json").read_text())
    counts = report["counts"]
    assert counts["scored"] + sum(counts["skipped"].values()) == counts["chips"] == scores.size
    assert counts["scored"] == int(np.isfinite(scores).sum()) > 0
    assert report["grid"]["crs"] == "EPSG:32637" and report["backend"]["name"] == "torch"
    assert len(report["inputs"]["bands"]["b10"][0]["sha256"]) == 64
    assert isinstance(report["timings"]["chips_per_s"]["end_to_end"], float)  # recorded; its size is the machine's
    geojson = json.loads((out / "detections.geojson").read_text())
    assert geojson["type"] == "FeatureCollection" and "crs" not in geojson
    assert finals(out) == sorted(scan_outputs.FINAL_OUTPUTS)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name not in (".tiles", ".cache")]


def test_chips_map_to_the_right_lonlat(landsat8_dir, checkpoint, tmp_path, monkeypatch):
    clip = landsat8_dir / CLIP_C1_MARBURG  # 41 x 41 px: chip (0, 0) is the only one inside the clip
    use_predictor(monkeypatch, Always())
    result = scan(tmp_path, checkpoint, scenes=[str(clip)] * 3, quicklook=False)
    with rasterio.open(clip / f"{CLIP_C1_MARBURG}_B6.TIF") as src:
        crs, transform = src.crs, src.transform
    assert result.scores.shape == (2, 2) and np.isfinite(result.scores[0, 0])
    assert np.isnan(result.scores[1]).all() and np.isnan(result.scores[:, 1]).all()
    (detection,) = result.detections
    x, y = transform * (CHIP / 2, CHIP / 2)  # the chip's centre, from the clip's own georeferencing
    (lon,), (lat,) = warp_points(crs, "EPSG:4326", [x], [y])
    assert detection.lon == pytest.approx(lon, abs=1e-9) and detection.lat == pytest.approx(lat, abs=1e-9)
    corners = [transform * (c, r) for c, r in ((0, 0), (CHIP, 0), (CHIP, CHIP), (0, CHIP))]
    lons, lats = warp_points(crs, "EPSG:4326", [p[0] for p in corners], [p[1] for p in corners])
    ring = np.asarray(detection.footprint["coordinates"][0])
    assert sorted(map(tuple, np.round(ring[:-1], 6))) == sorted(zip(np.round(lons, 6), np.round(lats, 6)))
    _, meta = read_scores(tmp_path / "out")
    sx, sy = meta["transform"] * (0.5, 0.5)  # centre of scores pixel (0, 0)
    assert (sx, sy) == pytest.approx((x, y))


def test_a_score_pixel_centre_is_its_chip_centre(landsat8_dir, checkpoint, tmp_path, monkeypatch):
    clip = landsat8_dir / CLIP_PRE  # float64 DN, nodata -1.7e308, pre-collection names
    use_predictor(monkeypatch, ChipMean())
    result = scan(tmp_path, checkpoint, scenes=[str(clip)] * 3, quicklook=False)
    with rasterio.open(clip / "LC82320832016040LGN00_band10.tif") as src:
        crs, transform = src.crs, src.transform
    _, meta = read_scores(tmp_path / "out")
    row, col = 3, 2
    from_scores = warp_points(meta["crs"], "EPSG:4326", *[[v] for v in meta["transform"] * (col + 0.5, row + 0.5)])
    chip_centre = transform * (col * STRIDE + CHIP / 2, row * STRIDE + CHIP / 2)
    independent = warp_points(crs, "EPSG:4326", [chip_centre[0]], [chip_centre[1]])
    assert np.allclose(from_scores, independent, atol=1e-9)
    assert result.report["counts"]["scored"] > 0


def test_paper_preset_chips_are_resized_on_the_device(landsat8_dir, tmp_path):
    clip = landsat8_dir / CLIP_C1_MARBURG
    torch.manual_seed(0)
    paper = save_checkpoint(FusionNet(preset="paper", width=0.1), tmp_path / "paper.pt")  # 35 px chips -> 256 px
    result = scan(tmp_path, paper, scenes=[str(clip)] * 3, preset="paper", quicklook=False)
    assert result.report["checkpoint"]["preset"] == "paper" and result.report["chips"]["chip_px"] == CHIP
    assert result.report["counts"]["scored"] == 1 and 0 <= result.scores[0, 0] <= 1


def test_inputs_that_do_not_overlap_are_an_error(landsat8_dir, checkpoint, tmp_path, monkeypatch, capsys):
    africa, marburg = landsat8_dir / CLIP_C1_AFRICA, landsat8_dir / CLIP_C1_MARBURG
    out = tmp_path / "out"
    code = cli([str(checkpoint), "--scenes", str(africa), str(marburg), str(africa), "--out", str(out)], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "does not overlap the scan region" in err and CLIP_C1_MARBURG in err
    assert not out.exists() or not finals(out)


def test_missing_band_is_an_error_naming_the_folder(landsat8_dir, checkpoint, tmp_path, monkeypatch, capsys):
    clip = tmp_path / CLIP_C1_AFRICA
    shutil.copytree(landsat8_dir / CLIP_C1_AFRICA, clip)
    (clip / f"{CLIP_C1_AFRICA}_B11.TIF").unlink()
    code = cli([str(checkpoint), "--scenes", *[str(clip)] * 3, "--out", str(tmp_path / "out")], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "band 11" in err and str(clip) in err


# --------------------------------------------------------------------------------------------------------------
# Generated regions: tiling, edges, resumption, memory
# --------------------------------------------------------------------------------------------------------------


def test_tiles_and_edges_give_the_same_scores_whatever_the_tiling(checkpoint, tmp_path, monkeypatch):
    manifest = write_region(tmp_path / "region", height=250, width=310)  # neither a multiple of chip nor stride
    use_predictor(monkeypatch, ChipMean())
    small = scan(tmp_path, checkpoint, "small", manifest=str(manifest), tile_px=64, batch_size=5, quicklook=False)
    large = scan(tmp_path, checkpoint, "large", manifest=str(manifest), tile_px=4096, workers=1, quicklook=False)
    n_rows, n_cols = -(-(250 - CHIP) // STRIDE) + 1, -(-(310 - CHIP) // STRIDE) + 1
    assert small.scores.shape == (n_rows, n_cols)
    assert small.report["engine"]["tiles"] > 20 and large.report["engine"]["tiles"] == 1
    np.testing.assert_array_equal(small.scores, large.scores)
    # chips reaching past the region's last row or column are skipped as outside the rasters, and only those
    inside_rows = np.arange(n_rows) * STRIDE + CHIP <= 250
    inside_cols = np.arange(n_cols) * STRIDE + CHIP <= 310
    assert np.array_equal(np.isfinite(small.scores), inside_rows[:, None] & inside_cols[None, :])
    skipped = small.report["counts"]["skipped"]
    assert skipped["outside"] == n_rows * n_cols - inside_rows.sum() * inside_cols.sum() and skipped["nodata"] == 0
    assert (tmp_path / "small" / ".tiles").is_dir() and len(list((tmp_path / "small" / ".tiles").glob("*.npz"))) > 20


def test_a_killed_scan_resumes_to_the_outputs_of_an_uninterrupted_one(checkpoint, tmp_path, monkeypatch):
    manifest = write_region(tmp_path / "region", height=150, width=130)
    common = dict(manifest=str(manifest), tile_px=64, batch_size=4, threshold=0.4, quicklook=False, checksums=False)
    model = TorchPredictor(load_checkpoint(checkpoint))

    class Killed:  # the model, fed as the scan feeds it (chips cut and scaled on its device), until it dies
        expects_raw, calls, feed_device = False, 0, model.feed_device

        def __call__(self, chips):
            return self.score_tensor(torch.from_numpy(chips))

        def score_tensor(self, chips):
            Killed.calls += 1
            if Killed.calls > 6:
                raise RuntimeError("killed")
            return model.score_tensor(chips)

        def describe(self):
            return model.describe()

    use_predictor(monkeypatch, Killed())
    with pytest.raises(RuntimeError, match="killed"):
        scan(tmp_path, checkpoint, "resumed", **common)
    out = tmp_path / "resumed"
    recorded = len(list((out / ".tiles").glob("*.npz")))
    assert finals(out) == [] and 0 < recorded
    with pytest.raises(InputError, match="--resume"):
        scan(tmp_path, checkpoint, "resumed", **common)
    use_predictor(monkeypatch, model)
    resumed = scan(tmp_path, checkpoint, "resumed", resume=True, **common)
    clean = scan(tmp_path, checkpoint, "clean", **common)
    assert resumed.report["engine"]["tiles_resumed"] == recorded
    np.testing.assert_array_equal(read_scores(out)[0], read_scores(tmp_path / "clean")[0])
    features = [json.loads((tmp_path / d / "detections.geojson").read_text())["features"] for d in ("resumed", "clean")]
    assert features[0] == features[1] and len(features[0]) > 0
    assert resumed.report["counts"] == clean.report["counts"]
    with pytest.raises(ConfigError, match="other"):
        scan(tmp_path, checkpoint, "resumed", resume=True, **{**common, "batch_size": 8})


def _scan_peak(tmp_path: Path, checkpoint: Path, side: int) -> tuple[int, int]:
    """Peak traced allocation (numpy included) of a scan of a ``side`` x ``side`` region, and the region's bytes."""
    manifest = write_region(tmp_path / f"region{side}", height=side, width=side)
    tracemalloc.start()
    try:
        scan(tmp_path, checkpoint, f"out{side}", manifest=str(manifest), tile_px=128, batch_size=8, queue_batches=2,
             workers=1, quicklook=False, checksums=False)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, 12 * side * side * 4


def test_memory_stays_bounded_with_small_tiles(checkpoint, tmp_path, monkeypatch):
    use_predictor(monkeypatch, ChipMean())
    _scan_peak(tmp_path, checkpoint, 100)  # imports every module a scan uses, outside the measurements
    small_peak, _ = _scan_peak(tmp_path, checkpoint, 300)
    large_peak, large_bytes = _scan_peak(tmp_path, checkpoint, 1000)  # 11 times the pixels
    assert large_peak < large_bytes / 4, f"peak {large_peak / 1e6:.1f} MB for {large_bytes / 1e6:.1f} MB of rasters"
    assert large_peak < 1.5 * small_peak + 2e6, f"peak grew from {small_peak / 1e6:.1f} to {large_peak / 1e6:.1f} MB"


def test_cloudy_chips_are_skipped_and_counted(checkpoint, tmp_path, monkeypatch):
    manifest = write_region(tmp_path / "region", height=120, width=120, qa_box=(0, 20, 0, 20))
    use_predictor(monkeypatch, ChipMean())
    result = scan(tmp_path, checkpoint, manifest=str(manifest), quicklook=False)
    skipped = result.report["counts"]["skipped"]
    assert skipped["cloud"] == 4  # chips (0, 0), (0, 1), (1, 0), (1, 1) touch the cloud box
    assert result.reasons[0, 0] == 2 and np.isnan(result.scores[0, 0])
    relaxed = scan(tmp_path, checkpoint, "relaxed", manifest=str(manifest), max_invalid=0.5, quicklook=False)
    assert relaxed.report["counts"]["skipped"]["cloud"] == 0


# --------------------------------------------------------------------------------------------------------------
# Grids: warped inputs, user grids
# --------------------------------------------------------------------------------------------------------------


def _shift_copy(src_path: Path, dst_path: Path, dx_px: float, dy_px: float) -> None:
    with rasterio.open(src_path) as src:
        profile, data = src.profile, src.read(1)
    profile["transform"] = profile["transform"] * profile["transform"].translation(dx_px, dy_px)
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(data, 1)


def test_rasters_on_another_grid_are_warped_onto_the_first(checkpoint, tmp_path, monkeypatch):
    manifest = write_region(tmp_path / "region", height=150, width=160)
    data = yaml.safe_load(manifest.read_text())
    for branch in BANDS:  # date 2: half a pixel off the grid; date 3: whole pixels off (read directly)
        _shift_copy(tmp_path / "region" / data[branch][1], tmp_path / "region" / f"{branch}_half.tif", 0.5, 0.5)
        _shift_copy(tmp_path / "region" / data[branch][2], tmp_path / "region" / f"{branch}_int.tif", -3, 2)
        data[branch][1:] = [f"{branch}_half.tif", f"{branch}_int.tif"]
    manifest.write_text(yaml.safe_dump(data))
    use_predictor(monkeypatch, ChipMean())
    result = scan(tmp_path, checkpoint, manifest=str(manifest), quicklook=False)
    assert result.report["grid"]["transform"] == list(raster_grid(str(tmp_path / "region" / "b10_0.tif")).transform)
    warped = result.report["inputs"]["warped"]
    assert sorted(Path(p).name for p in warped) == sorted(f"{b}_half.tif" for b in BANDS)
    grid = make_grid(str(tmp_path / "region" / "b10_0.tif"))
    layout = chip_layout(grid, CHIP * 30.0)
    direct = GridSource(str(tmp_path / "region" / "b10_2.tif"), grid, layout.extent_px)
    shifted = GridSource(str(tmp_path / "region" / "b10_int.tif"), grid, layout.extent_px)
    assert not shifted.warped
    # the copy's pixel (r, c) lies at grid (r + 2, c - 3): the same values, two rows down and three columns left
    np.testing.assert_array_equal(shifted.read(10, 10, 50, 60), direct.read(8, 13, 50, 60))
    assert np.isnan(shifted.read(0, 0, 5, 5)[:2]).all()  # rows the shifted raster does not cover
    direct.close()
    shifted.close()


def test_user_grid_bounds_in_lonlat_and_another_crs(checkpoint, tmp_path, monkeypatch):
    manifest = write_region(tmp_path / "region", height=200, width=200)
    ref = raster_grid(str(tmp_path / "region" / "b10_0.tif"))
    west, south, east, north = ref.bounds
    inner = (west + 900, south + 1200, east - 1500, north - 600)
    lons, lats = warp_points(ref.crs, "EPSG:4326", [inner[0], inner[2]], [inner[1], inner[3]])
    use_predictor(monkeypatch, ChipMean())
    sub = scan(tmp_path, checkpoint, "sub", manifest=str(manifest), bounds=[lons[0], lats[0], lons[1], lats[1]],
               quicklook=False)  # fmt: skip
    grid = sub.report["grid"]
    assert grid["crs"] == "EPSG:32650" and grid["resolution"] == 30.0
    assert (grid["transform"][2] - west) % 30 == pytest.approx(0) and grid["width"] < 200 and grid["height"] < 200
    mercator = scan(tmp_path, checkpoint, "mercator", manifest=str(manifest), crs="EPSG:3857", resolution=35.0,
                    quicklook=False)  # fmt: skip
    assert mercator.report["grid"]["crs"] == "EPSG:3857" and len(mercator.report["inputs"]["warped"]) == 12
    assert mercator.report["counts"]["scored"] > 0


# --------------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------------


def test_a_truncated_raster_is_an_error_naming_it_and_leaves_no_outputs(checkpoint, tmp_path, monkeypatch, capsys):
    manifest = write_region(tmp_path / "region", height=200, width=200)
    bad = tmp_path / "region" / "b7_1.tif"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "out"
    code = cli([str(checkpoint), "--manifest", str(manifest), "--out", str(out), "--no-progress"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and err.count("\n") == 1
    assert not out.exists() or finals(out) == []


def test_an_all_nodata_region_is_an_error(checkpoint, tmp_path, monkeypatch):
    manifest = write_region(tmp_path / "region", height=80, width=80, fill=float("nan"))
    with pytest.raises(InputError, match="no chip of the region could be scored"):
        scan(tmp_path, checkpoint, manifest=str(manifest))
    assert finals(tmp_path / "out") == []


def test_checkpoints_of_another_model_or_preset_are_refused(checkpoint, tmp_path, monkeypatch, capsys):
    manifest = write_region(tmp_path / "region", height=80, width=80)
    single = save_checkpoint(DGCNN(preset="native", width=0.25), tmp_path / "dgcnn.pt")
    with pytest.raises(CheckpointError, match="holds a DGCNN, expected a FusionNet"):
        scan(tmp_path, single, manifest=str(manifest))
    with pytest.raises(CheckpointError, match="'native' preset, not 'paper'"):
        scan(tmp_path, checkpoint, manifest=str(manifest), preset="paper")
    code = cli([str(single), "--manifest", str(manifest), "--out", str(tmp_path / "x")], monkeypatch)
    assert code == 2 and "dgcnn.pt" in capsys.readouterr().err


def test_bad_options_and_bounds_are_refused(checkpoint, tmp_path):
    manifest = write_region(tmp_path / "region", height=80, width=80)
    with pytest.raises(InputError, match="does not overlap"):
        scan(tmp_path, checkpoint, manifest=str(manifest), bounds=[10.0, 50.0, 10.1, 50.1])
    with pytest.raises(ConfigError, match="max-invalid"):
        scan(tmp_path, checkpoint, manifest=str(manifest), max_invalid=1.5)
    with pytest.raises(ConfigError, match="stride"):
        scan(tmp_path, checkpoint, manifest=str(manifest), stride_m=2000.0)
    with pytest.raises(ConfigError, match="backend"):
        scan(tmp_path, checkpoint, manifest=str(manifest), backend="tpu")


# --------------------------------------------------------------------------------------------------------------
# Detections and their files
# --------------------------------------------------------------------------------------------------------------


def _read_wkb_polygon(blob: bytes) -> list[list[tuple[float, float]]]:
    order, kind, n_rings = struct.unpack_from("<BII", blob, 0)
    assert order == 1 and kind == 3
    offset, rings = 9, []
    for _ in range(n_rings):
        (n,) = struct.unpack_from("<I", blob, offset)
        values = struct.unpack_from(f"<{2 * n}d", blob, offset + 4)
        rings.append(list(zip(values[::2], values[1::2])))
        offset += 4 + 16 * n
    return rings


def test_geojson_and_geoparquet_agree_and_follow_their_specs(checkpoint, tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet", reason="GeoParquet output needs pyarrow")
    manifest = write_region(tmp_path / "region", height=160, width=160)
    use_predictor(monkeypatch, ChipMean())
    result = scan(tmp_path, checkpoint, manifest=str(manifest), threshold=0.55)
    out = tmp_path / "out"
    features = json.loads((out / "detections.geojson").read_text())["features"]
    table = pq.read_table(out / "detections.parquet")
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert geo["columns"]["geometry"]["encoding"] == "WKB"
    assert len(features) == table.num_rows == len(result.detections) > 1
    blobs, counts = table.column("geometry").to_pylist(), table.column("chip_count").to_pylist()
    for feature, blob, count in zip(features, blobs, counts):
        ring = np.asarray(feature["geometry"]["coordinates"][0] if feature["geometry"]["type"] == "Polygon"
                          else feature["geometry"]["coordinates"][0][0])  # fmt: skip
        area = 0.5 * np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])
        assert area > 0  # RFC 7946: exterior rings counter-clockwise
        assert feature["properties"]["chip_count"] == count
        if feature["geometry"]["type"] == "Polygon":
            assert np.allclose(_read_wkb_polygon(blob)[0], feature["geometry"]["coordinates"][0])
    # every positive chip is in exactly one detection
    positive = int((np.nan_to_num(result.scores, nan=0) >= 0.55).sum())
    assert sum(f["properties"]["chip_count"] for f in features) == positive
    assert (out / "quicklook.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------------------------
# Backends and engines
# --------------------------------------------------------------------------------------------------------------


def test_device_scaling_is_bit_identical_to_the_training_scaling():
    from fusionkern.data.transforms import minmax_scale

    x = np.random.default_rng(0).normal(280, 20, (6, 5, 3, 35, 35)).astype(np.float32)
    x[0, 0, 0, 3, 4] = np.nan  # a nodata pixel
    x[1, 2] = np.nan  # an empty plane
    x[2, 3, 1] = 7.0  # a constant plane
    np.testing.assert_array_equal(minmax_scale_torch(torch.from_numpy(x)).numpy(), minmax_scale(x))


def test_scan_scaling_is_bit_identical_to_the_training_scaling():
    from fusionkern.data.transforms import minmax_scale

    x = np.random.default_rng(3).normal(0.2, 0.05, (7, 5, 3, 35, 35)).astype(np.float32)
    x[1, 2, 0] = 0.3  # a constant plane
    x[2, 0, 1, 0, 0] = 1e30  # an outlier
    np.testing.assert_array_equal(scale_chips(x), minmax_scale(x))  # the finite route
    x[3, 1, 2, 5, 5] = np.nan
    np.testing.assert_array_equal(scale_chips(x), minmax_scale(x))  # chips with nodata


def test_torch_predictor_scaling_on_the_device_matches_the_cpu_path(checkpoint):
    from fusionkern.data.transforms import minmax_scale

    model = load_checkpoint(checkpoint)
    raw = np.random.default_rng(1).normal(280, 20, (4, 5, 3, 35, 35)).astype(np.float32)
    scaled = TorchPredictor(model)(minmax_scale(raw))
    np.testing.assert_array_equal(TorchPredictor(model, scale_on_device=True)(raw), scaled)
    assert scaled.shape == (4,) and ((0 <= scaled) & (scaled <= 1)).all()


def test_onnxruntime_backend_matches_torch(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime")
    manifest = write_region(tmp_path / "region", height=120, width=140)
    common = dict(manifest=str(manifest), quicklook=False, threshold=0.45)
    reference = scan(tmp_path, checkpoint, "torch", **common)
    onnx = scan(tmp_path, checkpoint, "onnx", backend="onnxruntime", **common)
    np.testing.assert_allclose(onnx.scores, reference.scores, atol=1e-5, equal_nan=True)
    assert onnx.report["backend"]["name"] == "onnxruntime"
    assert list((tmp_path / "onnx" / ".cache").glob("*/model-fp32.onnx"))


def test_gpu_backends_explain_what_they_need(checkpoint, monkeypatch, tmp_path):
    model = load_checkpoint(checkpoint)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="triton needs a CUDA GPU"):
            make_predictor("triton", model, "cpu")
        with pytest.raises(ConfigError, match="tensorrt needs a CUDA GPU"):
            make_predictor("tensorrt", model, "cpu", tmp_path)
    with pytest.raises(ConfigError, match="unknown backend"):
        make_predictor("tpu", model)


# --------------------------------------------------------------------------------------------------------------
# Pieces, the demo and the benchmark helpers
# --------------------------------------------------------------------------------------------------------------


def test_chip_fractions_match_a_direct_count():
    mask = np.random.default_rng(2).random((71, 89)) < 0.1
    layout = chip_layout(make_grid_stub(), CHIP * 30.0)
    fractions = chip_fractions(mask, layout, 3, 4)
    for i in range(3):
        for j in range(4):
            window = mask[i * STRIDE : i * STRIDE + CHIP, j * STRIDE : j * STRIDE + CHIP]
            assert fractions[i, j] == pytest.approx(window.mean())


def make_grid_stub():
    from rasterio.crs import CRS

    from fusionkern.scan.grid import ScanGrid

    return ScanGrid(CRS.from_epsg(32650).to_wkt(), (30.0, 0.0, 0.0, 0.0, -30.0, 0.0), 89, 71)


def test_scan_demo_reports_recall_and_precision(checkpoint, tmp_path):
    from fusionkern.scan_demo import run_scan_demo

    summary = run_scan_demo(tmp_path, checkpoint, size_px=300, n_plants=2, n_confusers=2, progress=False,
                            log=lambda line: None)  # fmt: skip
    assert summary["region"]["plants"] == 2 and summary["scan"]["scored"] > 0
    assert set(summary["match"]) >= {"recall", "precision", "plants_found", "detections"}
    assert (tmp_path / "scan" / "scan.json").is_file() and (tmp_path / "region" / "truth.geojson").is_file()
    # the generator's oracle on the same region, and how often regions of this kind meet both goals
    oracle = summary["oracle"]
    assert oracle["plants"] == oracle["found"] == 2 and 0.5 < oracle["goal_odds"] <= 1  # 2 of 2 needed: keeps all


def test_benchmark_helpers_time_each_stage(tmp_path):
    result = benchmark_scan(ChipMean(), size_px=192, options=EngineOptions(batch_size=32), tile_px=128, folder=tmp_path)
    assert result["io"]["chips"] == result["end_to_end"]["chips"] > 0
    assert result["inference"]["chips_per_s"] > 0 and result["ratio"] > 0
