"""The ``fusionkern`` command line: one entry point, one module per subcommand in ``fusionkern.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Errors that
come from the user's input (:class:`fusionkern.errors.FusionkernError`) are printed as one line, ``error: ...``,
with a non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from fusionkern import __version__
from fusionkern.errors import FusionkernError
from fusionkern.files import WRITE_ERRNOS

# Subcommands, in the order `fusionkern --help` lists them. Modules are imported lazily so that
# `fusionkern --help` stays fast and a missing optional extra only affects the command that needs it.
COMMANDS = (
    "demo", "train", "chips", "scan", "report", "mine", "calibrate", "evaluate", "export", "bench", "experiment",
    "explain",
)  # fmt: skip


def _set_gdal_env() -> None:
    """GDAL settings that suit reading many small windows from local or remote rasters, set once at start."""
    os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    os.environ.setdefault("GDAL_CACHEMAX", "512")
    os.environ.setdefault("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", ".tif,.TIF,.tiff,.vrt,.TIFF")


def _set_logging(verbose: bool) -> None:
    """The level of fusionkern's loggers: WARNING, or INFO with ``--verbose``. The engines read it to set the
    libraries they drive (Ray keeps its INFO lines to itself unless it is INFO)."""
    logging.getLogger("fusionkern").setLevel(logging.INFO if verbose else logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionkern",
        description="FusionNet cement-plant detection on Landsat-8: train, scan, export, benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"fusionkern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"fusionkern.commands.{name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        if not any("--verbose" in action.option_strings for action in p._actions):
            p.add_argument("--verbose", action="store_true",
                           help="log what the libraries underneath say too (e.g. Ray's INFO lines)")  # fmt: skip
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI in-process (tests call ``main([...])``); returns the exit code."""
    _set_gdal_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    _set_logging(bool(getattr(args, "verbose", False)))
    try:
        return int(args._run(args) or 0)
    except FusionkernError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # A full disk, a quota, a read-only or forbidden folder: the machine's state, not a bug; one line, as for
        # any other bad input. Other OS errors keep their traceback.
        if exc.errno not in WRITE_ERRNOS:
            raise
        target = exc.filename or getattr(args, "out", None)  # GDAL and some writers do not say which file
        where = f" {target}" if target else ""
        print(f"error: cannot write{where} ({exc.strerror or exc})", file=sys.stderr)
        return FusionkernError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
