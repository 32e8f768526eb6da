"""How close the scanner comes to the oracle, region by region: both goals (recall >= 0.9 and precision >= 0.8)
at one threshold set beforehand.

1. ``fusionkern.scan_demo.goal_odds``: the share of regions of 12 plants and 16-96 look-alike windows, drawn as
   ``make_demo_region`` draws them, on which the oracle (kiln heat and dust as the generator drew them) meets
   both goals at its best single threshold, and on which some threshold of the region's own would.
2. The same oracle threshold on the five regions the scanner was measured on (redrawn here from their seeds).
3. Every scanner setting recorded in this folder (``detection*.json`` here and in ``physical_verifier/``): on
   how many of those five regions it met both goals.

Usage: ``python region_goal_odds.py`` (about a minute; writes the regions to a temporary folder).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from fusionkern.scan_demo import GOALS, goal_odds, make_demo_region, region_ceiling, region_meets_goals

HERE = Path(__file__).resolve().parent
REGIONS = ((0, 2048, 32), (7, 2048, 32), (11, 3072, 64), (13, 1536, 96), (17, 2048, 16))


def main() -> None:
    print("## The oracle at one threshold: share of regions (12 plants) meeting both goals, 20,000 regions each\n")
    print("| look-alike windows | industry works expected | one threshold set beforehand | each region's best |")
    print("|---|---|---|---|")
    threshold = None
    for windows in (16, 32, 64, 96):
        odds = goal_odds(12, windows)
        threshold = odds["threshold"] if threshold is None else threshold
        assert abs(odds["threshold"] - threshold) < 1e-5, odds
        print(f"| {windows} | {odds['industry_expected']:.2f} | {odds['odds_fixed']:.1%} | {odds['odds_any']:.1%} |")
    print(f"\n(the best single threshold is the same for every density: oracle score {threshold:.4f})\n")

    print("## The same threshold on the five measured regions\n")
    print("| region (seed, px, windows) | industry works | oracle: plants found, false | both goals | "
          "oracle precision at 90 % recall |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed, size, windows in REGIONS:
            region = make_demo_region(Path(tmp) / f"r{seed}", size_px=size, n_confusers=windows, seed=seed)
            truth = region.manifest.parent / "truth.geojson"
            here, ceiling = region_meets_goals(truth, threshold), region_ceiling(truth)
            print(f"| {seed}, {size}, {windows} | {ceiling['industry']} | {here['found']}/{here['plants']}, "
                  f"{here['false']} | {'met' if here['meets'] else 'not met'} | {ceiling['oracle_precision']:.0%} |")

    print("\n## Scanner settings measured in this folder: regions meeting both goals\n")
    print("| file | regions meeting both goals | per region: recall / precision |")
    print("|---|---|---|")
    for path in sorted(HERE.glob("detection*.json")) + sorted((HERE / "physical_verifier").glob("detection*.json")):
        rows = [r for r in json.loads(path.read_text())["rows"] if r["mode"] == "verified"]
        if not rows:
            continue
        met = [r["recall"] >= GOALS["recall"] and (r["precision"] or 0) >= GOALS["precision"] for r in rows]
        cells = ", ".join(f"{r['seed']}: {r['recall']:.0%} / {r['precision']:.0%}" for r in rows)
        print(f"| {path.relative_to(HERE)} | {sum(met)} of {len(rows)} | {cells} |")


if __name__ == "__main__":
    main()
