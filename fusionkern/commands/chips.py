"""``fusionkern chips``: cut a training set (site layout) from Landsat-8 rasters and plant locations."""

from __future__ import annotations

import argparse

from fusionkern.data.chips import (
    ChipOptions,
    inputs_from_manifest,
    inputs_from_scenes,
    read_plants,
    write_chip_dataset,
)

NAME = "chips"
HELP = "Cut cement and landcover training chips (b10, b11, b7, b6, b76; three dates) around plant locations."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``chips`` options to its subparser.

    Args:
        parser: The subcommand's parser.
    """
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--scenes", nargs=3, metavar=("D1", "D2", "D3"),
        help="three Landsat-8 scene folders, one per date, in channel order (bands found by their USGS names)",
    )
    source.add_argument(
        "--manifest", metavar="YAML",
        help="YAML mapping b10, b11, b7, b6 to three rasters each (optional: mtl, qa, dates lists of three)",
    )
    parser.add_argument("--plants", required=True, help="plant locations: CSV with lon,lat[,name] or GeoJSON points")
    parser.add_argument("--out", required=True, help="dataset folder to create")
    parser.add_argument("--chip-m", type=float, default=1050.0, help="chip side in metres (default: %(default)s)")
    parser.add_argument(
        "--landcover-per-plant", type=int, default=3,
        help="landcover chips drawn around each plant (default: %(default)s)",
    )
    parser.add_argument(
        "--landcover-km", type=float, default=3.5,
        help="distance of landcover chips from their plant in km (default: %(default)s)",
    )
    parser.add_argument(
        "--context-px", type=int, default=9,
        help="pixels of context kept around every chip, so that training can shift chips as the scan's fall at "
        "any offset; 9 covers half the default scan stride of a 35 px chip (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the landcover bearings (default: %(default)s)")
    parser.add_argument(
        "--max-cloud", type=float, default=0.0,
        help="largest cloudy fraction of a chip kept, where QA bands exist (default: %(default)s)",
    )
    parser.add_argument(
        "--no-calibrate", dest="calibrate", action="store_false",
        help="keep raster values as stored instead of converting DN with the MTL (needed for Level-1 bands without MTL)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")


def run(args: argparse.Namespace) -> int:
    """Cuts the dataset and prints what was written and skipped.

    Args:
        args: Parsed options.

    Returns:
        0 on success (input errors raise :class:`fusionkern.errors.FusionkernError`).
    """
    options = ChipOptions(
        chip_m=args.chip_m,
        landcover_per_plant=args.landcover_per_plant,
        landcover_km=args.landcover_km,
        seed=args.seed,
        max_cloud=args.max_cloud,
        calibrate=args.calibrate,
        context_px=args.context_px,
    )
    options.validate()
    if args.scenes:
        inputs = inputs_from_scenes(args.scenes, calibrate=args.calibrate)
    else:
        inputs = inputs_from_manifest(args.manifest, calibrate=args.calibrate)
    plants = read_plants(args.plants)
    report = write_chip_dataset(inputs, plants, args.out, options, overwrite=args.overwrite)
    for line in report.lines():
        print(line)
    return 0
