"""``fusionkern report``: rebuild a finished scan's review page and STAC item."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = (
    "Rebuild a finished scan's review page (report.html: ranked detections with crops of the inputs, accept / "
    "reject and a GeoJSON export of the decisions) and its STAC item (scan.stac.json)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``report`` options to its subparser.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument("scan_dir", metavar="SCAN_DIR", help="output folder of a finished fusionkern scan")
    parser.add_argument("--max-crops", type=int,
                        help="detections, best first, whose rows get crops of the inputs (default: as many as "
                        "fusionkern scan draws)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Rebuilds the page and the item and says where they are.

    Args:
        args: Parsed options.

    Returns:
        0 on success (input errors raise :class:`fusionkern.errors.FusionkernError`).
    """
    from pathlib import Path

    from fusionkern.errors import ConfigError
    from fusionkern.files import output_errors
    from fusionkern.scan.outputs import REPORT, STAC_ITEM
    from fusionkern.scan.review import MAX_CROPS, rebuild

    if args.max_crops is not None and args.max_crops < 0:
        raise ConfigError(f"--max-crops must be 0 or more, got {args.max_crops}")
    with output_errors(args.scan_dir, "SCAN_DIR"):
        stats = rebuild(args.scan_dir, MAX_CROPS if args.max_crops is None else args.max_crops)
    folder = Path(args.scan_dir)
    print(f"{folder / REPORT}: {stats['detections']} detection(s), {stats['with_crops']} with crops, "
          f"{stats['bytes'] / 1e6:.1f} MB, {stats['seconds']:.1f} s")  # fmt: skip
    print(f"{folder / STAC_ITEM}: rewritten with the page's checksum")
    return 0
