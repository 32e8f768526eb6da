"""``fusionkern mine``: hard negatives and background chips from a region, as landcover sites to train on."""

from __future__ import annotations

import argparse

NAME = "mine"
HELP = (
    "Scan a region with a checkpoint and keep its highest-scoring chips away from known plants (hard negatives), "
    "plus random background chips, as landcover sites for fusionkern train --data."
)


def add_scan_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """The options every command that scans a region shares (mine, calibrate): inputs and execution.

    Args:
        parser: The subcommand's parser.
        several: ``--manifest`` takes one or more regions.
    """
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scenes", nargs=3, metavar=("D1", "D2", "D3"),
                        help="three Landsat-8 scene folders, one per date, in the model's date order")  # fmt: skip
    if several:
        source.add_argument("--manifest", metavar="YAML", nargs="+",
                            help="YAML mapping b10, b11, b7, b6 to three rasters each; several: one region each, "
                            "calibrated together")  # fmt: skip
    else:
        source.add_argument("--manifest", metavar="YAML", help="YAML mapping b10, b11, b7, b6 to three rasters each")
    parser.add_argument("--plants", required=True,
                        help="known plants of the region: CSV with lon,lat[,name] or GeoJSON points")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=256, help="chips per model call (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="reader threads (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="keep raster values as stored instead of converting DN with the MTL files")  # fmt: skip
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def scan_extras(args: argparse.Namespace) -> dict:
    """The :class:`~fusionkern.scan.ScanOptions` values of :func:`add_scan_arguments`' options."""
    return {"batch_size": args.batch_size, "workers": args.workers, "device": args.device,
            "calibrate": args.calibrate}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``mine`` options to its subparser.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument("checkpoint", help="FusionNet checkpoint to mine with")
    add_scan_arguments(parser)
    parser.add_argument("--out", required=True, help="dataset folder to create (site layout, landcover only)")
    parser.add_argument("--top", type=int, default=200, help="hard negatives kept, best first (default: %(default)s)")
    parser.add_argument("--random", type=int, default=0,
                        help="random background chips of the region added (default: %(default)s)")  # fmt: skip
    parser.add_argument("--exclude-m", type=float, default=2000.0,
                        help="no chip (with its context) comes within this many metres of a known plant "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--round", type=int, default=1, help="mining round recorded with each chip (default: 1)")
    parser.add_argument("--context-px", type=int, default=9,
                        help="context kept around each chip, as fusionkern chips --context-px (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random chips (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing mined folder")


def run(args: argparse.Namespace) -> int:
    """Mines and prints what was written.

    Args:
        args: Parsed options.

    Returns:
        0 on success (input errors raise :class:`fusionkern.errors.FusionkernError`).
    """
    from fusionkern.data.chips import read_plants
    from fusionkern.scan.mine import MineOptions, mine

    options = MineOptions(
        checkpoint=args.checkpoint, out=args.out, plants=read_plants(args.plants), scenes=args.scenes,
        manifest=args.manifest, top=args.top, random=args.random, exclude_m=args.exclude_m, round=args.round,
        context_px=args.context_px, seed=args.seed, scan=scan_extras(args), overwrite=args.overwrite,
        progress=args.progress,
    )  # fmt: skip
    report = mine(options, log=print)
    for line in report.lines():
        print(line)
    return 0
