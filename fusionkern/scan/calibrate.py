"""Thresholds set on real background at a false-detection budget (``fusionkern calibrate``).

The calibration scans a region whose plants are known (:func:`fusionkern.scan.run_scan`, nothing else reads the
chips), groups its chips into sites as the scan does (:func:`~fusionkern.scan.outputs.group_sites`), and calls
a site false when its peak chip does not come within ``match_m`` of a known plant that no higher-scoring site
found first. Sites false here are false in :mod:`fusionkern.evaluate` too, or right there by a wider footprint,
never the reverse. For a budget of ``B`` false detections per 1000 km² over ``A`` km², ``k = floor(B * A / 1000)``
false sites are allowed: the threshold must lie above the ``(k + 1)``-th highest false site. Every threshold
between that and the weakest plant site still found gives the same decisions on the calibration region; the one
stored is their midpoint in log-odds, so that a region nobody calibrated on has margin on both sides.

Both decision modes are calibrated in one run: ``plain`` (the chips' own probability) and, with a verifier,
``verified``: candidates are chosen for recall (:func:`pick_candidates`: below every plant site of the region by a
margin, within a cap on how many there are per 1000 km²), re-scored by the ensemble, and the threshold is set on
the verifier's score the same way. The thresholds, the deployment prior (estimated as the share of scored chips
that hold a known plant, or ``--prior``) and the budget are stored in the checkpoint's ``metadata.calibration``;
``fusionkern scan`` uses them by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fusionkern.errors import CheckpointError, ConfigError, InputError
from fusionkern.scan.decide import MAX_CANDIDATES_PER_1000KM2

CANDIDATE_BUDGET = 10.0
"""Candidates for the verifier reach down at least to the threshold of this many times the false-detection budget."""

CANDIDATE_MARGIN = 1.0
"""...and to this many log-odds below the weakest plant site of the calibration region (plants elsewhere score
lower or higher than these few; the first pass must not lose them)."""


_FLOOR = 1e-9  # sites scoring below this (at the deployment prior) are never detections


@dataclass
class CalibrateOptions:
    """What ``fusionkern calibrate`` takes.

    Attributes:
        checkpoint: The checkpoint to calibrate (rewritten with its calibration unless ``write`` is False).
        out: Folder for the calibration scan and ``calibration.json``.
        plants: The known plants of the region.
        budget: False detections allowed per 1000 km².
        scenes: Three scene folders (or ``manifest``).
        manifest: A manifest (or ``scenes``), or several: one region each, calibrated together (their sites,
            plants and areas pooled, one threshold for all), which steadies a threshold that one region's few
            false sites would set alone. Regions without a known plant count as background.
        prior: Deployment prior (None: estimated from the plants).
        verify: Verifier spec (``auto``, a path) or None for the plain mode only.
        match_m: A site is right when one of its chips comes within this many metres of a known plant.
        scan: Extra :class:`~fusionkern.scan.ScanOptions` values.
        write: Store the calibration in the checkpoint.
        overwrite: Replace a previous calibration scan in ``out``.
        progress: Progress bar.
    """

    checkpoint: str
    out: str
    plants: Sequence[Any]
    budget: float
    scenes: Sequence[str] | None = None
    manifest: str | Sequence[str] | None = None
    prior: float | None = None
    verify: str | None = "auto"
    match_m: float = 600.0
    scan: dict[str, Any] = field(default_factory=dict)
    write: bool = True
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raises ConfigError on values that cannot work."""
        if not (self.budget >= 0 and math.isfinite(self.budget)):
            raise ConfigError(f"--fp-per-1000km2 must be a number of false detections >= 0, got {self.budget}")
        if not self.match_m >= 0:
            raise ConfigError(f"--match-m must be >= 0 metres, got {self.match_m}")
        if not self.plants:
            raise InputError("no known plant given: calibration needs the plants of its region")


def site_plants(sites: Sequence[np.ndarray], pixels: np.ndarray, layout: Any, grid: Any, match_m: float) -> list[set]:
    """Per site, the known plants (indices into ``pixels``) that one of its chips comes within ``match_m`` of."""
    from fusionkern.scan.mine import near_plants

    near = near_plants(pixels, layout, grid, match_m)
    metres = grid.res * grid.metres_per_unit
    s, c = layout.stride_px, layout.chip_px
    out = []
    for cells in sites:
        hits: set = set()
        if near[cells[:, 0], cells[:, 1]].any():
            top, left = cells[:, 0:1] * s, cells[:, 1:2] * s  # (n, 1) chip squares against (1, p) plants
            dy = np.maximum(np.maximum(top - pixels[None, :, 0], pixels[None, :, 0] - (top + c)), 0.0)
            dx = np.maximum(np.maximum(left - pixels[None, :, 1], pixels[None, :, 1] - (left + c)), 0.0)
            close = (np.hypot(dy, dx) * metres <= match_m).any(axis=0)
            hits = set(int(p) for p in np.flatnonzero(close))
        out.append(hits)
    return out


def claim(scores: np.ndarray, plants: Sequence[set]) -> list[set]:
    """One-to-one matching by descending score, as :func:`fusionkern.evaluate.match` does: each site keeps the
    nearby plants no higher-scoring site found first; a site left with none is false (a duplicate of a found plant
    counts as false, as it does in the evaluation)."""
    found: set = set()
    out: list[set] = [set()] * len(plants)
    for k in sorted(range(len(plants)), key=lambda k: (-scores[k], k)):
        fresh = set(plants[k]) - found
        if fresh:
            first = {min(fresh)}
            out[k] = first
            found |= first
    return out


def pick_threshold(scores: np.ndarray, plants: Sequence[set], allowed: int, n_plants: int) -> dict[str, Any]:
    """The threshold that lets at most ``allowed`` false sites through and finds the most plants.

    Args:
        scores: Per site, its score.
        plants: Per site, the known plants it lies near (empty: a false site).
        allowed: False sites allowed.
        n_plants: Known plants of the region.

    Returns:
        ``threshold`` (the log-odds midpoint between the lowest threshold meeting the budget and the weakest
        plant site kept), ``lowest`` (that lowest threshold), ``false``, ``found``, ``recall``.

    Raises:
        InputError: No threshold meets the budget with a plant still found.
    """
    from fusionkern.scan.decide import logit, sigmoid

    scores = np.asarray(scores, dtype=np.float64)
    plants = claim(scores, plants)
    false = np.sort(scores[[not p for p in plants]])[::-1]
    lowest = float(np.nextafter(np.float32(false[allowed]), np.float32(np.inf))) if len(false) > allowed else _FLOOR
    kept = [k for k, p in enumerate(plants) if p and scores[k] >= lowest]
    if not kept:
        best = max((scores[k] for k, p in enumerate(plants) if p), default=None)
        raise InputError(
            f"the budget cannot be met with any plant still found: {allowed} false site(s) allowed, and the best "
            "plant site scores " + ("nothing" if best is None else f"{best:.3g}") + f", below the threshold "
            f"{lowest:.3g} the budget needs; raise --fp-per-1000km2, calibrate on a larger region or retrain "
            "with mined hard negatives"
        )
    weakest = min(scores[k] for k in kept)
    threshold = float(sigmoid(0.5 * (logit(lowest) + logit(weakest)))) if weakest > lowest else lowest
    found = set().union(*(plants[k] for k in kept))
    false_kept = int((false >= threshold).sum())
    return {"threshold": threshold, "lowest": lowest, "false": false_kept, "found": len(found),
            "recall": len(found) / n_plants if n_plants else None}  # fmt: skip


def calibrate(options: CalibrateOptions, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Scans the region, sets the thresholds and (by default) stores them in the checkpoint.

    Args:
        options: What to calibrate on.
        log: Receives progress lines.

    Returns:
        The calibration record (also written to ``<out>/calibration.json``).

    Raises:
        CheckpointError: A checkpoint without a recorded training prior.
        ConfigError: Invalid options.
        InputError: No known plant in the region, or a budget that cannot be met.
    """
    from fusionkern.scan import ScanOptions, run_scan
    from fusionkern.scan.backends import load_scan_model
    from fusionkern.scan.decide import check_prior, logit, shift_scores, training_prior
    from fusionkern.scan.mine import near_plants, plant_pixels
    from fusionkern.scan.outputs import group_sites, site_radius, MAX_SITE_M

    options.validate()
    model = load_scan_model(options.checkpoint)
    train_prior = training_prior(model)
    if train_prior is None:
        raise CheckpointError(f"{options.checkpoint} records no training prior (data.prior): retrain it with this "
                              "version of fusionkern train before calibrating")  # fmt: skip
    if options.prior is not None:
        check_prior(options.prior)
    out = Path(options.out)
    regions = _regions(options)
    scans = []
    for k, (scenes, manifest) in enumerate(regions):
        folder = out / ("scan" if len(regions) == 1 else f"scan-{k + 1}")
        scan_options = ScanOptions(
            checkpoint=options.checkpoint, out=str(folder), scenes=scenes, manifest=manifest, quicklook=False,
            checksums=False, progress=options.progress, overwrite=options.overwrite, threshold=1.0, **options.scan,
        )  # fmt: skip
        result = run_scan(scan_options, log=log)
        grid, layout, raw = result.grid, result.layout, result.raw_scores
        pixels = plant_pixels(options.plants, grid)
        inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < grid.height) & (pixels[:, 1] >= 0) & (pixels[:, 1] < grid.width)
        pixels = pixels[inside]
        scored = np.isfinite(raw)
        area = float(result.report["counts"]["area_km2"])  # the scan's own figure: one stride cell per scored chip
        holding = int((near_plants(pixels, layout, grid, 0.0) & scored).sum()) if len(pixels) else 0
        scans.append({"result": result, "pixels": pixels, "scored": int(scored.sum()), "area": area,
                      "holding": holding, "inputs": manifest or list(scenes or [])})  # fmt: skip
    n_plants = sum(len(r["pixels"]) for r in scans)
    if not n_plants:
        where = "region" if len(scans) == 1 else f"{len(scans)} regions"
        raise InputError(f"none of the {len(options.plants)} known plant(s) lies in the calibration {where}: "
                         "check --plants")  # fmt: skip
    area_km2, n_scored = sum(r["area"] for r in scans), sum(r["scored"] for r in scans)
    if options.prior is not None:
        prior, prior_source = float(options.prior), "option"
    else:
        prior, prior_source = sum(r["holding"] for r in scans) / n_scored, "share of scored chips holding a known plant"
        if not prior > 0:
            raise InputError("no scored chip holds a known plant, so the deployment prior cannot be estimated; "
                             "give --prior")  # fmt: skip
    shift = float(logit(prior) - logit(train_prior))
    allowed = int(math.floor(options.budget * area_km2 / 1000.0 + 1e-9))
    offset = 0
    for r in scans:  # sites of every region in one list; plant indices made unique across regions
        result = r["result"]
        r["scores"] = scores = shift_scores(result.raw_scores, shift)
        r["sites"] = group_sites(scores, _FLOOR, site_radius(result.layout, MAX_SITE_M, result.grid))
        r["site_scores"] = np.asarray([scores[c[0, 0], c[0, 1]] for c in r["sites"]], dtype=np.float64)
        # a site is judged by its peak chip: the scan's footprint at any threshold holds it (and perhaps more
        # chips), so a site false here may be right in the evaluation, never the other way round
        near = site_plants([c[:1] for c in r["sites"]], r["pixels"], result.layout, result.grid, options.match_m)
        r["near"] = [{offset + p for p in hits} for hits in near]
        offset += len(r["pixels"])
    site_scores = np.concatenate([r["site_scores"] for r in scans])
    near = [hits for r in scans for hits in r["near"]]
    plain = pick_threshold(site_scores, near, allowed, n_plants)
    log(f"plain: threshold {plain['threshold']:.4g}, {plain['false']} false site(s) over {area_km2:.0f} km², "
        f"{plain['found']}/{n_plants} plants")  # fmt: skip
    inputs = [r["inputs"] for r in scans]
    record: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fp_per_1000km2": options.budget, "match_m": options.match_m, "prior": prior, "prior_source": prior_source,
        "train_prior": train_prior,
        "region": {"area_km2": round(area_km2, 3), "plants": int(n_plants), "scored_chips": int(n_scored),
                   "sites": len(near), "false_allowed": allowed, "inputs": inputs[0] if len(inputs) == 1 else inputs,
                   "regions": len(scans)},
        "plain": {**plain, "false_per_1000km2": round(1000.0 * plain["false"] / area_km2, 4)},
    }  # fmt: skip
    if options.verify not in (None, "none"):
        record["verified"] = _calibrate_verified(options, model, scans, near, site_scores, allowed, n_plants,
                                                 area_km2, shift, log)  # fmt: skip
    from fusionkern.scan.outputs import write_json

    write_json(out / "calibration.json", record)
    if options.write:
        store_calibration(options.checkpoint, record)
    return record


def _calibrate_verified(options, model, scans, near, site_scores, allowed, n_plants, area_km2, shift, log):
    """Candidates chosen for recall, re-scored by the verifier as the scan does, then the threshold on its score."""
    from fusionkern.devices import resolve_device
    from fusionkern.scan.decide import Verifier, resolve_verifier
    from fusionkern.scan.outputs import peak_point

    candidate_threshold = pick_candidates(site_scores, near, options.budget, area_km2, n_plants)
    chosen = [k for k in range(len(site_scores)) if site_scores[k] >= candidate_threshold]
    paths = resolve_verifier(options.verify, options.checkpoint)
    verifier = Verifier(paths, model, resolve_device(str(options.scan.get("device", "auto"))))
    parts, first = [], 0
    for r in scans:  # each region's candidates, read from its own rasters
        result, sites = r["result"], r["sites"]
        mine = [k - first for k in chosen if first <= k < first + len(sites)]
        if mine:
            points = [peak_point(r["scores"], sites[k][0], result.layout, result.grid) for k in mine]
            parts.append(verifier.score(result.inputs, result.grid, result.layout, points, shift)[0])
        first += len(sites)
    verified = np.concatenate(parts) if parts else np.empty(0)
    verified = np.where(np.isfinite(verified), verified, site_scores[chosen])
    try:
        pick = pick_threshold(verified, [near[k] for k in chosen], allowed, n_plants)
    except InputError as exc:
        log(f"verified: no threshold ({exc}); scans with --verify will use the default")
        return None
    log(f"verified: {len(chosen)} candidate(s) from chip probability {candidate_threshold:.4g}; threshold "
        f"{pick['threshold']:.4g}, {pick['false']} false, {pick['found']}/{n_plants} plants")  # fmt: skip
    candidate_found = set().union(*(near[k] for k in chosen)) if chosen else set()
    return {**pick, "candidate_threshold": candidate_threshold, "candidates": len(chosen),
            "candidate_recall": len(candidate_found) / n_plants if n_plants else None,
            "false_per_1000km2": round(1000.0 * pick["false"] / area_km2, 4),
            "checkpoints": [str(Path(p).resolve()) for p in paths]}  # fmt: skip


def _regions(options: CalibrateOptions) -> list[tuple[Sequence[str] | None, str | None]]:
    """``(scenes, manifest)`` of each calibration region."""
    if options.manifest is None or isinstance(options.manifest, (str, Path)):
        return [(options.scenes, None if options.manifest is None else str(options.manifest))]
    return [(None, str(m)) for m in options.manifest]


def pick_candidates(scores: np.ndarray, plants: Sequence[set], budget: float, area_km2: float, n_plants: int) -> float:
    """The chip probability from which sites go to the verifier: recall first, cost bounded.

    The lower of the threshold meeting :data:`CANDIDATE_BUDGET` times the budget and :data:`CANDIDATE_MARGIN`
    log-odds below the weakest plant site, raised where needed to keep at most :data:`MAX_CANDIDATES_PER_1000KM2`.

    Args:
        scores: Per site, its chip probability.
        plants: Per site, the plants it lies near.
        budget: False detections allowed per 1000 km².
        area_km2: The region's scanned area.
        n_plants: Known plants of the region.
    """
    from fusionkern.scan.decide import logit, sigmoid

    loose = int(math.floor(CANDIDATE_BUDGET * budget * area_km2 / 1000.0 + 1e-9))
    try:
        threshold = pick_threshold(scores, plants, loose, n_plants)["lowest"]
    except InputError:
        threshold = 1.0
    claimed = [scores[k] for k, p in enumerate(claim(scores, plants)) if p]
    if claimed:
        threshold = min(threshold, float(sigmoid(logit(min(claimed)) - CANDIDATE_MARGIN)))
    cap = int(math.ceil(MAX_CANDIDATES_PER_1000KM2 * area_km2 / 1000.0))
    ranked = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if len(ranked) > cap:
        threshold = max(threshold, float(np.nextafter(np.float32(ranked[cap]), np.float32(np.inf))))
    return max(threshold, _FLOOR)


def store_calibration(checkpoint: str | Path, record: dict[str, Any]) -> None:
    """Writes ``record`` into the checkpoint's ``metadata.calibration`` (atomically; weights untouched)."""
    from fusionkern.models.checkpoint import atomic_save, read_checkpoint

    payload = read_checkpoint(checkpoint)
    payload.setdefault("metadata", {})["calibration"] = record
    atomic_save(payload, checkpoint)
