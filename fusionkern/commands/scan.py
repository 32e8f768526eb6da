"""``fusionkern scan``: score a region of Landsat-8 rasters with a trained FusionNet and map the cement plants."""

from __future__ import annotations

import argparse

NAME = "scan"
HELP = (
    "Scan a region (one scene to a whole country) with a FusionNet checkpoint: scores COG, detections GeoJSON / "
    "GeoParquet, quick look and scan.json."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``scan`` options to its subparser.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument("checkpoint", help="FusionNet checkpoint (.pt) written by fusionkern train, or what fusionkern "
                        "export wrote from one: an .onnx (--backend onnxruntime) or an engine (--backend tensorrt), "
                        "with its sidecar <file>.json")  # fmt: skip
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--scenes", nargs=3, metavar=("D1", "D2", "D3"),
        help="three Landsat-8 scene folders, one per date, in the date order the model was trained with",
    )
    source.add_argument(
        "--manifest", metavar="YAML",
        help="YAML mapping b10, b11, b7, b6 to three rasters each (GeoTIFF, COG, VRT or any GDAL path); "
        "optional mtl, qa and dates lists of three",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--plan", action="store_true",
                        help="say what the scan would cost (chips, tiles, bytes to read, nodata share from overviews, "
                        "time from the benchmark records of this machine) and write DIR/plan.json; reads no pixel at "
                        "full resolution and scores nothing")  # fmt: skip
    parser.add_argument("--bench-results", metavar="DIR",
                        help="with --plan: folder of fusionkern bench records (default: benchmarks/results of the "
                        "checkout)")  # fmt: skip

    grid = parser.add_argument_group("scan grid (default: the first raster's)")
    grid.add_argument("--crs", help="grid CRS, e.g. EPSG:32650 (projected)")
    grid.add_argument("--resolution", type=float, help="grid pixel size in CRS units")
    grid.add_argument(
        "--bounds", nargs=4, type=float, metavar=("WEST", "SOUTH", "EAST", "NORTH"), help="region to scan"
    )
    grid.add_argument(
        "--bounds-crs", default="auto",
        help="CRS of --bounds: auto (lon/lat when the numbers fit, else the grid's), lonlat, grid, or a CRS",
    )

    work = parser.add_argument_group("chips")
    work.add_argument("--stride", dest="stride_m", type=float, help="chip stride in metres (default: half a chip)")
    work.add_argument(
        "--max-invalid", type=float, default=0.0,
        help="largest fraction of a chip's pixels that may be nodata or cloud (QA) for it to be scored; "
        "default 0, the training set's rule",
    )
    decide = parser.add_argument_group("decisions (defaults: what fusionkern calibrate stored in the checkpoint)")
    decide.add_argument(
        "--threshold", type=float,
        help="detection threshold on the (prior-shifted) probability, or on the verifier's score with --verify "
        "(default: the checkpoint's calibrated threshold, else 0.5)",
    )
    decide.add_argument(
        "--prior", type=float,
        help="deployment prior of cement chips; probabilities are moved from the training prior to it "
        "(default: the calibrated prior, else the training prior: no shift)",
    )
    decide.add_argument(
        "--verify", metavar="auto|FILE",
        help="verify candidate sites with an ensemble: auto (the split checkpoints beside CHECKPOINT), a "
        "checkpoint, a training folder, a file listing checkpoints, or none; default: the checkpoints the "
        "calibration verified with, where it did, else none",
    )
    decide.add_argument(
        "--candidate-threshold", type=float,
        help="chip probability from which sites are verified (default: the calibrated one, else a quarter of "
        "the threshold's odds)",
    )
    work.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                      help="keep raster values as stored instead of converting DN with the MTL files")  # fmt: skip
    work.add_argument("--preset", choices=("paper", "native"), help="refuse a checkpoint of another preset")

    run = parser.add_argument_group("execution")
    run.add_argument("--backend", default="torch", metavar="{torch,triton,onnxruntime,tensorrt}",
                     help="inference backend (default torch)")  # fmt: skip
    run.add_argument("--precision", metavar="{fp32,bf16,fp16}",
                     help="the model's arithmetic: fp32 (default) or bf16 (CUDA) for torch and triton; fp16 "
                     "(default) or fp32 for tensorrt")  # fmt: skip
    run.add_argument("--device", default="auto",
                     help="torch device: auto, cpu, cuda, cuda:N (default auto); with --engine ray, auto, cpu or "
                     "cuda, decided by each actor on its node")  # fmt: skip
    run.add_argument("--engine", default="local", choices=("local", "ray"), help="local (default) or ray")
    run.add_argument("--address", help="Ray cluster for --engine ray: HOST:PORT, auto, ray://HOST:PORT, or local for "
                     "a new local instance (default: RAY_ADDRESS, else the cluster this machine belongs to, else a "
                     "new local instance)")  # fmt: skip
    run.add_argument("--batch-size", type=int, default=256, help="chips per model call (default 256)")
    run.add_argument("--tile-px", type=int, default=1024, help="side of the windows read at once, px (default 1024)")
    run.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                     help="readers (default auto: one process per available core, or 2 threads), or Ray actors in "
                     "all (default auto: one per GPU, else one per 4 CPUs, on each node)")  # fmt: skip
    run.add_argument("--readers", default="processes", metavar="{processes,threads}",
                     help="local engine: read, decompress and calibrate tiles in worker processes (default), or in "
                     "threads of the scanning process")  # fmt: skip
    run.add_argument("--queue", dest="queue_batches", type=int, default=8,
                     help="batches in flight between readers and the model (default 8)")  # fmt: skip
    run.add_argument("--resume", action="store_true", help="continue a killed scan in --out")
    run.add_argument("--overwrite", action="store_true", help="replace a previous scan in --out")
    run.add_argument("--no-checksums", dest="checksums", action="store_false",
                     help="record size and modification time of the inputs instead of SHA-256")  # fmt: skip
    run.add_argument("--no-quicklook", dest="quicklook", action="store_false", help="skip quicklook.png")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _workers(text: str) -> int | None:
    """``--workers``: a number, or ``auto`` (None)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or auto, not {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Runs the scan and prints its summary, or with ``--plan`` prints and writes what it would cost.

    Args:
        args: Parsed options.

    Returns:
        0 on success (input errors raise :class:`fusionkern.errors.FusionkernError`).
    """
    from fusionkern.files import output_errors
    from fusionkern.scan import ScanOptions, run_scan

    fields = ScanOptions.__dataclass_fields__
    options = ScanOptions(**{k: v for k, v in vars(args).items() if k in fields})
    if args.plan:
        from fusionkern.scan.plan import run_plan

        with output_errors(options.out):
            run_plan(options, args.bench_results, log=print)
        return 0
    with output_errors(options.out):  # a full disk or a folder turned read-only: one line naming --out
        result = run_scan(options, log=print)
    for line in result.lines():
        print(line)
    return 0
