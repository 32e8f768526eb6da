"""`fusionkern demo` end to end on a tiny setting: synthetic sites, training, a region scan against planted truth."""

from __future__ import annotations

import json

import torch

from fusionkern.cli import main


def test_demo_trains_and_scans_a_region(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--cement", "10", "--landcover", "20", "--epochs", "1", "--splits", "2",
                 "--region-px", "384", "--plants", "2", "--mine-px", "384", "--mine-top", "6", "--mine-random", "4",
                 "--mine-rounds", "2", "--register-works", "8", "--register-plants", "4", "--verifier-epochs", "1",
                 "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "recall" in printed and "mining round 2" in printed
    assert "calibration region" in printed and "false detection" in printed
    first = json.loads((out / "train-r0" / "metrics.json").read_text())
    assert first["sites"] == {"cement": 10, "landcover": 20}
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    mined = [sum(1 for _ in (out / f"mined-r{k}" / "landcover").iterdir()) for k in (1, 2)]
    assert 1 <= mined[0] <= 10 and 1 <= mined[1] <= 6  # the second round adds hard negatives only
    assert metrics["sites"] == {"cement": 10, "landcover": 20 + sum(mined)}
    folders = {str(out / "data"), str(out / "mined-r1"), str(out / "mined-r2")}
    assert str(out / "data") in metrics["summary_by_data"] and set(metrics["summary_by_data"]) <= folders
    summary = json.loads((out / "scan-demo" / "scan_demo.json").read_text())
    # verified by the physical-units verifier, trained on the sites, the mined chips and the register
    verifier = out / "train-verifier" / "split_0" / "best.pt"
    assert summary["region"]["size_px"] == 384 and summary["scan"]["decision"]["verify"] == [str(verifier)]
    raw = torch.load(verifier, weights_only=True)
    assert raw["data"]["scaling"] == "physical-units" and raw["model"]["class"] == "PhysicsNet"
    register = json.loads((out / "train-verifier" / "metrics.json").read_text())
    assert register["sites"] == {"cement": 10 + 4, "landcover": 20 + sum(mined) + 8}
    assert {"recall", "precision", "false_per_1000km2"} <= set(summary["match"])
    for name in ("scores.tif", "detections.geojson", "scan.json"):
        assert (out / "scan-demo" / "scan" / name).is_file(), name
    assert (out / "scan-demo" / "evaluation" / "pr_curve.png").is_file()
