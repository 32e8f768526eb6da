"""``fusionkern calibrate``: the threshold that meets a false-detection budget, stored in the checkpoint."""

from __future__ import annotations

import argparse

from fusionkern.commands.mine import add_scan_arguments, scan_extras

NAME = "calibrate"
HELP = (
    "Scan a region (or several, calibrated together) with known plants and store in the checkpoint the threshold "
    "that meets a budget of false detections per 1000 km² (plain and verified), with the deployment prior."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``calibrate`` options to its subparser.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument("checkpoint", help="FusionNet checkpoint to calibrate (its metadata is updated)")
    add_scan_arguments(parser, several=True)
    parser.add_argument("--fp-per-1000km2", dest="budget", type=float, required=True,
                        help="false detections allowed per 1000 km² of background")  # fmt: skip
    parser.add_argument("--out", required=True, help="folder for the calibration scan and calibration.json")
    parser.add_argument("--prior", type=float,
                        help="deployment prior of cement chips (default: the share of the region's scored chips "
                        "that hold a known plant)")  # fmt: skip
    parser.add_argument("--verify", default="auto", metavar="auto|FILE|none",
                        help="verifier to calibrate too: auto (the split checkpoints beside CHECKPOINT), a "
                        "checkpoint, a training folder, a list file, or none (default: auto); recorded with the "
                        "threshold, and the scan's default verifier")  # fmt: skip
    parser.add_argument("--match-m", type=float, default=600.0,
                        help="a site is right when a chip of it lies within this many metres of a known plant "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--dry-run", dest="write", action="store_false",
                        help="write calibration.json only; leave the checkpoint as it is")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a previous calibration scan in --out")


def run(args: argparse.Namespace) -> int:
    """Calibrates and prints the thresholds.

    Args:
        args: Parsed options.

    Returns:
        0 on success (input errors raise :class:`fusionkern.errors.FusionkernError`).
    """
    from fusionkern.data.chips import read_plants
    from fusionkern.scan.calibrate import CalibrateOptions, calibrate

    options = CalibrateOptions(
        checkpoint=args.checkpoint, out=args.out, plants=read_plants(args.plants), budget=args.budget,
        scenes=args.scenes, manifest=_one_or_several(args.manifest), prior=args.prior, verify=args.verify, match_m=args.match_m,
        scan=scan_extras(args), write=args.write, overwrite=args.overwrite, progress=args.progress,
    )  # fmt: skip
    record = calibrate(options, log=print)
    regions = record["region"].get("regions", 1)
    print(f"prior {record['prior']:.3g} ({record['prior_source']}); budget {record['fp_per_1000km2']:g} false "
          f"detection(s) per 1000 km² over {record['region']['area_km2']:.0f} km²"
          + (f" of {regions} regions" if regions > 1 else ""))  # fmt: skip
    for mode in ("plain", "verified"):
        part = record.get(mode)
        if part:
            print(f"{mode}: threshold {part['threshold']:.4g}; on this region {part['false']} false detection(s) "
                  f"({part['false_per_1000km2']:g} per 1000 km²), {part['found']}/{record['region']['plants']} "
                  "plants found")  # fmt: skip
    print(f"stored in {args.checkpoint}" if args.write else f"written to {args.out}/calibration.json only")
    return 0


def _one_or_several(manifests: list[str] | None) -> str | list[str] | None:
    return manifests[0] if manifests and len(manifests) == 1 else manifests
