"""Shared fixtures: the real Landsat-8 clips in ../shared/data (skipped where absent) and fresh random seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FUSIONKERN_SHARED_DATA", REPO.parent / "shared" / "data"))
LANDSAT8 = SHARED_DATA / "landsat8"

CLIP_C1_AFRICA = "LC08_L1TP_167055_20170308_20170317_01_T1"  # uint16, nodata 65535, EPSG:32637, 101 x 101
CLIP_C1_MARBURG = "LC08_L1TP_195025_20130707_20170503_01_T1"  # int16, nodata -32768, EPSG:32632, 41 x 41
CLIP_PRE = "LC82320832016040LGN00"  # float64 DN, nodata -1.7e308, EPSG:32619, 184 x 134, pre-collection naming


@pytest.fixture(scope="session")
def landsat8_dir() -> Path:
    """The folder of real clips; tests that use it skip cleanly where ../shared/data is absent."""
    if not LANDSAT8.is_dir():
        pytest.skip(f"real Landsat-8 clips not found at {LANDSAT8}")
    return LANDSAT8


@pytest.fixture(params=[CLIP_C1_AFRICA, CLIP_C1_MARBURG, CLIP_PRE])
def clip_dir(request, landsat8_dir) -> Path:
    """Each real clip folder in turn."""
    path = landsat8_dir / request.param
    if not path.is_dir():
        pytest.skip(f"clip {request.param} not found")
    return path
