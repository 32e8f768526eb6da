"""`fusionkern demo` end to end on a tiny setting: synthetic sites, training, a region scan against planted truth."""

from __future__ import annotations

import json

from fusionkern.cli import main


def test_demo_trains_and_scans_a_region(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--cement", "10", "--landcover", "20", "--epochs", "1", "--splits", "1",
                 "--region-px", "384", "--plants", "2", "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "recall" in printed
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    assert metrics["sites"] == {"cement": 10, "landcover": 20}
    summary = json.loads((out / "scan-demo" / "scan_demo.json").read_text())
    assert summary["region"]["size_px"] == 384
    for name in ("scores.tif", "detections.geojson", "scan.json"):
        assert (out / "scan-demo" / "scan" / name).is_file(), name
