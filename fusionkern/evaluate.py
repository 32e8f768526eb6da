"""Detections scored against known plants: recall, precision, false detections per area, a precision-recall curve.

Matching is one to one and greedy by score, as object-detection benchmarks do: detections are taken from the
highest score down; a detection is right when a known plant not yet found lies inside its footprint or within
``match_m`` metres of it, and that plant (the nearest such) is then found. A second detection of an already found
plant is a false detection (counted as a duplicate too), so splitting one site into several never raises precision.
Distances are geodesic to within a fraction of a percent at these ranges: each footprint is projected on the
plane tangent at the plant (equirectangular about it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fusionkern.errors import ConfigError, InputError

EARTH_RADIUS_M = 6_371_008.8
_M_PER_DEG = EARTH_RADIUS_M * math.pi / 180.0


@dataclass
class Detection:
    """A detection read back from a GeoJSON file.

    Attributes:
        score: Its score (``score`` property; 1 where absent).
        rings: Its footprint as rings of (lon, lat) (a point is one ring of one vertex).
        properties: All its properties.
    """

    score: float
    rings: list[np.ndarray]
    properties: dict[str, Any]


def read_detections(path: str | Path) -> tuple[list[Detection], dict[str, Any]]:
    """Reads a detections GeoJSON (``fusionkern scan``'s, or any FeatureCollection of polygons or points).

    Args:
        path: The file.

    Returns:
        The detections and the file's ``fusionkern`` metadata (empty where absent).

    Raises:
        InputError: Missing, empty or invalid file, or a feature without a usable geometry.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"detections file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"detections file {path} is empty: expected a GeoJSON FeatureCollection")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"detections file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        raise InputError(f"detections file {path} is not a GeoJSON FeatureCollection")
    detections = []
    for index, feature in enumerate(data.get("features") or []):
        geometry = (feature or {}).get("geometry") or {}
        rings = _rings(geometry)
        if not rings:
            raise InputError(f"{path}, feature {index}: no Polygon, MultiPolygon or Point geometry")
        properties = feature.get("properties") or {}
        score = properties.get("score")
        detections.append(Detection(float(score) if score is not None else 1.0, rings, properties))
    return detections, dict(data.get("fusionkern") or {})


def _rings(geometry: dict[str, Any]) -> list[np.ndarray]:
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    try:
        if kind == "Point":
            return [np.asarray([coords[:2]], dtype=np.float64)]
        if kind == "Polygon":
            return [np.asarray(ring, dtype=np.float64)[:, :2] for ring in coords]
        if kind == "MultiPolygon":
            return [np.asarray(ring, dtype=np.float64)[:, :2] for polygon in coords for ring in polygon]
    except (TypeError, ValueError, IndexError):
        return []
    return []


def distance_m(lon: float, lat: float, rings: Sequence[np.ndarray]) -> float:
    """Metres from a point to a footprint: 0 inside it, else to its nearest edge (or vertex, for a point).

    Rings after the first of a polygon are treated as parts to be inside of by the even-odd rule, which is the
    same for holes; a MultiPolygon's rings are all taken together, which is right for disjoint parts.
    """
    scale = math.cos(math.radians(lat)) * _M_PER_DEG
    planar = [np.column_stack([(r[:, 0] - lon) * scale, (r[:, 1] - lat) * _M_PER_DEG]) for r in rings]
    if len(planar) == 1 and len(planar[0]) == 1:
        return float(np.hypot(*planar[0][0]))
    inside = False
    best = math.inf
    for ring in planar:
        a, b = ring[:-1], ring[1:]
        if not len(a):
            best = min(best, float(np.hypot(*ring[0])))
            continue
        # even-odd crossing of the ray from the origin towards +x
        crosses = (a[:, 1] > 0) != (b[:, 1] > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = a[:, 0] + (0 - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
        inside ^= bool(np.count_nonzero(crosses & (x_at > 0)) % 2)
        d = b - a
        length2 = (d**2).sum(axis=1)
        t = np.clip(np.where(length2 > 0, -(a * d).sum(axis=1) / np.where(length2 > 0, length2, 1.0), 0.0), 0.0, 1.0)
        nearest = a + t[:, None] * d
        best = min(best, float(np.hypot(nearest[:, 0], nearest[:, 1]).min()))
    return 0.0 if inside else best


def match(detections: Sequence[Detection], plants: np.ndarray, match_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one greedy matching by descending score.

    Args:
        detections: The detections.
        plants: (n, 2) lon, lat of the known plants.
        match_m: Largest plant-to-footprint distance of a match, metres.

    Returns:
        ``order`` (detection indices by descending score), ``hit`` (per detection in that order: the plant index
        it found, -1 for a false detection, -2 for a duplicate of a found plant) and ``found`` (per plant: the
        rank at which it was found, -1 if never).
    """
    order = sorted(range(len(detections)), key=lambda k: (-detections[k].score, k))
    hit = np.full(len(order), -1, dtype=np.int64)
    found = np.full(len(plants), -1, dtype=np.int64)
    margin_lat = match_m / _M_PER_DEG
    for rank, k in enumerate(order):
        rings = detections[k].rings
        points = np.vstack(rings)
        lo, hi = points.min(axis=0), points.max(axis=0)
        margin_lon = margin_lat / max(math.cos(math.radians(float(np.clip(lo[1], -89, 89)))), 1e-6)
        near = np.flatnonzero(
            (plants[:, 0] >= lo[0] - margin_lon) & (plants[:, 0] <= hi[0] + margin_lon)
            & (plants[:, 1] >= lo[1] - margin_lat) & (plants[:, 1] <= hi[1] + margin_lat)
        )  # fmt: skip
        distances = {int(p): distance_m(plants[p, 0], plants[p, 1], rings) for p in near}
        within = [p for p, d in sorted(distances.items(), key=lambda item: item[1]) if d <= match_m]
        fresh = [p for p in within if found[p] < 0]
        if fresh:
            hit[rank] = fresh[0]
            found[fresh[0]] = rank
        elif within:
            hit[rank] = -2
    return np.asarray(order, dtype=np.int64), hit, found


def evaluate_detections(
    detections: Sequence[Detection], plants: np.ndarray, match_m: float = 600.0, area_km2: float | None = None
) -> dict[str, Any]:
    """Recall, precision, F1 and false detections per 1000 km², with the precision-recall curve.

    Args:
        detections: The detections.
        plants: (n, 2) lon, lat of the known plants.
        match_m: Matching distance, metres.
        area_km2: Area scanned (for the false-detection rate), or None.

    Returns:
        The figures; ``curve`` lists, per rank, the score and the recall and precision of the detections down to
        it.
    """
    if not match_m >= 0:
        raise ConfigError(f"--match-m must be a distance in metres >= 0, got {match_m}")
    order, hit, found = match(detections, plants, match_m)
    tp = int((hit >= 0).sum())
    n = len(detections)
    false = n - tp
    recall = tp / len(plants) if len(plants) else None
    precision = tp / n if n else None
    f1 = 2 * recall * precision / (recall + precision) if recall and precision else 0.0
    cum_tp = np.cumsum(hit >= 0)
    ranks = np.arange(1, n + 1)
    curve = [
        {"score": detections[int(k)].score, "recall": float(t / len(plants)) if len(plants) else None,
         "precision": float(t / r)}
        for k, t, r in zip(order, cum_tp, ranks)
    ]  # fmt: skip
    return {
        "plants": int(len(plants)),
        "detections": n,
        "true_detections": tp,
        "false_detections": false,
        "duplicates": int((hit == -2).sum()),
        "plants_found": int((found >= 0).sum()),
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "area_km2": area_km2,
        "false_per_1000km2": round(1000.0 * false / area_km2, 4) if area_km2 else None,
        "match_m": match_m,
        "curve": curve,
        "_hit": hit,
        "_order": order,
        "_found": found,
    }


def write_evaluation(
    out: str | Path,
    figures: dict[str, Any],
    detections: Sequence[Detection],
    plants: Sequence[Any],
) -> list[Path]:
    """Writes ``evaluation.json``, ``pr_curve.png``, ``missed.geojson`` and ``false_detections.geojson``.

    Args:
        out: Output folder (created).
        figures: What :func:`evaluate_detections` returned.
        detections: The detections evaluated.
        plants: The known plants (:class:`fusionkern.data.chips.Plant`).

    Returns:
        The files written.
    """
    from fusionkern.files import write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in figures.items() if not k.startswith("_")}
    written = []
    missed = [p for p, rank in zip(plants, figures["_found"]) if rank < 0]
    features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [p.lon, p.lat]},
                 "properties": {"name": p.name, "status": "missed"}} for p in missed]  # fmt: skip
    path = out / "missed.geojson"
    write_text_atomic(path, json.dumps({"type": "FeatureCollection", "features": features}) + "\n")
    written.append(path)
    false = [detections[int(k)] for k, h in zip(figures["_order"], figures["_hit"]) if h < 0]
    features = []
    for d in false:
        features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": _peak(d)},
                         "properties": {**d.properties, "status": "false"}})  # fmt: skip
    path = out / "false_detections.geojson"
    write_text_atomic(path, json.dumps({"type": "FeatureCollection", "features": features}) + "\n")
    written.append(path)
    path = out / "pr_curve.png"
    _plot_curve(path, public)
    written.append(path)
    path = out / "evaluation.json"
    write_text_atomic(path, json.dumps(public, indent=2) + "\n")
    written.append(path)
    return written


def _peak(detection: Detection) -> list[float]:
    props = detection.properties
    if props.get("peak_lon") is not None and props.get("peak_lat") is not None:
        return [float(props["peak_lon"]), float(props["peak_lat"])]
    return [float(v) for v in np.vstack(detection.rings).mean(axis=0)]


def _plot_curve(path: Path, figures: dict[str, Any]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fusionkern.files import atomic_output

    fig = Figure(figsize=(5.0, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    curve = figures["curve"]
    if curve and curve[0]["recall"] is not None:
        ax.plot([0.0] + [c["recall"] for c in curve], [1.0] + [c["precision"] for c in curve], drawstyle="steps-post")
        if figures["recall"] is not None and figures["precision"] is not None:
            ax.plot([figures["recall"]], [figures["precision"]], "o", label="all detections")
            ax.legend(loc="lower left", fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (plants found)")
    ax.set_ylabel("precision (detections right)")
    rate = figures.get("false_per_1000km2")
    ax.set_title(f"{figures['detections']} detections, {figures['plants']} plants, match {figures['match_m']:g} m"
                 + (f"\n{rate:g} false per 1000 km²" if rate is not None else ""), fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")


def plants_array(plants: Sequence[Any]) -> np.ndarray:
    """(n, 2) lon, lat of :class:`~fusionkern.data.chips.Plant` objects."""
    return np.asarray([[p.lon, p.lat] for p in plants], dtype=np.float64).reshape(-1, 2)
