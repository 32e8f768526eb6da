"""Results a person can review and a catalogue can index: ``report.html`` opened in a real headless Chromium with
networking off, the STAC item read back with pystac, ``fusionkern report`` and ``python -m fusionkern``.

One scan of a small generated region (the demo's generator, 300 px) runs through ``python -m fusionkern scan``
with the real model (native preset, width 0.25) and its verifier, at threshold 0 so that every site is a
detection; the tests read its folder. The browser tests skip, saying why, where no Chromium is installed
(``.ci/run`` installs Debian's ``chromium`` where it is missing).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionkern.cli import main
from fusionkern.models import FusionNet, save_checkpoint
from fusionkern.scan import ScanOptions, run_scan
from fusionkern.scan import outputs, review, stac
from fusionkern.scan_demo import make_demo_region
from test_faults import subprocess_env

REGION_PX = 300


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(FusionNet(preset="native", width=0.25), tmp_path_factory.mktemp("ckpt") / "native.pt")


@pytest.fixture(scope="module")
def region(tmp_path_factory) -> Path:
    return make_demo_region(tmp_path_factory.mktemp("region"), size_px=REGION_PX, n_plants=2, n_confusers=2).manifest


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, checkpoint, region) -> Path:
    """A full scan through ``python -m fusionkern``, verified, every site a detection."""
    out = tmp_path_factory.mktemp("scan") / "scan"
    argv = [sys.executable, "-m", "fusionkern", "scan", str(checkpoint), "--manifest", str(region), "--out", str(out),
            "--threshold", "0", "--verify", "auto", "--no-progress", "--device", "cpu"]  # fmt: skip
    result = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def features(folder: Path) -> list[dict]:
    return json.loads((folder / outputs.GEOJSON).read_text())["features"]


def page_images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="(data:[^"]+)"', page)


def decode(uri: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


# --------------------------------------------------------------------------------------------------------------
# python -m fusionkern, and what the scan writes
# --------------------------------------------------------------------------------------------------------------


def test_python_m_fusionkern_is_the_console_script():
    result = subprocess.run([sys.executable, "-m", "fusionkern", "--help"], env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fusionkern ") and " report " in result.stdout
    bad = subprocess.run([sys.executable, "-m", "fusionkern", "report", "/no/such/scan"], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: scan folder /no/such/scan not found"]


def test_scan_lists_the_page_and_the_item_before_scan_json(scanned):
    report = json.loads((scanned / outputs.SCAN_JSON).read_text())
    assert report["outputs"][-3:] == [outputs.REPORT, outputs.STAC_ITEM, outputs.SCAN_JSON]
    assert outputs.FINAL_OUTPUTS[-1] == outputs.SCAN_JSON
    assert all((scanned / name).is_file() for name in report["outputs"])
    assert report["review"]["detections"] == report["counts"]["detections"] == len(features(scanned)) > 1
    assert report["review"]["with_crops"] == report["review"]["detections"]


def test_page_is_self_contained_with_every_detection_and_its_crops(scanned):
    page = (scanned / outputs.REPORT).read_text(encoding="utf-8")
    found = features(scanned)
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page), "the page must not load anything from a network"
    assert "<link" not in page and not re.search(r"<script[^>]+src=", page)
    assert len(re.findall(r'<tr id="det-\d+"', page)) == len(found)
    assert len(re.findall(r'class="marker" data-rank=', page)) == len(found)
    images = page_images(page)
    assert len(images) == 1 + 15 * len(found)  # the overview, then five inputs in three dates per detection
    chip_px = json.loads((scanned / outputs.SCAN_JSON).read_text())["chips"]["chip_px"]
    for uri in images[1:16]:
        assert decode(uri).size == (review.CROP_CHIPS * chip_px,) * 2
    # ranked: rows in rank order, scores falling, verifier scores shown
    ranks = [int(r) for r in re.findall(r'<tr id="det-(\d+)"', page)]
    assert ranks == sorted(ranks) == [f["properties"]["rank"] for f in found]
    scores = [f["properties"]["score"] for f in found]
    assert scores == sorted(scores, reverse=True)
    assert all(f["properties"]["verifier_score"] is not None for f in found)
    sha = json.loads((scanned / outputs.SCAN_JSON).read_text())["checkpoint"]["sha256"]
    for text in (sha, "detections.geojson", "detections.parquet", "scores.tif", "2018-01", "verifier"):
        assert text in page


def test_the_outlined_chip_is_the_one_the_verifier_scores(scanned):
    """The crops come from the scan's own reader on the scan grid: the chip centred in a crop is, value for value,
    the re-centred chip the verifier scored."""
    from fusionkern.scan.decide import recentred_chips
    from fusionkern.scan.tiles import StackReader, scale_chips

    scan = review.load_scan(scanned)
    sites = review.read_sites(scanned / outputs.GEOJSON)[:3]
    review.place_sites(sites, scan.grid)
    chip, crop = scan.layout.chip_px, review.CROP_CHIPS * scan.layout.chip_px
    crops = np.stack(list(review.iter_crops(scan.inputs, scan.grid, scan.layout, sites, crop)))
    x, y = scan.grid.affine * (np.array([s.col for s in sites]), np.array([s.row for s in sites]))
    with StackReader(scan.inputs, scan.grid, scan.layout) as reader:
        chips, valid = recentred_chips(reader, scan.grid, chip, list(zip(x, y)))
    assert valid.all()
    a = (crop - chip) // 2
    np.testing.assert_array_equal(scale_chips(crops[:, :, :, a : a + chip, a : a + chip]), chips)


def test_stretch_scales_each_plane_on_its_own_and_keeps_nodata():
    ramp = np.arange(100.0).reshape(10, 10)
    planes = np.stack([ramp, np.full((10, 10), 7.0), 1000 + 3 * ramp])
    planes[0, 0, 0] = np.nan
    out = review.stretch(planes)
    assert np.isnan(out[0, 0, 0]) and np.isfinite(out[0].ravel()[1:]).all()
    np.testing.assert_allclose(out[2].ravel()[1:], review.stretch(planes[2:3])[0].ravel()[1:])  # own scale
    assert (out[1] == 0).all()  # a constant plane
    assert np.nanmin(out[0]) == 0.0 and np.nanmax(out[0]) == 1.0 and (out[0] == 0).sum() > 1  # clipped at 2 / 98 %


def test_a_scan_without_detections_still_gets_a_page(tmp_path, checkpoint, region):
    result = run_scan(ScanOptions(checkpoint=str(checkpoint), out=str(tmp_path / "scan"), manifest=str(region),
                                  threshold=1.0, progress=False, checksums=False, quicklook=False))  # fmt: skip
    assert result.detections == []
    page = (tmp_path / "scan" / outputs.REPORT).read_text(encoding="utf-8")
    assert "no detection above the threshold" in page and len(page_images(page)) == 1
    assets = json.loads((tmp_path / "scan" / outputs.STAC_ITEM).read_text())["assets"]
    assert "quicklook" not in assets and "report" in assets  # --no-quicklook: not written, not listed


def test_a_page_that_cannot_be_written_leaves_no_output(tmp_path, checkpoint, region, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "scan" / outputs.REPORT))

    monkeypatch.setattr(review, "write_review", full)
    options = ScanOptions(checkpoint=str(checkpoint), out=str(tmp_path / "scan"), manifest=str(region), threshold=0.0,
                          progress=False, checksums=False)  # fmt: skip
    with pytest.raises(OSError):
        run_scan(options)
    assert not [name for name in outputs.FINAL_OUTPUTS if (tmp_path / "scan" / name).exists()]


# --------------------------------------------------------------------------------------------------------------
# STAC and GeoParquet
# --------------------------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_stac_item_round_trips_with_pystac_and_every_checksum_matches(scanned):
    pystac = pytest.importorskip("pystac", reason="the STAC round trip needs pystac (pip install 'fusionkern[dev]')")
    from pystac.extensions.file import FileExtension

    path = scanned / outputs.STAC_ITEM
    written = json.loads(path.read_text())
    item = pystac.Item.from_file(str(path))
    assert item.to_dict(include_self_link=False, transform_hrefs=False) == written
    report = json.loads((scanned / outputs.SCAN_JSON).read_text())
    listed = {Path(asset.get_absolute_href()).name for asset in item.assets.values()}
    assert listed == set(report["outputs"]) - {outputs.STAC_ITEM}  # every output but the item itself
    for asset in item.assets.values():
        file = Path(asset.get_absolute_href())
        assert file.is_file() and file.parent == scanned
        assert FileExtension.ext(asset).checksum == "1220" + sha256(file), file.name
        assert FileExtension.ext(asset).size == file.stat().st_size
        assert asset.media_type and asset.roles
    # the label extension, read as written (pystac's own reader of it is deprecated with the extension's status)
    props = item.properties
    assert props["label:type"] == "vector" and props["label:tasks"] == ["detection"]
    assert props["label:methods"] == ["automated"]
    assert props["label:classes"] == [{"name": "class", "classes": ["cement"]}]
    assert all(f["properties"][props["label:properties"][0]] == "cement" for f in features(scanned))
    assert any(uri.startswith("https://stac-extensions.github.io/label/") for uri in item.stac_extensions)
    assert item.properties["fusionkern:model"] == {"name": "FusionNet", "preset": "native",
                                                   "sha256": report["checkpoint"]["sha256"]}  # fmt: skip
    # the demo's dates 2018-01, 2017-01, 2017-04 span January 2017 to the end of January 2018
    assert item.datetime is None
    assert item.common_metadata.start_datetime.isoformat() == "2017-01-01T00:00:00+00:00"
    assert item.common_metadata.end_datetime.isoformat() == "2018-01-31T23:59:59+00:00"
    west, south, east, north = item.bbox
    for feature in features(scanned):
        assert west <= feature["properties"]["peak_lon"] <= east and south <= feature["properties"]["peak_lat"] <= north


@pytest.mark.parametrize("label, first, last", [
    ("2017-03-08", "2017-03-08T00:00:00", "2017-03-08T23:59:59"),  # MTL DATE_ACQUIRED
    ("20170308", "2017-03-08T00:00:00", "2017-03-08T23:59:59"),
    ("2016-02", "2016-02-01T00:00:00", "2016-02-29T23:59:59"),  # a manifest's month, leap year
    ("2019", "2019-01-01T00:00:00", "2019-12-31T23:59:59"),
    ("LC08_L1TP_167055_20170308_20170317_01_T1", "2017-03-08T00:00:00", "2017-03-08T23:59:59"),
    ("LC82320832016040LGN00", "2016-02-09T00:00:00", "2016-02-09T23:59:59"),  # pre-collection: day 40 of 2016
])  # fmt: skip
def test_date_labels_become_time_spans(label, first, last):
    start, end = stac.date_span(label)
    assert (start.isoformat(), end.isoformat()) == (first + "+00:00", last + "+00:00")


@pytest.mark.parametrize("label", ["scene_a", "2017-13", "2017-02-30", "", "LC82320832016400LGN00"])
def test_labels_that_are_not_dates_name_no_span(label):
    assert stac.date_span(label) is None


def test_item_without_readable_dates_takes_the_scan_time(scanned):
    report = json.loads((scanned / outputs.SCAN_JSON).read_text())
    for entries in report["inputs"]["bands"].values():
        for entry in entries:
            entry["date"] = "scene_folder"
    item = stac.build_item(scanned, report)
    assert item["properties"]["datetime"] == report["created"].replace("+00:00", "Z")
    assert "start_datetime" not in item["properties"]


def test_geoparquet_names_its_crs(scanned):
    pq = pytest.importorskip("pyarrow.parquet", reason="GeoParquet output needs pyarrow")
    from rasterio.crs import CRS

    geo = json.loads(pq.read_table(scanned / outputs.PARQUET).schema.metadata[b"geo"])
    crs = geo["columns"]["geometry"]["crs"]
    assert crs["id"] == {"authority": "OGC", "code": "CRS84"}
    assert [axis["direction"] for axis in crs["coordinate_system"]["axis"]] == ["east", "north"]  # lon first
    assert CRS.from_user_input(json.dumps(crs)) == CRS.from_user_input("OGC:CRS84")


# --------------------------------------------------------------------------------------------------------------
# fusionkern report
# --------------------------------------------------------------------------------------------------------------


def test_report_rebuilds_the_page_and_the_item(scanned, tmp_path, capsys):
    folder = tmp_path / "scan"
    shutil.copytree(scanned, folder)
    (folder / outputs.REPORT).unlink()
    (folder / outputs.STAC_ITEM).unlink()
    assert main(["report", str(folder), "--max-crops", "2"]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (folder / outputs.REPORT).read_text(encoding="utf-8")
    n = len(features(folder))
    assert len(re.findall(r'<tr id="det-\d+"', page)) == n and len(page_images(page)) == 1 + 2 * 15
    assert page.count("crops are drawn for the first 2 ranks only") == n - 2
    item = json.loads((folder / outputs.STAC_ITEM).read_text())
    assert item["assets"]["report"]["file:checksum"] == "1220" + sha256(folder / outputs.REPORT)
    assert item["assets"]["scan"]["file:checksum"] == "1220" + sha256(folder / outputs.SCAN_JSON)


def test_report_refuses_what_is_not_a_finished_scan(tmp_path, scanned, capsys):
    code = main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: {tmp_path} holds no scan.json: not a finished scan (rerun it with --resume)"
    folder = tmp_path / "moved"
    shutil.copytree(scanned, folder)
    report = json.loads((folder / outputs.SCAN_JSON).read_text())
    report["inputs"]["bands"]["b7"][0]["path"] = str(tmp_path / "gone" / "b7.tif")
    (folder / outputs.SCAN_JSON).write_text(json.dumps(report))
    code = main(["report", str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(tmp_path / "gone" / "b7.tif") in err[0]
    assert main(["report", str(folder), "--max-crops", "-1"]) == 2
    assert "--max-crops" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
           "--proxy-bypass-list=<-loopback>")
"""Networking off: every name resolves to nothing and every request, loopback included, goes to a closed port."""

# Runs in the page once it has loaded: checks what a reviewer sees, accepts rank 1, rejects rank 2, and leaves the
# findings and the exported review in the DOM for --dump-dom.
DRIVER = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const rows = document.querySelectorAll("table.detections tbody tr[data-rank]");
  rows[0].querySelector("button.accept").click();
  rows[1].querySelector("button.reject").click();
  const findings = {
    images: images.length,
    loaded: images.filter((image) => image.complete && image.naturalWidth > 0).length,
    markers: document.querySelectorAll("svg .marker").length,
    footprints: document.querySelectorAll("svg .footprint").length,
    rows: rows.length,
    resources: performance.getEntriesByType("resource").map((entry) => entry.name),
    tally: document.getElementById("tally").textContent,
    first_row: rows[0].dataset.review,
    marker_1: document.querySelector('.marker[data-rank="1"]').dataset.review,
    review: reviewGeoJSON(),
  };
  const out = document.createElement("pre");
  out.id = "test-findings";
  out.textContent = JSON.stringify(findings);
  document.body.appendChild(out);
});
</script>
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on PATH to render report.html in (Debian: apt-get install chromium; .ci/run installs it)")


def run_browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", *OFFLINE, *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=subprocess_env())


def test_page_works_in_headless_chromium_with_networking_off(chromium, scanned, tmp_path):
    from fusionkern.data.chips import read_plants

    page = tmp_path / "report.html"
    page.write_text((scanned / outputs.REPORT).read_text(encoding="utf-8").replace("</body>", DRIVER + "</body>"))
    result = run_browser(chromium, tmp_path / "profile", "--dump-dom", page.as_uri())
    match = re.search(r'<pre id="test-findings">(.*?)</pre>', result.stdout, re.S)
    assert match, f"no findings in the dumped page (exit {result.returncode}): {result.stderr[-2000:]}"
    findings = json.loads(match.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    found = features(scanned)
    assert findings["rows"] == findings["markers"] == len(found) > 1
    assert findings["footprints"] >= len(found)
    assert findings["images"] == 1 + 15 * len(found)
    assert findings["loaded"] == findings["images"], "every image, the overview and each crop, decodes"
    assert findings["resources"] == [], "nothing is fetched: the page opens offline"
    assert findings["tally"] == f"1 accepted, 1 rejected, {len(found) - 2} to review"
    assert findings["first_row"] == findings["marker_1"] == "accepted"
    # the exported review is truth for fusionkern evaluate and mine: accepted sites are plants, rejected left out
    exported = tmp_path / "review.geojson"
    exported.write_text(json.dumps(findings["review"]))
    plants = read_plants(exported)
    first = found[0]["properties"]
    assert [(p.lon, p.lat) for p in plants] == [(first["peak_lon"], first["peak_lat"])]
    assert [f["properties"]["review"] for f in findings["review"]["features"]] == ["accepted", "rejected"]
    evaluation = tmp_path / "evaluation"
    assert main(["evaluate", str(scanned / outputs.GEOJSON), "--truth", str(exported), "--out", str(evaluation)]) == 0
    figures = json.loads((evaluation / "evaluation.json").read_text())
    assert figures["plants"] == figures["plants_found"] == 1


def test_screenshot_of_the_page_is_not_blank(chromium, scanned, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    result = run_browser(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,1400",
                         (scanned / outputs.REPORT).as_uri())  # fmt: skip
    assert shot.is_file(), f"no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int64)
    assert pixels.shape[:2] == (1400, 1280)
    colours = np.unique(pixels.reshape(-1, 3) @ np.array([1 << 16, 1 << 8, 1]))
    assert len(colours) > 2000, "a rendered page with an overview and crops has thousands of colours"
    header = pixels[:20, :200].mean(axis=(0, 1))
    assert header.max() < 80  # the dark header bar came out: styles applied
    heat = (pixels[..., 0] > 200) & (pixels[..., 2] < 60)  # orange-yellow pixels of the brightness crops
    assert heat.sum() > 1000, "the crops are drawn"
