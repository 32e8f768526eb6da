"""Detections a user can trust: shifted training chips, mined hard negatives, the prior shift, calibration at a
false-detection budget, the verifier, one detection per site, and the evaluation, each on small inputs; and their
refusals (one ``error:`` line, exit 2, nothing half-written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from fusionkern import BRANCHES
from fusionkern.cli import main
from fusionkern.data import AugmentParams, SiteAugment, SiteDataset, load_many, read_site_layout
from fusionkern.data.chips import read_plants
from fusionkern.errors import CheckpointError, ConfigError, InputError
from fusionkern.evaluate import Detection, distance_m, evaluate_detections, read_detections
from fusionkern.models import FusionNet, load_checkpoint, save_checkpoint
from fusionkern.scan import ScanOptions, run_scan
from fusionkern.scan import decide
from fusionkern.scan.calibrate import pick_threshold
from fusionkern.scan.grid import ChipLayout
from fusionkern.scan.outputs import group_sites
from fusionkern.scan_demo import (
    WORKS_DRAWS, expected_ceiling, goal_odds, make_demo_region, meets_goals, oracle_score, region_ceiling,
    region_meets_goals,
)

REGION_PX, CHIP = 320, 35


# --------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    """A small generated region: two plants and a few look-alike windows."""
    return make_demo_region(tmp_path_factory.mktemp("region"), REGION_PX, n_plants=2, n_confusers=4, seed=3)


def _checkpoint(folder: Path, prior: float | None = 0.6, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    data = {"prior": {"cement": prior}} if prior is not None else {}
    return save_checkpoint(FusionNet(preset="native", width=0.25), folder / "best.pt", data=data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A training run's folder with two split checkpoints (untrained weights, priors recorded)."""
    root = tmp_path_factory.mktemp("train")
    for k in range(2):
        (root / f"split_{k}").mkdir()
        _checkpoint(root / f"split_{k}", seed=k)
    return root


class HotMean:
    """A stand-in scan predictor: high where the chip's b10 is hot in every date (kilns), low elsewhere."""

    expects_raw = False

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        b10 = chips[:, 0]  # (B, 3, S, S) scaled per date
        lift = b10[..., 11:24, 11:24].max(axis=(-2, -1)) - np.median(b10, axis=(-2, -1))  # (B, 3)
        return np.clip(lift.min(axis=1), 0.0, 1.0).astype(np.float32)  # sustained in every date

    def describe(self) -> dict:
        return {"name": "hot-mean", "device": "cpu"}


def _use(monkeypatch, predictor) -> None:
    monkeypatch.setattr("fusionkern.scan.run.make_predictor", lambda *args, **kwargs: predictor)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------------------------
# Training as the scanner sees
# --------------------------------------------------------------------------------------------------------------


def _site_with_context(root: Path, context: int, size: int = 11) -> None:
    """One site whose five files hold the same gradient pattern with different offsets and gains."""
    from rasterio.transform import from_origin

    side = size + 2 * context
    rng = np.random.default_rng()
    base = rng.random((3, side, side)).astype(np.float32) + np.arange(side, dtype=np.float32)[None, None, :]
    folder = root / "cement" / "site"
    folder.mkdir(parents=True)
    profile = {"driver": "GTiff", "dtype": "float32", "count": 3, "height": side, "width": side,
               "crs": "EPSG:32650", "transform": from_origin(0, 0, 30, 30)}  # fmt: skip
    for k, branch in enumerate(BRANCHES):
        with rasterio.open(folder / f"{branch}.tif", "w", **profile) as dst:
            dst.write(base * (k + 1) + 10.0 * k + 1.0)  # min-max scaling maps every branch to the same chip


def test_shift_moves_all_five_inputs_together(tmp_path):
    context, size = 4, 11
    _site_with_context(tmp_path, context, size)
    sites = read_site_layout(tmp_path)
    augment = SiteAugment(seed=None, max_shift_px=context, p_rotate=0.0, p_hflip=0.0, p_vflip=0.0)
    dataset = SiteDataset(sites, chip_size=size, augment=augment)
    plain = SiteDataset(sites, chip_size=size)
    seen = set()
    for _ in range(60):
        x = dataset[0][0].numpy()
        for k in range(1, 5):
            np.testing.assert_allclose(x[k], x[0], atol=2e-6)  # the five inputs stay co-registered
        seen.add(x.tobytes())
    assert len(seen) > 20  # the window does move
    # a drawn shift is a crop of the context, the same for every branch, then scaled like a centred chip
    params = AugmentParams(dy=-context, dx=context)
    shifted = dataset.load(0, params)
    with rasterio.open(sites[0].paths["b10"]) as src:
        raw = src.read()
    window = raw[:, 0:size, 2 * context : 2 * context + size]
    np.testing.assert_allclose(shifted[0], (window - window.min(axis=(1, 2), keepdims=True))
                               / np.ptp(window, axis=(1, 2), keepdims=True), atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(plain.load(0), dataset.load(0))  # no params: centred


def test_shift_is_clipped_to_the_context_and_off_without_it():
    image = np.arange(3 * 15 * 15, dtype=np.float32).reshape(3, 15, 15)
    assert AugmentParams(dy=9, dx=-9).crop(image, 11).shape == (3, 11, 11)
    np.testing.assert_array_equal(AugmentParams(dy=9, dx=-9).crop(image, 11), image[:, 4:15, 0:11])
    np.testing.assert_array_equal(AugmentParams(dy=3, dx=3).crop(image[:, 2:13, 2:13], 11), image[:, 2:13, 2:13])
    draws = [SiteAugment(seed=1, max_shift_px=9).sample() for _ in range(1)]
    augment = SiteAugment(seed=1)
    shifts = np.array([(p.dy, p.dx) for p in (augment.sample() for _ in range(2000))])
    assert shifts.min() == -9 and shifts.max() == 9 and draws
    assert abs(shifts.mean()) < 0.5
    with pytest.raises(ConfigError, match="max_shift_px"):
        SiteAugment(max_shift_px=-1)


def test_synthetic_sites_carry_context(tmp_path):
    from fusionkern.data.synthetic import make_synthetic_sites

    sites = make_synthetic_sites(tmp_path / "ctx", n_cement=1, n_landcover=1, context_px=5, seed=2)
    with rasterio.open(sites[0].paths["b10"]) as src:
        assert (src.height, src.width) == (45, 45)
    narrow = make_synthetic_sites(tmp_path / "none", n_cement=1, n_landcover=1, seed=2)
    wide = SiteDataset(sites).load(0)
    np.testing.assert_allclose(wide, SiteDataset(narrow).load(0), atol=1e-6)  # same draws, same centre chip
    with pytest.raises(ConfigError, match="context_px"):
        make_synthetic_sites(tmp_path / "bad", n_cement=1, n_landcover=1, context_px=18)


def test_a_register_of_other_industry_draws_a_works_at_every_landcover_site(tmp_path):
    """``landcover="industry"``: each landcover site holds a works of other heavy industry (kiln heat in every
    date); cement sites are drawn as by default, and the default draws stay what they were."""
    from fusionkern.data.dataset import read_image
    from fusionkern.data.synthetic import make_synthetic_sites

    def sustained_heat(site) -> float:  # the b10 peak over the median in the coolest date
        b10 = read_image(site.paths["b10"])
        return float((b10.max(axis=(1, 2)) - np.median(b10, axis=(1, 2))).min())

    mixed = make_synthetic_sites(tmp_path / "mixed", n_cement=2, n_landcover=12, seed=4)
    works = make_synthetic_sites(tmp_path / "works", n_cement=2, n_landcover=12, seed=4, landcover="industry")
    for a, b in zip(mixed[:2], works[:2]):
        np.testing.assert_array_equal(read_image(a.paths["b10"]), read_image(b.paths["b10"]))
    lift_mixed, lift_works = ([sustained_heat(s) for s in sites[2:]] for sites in (mixed, works))
    assert np.mean(lift_works) > np.mean(lift_mixed) + 1.5 and min(lift_works) > 3.0
    with pytest.raises(ConfigError, match="landcover"):
        make_synthetic_sites(tmp_path / "bad", n_cement=1, n_landcover=1, landcover="towns")


# --------------------------------------------------------------------------------------------------------------
# Prior shift and decisions
# --------------------------------------------------------------------------------------------------------------


def test_prior_shift_against_hand_computed_logits():
    p = np.array([0.5, 0.9, 0.01, np.nan], dtype=np.float32)
    train, deploy = 0.6, 0.001
    shift = math.log(deploy / (1 - deploy)) - math.log(train / (1 - train))
    expected = [1 / (1 + math.exp(-(math.log(v / (1 - v)) + shift))) for v in (0.5, 0.9, 0.01)]
    got = decide.shift_scores(p, shift)
    np.testing.assert_allclose(got[:3], expected, rtol=1e-5)
    assert math.isnan(got[3])
    # 0.5 at a training prior of 0.6 is odds 1 * (0.001/0.999) / (0.6/0.4) at the deployment prior
    assert got[0] == pytest.approx((0.001 / 0.999 / 1.5) / (1 + 0.001 / 0.999 / 1.5), rel=1e-5)
    assert decide.effective_prior(10, 30, (3.0, 1.0)) == pytest.approx(0.5)
    assert decide.shift_threshold(0.5, 0.0) == 0.5
    assert decide.shift_threshold(decide.shift_threshold(0.3, 2.0), -2.0) == pytest.approx(0.3)


def test_decision_defaults_and_refusals(tmp_path, trained):
    model = load_checkpoint(trained / "split_0" / "best.pt")
    plain = decide.resolve_decision(model, trained / "split_0" / "best.pt")
    assert (plain.threshold, plain.threshold_source, plain.shift, plain.verify) == (0.5, "default", 0.0, [])
    moved = decide.resolve_decision(model, trained / "split_0" / "best.pt", prior=0.01)
    assert moved.shift == pytest.approx(math.log(0.01 / 0.99) - math.log(0.6 / 0.4))
    verified = decide.resolve_decision(model, trained / "split_0" / "best.pt", verify="auto")
    assert verified.verify == sorted(trained.glob("split_*/best.pt"))
    assert verified.candidate_threshold == pytest.approx(0.2)  # a quarter of the odds of 0.5
    old = load_checkpoint(_checkpoint(tmp_path, prior=None))
    with pytest.raises(CheckpointError, match="records no training prior"):
        decide.resolve_decision(old, tmp_path / "best.pt", prior=0.01)
    with pytest.raises(ConfigError, match="--prior"):
        decide.resolve_decision(model, "x.pt", prior=1.0)
    with pytest.raises(InputError, match="--verify"):
        decide.resolve_decision(model, "x.pt", verify=str(tmp_path / "nothing"))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\xff\xfe onnx")
    with pytest.raises(InputError, match="exported model"):
        decide.resolve_decision(model, "x.pt", verify=str(tmp_path / "model.onnx"))
    listing = tmp_path / "members.txt"
    listing.write_text("model.onnx\n")  # an exported model named in a list: refused when the verifier loads it
    with pytest.raises(CheckpointError, match="exported model|sidecar"):
        decide.Verifier(decide.resolve_verifier(str(listing), "x.pt"), model)
    (tmp_path / "weights.bin").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(InputError, match="neither a checkpoint"):
        decide.resolve_decision(model, "x.pt", verify=str(tmp_path / "weights.bin"))


def test_scan_prior_without_recorded_prior_is_one_error_line(tmp_path, region, capsys):
    checkpoint = _checkpoint(tmp_path, prior=None)
    out = tmp_path / "scan"
    code, _, err = _cli(capsys, "scan", str(checkpoint), "--manifest", str(region.manifest), "--out", str(out),
                        "--prior", "0.001", "--no-progress")  # fmt: skip
    assert code == 2 and err.startswith("error:") and "records no training prior" in err and len(err.splitlines()) == 1
    assert not (out / "scan.json").exists() and not (out / ".tiles").exists()


# --------------------------------------------------------------------------------------------------------------
# One detection per site
# --------------------------------------------------------------------------------------------------------------


def test_sites_are_one_per_peak_and_capped():
    scores = np.zeros((40, 40), np.float32)
    scores[5:8, 5:8] = 0.7
    scores[6, 6] = 0.9  # one plant: nine touching positive chips
    scores[20:40, 0:40] = 0.8  # a warm town covering half the region
    groups = group_sites(scores, 0.5, radius=2)
    assert len(groups[0]) <= 25 and all(len(g) <= 25 for g in groups)  # no site wider than 5 x 5 cells
    plant = [g for g in groups if (g[:, 0] < 10).all()]
    assert len(plant) == 1 and tuple(plant[0][0]) == (6, 6) and len(plant[0]) == 9
    assert sum(len(g) for g in groups) == int((scores >= 0.5).sum())  # every positive chip in exactly one site
    town = [g for g in groups if (g[:, 0] >= 20).all()]
    assert len(town) >= 16  # 20 x 40 cells cut into sites of at most 5 x 5
    assert group_sites(np.full((3, 3), np.nan, np.float32), 0.5, 2) == []


def test_detections_rank_and_carry_the_decision(tmp_path, region, monkeypatch):
    _use(monkeypatch, HotMean())
    checkpoint = _checkpoint(tmp_path)
    result = run_scan(ScanOptions(checkpoint=str(checkpoint), out=str(tmp_path / "scan"),
                                  manifest=str(region.manifest), threshold=0.5, prior=0.01, progress=False,
                                  checksums=False))  # fmt: skip
    scores = [d.score for d in result.detections]
    assert scores == sorted(scores, reverse=True) and [d.id for d in result.detections] == list(
        range(1, len(scores) + 1))
    features = json.loads((tmp_path / "scan" / "detections.geojson").read_text())
    props = features["features"][0]["properties"] if features["features"] else None
    if props:
        assert {"score", "verifier_score", "chip_count", "threshold", "prior", "model_sha256", "peak_lon",
                "peak_lat", "rank"} <= set(props)  # fmt: skip
        assert props["prior"] == 0.01
    report = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert report["decision"]["prior"] == 0.01 and report["decision"]["threshold_source"] == "option"
    assert report["counts"]["area_km2"] > 0
    expected = decide.shift_scores(result.raw_scores, decide.logit(0.01) - decide.logit(0.6))
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Mining
# --------------------------------------------------------------------------------------------------------------


def test_mine_never_writes_near_a_plant(tmp_path, region, monkeypatch, capsys):
    _use(monkeypatch, HotMean())
    checkpoint = _checkpoint(tmp_path)
    out = tmp_path / "mined"
    exclude = 1500.0
    code, printed, err = _cli(capsys, "mine", str(checkpoint), "--manifest", str(region.manifest), "--plants",
                              str(region.manifest.parent / "truth.geojson"), "--out", str(out), "--top", "12",
                              "--random", "5", "--exclude-m", str(exclude), "--round", "2", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "hard negative" in printed
    sites = read_site_layout(out)
    assert sites and all(s.label == 1 for s in sites)
    plants = read_plants(region.manifest.parent / "truth.geojson")
    from rasterio.warp import transform

    for site in sites:
        provenance = json.loads((site.paths["b10"].parent / "provenance.json").read_text())
        assert provenance["round"] == 2 and provenance["kind"] in ("hard", "random") and "rasters" in provenance
        with rasterio.open(site.paths["b10"]) as src:
            assert (src.height, src.width) == (CHIP + 18, CHIP + 18)  # 9 px of context by default
            west, south, east, north = src.bounds
            crs = src.crs
        xs, ys = transform("EPSG:4326", crs, [p.lon for p in plants], [p.lat for p in plants])
        for x, y in zip(xs, ys):
            dx, dy = max(west - x, 0, x - east), max(south - y, 0, y - north)
            assert math.hypot(dx, dy) > exclude  # never within --exclude-m of a known plant, context included
    kinds = [json.loads((s.paths["b10"].parent / "provenance.json").read_text())["kind"] for s in sites]
    assert kinds.count("hard") <= 12 and kinds.count("random") <= 5 and kinds.count("hard") >= 1
    hard = [json.loads((s.paths["b10"].parent / "provenance.json").read_text())["score"] for s in sites
            if "hard" in s.name]  # fmt: skip
    assert hard == sorted(hard, reverse=True)  # best first
    # the mined folder merges with a training set
    from fusionkern.data.synthetic import make_synthetic_sites

    make_synthetic_sites(tmp_path / "train", n_cement=3, n_landcover=3, seed=0)
    merged, _, origin = load_many([tmp_path / "train", out])
    assert len(merged) == 6 + len(sites) and set(origin) == {0, 1}
    assert len({s.key for s in merged}) == len(merged)


def test_mine_refuses_a_region_without_its_plants(tmp_path, region, monkeypatch, capsys):
    _use(monkeypatch, HotMean())
    checkpoint = _checkpoint(tmp_path)
    far = tmp_path / "far.csv"
    far.write_text("lon,lat\n10.0,50.0\n")
    out = tmp_path / "mined"
    code, _, err = _cli(capsys, "mine", str(checkpoint), "--manifest", str(region.manifest), "--plants", str(far),
                        "--out", str(out), "--no-progress")  # fmt: skip
    assert code == 2 and err.startswith("error:") and "none of the 1 known plant" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".mined")]


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------


def test_pick_threshold_hand_cases():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    plants = [{0}, set(), {1}, set(), {2}, set()]
    one = pick_threshold(scores, plants, allowed=1, n_plants=3)
    assert 0.6 < one["lowest"] < 0.6001 and one["false"] <= 1 and one["found"] == 2
    assert one["lowest"] <= one["threshold"] <= 0.7  # between the budget's bound and the weakest plant kept
    none = pick_threshold(scores, plants, allowed=0, n_plants=3)
    assert none["false"] == 0 and none["found"] == 1 and 0.8 < none["threshold"] <= 0.9
    every = pick_threshold(scores, plants, allowed=5, n_plants=3)
    assert every["found"] == 3
    with pytest.raises(InputError, match="budget cannot be met"):
        pick_threshold(np.array([0.9, 0.5]), [set(), {0}], allowed=0, n_plants=1)


def test_calibration_meets_its_budget_and_the_scan_uses_it(tmp_path, region, monkeypatch, capsys):
    _use(monkeypatch, HotMean())
    checkpoint = _checkpoint(tmp_path)
    truth = region.manifest.parent / "truth.geojson"
    budget = 20.0  # per 1000 km²: one false detection allowed on this 92 km² region
    code, printed, err = _cli(capsys, "calibrate", str(checkpoint), "--manifest", str(region.manifest), "--plants",
                              str(truth), "--fp-per-1000km2", str(budget), "--out", str(tmp_path / "cal"),
                              "--verify", "none", "--no-progress")  # fmt: skip
    assert code == 0, err
    stored = load_checkpoint(checkpoint).checkpoint["metadata"]["calibration"]
    assert stored["fp_per_1000km2"] == budget and stored["plain"]["threshold"] > 0
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["plain"] == stored["plain"]
    result = run_scan(ScanOptions(checkpoint=str(checkpoint), out=str(tmp_path / "scan"),
                                  manifest=str(region.manifest), progress=False, checksums=False))  # fmt: skip
    assert result.decision.threshold_source == "calibration"
    assert result.decision.threshold == pytest.approx(stored["plain"]["threshold"])
    from fusionkern.scan_demo import evaluation_detections

    figures = evaluate_detections(evaluation_detections(result.detections),
                                  np.array([[p.lon, p.lat] for p in read_plants(truth)]), 600.0,
                                  result.report["counts"]["area_km2"])  # fmt: skip
    assert figures["false_per_1000km2"] <= budget  # the budget holds on the region it was set on
    assert figures["plants_found"] == stored["plain"]["found"]


def test_calibration_refusals(tmp_path, region, monkeypatch, capsys):
    _use(monkeypatch, HotMean())
    truth = str(region.manifest.parent / "truth.geojson")
    old = _checkpoint(tmp_path, prior=None)
    before = old.read_bytes()
    args = ["--manifest", str(region.manifest), "--plants", truth, "--out", str(tmp_path / "cal"), "--no-progress"]
    code, _, err = _cli(capsys, "calibrate", str(old), *args, "--fp-per-1000km2", "1")
    assert code == 2 and "records no training prior" in err and len(err.splitlines()) == 1
    assert old.read_bytes() == before
    (tmp_path / "new").mkdir()
    fresh = _checkpoint(tmp_path / "new")
    before = fresh.read_bytes()
    code, _, err = _cli(capsys, "calibrate", str(fresh), *args, "--fp-per-1000km2", "-1")
    assert code == 2 and "--fp-per-1000km2" in err
    # every site false: a stand-in scoring every chip 1 leaves no plant above any threshold the budget allows
    monkeypatch.setattr("fusionkern.scan.run.make_predictor", lambda *a, **k: _Inverse())
    code, _, err = _cli(capsys, "calibrate", str(fresh), *args, "--fp-per-1000km2", "0", "--verify", "none",
                        "--overwrite")  # fmt: skip
    assert code == 2 and "budget cannot be met" in err and len(err.splitlines()) == 1
    assert fresh.read_bytes() == before  # the checkpoint is untouched
    assert not (tmp_path / "cal" / "calibration.json").exists()


def test_calibration_pools_several_regions(tmp_path, region, monkeypatch, capsys):
    _use(monkeypatch, HotMean())
    # placed 300 km east of the first: regions calibrated together do not overlap
    other = make_demo_region(tmp_path / "other", REGION_PX, n_plants=2, n_confusers=6, seed=11, east_km=300.0)
    rows = [f"{p.lon},{p.lat}" for m in (region.manifest, other.manifest)
            for p in read_plants(m.parent / "truth.geojson")]  # fmt: skip
    plants = tmp_path / "plants.csv"  # the plants of both regions in one file
    plants.write_text("lon,lat\n" + "\n".join(rows) + "\n")
    records = []
    for name, manifests in (("one", [region.manifest]), ("two", [other.manifest]),
                            ("both", [region.manifest, other.manifest])):  # fmt: skip
        (tmp_path / name).mkdir()
        checkpoint, out = _checkpoint(tmp_path / name), tmp_path / f"cal-{name}"
        code, printed, err = _cli(capsys, "calibrate", str(checkpoint), "--manifest", *map(str, manifests),
                                  "--plants", str(plants), "--fp-per-1000km2", "25", "--out", str(out),
                                  "--verify", "none", "--no-progress")  # fmt: skip
        assert code == 0, err
        records.append(json.loads((out / "calibration.json").read_text()))
    one, two, both = (r["region"] for r in records)
    assert both["regions"] == 2 and "of 2 regions" in printed
    assert both["plants"] == one["plants"] + two["plants"] == len(rows) >= 2
    assert both["area_km2"] == pytest.approx(one["area_km2"] + two["area_km2"], abs=2e-3)  # each rounded to 1 m²
    assert both["sites"] == one["sites"] + two["sites"]
    assert both["false_allowed"] == int(25 * both["area_km2"] / 1000)
    assert records[2]["plain"]["false"] <= both["false_allowed"]  # the budget holds over the pooled regions
    assert (tmp_path / "cal-both" / "scan-1" / "scan.json").is_file()
    assert (tmp_path / "cal-both" / "scan-2" / "scan.json").is_file()


class _Inverse(HotMean):
    """High away from kilns, low on them: no budget can be met with a plant found."""

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        return (1.0 - super().__call__(chips)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------------------------------


def test_verifier_scores_recentred_chips_under_rotations(trained, region):
    from fusionkern.scan.grid import make_grid
    from fusionkern.scan.inputs import load_inputs
    from fusionkern.scan.tiles import StackReader, scale_chips

    model = load_checkpoint(trained / "split_0" / "best.pt")
    verifier = decide.Verifier(sorted(trained.glob("split_*/best.pt")), model)
    inputs = load_inputs(manifest=str(region.manifest), calibrate=False)
    grid = make_grid(inputs.reference)
    layout = ChipLayout(CHIP, 17, 18, 18)
    x0, y0 = grid.affine * (100.5, 100.5)
    with StackReader(inputs, grid, layout) as reader:
        raw, valid = decide.recentred_chips(reader, grid, CHIP, [(x0, y0), grid.affine * (2, 2)], scale=False)
        chips, _ = decide.recentred_chips(reader, grid, CHIP, [(x0, y0)])
    assert valid.tolist() == [True, False]  # a chip leaving the region cannot be verified
    odds = verifier.log_odds(raw[valid])
    # by hand: both members, four quarter turns each, cement minus landcover logits, averaged
    np.testing.assert_array_equal(scale_chips(raw[:1]), chips)  # the members scale as the scan does
    x = torch.from_numpy(chips[:1])
    total = 0.0
    for path in sorted(trained.glob("split_*/best.pt")):
        member = load_checkpoint(path)
        views = [torch.rot90(x, k, (-2, -1)) for k in range(4)]
        with torch.no_grad():
            logits = torch.cat([member(member.prepare(v)) for v in views]).double()
        total += float((logits[:, 0] - logits[:, 1]).mean())
    assert odds[0] == pytest.approx(total / 2, rel=1e-5)


def _physical_checkpoint(folder: Path, seed: int = 5) -> Path:
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"prior": {"cement": 0.3}, "scaling": "physical-units"}
    return save_checkpoint(FusionNet(preset="native", width=0.25), folder / "best.pt", data=data)


def test_a_physical_units_member_scores_the_bands_in_their_units(tmp_path, trained, region):
    """A member trained with --scaling physical verifies on the calibrated bands scaled by physical_scale, beside
    a min-max member on the same chips; the scan itself refuses it, saying where it belongs."""
    from fusionkern.data.transforms import physical_scale
    from fusionkern.scan.backends import load_scan_model
    from fusionkern.scan.grid import make_grid
    from fusionkern.scan.inputs import load_inputs
    from fusionkern.scan.tiles import StackReader, scale_chips

    physical = _physical_checkpoint(tmp_path / "verifier")
    with pytest.raises(CheckpointError, match="physical-units.*--verify"):
        load_scan_model(physical)
    reference = load_checkpoint(trained / "split_0" / "best.pt")
    verifier = decide.Verifier([trained / "split_0" / "best.pt", physical], reference)
    assert verifier.scalings == ["minmax", "physical"]
    assert verifier.offsets[1] == pytest.approx(decide.logit(0.6) - decide.logit(0.3))
    inputs = load_inputs(manifest=str(region.manifest))
    grid = make_grid(inputs.reference)
    points = [grid.affine * (60.5, 80.5), grid.affine * (200.5, 150.5)]
    with StackReader(inputs, grid, ChipLayout(CHIP, 17, 18, 18)) as reader:
        raw, valid = decide.recentred_chips(reader, grid, CHIP, points, scale=False)
    assert valid.all() and np.isfinite(raw).all()
    odds = verifier.log_odds(raw)

    def by_hand(path: Path, chips: np.ndarray) -> np.ndarray:
        member = load_checkpoint(path)
        x = torch.from_numpy(chips)
        with torch.no_grad():
            logits = torch.stack([member(member.prepare(torch.rot90(x, k, (-2, -1)))) for k in range(4)]).double()
        return (logits[..., 0] - logits[..., 1]).mean(0).numpy()

    scaled = np.stack([physical_scale(raw[:, k], b) for k, b in enumerate(BRANCHES)], 1)
    assert scaled[:, :2].min() < 0.0 < scaled[:, :2].max()  # kelvin about the median, not squeezed into [0, 1]
    want = (by_hand(trained / "split_0" / "best.pt", scale_chips(raw)) + by_hand(physical, scaled)
            + verifier.offsets[1]) / 2  # fmt: skip
    np.testing.assert_allclose(odds, want, rtol=1e-5, atol=1e-6)
    assert [c["scaling"] for c in verifier.describe()["checkpoints"]] == ["minmax", "physical"]


def test_a_physicsnet_member_verifies_but_does_not_scan(tmp_path, trained, region):
    from fusionkern.data.transforms import physical_scale
    from fusionkern.models import PhysicsNet
    from fusionkern.scan.backends import load_scan_model
    from fusionkern.scan.grid import make_grid
    from fusionkern.scan.inputs import load_inputs
    from fusionkern.scan.tiles import StackReader

    torch.manual_seed(3)
    path = save_checkpoint(PhysicsNet(width=0.25), tmp_path / "physics.pt",
                           data={"scaling": "physical-units", "prior": {"cement": 0.5}})  # fmt: skip
    with pytest.raises(CheckpointError, match="expected a FusionNet"):
        load_scan_model(path)
    verifier = decide.Verifier([path], load_checkpoint(trained / "split_0" / "best.pt"))
    inputs = load_inputs(manifest=str(region.manifest))
    grid = make_grid(inputs.reference)
    with StackReader(inputs, grid, ChipLayout(CHIP, 17, 18, 18)) as reader:
        raw, valid = decide.recentred_chips(reader, grid, CHIP, [grid.affine * (150.5, 90.5)], scale=False)
    member = load_checkpoint(path)
    x = torch.from_numpy(np.stack([physical_scale(raw[:, k], b) for k, b in enumerate(BRANCHES)], 1))
    with torch.no_grad():
        logits = torch.stack([member(torch.rot90(x, k, (-2, -1))) for k in range(4)]).double()
    want = (logits[..., 0] - logits[..., 1]).mean(0).numpy() + decide.logit(0.6) - decide.logit(0.5)
    np.testing.assert_allclose(verifier.log_odds(raw), want, rtol=1e-5, atol=1e-6)


def test_scan_uses_the_verifier_the_calibration_recorded(tmp_path, trained):
    from fusionkern.scan.calibrate import store_calibration

    folder = tmp_path / "run" / "split_0"
    folder.mkdir(parents=True)
    path = folder / "best.pt"
    path.write_bytes((trained / "split_0" / "best.pt").read_bytes())
    physical = _physical_checkpoint(tmp_path / "verifier")
    store_calibration(path, {"prior": 0.01, "fp_per_1000km2": 1.0, "plain": {"threshold": 0.4},
                             "verified": {"threshold": 0.2, "checkpoints": [str(physical)]}})  # fmt: skip
    model = load_checkpoint(path)
    decision = decide.resolve_decision(model, path)
    assert decision.verify == [physical] and decision.threshold == 0.2
    physical.unlink()  # gone: its threshold would not hold for another verifier
    with pytest.raises(InputError, match="gone"):
        decide.resolve_decision(model, path)
    assert decide.resolve_decision(model, path, verify="none").threshold == 0.4
    # a training folder moved whole: the split checkpoints it recorded are found beside the checkpoint
    store_calibration(path, {"prior": 0.01, "fp_per_1000km2": 1.0, "plain": {"threshold": 0.4},
                             "verified": {"threshold": 0.2, "checkpoints": ["/elsewhere/split_0/best.pt"]}})
    assert decide.resolve_decision(load_checkpoint(path), path).verify == [path.resolve()]


def test_recentred_chips_come_back_in_the_order_asked_whatever_the_threads(region):
    from fusionkern.scan.grid import make_grid
    from fusionkern.scan.inputs import load_inputs
    from fusionkern.scan.tiles import StackReader

    inputs = load_inputs(manifest=str(region.manifest), calibrate=False)
    grid = make_grid(inputs.reference)
    layout = ChipLayout(CHIP, 17, 18, 18)
    rng = np.random.default_rng()
    cells = rng.uniform(CHIP, min(grid.width, grid.height) - CHIP, (9, 2))
    points = [grid.affine * (c, r) for r, c in cells] + [grid.affine * (2, 2)]  # the last leaves the region
    with StackReader(inputs, grid, layout) as reader:
        want, want_valid = decide.recentred_chips(reader, grid, CHIP, points)
    for threads in (1, 2, 3):
        chips, valid = decide.read_recentred(inputs, grid, layout, points, threads=threads)
        np.testing.assert_array_equal(valid, want_valid)
        np.testing.assert_array_equal(chips, want)
    assert want_valid[:-1].all() and not want_valid[-1]


def test_verifier_removes_candidates_it_rejects(tmp_path, region, trained, monkeypatch):
    """A scan with a verifier keeps only the candidates the ensemble scores above the threshold: with an ensemble
    that accepts only chips near the planted plants, the false sites of the first pass go."""
    _use(monkeypatch, HotMean())
    truth = read_plants(region.manifest.parent / "truth.geojson")
    from rasterio.warp import transform

    plain = run_scan(ScanOptions(checkpoint=str(trained / "split_0" / "best.pt"), out=str(tmp_path / "plain"),
                                 manifest=str(region.manifest), threshold=0.3, progress=False, checksums=False))
    grid = plain.grid
    xs, ys = transform("EPSG:4326", grid.crs, [p.lon for p in truth], [p.lat for p in truth])

    def near_plant(self, chips):  # the stand-in ensemble: recentred chips are judged by where they were cut
        return np.array([8.0 if ok else -8.0 for ok in self._near], dtype=np.float64)

    original = decide.read_recentred

    def recentred(inputs, grid_, layout, points, threads=2, scale=True):
        chips, valid = original(inputs, grid_, layout, points, threads, scale)
        near = [min(math.hypot(x - px, y - py) for px, py in zip(xs, ys)) < 600 for x, y in points]
        decide.Verifier._near = [n for n, v in zip(near, valid) if v]
        return chips, valid

    monkeypatch.setattr(decide, "read_recentred", recentred)
    monkeypatch.setattr(decide.Verifier, "log_odds", near_plant)
    verified = run_scan(ScanOptions(checkpoint=str(trained / "split_0" / "best.pt"), out=str(tmp_path / "ver"),
                                    manifest=str(region.manifest), threshold=0.5, verify="auto",
                                    candidate_threshold=0.3, progress=False, checksums=False))  # fmt: skip
    plants = np.array([[p.lon, p.lat] for p in truth])
    from fusionkern.scan_demo import evaluation_detections

    before = evaluate_detections(evaluation_detections(plain.detections), plants)
    after = evaluate_detections(evaluation_detections(verified.detections), plants)
    assert before["false_detections"] > 0  # the first pass has false sites to remove
    assert after["false_detections"] == 0 and after["plants_found"] == before["plants_found"]
    assert all(d.verifier_score is not None for d in verified.detections)
    report = json.loads((tmp_path / "ver" / "scan.json").read_text())
    cap = report["verifier"]["candidate_cap"]
    assert cap == 10 and report["verifier"]["candidates"] == min(len(plain.detections), cap)  # the best first
    assert report["verifier"]["views"] == 4


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def _square(lon: float, lat: float, half_deg: float) -> list[np.ndarray]:
    ring = np.array([[lon - half_deg, lat - half_deg], [lon + half_deg, lat - half_deg],
                     [lon + half_deg, lat + half_deg], [lon - half_deg, lat + half_deg],
                     [lon - half_deg, lat - half_deg]])  # fmt: skip
    return [ring]


def test_distance_to_footprints_by_hand():
    square = _square(0.0, 0.0, 0.01)  # about 2.2 km a side at the equator
    assert distance_m(0.0, 0.0, square) == 0.0
    assert distance_m(0.02, 0.0, square) == pytest.approx(0.01 * 111_195, rel=1e-3)  # to the east edge
    assert distance_m(0.02, 0.02, square) == pytest.approx(math.hypot(0.01, 0.01) * 111_195, rel=1e-3)
    assert distance_m(0.0, 0.0, [np.array([[0.0, 0.005]])]) == pytest.approx(0.005 * 111_195, rel=1e-3)


def test_evaluation_math_on_hand_made_cases():
    plants = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    detections = [
        Detection(0.9, _square(0.0, 0.0, 0.002), {}),  # finds plant 0
        Detection(0.8, _square(0.0, 0.003, 0.002), {}),  # a second detection of plant 0 (within 600 m): duplicate
        Detection(0.7, _square(1.0, 1.0 + 0.007, 0.002), {}),  # edge 556 m from plant 1: found
        Detection(0.6, _square(5.0, 5.0, 0.002), {}),  # nothing near: false
    ]
    figures = evaluate_detections(detections, plants, match_m=600.0, area_km2=2000.0)
    assert (figures["true_detections"], figures["false_detections"], figures["duplicates"]) == (2, 2, 1)
    assert figures["recall"] == pytest.approx(2 / 3) and figures["precision"] == pytest.approx(0.5)
    assert figures["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert figures["false_per_1000km2"] == pytest.approx(1.0)
    assert [round(c["precision"], 3) for c in figures["curve"]] == [1.0, 0.5, 0.667, 0.5]
    assert [round(c["recall"], 3) for c in figures["curve"]] == [0.333, 0.333, 0.667, 0.667]
    tighter = evaluate_detections(detections, plants, match_m=500.0)
    assert tighter["plants_found"] == 1 and tighter["false_per_1000km2"] is None


def test_evaluate_command_writes_its_outputs(tmp_path, capsys):
    detections = {"type": "FeatureCollection", "fusionkern": {"area_km2": 500.0}, "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(10.0, 50.0, 0.004)[0].tolist()]},
         "properties": {"score": 0.9, "peak_lon": 10.0, "peak_lat": 50.0}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [11.0, 50.0]}, "properties": {"score": 0.4}},
    ]}  # fmt: skip
    path = tmp_path / "detections.geojson"
    path.write_text(json.dumps(detections))
    truth = tmp_path / "truth.csv"
    truth.write_text("lon,lat,name\n10.001,50.001,a\n12.0,50.0,b\n")
    code, printed, err = _cli(capsys, "evaluate", str(path), "--truth", str(truth), "--out", str(tmp_path / "ev"))
    assert code == 0, err
    assert "recall 50 %" in printed and "precision 50 %" in printed and "2 per 1000 km²" in printed
    figures = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert figures["plants_found"] == 1 and figures["false_per_1000km2"] == pytest.approx(2.0)
    missed = json.loads((tmp_path / "ev" / "missed.geojson").read_text())["features"]
    assert [f["properties"]["name"] for f in missed] == ["b"]
    assert (tmp_path / "ev" / "pr_curve.png").stat().st_size > 0
    found, _ = read_detections(path)
    assert [d.score for d in found] == [0.9, 0.4]


def test_evaluate_refuses_an_empty_detections_file(tmp_path, capsys):
    path = tmp_path / "detections.geojson"
    path.write_text("")
    truth = tmp_path / "truth.csv"
    truth.write_text("lon,lat\n10,50\n")
    code, _, err = _cli(capsys, "evaluate", str(path), "--truth", str(truth), "--out", str(tmp_path / "ev"))
    assert code == 2 and err.startswith("error:") and "is empty" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ev").exists()


# --------------------------------------------------------------------------------------------------------------
# The precision ceiling
# --------------------------------------------------------------------------------------------------------------


def test_oracle_ceiling_from_the_generator(region):
    truth = json.loads((region.manifest.parent / "truth.geojson").read_text())["features"]
    plants = [f["properties"] for f in truth if f["properties"]["kind"] == "cement"]
    assert plants and all(2.5 <= p["kiln_k"] <= 15.0 and 0.2 <= p["dust"] <= 1.0 for p in plants)
    # hot dusty works are cement for sure, lukewarm less dusty ones are ambiguous with industry
    assert oracle_score(12.0, 0.9) > oracle_score(7.0, 0.6) > 0
    ceiling = expected_ceiling(12, 32)
    assert 0.2 < ceiling["industry_pass_rate"] < 0.25 and 0.9 < ceiling["precision"] < 0.97
    assert expected_ceiling(12, 96)["precision"] < ceiling["precision"]
    assert region_ceiling(region.manifest.parent / "truth.geojson")["plants"] == len(plants)


def test_works_draws_follow_the_generator():
    from fusionkern.data import synthetic

    rng = np.random.default_rng(5)
    drawn = {"cement": [], "industry": []}
    for _ in range(300):
        for kind, add in (("cement", synthetic._add_plant), ("industry", synthetic._add_other_industry)):
            surface = synthetic._Surface(*(np.zeros((1, 24, 24)) for _ in range(5)), works=[])
            add(rng, 24, np.array([11.5, 11.5]), surface)
            drawn[kind].append(surface.works[0])
    (k0, k1), (d0, d1) = WORKS_DRAWS["industry"]
    kiln, dust = np.array(drawn["industry"]).T
    assert k0 <= kiln.min() < k0 + 0.2 and k1 - 0.2 < kiln.max() <= k1 and d0 <= dust.min() and dust.max() <= d1
    kiln, dust = np.array(drawn["cement"]).T
    cool = kiln < WORKS_DRAWS["cement_hot"][0][0]
    for kind, mask in (("cement_cool", cool), ("cement_hot", ~cool)):
        (k0, k1), (d0, d1) = WORKS_DRAWS[kind]
        assert np.all((kiln[mask] >= k0) & (kiln[mask] <= k1) & (dust[mask] >= d0) & (dust[mask] <= d1)), kind
    assert 0.12 < cool.mean() < 0.28


def test_goals_by_hand():
    # 12 plants: 11 found is 92 % recall; 11 of 14 detections is 79 % precision, 12 of 15 is 80 %
    found, false = np.array([12, 11, 11, 12, 10, 0]), np.array([3, 2, 3, 4, 0, 0])
    assert meets_goals(found, false, 12).tolist() == [True, True, False, False, False, False]
    assert meets_goals(1, 0, 1) and not meets_goals(0, 0, 1)


def test_goal_odds_fall_with_look_alike_density():
    free = goal_odds(12, 0, regions=500)
    assert free["odds_fixed"] == 1.0 and free["odds_any"] == 1.0  # nothing to pass: keep every plant
    sparse, dense = goal_odds(12, 16, regions=2000), goal_odds(12, 96, regions=2000)
    assert dense["odds_fixed"] < sparse["odds_fixed"] and dense["odds_any"] < sparse["odds_any"]
    for odds in (sparse, dense):
        assert odds["odds_fixed"] <= odds["odds_any"]  # a threshold set beforehand never beats each region's own
    assert 0.5 < dense["odds_fixed"] < 0.7 and dense["industry_expected"] == pytest.approx(96 * 0.08)
    assert goal_odds(12, 96, regions=2000, seed=3) != dense  # drawn, not a fixed answer
    blind = goal_odds(12, 64, regions=2000, scorer=lambda kiln, dust, rng: rng.random(np.shape(kiln)))
    assert blind["odds_fixed"] < goal_odds(12, 64, regions=2000)["odds_fixed"]  # a scorer that sees nothing does worse
    with pytest.raises(ConfigError, match="n_plants"):
        goal_odds(0, 32)


def test_region_meets_goals_counts_its_own_draws(tmp_path):
    features = [{"type": "Feature", "geometry": None, "properties": props} for props in (
        [{"kind": "cement", "kiln_k": 12.0, "dust": 0.9}] * 4
        + [{"kind": "cement", "kiln_k": 3.0, "dust": 0.3}]  # cool plant: scores below a hot one
        + [{"kind": "lookalike", "industry": True, "kiln_k": 8.0, "dust": 0.65},
           {"kind": "lookalike", "industry": True, "kiln_k": 4.0, "dust": 0.6}])]  # fmt: skip
    truth = tmp_path / "truth.geojson"
    truth.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    cool, overlap = float(oracle_score(3.0, 0.3)), float(oracle_score(8.0, 0.65))
    assert oracle_score(4.0, 0.6) < 1e-6 and overlap < cool  # the second works lies outside cement's draws
    assert region_meets_goals(truth, cool + 1e-9) == {"plants": 5, "found": 4, "false": 0, "meets": False}
    assert region_meets_goals(truth, cool) == {"plants": 5, "found": 5, "false": 0, "meets": True}
    assert region_meets_goals(truth, overlap) == {"plants": 5, "found": 5, "false": 1, "meets": True}


def test_candidates_reach_below_every_plant_within_a_cap():
    from fusionkern.scan.calibrate import CANDIDATE_MARGIN, pick_candidates

    scores = np.array([0.9, 0.5, 0.3, 0.02, 0.01, 0.005, 0.001])
    plants = [{0}, set(), set(), {1}, set(), set(), set()]
    threshold = pick_candidates(scores, plants, budget=0.0, area_km2=1000.0, n_plants=2)
    weakest = decide.sigmoid(decide.logit(0.02) - CANDIDATE_MARGIN)  # below the weakest plant site by the margin
    assert threshold == pytest.approx(weakest) and threshold < 0.02
    capped = pick_candidates(scores, plants, budget=0.0, area_km2=100.0, n_plants=2)  # at most 2 candidates
    assert (scores >= capped).sum() == 2


def test_scan_verifies_as_the_calibration_did(tmp_path, trained):
    from fusionkern.scan.calibrate import store_calibration

    folder = tmp_path / "run"
    for k in range(2):
        (folder / f"split_{k}").mkdir(parents=True)
        (folder / f"split_{k}" / "best.pt").write_bytes((trained / f"split_{k}" / "best.pt").read_bytes())
    path = folder / "split_1" / "best.pt"
    store_calibration(path, {"prior": 0.01, "fp_per_1000km2": 1.0, "plain": {"threshold": 0.4},
                             "verified": {"threshold": 0.2, "candidate_threshold": 0.05}})  # fmt: skip
    model = load_checkpoint(path)
    as_calibrated = decide.resolve_decision(model, path)
    assert as_calibrated.verify == sorted(folder.glob("split_*/best.pt")) and as_calibrated.threshold == 0.2
    assert as_calibrated.candidate_threshold == 0.05 and as_calibrated.threshold_source == "calibration"
    plain = decide.resolve_decision(model, path, verify="none")
    assert plain.verify == [] and plain.threshold == 0.4 and plain.candidate_threshold is None
    moved = decide.resolve_decision(model, path, verify="none", prior=0.1)  # same decisions under another prior
    assert decide.logit(moved.threshold) - decide.logit(0.4) == pytest.approx(decide.logit(0.1) - decide.logit(0.01))
