"""Errors that reach the user as one clear line.

Every failure caused by the user's input (a file, a band, a parameter, a config key) raises a subclass of
:class:`FusionkernError` whose message names the culprit. The CLI prints ``error: <message>`` and exits with a
non-zero code instead of a traceback.
"""

from __future__ import annotations


class FusionkernError(Exception):
    """Base class of every user-facing error (bad input, bad option, missing optional dependency)."""

    exit_code = 2


class InputError(FusionkernError):
    """A file, band, raster or dataset the user gave cannot be used as it is."""


class ConfigError(FusionkernError):
    """An option or configuration key is unknown or has an invalid value."""


class CheckpointError(FusionkernError):
    """A checkpoint is not a fusionkern checkpoint, is corrupted, or holds another model than expected."""


class MissingDependencyError(FusionkernError):
    """An optional dependency (an extra such as ``geo`` or ``export``) is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{package}' package: pip install 'fusionkern[{extra}]'"
        )
        self.package = package
        self.extra = extra
