"""``fusionkern scan --plan``: chips and tiles as a real scan lays them, bytes from the rasters, nodata from
overviews only, time from bench records of this machine (or none), refusals that leave no plan.json.

Regions are small generated ones (twelve GeoTIFFs of mixed dtypes and odd sizes, fresh random values); the model
is a random-weight FusionNet of the native preset whose checkpoint is only ever read for its description.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from rasterio.enums import Resampling
from rasterio.transform import from_origin

import fusionkern.cli
from fusionkern.bench.machine import cpu_model
from fusionkern.bench.report import build_report
from fusionkern.errors import CheckpointError, ConfigError
from fusionkern.models import FusionNet, save_checkpoint
from fusionkern.scan import ScanOptions, run_scan
from fusionkern.scan.grid import GridSource
from fusionkern.scan.plan import PLAN_JSON, coarse_grid, place_region, plan_scan
from conftest import CLIP_C1_AFRICA

BANDS = ("b10", "b11", "b7", "b6")
WIDTH = 0.25


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(FusionNet(preset="native", width=WIDTH), tmp_path_factory.mktemp("ckpt") / "native.pt")


def write_region(
    folder: Path,
    height: int,
    width: int,
    seed: int,
    holes: dict[str, tuple[int, int, int, int]] | None = None,
    overviews: tuple[int, ...] = (),
    compress: str | None = None,
) -> Path:
    """Twelve rasters and a manifest: thermal bands float32 (NaN nodata), b7/b6 uint16 (nodata 65535).

    Args:
        holes: ``{file stem: (row0, row1, col0, col1)}`` blocks of nodata.
        overviews: Decimation factors built (nearest) into every raster.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest: dict = {}
    for branch in BANDS:
        thermal = branch in ("b10", "b11")
        dtype, nodata = ("float32", float("nan")) if thermal else ("uint16", 65535)
        profile = {
            "driver": "GTiff", "dtype": dtype, "count": 1, "height": height, "width": width, "crs": "EPSG:32650",
            "transform": from_origin(400_020.0, 3_500_010.0, 30.0, 30.0), "nodata": nodata, "tiled": True,
            "blockxsize": 64, "blockysize": 64, **({"compress": compress} if compress else {}),
        }  # fmt: skip
        manifest[branch] = []
        for date in range(3):
            if thermal:
                values = (290.0 + rng.normal(0, 5, (height, width))).astype(np.float32)
            else:
                values = rng.integers(5000, 30000, (height, width)).astype(np.uint16)
            name = f"{branch}_{date}"
            if holes and name in holes:
                r0, r1, c0, c1 = holes[name]
                values[r0:r1, c0:c1] = nodata
            with rasterio.open(folder / f"{name}.tif", "w", **profile) as dst:
                dst.write(values, 1)
                if overviews:
                    dst.build_overviews(list(overviews), Resampling.nearest)
            manifest[branch].append(f"{name}.tif")
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest), encoding="utf-8")
    return path


class ChipMean:
    """A stand-in predictor: the chip's mean, cheap and deterministic."""

    expects_raw = False

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        return chips[:, 0, 0].mean(axis=(1, 2)).astype(np.float32)

    def describe(self) -> dict:
        return {"name": "chip-mean", "device": "cpu"}


def options(checkpoint: Path, out: Path, **kwargs) -> ScanOptions:
    return ScanOptions(checkpoint=str(checkpoint), out=str(out), progress=False, quicklook=False, device="cpu",
                       **kwargs)  # fmt: skip


def cli(argv: list[str]) -> int:
    return fusionkern.cli.main(["scan", *argv])


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------------------------------------------
# Chips and tiles: what a real scan scores
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid_options",
    [
        {"tile_px": 96},  # several tiles, the last row and column of them partial
        {"tile_px": 150, "stride_m": 600.0, "bounds": [400_500.0, 3_496_000.0, 405_000.0, 3_499_000.0]},  # a part
    ],
)
def test_chips_and_tiles_are_what_a_real_scan_scores(checkpoint, tmp_path, monkeypatch, grid_options):
    rng = np.random.default_rng()
    height, width = int(rng.integers(151, 210)), int(rng.integers(160, 230))  # odd sizes, fresh each run
    manifest = write_region(tmp_path / "region", height, width, seed=int(rng.integers(1 << 30)))
    plan = plan_scan(options(checkpoint, tmp_path / "plan", manifest=str(manifest), **grid_options))
    assert not (tmp_path / "plan").exists()  # plan_scan computes; only run_plan writes

    monkeypatch.setattr("fusionkern.scan.run.make_predictor", lambda *args, **kwargs: ChipMean())
    result = run_scan(options(checkpoint, tmp_path / "scan", manifest=str(manifest), **grid_options))
    report = result.report
    assert plan["chips"]["count"] == report["counts"]["chips"] == result.scores.size
    assert (plan["chips"]["rows"], plan["chips"]["cols"]) == result.scores.shape
    assert plan["chips"]["stride_px"] == report["chips"]["stride_px"]
    assert plan["tiles"]["count"] == report["engine"]["tiles"] > 1
    assert plan["tiles"]["tile_chips"] == report["engine"]["tile_chips"]
    assert plan["grid"]["width"] == report["grid"]["width"] and plan["grid"]["transform"] == report["grid"]["transform"]


def test_plan_with_scene_folders_through_the_cli(landsat8_dir, checkpoint, tmp_path, capsys):
    clip = landsat8_dir / CLIP_C1_AFRICA
    out = tmp_path / "out"
    code = cli([str(checkpoint), "--scenes", *[str(clip)] * 3, "--out", str(out), "--plan", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == [PLAN_JSON]  # no scores, detections or tile records
    plan = json.loads((out / PLAN_JSON).read_text())
    with rasterio.open(next(clip.glob("*_B10.TIF"))) as src:
        rows, cols = -(-(src.height - 35) // 18) + 1, -(-(src.width - 35) // 18) + 1
    assert plan["chips"]["count"] == rows * cols
    assert plan["read"]["rasters"] == 15 and [r["role"] for r in plan["per_raster"]][-3:] == ["qa d1", "qa d2", "qa d3"]
    assert f"chips   {rows * cols}:" in captured.out and "unknown (no overviews)" in captured.out


# --------------------------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bounds", [None, [400_400.0, 3_497_000.0, 404_100.0, 3_499_500.0]], ids=["whole", "part"])
def test_bytes_read_match_the_rasters(checkpoint, tmp_path, bounds):
    rng = np.random.default_rng()
    height, width = int(rng.integers(141, 200)), int(rng.integers(150, 220))
    manifest = write_region(tmp_path / "region", height, width, seed=int(rng.integers(1 << 30)), overviews=(2, 4),
                            compress="deflate")  # fmt: skip
    opts = options(checkpoint, tmp_path / "out", manifest=str(manifest), tile_px=80, bounds=bounds)
    plan = plan_scan(opts)
    region = place_region(opts, 35 * 30.0)
    total = 0
    for entry in plan["per_raster"]:
        path = entry["path"]
        source = GridSource(path, region.grid, region.layout.extent_px)  # what the scan reads with
        try:
            pixels = sum(int(source.covered(*t.window(region.layout)).sum()) for t in region.tiles)
        finally:
            source.close()
        with rasterio.open(path) as ds:
            itemsize = np.dtype(ds.dtypes[0]).itemsize
            stored = ds.width * ds.height + sum(math.ceil(ds.width / f) * math.ceil(ds.height / f) for f in (2, 4))
        assert not entry["warped"] and entry["pixels_read"] == pixels
        assert entry["bytes_read"] == pixels * itemsize
        assert entry["dtype"] == ("float32" if entry["role"][:3] in ("b10", "b11") else "uint16")
        assert entry["compressed_bytes"] == round(pixels * Path(path).stat().st_size / stored)
        assert entry["compression"] == "deflate"
        total += pixels * itemsize
    assert plan["read"]["bytes"] == total
    if bounds is not None:  # a part of the rasters: fewer pixels than they hold
        assert plan["per_raster"][0]["pixels_read"] < height * width


# --------------------------------------------------------------------------------------------------------------
# Nodata from overviews
# --------------------------------------------------------------------------------------------------------------


def test_nodata_share_comes_from_the_smallest_overview_only(checkpoint, tmp_path, monkeypatch, capsys):
    side = 256  # coarse grid = the scan grid; blocks on multiples of 8 survive nearest overviews exactly
    holes = {"b10_0": (0, 64, 0, 256), "b6_2": (128, 256, 192, 256)}  # 1/4 of rows; 1/8 of the grid, disjoint
    manifest = write_region(tmp_path / "region", side, side, seed=int(np.random.default_rng().integers(1 << 30)),
                            holes=holes, overviews=(2, 4, 8))  # fmt: skip
    reads = []
    original = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        reads.append((self.name, self.width, self.height))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    code = cli([str(checkpoint), "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--plan",
                "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert reads and all((w, h) == (side // 8, side // 8) for _, w, h in reads)  # the smallest overview, nothing else
    plan = json.loads((tmp_path / "out" / PLAN_JSON).read_text())
    shares = {Path(r["path"]).stem: r["nodata_share"] for r in plan["per_raster"]}
    assert shares["b10_0"] == pytest.approx(0.25) and shares["b6_2"] == pytest.approx(0.125)
    assert all(v == 0.0 for k, v in shares.items() if k not in holes)
    assert plan["nodata"]["share"] == pytest.approx(0.375) and plan["nodata"]["missing_overviews"] == []
    assert "37.5 % of the grid" in captured.out


def drop_overviews(path: Path) -> None:
    """Writes the raster again, the same values and profile, without overviews."""
    with rasterio.open(path) as src:
        values, profile = src.read(1), src.profile
    path.unlink()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values, 1)


def test_nodata_share_is_unknown_without_overviews(checkpoint, tmp_path, capsys):
    manifest = write_region(tmp_path / "region", 96, 128, seed=3, overviews=(2, 4))
    bare = tmp_path / "region" / "b7_1.tif"
    drop_overviews(bare)
    plan = plan_scan(options(checkpoint, tmp_path / "out", manifest=str(manifest)))
    assert plan["nodata"]["share"] is None and plan["nodata"]["missing_overviews"] == [str(bare)]
    shares = {r["role"]: r["nodata_share"] for r in plan["per_raster"]}
    assert shares.pop("b7 d2") is None and all(v == 0.0 for v in shares.values())


def test_the_grid_beyond_the_rasters_counts_as_nodata(checkpoint, tmp_path):
    manifest = write_region(tmp_path / "region", 96, 128, seed=4, overviews=(2, 4))
    west, north = 400_020.0, 3_500_010.0
    bounds = [west, north - 96 * 30.0, west + 256 * 30.0, north]  # twice as wide as the rasters
    plan = plan_scan(options(checkpoint, tmp_path / "out", manifest=str(manifest), bounds=bounds))
    assert plan["grid"]["width"] == 256
    assert plan["nodata"]["share"] == pytest.approx(0.5)
    assert all(r["nodata_share"] == pytest.approx(0.5) for r in plan["per_raster"])


def test_coarse_grid_keeps_the_extent(tmp_path):
    from rasterio.crs import CRS

    from fusionkern.scan.grid import ScanGrid

    grid = ScanGrid(CRS.from_epsg(32650).to_wkt(), (30.0, 0.0, 1000.0, 0.0, -30.0, 9000.0), 1537, 701)
    transform, (rows, cols) = coarse_grid(grid, side=512)
    assert max(rows, cols) <= 512
    assert transform * (cols, rows) == pytest.approx(grid.affine * (grid.width, grid.height))


# --------------------------------------------------------------------------------------------------------------
# Time from the bench records
# --------------------------------------------------------------------------------------------------------------


def write_record(folder: Path, rate: float, *, cpu: str, date: str, width: float = WIDTH, quick: bool = False,
                 backend: str = "torch", device: str = "cpu") -> Path:  # fmt: skip
    """A ``bench.json`` as ``fusionkern bench`` writes it, with one scan group timed at ``rate`` chips/s."""
    chips, rows = 169, []
    for variant, chips_per_s in (("inference", rate * 1.1), ("io", rate * 10), ("end_to_end", rate)):
        rows.append({
            "group": f"scan/native/{backend}", "name": f"test_scan[{variant}]",
            "extra_info": {"case": "scan", "variant": variant, "baseline": "inference", "items": chips,
                           "preset": "native", "backend": backend, "device": device, "width": width,
                           "region_px": 256, "chips": chips, "scan_batch": 64},
            "stats": {"median": chips / chips_per_s, "stddev": 0.0, "iqr": 0.0, "min": chips / chips_per_s,
                      "rounds": 5},
        })  # fmt: skip
    machine = {"date": date, "device": device, "name": "test", "cpu": {"model": cpu, "usable_cores": 2},
               "gpu": None}  # fmt: skip
    settings = {"device": device, "quick": quick, "threads": 1}
    report = build_report({"benchmarks": rows}, machine=machine, settings=settings)
    folder.mkdir(parents=True)
    (folder / "bench.json").write_text(json.dumps(report), encoding="utf-8")
    return folder


def test_time_comes_from_the_newest_matching_record(checkpoint, tmp_path, capsys):
    manifest = write_region(tmp_path / "region", 130, 170, seed=7)
    results, here = tmp_path / "results", cpu_model()
    rate = float(np.random.default_rng().uniform(50, 500))
    write_record(results / "old", rate / 3, cpu=here, date="2026-01-01T00:00:00+00:00")
    newest = write_record(results / "new", rate, cpu=here, date="2026-06-01T00:00:00+00:00")
    write_record(results / "other-cpu", rate * 7, cpu=here + " (another)", date="2026-09-01T00:00:00+00:00")
    write_record(results / "quick", rate * 5, cpu=here, date="2026-09-02T00:00:00+00:00", quick=True)
    write_record(results / "other-width", rate * 2, cpu=here, date="2026-09-03T00:00:00+00:00", width=1.0)
    write_record(results / "other-backend", rate * 4, cpu=here, date="2026-09-04T00:00:00+00:00",
                 backend="onnxruntime")  # fmt: skip
    (results / "broken").mkdir()
    (results / "broken" / "bench.json").write_text("{not json", encoding="utf-8")
    out = tmp_path / "out"
    code = cli([str(checkpoint), "--manifest", str(manifest), "--out", str(out), "--plan", "--device", "cpu",
                "--bench-results", str(results)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = json.loads((out / PLAN_JSON).read_text())
    estimate = plan["estimate"]
    assert estimate["record"]["record"] == str(newest)
    assert estimate["chips_per_s"] == pytest.approx(rate, abs=0.05)
    assert "bench record new" in captured.out


def test_no_matching_record_gives_no_time(checkpoint, tmp_path, capsys):
    manifest = write_region(tmp_path / "region", 100, 100, seed=8)
    results = tmp_path / "results"
    write_record(results / "elsewhere", 100.0, cpu=cpu_model() + " (another)", date="2026-06-01T00:00:00+00:00")
    write_record(results / "wider", 100.0, cpu=cpu_model(), date="2026-06-01T00:00:00+00:00", width=1.0)
    out = tmp_path / "out"
    code = cli([str(checkpoint), "--manifest", str(manifest), "--out", str(out), "--plan", "--device", "cpu",
                "--bench-results", str(results)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    estimate = json.loads((out / PLAN_JSON).read_text())["estimate"]
    assert estimate["seconds"] is None and "chips_per_s" not in estimate
    assert cpu_model() in estimate["reason"] and "only of width 1" in estimate["reason"]
    assert "no estimate: no fusionkern bench record of scan/native/torch" in captured.out
    plan = plan_scan(options(checkpoint, out, manifest=str(manifest), engine="ray"), results)
    assert plan["estimate"]["seconds"] is None and "Ray" in plan["estimate"]["reason"]
    empty = plan_scan(options(checkpoint, out, manifest=str(manifest)), tmp_path / "nowhere")
    assert empty["estimate"]["seconds"] is None


# --------------------------------------------------------------------------------------------------------------
# The checkpoint and bad input
# --------------------------------------------------------------------------------------------------------------


def test_the_plan_reads_the_checkpoint_description_only(checkpoint, tmp_path, monkeypatch):
    manifest = write_region(tmp_path / "region", 90, 90, seed=9)
    loads = []
    original = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs)
        return original(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the plan built a model")

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(FusionNet, "load_state_dict", refuse)
    plan = plan_scan(options(checkpoint, tmp_path / "out", manifest=str(manifest)))
    assert loads and all(k.get("weights_only") is True for k in loads)
    assert plan["checkpoint"] == {"path": str(checkpoint), "preset": "native", "width": WIDTH, "chip_px": 35,
                                  "resolution_m": 30.0}  # fmt: skip
    with pytest.raises(CheckpointError, match="'native' preset, not 'paper'"):
        plan_scan(options(checkpoint, tmp_path / "out", manifest=str(manifest), preset="paper"))
    with pytest.raises(ConfigError, match="--backend"):
        plan_scan(options(checkpoint, tmp_path / "out", manifest=str(manifest), backend="tpu"))


@pytest.mark.parametrize("fault", ["missing raster", "unknown backend", "missing checkpoint", "other preset"])
def test_bad_input_is_one_error_line_and_leaves_no_plan(checkpoint, tmp_path, capsys, fault):
    manifest = write_region(tmp_path / "region", 80, 90, seed=10)
    ckpt, extra = str(checkpoint), []
    if fault == "missing raster":
        (tmp_path / "region" / "b11_2.tif").unlink()
    elif fault == "unknown backend":
        extra = ["--backend", "tpu"]
    elif fault == "missing checkpoint":
        ckpt = str(tmp_path / "absent.pt")
    else:
        extra = ["--preset", "paper"]
    out = tmp_path / "out"
    code = cli([ckpt, "--manifest", str(manifest), "--out", str(out), "--plan", *extra])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    named = {"missing raster": "b11_2.tif", "unknown backend": "--backend", "missing checkpoint": "absent.pt",
             "other preset": "paper"}  # fmt: skip
    assert named[fault] in line
    assert not out.exists()


def test_a_plan_leaves_a_previous_scan_untouched_and_replaces_its_own_plan(checkpoint, tmp_path, monkeypatch):
    manifest = write_region(tmp_path / "region", 90, 100, seed=11)
    monkeypatch.setattr("fusionkern.scan.run.make_predictor", lambda *args, **kwargs: ChipMean())
    out = tmp_path / "out"
    run_scan(options(checkpoint, out, manifest=str(manifest)))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli([str(checkpoint), "--manifest", str(manifest), "--out", str(out), "--plan", "--device", "cpu"]) == 0
    assert cli([str(checkpoint), "--manifest", str(manifest), "--out", str(out), "--plan", "--device", "cpu",
                "--stride", "900"]) == 0  # fmt: skip
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(after) - set(before) == {PLAN_JSON} and all(after[n] == t for n, t in before.items())
    assert json.loads((out / PLAN_JSON).read_text())["chips"]["stride_px"] == 30
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name not in (".tiles", ".cache")]
