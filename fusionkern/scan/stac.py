"""A STAC Item per scan (``scan.stac.json``): what a catalogue indexes a scan's outputs by.

The item (STAC 1.1.0) holds:

* the scanned region: the scan grid's bounds in WGS 84 (edges densified) as its geometry, and their bbox;
* the time of the inputs: ``start_datetime`` and ``end_datetime`` span the three dates the inputs are labelled with
  (the MTL files' ``DATE_ACQUIRED``, a manifest's ``dates`` such as ``2018-01``, or a Landsat product name); where
  a label cannot be read as a date, ``datetime`` is the scan's own time instead. The labels themselves are kept in
  ``fusionkern:dates``;
* an asset per output, with its media type, roles, size and SHA-256 (file extension, ``file:checksum`` as a
  multihash); the scores raster also carries its grid (projection extension);
* the label extension for the detections: vector labels, task ``detection``, method ``automated``, class
  ``cement`` in every feature's ``class`` property, the count in ``label:overviews``;
* the model (class, preset, sha256), the decision (threshold, prior, verifier) and the chips' size and stride as
  ``fusionkern:*`` properties, and a ``source`` link per input raster.

The item is written just before ``scan.json`` and lists it too: its checksum is that of the bytes
:func:`fusionkern.scan.outputs.write_json` writes for the report (:func:`report_bytes`).
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fusionkern.files import sha256_file, write_text_atomic
from fusionkern.scan import outputs

STAC_VERSION = "1.1.0"
EXTENSIONS = (
    "https://stac-extensions.github.io/label/v1.0.1/schema.json",
    "https://stac-extensions.github.io/file/v2.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
)

ASSETS: dict[str, tuple[str, str, list[str], str]] = {
    outputs.SCORES: ("scores", "image/tiff; application=geotiff; profile=cloud-optimized", ["data"],
                     "Cement probability per chip, on the stride grid"),
    outputs.GEOJSON: ("detections", "application/geo+json", ["labels", "data"], "Detected sites (RFC 7946)"),
    outputs.PARQUET: ("detections_parquet", "application/vnd.apache.parquet", ["labels", "data"],
                      "Detected sites (GeoParquet 1.1)"),
    outputs.QUICKLOOK: ("quicklook", "image/png", ["overview"], "Quick look: scores over a false-colour composite"),
    outputs.REPORT: ("report", "text/html", ["overview", "metadata"], "Review page: ranked detections with crops"),
    outputs.SCAN_JSON: ("scan", "application/json", ["metadata"],
                        "Scan record: inputs, model, decision, counts, timings"),
}  # fmt: skip
"""Per output listed in the item: its asset key, media type, roles and title."""

_SHA256_MULTIHASH = "1220"  # multihash prefix: 0x12 sha2-256, 0x20 bytes of digest
_EDGE_POINTS = 16  # points per edge of the region's footprint, so that it follows a projected grid's curved edges
_COORD_DIGITS = 7


def report_bytes(report: dict[str, Any]) -> bytes:
    """The bytes of ``scan.json`` for ``report``, exactly as :func:`fusionkern.scan.outputs.write_json` writes them."""
    return (json.dumps(report, indent=2, default=float) + "\n").encode("utf-8")


def item_id(report: dict[str, Any]) -> str:
    """A stable identifier of the scan: its creation time and the model's sha256, e.g.
    ``fusionkern-scan-20261130T133038Z-1a2b3c4d``."""
    created = datetime.fromisoformat(report["created"]).astimezone(timezone.utc)
    return f"fusionkern-scan-{created:%Y%m%dT%H%M%SZ}-{report['checkpoint']['sha256'][:8]}"


# --------------------------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------------------------


def date_span(label: str) -> tuple[datetime, datetime] | None:
    """The first and last instant (UTC) of the period a date label names, or None where it names none.

    Reads ``YYYY-MM-DD`` (with an optional time, which is dropped), ``YYYYMMDD``, ``YYYY-MM``, ``YYYY``, a Landsat
    Collection product name (``LC08_L1TP_167055_20170308_...``) and a pre-collection scene name
    (``LC82320832016040LGN00``: year and day of year).
    """
    text = str(label).strip()
    patterns = (
        (r"(\d{4})-(\d{2})-(\d{2})(?:[T ].*)?", "day"),
        (r"(\d{4})(\d{2})(\d{2})", "day"),
        (r"(\d{4})-(\d{2})", "month"),
        (r"(\d{4})", "year"),
    )
    try:
        for pattern, unit in patterns:
            match = re.fullmatch(pattern, text)
            if match:
                return _span(unit, *(int(g) for g in match.groups()))
        if match := re.search(r"_(\d{4})(\d{2})(\d{2})_", text):
            return _span("day", *(int(g) for g in match.groups()))
        if match := re.match(r"L[COTEM]\d{7}(\d{4})(\d{3})", text):
            day = datetime(int(match.group(1)), 1, 1, tzinfo=timezone.utc) + timedelta(days=int(match.group(2)) - 1)
            if day.year != int(match.group(1)):
                return None
            return _span("day", day.year, day.month, day.day)
    except ValueError:  # a month 13, a day 32...
        return None
    return None


def _span(unit: str, year: int, month: int = 1, day: int = 1) -> tuple[datetime, datetime]:
    start = datetime(year, month, day, tzinfo=timezone.utc)
    if unit == "day":
        last = start
    elif unit == "month":
        last = start.replace(day=calendar.monthrange(year, month)[1])
    else:
        last = start.replace(month=12, day=31)
    return start, last.replace(hour=23, minute=59, second=59)


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def date_labels(report: dict[str, Any]) -> list[str]:
    """The three dates' labels, from the first band's inputs in ``scan.json``."""
    first = next(iter(report["inputs"]["bands"].values()))
    return [str(entry.get("date") or "") for entry in first]


def _time_properties(report: dict[str, Any]) -> dict[str, Any]:
    labels = date_labels(report)
    spans = [date_span(label) for label in labels]
    if spans and all(spans):
        return {"datetime": None, "start_datetime": _iso(min(s[0] for s in spans)),  # type: ignore[index]
                "end_datetime": _iso(max(s[1] for s in spans))}  # type: ignore[index]  # fmt: skip
    return {"datetime": _iso(datetime.fromisoformat(report["created"]))}


# --------------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------------


def region_geometry(report: dict[str, Any]) -> tuple[dict[str, Any], list[float]]:
    """The scan grid's bounds as a WGS 84 polygon (counter-clockwise, edges densified) and its bbox."""
    import numpy as np
    from rasterio.crs import CRS
    from rasterio.warp import transform

    west, south, east, north = report["grid"]["bounds"]
    steps = np.linspace(0.0, 1.0, _EDGE_POINTS, endpoint=False)
    xs = np.concatenate([west + (east - west) * steps, np.full_like(steps, east), east - (east - west) * steps,
                         np.full_like(steps, west)])  # fmt: skip
    ys = np.concatenate([np.full_like(steps, south), south + (north - south) * steps, np.full_like(steps, north),
                         north - (north - south) * steps])  # fmt: skip
    lons, lats = transform(CRS.from_user_input(report["grid"]["crs"]), "EPSG:4326", list(xs), list(ys))
    ring = [[round(lon, _COORD_DIGITS), round(lat, _COORD_DIGITS)] for lon, lat in zip(lons, lats)]
    ring.append(list(ring[0]))
    bbox = [min(p[0] for p in ring), min(p[1] for p in ring), max(p[0] for p in ring), max(p[1] for p in ring)]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


# --------------------------------------------------------------------------------------------------------------
# The item
# --------------------------------------------------------------------------------------------------------------


def _file_fields(size: int, sha256_hex: str) -> dict[str, Any]:
    return {"file:size": int(size), "file:checksum": _SHA256_MULTIHASH + sha256_hex}


def _assets(out: Path, report: dict[str, Any], scan_json: bytes | None) -> dict[str, Any]:
    assets: dict[str, Any] = {}
    for name, (key, media_type, roles, title) in ASSETS.items():
        if name == outputs.SCAN_JSON and scan_json is not None:
            fields = _file_fields(len(scan_json), hashlib.sha256(scan_json).hexdigest())
        elif (out / name).is_file():
            fields = _file_fields((out / name).stat().st_size, sha256_file(out / name))
        else:
            continue  # an output this scan did not write (quicklook.png with --no-quicklook)
        asset = {"href": f"./{name}", "type": media_type, "title": title, "roles": roles, **fields}
        if name == outputs.SCORES:
            asset.update(_scores_projection(report))
        assets[key] = asset
    return assets


def _scores_projection(report: dict[str, Any]) -> dict[str, Any]:
    crs = str(report["grid"]["crs"])
    scores = report["scores"]
    code = {"proj:code": crs} if re.fullmatch(r"EPSG:\d+", crs) else {"proj:code": None, "proj:wkt2": crs}
    return {**code, "proj:shape": [scores["height"], scores["width"]], "proj:transform": list(scores["transform"])}


def _links(report: dict[str, Any]) -> list[dict[str, Any]]:
    links = []
    for branch, entries in report["inputs"]["bands"].items():
        for entry in entries:
            title = f"{branch} {entry.get('date') or ''}".strip()
            links.append({"rel": "source", "href": str(entry["path"]), "title": title})
    return links


def build_item(out: str | Path, report: dict[str, Any], scan_json: bytes | None = None) -> dict[str, Any]:
    """The scan's STAC Item as JSON values.

    Args:
        out: The scan's output folder (the assets are read from it for their sizes and checksums).
        report: The contents of ``scan.json``.
        scan_json: The bytes of ``scan.json`` where it is not written yet (None: read from ``out``).

    Returns:
        The item.
    """
    out = Path(out)
    geometry, bbox = region_geometry(report)
    checkpoint, decision = report["checkpoint"], report["decision"]
    counts = report.get("counts") or {}
    detections = counts.get("detections")
    properties: dict[str, Any] = {
        "title": f"fusionkern scan {out.name}: {detections} cement plant detection(s)",
        **_time_properties(report),
        "created": _iso(datetime.fromisoformat(report["created"])),
        "platform": "landsat-8",
        "instruments": ["oli", "tirs"],
        "label:description": "Cement plant sites found by FusionNet on Landsat-8 thermal and short-wave infrared "
        "bands: one polygon per site (the union of its positive chips), ranked by score",
        "label:type": "vector",
        "label:properties": ["class"],
        "label:classes": [{"name": "class", "classes": ["cement"]}],
        "label:tasks": ["detection"],
        "label:methods": ["automated"],
        "label:overviews": [{"property_key": "class", "counts": [{"name": "cement", "count": int(detections or 0)}]}],
        "fusionkern:version": report.get("fusionkern_version"),
        "fusionkern:model": {"name": checkpoint.get("class"), "preset": checkpoint.get("preset"),
                             "sha256": checkpoint["sha256"]},  # fmt: skip
        "fusionkern:decision": {
            "threshold": decision.get("threshold"), "threshold_source": decision.get("threshold_source"),
            "prior": decision.get("prior"), "train_prior": decision.get("train_prior"),
            "candidate_threshold": decision.get("candidate_threshold"),
            "verifier_checkpoints": len(decision.get("verify") or []),
        },  # fmt: skip
        "fusionkern:chips": {k: report["chips"].get(k) for k in ("chip_px", "chip_m", "stride_px", "stride_m")},
        "fusionkern:dates": date_labels(report),
        "fusionkern:area_km2": counts.get("area_km2"),
    }
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": list(EXTENSIONS),
        "id": item_id(report),
        "geometry": geometry,
        "bbox": bbox,
        "properties": properties,
        "links": _links(report),
        "assets": _assets(out, report, scan_json),
    }


def write_item(out: str | Path, report: dict[str, Any], scan_json: bytes | None = None) -> Path:
    """Writes ``scan.stac.json`` into the scan's folder, atomically.

    Args:
        out: The scan's output folder.
        report: The contents of ``scan.json``.
        scan_json: The bytes of ``scan.json`` where it is not written yet (None: read from ``out``).

    Returns:
        The item's path.
    """
    item = build_item(out, report, scan_json)
    return write_text_atomic(Path(out) / outputs.STAC_ITEM, json.dumps(item, indent=2) + "\n")

