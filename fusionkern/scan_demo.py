"""The scan part of ``fusionkern demo``: a synthetic region with plants planted at known places, scanned, scored.

The region is drawn with the physics of :mod:`fusionkern.data.synthetic` (the same functions, applied to one large
square instead of one chip): seasonal landcover over the whole region, cement works (kiln heat sustained in all
dates, dry dusty halo raising B7 over B6) at known places, and look-alikes elsewhere (one-date fires, dry fields,
towns, other hot industry). It is written as twelve GeoTIFFs (b10, b11, b7, b6 in three dates) in UTM zone 50N with
a manifest, scanned with :func:`fusionkern.scan.run_scan`, and the detections are compared with the planted truth:
a plant is found when a detection's chips cover it; a detection is right when its chips cover a plant.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fusionkern.data import synthetic
from fusionkern.errors import ConfigError

DEMO_CRS = "EPSG:32650"
DEMO_ORIGIN = (420_000.0, 3_480_000.0)
"""West and north edge of the demo region in UTM 50N metres (about 117.2 E, 31.4 N, eastern China)."""


@dataclass
class DemoRegion:
    """A written synthetic region.

    Attributes:
        manifest: The manifest listing its rasters.
        plants: (n, 2) float (row, col) pixel positions of the planted cement works.
        confusers: (m, 2) float (row, col) centres of the windows given look-alikes (some drew none).
        size_px: Side of the region in pixels.
        plant_works: Per plant, the (kiln K, dust) the generator drew.
        industry_works: Per look-alike window, the (kiln K, dust) of its other heavy industry, or None.
    """

    manifest: Path
    plants: np.ndarray
    confusers: np.ndarray
    size_px: int
    plant_works: list[tuple[float, float]] | None = None
    industry_works: list[tuple[float, float]] | None = None


def _scatter(rng: np.random.Generator, n: int, size: int, margin: int, spacing: float, avoid: np.ndarray) -> np.ndarray:
    """Up to ``n`` random (row, col) points at least ``spacing`` from each other and from ``avoid``."""
    points: list[np.ndarray] = []
    taken = [np.asarray(p, dtype=np.float64) for p in avoid]
    for _ in range(n * 50):
        if len(points) == n:
            break
        p = rng.uniform(margin, size - margin, 2)
        if all(np.hypot(*(p - q)) >= spacing for q in taken):
            points.append(p)
            taken.append(p)
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


def _window(surface: synthetic._Surface, centre: np.ndarray, half: int) -> tuple[synthetic._Surface, np.ndarray]:
    """A square sub-surface (views: drawing on it draws on the region) and the centre in its coordinates."""
    r0, c0 = (int(round(v)) - half for v in centre)
    rows, cols = slice(r0, r0 + 2 * half), slice(c0, c0 + 2 * half)
    views = (a[:, rows, cols] for a in (surface.veg, surface.moist, surface.heat, surface.add_b6, surface.add_b7))
    return synthetic._Surface(*views), centre - np.array([r0, c0], dtype=np.float64)


def make_demo_region(
    folder: str | Path,
    size_px: int = 2048,
    n_plants: int = 12,
    n_confusers: int = 32,
    seed: int = 0,
    chip_px: int = 35,
    dates: Sequence[str] = ("2018-01", "2017-01", "2017-04"),
    east_km: float = 0.0,
) -> DemoRegion:
    """Draws and writes a synthetic region with plants at known places.

    Args:
        folder: Where the rasters, ``manifest.yaml`` and ``truth.geojson`` go (created).
        size_px: Side of the square region in 30 m pixels.
        n_plants: Cement works planted (fewer if they do not fit at 5 km spacing).
        n_confusers: Windows given landcover look-alikes, at least 3 km from any plant.
        seed: Seed of everything.
        chip_px: The model's chip side; works and look-alikes are drawn on windows of twice that.
        dates: Three dates ``YYYY-MM``, in channel order (their months set the seasons).
        east_km: Places the region this far east of the default place (georeferencing only: what is drawn does
            not change), so that regions used together (e.g. calibrated together) do not overlap.

    Returns:
        The region.

    Raises:
        ConfigError: A region too small for a chip margin, or dates that are not three ``YYYY-MM``.
    """
    months = synthetic._check_args(1, 1, chip_px, dates)
    if size_px < 8 * chip_px:
        raise ConfigError(f"the demo region needs at least {8 * chip_px} px a side, got {size_px}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    veg, moist = synthetic._land_surface(rng, size_px, months)
    surface = synthetic._Surface(veg, moist, np.zeros_like(veg), np.zeros_like(veg), np.zeros_like(veg))
    half, margin = chip_px, 2 * chip_px
    plants = _scatter(rng, n_plants, size_px, margin, spacing=5000.0 / synthetic.PIXEL_M, avoid=np.empty((0, 2)))
    confusers = _scatter(rng, n_confusers, size_px, margin, spacing=3000.0 / synthetic.PIXEL_M, avoid=plants)
    plant_works, industry_works = [], []
    for centre in plants:
        window, local = _window(surface, centre, half)
        window.works = []  # records what is drawn; draws nothing itself
        synthetic._add_plant(rng, 2 * half, local, window)
        plant_works.append(window.works[0])
    for centre in confusers:
        window, local = _window(surface, centre, half)
        window.works = []
        synthetic._add_confusers(rng, 2 * half, local, window)
        industry_works.append(window.works[0] if window.works else None)
    lat = _region_latitude(size_px)
    rasters = {}
    b6, b7 = synthetic._reflectance(rng, surface)
    rasters["b7"], rasters["b6"] = b7.astype(np.float32), b6.astype(np.float32)
    del b6, b7
    b10, b11 = synthetic._brightness_temperature(rng, surface, months, lat)
    rasters["b10"], rasters["b11"] = b10.astype(np.float32), b11.astype(np.float32)
    del b10, b11, surface, veg, moist
    placed = _region_transform(1000.0 * east_km)
    manifest = _write_region(folder, rasters, dates, placed)
    _write_truth(folder / "truth.geojson", plants, confusers, plant_works, industry_works, placed)
    return DemoRegion(manifest, plants, confusers, size_px, plant_works, industry_works)


def _region_transform(east_m: float = 0.0) -> Any:
    """Pixel -> UTM transform of the region (its north-west corner is fixed, ``east_m`` east of the default)."""
    from rasterio.transform import from_origin

    return from_origin(DEMO_ORIGIN[0] + east_m, DEMO_ORIGIN[1], synthetic.PIXEL_M, synthetic.PIXEL_M)


def _region_latitude(size_px: int) -> float:
    """Latitude of the region's centre (it sets the synthetic climate)."""
    from rasterio.warp import transform

    x = DEMO_ORIGIN[0] + size_px * synthetic.PIXEL_M / 2
    y = DEMO_ORIGIN[1] - size_px * synthetic.PIXEL_M / 2
    _, (lat,) = transform(DEMO_CRS, "EPSG:4326", [x], [y])
    return float(lat)


def _write_region(folder: Path, rasters: dict[str, np.ndarray], dates: Sequence[str], placed: Any) -> Path:
    """One tiled, compressed float32 GeoTIFF per band and date, and the manifest listing them."""
    import rasterio
    import yaml

    size = next(iter(rasters.values())).shape[-1]
    profile = {
        "driver": "GTiff", "dtype": "float32", "count": 1, "width": size, "height": size, "crs": DEMO_CRS,
        "transform": placed, "nodata": float("nan"), "tiled": True, "blockxsize": 512,
        "blockysize": 512, "compress": "deflate", "predictor": 3,
    }  # fmt: skip
    manifest: dict[str, Any] = {"dates": list(dates)}
    for branch in ("b10", "b11", "b7", "b6"):
        manifest[branch] = []
        for index, date in enumerate(dates):
            name = f"{branch}_{date}.tif"
            with rasterio.open(folder / name, "w", **profile) as dst:
                dst.write(rasters[branch][index], 1)
                dst.set_band_description(1, f"{branch} {date}")
            manifest[branch].append(name)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def _lonlat(points: np.ndarray, placed: Any) -> tuple[list[float], list[float]]:
    """WGS 84 lon, lat of (row, col) pixel positions of the region placed by the transform ``placed``."""
    from rasterio.warp import transform

    xs, ys = placed * (points[:, 1], points[:, 0])
    return transform(DEMO_CRS, "EPSG:4326", list(xs), list(ys))


def _write_truth(
    path: Path, plants: np.ndarray, confusers: np.ndarray, plant_works: list, industry_works: list, placed: Any
) -> None:
    """The planted works and look-alike windows as GeoJSON points (with their pixel positions and, for hot works,
    the kiln heat and dust drawn)."""
    features = []
    for kind, points, works in (("cement", plants, plant_works), ("confuser", confusers, industry_works)):
        if not len(points):
            continue
        lons, lats = _lonlat(points, placed)
        for k, (lon, lat, (row, col), drawn) in enumerate(zip(lons, lats, points, works), start=1):
            properties = {"kind": kind, "id": k, "row": round(float(row), 2), "col": round(float(col), 2)}
            if drawn is not None:
                properties.update(kiln_k=round(drawn[0], 3), dust=round(drawn[1], 3), industry=kind != "cement")
            features.append({
                "type": "Feature", "geometry": {"type": "Point", "coordinates": [round(lon, 7), round(lat, 7)]},
                "properties": properties,
            })  # fmt: skip
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# Scanning and scoring
# --------------------------------------------------------------------------------------------------------------


def evaluation_detections(detections: Sequence[Any]) -> list[Any]:
    """A scan's detections as :mod:`fusionkern.evaluate` reads them back from GeoJSON."""
    from fusionkern.evaluate import Detection, _rings

    return [Detection(d.score, _rings(d.footprint), d.properties()) for d in detections]


def region_truth(region: DemoRegion) -> list[Any]:
    """The planted plants as :class:`fusionkern.data.chips.Plant` (read back from ``truth.geojson``)."""
    from fusionkern.data.chips import read_plants

    return read_plants(region.manifest.parent / "truth.geojson")


def _checkpoint(model_or_checkpoint: Any, out: Path) -> Path:
    from torch import nn

    if isinstance(model_or_checkpoint, nn.Module):
        from fusionkern.models import save_checkpoint

        return save_checkpoint(model_or_checkpoint, out / "scan_model.pt")
    return Path(model_or_checkpoint)


def run_scan_demo(
    out_dir: str | Path,
    model_or_checkpoint: Any,
    size_px: int = 2048,
    n_plants: int = 12,
    n_confusers: int = 32,
    seed: int = 0,
    threshold: float | None = None,
    verify: str | None = None,
    match_m: float = 600.0,
    workers: int = 2,
    batch_size: int = 256,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Builds a synthetic region, scans it with a trained FusionNet and evaluates the detections.

    Args:
        out_dir: Folder for ``region/`` (rasters, manifest, truth), ``scan/`` (the scan's outputs),
            ``evaluation/`` (``fusionkern evaluate``'s outputs) and ``scan_demo.json`` (the figures returned).
        model_or_checkpoint: A trained FusionNet, or the path of its checkpoint.
        size_px: Side of the region in 30 m pixels.
        n_plants: Plants planted.
        n_confusers: Windows given landcover look-alikes.
        seed: Seed of the region.
        threshold: Detection threshold (None: the checkpoint's calibrated one, else 0.5).
        verify: Verifier spec (``auto``...) or None.
        match_m: Matching distance of the evaluation, metres.
        workers: Reader threads of the scan.
        batch_size: Chips per model call.
        progress: Show the scan's progress bar.
        log: Receives the summary lines.

    Returns:
        ``{"region", "scan", "match", "seconds"}``: the region's size, the scan's counts, chips/s and decision,
        the evaluation (recall, precision, false detections per 1000 km²...) and the seconds spent.
    """
    from fusionkern.commands.evaluate import summary_lines
    from fusionkern.evaluate import evaluate_detections, plants_array, write_evaluation
    from fusionkern.scan import ScanOptions, run_scan

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    checkpoint = _checkpoint(model_or_checkpoint, out)
    region = make_demo_region(out / "region", size_px, n_plants, n_confusers, seed)
    t1 = time.perf_counter()
    log(f"synthetic region {size_px} x {size_px} px ({size_px * 0.03:.0f} km a side, seed {seed}) with "
        f"{len(region.plants)} plants and {len(region.confusers)} look-alike windows written in {t1 - t0:.0f} s")  # fmt: skip
    options = ScanOptions(
        checkpoint=str(checkpoint), out=str(out / "scan"), manifest=str(region.manifest), threshold=threshold,
        verify=verify, workers=workers, batch_size=batch_size, overwrite=True, progress=progress, checksums=False,
    )  # fmt: skip
    result = run_scan(options)
    t2 = time.perf_counter()
    plants = region_truth(region)
    detections = evaluation_detections(result.detections)
    area = result.report["counts"].get("area_km2")
    figures = evaluate_detections(detections, plants_array(plants), match_m, area)
    write_evaluation(out / "evaluation", figures, detections, plants)
    match = {k: v for k, v in figures.items() if not k.startswith("_") and k != "curve"}
    oracle, odds = None, goal_odds(len(region.plants), len(region.confusers)) if len(region.plants) else None
    if odds:  # the generator's oracle on this region's own draws
        industry = [w for w in region.industry_works or [] if w is not None]
        oracle = _oracle_at(_oracle_scores(region.plant_works), _oracle_scores(industry), odds["threshold"])
    timings = result.report["timings"]
    summary = {
        "region": {"size_px": size_px, "seed": seed, "plants": len(region.plants),
                   "lookalike_windows": len(region.confusers), "folder": str(out / "region")},  # fmt: skip
        "scan": {"folder": str(out / "scan"), **result.report["counts"], "decision": result.report["decision"],
                 "chips_per_s": timings["chips_per_s"]["end_to_end"], "scan_s": timings["engine_s"],
                 "verify_s": timings.get("verify_s")},  # fmt: skip
        "match": match,
        "oracle": oracle and {**oracle, "goal_odds": odds["odds_fixed"]},
        "seconds": {"region": round(t1 - t0, 1), "scan": round(t2 - t1, 1), "total": round(t2 - t0, 1)},
    }
    (out / "scan_demo.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    decision = result.report["decision"]
    verified = f", verified by {len(decision['verify'])} checkpoint(s)" if decision["verify"] else ""
    log(f"scan: {result.report['counts']['scored']} chips scored in {timings['engine_s']:.0f} s"
        + (f" + {timings['verify_s']:.1f} s verifying" if timings.get("verify_s") is not None else "")
        + f"; threshold {decision['threshold']:.3g} ({decision['threshold_source']}){verified}")  # fmt: skip
    for line in summary_lines(figures):
        log("  " + line)
    if oracle:
        log(f"  the generator's oracle at one threshold (kiln heat and dust as drawn): {oracle['found']}/"
            f"{oracle['plants']} plants, {oracle['false']} false here; it meets recall >= {GOALS['recall']:g} and "
            f"precision >= {GOALS['precision']:g} on {odds['odds_fixed']:.0%} of regions of this kind")  # fmt: skip
    return summary


# --------------------------------------------------------------------------------------------------------------
# The precision ceiling of the generator's look-alikes
# --------------------------------------------------------------------------------------------------------------

INDUSTRY_RATE = 0.08
"""Chance that a look-alike window of :func:`fusionkern.data.synthetic._add_confusers` holds other heavy industry."""


WORKS_DRAWS = {
    "cement_hot": ((5.0, 15.0), (0.5, 1.0)),
    "cement_cool": ((2.5, 5.0), (0.2, 0.45)),
    "industry": ((3.0, 9.0), (0.2, 0.7)),
}
"""(kiln K, dust) ranges the generator draws uniformly: :func:`fusionkern.data.synthetic._add_plant` (hot, or cool
with :data:`COOL_SHARE`) and ``_add_other_industry``."""

COOL_SHARE = 0.2
"""Share of cement plants the generator draws cool, with little dust."""


def _works_density(kiln: np.ndarray, dust: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Densities of (kiln K, dust) for cement works and for other heavy industry, as the generator draws them
    (:func:`fusionkern.data.synthetic._add_plant` and ``_add_confusers``)."""

    def box(x: np.ndarray, dust_x: np.ndarray, kind: str) -> np.ndarray:
        ((k0, k1), (d0, d1)) = WORKS_DRAWS[kind]
        return ((x >= k0) & (x <= k1)) / (k1 - k0) * ((dust_x >= d0) & (dust_x <= d1)) / (d1 - d0)

    cement = (1.0 - COOL_SHARE) * box(kiln, dust, "cement_hot") + COOL_SHARE * box(kiln, dust, "cement_cool")
    return cement, box(kiln, dust, "industry")


def _draw_works(rng: np.random.Generator, shape: tuple[int, ...], cement: bool) -> tuple[np.ndarray, np.ndarray]:
    """(kiln K, dust) of ``shape`` works drawn as the generator draws cement plants or other heavy industry."""

    def uniform(kind: str) -> tuple[np.ndarray, np.ndarray]:
        (k0, k1), (d0, d1) = WORKS_DRAWS[kind]
        return rng.uniform(k0, k1, shape), rng.uniform(d0, d1, shape)

    if not cement:
        return uniform("industry")
    cool = rng.random(shape) < COOL_SHARE
    (hot_k, hot_d), (cool_k, cool_d) = uniform("cement_hot"), uniform("cement_cool")
    return np.where(cool, cool_k, hot_k), np.where(cool, cool_d, hot_d)


def oracle_score(kiln: np.ndarray, dust: np.ndarray) -> np.ndarray:
    """An oracle's cement score of hot works from the kiln heat and dust the generator drew: the posterior at
    equal counts, with the hotter kiln first among ties (the best any detector can do on these two values)."""
    kiln, dust = np.asarray(kiln, dtype=np.float64), np.asarray(dust, dtype=np.float64)
    cement, industry = _works_density(kiln, dust)
    with np.errstate(invalid="ignore", divide="ignore"):
        posterior = np.where(cement + industry > 0, cement / (cement + industry), 0.0)
    return posterior + 1e-6 * kiln / 15.0


def expected_ceiling(n_plants: int, n_confusers: int, recall: float = 0.9, step: float = 0.005) -> dict[str, float]:
    """Expected precision of the oracle at ``recall`` on a region of the generator, other heavy industry being
    the only look-alike the oracle cannot tell apart (fires, fields and towns it rejects).

    Args:
        n_plants: Plants in the region.
        n_confusers: Look-alike windows in the region.
        recall: Share of plants the oracle must find.
        step: Integration step over kiln K (times 10) and dust.

    Returns:
        ``{"industry_expected", "industry_pass_rate", "precision"}``.
    """
    kiln, dust = np.meshgrid(np.arange(2.5, 15.0, 10 * step) + 5 * step, np.arange(0.2, 1.0, step) + step / 2)
    cement, industry = _works_density(kiln, dust)
    cell = 10 * step * step
    order = np.argsort(-oracle_score(kiln, dust), axis=None)
    mass_c, mass_i = cement.ravel()[order] * cell, industry.ravel()[order] * cell
    cut = int(np.searchsorted(np.cumsum(mass_c), recall * mass_c.sum())) + 1
    pass_rate = float(mass_i[:cut].sum() / mass_i.sum())
    expected = n_confusers * INDUSTRY_RATE
    found = recall * n_plants
    return {"industry_expected": expected, "industry_pass_rate": pass_rate,
            "precision": found / (found + expected * pass_rate)}  # fmt: skip


def _needed(plants: int, recall: float) -> int:
    """The fewest of ``plants`` plants that reach ``recall``."""
    return int(np.ceil(recall * plants - 1e-9))


def _oracle_scores(works: Sequence[tuple[float, float]]) -> np.ndarray:
    """:func:`oracle_score` of ``(kiln K, dust)`` pairs (an empty array for none)."""
    kiln, dust = np.asarray(works, dtype=np.float64).reshape(-1, 2).T
    return oracle_score(kiln, dust)


def _truth_scores(truth: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's scores of a written region's plants and of its works of other heavy industry."""
    features = json.loads(Path(truth).read_text(encoding="utf-8"))["features"]
    plants = [(f["properties"]["kiln_k"], f["properties"]["dust"]) for f in features
              if f["properties"]["kind"] == "cement"]  # fmt: skip
    industry = [(f["properties"]["kiln_k"], f["properties"]["dust"]) for f in features
                if f["properties"].get("industry")]  # fmt: skip
    return _oracle_scores(plants), _oracle_scores(industry)


def region_ceiling(truth: str | Path, recall: float = 0.9) -> dict[str, Any]:
    """The oracle's precision at ``recall`` on one written region, from the kiln heat and dust in its truth file.

    Returns:
        ``{"plants", "industry", "oracle_precision", "oracle_false"}``: the oracle keeps the fewest plants that
        reach ``recall`` by its score and counts the heavy industry scoring as high as the weakest kept.
    """
    plants, industry = _truth_scores(truth)
    need = _needed(len(plants), recall)
    if not need:
        return {"plants": len(plants), "industry": len(industry), "oracle_precision": None, "oracle_false": 0}
    weakest = np.sort(plants)[::-1][need - 1]
    false = int(np.sum(industry >= weakest))
    return {"plants": len(plants), "industry": len(industry), "oracle_precision": need / (need + false),
            "oracle_false": false}  # fmt: skip


GOALS = {"recall": 0.9, "precision": 0.8}
"""The detection goals a region is held to (both at once, at one threshold)."""


def meets_goals(found: np.ndarray, false: np.ndarray, plants: int, recall: float = GOALS["recall"],
                precision: float = GOALS["precision"]) -> np.ndarray:  # fmt: skip
    """Whether ``found`` of ``plants`` plants and ``false`` false detections meet both goals (elementwise)."""
    found, false = np.asarray(found), np.asarray(false)
    return (found >= max(_needed(plants, recall), 1)) & (found >= precision * (found + false) - 1e-9)


def goal_odds(
    n_plants: int, n_confusers: int, recall: float = GOALS["recall"], precision: float = GOALS["precision"],
    regions: int = 20000, seed: int = 0,
    scorer: Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> dict[str, float]:
    """How often the oracle meets both goals on regions drawn as :func:`make_demo_region` draws them: the region
    level ceiling, where :func:`expected_ceiling` gives the expected precision.

    Each simulated region holds ``n_plants`` plants and, per look-alike window, other heavy industry with chance
    :data:`INDUSTRY_RATE`, their kiln heat and dust drawn as the generator draws them; the oracle
    (:func:`oracle_score`) finds a plant or passes a works when its score reaches the threshold. Other look-alikes
    are taken as rejected, so these odds bound any detector from above.

    Args:
        n_plants: Plants per region (at least 1).
        n_confusers: Look-alike windows per region.
        recall: Recall goal.
        precision: Precision goal.
        regions: Regions simulated.
        seed: Seed of the simulation.
        scorer: ``scorer(kiln, dust, rng)`` scores works from their drawn kiln heat and dust instead of the
            oracle, e.g. an oracle that measures them with noise (None: :func:`oracle_score`).

    Returns:
        ``{"threshold", "odds_fixed", "odds_any", "industry_expected", "regions"}``: the one oracle threshold that
        meets both goals on the most regions and the share it meets them on, and the share of regions where some
        threshold of their own would (a bound that no threshold set beforehand reaches).

    Raises:
        ConfigError: No plants, negative windows or fewer than 100 regions.
    """
    if n_plants < 1 or n_confusers < 0 or regions < 100:
        raise ConfigError(f"goal_odds needs n_plants >= 1, n_confusers >= 0 and regions >= 100, got {n_plants}, "
                          f"{n_confusers}, {regions}")  # fmt: skip
    rng = np.random.default_rng(seed)
    score = scorer or (lambda kiln, dust, _: oracle_score(kiln, dust))
    plants = score(*_draw_works(rng, (regions, n_plants), cement=True), rng)
    counts = rng.binomial(n_confusers, INDUSTRY_RATE, regions)
    width = max(int(counts.max()), 1)
    industry = score(*_draw_works(rng, (regions, width), cement=False), rng)
    industry = np.where(np.arange(width) < counts[:, None], industry, -np.inf)

    def meets(thresholds: np.ndarray) -> np.ndarray:
        """Per region, whether both goals are met at that region's threshold."""
        t = thresholds[:, None]
        return meets_goals((plants >= t).sum(1), (industry >= t).sum(1), n_plants, recall, precision)

    candidates = np.unique(np.quantile(plants, np.linspace(0.0, 1.0, 201)))
    fixed = np.array([meets(np.full(regions, t)).mean() for t in candidates])
    best = int(np.argmax(fixed))
    ranked = -np.sort(-plants, axis=1)
    own = np.zeros(regions, dtype=bool)
    for kept in range(_needed(n_plants, recall), n_plants + 1):
        own |= meets(ranked[:, max(kept, 1) - 1])
    return {"threshold": float(candidates[best]), "odds_fixed": float(fixed[best]), "odds_any": float(own.mean()),
            "industry_expected": n_confusers * INDUSTRY_RATE, "regions": regions}  # fmt: skip


def region_meets_goals(truth: str | Path, threshold: float) -> dict[str, Any]:
    """The oracle at one fixed ``threshold`` (e.g. :func:`goal_odds`'s) on one written region's own draws.

    Returns:
        ``{"plants", "found", "false", "meets"}``.
    """
    return _oracle_at(*_truth_scores(truth), threshold)


def _oracle_at(plants: np.ndarray, industry: np.ndarray, threshold: float) -> dict[str, Any]:
    """:func:`region_meets_goals` from the oracle's scores of a region's plants and works of other industry."""
    found, false = int(np.sum(plants >= threshold)), int(np.sum(industry >= threshold))
    return {"plants": len(plants), "found": found, "false": false,
            "meets": bool(meets_goals(found, false, len(plants)))}  # fmt: skip
