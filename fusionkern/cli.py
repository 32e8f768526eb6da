"""The ``fusionkern`` command line: one entry point, one module per subcommand in ``fusionkern.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Errors that
come from the user's input (:class:`fusionkern.errors.FusionkernError`) are printed as one line, ``error: ...``,
with a non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from fusionkern import __version__
from fusionkern.errors import FusionkernError

# Subcommands, in the order `fusionkern --help` lists them. Modules are imported lazily so that
# `fusionkern --help` stays fast and a missing optional extra only affects the command that needs it.
COMMANDS = ("demo", "train", "chips", "scan", "export", "bench", "experiment", "explain")


def _set_gdal_env() -> None:
    """GDAL settings that suit reading many small windows from local or remote rasters, set once at start."""
    os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    os.environ.setdefault("GDAL_CACHEMAX", "512")
    os.environ.setdefault("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", ".tif,.TIF,.tiff,.vrt,.TIFF")


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
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI in-process (tests call ``main([...])``); returns the exit code."""
    _set_gdal_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except FusionkernError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
