"""Detection quality on regions nobody tuned on: a trained, mined and calibrated checkpoint scans regions drawn by
``make_demo_region`` with other seeds, sizes and look-alike densities, with and without the verifier, and each is
evaluated against its planted truth next to the oracle's ceiling: its precision at 90 % recall, and whether the
oracle at one threshold set beforehand (``goal_odds``) meets both goals on this region and on how many regions of
its kind. ``verified`` scans with the verifier the checkpoint was calibrated with (``make demo``: the split
ensemble; with ``--register-works``, the verifier it trained), ``plain`` without one.

Usage (after ``make demo``, whose checkpoint is mined and calibrated)::

    python benchmarks/detection_quality.py demo-out/train/split_<k>/best.pt --out detection-out
    python benchmarks/detection_quality.py CKPT --out DIR --regions 7:2048:32 11:3072:64 13:1536:96

Writes ``DIR/detection.json`` and ``DIR/detection.md`` (one row per region and mode) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

DEFAULT_REGIONS = ("7:2048:32", "11:3072:64", "13:1536:96", "17:2048:16")
"""seed:size_px:look-alike windows of the held-out regions (12 plants each, fewer where they do not fit)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a calibrated checkpoint (fusionkern calibrate)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--regions", nargs="+", default=list(DEFAULT_REGIONS), help="seed:size_px:lookalikes ...")
    parser.add_argument("--plants", type=int, default=12, help="plants planted per region (default 12)")
    parser.add_argument("--modes", nargs="+", default=["verified", "plain"], choices=("verified", "plain"))
    args = parser.parse_args(argv)

    from fusionkern.scan_demo import (
        GOALS, expected_ceiling, goal_odds, region_ceiling, region_meets_goals, run_scan_demo,
    )

    out = Path(args.out)
    rows = []
    for spec in args.regions:
        seed, size, lookalikes = (int(v) for v in spec.split(":"))
        for mode in args.modes:
            folder = out / f"seed{seed}-{size}px-{lookalikes}la-{mode}"
            t0 = time.perf_counter()
            summary = run_scan_demo(folder, args.checkpoint, size_px=size, n_plants=args.plants,
                                    n_confusers=lookalikes, seed=seed, verify=_verify(args.checkpoint, mode),
                                    progress=False, log=lambda line: None)  # fmt: skip
            truth = folder / "region" / "truth.geojson"
            ceiling = region_ceiling(truth)
            expected = expected_ceiling(summary["region"]["plants"], lookalikes)
            odds = goal_odds(summary["region"]["plants"], lookalikes)
            oracle_here = region_meets_goals(truth, odds["threshold"])
            m, scan = summary["match"], summary["scan"]
            rows.append({
                "seed": seed, "size_px": size, "lookalikes": lookalikes, "mode": mode,
                "plants": m["plants"], "found": m["plants_found"], "detections": m["detections"],
                "false": m["false_detections"], "recall": m["recall"], "precision": m["precision"],
                "false_per_1000km2": m["false_per_1000km2"], "area_km2": m["area_km2"],
                "threshold": scan["decision"]["threshold"], "industry_in_region": ceiling["industry"],
                "oracle_precision_region": ceiling["oracle_precision"], "oracle_precision_expected": expected["precision"],
                "meets_goals": bool(m["recall"] >= GOALS["recall"] and (m["precision"] or 0) >= GOALS["precision"]),
                "oracle_fixed_region": oracle_here, "oracle_goal_odds": odds["odds_fixed"],
                "scan_s": scan["scan_s"], "verify_s": scan["verify_s"], "wall_s": round(time.perf_counter() - t0, 1),
            })  # fmt: skip
            print(_row(rows[-1]), flush=True)
    record = {"checkpoint": args.checkpoint, "machine": platform.processor() or platform.machine(),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "detection.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out / "detection.md").write_text(_table(rows), encoding="utf-8")
    print(_table(rows))
    return 0


def _verify(checkpoint: str, mode: str) -> str | None:
    """``--verify`` of a mode: ``none`` for plain; for verified, the verifier the calibration recorded (None: the
    scan's default) where it verified, else the split ensemble."""
    from fusionkern.models.checkpoint import read_checkpoint

    if mode == "plain":
        return "none"
    calibration = (read_checkpoint(checkpoint, mmap=True).get("metadata") or {}).get("calibration") or {}
    return None if calibration.get("verified") else "auto"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def _row(r: dict) -> str:
    verify = f" + {r['verify_s']:.1f} s verifying" if r["verify_s"] is not None else ""
    return (f"seed {r['seed']} {r['size_px']} px {r['lookalikes']} look-alikes [{r['mode']}]: recall {_pct(r['recall'])} "
            f"({r['found']}/{r['plants']}), precision {_pct(r['precision'])} ({r['detections'] - r['false']}/"
            f"{r['detections']}), {r['false_per_1000km2']} false per 1000 km²; scan {r['scan_s']:.0f} s{verify}")


def _oracle(r: dict) -> str:
    here = r["oracle_fixed_region"]
    found = f"{here['found']}/{here['plants']} plants, {here['false']} false"
    return f"{'met' if here['meets'] else 'not met'} ({found}) / {_pct(r['oracle_goal_odds'])}"


def _table(rows: list[dict]) -> str:
    lines = [
        "| region (seed, size, look-alike windows) | mode | recall | precision | false / 1000 km² | oracle precision "
        "(region / expected) | both goals met | oracle at a fixed threshold: here / on such regions "
        "| verify / scan time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cost = f"{r['verify_s'] / r['scan_s']:.1%}" if r["verify_s"] is not None and r["scan_s"] else "-"
        lines.append(
            f"| {r['seed']}, {r['size_px']} px, {r['lookalikes']} | {r['mode']} | {_pct(r['recall'])} "
            f"({r['found']}/{r['plants']}) | {_pct(r['precision'])} ({r['detections'] - r['false']}/{r['detections']})"
            f" | {r['false_per_1000km2']} | {_pct(r['oracle_precision_region'])} / "
            f"{_pct(r['oracle_precision_expected'])} | {'yes' if r['meets_goals'] else 'no'} | {_oracle(r)}"
            f" | {cost} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
