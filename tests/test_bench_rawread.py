"""The scan's raw-read baseline (:mod:`fusionkern.bench.rawread`) and the scan group's limits in the report: the
same tiles and chips as the scan, every window's bytes, clear errors, and the ratios of a real in-process run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

import fusionkern.cli as cli  # noqa: E402
from fusionkern.bench.cases import make_plan, scan_call, scan_region  # noqa: E402
from fusionkern.bench.rawread import scan_tiles, time_raw_reads  # noqa: E402
from fusionkern.bench.report import render_markdown, rows_from_pytest_benchmark, scan_summary  # noqa: E402
from fusionkern.errors import InputError  # noqa: E402
from fusionkern.scan.engine import EngineOptions, _setup, make_benchmark_region, time_io  # noqa: E402

CHIP_M = 35 * 30.0


def fresh_seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def rewrite(path, values, transform) -> None:
    """Rewrites a generated raster with other values and georeferencing (same CRS, dtype and nodata)."""
    with rasterio.open(path) as src:
        profile = src.profile
    profile.update(width=values.shape[1], height=values.shape[0], transform=transform, tiled=False)
    profile.pop("blockxsize", None), profile.pop("blockysize", None)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values, 1)


@pytest.mark.parametrize("compress", [None, "deflate"])
@pytest.mark.parametrize(("size_px", "tile_px", "stride_m"), [
    (173, 90, None),  # odd side, nine small tiles, chips overhanging the edge
    (131, 1024, 450.0),  # one tile, a stride that is not half a chip
])  # fmt: skip
def test_raw_reads_cover_the_scan_tiles_and_count_its_chips(tmp_path, compress, size_px, tile_px, stride_m):
    manifest = make_benchmark_region(tmp_path, size_px, seed=fresh_seed(), compress=compress, block_px=64)
    setup = _setup(manifest, CHIP_M, tile_px, stride_m)
    tiles = scan_tiles(manifest, CHIP_M, tile_px, stride_m)
    assert tiles.tiles == setup.tiles and tiles.layout == setup.layout and len(tiles.rasters) == 12

    raw = time_raw_reads(manifest, CHIP_M, tile_px, stride_m, workers=2)
    io = time_io(manifest, CHIP_M, EngineOptions(batch_size=16), tile_px, stride_m)
    assert raw["chips"] == io["chips"] > 0 and raw["tiles"] == len(setup.tiles)
    assert raw["chips"] < setup.layout.n_chips  # the last row and column of chips overhang the rasters
    # Every tile window of the 12 uint16 rasters, clipped to the rasters, read once.
    clipped = [min(h, size_px - top) * min(w, size_px - left) for top, left, h, w in
               (t.window(setup.layout) for t in setup.tiles)]  # fmt: skip
    assert raw["bytes"] == 12 * 2 * sum(clipped)
    assert math.isfinite(raw["chips_per_s"]) and raw["chips_per_s"] > 0


def test_raw_read_chips_follow_a_raster_that_covers_less_of_the_grid(tmp_path):
    size = 157
    manifest = make_benchmark_region(tmp_path, size, seed=fresh_seed(), block_px=64)
    with rasterio.open(tmp_path / "b6_d2.tif") as src:
        transform = src.transform
    # b6 of date 2 starts 13 px right of the grid's origin and stops 9 px short of its bottom: on the grid, smaller.
    values = np.random.default_rng().integers(1, 30000, (size - 9, size - 13), dtype=np.uint16)
    rewrite(tmp_path / "b6_d2.tif", values, transform * transform.translation(13, 0))
    raw = time_raw_reads(manifest, CHIP_M, 64)
    io = time_io(manifest, CHIP_M, EngineOptions(batch_size=16), 64)
    full = time_raw_reads(make_benchmark_region(tmp_path / "full", size, block_px=64), CHIP_M, 64)
    assert raw["chips"] == io["chips"] < full["chips"]


def test_a_raster_off_the_grid_is_named(tmp_path):
    manifest = make_benchmark_region(tmp_path, 96, seed=fresh_seed(), block_px=32)
    with rasterio.open(tmp_path / "b11_d3.tif") as src:
        values, transform = src.read(1), src.transform
    rewrite(tmp_path / "b11_d3.tif", values, transform * transform.translation(0.5, 0))  # half a pixel off
    with pytest.raises(InputError, match=r"b11_d3\.tif.*not on the grid"):
        time_raw_reads(manifest, CHIP_M, 64)


def test_a_missing_raster_is_named(tmp_path):
    manifest = make_benchmark_region(tmp_path, 96, seed=fresh_seed(), block_px=32)
    (tmp_path / "b7_d1.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputError, match=r"b7_d1\.tif"):
        time_raw_reads(manifest, CHIP_M, 64)


def test_scan_case_times_raw_reads_over_the_scan_chips(tmp_path):
    plan = make_plan("cpu", quick=True)
    manifest = scan_region(tmp_path, "deflate", plan)
    with rasterio.open(tmp_path / "b10_d1.tif") as ds:
        assert ds.compression.name.lower() == "deflate"
    call = scan_call("raw_read", manifest, None, 35, plan)
    io = scan_call("io", manifest, None, 35, plan)
    assert call.items == io.items == call.info["chips"] > 0 and not call.repeatable
    assert call.fn()["chips"] == call.items
    with pytest.raises(ValueError, match="compression"):
        scan_region(tmp_path / "x", "lzma", plan)


def entry(group, variant, median, items, **info):
    return {"group": group, "name": f"test_scan[{variant}]", "param": variant,
            "extra_info": {"case": "scan", "variant": variant, "baseline": "inference", "items": items, **info},
            "stats": {"median": median, "min": median, "stddev": 0.0, "iqr": 0.0, "rounds": 5}}  # fmt: skip


def test_scan_summary_finds_the_limit():
    rng = np.random.default_rng()
    chips = int(rng.integers(100, 1000))
    inference, raw, io, e2e = (float(t) for t in rng.uniform(0.1, 2.0, 4))
    group = "scan/native/torch/deflate"
    data = {"benchmarks": [
        entry(group, "inference", inference, 64 * math.ceil(chips / 64), backend="torch", compression="deflate"),
        entry(group, "io", io, chips), entry(group, "raw_read", raw, chips), entry(group, "end_to_end", e2e, chips),
        entry("scan/native/torch", "inference", 1.0, 10),  # a group without raw reads (the GPU check's)
    ]}  # fmt: skip
    rows = rows_from_pytest_benchmark(data)
    first, second = scan_summary(rows)
    rate_inference = 64 * math.ceil(chips / 64) / inference
    assert first["compression"] == "deflate" and first["chips_per_s"]["raw_read"] == pytest.approx(chips / raw)
    assert first["io_over_raw_read"] == pytest.approx(raw / io)
    assert first["end_to_end_over_inference"] == pytest.approx(chips / e2e / rate_inference)
    slower = min(rate_inference, chips / raw)
    assert first["end_to_end_over_limit"] == pytest.approx(chips / e2e / slower)
    assert first["limit"] == ("inference" if rate_inference < chips / raw else "raw reads")
    assert second["limit"] is None and second["end_to_end_over_limit"] is None and second["io_over_raw_read"] is None


def test_bench_scan_rows_carry_raw_reads_and_limits(tmp_path):
    out = tmp_path / "bench"
    assert cli.main(["bench", "--quick", "--device", "cpu", "--out", str(out), "-k", "test_scan and torch"]) == 0
    doc = json.loads((out / "bench.json").read_text())
    rows = [r for r in doc["results"] if r["case"] == "scan"]
    groups = {r["group"] for r in rows}
    assert groups == {"scan/native/torch/uncompressed", "scan/native/torch/deflate"}
    for group in groups:
        by = {r["variant"]: r for r in rows if r["group"] == group}
        assert set(by) == {"inference", "io", "raw_read", "end_to_end"}
        assert by["raw_read"]["items"] == by["io"]["items"] == by["end_to_end"]["items"] > 0
        assert all(math.isfinite(r["throughput"]) and r["throughput"] > 0 for r in by.values())
    assert len(doc["scan"]) == 2
    for limits in doc["scan"]:
        for key in ("io_over_raw_read", "end_to_end_over_inference", "end_to_end_over_limit"):
            assert math.isfinite(limits[key]) and limits[key] > 0
        assert limits["limit"] in ("inference", "raw reads")
    md = (out / "bench.md").read_text()
    assert "Where the scan's limit is" in md and "e2e / min(inference, raw)" in md and md == render_markdown(doc)
