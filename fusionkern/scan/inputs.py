"""What a scan reads: four Landsat-8 bands in three dates (with optional MTL and QA files), from scene folders or
a YAML manifest, and a fingerprint of each file for ``scan.json`` and for checking a resumed scan.

Scene folders and manifests are found and parsed by the readers, with the same rules as ``fusionkern chips``
(:func:`fusionkern.readers.inputs_from_scenes`, :func:`fusionkern.readers.inputs_from_manifest`), except that a
raster may also be any GDAL path (``/vsicurl/https://...``, ``/vsis3/...``, ``s3://...``), which is kept as it is.
Level-1 bands without MTL metadata are refused unless calibration is turned off; ``scan.json`` records per date
how each band was calibrated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from fusionkern import landsat
from fusionkern.errors import ConfigError
from fusionkern.files import sha256_file
from fusionkern.readers import (
    INPUT_BANDS,
    N_DATES,
    BandInput,
    ChipInputs,
    describe_calibration,
    inputs_from_manifest,
    inputs_from_scenes,
    is_gdal_path,
)


@dataclass
class ScanInputs:
    """The rasters of a scan.

    Attributes:
        bands: ``b10|b11|b7|b6`` -> three :class:`~fusionkern.readers.BandInput` (paths
            as strings), in date order.
        qa: Per date, a QA raster (Collection 1 BQA or Collection 2 QA_PIXEL) or None.
        calibrate: Convert DN to reflectance / brightness temperature where an MTL or a Level-2 name says how.
    """

    bands: dict[str, list[BandInput]]
    qa: list[str | None] = field(default_factory=lambda: [None] * N_DATES)
    calibrate: bool = True

    @property
    def reference(self) -> str:
        """The first raster (b10 of the first date): its grid is the default scan grid."""
        return self.bands["b10"][0].path

    def rasters(self) -> list[str]:
        """Every raster, bands first (in branch and date order), then QA bands."""
        return [r.path for rs in self.bands.values() for r in rs] + [q for q in self.qa if q]

    def mtl_files(self) -> list[str]:
        """The distinct MTL files, in first-use order."""
        seen: dict[str, None] = {}
        for rasters in self.bands.values():
            for r in rasters:
                if r.mtl and self.calibrate:
                    seen.setdefault(r.mtl, None)
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for Ray workers and the resume manifest)."""
        return {
            "bands": {b: [vars(r).copy() for r in rs] for b, rs in self.bands.items()},
            "qa": list(self.qa),
            "calibrate": self.calibrate,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScanInputs:
        """Inverse of :meth:`to_dict`."""
        bands = {b: [BandInput(**r) for r in rs] for b, rs in data["bands"].items()}
        return cls(bands, list(data["qa"]), bool(data["calibrate"]))


def _from_chip_inputs(inputs: ChipInputs, calibrate: bool) -> ScanInputs:
    def as_strings(b: BandInput) -> BandInput:  # paths as strings: a scan's inputs travel to worker processes
        return replace(b, path=str(b.path), mtl=str(b.mtl) if b.mtl else None)

    bands = {branch: [as_strings(b) for b in inputs.bands[branch]] for branch in INPUT_BANDS}
    return ScanInputs(bands, [str(q) if q else None for q in inputs.qa], calibrate)


def inputs_from_scene_dirs(scene_dirs: Sequence[str | os.PathLike], calibrate: bool = True) -> ScanInputs:
    """The bands, MTL and QA files of three Landsat scene folders, one per date.

    Args:
        scene_dirs: Three folders in the date order the model was trained with.
        calibrate: Convert DN with the MTL files found.

    Raises:
        InputError: Not three folders, a band missing or ambiguous in one, or (``calibrate``) Level-1 bands
            without an MTL (the message names the folder).
    """
    return _from_chip_inputs(inputs_from_scenes([Path(d) for d in scene_dirs], calibrate), calibrate)


def inputs_from_manifest_file(path: str | os.PathLike, calibrate: bool = True) -> ScanInputs:
    """Reads a YAML manifest: per band ``b10, b11, b7, b6`` a list of three rasters; optional ``mtl``, ``qa``
    and ``dates`` lists of three (see :func:`fusionkern.data.chips.inputs_from_manifest`).

    Relative paths are relative to the manifest's folder; rasters and QA bands (not MTL files) may be GDAL paths.

    Args:
        path: The manifest.
        calibrate: Convert DN with the MTL files listed.

    Raises:
        InputError: Missing or invalid manifest, an unknown key, a list without three entries, a missing file.
    """
    return _from_chip_inputs(inputs_from_manifest(Path(path), allow_gdal=True, calibrate=calibrate), calibrate)


def load_inputs(
    scenes: Sequence[str | os.PathLike] | None = None, manifest: str | os.PathLike | None = None, calibrate: bool = True
) -> ScanInputs:
    """The scan's inputs from either three scene folders or a manifest.

    Raises:
        ConfigError: Both or neither given.
        InputError: See :func:`inputs_from_scene_dirs` and :func:`inputs_from_manifest_file`.
    """
    if (scenes is None) == (manifest is None):
        raise ConfigError("give either three scene folders (--scenes) or a manifest (--manifest), not both")
    if scenes is not None:
        return inputs_from_scene_dirs(scenes, calibrate)
    return inputs_from_manifest_file(manifest, calibrate)  # type: ignore[arg-type]


def read_mtls(inputs: ScanInputs) -> dict[str, dict[str, Any]]:
    """The parsed MTL files the scan calibrates with (empty without calibration)."""
    return {path: landsat.read_mtl(path) for path in inputs.mtl_files()}


# --------------------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------------------


def file_identity(path: str) -> dict[str, Any]:
    """Cheap identity of an input: local size and modification time, or for a GDAL path its raster header.

    Args:
        path: A local file or GDAL path.

    Returns:
        ``{"path", "size", "mtime_ns"}`` locally, ``{"path", "remote": True, "header": {...}}`` otherwise.
    """
    if not is_gdal_path(path):
        stat = os.stat(path)
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    from fusionkern.readers import RasterSource

    with RasterSource(path) as src:
        header = {
            "width": src.width, "height": src.height, "dtype": src.dtype.name,
            "transform": list(src.transform)[:6], "crs": src.crs.to_string() if src.crs else None,
        }  # fmt: skip
    return {"path": str(path), "remote": True, "header": header}


def describe_inputs(inputs: ScanInputs, checksums: bool = True) -> dict[str, Any]:
    """The inputs for ``scan.json``: per file its path, size and SHA-256 (local) or header (GDAL paths).

    Args:
        inputs: The scan's inputs.
        checksums: Hash local files (reads them once more); False records size and modification time only.
    """

    def entry(path: str, extra: dict[str, Any]) -> dict[str, Any]:
        info = {**file_identity(path), **extra}
        if checksums and not info.get("remote"):
            info["sha256"] = sha256_file(path)
        return info

    return {
        "bands": {
            branch: [entry(r.path, {"date": r.label, "mtl": r.mtl}) for r in rasters]
            for branch, rasters in inputs.bands.items()
        },
        "qa": [entry(q, {}) if q else None for q in inputs.qa],
        "mtl": [entry(m, {}) for m in inputs.mtl_files()],
        "calibrate": inputs.calibrate,
        "calibration": describe_calibration(inputs.bands, inputs.calibrate),
    }
