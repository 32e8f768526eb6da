"""``fusionkern evaluate``: a scan's detections against known plants."""

from __future__ import annotations

import argparse

NAME = "evaluate"
HELP = (
    "Score detections against known plants: recall, precision, F1, false detections per 1000 km², a "
    "precision-recall curve and the missed plants."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``evaluate`` options to its subparser.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument("detections", help="detections GeoJSON (fusionkern scan's detections.geojson)")
    parser.add_argument("--truth", required=True,
                        help="known plants: CSV with lon,lat[,name] or GeoJSON points (features whose 'kind' "
                        "is not 'cement' are left out)")  # fmt: skip
    parser.add_argument("--match-m", type=float, default=600.0,
                        help="a plant is found by a detection whose footprint lies within this many metres "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--area-km2", type=float,
                        help="area scanned, for false detections per 1000 km² (default: what the scan recorded)")
    parser.add_argument("--out", required=True, help="folder for evaluation.json, pr_curve.png, missed.geojson")


def run(args: argparse.Namespace) -> int:
    """Evaluates and prints the figures.

    Args:
        args: Parsed options.

    Returns:
        0 on success (input errors raise :class:`fusionkern.errors.FusionkernError`).
    """
    from fusionkern.data.chips import read_plants
    from fusionkern.errors import ConfigError
    from fusionkern.evaluate import evaluate_detections, plants_array, read_detections, write_evaluation

    if args.area_km2 is not None and not args.area_km2 > 0:
        raise ConfigError(f"--area-km2 must be positive, got {args.area_km2}")
    detections, meta = read_detections(args.detections)
    plants = read_plants(args.truth)
    area = args.area_km2 if args.area_km2 is not None else meta.get("area_km2")
    figures = evaluate_detections(detections, plants_array(plants), args.match_m, area)
    write_evaluation(args.out, figures, detections, plants)
    for line in summary_lines(figures):
        print(line)
    print(f"written to {args.out}: evaluation.json, pr_curve.png, missed.geojson, false_detections.geojson")
    return 0


def summary_lines(figures: dict) -> list[str]:
    """The evaluation in two lines."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.0f} %"

    rate = figures["false_per_1000km2"]
    return [
        f"recall {pct(figures['recall'])} ({figures['plants_found']}/{figures['plants']} plants), precision "
        f"{pct(figures['precision'])} ({figures['true_detections']}/{figures['detections']} detections), "
        f"F1 {figures['f1']:.2f}",
        f"{figures['false_detections']} false detection(s) ({figures['duplicates']} duplicate(s))"
        + (f", {rate:g} per 1000 km² over {figures['area_km2']:g} km²" if rate is not None else "")
        + f"; matched within {figures['match_m']:g} m",
    ]
