"""Scanning large regions: Landsat-8 rasters in, cement-plant detections out.

Where things are:

* :mod:`~fusionkern.scan.inputs`: scene folders or a manifest -> the rasters, with fingerprints.
* :mod:`~fusionkern.scan.grid`: the scan grid, the chip layout on it, rasters read (or warped) onto it.
* :mod:`~fusionkern.scan.tiles`: block windows with a halo, chips cut in memory, nodata and cloud masking.
* :mod:`~fusionkern.scan.backends`: predictors (torch, triton, onnxruntime, tensorrt), one interface.
* :mod:`~fusionkern.scan.engine`: the local engine (reader threads overlapping inference) and timing helpers.
* :mod:`~fusionkern.scan.ray_engine`: the same scan over a Ray cluster.
* :mod:`~fusionkern.scan.resume`: finished tiles on disk for ``--resume``.
* :mod:`~fusionkern.scan.outputs`: scores COG, detections GeoJSON / GeoParquet, quick look, ``scan.json``.
* :mod:`~fusionkern.scan.run`: :func:`run_scan`, all of it together (``fusionkern scan``).
"""

from fusionkern.scan.run import ENGINES, ScanOptions, ScanResult, run_scan

__all__ = ["ENGINES", "ScanOptions", "ScanResult", "run_scan"]
